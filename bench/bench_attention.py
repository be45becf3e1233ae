"""Benchmark: our Triton flash_attention vs PyTorch's flash SDPA vs the naive reference.

    python bench/bench_attention.py            # T = 512 .. 8192, head dims 64 and 128
    python bench/bench_attention.py --quick    # T = 512 .. 2048, head dim 64, fewer repetitions

Causal, bf16. Attention is bound by its matmuls, so the unit is TFLOP/s (an H100 SXM peaks near
990 dense bf16 TFLOP/s; FlashAttention-2 reaches roughly a third to a half of that):
  forward:  Q K^T and P V are 2 * T * T * hs multiply-adds each per (b, h), i.e. 4 * T^2 * hs flops,
            halved by the causal mask:          flops_fwd = 0.5 * 4 * B * nh * T * T * hs
  backward: dV, dP, dQ, dK are four matmuls of the same size, plus recomputing S (a fifth):
            2.5 * flops_fwd, so forward + backward = 3.5 * flops_fwd (the Triton tutorial's 2.5 factor
            counts the backward alone). The backward alone is timed as (fwd+bwd) - fwd.
Shapes: nh = 16 and B * T = --tokens tokens (B = tokens // T, at least 1), so every T does about the
same work per launch until B reaches 1; with too few tokens the GPU is not full and every kernel looks
slower. The naive reference stores the (B, nh, T, T) matrix several times over, so it is skipped from
T = 8192 (16 * 8192^2 * 2 bytes = 2 GiB per copy).

measure() is also what bench/gpu_check.py runs; on the CPU (its --dry-run) it times the Triton
interpreter and PyTorch's CPU attention, which says nothing about a GPU: that only checks the code.
"""

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `kernels` imports when run as a script
from kernels.flash_attention import attention_reference, flash_attention  # noqa: E402
from support.training import flag, parse_args  # noqa: E402

PASSES = ("fwd", "fwd+bwd", "bwd")  # bwd is derived: (fwd+bwd) - fwd
IMPLS = ("ours", "sdpa", "naive")
NAIVE_MAX_T = 4096  # the naive path's (B, nh, T, T) matrices above this do not fit comfortably


@dataclass
class Args:
    """Fused attention against SDPA (flash backend) and the naive path, TFLOP/s."""

    quick: bool = flag(False, "T up to 2048, head dim 64 only, fewer reps")
    nh: int = flag(16, "number of heads")
    tokens: int = flag(16384, "B * T per launch, B = max(1, tokens // T)")


def sdpa(q, k, v):
    # On CUDA, force PyTorch's FlashAttention-2 backend, so the comparison is fused kernel against fused
    # kernel (the default dispatcher may pick cuDNN or memory-efficient attention instead). The CPU has
    # no flash backend; there the default one runs.
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


IMPL_FNS = {"ours": flash_attention, "sdpa": sdpa, "naive": attention_reference}


def time_ms(fn, reps, grad_to_none=()):
    """Median milliseconds of fn(). On CUDA triton's do_bench (reps = milliseconds of repetitions, with
    the L2 cache flushed between runs); on the CPU wall-clock time of reps runs after one warm-up."""
    tensors = list(grad_to_none)
    if tensors and tensors[0].is_cuda:
        import triton

        return triton.testing.do_bench(fn, grad_to_none=tensors, rep=reps)
    fn()
    times = []
    for _ in range(reps):
        for t in tensors:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def flops_forward(B, nh, T, hs):
    return 0.5 * 4 * B * nh * T * T * hs  # causal: half of Q K^T and P V


def measure(T, hs, B, nh, device="cuda", dtype=torch.bfloat16, reps=100, max_err=2e-2):
    """TFLOP/s of each impl and pass at one shape: {(impl, pass): TFLOP/s or None (not run)}, plus the
    largest difference of our output from SDPA's (checked before any timing: a fast wrong kernel is not
    a result; RuntimeError above max_err)."""
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, nh, T, hs, device=device, dtype=dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    with torch.no_grad():
        err = (flash_attention(q, k, v) - sdpa(q, k, v)).abs().max().item()  # a sync point
    if err > max_err:
        raise RuntimeError(f"flash_attention differs from SDPA by {err:.3g} at T={T}, hs={hs}")

    flops = flops_forward(B, nh, T, hs)
    result = {}
    for impl, fn in IMPL_FNS.items():
        if impl == "naive" and T > NAIVE_MAX_T:
            result.update({(impl, p): None for p in PASSES})
            continue
        fwd_ms, both_ms = _time_passes(fn, q, k, v, do, reps)
        bwd_ms = both_ms - fwd_ms
        result[(impl, "fwd")] = flops / (fwd_ms * 1e-3) / 1e12
        result[(impl, "fwd+bwd")] = 3.5 * flops / (both_ms * 1e-3) / 1e12
        result[(impl, "bwd")] = 2.5 * flops / (bwd_ms * 1e-3) / 1e12 if bwd_ms > 0 else None
    q = k = v = do = None  # free the inputs before the next shape allocates its own
    if device == "cuda":
        torch.cuda.empty_cache()
    return result, err


def _time_passes(fn, q, k, v, do, reps):
    """Milliseconds of fn's forward alone and of its forward + backward."""
    def forward():
        with torch.no_grad():
            fn(q, k, v)

    def forward_backward():
        fn(q, k, v).backward(do)

    return time_ms(forward, reps, grad_to_none=(q, k, v)), time_ms(forward_backward, reps, grad_to_none=(q, k, v))


def main():
    args = parse_args(Args)
    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU (none found); nothing to time.")
        return
    import triton

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
            result, _ = measure(T, hs, B, args.nh, reps=reps)
            for name in PASSES:
                cols = [f"{result[(impl, name)]:7.1f}" if result[(impl, name)] is not None else f"{'skip':>7}"
                        for impl in IMPLS]
                ours, ref = result[("ours", name)], result[("sdpa", name)]
                ratio = f"{ours / ref:6.2f}" if ours and ref else f"{'-':>6}"
                print(f"{T:>5} {B:>2} {args.nh:>3} {hs:>4} {name:>8} {' '.join(cols)} {ratio}")


if __name__ == "__main__":
    main()
