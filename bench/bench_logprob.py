"""Benchmark: per-token log-probs over a GPT-2 vocabulary, the fused kernels against plain PyTorch.

Each case runs forward + backward of one loss at V = 50257 (a sum of the outputs, so every output gets a
gradient):
  log_softmax+gather  torch.log_softmax(logits, -1).gather(...)      logp only, in the logits' dtype
  cross_entropy       -F.cross_entropy(logits, targets, reduction="none")   logp only
  pytorch logp+H      log_softmax in fp32, gather, entropy -(p * log p).sum(-1): what one writes by hand
  reference           logprobs_reference: the same, -inf logits handled (what impl="torch" runs)
  triton              token_logprobs(impl="triton"): logp and entropy in fp32, one pass over the logits
  trl                 TRL's trl.kernels.selective_log_softmax_and_entropy, when trl is installed
and, from hidden states (N, C) and the LM head (V, C), C = 768 (GPT-2 small):
  linear reference    linear_logprobs_reference: all (N, V) logits at once
  linear chunked      linear_logprobs: chunk_bytes rows of logits at a time (Triton on CUDA, PyTorch on CPU)
  trl linear          TRL's trl.kernels.chunked_logprob.ChunkedLogProbFunction, when trl is installed
(trl is optional: `pip install -e ".[bench]"`.)

On CUDA it reports the median time, GB/s = bytes of the logits / time, and peak memory above the inputs
(torch.cuda.max_memory_allocated). The bottleneck is memory bandwidth, so the bound is measured too: a
copy (x.clone() of the same bytes) reads and writes them once. A fused forward + backward must read the
logits twice (forward, backward) and write their gradient once, 3 x bytes in all; "% of copy" is
(3 x bytes / time) / copy bandwidth, 100% meaning as fast as memory allows. The linear cases are
matmul-bound instead: they report useful TFLOP/s, 6 N V C per step (the chunked backward does 2 N V C
more to recompute the logits, not counted).

On CPU it reports peak memory only (torch's CPU allocator, above the inputs, from the profiler's memory
events): CPU timings would say nothing about the GPU, so timings need a CUDA device. --linear_memory
reports every LM-head variant's peak and CPU time at GPT-2 small's and medium's width, TRL's when it is
installed, our Triton path under TRITON_INTERPRET=1 (the table in bench/RESULTS.md).

    python bench/bench_logprob.py                     # CUDA: N = 4096, 16384, 65536; fp32 and bf16
    python bench/bench_logprob.py --quick             # one size, one dtype, 3 repetitions
    python bench/bench_logprob.py --sizes 1024,2048 --dtypes bf16

measure() is also what bench/gpu_check.py runs, on fewer cases.
"""

import functools
import importlib
import importlib.util
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `kernels`
from support.memory import allocated  # noqa: E402
from support.training import flag, parse_args  # noqa: E402
from kernels.logprob import (  # noqa: E402
    linear_logprobs,
    linear_logprobs_reference,
    logprobs_reference,
    token_logprobs,
)


@dataclass
class Args:
    """Per-token log-prob + entropy: our kernels against PyTorch (and TRL), time, GB/s, peak memory."""

    sizes: str = flag("", "comma-separated N (rows = tokens); default 4096,16384,65536 on CUDA, 1024,4096 on CPU")
    dtypes: str = flag("fp32,bf16", "comma-separated dtypes: fp32, fp16, bf16")
    vocab: int = flag(50257, "V, the vocabulary size (GPT-2's)")
    n_embd: int = flag(768, "C, hidden size of the linear cases (GPT-2 small)")
    chunk_bytes: int = flag(0, "max_chunk_bytes of linear_logprobs: bytes for one chunk of logits (0: its default)",
                            min=0)
    reps: int = flag(10, "timed repetitions per case on CUDA (shows the median)")
    device: str = flag("auto", "cuda, cpu, or auto (cuda when available)")
    quick: bool = flag(False, "a smoke test: one size (the smallest; 4096 on CUDA, 2048 on CPU), the first "
                       "dtype, 3 reps")
    linear_memory: bool = flag(False, "on a CPU: the peak and time of every LM-head variant at N = 2048, V = 50257, "
                               "C = 768 and 1024, fp32 (run it with TRITON_INTERPRET=1 for our Triton path)")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------
# The cases: each returns a scalar loss from (logits, targets) or (hidden, weight, targets)


def log_softmax_gather(logits, targets):
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).sum()


def cross_entropy(logits, targets):
    return -F.cross_entropy(logits, targets, reduction="none").sum()


