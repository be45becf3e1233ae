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

What gets compared matters. InstructGPT's labellers ranked the SFT model's own samples: the reward
model then learns to judge the kind of answers PPO will show it. On the built-in task we do the same:
the SFT policy answers each training prompt K times and the simulated labellers rank the answers.

The reward only has meaning up to a constant (Bradley-Terry sees differences), so after training we
pick the constant: the SFT policy's own answers to held-out prompts score 0 on average. PPO then starts
from rewards near 0, which keeps its value targets and its KL trade-off on a sane scale.

A later RLHF round (pipeline.sh's ROUNDS) runs this script again with three more inputs, the last part
of this file: the policies whose answers are ranked, earlier rounds' comparisons, and the reward model
to continue from.

    python train_reward.py                          # built-in task, from out/sft/ckpt.pt, CPU
    python train_reward.py --data ../shared/data/hh_rlhf_sample.jsonl --sft out/sft/ckpt.pt
"""

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from model import RewardModel
from support import distributed, memory, task
from support.checkpoint import load_checkpoint, model_from_checkpoint, policy_from_checkpoint, save_checkpoint
from support.comparisons import fit_batch_size, load_comparisons
from support.data import DataError, Tokenizer, encode_prompt, load_preferences, pad_batch
from support.sampling import sample_answers
from support.speedups import answer_rewards
from support.training import (
    MetricsLog, Progress, adamw, batch_indices, check, check_finite, check_flags, check_out_dir, fit_lengths, flag,
    parse_args, pick_device, run, set_lr, warmup_cosine,
)


@dataclass
class Config:
    """Reward model: Bradley-Terry loss on ranked answers to the same prompt, starting from the SFT model."""

    out_dir: str = flag("out/reward", "folder for ckpt.pt and metrics.jsonl")
    sft: str = flag("out/sft/ckpt.pt", "the SFT checkpoint to start from (train_sft.py writes it)")
    data: str = flag("default", "'default' for the built-in task's simulated labellers, or a JSONL of preferences "
                     "(generic, rankings, HH-RLHF or TL;DR)")
    eval_data: str = flag("", "held-out JSONL (default: the task's eval split, or the last 10%% of --data)")
    candidates: str = flag("policy", "built-in task: whose answers the labellers rank, 'policy' (samples of the --sft "
                           "model, or of --policy; as InstructGPT) or 'demonstrator' (the task's own mixed-quality "
                           "answers)", choices=("policy", "demonstrator"))
    # 6000 prompts x 8 answers for 1000 steps: what it takes to agree with the gold judge on 85% of held-out
    # pairs in every seed (bench/RESULTS.md, "What paid for a bigger reward model")
    n_train: int = flag(6000, "built-in task: prompts whose answers are ranked for training", min=1)
    n_eval: int = flag(256, "built-in task: held-out prompts whose answers are ranked for the eval", min=1)
    k: int = flag(8, "built-in task: answers per prompt; all K*(K-1)/2 pairs of a ranking are used", min=2)
    label_noise: float = flag(1.0, "labeller noise: P(a over b) = sigmoid((gold_a - gold_b) / noise); 0: always the "
                              "better one", min=0)
    margin_coef: float = flag(0.0, "weight of the score margin (needs a score per answer); 0 = plain Bradley-Terry",
                              min=0)
    max_prompt_tokens: int = flag(0, "prompts longer than this keep their last tokens (0: 3/4 of the block size)",
                                  min=0)
    max_answer_tokens: int = flag(0, "answers longer than this are cut (0: 1/4 of the block size)", min=0)
    batch_size: int = flag(16, "prompts per step (each with its 2 or K answers)", min=1)
    length_buckets: int = flag(4, "run each batch's answers sorted by length in this many slices (less padding; "
                               "1: one padded batch, which a GPU may prefer)", min=1)
    max_iters: int = flag(1000, "optimizer steps", min=1)
    # half of SFT's rate: at SFT's, the order of the batches alone decided which facts the head learned from these
    # noisy labels (bench/RESULTS.md, "Batch order, and the reward model's learning rate")
    lr: float = flag(1e-3, "peak learning rate (use ~1e-5 for GPT-2 weights)", above=0)
    min_lr: float = flag(1e-4, "learning rate at the end of the cosine decay", min=0)
    warmup_iters: int = flag(20, "linear warmup steps", min=0)
    weight_decay: float = flag(0.1, "AdamW weight decay, on matrices only", min=0)
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0: off)", min=0)
    eval_interval: int = flag(100, "evaluate and checkpoint every this many steps", min=1)
    seed: int = flag(1337, "seed for data, order and sampling", min=0, max=2**31 - 1)
    device: str = flag("auto", "'auto' (cuda if available), 'cpu' or 'cuda'")
    attn_impl: str = flag("auto", "attention implementation", choices=("auto", "triton", "sdpa", "naive"))
    resume: bool = flag(False, "continue from out_dir/ckpt.pt at the step it saved")
    # a later RLHF round (the last part of this file)
    policy: str = flag("", "built-in task: the sft or ppo checkpoint(s) whose samples are ranked, comma-separated, "
                       "sharing each prompt's K answers (default: --sft); the first one's answers score 0 on average")
    extra_data: str = flag("", "more comparisons to train on, comma-separated JSONL files: earlier rounds' "
                           "comparisons.jsonl, tools/label.py's labels")
    init: str = flag("", "a reward checkpoint to start from instead of the SFT weights (a later round: the last "
                     "round's reward model)")


def check_config(cfg):
    """Every flag checked before any work starts: each within its limits, then the rules that tie two."""
    check_flags(cfg)
    distributed.check_splits(cfg, "batch_size")  # under torchrun: each rank takes its share of every batch
    check(not cfg.policy or (cfg.data == "default" and cfg.candidates == "policy"),
          "--policy only fits --data default with --candidates policy (the built-in task's labellers rank its answers)")
    check(all(policy_paths(cfg)) and all(extra_paths(cfg)),
          "--policy and --extra_data take paths separated by commas, none of them empty")
    check(len(policy_paths(cfg)) <= cfg.k, f"--k {cfg.k} gives fewer answers per prompt than there are --policy "
          "checkpoints")
    check_out_dir(cfg.out_dir)


# -----------------------------------------------------------------------------
# The pieces worth testing


def bradley_terry_loss(r_chosen, r_rejected, margin=None):
    """-log sigmoid(r_chosen - r_rejected [- margin]), one value per pair. logsigmoid, not
    log(sigmoid(.)): for a badly wrong pair sigmoid underflows to 0 and the log to -inf."""
    # exercise bt_loss: -log P(chosen beats rejected), one per pair (docstring); check: finite when the gap is -2e4
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)
    # end exercise


def comparison_pairs(groups):
    """Every (better, worse) pair of answer indices inside each group, with the score gap if known.

    A group's answers are ranked best-first and numbered in the order they are stacked into the
    batch. K answers give K*(K-1)/2 pairs."""
    better, worse, gap = [], [], []
    offset = 0
    for g in groups:
        for i in range(len(g["answers"])):
            for j in range(i + 1, len(g["answers"])):
                better.append(offset + i)
                worse.append(offset + j)
                gap.append(g["scores"][i] - g["scores"][j] if g.get("scores") else 0.0)
        offset += len(g["answers"])
    return torch.tensor(better), torch.tensor(worse), torch.tensor(gap)


def gold_of_pairs(groups):
    """The gold scores of the two answers of every pair of comparison_pairs(groups): (better, worse)."""
    better, worse, _ = comparison_pairs(groups)
    gold = torch.tensor([score for g in groups for score in g["gold"]])
    return gold[better], gold[worse]


def pair_accuracy(r_chosen, r_rejected):
    """1 where the chosen answer gets the higher reward, 0 where the lower, 1/2 for a tie (as a coin
    flip would do: the untrained, zero-initialised head ties every pair)."""
    return (r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()


def reward_batch(groups, pad_id, device):
    """All answers of all groups as one right-padded batch of prompt + answer token ids, in the order
    comparison_pairs counts them: model(*reward_batch(groups)) is r(x, y) for every answer."""
    return pad_batch([g["prompt"] + answer for g in groups for answer in g["answers"]], pad_id, device=device)


def pair_loss(model, groups, pad_id, margin_coef, device, length_buckets=1):
    """Mean Bradley-Terry loss over every pair of the batch, and the rewards of each pair's two answers."""
    # r(x, y) of every answer: model(*reward_batch(groups)), with each prompt run once (support/speedups.py)
    rewards = answer_rewards(model, groups, pad_id, device, length_buckets)  # (n_answers,)
    better, worse, gap = comparison_pairs(groups)
    margin = margin_coef * gap.to(device) if margin_coef > 0 else None
    loss = bradley_terry_loss(rewards[better], rewards[worse], margin).mean()
    return loss, rewards[better], rewards[worse]


@torch.no_grad()
def evaluate(model, eval_groups, pad_id, cfg, device):
    """Held-out loss, pairwise accuracy on the labels, margins and reward statistics; where the gold
    judge is known (the built-in task), also how often the reward model orders a pair as the judge
    does, over the pairs the judge does not call a tie (the labels themselves are noisy)."""
    model.eval()
    losses, r_c, r_r = [], [], []
    for start in range(0, len(eval_groups), cfg.batch_size):
        loss, rc, rr = pair_loss(model, eval_groups[start : start + cfg.batch_size], pad_id, cfg.margin_coef, device,
                                 cfg.length_buckets)
        losses.append(loss.item() * len(rc))
        r_c.append(rc)
        r_r.append(rr)
    r_c, r_r = torch.cat(r_c).cpu(), torch.cat(r_r).cpu()
    metrics = {
        "eval_loss": sum(losses) / len(r_c),
        "eval_accuracy": pair_accuracy(r_c, r_r).mean().item(),
        "eval_margin": (r_c - r_r).mean().item(),
        "reward_chosen_mean": r_c.mean().item(), "reward_chosen_std": r_c.std(correction=0).item(),
        "reward_rejected_mean": r_r.mean().item(), "reward_rejected_std": r_r.std(correction=0).item(),
    }
    if all(g.get("gold") for g in eval_groups):
        gold_c, gold_r = gold_of_pairs(eval_groups)
        decided = gold_c != gold_r  # gold ties say nothing about order
        sign = torch.where(gold_c > gold_r, 1.0, -1.0)  # orient each pair so the gold judge prefers the first
        metrics["gold_agreement"] = pair_accuracy(sign * r_c, sign * r_r)[decided].mean().item()
    model.train()
    return metrics


@torch.no_grad()
def raw_rewards(model, groups, pad_id, batch_size, device, length_buckets=1):
    """The reward of every answer of the groups before the offset is subtracted."""
    was_training = model.training
    model.eval()
    rewards = []
    for start in range(0, len(groups), batch_size):
        rewards.append(answer_rewards(model, groups[start : start + batch_size], pad_id, device, length_buckets)
                       + model.offset)
    model.train(was_training)
    return torch.cat(rewards)


# -----------------------------------------------------------------------------
# The offset and the training run


def own_answers(cfg, policy, eval_groups, tok, trunc):
    """Held-out answers of the policy the offset is chosen for, as groups: its share of the eval comparisons
    when the labellers ranked its samples, else one fresh sample per held-out prompt."""
    if cfg.data == "default" and cfg.candidates == "policy":
        own = [{"prompt": g["prompt"], "answers": [a for a, s in zip(g["answers"], g["sources"]) if s == 0]}
               for g in eval_groups]
        return [g for g in own if g["answers"]]
    prompts = task.make_prompts(cfg.n_eval, "eval", cfg.seed + 4) if cfg.data == "default" else None
    prompt_ids = [encode_prompt(tok, p, trunc) for p in prompts] if prompts else [g["prompt"] for g in eval_groups]
    answers = sample_answers(policy, prompt_ids, cfg.max_answer_tokens, tok.eos_id, temperature=1.0, seed=cfg.seed)
    return [{"prompt": p, "answers": [a]} for p, a in zip(prompt_ids, answers)]


def main(cfg):
    check_config(cfg)
    device = distributed.setup(pick_device(cfg.device, cfg.attn_impl))  # torchrun: this rank's device
    torch.manual_seed(cfg.seed)
    ckpt_path = f"{cfg.out_dir}/ckpt.pt"

    # ---- 1. the SFT model: the reward model's starting point, and the policy whose answers get ranked ----
    sft_ckpt = load_checkpoint(cfg.sft, ("sft", "ppo"))
    tok = Tokenizer.from_state(sft_ckpt["tokenizer"])
    sft = policy_from_checkpoint(sft_ckpt, cfg.attn_impl).to(device).eval()
    cfg = fit_lengths(cfg, sft.config.block_size)
    memory.announce("reward", sft.config, cfg, device)  # on a GPU: will a step fit, and what to lower if not
    policies, init_ckpt, extra_records = later_round_inputs(cfg, sft_ckpt, sft, device)

    # ---- 2. comparisons: {prompt ids, answer ids best-first, scores} per prompt, tokenized once ----
    train_groups, eval_groups, trunc = load_comparisons(cfg, tok, policies, extra_records)
    cfg = fit_batch_size(cfg, train_groups)  # a short labelling session: each step takes every comparison

    # ---- 3. the reward model: the SFT transformer, its vocabulary head replaced by a scalar head ----
    resume = load_checkpoint(ckpt_path, "reward") if cfg.resume else None
    if resume:
        model = model_from_checkpoint(resume, cfg.attn_impl)
        print(f"resuming {ckpt_path} at step {resume['step']}")
    elif init_ckpt:
        model = model_from_checkpoint(init_ckpt, cfg.attn_impl)
        model.offset.zero_()  # chosen again at the end, for this round's policy
    else:
        model = RewardModel(sft.config)
        model.transformer.load_state_dict(sft.transformer.state_dict())
    model.to(device).train()
    optimizer = adamw(model, cfg.lr, cfg.weight_decay)
    start_iter = resume["step"] if resume else 0
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
    log = MetricsLog(f"{cfg.out_dir}/metrics.jsonl", resume_step=start_iter if resume else None)
    if start_iter == 0:
        metrics = evaluate(model, eval_groups, tok.eos_id, cfg, device)
        log.write({"step": 0, **metrics})
        print("step 0: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    # ---- 4. train: the Bradley-Terry loss on every pair of every ranking ----
    progress = Progress("reward", cfg.max_iters, start_iter)
    t0, pairs_seen = time.time(), 0
    sums = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
    for it in range(start_iter, cfg.max_iters):
        lr = warmup_cosine(it, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)
        set_lr(optimizer, lr)
        groups = [train_groups[i] for i in batch_indices(it, len(train_groups), cfg.batch_size, cfg.seed)]
        loss, r_chosen, r_rejected = pair_loss(model, distributed.share(groups), tok.eos_id, cfg.margin_coef, device,
                                               cfg.length_buckets)
        # a mean over the batch's pairs, whichever rank holds them: this rank's mean, weighted by its share
        n_pairs = len(comparison_pairs(groups)[0])
        share = len(r_chosen) / n_pairs
        (loss * share).backward()
        distributed.sync_gradients(model)  # torchrun: every rank's gradient is now the batch's whole gradient
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pairs_seen += n_pairs
        sums["loss"] += loss.detach() * share
        sums["accuracy"] += pair_accuracy(r_chosen, r_rejected).mean().detach() * share
        sums["margin"] += (r_chosen - r_rejected).mean().detach() * share

        # ---- 5. log every 10 steps; evaluate and checkpoint every eval_interval ----
        step = it + 1
        if step % 10 == 0 or step == cfg.max_iters:
            n = 10 if step % 10 == 0 else step % 10
            totals = distributed.sum_over_ranks(torch.stack(list(sums.values())))  # the ranks' parts added up
            means = {k: float(v) / n for k, v in zip(sums, totals)}  # a sync point: the means of the last steps
            sums = {k: 0.0 for k in sums}
            check_finite(means["loss"], f"the training loss at step {step}", "lower --lr and start again")
            record = {"step": step, **means, "lr": lr, "pairs_per_s": pairs_seen / (time.time() - t0)}
            log.write(record)
            progress.update(step, loss=means["loss"], acc=means["accuracy"], pairs_s=f"{record['pairs_per_s']:.0f}")
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            metrics = evaluate(model, eval_groups, tok.eos_id, cfg, device)
            log.write({"step": step, **metrics})
            save_checkpoint(ckpt_path, model, "reward", step, asdict(cfg), tok.state(), optimizer,
                            extra={"metrics": metrics, "sft": cfg.sft})
            progress.close()
            print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f"; saved {ckpt_path}")
    progress.close()

    # ---- 6. the offset: the (first) policy's own held-out answers score 0 on average ----
    own = own_answers(cfg, policies[0], eval_groups, tok, trunc)
    model.offset.fill_(raw_rewards(model, own, tok.eos_id, cfg.batch_size, device, cfg.length_buckets).mean().item())
    metrics = evaluate(model, eval_groups, tok.eos_id, cfg, device)
    metrics["offset"] = model.offset.item()
    if len(policies) > 1:
        metrics.update(per_policy_report(cfg, model, eval_groups, tok, device))
    log.write({"step": cfg.max_iters, **metrics})
    save_checkpoint(ckpt_path, model, "reward", cfg.max_iters, asdict(cfg), tok.state(), optimizer,
                    extra={"metrics": metrics, "sft": cfg.sft})
    print(f"reward offset {model.offset.item():.4f}: {policy_paths(cfg)[0]}'s answers now average 0; saved "
          f"{ckpt_path}")
    return model, metrics


# -----------------------------------------------------------------------------
# A later RLHF round (InstructGPT; Llama 2 ran five): the best policy so far answers new prompts, the
# labellers rank those answers, and the reward model trains again on every round's comparisons. --policy
# names the policies that answer, --extra_data the earlier rounds' comparisons.jsonl, and --init the last
# round's reward model, which this round continues on all of them, the old comparisons too, so that it
# keeps what it learned (bench/RESULTS.md, "RLHF in rounds").


def policy_paths(cfg):
    return cfg.policy.split(",") if cfg.policy else [cfg.sft]


def extra_paths(cfg):
    return cfg.extra_data.split(",") if cfg.extra_data else []


def later_round_inputs(cfg, sft_ckpt, sft, device):
    """(the policies whose answers are ranked, the reward checkpoint to start from or None, {path: records}
    of --extra_data): read before the minutes of sampling, so that a wrong path fails at once."""
    policies = []
    for path in policy_paths(cfg):
        ckpt = sft_ckpt if path == cfg.sft else load_checkpoint(path, ("sft", "ppo"))
        if ckpt["tokenizer"] != sft_ckpt["tokenizer"]:
            raise DataError(f"{path} was trained with another tokenizer than {cfg.sft}; pass policies trained from it")
        policies.append(sft if path == cfg.sft else policy_from_checkpoint(ckpt, cfg.attn_impl).to(device).eval())
    init_ckpt = load_checkpoint(cfg.init, "reward") if cfg.init and not cfg.resume else None
    if init_ckpt and init_ckpt["tokenizer"] != sft_ckpt["tokenizer"]:
        raise DataError(f"{cfg.init} was trained with another tokenizer than {cfg.sft}; pass a reward model trained "
                        "from it")
    extra_records = {path: load_preferences(path, "--extra_data") for path in extra_paths(cfg)}
    return policies, init_ckpt, extra_records


def per_policy(values, groups, n_policies):
    """The mean of one value per answer of the groups (a reward, a gold score), for each policy."""
    sources = torch.tensor([s for g in groups for s in g["sources"]])
    return [values[sources == n].mean().item() for n in range(n_policies)]


def per_policy_report(cfg, model, eval_groups, tok, device):
    """How this reward model sees each policy's held-out answers, beside the gold judge: does it still
    reward a policy that hacked an earlier reward model?"""
    rewards = raw_rewards(model, eval_groups, tok.eos_id, cfg.batch_size, device, cfg.length_buckets).cpu()
    rewards -= model.offset
    gold = torch.tensor([score for g in eval_groups for score in g["gold"]])
    paths, n = policy_paths(cfg), len(policy_paths(cfg))
    report = {"policy_reward": dict(zip(paths, per_policy(rewards, eval_groups, n))),
              "policy_gold": dict(zip(paths, per_policy(gold, eval_groups, n)))}
    for path in paths:
        print(f"{path}: held-out answers score {report['policy_reward'][path]:+.3f} by this reward model, gold "
              f"{report['policy_gold'][path]:.3f}")
    return report


if __name__ == "__main__":
    run(lambda: main(parse_args(Config)))
