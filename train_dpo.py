"""
Beyond PPO: Direct Preference Optimisation (DPO; Rafailov et al. 2023), the contrast to stages 3 and 4.

PPO maximises the reward model's score minus a KL penalty, E[r(x, y)] - beta * KL(pi || pi_ref). The policy
that maximises it is known in closed form, pi*(y | x) ~ pi_ref(y | x) * exp(r(x, y) / beta), so every policy
implies a reward: r(x, y) = beta * (log pi(y | x) - log pi_ref(y | x)) + a constant per prompt. Put into
the Bradley-Terry loss of the reward model, on the same comparisons, the constant cancels:

    loss = -log sigmoid(beta * ((logp(y_w) - logp_ref(y_w)) - (logp(y_l) - logp_ref(y_l))))

with logp(y) = sum over the answer's tokens of log pi(a_t | x, a_<t), y_w the preferred answer and y_l the
other. No reward model and no sampling while training: one supervised pass over the comparisons, the
reference's log-probs computed once. beta plays kl_coef's part.

On the built-in task the comparisons are the ones the reward model trained on (train_reward.py writes them,
the SFT policy's own samples ranked by the simulated labellers), and the held-out measures are those of
stages 3 and 4: the implicit reward's accuracy on held-out pairs and its agreement with the gold judge, and
the gold score of answers sampled for PPO's held-out prompts with PPO's seeds.

    python train_dpo.py                                  # from out/sft, on out/reward/comparisons.jsonl, CPU
    python train_dpo.py --data ../shared/data/hh_rlhf_sample.jsonl --sft out/gpt2_sft/ckpt.pt --out_dir out/gpt2_dpo
"""

import copy
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from kernels.logprob import IMPLS as LOGPROB_IMPLS
from kernels.logprob import linear_logprobs
from support import task
from support.checkpoint import load_checkpoint, policy_from_checkpoint, save_checkpoint
from support.comparisons import file_comparisons, task_comparisons
from support.data import DataError, Tokenizer, Truncation, encode_prompt, load_preferences, pad_batch, train_and_eval
from support.sampling import sample_answers
from support.training import (
    MetricsLog, Progress, adamw, autocast, batch_indices, check_finite, check_flags, check_out_dir, fit_lengths, flag,
    parse_args, pick_device, run, set_lr, warmup_cosine,
)
from train_reward import comparison_pairs, pair_accuracy  # the reward stage's pairs and their accuracy


@dataclass
class Config:
    """DPO: the Bradley-Terry loss on the policy's implicit reward beta * log(pi / pi_ref), from the SFT model."""

    out_dir: str = flag("out/dpo", "folder for ckpt.pt and metrics.jsonl")
    sft: str = flag("out/sft/ckpt.pt", "the SFT checkpoint: the policy to start from and the frozen reference")
    data: str = flag("out/reward/comparisons.jsonl", "comparisons, any preference format (the reward stage's "
                     "comparisons.jsonl: the labellers' rankings of the SFT policy's samples)")
    eval_data: str = flag("", "held-out comparisons (default: on the built-in task, fresh ones of the SFT policy "
                          "ranked by the labellers; else the last 10%% of --data)")
    beta: float = flag(0.1, "the KL strength: the implicit reward is beta * (logp - logp_ref)", above=0)
    n_eval: int = flag(256, "built-in task: held-out prompts whose answers are ranked for the eval", min=1)
    k: int = flag(8, "built-in task: answers per held-out prompt", min=2)
    label_noise: float = flag(1.0, "built-in task: the held-out labellers' noise (as train_reward.py's)", min=0)
    max_prompt_tokens: int = flag(0, "prompts longer than this keep their last tokens (0: 3/4 of the block size)",
                                  min=0)
    max_answer_tokens: int = flag(0, "answers longer than this are cut (0: 1/4 of the block size)", min=0)
    batch_size: int = flag(16, "prompts per step (each with all the pairs of its ranked answers)", min=1)
    max_iters: int = flag(300, "optimizer steps", min=1)
    lr: float = flag(1e-4, "peak learning rate", above=0)
    min_lr: float = flag(1e-5, "learning rate at the end of the cosine decay", min=0)
    warmup_iters: int = flag(20, "linear warmup steps", min=0)
    weight_decay: float = flag(0.0, "AdamW weight decay, on matrices only", min=0)
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0: off)", min=0)
    eval_interval: int = flag(100, "evaluate and checkpoint every this many steps", min=1)
    eval_prompts: int = flag(256, "built-in task: PPO's held-out prompts whose sampled answers get the gold score",
                             min=0)
    max_new_tokens: int = flag(24, "built-in task: longest sampled answer, as PPO's", min=1)
    logprob_impl: str = flag("auto", "per-token log-probs: 'auto' (Triton on CUDA), 'triton', 'torch'",
                             choices=LOGPROB_IMPLS)
    seed: int = flag(1337, "seed for the order, the held-out comparisons and PPO's eval seeds", min=0, max=2**31 - 1)
    device: str = flag("auto", "'auto' (cuda if available), 'cpu' or 'cuda'")
    attn_impl: str = flag("auto", "attention implementation", choices=("auto", "triton", "sdpa", "naive"))
    resume: bool = flag(False, "continue from out_dir/ckpt.pt at the step it saved")
    # the held-out comparisons are sampled as train_reward.py samples them
    candidates = "policy"


