"""The headline numbers of one or more pipeline runs (one per seed), from their logs only, as a markdown
table with the mean, min and max over the runs and the targets of the learning-outcome issue.

    for s in 1 2 3; do SEED=$s OUT=runs/seed$s bash pipeline.sh; done
    python bench/pipeline_summary.py runs/seed1 runs/seed2 runs/seed3
"""

import argparse
import json
import sys
from pathlib import Path


def read_log(path):
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def last(log, key):
    values = [r[key] for r in log if key in r]
    return values[-1] if values else float("nan")


def first(log, key):
    values = [r[key] for r in log if key in r]
    return values[0] if values else float("nan")


def run_numbers(run):
    """The measured numbers of one run folder written by pipeline.sh."""
    run = Path(run)
    sft, reward = read_log(run / "sft/metrics.jsonl"), read_log(run / "reward/metrics.jsonl")
    ppo, nokl = read_log(run / "ppo/metrics.jsonl"), read_log(run / "ppo_nokl/metrics.jsonl")
    times = {}
    if (run / "times.txt").exists():
        for line in (run / "times.txt").read_text().splitlines():
            name, seconds, *_ = line.split()  # "pipeline N s (resumed)" too
            times[name] = int(seconds)
    gold_sft = first(ppo, "eval_gold")  # the SFT policy, evaluated by PPO's own held-out eval
    return {
        "SFT held-out gold (end of SFT)": last(sft, "gold"),
        "RM agreement with gold judge": last(reward, "gold_agreement"),
        "RM accuracy on the noisy labels": last(reward, "eval_accuracy"),
        "SFT policy gold (PPO eval)": gold_sft,
        "PPO gold": last(ppo, "eval_gold"),
        "PPO gold gain": last(ppo, "eval_gold") - gold_sft,
        "PPO RM score": last(ppo, "eval_reward"),
        "PPO KL (nats/answer)": last(ppo, "kl"),
        "no-KL RM score": last(nokl, "eval_reward"),
        "no-KL gold": last(nokl, "eval_gold"),
        "no-KL gold - SFT gold": last(nokl, "eval_gold") - gold_sft,
        # pipeline.sh's own line for the whole command (its PPO runs may overlap), else round 1's stages' sum
        "wall time (s)": times.pop("pipeline", None) or (sum(t for name, t in times.items() if "/" not in name)
                                                          if times else float("nan")),
        **{f"  {name} (s)": seconds for name, seconds in times.items()},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description="Headline numbers of pipeline runs, mean/min/max over runs.")
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args(argv)
    missing = [r for r in args.runs if not (Path(r) / "ppo" / "metrics.jsonl").exists()]
    if missing:
        parser.exit(2, f"error: {missing[0]}/ppo/metrics.jsonl is missing; run pipeline.sh with OUT={missing[0]}\n")
    numbers = [run_numbers(r) for r in args.runs]
    keys = list(dict.fromkeys(k for n in numbers for k in n))
    names = [Path(r).name for r in args.runs]
    if len(set(names)) < len(names):  # e.g. runs/t1/seed1 and runs/t2/seed1: say which folder
        names = ["/".join(Path(r).parts[-2:]) for r in args.runs]
    print("| measure | " + " | ".join(names) + " | mean | min | max |")
    print("| --- " * (len(names) + 4) + "|")
    for key in keys:
        values = [n.get(key, float("nan")) for n in numbers]
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in values]
        stats = [sum(values) / len(values), min(values), max(values)]
        print(f"| {key} | " + " | ".join(cells) + " | " + " | ".join(f"{v:.3f}" for v in stats) + " |")
    checks = {
        "every run <= 600 s": all(n["wall time (s)"] <= 600 for n in numbers),
        "RM agreement >= 0.85 in every run": all(n["RM agreement with gold judge"] >= 0.85 for n in numbers),
        "PPO gain >= +0.8 on the mean": sum(n["PPO gold gain"] for n in numbers) / len(numbers) >= 0.8,
        "PPO gain >= +0.5 in every run": all(n["PPO gold gain"] >= 0.5 for n in numbers),
        "no-KL RM score > PPO's in every run": all(n["no-KL RM score"] > n["PPO RM score"] for n in numbers),
        "no-KL gold < SFT gold in every run": all(n["no-KL gold - SFT gold"] < 0 for n in numbers),
    }
    print()
    for name, ok in checks.items():
        print(f"- {'met' if ok else 'NOT met'}: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
