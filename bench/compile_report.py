"""Compile every Triton kernel of kernels/ for an A100 (sm_80) and an H100 (sm_90), on a machine without
a GPU, and report what each launch costs: registers per thread, register spills, shared memory, and
which matrix instructions the matmuls became.

    python bench/compile_report.py               # prints the markdown table
    python bench/compile_report.py --out FILE    # also writes it to FILE
    python bench/compile_report.py --json        # the raw results, one JSON list (what the tests read)

tests/test_kernels_compile.py runs the same compile and asserts on it (it compiles, tensor cores are
used, shared memory fits, nothing spills).

How. Triton compiles ahead of time for a named target without a GPU:
  triton.compile(ASTSource(fn=kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                 options=dict(num_warps=..., num_stages=...))
goes Triton IR -> LLVM IR -> PTX -> cubin, the last step with the `ptxas` that ships inside triton.
Triton runs `ptxas -v`, which reports registers and spilled bytes, and prints its log when
knobs.nvidia.dump_ptxas_log is set: we capture it. The shared memory per block is in the compiled
kernel's metadata (what Triton checks against the device's limit at launch); the matrix instructions
are read from the PTX. On sm_90 Triton targets `sm_90a` (Hopper-only instructions such as wgmma).

Which launches. The host wrappers (_flash_attn_forward, _logprobs_backward, ...) run on tensors of the
"meta" device (a shape and a dtype, no memory) with each @triton.jit kernel replaced by a recorder. So
the compile sees exactly what a GPU launch would: the arguments, the constexprs, the block sizes and
num_warps / num_stages of _launch_config, and Triton's own specialisation of each argument (a pointer
16-byte aligned, an integer divisible by 16 or equal to 1). The shapes are those of a GPT-2-small
training step: B = 2, nh = 12, T = 1024 for attention; N = 2048 rows of V = 50257 for the log-probs.

The interpreter (TRITON_INTERPRET=1, set by the test suite) replaces every @triton.jit kernel by a
Python function that cannot be compiled, and Triton reads the variable once at import. So the compile
always runs in child processes started without it, one per target, side by side.
"""

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The per-block limit is what Triton checks at launch (cudaDevAttrMaxSharedMemoryPerBlockOptin): the
# SM's 164 KiB (A100) or 228 KiB (H100) less 1 KiB the hardware reserves for each block.
TARGETS = {
    "sm_80": dict(capability=80, gpu="A100", max_shared=163 * 1024),
    "sm_90": dict(capability=90, gpu="H100", max_shared=227 * 1024),
}

# The shapes of the recorded launches (see the module docstring).
ATTN_SHAPE = dict(B=2, nh=12, T=1024)
LOGPROB_SHAPE = dict(N=2048, V=50257)


# ----------------------------------------------------------------------------------------------------
# Recording the launches (needs TRITON_INTERPRET unset: the kernels must be real @triton.jit objects)