# -----------------------------------------------------------------------------
# The pieces worth testing


def dpo_loss(logp_w, logp_l, ref_w, ref_l, beta):
    """(-log sigmoid(reward_w - reward_l) per pair, reward_w, reward_l), with the implicit rewards
    reward = beta * (logp - logp_ref) of the preferred (w) and the other (l) answer."""
    # exercise dpo_loss: the implicit rewards, then Bradley-Terry on them (docstring); check: equal rewards: log 2
    reward_w, reward_l = beta * (logp_w - ref_w), beta * (logp_l - ref_l)
    return -F.logsigmoid(reward_w - reward_l), reward_w, reward_l
    # end exercise


def answer_logprobs(gpt, groups, pad_id, device, impl):
    """log pi(y | x) = sum over the answer's tokens of log pi(a_t | x, a_<t), for every answer of the groups
    (n_answers,). Only the answer positions go through the LM head, in the fused log-prob kernel."""
    rows = [(g["prompt"], a) for g in groups for a in g["answers"]]
    idx, attention_mask = pad_batch([p + a for p, a in rows], pad_id, device=device)  # right-padded
    with autocast(idx.device):
        hidden = gpt.hidden_states(idx, attention_mask)  # (B, T, C)
    # the token at column t is predicted from the state at column t - 1
    row = torch.tensor([b for b, (p, a) in enumerate(rows) for _ in a], device=idx.device)
    col = torch.tensor([len(p) + j for p, a in rows for j in range(len(a))], device=idx.device)
    logp, _ = linear_logprobs(hidden[row, col - 1], gpt.lm_head.weight, idx[row, col], impl=impl)  # (N,)
    return torch.zeros(len(rows), device=idx.device).index_add(0, row, logp)


# -----------------------------------------------------------------------------
# Data, the reference's log-probs, the evaluation


def load_data(cfg, tok, ref, device):
    """(train groups, held-out groups): comparisons as token ids, the held-out ones with the judge's gold
    scores on the built-in task."""
    trunc = Truncation(cfg.max_prompt_tokens, cfg.max_answer_tokens)
    train_records, eval_records = train_and_eval(load_preferences, cfg.data, cfg.eval_data)
    if tok.table and not cfg.eval_data:  # the built-in task: held-out answers of the SFT policy, ranked
        train_records = train_records + eval_records  # (the file's own tail is not held out from anything)
        eval_groups = task_comparisons([ref], tok, cfg.n_eval, "eval", cfg.seed + 3, trunc, cfg)
    else:
        eval_groups = file_comparisons(eval_records, tok, trunc, cfg.eval_data or cfg.data)
    train_groups = file_comparisons(train_records, tok, trunc, cfg.data)
    if len(train_groups) < cfg.batch_size:
        raise DataError(f"{cfg.data}: {len(train_groups)} comparisons, fewer than --batch_size {cfg.batch_size}")
    n_pairs = len(comparison_pairs(train_groups)[0])
    print(f"data: {len(train_groups)} prompts ({n_pairs} pairs) train, {len(eval_groups)} held out; {trunc.report()}")
    return train_groups, eval_groups


