"""
The figures of the pipeline, from the JSONL logs and checkpoints the three scripts write. The notebooks
call these functions one by one; the command line writes them all as PNGs:

    python notebooks/plots.py out                          # one run: figures into out/
    python notebooks/plots.py runs/seed1 runs/seed2 runs/seed3 --to runs   # several seeds, one figure each

    sft.png              SFT: training and held-out loss, gold score of sampled answers
    reward_model.png     reward model: held-out accuracy, agreement with the gold judge, and the
                         distribution of rewards for chosen vs rejected answers
    ppo.png              PPO: reward-model score, gold score and KL to the reference per iteration
    reward_hacking.png   the same run with kl_coef = 0 beside the normal one
    attention.png        the attention pattern of one head of the SFT model on one prompt
    rounds.png           RLHF in rounds (ROUNDS=3 bash pipeline.sh): gold and reward-model score per
                         round, and whether round 2's reward model still pays for round 1's hack
    methods.png          PPO beside GRPO, RLOO, DPO (METHODS="grpo rloo dpo" bash pipeline.sh): held-out
                         gold over each one's wall time, with and without its KL term

Every plot function takes one run folder or a list of them (the same pipeline with other seeds): each
run is drawn as a thin line, and with several runs their mean as a thick one.
"""

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, no screen needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import attention_mask_allowed  # noqa: E402
from support.checkpoint import load_checkpoint, model_from_checkpoint, policy_from_checkpoint  # noqa: E402
from support.data import Tokenizer  # noqa: E402
from support.training import read_metrics, run as run_script  # noqa: E402


def read_log(path):
    """The records of a run's metrics.jsonl or samples.jsonl; a broken line is one error naming it."""
    return read_metrics(path)


def as_runs(out):
    return [Path(out)] if isinstance(out, (str, Path)) else [Path(o) for o in out]


def plot_runs(ax, runs, log_name, key, label, color, style="-", marker=None, x="step"):
    """One thin line per run, and the mean of the runs as a thick line when there are several: at the steps
    every run logged, the mean of x (the step, or with x="wall_s" the seconds the run took to get there)."""
    curves = [{r["step"]: r for r in read_log(run / log_name) if key in r and x in r} for run in runs]
    curves = [c for c in curves if c]
    if not curves:
        return
    many = len(curves) > 1
    for curve in curves:
        ax.plot([r[x] for r in curve.values()], [r[key] for r in curve.values()], style, marker=marker,
                color=color, lw=0.8 if many else 1.5, alpha=0.45 if many else 1.0, label=None if many else label,
                markersize=3)
    if many:
        common = sorted(set.intersection(*(set(c) for c in curves)))
        mean = lambda k: [sum(c[step][k] for c in curves) / len(curves) for step in common]  # noqa: E731
        ax.plot(mean(x), mean(key), style, marker=marker, color=color, lw=2.2,
                label=f"{label} (mean of {len(curves)} seeds)", markersize=4)


def plot_sft(out):
    runs = as_runs(out)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    plot_runs(ax1, runs, "sft/metrics.jsonl", "loss", "train (answer tokens)", "C0")
    plot_runs(ax1, runs, "sft/metrics.jsonl", "eval_loss", "held-out", "C1", marker="o")
    ax1.set(xlabel="step", ylabel="cross-entropy (nats/token)", yscale="log", title="SFT loss")
    ax1.legend()
    plot_runs(ax2, runs, "sft/metrics.jsonl", "gold", "gold", "C2", marker="o")
    ax2.set(xlabel="step", ylabel="mean gold score", title="gold score of sampled answers (held-out prompts)")
    fig.tight_layout()
    return fig


@torch.no_grad()
def reward_distributions(run, n=256):
    """Rewards of the labellers' preferred and rejected answers to held-out prompts of the built-in task
    (the SFT policy's own answers, ranked as train_reward.py ranks them), from the checkpoint."""
    import train_reward
    from support.comparisons import task_comparisons
    from support.data import Truncation

    ckpt = load_checkpoint(Path(run) / "reward" / "ckpt.pt", "reward")
    cfg = train_reward.Config(**{**ckpt["train_args"], "n_eval": n})
    tok = Tokenizer.from_state(ckpt["tokenizer"])
    # attn_impl "auto": the figures run on the CPU, whichever attention the run trained with
    model = model_from_checkpoint(ckpt, "auto").eval()
    policy = policy_from_checkpoint(load_checkpoint(Path(run) / "sft" / "ckpt.pt", ("sft", "ppo")), "auto").eval()
    trunc = Truncation(cfg.max_prompt_tokens, cfg.max_answer_tokens)
    groups = task_comparisons([policy], tok, n, "eval", cfg.seed + 3, trunc, cfg)
    better, worse, _ = train_reward.comparison_pairs(groups)
    rewards = train_reward.raw_rewards(model, groups, tok.eos_id, cfg.batch_size, torch.device("cpu")) - model.offset
    return rewards[better], rewards[worse]


