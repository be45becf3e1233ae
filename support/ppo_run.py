"""
What a PPO run needs beside PPO itself (train_ppo.py): its three models and its prompts loaded, a stopped
run resumed, the held-out evaluation, and the logs. Each function takes train_ppo.py's flags as cfg.
"""

import torch

from model import generate
from support import distributed, task
from support.checkpoint import load_checkpoint, model_from_checkpoint, policy_from_checkpoint
from support.data import DataError, Tokenizer, Truncation, decode_answers, encode_prompt, load_prompts
from support.sampling import rows_per_call
from support.training import autocast, check_finite


def load_checkpoints(cfg, device):
    """(the SFT policy, the policy to start from, the frozen reward model on the device, the tokenizer), each
    checked against the SFT checkpoint: the same tokenizer, and for the starting policy the same shape."""
    sft_ckpt = load_checkpoint(cfg.sft, ("sft", "ppo"))
    tok = Tokenizer.from_state(sft_ckpt["tokenizer"])
    sft_policy = policy_from_checkpoint(sft_ckpt, cfg.attn_impl)
    start_policy = sft_policy
    if cfg.policy:
        policy_ckpt = load_checkpoint(cfg.policy, ("sft", "ppo"))
        start_policy = policy_from_checkpoint(policy_ckpt, cfg.attn_impl)
        if policy_ckpt["tokenizer"] != sft_ckpt["tokenizer"] or start_policy.config != sft_policy.config:
            raise DataError(f"{cfg.policy} is not a model of the same shape and tokenizer as {cfg.sft}; pass a policy "
                            "trained from it")
    if cfg.reward == "gold":  # a verifiable reward: the task's judge itself, nothing learned to game
        return sft_policy, start_policy, GoldJudge(tok), tok
    reward_ckpt = load_checkpoint(cfg.reward, "reward")
    if reward_ckpt["tokenizer"] != sft_ckpt["tokenizer"]:
        raise DataError(f"{cfg.reward} was trained with another tokenizer than {cfg.sft}; train the reward model "
                        "from this SFT model (train_reward.py --sft)")
    reward_model = model_from_checkpoint(reward_ckpt, cfg.attn_impl).to(device).eval().requires_grad_(False)
    return sft_policy, start_policy, reward_model, tok


class GoldJudge:
    """The built-in task's gold judge where a reward model would be (train_ppo.py --reward gold): called as the
    reward model is, on a batch of prompt + answer token ids, it returns each answer's gold score (B,)."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, tokens, attention_mask):
        scores = []
        for ids, mask in zip(tokens.tolist(), attention_mask.tolist()):
            text = self.tok.decode([t for t, real in zip(ids, mask) if real and t != self.tok.eos_id])
            cut = text.index("\n\nAssistant:") + len("\n\nAssistant:")  # the task's prompts end there
            scores.append(task.gold_score(text[:cut], text[cut:]))
        return torch.tensor(scores, device=tokens.device)


def prompt_sets(cfg, tok):
    """(train prompts, their token ids, held-out prompts, their token ids), tokenized once."""
    if cfg.data == "default":
        train_prompts = task.make_prompts(cfg.n_prompts, "train", cfg.seed + 5)
        eval_prompts = task.make_prompts(cfg.eval_prompts, "eval", cfg.seed + 6)
    else:
        train_prompts = load_prompts(cfg.data)
        n_eval = min(cfg.eval_prompts, max(1, len(train_prompts) // 10))
        train_prompts, eval_prompts = train_prompts[:-n_eval], train_prompts[-n_eval:]
    if len(train_prompts) < cfg.prompts_per_iter:
        raise DataError(f"{cfg.data}: {len(train_prompts)} prompts, fewer than --prompts_per_iter "
                        f"{cfg.prompts_per_iter}")
    trunc = Truncation(cfg.max_prompt_tokens, cfg.max_new_tokens)
    train_ids = [encode_prompt(tok, p, trunc, cfg.data) for p in train_prompts]
    eval_ids = [encode_prompt(tok, p, trunc, cfg.data) for p in eval_prompts]
    print(f"prompts: {len(train_prompts)} train, {len(eval_prompts)} held-out, from {cfg.data}; {trunc.report()}")
    return train_prompts, train_ids, eval_prompts, eval_ids


@torch.no_grad()
def evaluate(model, reward_model, tok, prompts, prompt_ids, cfg, device, step):
    """The held-out eval: answers to the same prompts with the same sampling seed every time (the curve
    moves only if the policy does), their mean reward-model score and, on the built-in task, gold score.
    Under torchrun the ranks share out the calls, each seeded by its first row: the same answers as one process."""
    calls = []
    # 128 prompts per call, fewer where their KV cache would not fit (GPT-2 with long prompts on a GPU)
    rows = distributed.smallest(rows_per_call(model.policy, max(map(len, prompt_ids)) + cfg.max_new_tokens, limit=128))
    for start in distributed.share(range(0, len(prompts), rows)):
        with autocast(device):  # sampled with the numerics that score it (bf16 on a GPU)
            tokens, attention_mask, answer_mask = generate(model.policy, prompt_ids[start : start + rows],
                                                           cfg.max_new_tokens, tok.eos_id, cfg.temperature,
                                                           seed=cfg.seed + 7 + start)
            calls.append((reward_model(tokens, attention_mask).tolist(), decode_answers(tok, tokens, answer_mask)))
    calls = distributed.gather(calls)
    scores, answers = [x for s, _ in calls for x in s], [a for _, answers in calls for a in answers]
    metrics = {"step": step, "eval_reward": sum(scores) / len(scores)}
    if cfg.data == "default":  # no gold judge for outside data
        metrics["eval_gold"] = sum(task.gold_score(p, a) for p, a in zip(prompts, answers)) / len(answers)
    return metrics


def resume(ckpt_path, model, optimizer, score_std):
    """Everything a stopped run needs to continue as if it had never stopped: the weights, the optimizer and
    the running score scale from its checkpoint. Returns (the iteration to start at, the KL coefficient)."""
    ckpt = load_checkpoint(ckpt_path, "ppo")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    vars(score_std).update(ckpt["extra"]["score_std"])
    print(f"resuming {ckpt_path} at iteration {ckpt['step']}")
    return ckpt["step"], ckpt["extra"]["kl_coef"]


def log_iteration(log, samples_log, progress, record, prompts, answers, scores, cfg):
    """The iteration's metrics (with the gold score of its answers on the built-in task) into metrics.jsonl
    and the progress bar; every sample_interval, the first answer to each of four prompts into samples.jsonl."""
    gold = [task.gold_score(p, a) for p, a in zip(prompts, answers)] if cfg.data == "default" else None
    if gold is not None:  # under torchrun, the mean of the ranks' means (each holds as many answers)
        record["gold"] = distributed.mean_over_ranks(sum(gold) / len(gold))
    check_finite(record["policy_loss"] + record.get("value_loss", 0.0), f"the PPO loss at iteration {record['step']}",
                 "lower --lr and start again")
    log.write(record)
    progress.update(record["step"], reward=record["reward"], gold=record.get("gold", float("nan")), kl=record["kl"],
                    clip=record["clip_frac"])
    if record["step"] % cfg.sample_interval == 0 or record["step"] == cfg.iterations:
        for i in range(0, min(len(answers), 4 * cfg.samples_per_prompt), cfg.samples_per_prompt):
            samples_log.write({"step": record["step"], "prompt": prompts[i], "answer": answers[i],
                               "reward": scores[i], "gold": gold[i] if gold is not None else None})
