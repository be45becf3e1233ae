"""
What every stage script shares, and nothing else: flags with their help and limits, the device, the
optimizer and its learning-rate schedule, which examples make a batch, the metrics log, progress, and
one-line errors.

The RLHF maths lives in the stage scripts themselves (train_sft.py, train_reward.py, train_ppo.py); a
stage never imports another stage. Editing this file changes every stage at once, on purpose.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from kernels import gpu_path
from support.distributed import finish, is_main
from support.errors import LoadError, UsageError

# -----------------------------------------------------------------------------
# Flags: one config dataclass per script, each field with its help text and its limits beside it


def flag(default, help, min=None, max=None, above=None, below=None, choices=None):
    """A config field with its help text and the values it may take: min <= value <= max, above < value
    < below, value in choices (None: no limit). `--help` shows both; check_flags enforces the limits."""
    limits = dict(min=min, max=max, above=above, below=below, choices=choices)
    return dataclasses.field(default=default, metadata={"help": help, **limits})


def limits_text(f):
    """The limits of a flag() field as `--help` and the errors say them: "> 0", ">= 0 and <= 1", "one of a, b"."""
    m = f.metadata
    if m.get("choices"):
        return "one of " + ", ".join(m["choices"])
    lower = f">= {m['min']}" if m.get("min") is not None else f"> {m['above']}" if m.get("above") is not None else ""
    upper = f"<= {m['max']}" if m.get("max") is not None else f"< {m['below']}" if m.get("below") is not None else ""
    return " and ".join(text for text in (lower, upper) if text)


def check_flags(cfg):
    """Every flag within its own limits, or a UsageError naming the first that is not."""
    for f in dataclasses.fields(cfg):
        value, m = getattr(cfg, f.name), f.metadata
        if m.get("choices") and value not in m["choices"]:
            raise UsageError(f"--{f.name} {value!r}: use {limits_text(f)}")
        if ((m.get("min") is not None and value < m["min"]) or (m.get("max") is not None and value > m["max"])
                or (m.get("above") is not None and value <= m["above"])
                or (m.get("below") is not None and value >= m["below"])):
            raise UsageError(f"--{f.name} must be {limits_text(f)}, got {value}")


def finite_float(text):
    """argparse type: a float that is a number (float() also reads "nan" and "inf")."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def parse_args(config_class, argv=None):
    """Command-line flags from a config dataclass: one --name per field, its help and limits from flag(...).
    A value that is not a number (`--lr abc`, `--lr nan`) is argparse's own one-line error and exit code 2;
    a number outside its limits is check_flags' (each script's check_config calls it)."""
    parser = argparse.ArgumentParser(description=config_class.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(config_class):
        kind = finite_float if type(f.default) is float else type(f.default)
        limits = limits_text(f)
        help = f.metadata["help"] + (f" [{limits}]" if limits else "")
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=help)
    return config_class(**vars(parser.parse_args(argv)))


def check(condition, message):
    """Raise UsageError(message) unless condition: the rules that tie two flags together."""
    if not condition:
        raise UsageError(message)


def fit_lengths(cfg, block_size, answer_flag="max_answer_tokens"):
    """A copy of cfg whose length flags left at 0 take their share of the model's block size (prompts 3/4,
    answers 1/4), said in one line; and a check that a prompt and an answer fit in the block together."""
    prompt = cfg.max_prompt_tokens or block_size * 3 // 4
    answer = getattr(cfg, answer_flag) or block_size // 4
    filled = []
    if not cfg.max_prompt_tokens:
        filled.append(f"--max_prompt_tokens {prompt}")
    if not getattr(cfg, answer_flag):
        filled.append(f"--{answer_flag} {answer}")
    if filled:
        print(f"lengths: {' and '.join(filled)} (from the model's block size {block_size})")
    check(prompt + answer <= block_size, f"--max_prompt_tokens + --{answer_flag} = {prompt + answer} exceeds the "
                                         f"model's block_size {block_size}")
    return dataclasses.replace(cfg, max_prompt_tokens=prompt, **{answer_flag: answer})


def check_finite(value, what, fix):
    """Stop a run whose loss or score is no longer a number, instead of training on NaN silently."""
    check(math.isfinite(value), f"{what} is {value}; {fix}")