def pytorch_logp_entropy(logits, targets):
    logp_all = torch.log_softmax(logits.float(), dim=-1)  # (N, V) fp32
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)  # (N,)
    entropy = -(logp_all.exp() * logp_all).sum(dim=-1)  # (N,)
    return (logp + entropy).sum()


def reference(logits, targets):
    logp, entropy = logprobs_reference(logits, targets)
    return (logp + entropy).sum()


def fused(logits, targets):
    logp, entropy = token_logprobs(logits, targets, impl="triton")
    return (logp + entropy).sum()


def linear_plain(hidden, weight, targets, chunk_bytes):
    return pytorch_logp_entropy(hidden @ weight.T, targets)  # all (N, V) logits, as one writes it by hand


def linear_reference(hidden, weight, targets, chunk_bytes):
    logp, entropy = linear_logprobs_reference(hidden, weight, targets)
    return (logp + entropy).sum()


def linear_chunked(hidden, weight, targets, chunk_bytes, impl=None):
    # impl None: Triton on CUDA; on the CPU PyTorch, except under the interpreter (gpu_check.py --dry-run)
    kernels = hidden.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    logp, entropy = linear_logprobs(hidden, weight, targets, max_chunk_bytes=chunk_bytes or None,
                                    impl=impl or ("triton" if kernels else "torch"))
    return (logp + entropy).sum()


def trl_logp_entropy(logits, targets):
    from trl.kernels import selective_log_softmax_and_entropy

    logp, entropy = selective_log_softmax_and_entropy(logits, targets)
    return (logp + entropy).sum()


def trl_linear(hidden, weight, targets, chunk_bytes, tile=4096):
    # TRL 1.16: 4096 rows at a time, `tile` vocabulary columns per matmul (its trainer passes 32768)
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    logp, entropy, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, tile, None, 1.0,
                                                     ("entropy",))
    return (logp + entropy).sum()


LOGITS_CASES = {"log_softmax+gather": log_softmax_gather, "cross_entropy": cross_entropy,
                "pytorch logp+H": pytorch_logp_entropy, "reference": reference, "triton": fused,
                "trl": trl_logp_entropy}
LINEAR_CASES = {"linear plain": linear_plain, "linear reference": linear_reference, "linear chunked": linear_chunked,
                "linear chunked torch": functools.partial(linear_chunked, impl="torch"),
                "linear chunked triton": functools.partial(linear_chunked, impl="triton"),
                "trl linear": trl_linear, "trl linear 32768": functools.partial(trl_linear, tile=32768)}
TRL_CASES = {"trl": ("trl.kernels", "selective_log_softmax_and_entropy"),
             "trl linear": ("trl.kernels.chunked_logprob", "ChunkedLogProbFunction"),
             "trl linear 32768": ("trl.kernels.chunked_logprob", "ChunkedLogProbFunction")}
# what run_cuda times; the other linear cases are for --linear_memory
TIMED_CASES = [*LOGITS_CASES, "linear reference", "linear chunked", "trl linear"]


def unavailable(case):
    """Why a case cannot run here (a string), or None when it can: the TRL cases need trl and a
    version that has the kernel."""
    if case not in TRL_CASES:
        return None
    if importlib.util.find_spec("trl") is None:
        return "trl is not installed (pip install -e \".[bench]\")"
    module, name = TRL_CASES[case]
    try:
        found = hasattr(importlib.import_module(module), name)
    except ImportError as e:
        return f"{module} does not import: {e}"
    return None if found else f"trl {importlib.import_module('trl').__version__} has no {module}.{name}"


def make_inputs(case, N, V, C, dtype, device):
    """The leaves of one case, fresh: logits (N, V), or hidden (N, C) and weight (V, C); then targets."""
    targets = torch.randint(0, V, (N,), device=device)  # (N,)
    if case in LOGITS_CASES:
        logits = torch.randn(N, V, device=device, dtype=dtype).requires_grad_()  # (N, V)
        return logits, targets
    hidden = torch.randn(N, C, device=device, dtype=dtype).requires_grad_()  # (N, C)
    weight = (torch.randn(V, C, device=device, dtype=dtype) * C**-0.5).requires_grad_()  # (V, C)
    return hidden, weight, targets


def step(case, inputs, chunk_bytes):
    """One forward + backward; the gradients land in .grad of the inputs."""
    for x in inputs:
        x.grad = None
    if case in LOGITS_CASES:
        LOGITS_CASES[case](*inputs).backward()
    else:
        LINEAR_CASES[case](*inputs, chunk_bytes).backward()


# ----------------------------------------------------------------------------------------------------
# CUDA: time, bandwidth, peak memory


