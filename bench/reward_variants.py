"""Reward-model variants trained on one fixed set of comparisons of one SFT model, to see what moves the
reward model's agreement with the gold judge, and on which kind of prompt it fails.

The comparisons (the SFT policy's K answers to train and held-out prompts, ranked by the simulated
labellers, exactly as train_reward.py makes them) are sampled once and cached, so every variant sees the
same data. Each variant trains the reward model from the SFT weights as train_reward.py does, and prints
every 100 steps its agreement with the gold judge on the held-out pairs, overall and per kind of prompt.

    python bench/reward_variants.py SFT_CKPT CACHE.pkl bt                       # train_reward.py's loss
    python bench/reward_variants.py SFT_CKPT CACHE.pkl pl ema=0.99 lr=0.001     # Plackett-Luce, EMA weights

VARIANT: bt (Bradley-Terry on all K(K-1)/2 pairs with the head at the last token: train_reward.py's),
pl (Plackett-Luce: the log-likelihood of the whole ranking, the labellers' own noise model), or
Bradley-Terry with the head pooled over the tokens instead: mean or sum (over the answer's tokens, its
EOS included), meanall (the mean over every token, the prompt's too). key=value: any train_reward.py flag
(n_train, max_iters, lr, min_lr, batch_size, seed, ...), and ema=DECAY to evaluate an exponential moving
average of the weights as well. A cache made with n_train=N serves any n_train <= N. order=N trains on the
same cached comparisons (those of seed) in another order of the batches: seed N for the order alone.

    for n in 11 12 13 14; do python bench/reward_variants.py SFT_CKPT CACHE.pkl bt order=$n; done
"""

import copy
import math
import os
import pickle
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_reward as tr  # noqa: E402
from model import RewardModel  # noqa: E402
from support import task  # noqa: E402
from support.checkpoint import load_checkpoint, policy_from_checkpoint  # noqa: E402
from support.comparisons import task_comparisons  # noqa: E402
from support.data import Tokenizer, Truncation  # noqa: E402
from support.training import adamw, batch_indices, parse_args, run, set_lr, warmup_cosine  # noqa: E402


def plackett_luce_loss(rewards, groups):
    """-log P(ranking) per choice: the i-th place goes to answer i out of answers i..K with probability
    softmax(r)_i over them, so the loss of a group is sum_i [logsumexp(r_i..r_K) - r_i]."""
    losses, offset = [], 0
    for g in groups:
        r = rewards[offset : offset + len(g["answers"])]  # best-first
        tail_lse = torch.logcumsumexp(r.flip(0), 0).flip(0)  # logsumexp(r_i..r_K) for every i
        losses.append(tail_lse[:-1] - r[:-1])
        offset += len(g["answers"])
    return torch.cat(losses).mean()


class Pooled(torch.nn.Module):
    """The scalar head on every answer token (EOS included), summed or averaged over the answer,
    instead of read at the last token. The answer starts after the prompt's "Assistant:"."""

    def __init__(self, model, suffix_ids, how):
        super().__init__()
        self.model, self.suffix, self.how = model, torch.tensor(suffix_ids), how
        self.offset = model.offset

    def forward(self, idx, mask):
        head = self.model.reward_head(self.model.transformer(idx, mask))  # (B, T)
        n = len(self.suffix)
        windows = idx.unfold(1, n, 1)  # (B, T - n + 1, n)
        ends = (windows == self.suffix).all(-1).float().argmax(1) + n  # first token after "Assistant:"
        answer = mask.bool() & (torch.arange(idx.size(1))[None, :] >= ends[:, None])
        if self.how == "meanall":  # every real token, the prompt's too
            answer = mask.bool()
        total = (head * answer).sum(1)
        return total if self.how == "sum" else total / answer.sum(1)


def agreement_by_kind(model, groups, kinds, pad_id):
    """Agreement with the gold judge on the held-out pairs it does not call a tie, per kind of prompt
    and for close (gold gap <= 0.5) and clear pairs."""
    rewards = tr.raw_rewards(model, groups, pad_id, 64, torch.device("cpu"))
    better, worse, _ = tr.comparison_pairs(groups)
    gold_b, gold_w = tr.gold_of_pairs(groups)
    pair_kinds = [kind for g, kind in zip(groups, kinds) for _ in range(math.comb(len(g["answers"]), 2))]
    agree = ((rewards[better] > rewards[worse]) == (gold_b > gold_w)).tolist()
    gaps = (gold_b - gold_w).abs().tolist()
    stats = defaultdict(lambda: [0, 0])
    for kind, hit, gap in zip(pair_kinds, agree, gaps):
        if gap > 0:  # a gold tie says nothing about order
            for key in (kind, "close" if gap <= 0.5 else "clear"):
                stats[key][0] += hit
                stats[key][1] += 1
    return " ".join(f"{k} {hits / n:.2f} (n={n})" for k, (hits, n) in sorted(stats.items()))