def check_out_dir(path):
    """The out_dir must be a folder we can write into (an existing file there is a usage error)."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists():
            check(parent.is_dir(), f"--out_dir {path}: {parent} exists and is not a folder; choose another --out_dir")
            break
    path.mkdir(parents=True, exist_ok=True)


# -----------------------------------------------------------------------------
# Device and precision, chosen once at the top of each script


def pick_device(name, attn_impl="auto"):
    """The torch device of --device, once it is known that it exists and can run --attn_impl."""
    check(name == "auto" or name == "cpu" or name.startswith("cuda"),
          f"--device {name!r}: use auto, cpu or cuda")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    check(not name.startswith("cuda") or torch.cuda.is_available(),
          f"--device {name} asked for, but no CUDA device is available; use --device cpu")
    check(attn_impl != "triton" or name.startswith("cuda") or os.environ.get("TRITON_INTERPRET") == "1",
          "--attn_impl triton needs a CUDA device (or TRITON_INTERPRET=1 to interpret it on a CPU)")
    return torch.device(name)


def autocast(device):
    """bf16 autocast on CUDA (the matmuls in bf16, the reductions and the weights in fp32); fp32 on a CPU,
    unless RLHF_CUDA_SHAPED=1 makes it take the GPU's path (kernels.gpu_path)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu_path(device))


# -----------------------------------------------------------------------------
# Optimizer, schedule, batches


def adamw(model, lr, weight_decay):
    """AdamW with weight decay on matrices only: biases and LayerNorm gains are not capacity to
    regularise. beta2 = 0.95 as in GPT-3: steadier with small batches than 0.999. fused: one kernel
    for every tensor's update, 3% of a tiny-GPT step on a 2-core CPU (bench/RESULTS.md)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95), fused=True)


def warmup_cosine(it, lr, min_lr, warmup_iters, max_iters):
    """Linear warmup to lr, then cosine decay to min_lr at max_iters."""
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def batch_indices(k, n, batch_size, seed):
    """Which of n examples make the k-th batch: a fixed function of k (a new shuffle each epoch), so a
    resumed run sees exactly the batches the uninterrupted run would have seen."""
    epoch, i = divmod(k, n // batch_size)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return order[i * batch_size : (i + 1) * batch_size].tolist()


# -----------------------------------------------------------------------------
# Logs, progress, errors


class MetricsLog:
    """Metrics appended as one JSON object per line: what the notebooks plot. On resume, the lines written
    after the checkpoint's step are dropped so that the log reads as one uninterrupted run. Each line also
    says when: wall_s, the seconds since the log was opened (plus, on resume, the kept lines' last wall_s)."""

    def __init__(self, path, resume_step=None):
        self.path, self.t0 = Path(path), time.time()
        if not is_main():  # rank 0 writes the log (support/distributed.py)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= resume_step]
            self.t0 -= json.loads(keep[-1]).get("wall_s", 0.0) if keep else 0.0  # the time the kept lines took
            self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record):
        if not is_main():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({**record, "wall_s": round(time.time() - self.t0, 2)}) + "\n")


def read_metrics(path):
    """The records of a metrics.jsonl (none when there is no file); a line that is not JSON is a LoadError
    naming the file and the line, not a traceback from the reader that met it."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise LoadError(f"{path} line {number} is not JSON ({line[:40]!r}); the run that wrote it was cut "
                            "off mid-line? delete that line, or run the stage again") from None
    return records


class Progress:
    """A one-line progress bar on a terminal; in a log file a plain line each twentieth of the way, in a
    notebook only the finished bar (so that saved outputs stay readable)."""

    def __init__(self, name, total, start=0):
        self.name, self.total, self.t0, self.start = name, total, time.time(), start
        self.tty = sys.stderr.isatty()
        self.notebook = type(sys.stderr).__module__.startswith("ipykernel")
        self.shown = -1  # the last twentieth of the way a plain line was printed for

    def update(self, step, **metrics):
        if not is_main():
            return
        done = step / max(self.total, 1)
        filled = int(20 * done)
        if not self.tty:
            if (filled == self.shown or self.notebook) and step < self.total:
                return
            self.shown = filled
        bar = "#" * filled + "." * (20 - filled)
        elapsed = time.time() - self.t0
        eta = elapsed / max(step - self.start, 1) * (self.total - step)
        parts = [f"[{self.name}] [{bar}] {step}/{self.total}"]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
        line = " | ".join(parts + [f"{elapsed:.0f}s elapsed, ~{eta:.0f}s left"])
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self):
        if self.tty and is_main():
            print(file=sys.stderr)


def run(main):
    """Run a script's main. A bad file, flag or checkpoint (LoadError, UsageError) is one `error:` line
    and exit code 2, no traceback; Ctrl-C says how to continue. A warning (e.g. a kernel falling back to
    PyTorch on a CPU) is one `warning:` line, without the source line Python would print under it."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    code = 0
    try:
        main()
    except (LoadError, UsageError) as e:
        if is_main():  # under torchrun every rank meets the same error; rank 0 says it
            print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        if is_main():
            print("\nstopped; run the same command with --resume to continue from the last checkpoint",
                  file=sys.stderr)
        code = 130
    finish(code)  # under torchrun: every rank done, then out of the process group
    if code:
        sys.exit(code)