class _Recorder:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **kwargs) records the launch, runs nothing."""

    def __init__(self, kernel, launches, about):
        self.kernel, self.launches, self.about = kernel, launches, about

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(dict(kernel=self.kernel, args=args, kwargs=kwargs, **self.about()))
        return launch


@contextlib.contextmanager
def _recording(module, launches, about):
    """Replace every @triton.jit kernel of module (a name ending in _kernel) by a _Recorder."""
    import triton

    kernels = {name: fn for name, fn in vars(module).items()
               if name.endswith("_kernel") and isinstance(fn, triton.runtime.jit.JITFunction)}
    for name, fn in kernels.items():
        setattr(module, name, _Recorder(fn, launches, about))
    try:
        yield
    finally:
        for name, fn in kernels.items():
            setattr(module, name, fn)


def record_launches():
    """Every launch the host wrappers make, for every configuration they can choose: a list of dicts
    with the kernel (a JITFunction), its args and kwargs, and what was asked (dtype, head_dim, causal)."""
    import torch

    from kernels import flash_attention as fa
    from kernels import logprob as lp

    dtypes = dict(fp32=torch.float32, fp16=torch.float16, bf16=torch.bfloat16)
    launches = []
    now = {}  # what the wrapper is being asked right now; each recorded launch copies it
    meta = dict(device="meta")

    with _recording(fa, launches, lambda: dict(now)):
        B, nh, T = ATTN_SHAPE["B"], ATTN_SHAPE["nh"], ATTN_SHAPE["T"]
        for dtype_name, dtype in dtypes.items():
            for hs in fa.SUPPORTED_HEAD_DIMS:
                for causal in (True, False):
                    now.update(dtype=dtype_name, head_dim=hs, causal=causal)
                    q, k, v, do = (torch.empty(B, nh, T, hs, dtype=dtype, **meta) for _ in range(4))
                    kv_start = torch.zeros(B, dtype=torch.int32, **meta)  # (B,) as flash_attention makes it
                    sm_scale = hs**-0.5
                    o, lse = fa._flash_attn_forward(q, k, v, causal, kv_start, sm_scale)
                    fa._flash_attn_backward(do, q, k, v, o, lse, causal, kv_start, sm_scale)

    with _recording(lp, launches, lambda: dict(now)):
        N, V = LOGPROB_SHAPE["N"], LOGPROB_SHAPE["V"]
        for dtype_name, dtype in dtypes.items():
            now.update(dtype=dtype_name, head_dim=None, causal=None)
            logits = torch.empty(N, V, dtype=dtype, **meta)
            targets = torch.empty(N, dtype=torch.int64, **meta)
            rows = torch.empty(N, **meta)  # any (N,) fp32 tensor
            lp._logprobs_forward(logits, targets, 0.7)
            lp._logprobs_backward(rows, rows, logits, targets, rows, rows, rows, 0.7)
    return launches


def _compile_inputs(kernel, args, kwargs):
    """signature, constexprs, attrs and options for triton.compile, as JITFunction.run would make them."""
    from triton._C.libtriton import native_specialize_impl  # what JITFunction.run calls on each argument
    from triton.backends.compiler import BaseBackend

    kwargs = dict(kwargs)
    options = {name: kwargs.pop(name) for name in ("num_warps", "num_stages") if name in kwargs}
    values = dict(zip(kernel.arg_names, args), **kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        # e.g. ('*bf16', 'D'): a bf16 pointer, 16-byte aligned; ('i32', ''): an int32; ('constexpr', None)
        # for a None pointer or the integer 1, which Triton bakes into the kernel.
        kind, spec = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = spec
        elif spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs, options


def _ptxas_figures(log):
    """registers, spill stores / loads (bytes) and ptxas' performance notes from a `ptxas -v` log."""
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    # e.g. "(C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to ..."
    notes = sorted(set(re.findall(r"Potential Performance Loss: (.*?) (?:due to|in the function)", log)))
    return dict(registers=int(registers.group(1)) if registers else None,
                spill_stores=int(spills.group(1)) if spills else None,
                spill_loads=int(spills.group(2)) if spills else None,
                ptxas_notes=notes)


def _matrix_instructions(ptx):
    """The matrix-multiply instructions in the PTX: wgmma (Hopper's warpgroup MMA), mma.sync (the tensor
    cores of Ampere, also on Hopper), and whether any takes tf32 operands (fp32 rounded to 10 bits)."""
    found = [name for name in ("wgmma.mma_async", "mma.sync") if name in ptx]
    tf32 = bool(re.search(r"(wgmma\.mma_async|mma\.sync)\S*\.tf32", ptx))
    return found, tf32


def compile_target(target):
    """Compile every recorded launch for one target ('sm_80' or 'sm_90'); a list of result dicts."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas' -v log to stdout; we capture it
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas, and with it the log
    gpu_target = GPUTarget("cuda", TARGETS[target]["capability"], 32)
    results = []
    seen = set()
    for launch in record_launches():
        kernel = launch["kernel"]
        signature, constexprs, attrs, options = _compile_inputs(kernel, launch["args"], launch["kwargs"])
        # The same binary twice (the preprocessing kernel does not depend on causal) is compiled once.
        key = repr((kernel.__name__, signature, constexprs, attrs, options))
        if key in seen:
            continue
        seen.add(key)
        blocks = {k: v for k, v in constexprs.items() if k.startswith("BLOCK_")}
        causal = launch["causal"] if "CAUSAL" in constexprs else None
        result = dict(kernel=kernel.__name__, target=target, dtype=launch["dtype"],
                      head_dim=launch["head_dim"], causal=causal, blocks=blocks,
                      num_warps=options.get("num_warps"), num_stages=options.get("num_stages"),
                      error=None)
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(triton.compiler.ASTSource(kernel, signature, constexprs, attrs),
                                          target=gpu_target, options=options)
        except Exception as e:  # reported per launch; the tests fail with this message
            result["error"] = f"{type(e).__name__}: {str(e).strip()[:2000]}"
            results.append(result)
            continue
        result["shared"] = compiled.metadata.shared  # bytes of dynamic shared memory per block
        result["num_warps"] = compiled.metadata.num_warps
        result["num_stages"] = compiled.metadata.num_stages
        result.update(_ptxas_figures(log.getvalue()))
        result["mma"], result["tf32"] = _matrix_instructions(compiled.asm["ptx"])
        results.append(result)
    return results


# ----------------------------------------------------------------------------------------------------
# Running it from anywhere (the tests run under TRITON_INTERPRET=1)


def compile_all(targets=tuple(TARGETS)):
    """Compile for each target in a child process without TRITON_INTERPRET, the targets side by side.
    Returns the results of all of them. Raises RuntimeError with the child's output if one fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    children = []
    for target in targets:
        cache = tempfile.TemporaryDirectory(prefix="triton-aot-")
        # A cache of its own keeps these sm_80 / sm_90 binaries out of the user's ~/.triton/cache.
        child_env = dict(env, TRITON_CACHE_DIR=cache.name, PYTHONPATH=str(REPO))
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--json", "--target", target],
                                env=child_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        children.append((target, proc, cache))
    results = []
    for target, proc, cache in children:
        out, err = proc.communicate()
        cache.cleanup()
        if proc.returncode != 0:
            raise RuntimeError(f"compiling for {target} failed in the child process (exit {proc.returncode}):"
                               f"\n{err[-4000:]}")
        results += json.loads(out)
    return results


