"""
Stage 3 of RLHF: the reward model.

Humans compare two answers y_chosen and y_rejected to the same prompt x. The reward model is the SFT
transformer with its vocabulary head replaced by a scalar head, read at the last token of (x, y):

    r(x, y) = w . h_last(x, y) + b

and the Bradley-Terry model says how a labeller chooses between two answers:

    P(y_chosen preferred to y_rejected | x) = sigmoid(r_chosen - r_rejected)

so maximum likelihood on the labels is the loss

    loss = -log sigmoid(r_chosen - r_rejected)

When the data carries a score per answer, a margin asks the better answer to win by more when the
scores differ more (Llama 2, section 3.2.2):  loss = -log sigmoid(r_chosen - r_rejected - margin).
When a prompt has K > 2 ranked answers, all K*(K-1)/2 pairs are used in one batch, and each answer is
run through the model once (InstructGPT, section 3.5): more comparisons per forward pass, and the
pairs of one prompt do not end up in different batches where they would overfit.

The reward only has meaning up to a constant (Bradley-Terry sees differences), so after training we
pick the constant: the SFT policy's own answers to held-out prompts score 0 on average. PPO then starts
from rewards near 0, which keeps its value targets and its KL trade-off on a sane scale.

    python train_reward.py                          # built-in task, from out/sft/ckpt.pt, CPU
    python train_reward.py --data ../shared/data/hh_rlhf_sample.jsonl --sft out/sft/ckpt.pt
"""

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import task
from data import (
    EOS_ID, DataError, MetricsLog, Progress, Truncation, autocast, encode_example, flag, get_tokenizer,
    load_preferences, pad_batch, parse_args, pick_device, run,
)
from model import RewardModel, load_checkpoint, model_from_checkpoint, policy_from_checkpoint, save_checkpoint
from train_sft import adamw, batch_indices, lr_at, sample_answers


@dataclass
class Config:
    """Reward model: Bradley-Terry loss on (prompt, chosen, rejected) comparisons, from the SFT model."""

    out_dir: str = flag("out/reward", "folder for ckpt.pt and metrics.jsonl")
    sft: str = flag("out/sft/ckpt.pt", "the SFT checkpoint to start from (train_sft.py writes it)")
    data: str = flag("default", "'default' for the built-in task's simulated labellers, or a JSONL of preferences (generic, HH-RLHF or TL;DR)")
    eval_data: str = flag("", "held-out JSONL (default: the task's eval split, or the last 10%% of --data)")
    n_train: int = flag(6000, "prompts labelled by the built-in task's simulated labellers")
    n_eval: int = flag(500, "held-out labelled pairs (built-in task)")
    k: int = flag(2, "answers per prompt from the simulated labellers; K > 2 uses all K*(K-1)/2 pairs")
    label_noise: float = flag(1.0, "labeller noise: P(a over b) = sigmoid((gold_a - gold_b) / noise); 0 = always the better")
    margin_coef: float = flag(0.0, "weight of the score margin (needs chosen_score/rejected_score); 0 = plain Bradley-Terry")
    max_prompt_tokens: int = flag(64, "prompts longer than this keep their last tokens")
    max_answer_tokens: int = flag(48, "answers longer than this are cut")
    batch_size: int = flag(32, "prompts per step (each with its 2 or K answers)")
    max_iters: int = flag(300, "optimizer steps")
    lr: float = flag(5e-4, "peak learning rate (use ~1e-5 for GPT-2 weights)")
    min_lr: float = flag(5e-5, "learning rate at the end of the cosine decay")
    warmup_iters: int = flag(20, "linear warmup steps")
    weight_decay: float = flag(0.1, "AdamW weight decay, on matrices only")
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0: off)")
    eval_interval: int = flag(100, "evaluate and checkpoint every this many steps")
    norm_prompts: int = flag(128, "held-out prompts the SFT policy answers to set the reward offset (built-in task)")
    seed: int = flag(1337, "seed for data, order and sampling")
    device: str = flag("auto", "'auto' (cuda if available), 'cpu' or 'cuda'")
    attn_impl: str = flag("auto", "attention: auto, triton, sdpa or naive")
    resume: bool = flag(False, "continue from out_dir/ckpt.pt at the step it saved")


# -----------------------------------------------------------------------------
# The pieces worth testing


