"""One prepared command for the day a GPU is lent: every GPU figure this project promises, in one report.

    bash bench/gpu_check.sh                 # one CUDA GPU, after the README's install; < 8 min on an H100
    bash bench/gpu_check.sh --dry-run       # the same code paths, tiny, on the CPU under the Triton interpreter
    python bench/gpu_check.py --sections attention,logprob --out /tmp/report.md

It writes one markdown report (--out; default bench/gpu_check_report.md, or bench/gpu_check_dry_run.md
for --dry-run) with the device, the versions, the date and the command, then five sections:
  1. the kernel tests (tests/test_flash_attention.py, tests/test_logprob.py) on CUDA tensors: compiled
     kernels, not the interpreter (TRITON_INTERPRET=0); mostly Triton compiles, about a second each
     (bench/compile_count.py counts them on a CPU: 82);
  2. attention, bf16 causal, head dims 64 and 128, T = 512..8192: our flash_attention against SDPA's
     flash backend and the naive path, forward and forward + backward TFLOP/s (bench_attention.py).
     Goals: forward >= 1.15x SDPA and backward >= 0.8x SDPA at hs = 64, T = 2048;
  3. per-token log-prob + entropy at V = 50257, N = 4096..32768, bf16 and fp32: time, GB/s, peak memory,
     against PyTorch's log_softmax + gather + entropy and TRL's Triton kernel when `trl` is installed
     (`pip install -e ".[bench]"`) (bench_logprob.py). Goals: >= 5x faster and >= 8x less peak memory
     than PyTorch; at least as fast as TRL at no more memory;
  4. the same from hidden states and the LM head (linear_logprobs), against all-logits PyTorch and TRL's
     chunked kernel;
  5. the pipeline: train_sft.py, train_reward.py and train_ppo.py for a few steps each on a
     GPT-2-124M-shaped model with random weights (no download), attention and log-probs on Triton and
     on the PyTorch path: tokens/s (from each script's metrics.jsonl) and peak memory.
A section that did not run says "not measured" and why. --dry-run numbers time the CPU and the
interpreter: they check the code, they measure nothing. Exit code: 0 when every section ran and the
tests passed (a missed speed goal is reported, not an error), 1 otherwise, 2 for bad arguments.
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("tests", "attention", "logprob", "pipeline")
TITLES = {
    "tests": "1. Kernel tests on CUDA",
    "attention": "2. Attention: flash_attention vs SDPA (flash backend) vs naive",
    "logprob": "3. Per-token log-prob + entropy",
    "linear": "4. Fused LM-head variant (linear_logprobs)",
    "pipeline": "5. Pipeline: the stage scripts on a GPT-2-124M-shaped model",
}

# What each section runs: on the GPU, and tiny for --dry-run. The GPU sizes fit the 8-minute budget.
PLANS = {
    "gpu": dict(
        device="cuda", test_select=None, test_timeout=300,
        attn_seq_lens=(512, 1024, 2048, 4096, 8192), attn_head_dims=(64, 128), attn_tokens=16384, attn_nh=16,
        attn_reps=100,  # milliseconds of repetitions (triton.testing.do_bench)
        lp_sizes=(4096, 8192, 16384, 32768), lp_dtypes=("bf16", "fp32"), vocab=50257, lp_reps=5,
        lin_sizes=(4096, 16384, 32768), lin_dtypes=("bf16",), n_embd=768, chunk_bytes=0,  # 0: the default
        tiny_pipeline=False, stage_timeout=300,
    ),
    "dry": dict(
        device="cpu", test_select="bad_inputs", test_timeout=300,
        attn_seq_lens=(48, 80), attn_head_dims=(64,), attn_tokens=80, attn_nh=2, attn_reps=1,
        lp_sizes=(64,), lp_dtypes=("bf16", "fp32"), vocab=1000, lp_reps=1,
        lin_sizes=(64,), lin_dtypes=("bf16",), n_embd=32, chunk_bytes=16 * 1000 * 2,  # 16 rows
        tiny_pipeline=True, stage_timeout=300,
    ),
}
ATTN_GOAL = dict(hs=64, T=2048, fwd=1.15, bwd=0.8)  # ours / SDPA TFLOP/s
LP_GOAL = dict(speed=5.0, memory=8.0)  # PyTorch time / ours, PyTorch peak / ours


class UsageError(Exception):
    """A bad argument: one error line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the usage too; one line is what the README promises
        raise UsageError(message)