def _kib(n):
    return f"{n / 1024:.0f}"


def _figures(r):
    """'registers / spilled bytes / shared KiB / matrix instructions' of one result, for one table cell."""
    if r is None:
        return "not compiled"
    if r["error"]:
        return f"**does not compile**: {r['error'].splitlines()[0][:100]}"
    spills = f"{r['spill_stores']}" if r["spill_stores"] == r["spill_loads"] else \
        f"{r['spill_stores']}/{r['spill_loads']}"
    mma = {"wgmma.mma_async": "wgmma", "mma.sync": "mma"}
    matrix = "+".join(mma[m] for m in r["mma"]) or "-"
    notes = " (ptxas: " + "; ".join(r["ptxas_notes"]) + ")" if r["ptxas_notes"] else ""
    return f"{r['registers']} / {spills} / {_kib(r['shared'])} / {matrix}{notes}"


def _launch_key(r):
    return (r["kernel"], r["dtype"], r["head_dim"], r["causal"])


def markdown_table(results):
    """The resource table as markdown: one row per launch setting, the targets side by side (both
    compile the same launch: the launch settings do not depend on the GPU)."""
    targets = [t for t in TARGETS if any(r["target"] == t for r in results)]
    by_launch = {}
    for r in results:
        by_launch.setdefault(_launch_key(r), {})[r["target"]] = r
    limits = ", ".join(f"{TARGETS[t]['gpu']} {_kib(TARGETS[t]['max_shared'])}" for t in targets)
    lines = [
        "Each target cell: registers per thread / bytes spilled to local memory (stores/loads when they "
        "differ) / shared memory per block in KiB / matrix instructions (mma: `mma.sync` tensor cores, "
        f"wgmma: Hopper's `wgmma.mma_async`, -: none). Shared memory limits per block: {limits} KiB.",
        "",
        "| kernel | dtype | hs | causal | blocks | warps | stages | " + " | ".join(targets) + " |",
        "| --- | --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in targets) + " |",
    ]
    for per_target in by_launch.values():
        r = next(iter(per_target.values()))
        kernel = r["kernel"].strip("_").removesuffix("_kernel")
        blocks = " ".join(f"{k[6:]}={v}" for k, v in r["blocks"].items())
        hs = r["head_dim"] if r["head_dim"] is not None else "-"
        causal = {True: "yes", False: "no", None: "-"}[r["causal"]]
        cells = " | ".join(_figures(per_target.get(t)) for t in targets)
        lines.append(f"| {kernel} | {r['dtype']} | {hs} | {causal} | {blocks} | {r['num_warps']} "
                     f"| {r['num_stages']} | {cells} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON instead")
    parser.add_argument("--target", choices=tuple(TARGETS), help="compile for this target only, in this "
                        "process (needs TRITON_INTERPRET unset)")
    args = parser.parse_args(argv)
    if args.target:
        if os.environ.get("TRITON_INTERPRET") == "1":
            parser.error("--target compiles in this process: unset TRITON_INTERPRET first")
        results = compile_target(args.target)
    else:
        started = time.perf_counter()
        results = compile_all()
        print(f"compiled {len(results)} launches in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.json:
        print(json.dumps(results))
        return
    table = markdown_table(results)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # so `kernels` imports when run as a script
    main()