def main():
    if len(sys.argv) < 4 or sys.argv[3] not in ("bt", "pl", "sum", "mean", "meanall"):
        print(__doc__)
        sys.exit(2)
    sft_path, cache, variant = sys.argv[1:4]
    opts = dict(arg.split("=", 1) for arg in sys.argv[4:])
    ema_decay = float(opts.pop("ema", 0))
    cfg = parse_args(tr.Config, [f"--{k}={v}" for k, v in opts.items() if k != "order"])
    order_seed = int(opts.get("order", cfg.seed))  # the seed of the batches' order (the comparisons: cfg.seed)
    sft = load_checkpoint(sft_path, ("sft", "ppo"))
    tok = Tokenizer.from_state(sft["tokenizer"])
    policy = policy_from_checkpoint(sft).eval()
    tr.fit_lengths(cfg, policy.config.block_size)
    made_by = {"sft": os.path.abspath(sft_path), "seed": cfg.seed, "k": cfg.k, "label_noise": cfg.label_noise,
               "n_eval": cfg.n_eval, "max_answer_tokens": cfg.max_answer_tokens}
    if os.path.exists(cache):
        cached = pickle.load(open(cache, "rb"))
        if cached["made_by"] != made_by or cached["n_train"] < cfg.n_train:
            sys.exit(f"error: {cache} holds comparisons made with {cached['made_by']}, n_train {cached['n_train']}; "
                     "pass another cache file for these settings")
        train_groups, eval_groups = cached["train"], cached["eval"]
    else:
        t0 = time.time()
        trunc = Truncation(cfg.max_prompt_tokens, cfg.max_answer_tokens)
        train_groups = task_comparisons([policy], tok, cfg.n_train, "train", cfg.seed + 2, trunc, cfg)
        eval_groups = task_comparisons([policy], tok, cfg.n_eval, "eval", cfg.seed + 3, trunc, cfg)
        pickle.dump({"made_by": made_by, "n_train": cfg.n_train, "train": train_groups, "eval": eval_groups},
                    open(cache, "wb"))
        print(f"comparisons sampled and ranked in {time.time() - t0:.0f}s, cached in {cache}", flush=True)
    train_groups = train_groups[: cfg.n_train]
    kinds = [task.parse_prompt(tok.decode(g["prompt"])).kind for g in eval_groups]

    torch.manual_seed(order_seed)
    model = RewardModel(policy.config)
    model.transformer.load_state_dict(policy.transformer.state_dict())
    model.train()
    optimizer = adamw(model, cfg.lr, cfg.weight_decay)
    ema = copy.deepcopy(model).eval() if ema_decay else None
    suffix = tok.encode("\n\nAssistant:")

    def scorer(m):  # what gives a sequence its reward: the model itself, or its head pooled over the answer
        return Pooled(m, suffix, variant) if m is not None and variant in ("sum", "mean", "meanall") else m

    pooled, pooled_ema = scorer(model), scorer(ema)
    device = torch.device("cpu")
    train_s, t0 = 0.0, time.time()
    for it in range(cfg.max_iters):
        set_lr(optimizer, warmup_cosine(it, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.max_iters))
        groups = [train_groups[i] for i in batch_indices(it, len(train_groups), cfg.batch_size, order_seed)]
        if variant == "pl":
            idx, mask = tr.reward_batch(groups, tok.eos_id, device)
            loss = plackett_luce_loss(model(idx, mask).float(), groups)
        else:  # Bradley-Terry on all pairs, with the reward read at the last token or pooled
            loss, _, _ = tr.pair_loss(pooled, groups, tok.eos_id, 0.0, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1 - ema_decay)
        if (it + 1) % 100 == 0 or it + 1 == cfg.max_iters:
            train_s += time.time() - t0  # the evaluations' time is not counted
            line = f"{variant} {opts} step {it + 1}: gold agreement "
            line += f"{tr.evaluate(pooled, eval_groups, tok.eos_id, cfg, device)['gold_agreement']:.3f}"
            if ema is not None:
                line += f", EMA {tr.evaluate(pooled_ema, eval_groups, tok.eos_id, cfg, device)['gold_agreement']:.3f}"
            print(f"{line}; {agreement_by_kind(pooled_ema or pooled, eval_groups, kinds, tok.eos_id)}; {train_s:.0f}s",
                  flush=True)
            t0 = time.time()


if __name__ == "__main__":
    run(main)