@torch.no_grad()
def reference_logprobs(ref, groups, tok, cfg, device):
    """logp_ref of every answer, computed once: g["ref"] (K,) for each group."""
    for start in range(0, len(groups), cfg.batch_size):
        batch = groups[start : start + cfg.batch_size]
        logp = answer_logprobs(ref, batch, tok.eos_id, device, cfg.logprob_impl).split([len(g["answers"])
                                                                                       for g in batch])
        for g, lp in zip(batch, logp):
            g["ref"] = lp


def step_loss(policy, groups, tok, cfg, device):
    """The mean DPO loss over every pair of the groups, and the pairs' implicit rewards."""
    logp = answer_logprobs(policy, groups, tok.eos_id, device, cfg.logprob_impl)
    ref = torch.cat([g["ref"] for g in groups])
    better, worse, _ = comparison_pairs(groups)
    loss, reward_w, reward_l = dpo_loss(logp[better], logp[worse], ref[better], ref[worse], cfg.beta)
    return loss.mean(), reward_w, reward_l


@torch.no_grad()
def evaluate(policy, ref, eval_groups, tok, cfg, device):
    """Held-out loss, the implicit reward's accuracy on the labels and, with gold scores, how often it orders a
    pair as the judge does (on pairs the judge does not tie); on the built-in task, the gold score of answers
    to PPO's held-out prompts, sampled with PPO's seeds (so step 0 is PPO's iteration 0), their length and
    their KL to the reference (logp - logp_ref summed over each answer, as PPO's kl)."""
    policy.eval()
    losses, r_w, r_l = [], [], []
    for start in range(0, len(eval_groups), cfg.batch_size):
        loss, rw, rl = step_loss(policy, eval_groups[start : start + cfg.batch_size], tok, cfg, device)
        losses.append(loss.item() * len(rw))
        r_w.append(rw)
        r_l.append(rl)
    r_w, r_l = torch.cat(r_w).cpu(), torch.cat(r_l).cpu()
    metrics = {"eval_loss": sum(losses) / len(r_w), "eval_accuracy": pair_accuracy(r_w, r_l).mean().item(),
               "eval_margin": (r_w - r_l).mean().item()}
    if all(g.get("scores") for g in eval_groups):
        _, _, gold_gap = comparison_pairs(eval_groups)  # the judge's score of the preferred minus the other's
        decided = gold_gap != 0
        sign = torch.where(gold_gap > 0, 1.0, -1.0)
        metrics["gold_agreement"] = pair_accuracy(sign * r_w, sign * r_l)[decided].mean().item()
    if tok.table and cfg.eval_prompts:
        prompts = task.make_prompts(cfg.eval_prompts, "eval", cfg.seed + 6)  # PPO's held-out prompts and seeds
        ids = [encode_prompt(tok, p, Truncation(cfg.max_prompt_tokens, cfg.max_new_tokens)) for p in prompts]
        answers = sample_answers(policy, ids, cfg.max_new_tokens, tok.eos_id, 1.0, seed=cfg.seed + 7, batch_size=128)
        metrics["eval_gold"] = sum(task.gold_score(p, tok.decode_answer(a)) for p, a in zip(prompts, answers)) / len(
            prompts)
        groups = [{"prompt": p, "answers": [a]} for p, a in zip(ids, answers)]
        kl = [answer_logprobs(policy, groups[i : i + 128], tok.eos_id, device, cfg.logprob_impl)
              - answer_logprobs(ref, groups[i : i + 128], tok.eos_id, device, cfg.logprob_impl)
              for i in range(0, len(groups), 128)]
        metrics["eval_kl"] = torch.cat(kl).mean().item()
        metrics["eval_answer_length"] = sum(map(len, answers)) / len(answers)
    policy.train()
    return metrics