def cuda_time_ms(fn, reps):
    """Median milliseconds of fn() over reps runs, after one warm-up run (Triton compiles there)."""
    fn()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()  # a CPU-GPU sync point, outside the timed interval
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cuda_case(case, N, V, C, dtype, chunk_bytes, reps):
    """(ms, peak bytes above the inputs) of one case, or None when it runs out of memory."""
    try:
        inputs = make_inputs(case, N, V, C, dtype, "cuda")
        step(case, inputs, chunk_bytes)  # warm-up, outside the memory measurement
        for x in inputs:
            x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(case, inputs, chunk_bytes)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = cuda_time_ms(lambda: step(case, inputs, chunk_bytes), reps)
        result = ms, peak
    except torch.cuda.OutOfMemoryError:
        result = None
    inputs = None  # drop the tensors (after an OOM the traceback held them until here)
    torch.cuda.empty_cache()
    return result


def copy_gbs(N, V, dtype, device, reps):
    """GB/s of x.clone() for an (N, V) tensor: one read and one write, the bandwidth bound."""
    nbytes = N * V * dtype.itemsize
    try:
        x = torch.empty(N, V, device=device, dtype=dtype)
        ms = cuda_time_ms(lambda: x.clone(), reps) if device == "cuda" else cpu_time_ms(lambda: x.clone(), reps)
        return 2 * nbytes / ms / 1e6
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        x = None
        if device == "cuda":
            torch.cuda.empty_cache()


def measure(case, N, V, C, dtype, device, reps, chunk_bytes=0):
    """(ms, peak bytes) of one forward + backward of case, or None when it runs out of memory.

    On CUDA: the median of reps timed runs (CUDA events) and the peak allocated above the inputs. On
    the CPU (gpu_check.py --dry-run): wall-clock time, which says nothing about a GPU, and the growth
    of torch's CPU allocator's high-water mark."""
    if device == "cuda":
        return cuda_case(case, N, V, C, dtype, chunk_bytes, reps)
    peak = cpu_peak_bytes(case, N, V, C, dtype, chunk_bytes)
    inputs = make_inputs(case, N, V, C, dtype, "cpu")
    return cpu_time_ms(lambda: step(case, inputs, chunk_bytes), reps), peak


def run_cuda(args, sizes, dtypes, reps):
    V, C = args.vocab, args.n_embd
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"triton {__import__('triton').__version__}")
    print(f"V = {V}, C = {C}, chunk_bytes = {args.chunk_bytes}, forward + backward, median of {reps}\n")
    header = (f"{'N':>6} {'dtype':>5}  {'case':<19} {'ms':>8} {'GB/s':>7} {'% of copy':>9} {'TFLOP/s':>8} "
              f"{'peak GB':>8}")
    for N in sizes:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            logits_bytes = N * V * dtype.itemsize
            copy = copy_gbs(N, V, dtype, "cuda", reps) or float("nan")
            print(header)
            print(f"{N:>6} {dtype_name:>5}  {'copy (x.clone())':<19} {'':>8} {copy:>7.0f}")
            for case in TIMED_CASES:
                if unavailable(case):
                    print(f"{N:>6} {dtype_name:>5}  {case:<19} not measured: {unavailable(case)}")
                    continue
                result = measure(case, N, V, C, dtype, "cuda", reps, args.chunk_bytes)
                if result is None:
                    print(f"{N:>6} {dtype_name:>5}  {case:<19} {'out of memory':>8}")
                    continue
                ms, peak = result
                if case in LOGITS_CASES:
                    gbs = logits_bytes / ms / 1e6
                    of_copy = 100 * 3 * logits_bytes / ms / 1e6 / copy
                    print(f"{N:>6} {dtype_name:>5}  {case:<19} {ms:>8.2f} {gbs:>7.0f} {of_copy:>8.0f}% "
                          f"{'':>8} {peak / 1e9:>8.2f}")
                else:
                    tflops = 6 * N * V * C / ms / 1e9
                    print(f"{N:>6} {dtype_name:>5}  {case:<19} {ms:>8.2f} {'':>7} {'':>9} {tflops:>8.1f} "
                          f"{peak / 1e9:>8.2f}")
            print()


# ----------------------------------------------------------------------------------------------------
# CPU: peak memory (and, for gpu_check.py --dry-run, wall-clock time)


def cpu_time_ms(fn, reps):
    """Median wall-clock milliseconds of fn() over reps runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)



def cpu_peak_bytes(case, N, V, C, dtype, chunk_bytes, seconds=None):
    """The most bytes one forward + backward has allocated at once above its inputs: torch's CPU allocator,
    read from the profiler's memory events, as torch.cuda.max_memory_allocated reads CUDA's. (Resident
    memory would count what the C library keeps after a free: many chunk-sized blocks look like a leak.)
    seconds: a list that gets the step's wall time appended."""
    step(case, make_inputs(case, min(N, 64), V, C, dtype, "cpu"), chunk_bytes)  # first calls, on a few rows
    inputs = make_inputs(case, N, V, C, dtype, "cpu")
    start = time.perf_counter()
    peak, _ = allocated(lambda: step(case, inputs, chunk_bytes))
    if seconds is not None:
        seconds.append(time.perf_counter() - start)
    return peak


