"""
What the notebooks share, so that each one opens with a few lines:

    import course
    import plots

    %matplotlib inline
    OUT = course.outputs(needed=["sft", "reward"])

`outputs` finds the pipeline's run folder ($RLHF_OUT, else out/, from the repository root) and prints
where it is and what arguments made each checkpoint. On a fresh clone, with no run yet, it trains a
tiny stand-in (seconds on a CPU): every cell then runs and every figure is drawn, but nothing
is learned. `table` shows a list of dicts as a table; `held_out_answers` samples and scores the answers
of several policies to PPO's held-out prompts.

The saved outputs of the committed notebooks come from a pipeline run; notebooks/README.md says how
to redo them from another run.
"""

import os
import sys
import tempfile
from dataclasses import asdict
from html import escape
from pathlib import Path

import torch
from IPython.display import HTML, display

REPO = Path(__file__).resolve().parents[1]  # the scripts' folder, whatever the notebook's working directory
sys.path.insert(0, str(REPO))
import train_dpo  # noqa: E402
import train_ppo  # noqa: E402
import train_reward  # noqa: E402
import train_sft  # noqa: E402
from support import task  # noqa: E402
from support.checkpoint import load_checkpoint, model_from_checkpoint, policy_from_checkpoint  # noqa: E402
from support.data import Tokenizer  # noqa: E402
from support.sampling import sample_answers  # noqa: E402

SCRIPTS = {"sft": train_sft, "reward": train_reward, "ppo": train_ppo}
PATH_ARGS = ("out_dir", "sft", "reward")  # where the run was written: says nothing about how it was trained
# 0 means "from the model's block size", and main() stores the length it chose: not a change by the user
AUTO_LENGTHS = ("max_prompt_tokens", "max_answer_tokens")


def shown(path):
    """A folder as the notebooks print it: relative to the repository when inside it, else only its name
    (saved outputs should not carry one machine's directories)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def tiny_run(out, stages):
    """The pipeline with very small settings, for a clone without a run: the stages asked for (and the
    ones they start from) are trained into `out`; stages already there are kept."""
    out = Path(out)
    sft, reward = out / "sft" / "ckpt.pt", out / "reward" / "ckpt.pt"
    if not sft.is_file():
        train_sft.main(train_sft.Config(out_dir=str(out / "sft"), n_train=256, n_eval=32, eval_prompts=8,
                                        batch_size=16, max_iters=20, warmup_iters=5, eval_interval=10))
    if set(stages) - {"sft"} and not reward.is_file():
        train_reward.main(train_reward.Config(out_dir=str(out / "reward"), sft=str(sft), n_train=32, n_eval=16, k=2,
                                              batch_size=8, max_iters=5, warmup_iters=2, eval_interval=5))
    for name in stages:  # ppo, and the critic-free methods of notebook 5; each with its KL term or without (_nokl)
        method = name.removesuffix("_nokl")
        if method in ("ppo", *train_ppo.ADVANTAGES) and not (out / name / "ckpt.pt").is_file():
            train_ppo.main(train_ppo.Config(out_dir=str(out / name), sft=str(sft), reward=str(reward),
                                            advantage="gae" if method == "ppo" else method,
                                            kl_coef=0.0 if name.endswith("_nokl") else 0.2,
                                            n_prompts=64, iterations=2, prompts_per_iter=8, samples_per_prompt=2,
                                            minibatch_size=8, max_new_tokens=12, eval_prompts=8, ppo_epochs=1,
                                            eval_interval=1, sample_interval=1))
    if "dpo" in stages and not (out / "dpo" / "ckpt.pt").is_file():
        train_dpo.main(train_dpo.Config(out_dir=str(out / "dpo"), sft=str(sft), data=str(out / "reward" /
                                        "comparisons.jsonl"), n_eval=8, k=2, batch_size=8, max_iters=4, warmup_iters=1,
                                        eval_interval=2, eval_prompts=8, max_new_tokens=12))


def changed_args(out, stage):
    """How out/stage/ckpt.pt was trained: its script's Config, the arguments that differ from the
    defaults (paths left out), and the steps it ran."""
    ckpt = load_checkpoint(Path(out, stage, "ckpt.pt"), tuple(SCRIPTS))
    # DPO's policy is a language model like SFT's: an "sft" checkpoint, which says it came from train_dpo.py
    script = train_dpo if ckpt["extra"].get("method") == "dpo" else SCRIPTS[ckpt["stage"]]
    defaults = asdict(script.Config())
    changed = {k: shown(v) if k == "data" and Path(v).is_file() else v for k, v in ckpt["train_args"].items()
               if k not in PATH_ARGS and v != defaults.get(k) and not (k in AUTO_LENGTHS and defaults.get(k) == 0)}
    return (f"{script.__name__}.Config() defaults" + (f" except {changed}" if changed else "")
            + f", {ckpt['step']} steps")


def outputs(needed, optional=()):
    """The run folder the notebook reads: $RLHF_OUT, else out/ (what `bash pipeline.sh` writes); a relative
    path is read from the repository root, as pipeline.sh reads its OUT. If a stage of `needed` has no
    ckpt.pt there, a tiny run into $RLHF_TINY (else a new temporary folder) stands in, and makes the
    `optional` stages too. Prints the folder and each checkpoint's arguments."""
    out = REPO / (os.environ.get("RLHF_OUT") or "out")  # an absolute $RLHF_OUT replaces REPO
    where = (" (named by $RLHF_OUT; unset, this cell reads out/, where your own `bash pipeline.sh` writes)"
             if os.environ.get("RLHF_OUT") else ", where `bash pipeline.sh` writes")
    stages = list(needed) + list(optional)
    if not all(Path(out, stage, "ckpt.pt").is_file() for stage in needed):
        tiny = Path(os.environ.get("RLHF_TINY") or tempfile.mkdtemp(prefix="rlhf_tiny_"))
        print(f"no pipeline outputs in {shown(out)}{where}: a tiny run into {tiny} stands in")
        tiny_run(tiny, stages)
        out, where = tiny, " (the tiny run)"
    print(f"outputs: the run in {shown(out)}{where}")
    for stage in stages:
        if Path(out, stage, "ckpt.pt").is_file():
            print(f"  {stage}: {changed_args(out, stage)}")
    return out