def parse_args(argv=None):
    parser = _Parser(prog="gpu_check.py", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="run every code path tiny on the CPU under the Triton interpreter (no GPU)")
    parser.add_argument("--out", default="", help="the markdown report (default: bench/gpu_check_report.md, "
                        "or bench/gpu_check_dry_run.md with --dry-run)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (the others say 'not measured')")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise UsageError(f"--sections: unknown section {','.join(unknown) or '(none given)'}; "
                         f"choose from {','.join(SECTIONS)}")
    args.sections = sections
    default = "gpu_check_dry_run.md" if args.dry_run else "gpu_check_report.md"
    args.out = Path(args.out) if args.out else REPO / "bench" / default
    if not args.out.parent.is_dir():
        raise UsageError(f"--out: folder {args.out.parent} does not exist")
    if args.out.is_dir():
        raise UsageError(f"--out: {args.out} is a folder; give a file name")
    return args


# ----------------------------------------------------------------------------------------------------
# Small helpers


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(x, spec=".3g", unit=""):
    return "not measured" if x is None else format(x, spec) + unit


_DRY_RUN = False  # set by main: no verdicts on dry-run numbers


def _verdict(value, goal, at_least=True):
    """'PASS' / 'FAIL' for value against goal, or 'not measured'."""
    if value is None:
        return "not measured"
    if _DRY_RUN:
        return "no verdict (dry run)"
    return "PASS" if (value >= goal if at_least else value <= goal) else "FAIL"


def header_lines(args, plan):
    import torch
    import triton

    try:
        from importlib.metadata import version
        trl = version("trl")
    except Exception:  # PackageNotFoundError, or no metadata at all
        trl = "not installed"
    if plan["device"] == "cuda":
        p = torch.cuda.get_device_properties(0)
        device = (f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} "
                  f"SMs), CUDA {torch.version.cuda}")
    else:
        device = f"CPU ({platform.machine()}, {os.cpu_count()} cores), the Triton interpreter"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.TimeoutExpired):
        commit = "unknown (no git)"
    mode = ("DRY RUN: tiny shapes on the CPU under the Triton interpreter. Every figure below checks the "
            "code path only; none measures a GPU." if args.dry_run else "GPU run")
    return [
        f"- mode: {mode}",
        f"- date: {datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `{' '.join(shlex.quote(a) for a in ['python', 'bench/gpu_check.py', *sys.argv[1:]])}`",
        f"- device: {device}",
        f"- versions: torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}, "
        f"trl {trl}",
        f"- git commit: {commit}",
    ]


# ----------------------------------------------------------------------------------------------------
# 1. Kernel tests


def tests_section(plan, dry_run):
    files = ["tests/test_flash_attention.py", "tests/test_logprob.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    if plan["test_select"]:
        cmd += ["-k", plan["test_select"]]
    # TRITON_INTERPRET=0: the compiled kernels on CUDA tensors (tests/conftest.py sets 1 only when unset)
    env = dict(os.environ, TRITON_INTERPRET="1" if dry_run else "0")
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=plan["test_timeout"])
    except subprocess.TimeoutExpired:
        return f"not measured: pytest ran past {plan['test_timeout']} s and was stopped", False
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else "(no output)"
    passed = proc.returncode == 0
    scope = (f"dry run: only the tests selected by `-k {plan['test_select']}`, under the interpreter on the CPU"
             if dry_run else "compiled kernels on CUDA tensors (TRITON_INTERPRET=0)")
    body = [f"Command: `TRITON_INTERPRET={env['TRITON_INTERPRET']} "
            f"{' '.join(shlex.quote(c) for c in ['python', *cmd[1:]])}` ({scope}).", "",
            f"Result: **{'PASS' if passed else 'FAIL'}**: {summary} (exit code {proc.returncode}, "
            f"{time.perf_counter() - started:.0f} s)."]
    if not passed:
        failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))][:20]
        body += ["", "```", *(failures or lines[-20:]), *proc.stderr.splitlines()[-5:], "```"]
    return "\n".join(body), passed


