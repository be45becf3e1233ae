"""
What every stage script shares, and nothing else: flags with help text, the device, the optimizer and
its learning-rate schedule, which examples make a batch, the metrics log, progress, and one-line errors.

The RLHF maths lives in the stage scripts themselves (train_sft.py, train_reward.py, train_ppo.py); a
stage never imports another stage. Editing this file changes every stage at once, on purpose.
"""

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import field, fields
from pathlib import Path

import torch

from model import LoadError


class UsageError(Exception):
    """A flag or setting that cannot work (a zero batch, an unknown choice, an out_dir that is a file):
    one line naming the flag and the fix, printed by `run` without a traceback, before any work starts."""


# -----------------------------------------------------------------------------
# Flags: one config dataclass per script, each field with its help text beside it


def flag(default, help):
    """A config field with its help text beside it; `--help` shows it."""
    return field(default=default, metadata={"help": help})


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
    """Command-line flags from a config dataclass: one --name per field, its help from flag(...).
    A bad value (`--lr abc`, `--lr nan`) is argparse's own one-line error and exit code 2."""
    parser = argparse.ArgumentParser(description=config_class.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(config_class):
        kind = finite_float if type(f.default) is float else type(f.default)
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"])
    return config_class(**vars(parser.parse_args(argv)))


def check(condition, message):
    """Raise UsageError(message) unless condition: how the scripts validate their flags up front."""
    if not condition:
        raise UsageError(message)


def check_positive(cfg, *names):
    for name in names:
        check(getattr(cfg, name) > 0, f"--{name} must be positive, got {getattr(cfg, name)}")


def check_choice(cfg, name, choices):
    check(getattr(cfg, name) in choices, f"--{name} {getattr(cfg, name)!r}: use one of {', '.join(choices)}")


def fit_lengths(cfg, block_size, answer_flag="max_answer_tokens"):
    """Fill the length flags left at 0 from the model's block size (prompts 3/4 of it, answers 1/4) and
    check that a prompt and an answer fit in the block together."""
    cfg.max_prompt_tokens = cfg.max_prompt_tokens or block_size * 3 // 4
    setattr(cfg, answer_flag, getattr(cfg, answer_flag) or block_size // 4)
    total = cfg.max_prompt_tokens + getattr(cfg, answer_flag)
    check(total <= block_size, f"--max_prompt_tokens + --{answer_flag} = {total} exceeds the model's block_size "
                               f"{block_size}")


def check_seed(seed):
    check(0 <= seed < 2**31, f"--seed must be in [0, 2**31), got {seed}")


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


def pick_device(name):
    check(name == "auto" or name == "cpu" or name.startswith("cuda"),
          f"--device {name!r}: use auto, cpu or cuda")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check(not name.startswith("cuda") or torch.cuda.is_available(),
          f"--device {name} asked for, but no CUDA device is available; use --device cpu")
    return torch.device(name)


def autocast(device):
    """bf16 autocast on CUDA (the matmuls in bf16, the reductions and the weights in fp32); fp32 on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


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
    after the checkpoint's step are dropped so that the log reads as one uninterrupted run."""

    def __init__(self, path, resume_step=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class Progress:
    """A one-line progress bar on a terminal; in a log file a plain line each twentieth of the way, in a
    notebook only the finished bar (so that saved outputs stay readable)."""

    def __init__(self, name, total, start=0):
        self.name, self.total, self.t0, self.start = name, total, time.time(), start
        self.tty = sys.stderr.isatty()
        self.notebook = type(sys.stderr).__module__.startswith("ipykernel")
        self.shown = -1  # the last twentieth of the way a plain line was printed for

    def update(self, step, **metrics):
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
        if self.tty:
            print(file=sys.stderr)


def run(main):
    """Run a script's main. A bad file, flag or checkpoint (LoadError, UsageError) is one `error:` line
    and exit code 2, no traceback; Ctrl-C says how to continue. A warning (e.g. a kernel falling back to
    PyTorch on a CPU) is one `warning:` line, without the source line Python would print under it."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    try:
        main()
    except (LoadError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\nstopped; run the same command with --resume to continue from the last checkpoint",
              file=sys.stderr)
        sys.exit(130)