def run_cpu(args, sizes, dtypes):
    V, C = args.vocab, args.n_embd
    print(f"device: CPU ({platform.machine()}), torch {torch.__version__}")
    print("timings need a GPU: on CPU this reports peak memory only, torch's allocator's high-water mark during "
          "one forward + backward above the inputs (it includes the gradients of the inputs).")
    print(f"V = {V}, C = {C}, chunk_bytes = {args.chunk_bytes}; the Triton and TRL cases are skipped (the "
          "interpreter is a correctness tool)\n")
    print(f"{'N':>6} {'dtype':>5}  {'case':<19} {'peak GB':>8}   for scale: one (N, V) fp32 tensor is")
    for N in sizes:
        for dtype_name in dtypes:
            for case in [c for c in TIMED_CASES if c != "triton" and c not in TRL_CASES]:
                peak = cpu_peak_bytes(case, N, V, C, DTYPES[dtype_name], args.chunk_bytes)
                print(f"{N:>6} {dtype_name:>5}  {case:<19} {peak / 1e9:>8.2f}   {N * V * 4 / 1e9:.2f} GB")
            print()


MEMORY_CASES = ["linear plain", "linear chunked torch", "linear chunked triton", "trl linear 32768", "trl linear"]


def run_linear_memory(args):
    """The peak (allocated above the inputs) and the time of one forward + backward of every LM-head
    variant, fp32, N = 2048, V = 50257, C = 768 (GPT-2 small) and 1024 (medium): a table for RESULTS.md."""
    N, V = 2048, args.vocab
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if interpreting:
        import gc

        from kernels import logprob

        # the GPU's 4096-wide blocks: the same allocations, 16x fewer interpreted blocks per row
        logprob._launch_config = functools.partial(logprob._launch_config, interpreting=False)
        # The interpreter reads a tensor through numpy arrays that end up in reference cycles: the memory of a
        # block it read stays allocated until Python's cycle collector runs, where a GPU frees it at once.
        # Collecting after each launch measures what the code holds, not what the interpreter left behind.
        for name in ("_logprobs_forward", "_logprobs_backward"):
            def collected(*args, _launch=getattr(logprob, name), **kwargs):
                out = _launch(*args, **kwargs)
                gc.collect()
                return out
            setattr(logprob, name, collected)
    print(f"CPU ({platform.machine()}), torch {torch.__version__}, trl "
          f"{'not installed' if unavailable('trl linear') else importlib.import_module('trl').__version__}; "
          f"N = {N}, V = {V}, fp32, forward + backward of logp + entropy; max_chunk_bytes "
          f"{args.chunk_bytes or 'default'}")
    print("| C | variant | peak MiB | vs plain torch | s |\n| --- | --- | --- | --- | --- |")
    for C in (768, 1024):
        plain = None
        for case in MEMORY_CASES:
            why = unavailable(case) or ("" if interpreting or "triton" not in case else
                                        "needs TRITON_INTERPRET=1 on a CPU")
            if why:
                print(f"| {C} | {case} | not measured: {why} | | |")
                continue
            seconds = []
            peak = cpu_peak_bytes(case, N, V, C, torch.float32, args.chunk_bytes, seconds)
            plain = plain or peak
            print(f"| {C} | {case} | {peak / 2**20:.0f} | {plain / peak:.1f}x less | {seconds[0]:.1f} |", flush=True)


def main():
    args = parse_args(Args)
    if args.linear_memory:
        run_linear_memory(args)
        return
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    default_sizes = "4096,16384,65536" if device == "cuda" else "1024,4096"
    sizes = [int(n) for n in (args.sizes or default_sizes).split(",")]
    dtypes = args.dtypes.split(",")
    for name in dtypes:
        if name not in DTYPES:
            raise SystemExit(f"--dtypes: unknown dtype '{name}', choose from {', '.join(DTYPES)}")
    reps = args.reps
    if args.quick:
        sizes = [min(sizes) if args.sizes else (4096 if device == "cuda" else 2048)]
        dtypes, reps = dtypes[:1], 3
    if device == "cuda":
        run_cuda(args, sizes, dtypes, reps)
    else:
        run_cpu(args, sizes, dtypes)


if __name__ == "__main__":
    main()
