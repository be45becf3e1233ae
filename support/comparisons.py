"""
What the reward model trains on: comparisons, each a prompt with two or more answers ranked best first, as
token ids ({"prompt", "answers", "scores"}, and on the built-in task "sources" and "gold" too). On the
built-in task the simulated labellers rank K samples of the policy (as InstructGPT's labellers ranked the
SFT model's) or of the task's demonstrator; otherwise they come from a preference file (support/data.py
reads the formats). train_reward.py calls load_comparisons; the rounds after it read comparisons.jsonl.
"""

import dataclasses
import json
import random
import time
from pathlib import Path

from support import task
from support.distributed import WORLD, is_main
from support.data import DataError, Truncation, encode_answer, encode_prompt, load_preferences, train_and_eval
from support.sampling import sample_answers
from support.training import Progress


def rank_by_labeller(prompt_text, prompt_ids, answers, sources, tok, noise, rng):
    """A simulated labeller's ranking of a prompt's answers (token ids, duplicates dropped), each from
    the policy numbered in `sources`: the group {prompt, answers best-first, sources, scores, gold}, or
    None if fewer than two distinct answers are left. The scores are the judge's gold scores in the
    labeller's order (they drive --margin_coef), the gold field the same, kept for the eval's agreement
    with the judge."""
    distinct = {}
    for answer, source in zip(answers, sources):
        distinct.setdefault(tuple(answer), source)
    answers, sources = [list(a) for a in distinct], list(distinct.values())
    if len(answers) < 2:
        return None
    gold = [task.gold_score(prompt_text, tok.decode_answer(a)) for a in answers]
    order = task.noisy_ranking(gold, noise, rng)
    ranked_gold = [gold[i] for i in order]
    return {"prompt": prompt_ids, "answers": [answers[i] for i in order], "sources": [sources[i] for i in order],
            "scores": ranked_gold, "gold": ranked_gold}


def task_comparisons(policies, tok, n_prompts, split, seed, trunc, cfg):
    """Ranked answers to n_prompts prompts of the built-in task: K samples per prompt, shared out among
    the policies (or K answers of the task's demonstrator), ranked by the simulated labellers."""
    prompts = task.make_prompts(n_prompts, split, seed)
    prompt_ids = [encode_prompt(tok, p, trunc) for p in prompts]
    candidates = [[] for _ in prompts]
    sources = [[] for _ in prompts]
    if cfg.candidates == "policy":
        progress, done = Progress(f"sampling {split} answers", len(prompts) * cfg.k), 0
        for number, policy in enumerate(policies):
            k = cfg.k // len(policies) + (number < cfg.k % len(policies))  # this policy's share of the K answers
            # temperature 1: the policy's own distribution, the one PPO starts sampling from
            samples = sample_answers(policy, [p for p in prompt_ids for _ in range(k)], cfg.max_answer_tokens,
                                     tok.eos_id, temperature=1.0, seed=seed + 1000 * number,
                                     on_batch=lambda n: progress.update(done + n))
            done += len(samples)
            trunc.answers_seen += len(samples)
            for i in range(len(prompts)):
                candidates[i] += samples[i * k : (i + 1) * k]
                sources[i] += [number] * k
        progress.close()
    else:
        rng = random.Random(f"demonstrator:{split}:{seed}")
        candidates = [[encode_answer(tok, task.sample_answer(p, rng), trunc) for _ in range(cfg.k)] for p in prompts]
        sources = [[0] * cfg.k for _ in prompts]
    rng = random.Random(f"labeller:{split}:{seed}")
    groups = [rank_by_labeller(p, ids, answers, src, tok, cfg.label_noise, rng)
              for p, ids, answers, src in zip(prompts, prompt_ids, candidates, sources)]
    return [g for g in groups if g is not None]


def file_comparisons(records, tok, trunc, where="text"):
    """Preference records (data.load_preferences) as groups of token ids, tokenized once. The answers
    may be a model's, with words it made up of its tokens: they are spelled with them (Tokenizer.encode)."""
    return [{"prompt": encode_prompt(tok, r["prompt"], trunc, where),
             "answers": [encode_answer(tok, a, trunc, where, spell=True) for a in r["answers"]],
             "scores": r.get("scores")}
            for r in records]