def table(rows):
    """A list of dicts (one per row, the same keys) as an HTML table; floats with 2 decimals."""

    def cell(v):
        return f"<td style='text-align:left'>{escape(f'{v:.2f}' if isinstance(v, float) else str(v))}</td>"

    head = "".join(f"<th style='text-align:left'>{escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(cell(v) for v in row.values()) + "</tr>" for row in rows)
    display(HTML(f"<table><tr>{head}</tr>{body}</table>"))


@torch.no_grad()
def held_out_answers(out, folders):
    """(prompts, {name: (answers, reward-model scores, gold scores)}) for {name: a stage folder of the run}:
    every held-out prompt of train_ppo.py's evaluation answered by that folder's policy, sampled as the
    evaluation samples (its prompts, 128 per generate() call, seeds cfg.seed + 7 + start), and scored by the
    run's reward model (before the penalty for a missing EOS) and the gold judge."""
    ppo_ckpt = load_checkpoint(f"{out}/ppo/ckpt.pt", "ppo")
    cfg = train_ppo.Config(**ppo_ckpt["train_args"])
    tok = Tokenizer.from_state(ppo_ckpt["tokenizer"])
    rm = model_from_checkpoint(load_checkpoint(f"{out}/reward/ckpt.pt", "reward")).eval()
    prompts = task.make_prompts(cfg.eval_prompts, "eval", cfg.seed + 6)
    prompt_ids = [tok.encode(p) for p in prompts]
    results = {}
    for name, folder in folders.items():
        policy = policy_from_checkpoint(load_checkpoint(f"{out}/{folder}/ckpt.pt", ("sft", "ppo"))).eval()
        ids = sample_answers(policy, prompt_ids, cfg.max_new_tokens, tok.eos_id, cfg.temperature, seed=cfg.seed + 7,
                             batch_size=128)
        groups = [{"prompt": p, "answers": [a]} for p, a in zip(prompt_ids, ids)]
        r = torch.cat([rm(*train_reward.reward_batch(groups[i : i + 128], tok.eos_id, "cpu"))
                       for i in range(0, len(groups), 128)]).tolist()
        answers = [tok.decode_answer(a) for a in ids]
        results[name] = answers, r, [task.gold_score(p, a) for p, a in zip(prompts, answers)]
    return prompts, results