# ----------------------------------------------------------------------------------------------------
# 2. Attention


def attention_section(plan, dry_run):
    import torch

    from bench import bench_attention as ba

    rows, results = [], {}
    for hs in plan["attn_head_dims"]:
        for T in plan["attn_seq_lens"]:
            B = max(1, plan["attn_tokens"] // T)
            try:
                result, err = ba.measure(T, hs, B, plan["attn_nh"], device=plan["device"], dtype=torch.bfloat16,
                                         reps=plan["attn_reps"])
            except Exception as e:  # one shape's failure (a wrong result, out of memory) is one row
                rows.append([T, B, plan["attn_nh"], hs, "all", f"failed: {type(e).__name__}: {e}"[:200], "", "", ""])
                _free_cuda()
                continue
            results[(hs, T)] = result
            for name in ba.PASSES:
                ours, sdpa, naive = (result[(impl, name)] for impl in ba.IMPLS)
                ratio = ours / sdpa if ours and sdpa else None
                rows.append([T, B, plan["attn_nh"], hs, name, _fmt(ours), _fmt(sdpa),
                             f"skipped (T > {ba.NAIVE_MAX_T})" if naive is None else _fmt(naive),
                             _fmt(ratio, ".2f")])
    goal = results.get((ATTN_GOAL["hs"], ATTN_GOAL["T"]))

    def ratio(name):
        if goal is None or not goal[("ours", name)] or not goal[("sdpa", name)]:
            return None
        return goal[("ours", name)] / goal[("sdpa", name)]

    fwd, bwd = ratio("fwd"), ratio("bwd")
    where = f"hs = {ATTN_GOAL['hs']}, T = {ATTN_GOAL['T']}"
    missing = "" if goal else f" ({where} is not among the shapes run)"
    sdpa_note = ("SDPA with its flash backend" if plan["device"] == "cuda" else
                 "SDPA's default CPU backend (there is no flash backend on the CPU)")
    return "\n".join([
        f"bf16, causal, nh = {plan['attn_nh']}, B = max(1, {plan['attn_tokens']} // T). TFLOP/s: forward "
        "0.5 * 4 * B * nh * T^2 * hs flops, backward 2.5x that, timed as (fwd+bwd) - fwd. "
        f"sdpa = {sdpa_note}; ratio = ours / sdpa.", "",
        _table(["T", "B", "nh", "hs", "pass", "ours TFLOP/s", "sdpa TFLOP/s", "naive TFLOP/s", "ratio"], rows), "",
        f"- goal: forward >= {ATTN_GOAL['fwd']}x SDPA at {where}: {_fmt(fwd, '.2f', 'x')}, "
        f"**{_verdict(fwd, ATTN_GOAL['fwd'])}**{missing}",
        f"- goal: backward >= {ATTN_GOAL['bwd']}x SDPA at {where}: {_fmt(bwd, '.2f', 'x')}, "
        f"**{_verdict(bwd, ATTN_GOAL['bwd'])}**{missing}",
    ])


# ----------------------------------------------------------------------------------------------------
# 3 and 4. Log-probs


def _measure_cases(bl, cases, N, dtype_name, plan):
    """{case: (ms, peak bytes) | 'reason it did not run'} for one size and dtype."""
    out = {}
    for case in cases:
        reason = bl.unavailable(case)
        if reason:
            out[case] = f"not measured: {reason}"
            continue
        try:
            result = bl.measure(case, N, plan["vocab"], plan["n_embd"], bl.DTYPES[dtype_name], plan["device"],
                                plan["lp_reps"], plan["chunk_bytes"])
        except Exception as e:  # one case's failure is its own row; the others still run
            out[case] = f"failed: {type(e).__name__}: {e}"[:200]
            _free_cuda()
            continue
        out[case] = result if result is not None else "not measured: out of memory"
    return out


def _free_cuda():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _peak(result):
    return None if isinstance(result, str) or result[1] is None else result[1]


def logprob_section(plan, dry_run):
    from bench import bench_logprob as bl

    V = plan["vocab"]
    rows, goals = [], []
    for N in plan["lp_sizes"]:
        for dtype_name in plan["lp_dtypes"]:
            nbytes = N * V * bl.DTYPES[dtype_name].itemsize
            copy = bl.copy_gbs(N, V, bl.DTYPES[dtype_name], plan["device"], plan["lp_reps"])
            rows.append([N, dtype_name, "copy (x.clone())", "", _fmt(copy), "100% (the bound)", ""])
            measured = _measure_cases(bl, ("pytorch logp+H", "triton", "trl"), N, dtype_name, plan)
            for case, result in measured.items():
                if isinstance(result, str):
                    rows.append([N, dtype_name, case, result, "", "", ""])
                    continue
                ms, peak = result
                of_bound = f"{100 * 3 * nbytes / ms / 1e6 / copy:.0f}%" if copy else "not measured"
                rows.append([N, dtype_name, case, f"{ms:.3g}", f"{nbytes / ms / 1e6:.3g}", of_bound,
                             _fmt(peak / 1e9 if peak is not None else None)])
            goals.append(_logprob_goals(N, dtype_name, measured))
    return "\n".join([
        f"V = {V}, forward + backward of logp + entropy, median of {plan['lp_reps']}. GB/s = bytes of the logits / "
        "time. A fused forward + backward must read the logits twice and write their gradient once, so "
        "'% of bound' = (3 x bytes / time) / the copy's GB/s. Peak memory is what one forward + backward "
        "allocates above its inputs. pytorch logp+H = log_softmax in fp32, gather, -(p * log p).sum(-1).", "",
        _table(["N", "dtype", "case", "ms", "GB/s", "% of bound", "peak GB"], rows), "",
        f"Goals: >= {LP_GOAL['speed']:.0f}x faster and >= {LP_GOAL['memory']:.0f}x less peak memory than "
        "PyTorch; at least as fast as TRL's kernel at no more memory.", "",
        *goals,
    ])


def _logprob_goals(N, dtype_name, measured):
    ours, torch_, trl = (measured.get(c) for c in ("triton", "pytorch logp+H", "trl"))
    if isinstance(ours, str):
        return f"- N = {N}, {dtype_name}: goals not measured (ours: {ours})"
    parts = []
    if isinstance(torch_, str):
        parts.append(f"vs PyTorch {torch_}")
    else:
        speed = torch_[0] / ours[0]
        memory = _peak(torch_) / _peak(ours) if _peak(torch_) and _peak(ours) else None
        parts.append(f"{speed:.3g}x faster than PyTorch **{_verdict(speed, LP_GOAL['speed'])}**")
        parts.append(f"{_fmt(memory, unit='x')} less memory **{_verdict(memory, LP_GOAL['memory'])}**")
    if isinstance(trl, str):
        parts.append(f"vs TRL {trl}")
    else:
        parts.append(f"time / TRL's {ours[0] / trl[0]:.3g} **{_verdict(ours[0] / trl[0], 1.0, at_least=False)}**")
        mem = _peak(ours) / _peak(trl) if _peak(ours) and _peak(trl) else None
        parts.append(f"memory / TRL's {_fmt(mem)} **{_verdict(mem, 1.0, at_least=False)}**")
    return f"- N = {N}, {dtype_name}: " + "; ".join(parts)


def linear_section(plan, dry_run):
    from bench import bench_logprob as bl

    V, C = plan["vocab"], plan["n_embd"]
    rows, goals = [], []
    for N in plan["lin_sizes"]:
        for dtype_name in plan["lin_dtypes"]:
            measured = _measure_cases(bl, ("linear reference", "linear chunked", "trl linear"), N, dtype_name, plan)
            for case, result in measured.items():
                if isinstance(result, str):
                    rows.append([N, dtype_name, case, result, "", ""])
                    continue
                ms, peak = result
                rows.append([N, dtype_name, case, f"{ms:.3g}", f"{6 * N * V * C / ms / 1e9:.3g}",
                             _fmt(peak / 1e9 if peak is not None else None)])
            ours, ref, trl = (measured[c] for c in ("linear chunked", "linear reference", "trl linear"))
            line = f"- N = {N}, {dtype_name}: "
            if isinstance(ours, str):
                goals.append(line + f"not measured (ours: {ours})")
                continue
            if not isinstance(ref, str):
                memory = _peak(ref) / _peak(ours) if _peak(ref) and _peak(ours) else None
                line += (f"{ref[0] / ours[0]:.3g}x the speed and {_fmt(memory, unit='x')} less memory than "
                         "all-logits PyTorch; ")
            if isinstance(trl, str):
                line += f"vs TRL {trl}"
            else:
                mem = _peak(ours) / _peak(trl) if _peak(ours) and _peak(trl) else None
                line += (f"time / TRL's {ours[0] / trl[0]:.3g} **{_verdict(ours[0] / trl[0], 1.0, False)}**; "
                         f"memory / TRL's {_fmt(mem)} **{_verdict(mem, 1.0, False)}**")
            goals.append(line)
    other = [d for d in ("bf16", "fp32") if d not in plan["lin_dtypes"]]
    return "\n".join([
        f"hidden (N, C = {C}) and LM head (V = {V}, C), forward + backward of logp + entropy, max_chunk_bytes "
        f"{plan['chunk_bytes'] or 'default (half the LM head)'}; trl linear: TRL's 4096-column tile. "
        "TFLOP/s counts 6 N V C (the chunked backward recomputes the logits: 2 N V C "
        "more, not counted). linear reference holds all (N, V) logits."
        + (f" {', '.join(other)}: not measured (the scripts run the LM head under bf16 autocast)." if other else ""),
        "",
        _table(["N", "dtype", "case", "ms", "TFLOP/s", "peak GB"], rows), "",
        "Goal: at least as fast as TRL's chunked kernel at no more memory.", "",
        *goals,
    ])


# ----------------------------------------------------------------------------------------------------
# 5. The pipeline


def stage_commands(out_dir, device, attn_impl, logprob_impl, tiny):
    """The three stage scripts' command lines: the ONE place that knows their flags (they change; adjust
    here). A GPT-2-124M-shaped model from scratch (random weights, the full GPT-2 vocabulary), or for the
    dry run the tiny preset on the task's vocabulary, a few steps of each stage."""
    if tiny:
        model = ["--init", "scratch", "--preset", "tiny", "--vocab", "task"]
        lengths = ["--max_prompt_tokens", "24", "--max_answer_tokens", "8"]
        sft = ["--max_iters", "2", "--eval_interval", "2", "--eval_prompts", "1", "--n_train", "32",
               "--n_eval", "4", "--batch_size", "4"]
        reward = ["--max_iters", "2", "--eval_interval", "2", "--n_train", "4", "--n_eval", "4", "--k", "2",
                  "--batch_size", "4"]
        ppo = ["--iterations", "2", "--prompts_per_iter", "2", "--samples_per_prompt", "2", "--minibatch_size", "4",
               "--max_new_tokens", "8", "--max_prompt_tokens", "24", "--eval_interval", "2", "--eval_prompts", "2",
               "--n_prompts", "8"]
    else:
        model = ["--init", "scratch", "--preset", "gpt2", "--vocab", "gpt2"]
        lengths = []
        sft = ["--max_iters", "30", "--eval_interval", "30", "--eval_prompts", "16", "--n_train", "2000",
               "--n_eval", "64", "--batch_size", "16"]
        reward = ["--max_iters", "20", "--eval_interval", "20", "--n_train", "64", "--n_eval", "32", "--k", "2",
                  "--batch_size", "16"]
        ppo = ["--iterations", "4", "--prompts_per_iter", "32", "--samples_per_prompt", "2", "--minibatch_size",
               "32", "--max_new_tokens", "24", "--eval_interval", "4", "--eval_prompts", "32", "--n_prompts", "512"]
    common = ["--device", device, "--attn_impl", attn_impl]
    sft_ckpt, reward_ckpt = f"{out_dir}/sft/ckpt.pt", f"{out_dir}/reward/ckpt.pt"
    return [
        ("sft", ["train_sft.py", "--out_dir", f"{out_dir}/sft", *model, *lengths, *sft, *common]),
        ("reward", ["train_reward.py", "--out_dir", f"{out_dir}/reward", "--sft", sft_ckpt, *lengths, *reward,
                    *common]),
        ("ppo", ["train_ppo.py", "--out_dir", f"{out_dir}/ppo", "--sft", sft_ckpt, "--reward", reward_ckpt, *ppo,
                 "--logprob_impl", logprob_impl, *common]),
    ]


# Runs a stage script as `python train_x.py ...` would, then writes the process's peak memory: CUDA's
# allocator high-water mark, or the CPU's resident-memory high-water mark.
_RUNNER = """
import json, resource, runpy, sys, time
import torch
script, report = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
started = time.perf_counter()
try:
    runpy.run_path(script, run_name="__main__")
finally:
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(report, "w") as f:
        json.dump(dict(peak_bytes=peak, cuda=cuda, wall_s=time.perf_counter() - started), f)
"""


def _throughput(metrics_path):
    """The median of every '*_per_s' figure in a metrics.jsonl, as 'name value; ...'."""
    if not metrics_path.exists():
        return "not measured: no metrics.jsonl"
    values = {}
    for line in metrics_path.read_text().splitlines():
        for key, value in json.loads(line).items():
            if key.endswith("_per_s") and isinstance(value, (int, float)):
                values.setdefault(key, []).append(value)
    if not values:
        return "not measured: no *_per_s figure in metrics.jsonl"
    return "; ".join(f"{k} {statistics.median(v):.0f}" for k, v in values.items())


def pipeline_section(plan, dry_run):
    configs = {"triton": ("triton", "triton"), "pytorch": ("sdpa", "torch")}  # (attn_impl, logprob_impl)
    env = dict(os.environ, TRITON_INTERPRET="1" if dry_run else "0")
    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name, (attn_impl, logprob_impl) in configs.items():
            out_dir = Path(tmp) / name
            stages = stage_commands(out_dir, plan["device"], attn_impl, logprob_impl, plan["tiny_pipeline"])
            broken = None
            for stage, argv in stages:
                label = f"{name} (attn {attn_impl}, logprob {logprob_impl})"
                if broken:
                    rows.append([label, stage, "", "", f"not measured: {broken} failed", ""])
                    continue
                report = Path(tmp) / f"{name}-{stage}.json"
                print(f"  pipeline {name}: {' '.join(argv)}", flush=True)
                try:
                    proc = subprocess.run([sys.executable, "-c", _RUNNER, argv[0], str(report), *argv[1:]],
                                          cwd=REPO, env=env, capture_output=True, text=True,
                                          timeout=plan["stage_timeout"])
                    code, tail = proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-1:]
                except subprocess.TimeoutExpired:
                    code, tail = "timeout", [f"ran past {plan['stage_timeout']} s"]
                info = json.loads(report.read_text()) if report.exists() else {}
                peak = info.get("peak_bytes")
                what = "CUDA allocator" if info.get("cuda") else "resident"
                if code != 0:
                    broken, failed = stage, True
                    rows.append([label, stage, f"exit {code}: {' '.join(tail)[:150]}", "", "", ""])
                    continue
                rows.append([label, stage, "ok", f"{info.get('wall_s', 0):.0f}",
                             _throughput(out_dir / stage / "metrics.jsonl"),
                             f"{peak / 2**30:.2f} GiB ({what})" if peak else "not measured"])
    shape = "the tiny preset on the task's vocabulary" if plan["tiny_pipeline"] else \
        "GPT-2 124M shape (12 layers, d = 768), the GPT-2 vocabulary (50257), random weights"
    commands = "\n".join("    python " + " ".join(argv) for _, argv in stage_commands(
        "OUT", plan["device"], "ATTN", "LOGPROB", plan["tiny_pipeline"]))
    body = "\n".join([
        f"Model: {shape}. Configurations: triton = `--attn_impl triton --logprob_impl triton`; pytorch = "
        "`--attn_impl sdpa --logprob_impl torch`. Throughput: the median of each script's `*_per_s` "
        "figures in its metrics.jsonl (PPO: gen_ and train_tokens_per_s; the reward model counts pairs). "
        "Wall time includes start-up, Triton compiles and evaluations. The commands:", "",
        commands, "",
        _table(["configuration", "stage", "result", "wall s", "throughput", "peak memory"], rows),
    ])
    return body, not failed