def bradley_terry_loss(r_chosen, r_rejected, margin=None):
    """-log sigmoid(r_chosen - r_rejected [- margin]), one value per pair. logsigmoid, not
    log(sigmoid(.)): for a badly wrong pair sigmoid underflows to 0 and the log to -inf."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def comparison_pairs(groups):
    """Every (better, worse) pair of answer indices inside each group, with the score gap if known.

    A group is (prompt, answers best-first, scores or None); answers are numbered in the order they
    are stacked into the batch. K answers give K*(K-1)/2 pairs."""
    better, worse, gap = [], [], []
    offset = 0
    for _, answers, scores in groups:
        for i in range(len(answers)):
            for j in range(i + 1, len(answers)):
                better.append(offset + i)
                worse.append(offset + j)
                gap.append(scores[i] - scores[j] if scores is not None else 0.0)
        offset += len(answers)
    return torch.tensor(better), torch.tensor(worse), torch.tensor(gap)


def pair_accuracy(r_chosen, r_rejected):
    """1 where the chosen answer gets the higher reward, 0 where the lower, 1/2 for a tie (as a coin
    flip would do: the untrained, zero-initialised head ties every pair)."""
    return (r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()


def reward_batch(groups, tok, trunc, device):
    """All answers of all groups as one right-padded batch of prompt+answer sequences."""
    seqs = []
    for prompt, answers, _ in groups:
        for answer in answers:
            p, a = encode_example(tok, prompt, answer, trunc)
            seqs.append(p + a)
    return pad_batch(seqs, pad_id=EOS_ID, device=device)  # (n_answers, T) x 2


def group_from_record(r):
    """A preference record (pair or K-way ranking) as (prompt, answers best-first, scores or None)."""
    if "answers" in r:
        return r["prompt"], r["answers"], r.get("scores")
    scores = [r["chosen_score"], r["rejected_score"]] if "chosen_score" in r else None
    return r["prompt"], [r["chosen"], r["rejected"]], scores


def pair_loss(model, groups, tok, trunc, cfg, device):
    """Mean Bradley-Terry loss over every pair of the batch, and the rewards for the metrics."""
    idx, mask = reward_batch(groups, tok, trunc, device)
    with autocast(device):
        rewards = model(idx, mask).float()  # (n_answers,)
    better, worse, gap = comparison_pairs(groups)
    margin = cfg.margin_coef * gap.to(device) if cfg.margin_coef > 0 else None
    loss = bradley_terry_loss(rewards[better], rewards[worse], margin).mean()
    return loss, rewards[better], rewards[worse]


@torch.no_grad()
def evaluate(model, eval_groups, tok, trunc, cfg, device):
    """Held-out loss, pairwise accuracy, margins and reward statistics; on the built-in task also how
    often the reward model orders a pair as the gold judge does (the labels themselves are noisy)."""
    model.eval()
    losses, r_c, r_r = [], [], []
    for start in range(0, len(eval_groups), cfg.batch_size):
        loss, rc, rr = pair_loss(model, eval_groups[start : start + cfg.batch_size], tok, trunc, cfg, device)
        losses.append(loss.item() * len(rc))
        r_c.append(rc)
        r_r.append(rr)
    r_c, r_r = torch.cat(r_c), torch.cat(r_r)
    metrics = {
        "eval_loss": sum(losses) / len(r_c),
        "eval_accuracy": pair_accuracy(r_c, r_r).mean().item(),
        "eval_margin": (r_c - r_r).mean().item(),
        "reward_chosen_mean": r_c.mean().item(), "reward_chosen_std": r_c.std().item(),
        "reward_rejected_mean": r_r.mean().item(), "reward_rejected_std": r_r.std().item(),
    }
    if cfg.data == "default":
        gold_c, gold_r = [], []
        for prompt, answers, _ in eval_groups:
            for i in range(len(answers)):
                for j in range(i + 1, len(answers)):
                    gold_c.append(task.gold_score(prompt, answers[i]))
                    gold_r.append(task.gold_score(prompt, answers[j]))
        gold_diff = torch.tensor(gold_c) - torch.tensor(gold_r)
        decided = gold_diff != 0  # gold ties say nothing about order
        sign = torch.where(gold_diff > 0, 1.0, -1.0)  # orient each pair so the gold judge prefers the first
        metrics["gold_agreement"] = pair_accuracy(sign * r_c.cpu(), sign * r_r.cpu())[decided].mean().item()
    model.train()
    return metrics


@torch.no_grad()
def reward_offset(model, policy, prompts, tok, cfg, device):
    """The mean reward of the SFT policy's own answers to held-out prompts: the constant that makes
    them score 0 on average (it is subtracted inside RewardModel.forward)."""
    model.eval()
    # temperature 1: the policy's own distribution, the one PPO starts sampling from
    answers = sample_answers(policy, tok, prompts, cfg.max_prompt_tokens, cfg.max_answer_tokens, 1.0, cfg.seed)
    trunc = Truncation(cfg.max_prompt_tokens, cfg.max_answer_tokens)
    rewards = []
    for start in range(0, len(prompts), cfg.batch_size):
        groups = [(p, [a], None) for p, a in zip(prompts[start : start + cfg.batch_size], answers[start : start + cfg.batch_size])]
        idx, mask = reward_batch(groups, tok, trunc, device)
        with autocast(device):
            rewards.append(model(idx, mask).float() + model.offset)  # the raw reward, before any offset
    return torch.cat(rewards).mean()


# -----------------------------------------------------------------------------
# The training run


def main(cfg):
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    tok = get_tokenizer()
    ckpt_path = f"{cfg.out_dir}/ckpt.pt"

    # --- data: comparisons -> groups (prompt, answers best-first, scores) ---
    if cfg.data == "default":
        train_records = task.preferences(cfg.n_train, "train", cfg.seed + 2, k=cfg.k, noise=cfg.label_noise)
        eval_records = task.preferences(cfg.n_eval, "eval", cfg.seed + 3, k=2, noise=cfg.label_noise)
        print(f"simulated labellers (noise {cfg.label_noise}) agree with the gold judge on "
              f"{task.label_agreement(eval_records):.1%} of held-out pairs: no reward model can learn the labels better than the labels are")
    else:
        train_records = load_preferences(cfg.data)
        if cfg.eval_data:
            eval_records = load_preferences(cfg.eval_data)
        else:
            n_eval = max(1, len(train_records) // 10)
            train_records, eval_records = train_records[:-n_eval], train_records[-n_eval:]
    train_groups = [group_from_record(r) for r in train_records]
    eval_groups = [group_from_record(r) for r in eval_records]
    if cfg.margin_coef > 0 and any(scores is None for _, _, scores in train_groups):
        raise DataError(f"{cfg.data}: --margin_coef needs chosen_score and rejected_score on every line")
    if len(train_groups) < cfg.batch_size:
        raise DataError(f"{cfg.data}: {len(train_groups)} comparisons, fewer than --batch_size {cfg.batch_size}")
    trunc = Truncation(cfg.max_prompt_tokens, cfg.max_answer_tokens)
    n_pairs = len(comparison_pairs(train_groups)[0])
    print(f"data: {len(train_groups)} prompts ({n_pairs} pairs) train, {len(eval_groups)} eval, from {cfg.data}")

    # --- model: the SFT transformer, its vocabulary head replaced by the scalar reward head ---
    sft_ckpt = load_checkpoint(cfg.sft, ("sft", "ppo", "base"))
    policy = policy_from_checkpoint(sft_ckpt, cfg.attn_impl).to(device).eval()  # for the offset at the end
    start_iter = 0
    if cfg.resume:
        resume_ckpt = load_checkpoint(ckpt_path, "reward")
        model, start_iter = model_from_checkpoint(resume_ckpt, cfg.attn_impl), resume_ckpt["step"]
        print(f"resuming {ckpt_path} at step {start_iter}")
    else:
        model = RewardModel(policy.config)
        model.transformer.load_state_dict(policy.state_dict())
    model.to(device).train()

    optimizer = adamw(model, cfg.lr, cfg.weight_decay)
    if cfg.resume:
        optimizer.load_state_dict(resume_ckpt["optimizer"])
    log = MetricsLog(f"{cfg.out_dir}/metrics.jsonl", resume_step=start_iter if cfg.resume else None)

    def checkpoint(step, metrics):
        save_checkpoint(ckpt_path, model, "reward", step, asdict(cfg), optimizer, extra={"metrics": metrics, "sft": cfg.sft})

    if start_iter == 0:
        metrics = evaluate(model, eval_groups, tok, trunc, cfg, device)
        log.write({"step": 0, **metrics})
        print("step 0: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    progress = Progress("reward", cfg.max_iters, start_iter)
    t0, pairs_seen = time.time(), 0
    sums = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
    for it in range(start_iter, cfg.max_iters):
        lr = lr_at(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        groups = [train_groups[i] for i in batch_indices(it, len(train_groups), cfg.batch_size, cfg.seed)]
        loss, r_chosen, r_rejected = pair_loss(model, groups, tok, trunc, cfg, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pairs_seen += len(r_chosen)
        sums["loss"] += loss.detach()
        sums["accuracy"] += pair_accuracy(r_chosen, r_rejected).mean().detach()
        sums["margin"] += (r_chosen - r_rejected).mean().detach()

        step = it + 1
        if step % 10 == 0 or step == cfg.max_iters:
            n = 10 if step % 10 == 0 else step % 10
            means = {k: float(v) / n for k, v in sums.items()}  # a sync point: the means of the last steps
            sums = {k: 0.0 for k in sums}
            record = {"step": step, **means, "lr": lr, "pairs_per_s": pairs_seen / (time.time() - t0)}
            log.write(record)
            progress.update(step, loss=means["loss"], acc=means["accuracy"], pairs_s=f"{record['pairs_per_s']:.0f}")
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            metrics = evaluate(model, eval_groups, tok, trunc, cfg, device)
            log.write({"step": step, **metrics})
            checkpoint(step, metrics)
            progress.close()
            print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f"; saved {ckpt_path}")
    progress.close()

    # --- normalise: the SFT policy's own answers score 0 on average ---
    if cfg.data == "default":
        norm_prompts = task.make_prompts(cfg.norm_prompts, "eval", cfg.seed + 4)
    else:
        norm_prompts = [g[0] for g in eval_groups][: cfg.norm_prompts]
    model.offset.fill_(reward_offset(model, policy, norm_prompts, tok, cfg, device).item())
    metrics = evaluate(model, eval_groups, tok, trunc, cfg, device)
    metrics["offset"] = model.offset.item()
    log.write({"step": cfg.max_iters, **metrics})
    checkpoint(cfg.max_iters, metrics)
    print(f"reward offset {model.offset.item():.4f}: the SFT policy's answers now average 0; saved {ckpt_path}")
    return model, metrics


if __name__ == "__main__":
    run(lambda: main(parse_args(Config)))