def plot_reward_model(out):
    runs = as_runs(out)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    plot_runs(ax1, runs, "reward/metrics.jsonl", "accuracy", "train accuracy (noisy labels)", "C0")
    plot_runs(ax1, runs, "reward/metrics.jsonl", "eval_accuracy", "held-out accuracy (noisy labels)", "C1", marker="o")
    plot_runs(ax1, runs, "reward/metrics.jsonl", "gold_agreement", "held-out agreement with the gold judge", "C2",
              marker="o")
    ax1.axhline(0.5, color="grey", ls=":", label="chance")
    ax1.set(xlabel="step", ylabel="fraction of pairs", title="reward model", ylim=(0.3, 1.0))
    ax1.legend(fontsize=8)
    r_chosen, r_rejected = reward_distributions(runs[0])
    lo, hi = min(r_chosen.min(), r_rejected.min()).item(), max(r_chosen.max(), r_rejected.max()).item()
    bins = torch.linspace(lo, hi, 30).numpy()
    ax2.hist(r_chosen.numpy(), bins=bins, alpha=0.6, label="preferred by the labeller")
    ax2.hist(r_rejected.numpy(), bins=bins, alpha=0.6, label="rejected")
    ax2.set(xlabel="reward (SFT answers average 0)", ylabel="answers in held-out pairs",
            title=f"held-out rewards ({runs[0].name})")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_ppo(out):
    runs = as_runs(out)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    plot_runs(ax1, runs, "ppo/metrics.jsonl", "eval_reward", "reward model", "C0", marker="o")
    plot_runs(ax1, runs, "ppo/metrics.jsonl", "eval_gold", "gold judge", "C2", marker="o")
    ax1.set(xlabel="iteration", ylabel="mean score, held-out prompts", title="PPO: reward model vs gold")
    ax1.legend(fontsize=8)
    plot_runs(ax2, runs, "ppo/metrics.jsonl", "kl", "sampled estimate (the penalty)", "C3")
    plot_runs(ax2, runs, "ppo/metrics.jsonl", "kl_exact", "exact, over the vocabulary", "C4", style="--")
    ax2.set(xlabel="iteration", ylabel="KL(policy || reference) per answer (nats)", title="the KL leash")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def kl_coef_of(run, name):
    """The kl_coef a PPO run was trained with (from its checkpoint's arguments), for the legend."""
    path = Path(run) / name / "ckpt.pt"
    return load_checkpoint(path, "ppo")["train_args"]["kl_coef"] if path.is_file() else "?"


def plot_reward_hacking(out):
    runs = as_runs(out)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for run_name, style in (("ppo", "-"), ("ppo_nokl", "--")):
        label = f"kl_coef {kl_coef_of(runs[0], run_name)}"
        log = f"{run_name}/metrics.jsonl"
        plot_runs(ax1, runs, log, "eval_reward", f"{label}: reward model", "C0", style, "o")
        plot_runs(ax1, runs, log, "eval_gold", f"{label}: gold judge", "C2", style, "o")
        plot_runs(ax2, runs, log, "kl", label, "C3", style)
    ax1.set(xlabel="iteration", ylabel="mean score, held-out prompts",
            title="without the KL penalty the reward model is gamed")
    ax1.legend(fontsize=8)
    ax2.set(xlabel="iteration", ylabel="KL per answer (nats)", title="KL to the reference", yscale="symlog")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


METHODS = {"ppo": "PPO (value head)", "grpo": "GRPO", "dr_grpo": "Dr. GRPO", "rloo": "RLOO", "reinforce": "REINFORCE",
           "dpo": "DPO"}  # the folders `METHODS="grpo rloo dpo" bash pipeline.sh` writes beside ppo/


