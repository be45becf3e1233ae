"""Benchmark: our Triton flash_attention vs PyTorch's flash SDPA vs the naive reference (GPU only).

    python bench/bench_attention.py            # T = 512 .. 8192, head dims 64 and 128
    python bench/bench_attention.py --quick    # T = 512 .. 2048, head dim 64, fewer repetitions

Causal, bf16. Attention is bound by its matmuls, so the unit is TFLOP/s (an H100 SXM peaks near
990 dense bf16 TFLOP/s; FlashAttention-2 reaches roughly a third to a half of that):
  forward:  Q K^T and P V are 2 * T * T * hs multiply-adds each per (b, h), i.e. 4 * T^2 * hs flops,
            halved by the causal mask:          flops_fwd = 0.5 * 4 * B * nh * T * T * hs
  backward: dV, dP, dQ, dK are four matmuls of the same size, plus recomputing S (a fifth):
            2.5 * flops_fwd, so forward + backward = 3.5 * flops_fwd (the Triton tutorial's 2.5 factor
            counts the backward alone).
Shapes: nh = 16 and B * T = 2048 tokens (B = 4 at T = 512, 2 at 1024, 1 from 2048 on), so the work
per launch grows with T only once B reaches 1; at small T the GPU is not full and every kernel looks
slower. The naive reference stores the (B, nh, T, T) matrix several times over, so it is skipped from
T = 8192 (16 * 8192^2 * 2 bytes = 2 GiB per copy).
"""

import argparse
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `kernels` imports when run as a script
from kernels.flash_attention import attention_reference, flash_attention  # noqa: E402


@dataclass
class Args:
    quick: bool = field(default=False, metadata={"help": "T up to 2048, head dim 64 only, fewer reps"})
    nh: int = field(default=16, metadata={"help": "number of heads"})
    tokens: int = field(default=2048, metadata={"help": "B * T per launch, B = max(1, tokens // T)"})


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Args):
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f.metadata["help"])
    return Args(**vars(parser.parse_args()))


def sdpa_flash(q, k, v):
    # Force PyTorch's FlashAttention-2 backend, so the comparison is fused kernel against fused kernel
    # (the default dispatcher may pick cuDNN or memory-efficient attention instead).
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def time_ms(fn, q, k, v, do, backward, reps):
    """Median milliseconds of fn(q, k, v), or of fn plus .backward(do) when backward is True."""
    if not backward:
        with torch.no_grad():
            return triton.testing.do_bench(lambda: fn(q, k, v), rep=reps)

    def step():
        fn(q, k, v).backward(do)

    # grad_to_none resets .grad between runs, so the time is not spent accumulating into old grads.
    return triton.testing.do_bench(step, grad_to_none=[q, k, v], rep=reps)


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU (none found); nothing to time.")
        return

    seq_lens = (512, 1024, 2048) if args.quick else (512, 1024, 2048, 4096, 8192)
    head_dims = (64,) if args.quick else (64, 128)
    reps = 30 if args.quick else 100  # milliseconds of timed repetitions per measurement
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print("causal, bf16, TFLOP/s (higher is better); ratio = ours / SDPA flash")
    header = f"{'T':>5} {'B':>2} {'nh':>3} {'hs':>4} {'pass':>8} {'ours':>7} {'sdpa':>7} {'naive':>7} {'ratio':>6}"
    print(header)
    print("-" * len(header))

    for hs in head_dims:
        for T in seq_lens:
            B = max(1, args.tokens // T)
            nh = args.nh
            torch.manual_seed(0)
            q, k, v, do = (torch.randn(B, nh, T, hs, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            for t in (q, k, v):
                t.requires_grad_()

            # A correctness check before any timing: a fast wrong kernel is not a result.
            with torch.no_grad():
                err = (flash_attention(q, k, v) - sdpa_flash(q, k, v)).abs().max().item()  # sync point
            if err > 2e-2:
                raise RuntimeError(f"flash_attention differs from SDPA by {err:.3g} at T={T}, hs={hs}")

            flops_fwd = 0.5 * 4 * B * nh * T * T * hs
            naive_fits = T < 8192
            for name, backward, flops in (("fwd", False, flops_fwd), ("fwd+bwd", True, 3.5 * flops_fwd)):
                ours = time_ms(flash_attention, q, k, v, do, backward, reps)
                sdpa = time_ms(sdpa_flash, q, k, v, do, backward, reps)
                naive = time_ms(attention_reference, q, k, v, do, backward, reps) if naive_fits else None

                def tflops(ms):
                    return flops / (ms * 1e-3) / 1e12

                naive_col = f"{tflops(naive):7.1f}" if naive is not None else f"{'skip':>7}"
                print(f"{T:>5} {B:>2} {nh:>3} {hs:>4} {name:>8} {tflops(ours):7.1f} {tflops(sdpa):7.1f} "
                      f"{naive_col} {sdpa / ours:6.2f}")
            del q, k, v, do
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