def resume(ckpt_path, policy, optimizer):
    """The policy and the optimizer of a stopped run (the reference is --sft's, as always); its step."""
    ckpt = load_checkpoint(ckpt_path, "sft")
    policy.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    print(f"resuming {ckpt_path} at step {ckpt['step']}")
    return ckpt["step"]


# -----------------------------------------------------------------------------
# The training run


def main(cfg):
    check_flags(cfg)
    check_out_dir(cfg.out_dir)
    device = pick_device(cfg.device, cfg.attn_impl)
    torch.manual_seed(cfg.seed)
    ckpt_path = f"{cfg.out_dir}/ckpt.pt"

    # ---- 1. the policy and the frozen reference: both the SFT model ----
    sft_ckpt = load_checkpoint(cfg.sft, ("sft", "ppo"))
    tok = Tokenizer.from_state(sft_ckpt["tokenizer"])
    policy = policy_from_checkpoint(sft_ckpt, cfg.attn_impl).to(device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    cfg = fit_lengths(cfg, policy.config.block_size)
    optimizer = adamw(policy, cfg.lr, cfg.weight_decay)
    start_iter = resume(ckpt_path, policy, optimizer) if cfg.resume else 0

    # ---- 2. comparisons, and the reference's log-probs of every answer, once ----
    train_groups, eval_groups = load_data(cfg, tok, ref, device)
    # the log's clock (wall_s) starts here, as PPO's starts once its models are loaded: it counts the reference's
    # log-probs, a cost of DPO's, and not the sampling of the held-out comparisons, which only evaluate
    log = MetricsLog(f"{cfg.out_dir}/metrics.jsonl", resume_step=start_iter if cfg.resume else None)
    for groups in (train_groups, eval_groups):  # batched as the steps and the evaluation batch them
        reference_logprobs(ref, groups, tok, cfg, device)

    # ---- 3. train: the Bradley-Terry loss on the implicit rewards ----
    policy.train()
    if start_iter == 0:
        metrics = evaluate(policy, ref, eval_groups, tok, cfg, device)
        log.write({"step": 0, **metrics})
        print("step 0: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    progress, t0 = Progress("dpo", cfg.max_iters, start_iter), time.time()
    for it in range(start_iter, cfg.max_iters):
        lr = warmup_cosine(it, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)
        set_lr(optimizer, lr)
        groups = [train_groups[i] for i in batch_indices(it, len(train_groups), cfg.batch_size, cfg.seed)]
        loss, reward_w, reward_l = step_loss(policy, groups, tok, cfg, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # ---- 4. log every 10 steps; evaluate and checkpoint every eval_interval ----
        step = it + 1
        if step % 10 == 0 or step == cfg.max_iters:
            record = {"step": step, "loss": loss.item(), "accuracy": pair_accuracy(reward_w, reward_l).mean().item(),
                      "margin": (reward_w - reward_l).mean().item(), "lr": lr,
                      "steps_per_s": (step - start_iter) / (time.time() - t0)}
            check_finite(record["loss"], f"the DPO loss at step {step}", "lower --lr and start again")
            log.write(record)
            progress.update(step, loss=record["loss"], acc=record["accuracy"])
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            metrics = evaluate(policy, ref, eval_groups, tok, cfg, device)
            log.write({"step": step, **metrics})
            save_checkpoint(ckpt_path, policy, "sft", step, asdict(cfg), tok.state(), optimizer,
                            extra={"metrics": metrics, "sft": cfg.sft, "method": "dpo"})
            progress.close()
            print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f"; saved {ckpt_path}")
    progress.close()
    return policy, ref


if __name__ == "__main__":
    run(lambda: main(parse_args(Config)))
