"""The training steps' speed of a stage as one process and under torchrun with two, the same global batch.

Runs the stage in turn as one process with T threads and as two processes with T/2 threads each (the
same cores), and as one process with T/2 threads (what each of the two has), repeats * 3 runs in all,
alternating, and reads each run's speed in its steps from its own log (every step has the same global
batch, so time per token is time per step up to a constant), without the start-up (Python, torch, the
process group, the first evaluation):

    python bench/bench_distributed.py --stage sft --threads 2 --repeats 3
    python bench/bench_distributed.py --stage reward --sft out/sft/ckpt.pt

Prints each variant's median seconds per 1000 tokens (pairs) and its speed-up over the first variant.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = {  # a short run of each stage, long enough that the steps, not the start, dominate its log
    "sft": ["train_sft.py", "--max_iters", "60", "--n_train", "2000", "--n_eval", "20", "--eval_prompts", "0",
            "--eval_interval", "1000"],
    "reward": ["train_reward.py", "--n_train", "400", "--n_eval", "16", "--k", "4", "--max_iters", "40",
               "--eval_interval", "1000"],
}


def seconds_per_unit(metrics, rate_key):
    """Seconds per token (SFT) or pair (reward model), from the last logged rate: every rank's units per
    second of the training steps so far."""
    rates = [json.loads(line)[rate_key] for line in metrics.read_text().splitlines() if rate_key in line]
    return 1 / rates[-1]


def run(stage, nproc, threads, out, extra):
    """(seconds per unit in the steps, the whole run's wall seconds) of one run."""
    script, *flags = STAGES[stage]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.time()
    subprocess.run([sys.executable, *launcher, script, *flags, *extra, "--out_dir", out], cwd=REPO, env=env,
                   check=True, capture_output=True)
    rate_key = "tokens_per_s" if stage == "sft" else "pairs_per_s"
    return seconds_per_unit(Path(out) / "metrics.jsonl", rate_key), time.time() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=tuple(STAGES), default="sft")
    parser.add_argument("--threads", type=int, default=2, help="threads of the one-process run (cores to use)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sft", default="out/sft/ckpt.pt", help="the reward stage's SFT checkpoint")
    args = parser.parse_args()
    extra = ["--sft", args.sft] if args.stage == "reward" else []
    half = max(1, args.threads // 2)
    variants = {f"1 process x {args.threads} threads": (1, args.threads),
                f"2 processes x {half} threads": (2, half),
                f"1 process x {half} threads": (1, half)}
    times = {name: [] for name in variants}
    walls = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, (nproc, threads) in variants.items():
                seconds, wall = run(args.stage, nproc, threads, f"{tmp}/{r}-{nproc}-{threads}", extra)
                times[name].append(seconds)
                walls[name].append(wall)
    unit = "s per 1000 tokens" if args.stage == "sft" else "s per 1000 pairs"
    base = statistics.median(times[next(iter(variants))])
    print(f"{args.stage}: median of {args.repeats} runs each, {unit} in the training steps (whole run's wall in s)")
    for name in variants:
        t, wall = statistics.median(times[name]), statistics.median(walls[name])
        print(f"  {name:26s} {1000 * t:8.3f}  x{base / t:.2f} of the first  (wall {wall:.1f})")


if __name__ == "__main__":
    main()
