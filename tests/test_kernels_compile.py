"""Every Triton kernel, compiled for an A100 (sm_80) and an H100 (sm_90) on this machine without a GPU.

The interpreter tests check what the kernels compute; they cannot see what a GPU compile makes of
them. bench/compile_report.py compiles each launch the host wrappers make (every dtype, head dim and
causal flag of attention, forward and backward; the log-prob kernels at V = 50257) with the
compiler and ptxas that ship inside triton, and reads ptxas' report. Here we check that:
  - every launch compiles, with exactly the settings _launch_config chooses for a GPU;
  - fp16/bf16 matmuls run on tensor cores (mma.sync on sm_80; wgmma in the H100 forward), and fp32
    matmuls are true fp32, never tf32 (the promise of input_precision="ieee" in _dot);
  - shared memory fits the target's limit per block;
  - nothing spills registers to local memory.
The compile takes about a minute on two cores; it runs once for the module. The resource table is
printed (pytest -s shows it) and kept in bench/RESULTS.md (`python bench/compile_report.py`).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # as the other kernel tests; the compile runs in children

import pytest
import torch

from bench import compile_report
from kernels import flash_attention as fa
from kernels import logprob as lp

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ATTENTION_PASS = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dkdv_kernel": "bwd", "_attn_bwd_dq_kernel": "bwd"}
MATMUL_KERNELS = tuple(ATTENTION_PASS)


@pytest.fixture(scope="module")
def results():
    results = compile_report.compile_all()  # raises with the child's stderr if a whole target fails
    print("\n" + compile_report.markdown_table(results))
    return results


def _compiled(results):
    return [r for r in results if r["error"] is None]


def _name(r):
    return f"{r['kernel']} {r['target']} {r['dtype']} hs={r['head_dim']} causal={r['causal']}"


def test_every_launch_compiles(results):
    failed = [f"{_name(r)}: {r['error']}" for r in results if r["error"] is not None]
    assert not failed, "these launches do not compile:\n" + "\n".join(failed)


def test_the_compiled_launches_are_what_the_launchers_choose(results):
    # The report records the wrappers' real launches; _launch_config(..., interpreting=False), called
    # here under the interpreter, must describe the same ones (one definition for the GPU settings).
    expected = set()
    for target in compile_report.TARGETS:
        for dtype_name, dtype in DTYPES.items():
            for hs in fa.SUPPORTED_HEAD_DIMS:
                for kernel, pass_name in ATTENTION_PASS.items():
                    cfg = fa._launch_config(pass_name, hs, dtype, interpreting=False)
                    for causal in (True, False):
                        expected.add((kernel, target, dtype_name, hs, causal, cfg["BLOCK_M"], cfg["BLOCK_N"],
                                      cfg["num_warps"], cfg["num_stages"]))
            cfg = lp._launch_config(compile_report.LOGPROB_SHAPE["V"], interpreting=False)
            for kernel in ("_logprobs_fwd_kernel", "_logprobs_bwd_kernel"):
                expected.add((kernel, target, dtype_name, None, None, cfg["BLOCK_V"], None, cfg["num_warps"],
                              None))
    got = set()
    for r in _compiled(results):
        if r["kernel"] == "_attn_bwd_preprocess_kernel":
            continue  # no choice of its own: the backward's BLOCK_M, Triton's default warps and stages
        blocks = r["blocks"]
        stages = r["num_stages"] if r["kernel"] in ATTENTION_PASS else None  # Triton's default otherwise
        got.add((r["kernel"], r["target"], r["dtype"], r["head_dim"], r["causal"],
                 blocks.get("BLOCK_M", blocks.get("BLOCK_V")), blocks.get("BLOCK_N"), r["num_warps"], stages))
    assert got == expected, \
        f"missing: {sorted(expected - got, key=str)}\nunexpected: {sorted(got - expected, key=str)}"


def test_half_precision_matmuls_use_tensor_cores(results):
    wrong = []
    for r in _compiled(results):
        if r["kernel"] not in MATMUL_KERNELS or r["dtype"] == "fp32":
            continue
        if r["target"] == "sm_80" and "mma.sync" not in r["mma"]:
            wrong.append(f"{_name(r)}: {r['mma'] or 'no matrix instruction'} (expected mma.sync)")
        if r["target"] == "sm_90":
            # Hopper runs mma.sync too, at a fraction of wgmma's rate; Triton uses it for tiles too small
            # for a warpgroup (dK/dV at BLOCK_N=32 mixes both). The forward must be wgmma.
            needed = ("wgmma.mma_async",) if r["kernel"] == "_attn_fwd_kernel" else \
                ("wgmma.mma_async", "mma.sync")
            if not set(needed) & set(r["mma"]):
                wrong.append(f"{_name(r)}: {r['mma'] or 'no matrix instruction'} (expected one of {needed})")
    assert not wrong, "\n".join(wrong)


def test_fp32_matmuls_are_exact_fp32(results):
    # input_precision="ieee": fp32 products on the FMA units, never tf32 (10-bit mantissa) tensor cores.
    fp32 = [r for r in _compiled(results) if r["kernel"] in MATMUL_KERNELS and r["dtype"] == "fp32"]
    assert len(fp32) == 2 * 3 * 3 * 2  # targets x kernels x head dims x causal
    wrong = [_name(r) for r in fp32 if r["tf32"] or r["mma"]]
    assert not wrong, "fp32 matmuls compiled to tensor-core (tf32) instructions:\n" + "\n".join(wrong)


def test_shared_memory_fits(results):
    too_big = [f"{_name(r)}: {r['shared']} bytes > {compile_report.TARGETS[r['target']]['max_shared']}"
               for r in _compiled(results) if r["shared"] > compile_report.TARGETS[r["target"]]["max_shared"]]
    assert not too_big, "\n".join(too_big)


def test_no_register_spills(results):
    # A spill sends registers to local memory (cached, but off-chip behind L2): see _launch_config for
    # the settings that removed them.
    compiled = _compiled(results)
    assert all(r["registers"] is not None and r["spill_stores"] is not None for r in compiled), \
        "ptxas' -v report was not found for some launch"
    spills = [f"{_name(r)}: {r['spill_stores']} bytes stored, {r['spill_loads']} loaded "
              f"({r['blocks']}, {r['num_warps']} warps, {r['num_stages']} stages)"
              for r in compiled if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "\n".join(spills)