def methods_of(runs):
    """The methods every run folder holds, in METHODS' order."""
    return [m for m in METHODS if all((run / m / "metrics.jsonl").exists() for run in runs)]


def plot_methods(out):
    """Held-out gold over each method's wall time: with its KL term (left) and without (right, where the
    reward model is gamed). Every method starts from the same SFT model and evaluates the same prompts
    with the same sampling seeds: the dotted line is that SFT model's gold."""
    runs = as_runs(out)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for i, method in enumerate(methods_of(runs)):
        plot_runs(axes[0], runs, f"{method}/metrics.jsonl", "eval_gold", METHODS[method], f"C{i}", marker="o",
                  x="wall_s")
        if all((run / f"{method}_nokl" / "metrics.jsonl").exists() for run in runs):
            plot_runs(axes[1], runs, f"{method}_nokl/metrics.jsonl", "eval_gold", f"{METHODS[method]}, no KL",
                      f"C{i}", "--", "o", x="wall_s")
    sft_gold = sum(read_log(run / "ppo" / "metrics.jsonl")[0]["eval_gold"] for run in runs) / len(runs)
    for ax, title in zip(axes, ("the methods, each with its KL term", "without the KL term: the reward model gamed")):
        ax.axhline(sft_gold, color="k", ls=":", lw=1, label="the SFT policy")
        ax.set(xlabel="seconds of the method's stage (same SFT and reward model)", title=title)
        ax.legend(fontsize=7)
    axes[0].set(ylabel="mean gold score, held-out prompts")
    fig.tight_layout()
    return fig


def rounds_of(run):
    """The PPO folder of each finished round: round 1 is ppo/, round r >= 2 is round<r>/ppo/."""
    folders, r = [run / "ppo"], 2
    while (run / f"round{r}" / "ppo" / "metrics.jsonl").exists():
        folders.append(run / f"round{r}" / "ppo")
        r += 1
    return folders


def hack_views(run):
    """How far the unleashed policy of round 1 (ppo_nokl) scores above the leashed one (ppo), by round
    1's reward model, by round 2's, and by the gold judge: (rm1, rm2, gold)."""
    last = {name: [r for r in read_log(run / name / "metrics.jsonl") if "eval_reward" in r][-1]
            for name in ("ppo", "ppo_nokl")}
    final = read_log(run / "round2" / "reward" / "metrics.jsonl")[-1]
    leashed, unleashed = (str(run / name / "ckpt.pt") for name in ("ppo", "ppo_nokl"))
    return (last["ppo_nokl"]["eval_reward"] - last["ppo"]["eval_reward"],
            final["policy_reward"][unleashed] - final["policy_reward"][leashed],
            last["ppo_nokl"]["eval_gold"] - last["ppo"]["eval_gold"])


def plot_rounds(out):
    runs = as_runs(out)
    many = len(runs) > 1
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 3.8))
    golds, starts, ends = [], [], []
    for run in runs:
        logs = [[r for r in read_log(f / "metrics.jsonl") if "eval_reward" in r] for f in rounds_of(run)]
        golds.append([logs[0][0]["eval_gold"]] + [log[-1]["eval_gold"] for log in logs])
        starts.append([log[0]["eval_reward"] for log in logs])
        ends.append([log[-1]["eval_reward"] for log in logs])
    n = min(len(g) for g in golds)
    mean = lambda rows, k: [sum(r[i] for r in rows) / len(rows) for i in range(k)]  # noqa: E731
    for g in golds:
        ax1.plot(range(len(g)), g, "o-", color="C2", lw=0.8 if many else 1.5, alpha=0.45 if many else 1)
    if many:
        ax1.plot(range(n), mean(golds, n), "o-", color="C2", lw=2.2, label=f"mean of {len(runs)} seeds")
        ax1.legend(fontsize=8)
    ax1.set(xlabel="round (0: the SFT policy)", ylabel="mean gold score, held-out prompts", xticks=range(n),
            title="the gold score after each round")
    for i, (s, e) in enumerate(zip(mean(starts, n - 1), mean(ends, n - 1))):
        ax2.annotate("", (i + 1, e), (i + 1, s), arrowprops=dict(arrowstyle="->", color="C0", lw=2))
        ax2.plot([i + 1, i + 1], [s, e], "o", color="C0", markersize=4)
    ax2.set(xlabel="round", ylabel="reward-model score, held-out prompts", xticks=range(1, n), xlim=(0.5, n - 0.5),
            title="each round's PPO, by that round's reward model" + (f" (mean of {len(runs)})" if many else ""))
    if all((run / "round2" / "reward" / "metrics.jsonl").exists() and (run / "ppo_nokl").exists() for run in runs):
        views = [hack_views(run) for run in runs]
        names = ["round 1's\nreward model", "round 2's\nreward model", "gold judge"]
        ax3.bar(names, mean(views, 3), color=["C0", "C1", "C2"], alpha=0.7)
        for v in views:
            ax3.plot(names, v, "k.", alpha=0.6)
        ax3.axhline(0, color="k", lw=0.8)
        ax3.set(ylabel="score(unleashed) - score(leashed)", title="round 1's reward hack, judged again")
    fig.tight_layout()
    return fig


