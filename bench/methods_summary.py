"""PPO beside the other methods of `METHODS="grpo rloo dpo" bash pipeline.sh`, one or more runs (one per seed),
from their logs only: each method's held-out gold gain over the SFT policy (PPO's own iteration-0 eval: the
same prompts and sampling seeds for every method), wall time (the stage's own, as its log's last line says:
from opening the log, once the models and data are loaded, to the last evaluation), KL to the reference, answer
length and reward-model score, as a markdown table of mean [min, max] over the runs.

    # SIDE_BY_SIDE=0: every stage alone, so every method's time is measured under the same conditions
    for s in 1337 1 2; do SIDE_BY_SIDE=0 METHODS="grpo rloo dpo" SEED=$s OUT=runs/methods/seed$s bash pipeline.sh; done
    python bench/methods_summary.py runs/methods/seed1337 runs/methods/seed1 runs/methods/seed2
"""

import argparse
import json
import math
from pathlib import Path

METHODS = ("ppo", "ppo_nokl", "grpo", "grpo_nokl", "dr_grpo", "dr_grpo_nokl", "rloo", "rloo_nokl", "reinforce",
           "reinforce_nokl", "dpo")


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line] if Path(path).exists() else []


def last(log, key):
    values = [r[key] for r in log if key in r]
    return values[-1] if values else math.nan


def run_numbers(run):
    """{method: {measure: value}} of one run folder."""
    run = Path(run)
    sft_gold = read_log(run / "ppo" / "metrics.jsonl")[0]["eval_gold"]
    out = {}
    for method in METHODS:
        log = read_log(run / method / "metrics.jsonl")
        if not log:
            continue
        out[method] = {"gold gain": last(log, "eval_gold") - sft_gold, "time (s)": last(log, "wall_s"),
                       # DPO samples only for its evals: their KL and length (the others': their last rollout's)
                       "KL (nats/answer)": last(log, "eval_kl" if method == "dpo" else "kl"),
                       "answer length": last(log, "eval_answer_length" if method == "dpo" else "answer_length"),
                       "RM score": last(log, "eval_reward") if method != "dpo" else math.nan}
    return out


def cell(values, form):
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:{form}} [{min(values):{form}}, {max(values):{form}}]" if len(values) > 1 else f"{mean:{form}}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    runs = [run_numbers(r) for r in parser.parse_args().runs]
    measures = {"gold gain": "+.3f", "time (s)": ".0f", "KL (nats/answer)": ".2f", "answer length": ".1f",
                "RM score": ".3f"}
    print("| method | " + " | ".join(measures) + " |")
    print("| --- |" + " --- |" * len(measures))
    for method in METHODS:
        if any(method in r for r in runs):
            print(f"| {method} | " + " | ".join(cell([r[method][m] for r in runs if method in r], form)
                                                for m, form in measures.items())
                  + " |")


if __name__ == "__main__":
    main()
