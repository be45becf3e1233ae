"""
The figures of the pipeline, from the JSONL logs and checkpoints the three scripts write. The notebooks
call these functions one by one; `python notebooks/plots.py out` writes them all as PNGs into out/.

    sft.png              SFT: training and held-out loss, gold score of sampled answers
    reward_model.png     reward model: held-out accuracy, agreement with the gold judge, and the
                         distribution of rewards for chosen vs rejected answers
    ppo.png              PPO: reward-model score, gold score and KL to the reference per iteration
    reward_hacking.png   the same run with kl_coef = 0 beside the normal one
    attention.png        the attention pattern of one head of the SFT model on one prompt
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, no screen needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import Truncation, get_tokenizer  # noqa: E402
from model import attention_mask_allowed, load_checkpoint, model_from_checkpoint, policy_from_checkpoint  # noqa: E402


def read_log(path):
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def series(log, key):
    rows = [r for r in log if key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]


def plot_sft(out, ax=None):
    log = read_log(Path(out) / "sft" / "metrics.jsonl")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(*series(log, "loss"), label="train (answer tokens)")
    ax1.plot(*series(log, "eval_loss"), "o-", label="held-out")
    ax1.set(xlabel="step", ylabel="cross-entropy (nats/token)", yscale="log", title="SFT loss")
    ax1.legend()
    ax2.plot(*series(log, "gold"), "o-", color="C2")
    ax2.set(xlabel="step", ylabel="mean gold score", title="gold score of sampled answers (held-out prompts)")
    fig.tight_layout()
    return fig


@torch.no_grad()
def reward_distributions(out, n=300):
    """Rewards of the held-out chosen and rejected answers of the built-in task, from the checkpoint."""
    import task
    import train_reward

    ckpt = load_checkpoint(Path(out) / "reward" / "ckpt.pt", "reward")
    cfg = train_reward.Config(**ckpt["train_args"])
    model = model_from_checkpoint(ckpt).eval()
    groups = [train_reward.group_from_record(r) for r in task.preferences(n, "eval", cfg.seed + 3, noise=cfg.label_noise)]
    idx, mask = train_reward.reward_batch(groups, get_tokenizer(), Truncation(cfg.max_prompt_tokens, cfg.max_answer_tokens), "cpu")
    rewards = model(idx, mask)
    return rewards[0::2], rewards[1::2]


def plot_reward_model(out):
    log = read_log(Path(out) / "reward" / "metrics.jsonl")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(*series(log, "accuracy"), label="train accuracy (noisy labels)", alpha=0.6)
    ax1.plot(*series(log, "eval_accuracy"), "o-", label="held-out accuracy (noisy labels)")
    ax1.plot(*series(log, "gold_agreement"), "o-", label="held-out agreement with the gold judge")
    ax1.axhline(0.5, color="grey", ls=":", label="chance")
    ax1.set(xlabel="step", ylabel="fraction of pairs", title="reward model", ylim=(0.3, 1.0))
    ax1.legend(fontsize=8)
    r_chosen, r_rejected = reward_distributions(out)
    bins = torch.linspace(min(r_chosen.min(), r_rejected.min()).item(), max(r_chosen.max(), r_rejected.max()).item(), 30)
    ax2.hist(r_chosen.numpy(), bins=bins.numpy(), alpha=0.6, label="chosen")
    ax2.hist(r_rejected.numpy(), bins=bins.numpy(), alpha=0.6, label="rejected")
    ax2.set(xlabel="reward (normalised: SFT answers average 0)", ylabel="answers", title="held-out rewards")
    ax2.legend()
    fig.tight_layout()
    return fig


def plot_ppo_run(ax_reward, ax_kl, log, label, style="-"):
    steps, reward = series(log, "reward")
    ax_reward.plot(steps, reward, style, label=f"{label}: reward model", color="C0")
    ax_reward.plot(*series(log, "gold"), style, label=f"{label}: gold judge", color="C2")
    ax_kl.plot(*series(log, "kl"), style, label=label, color="C3")


def plot_ppo(out):
    log = read_log(Path(out) / "ppo" / "metrics.jsonl")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    plot_ppo_run(ax1, ax2, log, "PPO")
    ax1.plot(*series(log, "eval_gold"), "o", color="C2", label="gold, held-out prompts")
    ax1.set(xlabel="iteration", ylabel="score of the rollout answers", title="PPO: reward model vs gold")
    ax1.legend(fontsize=8)
    ax2.set(xlabel="iteration", ylabel="KL(policy || reference) per answer (nats)", title="the KL leash")
    fig.tight_layout()
    return fig


def plot_reward_hacking(out):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    plot_ppo_run(ax1, ax2, read_log(Path(out) / "ppo" / "metrics.jsonl"), "kl_coef 0.1")
    plot_ppo_run(ax1, ax2, read_log(Path(out) / "ppo_nokl" / "metrics.jsonl"), "kl_coef 0", style="--")
    ax1.set(xlabel="iteration", ylabel="mean score", title="without the KL penalty the reward model is gamed")
    ax1.legend(fontsize=8)
    ax2.set(xlabel="iteration", ylabel="KL per answer (nats)", title="KL to the reference", yscale="symlog")
    ax2.legend()
    fig.tight_layout()
    return fig


@torch.no_grad()
def attention_pattern(model, tok, prompt, answer, layer=0, head=0):
    """softmax(q k^T / sqrt(hs)) of one head, recomputed from the block's own weights (the naive path)."""
    ids = tok.encode_ordinary(prompt + answer)
    x = model.transformer.wte(torch.tensor([ids])) + model.transformer.wpe(torch.arange(len(ids)))[None]
    for block in model.transformer.h[:layer]:
        x = block(x)
    attn = model.transformer.h[layer].attn
    q, k, _ = attn.c_attn(model.transformer.h[layer].ln_1(x)).split(attn.n_embd, dim=2)
    hs = attn.n_embd // attn.n_head
    q, k = q[0, :, head * hs : (head + 1) * hs], k[0, :, head * hs : (head + 1) * hs]  # (T, hs)
    scores = (q @ k.T) / hs**0.5
    scores = scores.masked_fill(~attention_mask_allowed(len(ids), len(ids), None, scores.device)[0, 0], float("-inf"))
    return scores.softmax(-1), [tok.decode([i]) for i in ids]