def save_comparisons(path, groups, tok):
    """The ranked comparisons as text, in the rankings format load_preferences reads: the data of this
    round, for the reward models of the rounds after it (--extra_data), and for reading. Rank 0 writes it."""
    if not is_main():
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for g in groups:
            f.write(json.dumps({"prompt": tok.decode(g["prompt"]),
                                "answers": [tok.decode_answer(a) for a in g["answers"]], "scores": g["scores"]}) + "\n")


def load_comparisons(cfg, tok, policies, extra_records):
    """(train groups, eval groups, truncation) for train_reward.py's flags cfg: the built-in task's answers ranked
    by the simulated labellers (saved as comparisons.jsonl), or the comparisons of --data; then --extra_data's."""
    t0 = time.time()
    trunc = Truncation(cfg.max_prompt_tokens, cfg.max_answer_tokens)
    if cfg.data == "default":
        train_groups = task_comparisons(policies, tok, cfg.n_train, "train", cfg.seed + 2, trunc, cfg)
        eval_groups = task_comparisons(policies, tok, cfg.n_eval, "eval", cfg.seed + 3, trunc, cfg)
        save_comparisons(f"{cfg.out_dir}/comparisons.jsonl", train_groups, tok)
        agree = task.label_agreement([{"chosen_score": g["gold"][i], "rejected_score": g["gold"][j]}
                                      for g in eval_groups for i in range(len(g["gold"]))
                                      for j in range(i + 1, len(g["gold"]))])  # every pair, best-first
        whose = (cfg.policy.replace(",", ", ") or cfg.sft) if cfg.candidates == "policy" else "the demonstrator"
        print(f"answers of {whose} ranked by simulated labellers (noise {cfg.label_noise}) in {time.time() - t0:.0f}s, "
              f"saved in {cfg.out_dir}/comparisons.jsonl; on held-out pairs the labels agree with the gold judge "
              f"{agree:.1%} of the time")
    else:
        train_records, eval_records = train_and_eval(load_preferences, cfg.data, cfg.eval_data)
        train_groups = file_comparisons(train_records, tok, trunc, cfg.data)
        eval_groups = file_comparisons(eval_records, tok, trunc, cfg.eval_data or cfg.data)
    for path, records in extra_records.items():
        extra = file_comparisons(records, tok, trunc, path)
        print(f"{path}: {len(extra)} more comparisons to train on")
        train_groups += extra
    if tok.spelled:
        print(f"{len(tok.spelled)} answer words outside the task's vocabulary (e.g. {tok.spelled[0]!r}) were spelled "
              "with its tokens")
    if cfg.margin_coef > 0 and any(not g.get("scores") for g in train_groups):
        raise DataError(f"{cfg.data}: --margin_coef needs a score for every answer (chosen_score and rejected_score)")
    if not train_groups:  # a file of one comparison: the eval holds it out
        raise DataError(f"{cfg.data}: no comparison to train on ({len(eval_groups)} held out for the eval); rank more "
                        "answers (ties and skips teach no order), or pass --eval_data FILE")
    n_pairs = sum(len(g["answers"]) * (len(g["answers"]) - 1) // 2 for g in train_groups)
    print(f"data: {len(train_groups)} prompts ({n_pairs} pairs) train, {len(eval_groups)} eval, from {cfg.data}; "
          f"{trunc.report()}")
    return train_groups, eval_groups, trunc


def fit_batch_size(cfg, train_groups):
    """A copy of cfg whose batch is at most the comparisons there are: a short labelling session
    (tools/label.py) gives a few, and each step then takes them all, said in one line."""
    if len(train_groups) >= cfg.batch_size:
        return cfg
    batch = len(train_groups) - len(train_groups) % WORLD  # under torchrun, a share for every rank
    if batch == 0:
        raise DataError(f"{cfg.data}: {len(train_groups)} comparisons to train on, fewer than the {WORLD} processes; "
                        "rank more answers, or run one process")
    print(f"{cfg.data}: {len(train_groups)} comparisons to train on, fewer than --batch_size {cfg.batch_size}: "
          f"each step takes {'all ' if batch == len(train_groups) else ''}{batch}")
    return dataclasses.replace(cfg, batch_size=batch)