# ----------------------------------------------------------------------------------------------------


def main(argv=None):
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"gpu_check.py: error: {e}", file=sys.stderr)
        return 2
    plan = PLANS["dry" if args.dry_run else "gpu"]
    global _DRY_RUN
    _DRY_RUN = args.dry_run
    if args.dry_run:
        # numpy's warnings about lanes the kernels compute and then discard (see tests/test_logprob.py)
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    # Triton reads TRITON_INTERPRET once, when it is imported, so it is set before anything imports it.
    os.environ["TRITON_INTERPRET"] = "1" if args.dry_run else "0"
    sys.path.insert(0, str(REPO))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check.py: error: no CUDA device here; on a machine without a GPU run it with --dry-run",
              file=sys.stderr)
        return 2

    started = time.perf_counter()
    run = {"tests": tests_section, "attention": attention_section, "logprob": logprob_section,
           "linear": linear_section, "pipeline": pipeline_section}
    selected = set(args.sections) | ({"linear"} if "logprob" in args.sections else set())
    parts, ok = [], True

    def write_report(running=None):
        # Written after every section, so a run stopped part-way leaves the sections it finished.
        waiting = [f"## {t}\n\nnot measured: {'running' if t == running else 'waiting'} when this was written\n"
                   for t in list(TITLES.values())[len(parts):]]
        lines = ["# GPU check report", "", *header_lines(args, plan),
                 f"- total time: {time.perf_counter() - started:.0f} s", "", *parts, *waiting]
        args.out.write_text("\n".join(lines) + "\n")

    for key, title in TITLES.items():
        t0 = time.perf_counter()
        if key not in selected:
            body = f"not measured: not selected (--sections {','.join(args.sections)})"
        else:
            print(f"gpu_check: {title} ...", flush=True)
            write_report(running=title)
            try:
                body = run[key](plan, args.dry_run)
                if isinstance(body, tuple):
                    body, passed = body
                    ok = ok and passed
            except Exception as e:
                ok = False
                body = f"not measured: the section failed with {type(e).__name__}: {e}\n\n```\n" \
                       f"{traceback.format_exc()[-3000:]}```"
            body += f"\n\n({time.perf_counter() - t0:.0f} s)"
        parts.append(f"## {title}\n\n{body}\n")
    write_report()
    print(f"gpu_check: report written to {args.out} ({'every section ran' if ok else 'SOME SECTIONS FAILED'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