@torch.no_grad()
def attention_pattern(model, tok, prompt, answer, layer=0, head=0):
    """softmax(q k^T / sqrt(hs)) of one head, recomputed from the block's own weights (the naive path)."""
    ids = tok.encode(prompt + answer)
    trunk = model.transformer
    x = trunk.wte(torch.tensor([ids])) + trunk.wpe(torch.arange(len(ids)))[None]
    for block in trunk.h[:layer]:
        x = block(x)
    attn = trunk.h[layer].attn
    C = x.size(-1)
    q, k, _ = attn.c_attn(trunk.h[layer].ln_1(x)).split(C, dim=2)
    hs = C // attn.n_head
    q, k = q[0, :, head * hs : (head + 1) * hs], k[0, :, head * hs : (head + 1) * hs]  # (T, hs)
    scores = (q @ k.T) * attn.scale
    scores = scores.masked_fill(~attention_mask_allowed(len(ids), len(ids), None, scores.device)[0, 0], float("-inf"))
    return scores.softmax(-1), [tok.decode([i]) for i in ids]


def plot_attention(out, prompt="Human: Write a happy sentence about the sea.\n\nAssistant:",
                   answer=" The sea is calm and lovely.", layer=None, head=0):
    run = as_runs(out)[0]
    ckpt = load_checkpoint(run / "sft" / "ckpt.pt", "sft")
    model = policy_from_checkpoint(ckpt, "auto").eval()  # on the CPU, whichever attention the run trained with
    layer = model.config.n_layer - 1 if layer is None else layer
    weights, labels = attention_pattern(model, Tokenizer.from_state(ckpt["tokenizer"]), prompt, answer, layer, head)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(weights.numpy(), cmap="Blues")
    ax.set_xticks(range(len(labels)), [repr(s)[1:-1] for s in labels], rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), [repr(s)[1:-1] for s in labels], fontsize=7)
    ax.set(title=f"SFT model, layer {layer} head {head}: where each token looks", xlabel="key", ylabel="query")
    fig.tight_layout()
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(description="Draw the pipeline's figures from one or more run folders.")
    parser.add_argument("runs", nargs="+", help="run folders written by pipeline.sh (OUT), one per seed")
    parser.add_argument("--to", default=None, help="folder for the PNGs (default: the first run folder)")
    args = parser.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    missing = [str(r / "sft" / "ckpt.pt") for r in runs if not (r / "sft" / "ckpt.pt").is_file()]
    if missing:
        parser.exit(2, f"error: {missing[0]} is missing; run bash pipeline.sh (OUT=that folder) first\n")
    for log in sorted(log for r in runs for log in r.glob("**/metrics.jsonl")):  # a broken line: one error, now
        read_log(log)
    to = Path(args.to) if args.to else runs[0]
    to.mkdir(parents=True, exist_ok=True)
    figures = {"sft": plot_sft, "reward_model": plot_reward_model, "ppo": plot_ppo, "attention": plot_attention}
    if all((r / "ppo_nokl" / "metrics.jsonl").exists() for r in runs):
        figures["reward_hacking"] = plot_reward_hacking
    if all((r / "round2" / "ppo" / "metrics.jsonl").exists() for r in runs):
        figures["rounds"] = plot_rounds
    if len(methods_of(runs)) > 1:
        figures["methods"] = plot_methods
    for name, make in figures.items():
        fig = make(runs)
        fig.savefig(to / f"{name}.png", dpi=120)
        plt.close(fig)
        print(f"wrote {to / name}.png")


if __name__ == "__main__":
    run_script(main)  # a broken file is one error line