def plot_attention(out, prompt="Human: Write a happy sentence about the sea.\n\nAssistant:", answer=" The sea is calm and lovely.", layer=None, head=0):
    model = policy_from_checkpoint(load_checkpoint(Path(out) / "sft" / "ckpt.pt", "sft")).eval()
    layer = model.config.n_layer - 1 if layer is None else layer
    weights, labels = attention_pattern(model, get_tokenizer(), prompt, answer, layer, head)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(weights.numpy(), cmap="Blues")
    ax.set_xticks(range(len(labels)), [repr(s)[1:-1] for s in labels], rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), [repr(s)[1:-1] for s in labels], fontsize=7)
    ax.set(title=f"SFT model, layer {layer} head {head}: where each token looks", xlabel="key", ylabel="query")
    fig.tight_layout()
    return fig


def main(out="out"):
    out = Path(out)
    figures = {"sft": plot_sft, "reward_model": plot_reward_model, "ppo": plot_ppo, "attention": plot_attention}
    if (out / "ppo_nokl" / "metrics.jsonl").exists():
        figures["reward_hacking"] = plot_reward_hacking
    for name, make in figures.items():
        fig = make(out)
        fig.savefig(out / f"{name}.png", dpi=120)
        plt.close(fig)
        print(f"wrote {out / name}.png")


if __name__ == "__main__":
    main(*sys.argv[1:])
