"""
The report card of one pipeline run: out/report.md, the whole run on one page.

    python tools/report.py out                  # writes out/report.md (pipeline.sh does this as its last stage)
    python tools/report.py runs/seed2           # any folder that pipeline.sh wrote (OUT=runs/seed2)

Sections: the environment of the machine that writes the report, each stage's settings and wall time,
its key numbers at the start and the end of training (SFT loss and gold score; reward-model accuracy
and agreement with the gold judge; PPO's reward, gold score and KL, with and without the KL penalty),
a few held-out prompts answered by the SFT and PPO policies, and the figures.

Every number in the report is read from the run's files (metrics.jsonl, times.txt, the checkpoints'
settings); nothing is averaged or subtracted here, so each one can be found in a log. The one exception
is said where it occurs: the before/after answers are sampled from the checkpoints now, with a fixed
seed, on the CPU, so the same folder always gives the same answers.
"""

import argparse
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the stage scripts, model.py and support/ are one folder up
import train_ppo
import train_reward
import train_sft
from model import generate
from support import task
from support.checkpoint import load_checkpoint, model_from_checkpoint, policy_from_checkpoint
from support.data import Tokenizer, decode_answers
from support.errors import LoadError, UsageError
from support.training import check, read_metrics, run
STAGES = {  # folder -> (script, its Config, the settings every report shows)
    "sft": ("train_sft.py", train_sft.Config, ("init", "preset", "n_train", "batch_size", "max_iters", "lr", "seed")),
    "reward": ("train_reward.py", train_reward.Config,
               ("candidates", "n_train", "k", "label_noise", "batch_size", "max_iters", "lr", "seed")),
    "ppo": ("train_ppo.py", train_ppo.Config,
            ("iterations", "prompts_per_iter", "samples_per_prompt", "kl_coef", "adaptive_kl", "lr", "seed")),
    "ppo_nokl": ("train_ppo.py", train_ppo.Config,
                 ("iterations", "prompts_per_iter", "samples_per_prompt", "kl_coef", "adaptive_kl", "lr", "seed")),
}
PATH_ARGS = ("out_dir", "sft", "reward")  # where the run was written, not how it was trained
FIGURES = {  # the PNGs of notebooks/plots.py, in reading order
    "sft": "SFT: training and held-out loss, gold score of sampled answers",
    "reward_model": "reward model: held-out accuracy, agreement with the gold judge, rewards of chosen vs rejected",
    "ppo": "PPO: reward-model score, gold score and KL to the reference per iteration",
    "reward_hacking": "the same PPO run with kl_coef = 0 beside the normal one",
    "attention": "the attention pattern of one head of the SFT model on one prompt",
    "rounds": "RLHF in rounds: the gold score after each round, each round's PPO by its reward model, and round "
              "1's reward hack judged by round 2's reward model",
}


# -----------------------------------------------------------------------------
# Reading a run folder


def rows_with(log, key):
    return [r for r in log if key in r]


def read_times(out):
    """{stage: seconds} from times.txt ("stage seconds s" lines)."""
    path = Path(out) / "times.txt"
    lines = path.read_text().splitlines() if path.is_file() else []
    return {name: int(seconds) for name, seconds, *_ in (line.split() for line in lines if line.strip())}


def fmt(value):
    """A number as the report prints it: three decimals for a float, an int as it is."""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def cell(text):
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


# -----------------------------------------------------------------------------
# The sections


def environment(ckpts):
    """The machine that writes the report (the pipeline's own when pipeline.sh writes it)."""
    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s))"
    else:
        device = f"CPU only ({platform.machine()}, {os.cpu_count()} cores)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown (not a git checkout)"
    asked = {ckpt["train_args"].get("device", "?") for ckpt in ckpts.values() if ckpt}
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " with uncommitted changes"
    return ["## Environment", "",
            "The machine that wrote this report (when `pipeline.sh` writes it, the machine the run ran on).", "",
            f"- device: {device}",
            f"- torch {torch.__version__}, triton {triton_version}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}",
            f"- threads: torch.get_num_threads() = {torch.get_num_threads()}, "
            f"OMP_NUM_THREADS = {os.environ.get('OMP_NUM_THREADS', 'unset')}",
            f"- git commit: {commit}",
            f"- the stages asked for --device {', '.join(sorted(asked))} ('auto': CUDA when there is one)",
            f"- written: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", ""]


def settings(stage, ckpt):
    """The flags that re-make a stage: the ones every report shows, then any other that differs from the
    script's current defaults (paths left out)."""
    script, config, shown = STAGES[stage]
    args, defaults = ckpt["train_args"], asdict(config())
    # a max_*_tokens of 0 means "from the block size", and main() stores the length it chose: not a change
    changed = [k for k, v in args.items() if k not in shown and k not in PATH_ARGS and k in defaults
               and v != defaults[k] and not (k.startswith("max_") and k.endswith("_tokens") and defaults[k] == 0)]
    flags = " ".join((f"--{k}" if args[k] else f"--no-{k}") if isinstance(args[k], bool) else f"--{k} {args[k]}"
                     for k in (*shown, *changed) if k in args)
    return f"`python {script} {flags}`"


def stages_section(out, ckpts):
    times = read_times(out)
    rows = []
    for stage, ckpt in ckpts.items():
        steps = f"{ckpt['step']}" if ckpt else "no checkpoint"
        rows.append([stage, steps, f"{times[stage]} s" if stage in times else "not timed",
                     settings(stage, ckpt) if ckpt else "not run"])
    if "figures" in times:
        rows.append(["figures", "", f"{times['figures']} s", "`python notebooks/plots.py OUT`"])
    lines = ["## Stages", "", "Wall time from times.txt; settings from each checkpoint's `train_args` (the flags "
             "shown, and any other that differs from the script's defaults)."]
    sft = ckpts.get("sft")
    if sft:
        mc = sft["model_config"]
        vocab = "the task's compact vocabulary" if sft["tokenizer"]["table"] else "GPT-2's vocabulary"
        lines.append(f"The model: {mc['n_layer']} layers, {mc['n_head']} heads, n_embd {mc['n_embd']}, block size "
                     f"{mc['block_size']}, {mc['vocab_size']} tokens ({vocab}).")
    return lines + [""] + table(["stage", "steps", "wall time", "settings"], rows) + [""]


def start_end(log, key):
    """The (first, last) rows of a log that hold key, or None if it is never logged."""
    rows = rows_with(log, key)
    return (rows[0], rows[-1]) if rows else None


def numbers_table(logs, measures):
    """One row per measure, a start and an end column per run: the first and the last logged value."""
    header = ["measure"]
    for name, log in logs.items():
        step_rows = rows_with(log, "step")
        last_step = step_rows[-1]["step"] if step_rows else "?"
        header += [f"{name} start", f"{name} end (step {last_step})"]
    rows = []
    for label, key in measures:
        row = [f"{label} (`{key}`)"]
        for log in logs.values():
            pair = start_end(log, key)
            row += [fmt(pair[0][key]), fmt(pair[1][key])] if pair else ["not logged", "not logged"]
        rows.append(row)
    return table(header, rows)


def key_numbers(out, ckpts):
    logs = {stage: read_metrics(Path(out) / stage / "metrics.jsonl") for stage in STAGES}
    lines = ["## Key numbers", "", "The first and the last value of each measure in the stage's metrics.jsonl.", ""]
    lines += ["### SFT", ""]
    lines += numbers_table({"sft": logs["sft"]}, [("training loss", "loss"), ("held-out loss", "eval_loss"),
                                                   ("gold score of held-out answers", "gold")])
    lines += ["", "### Reward model", ""]
    lines += numbers_table({"reward": logs["reward"]}, [
        ("held-out accuracy on the noisy labels", "eval_accuracy"),
        ("agreement with the gold judge on held-out pairs", "gold_agreement"),
        ("held-out loss", "eval_loss")])
    offset = rows_with(logs["reward"], "offset")
    if offset:
        lines += ["", f"The offset subtracted so that the SFT policy's answers score 0 on average: "
                  f"{fmt(offset[-1]['offset'])}."]
    ppo_logs = {stage: logs[stage] for stage in ("ppo", "ppo_nokl") if logs[stage]}
    lines += ["", "### PPO, with and without the KL penalty", ""]
    if not ppo_logs:
        return lines + ["No PPO metrics in this folder.", ""]
    kl_coefs = ", ".join(f"{stage}: kl_coef {ckpts[stage]['train_args']['kl_coef']}" for stage in ppo_logs
                         if ckpts.get(stage))
    lines += [f"The held-out measures at start are the SFT policy itself (PPO's evaluation before its first "
              f"update); the rollout measures are of the training prompts of each iteration. ({kl_coefs})", ""]
    lines += numbers_table(ppo_logs, [
        ("held-out reward-model score", "eval_reward"), ("held-out gold score", "eval_gold"),
        ("rollout reward-model score", "reward"), ("rollout gold score", "gold"),
        ("KL to the reference, nats per answer", "kl"), ("exact KL to the reference", "kl_exact"),
        ("entropy per token", "entropy"), ("policy clip fraction", "clip_frac")])
    lines += ["", *verdict(ppo_logs), ""]
    return lines


def verdict(ppo_logs):
    """What the PPO numbers say, in words: comparisons only, no new numbers."""
    ends = {s: start_end(log, "eval_gold") for s, log in ppo_logs.items()}
    rewards = {s: start_end(log, "eval_reward") for s, log in ppo_logs.items()}
    if not ends.get("ppo") or not ends.get("ppo_nokl"):
        return []
    sft_gold = ends["ppo"][0]["eval_gold"]
    gold, gold_nokl = ends["ppo"][1]["eval_gold"], ends["ppo_nokl"][1]["eval_gold"]
    reward, reward_nokl = rewards["ppo"][1]["eval_reward"], rewards["ppo_nokl"][1]["eval_reward"]
    said = [f"With the KL penalty the held-out gold score went from {fmt(sft_gold)} (the SFT policy) to {fmt(gold)}."]
    if reward_nokl > reward and gold_nokl < sft_gold:
        said.append(f"Without it the reward model's score ended higher ({fmt(reward_nokl)} against {fmt(reward)}) "
                    f"while the gold score fell below the SFT policy's, to {fmt(gold_nokl)}: reward hacking.")
    elif reward_nokl > reward and gold_nokl < gold:
        said.append(f"Without it the reward model's score ended higher ({fmt(reward_nokl)} against {fmt(reward)}) "
                    f"but the gold score lower ({fmt(gold_nokl)}): reward-model score that the gold judge does not "
                    "confirm, the start of reward hacking (though the gold score stayed above the SFT policy's).")
    else:
        said.append(f"Without it the reward model's score ended at {fmt(reward_nokl)} (against {fmt(reward)}) and "
                    f"the gold score at {fmt(gold_nokl)}: no reward hacking showed in this run.")
    return [" ".join(said)]


def rounds_section(out):
    """RLHF in rounds (ROUNDS=N bash pipeline.sh): one row per round, read from each round's logs."""
    out, rows, r = Path(out), [], 1
    while (out / (f"round{r}" if r > 1 else "") / "ppo" / "metrics.jsonl").is_file():
        folder = out / f"round{r}" if r > 1 else out
        reward_log = read_metrics(folder / "reward" / "metrics.jsonl")
        ppo_log = read_metrics(folder / "ppo" / "metrics.jsonl")
        agreement, gold, score = (start_end(log, key) for log, key in (
            (reward_log, "gold_agreement"), (ppo_log, "eval_gold"), (ppo_log, "eval_reward")))
        n_files = 1 + len(load_checkpoint(folder / "reward" / "ckpt.pt", "reward")["train_args"].get(
            "extra_data", "").split(",")) if r > 1 else 1
        rows.append([str(r), str(n_files), fmt(agreement[1]["gold_agreement"]) if agreement else "n/a",
                     f"{fmt(gold[0]['eval_gold'])} -> {fmt(gold[1]['eval_gold'])}" if gold else "n/a",
                     f"{fmt(score[0]['eval_reward'])} -> {fmt(score[1]['eval_reward'])}" if score else "n/a"])
        r += 1
    if len(rows) < 2:
        return []
    lines = ["## Rounds", "", "Round 1 is the pipeline above; in round r >= 2 the labellers ranked answers of round "
             "r-1's policies, the reward model was trained on every round's comparisons so far, and PPO continued "
             "from round r-1's policy with the SFT model as the reference.", ""]
    lines += table(["round", "rounds of comparisons", "reward model: gold agreement (its own held-out pairs)",
                    "PPO: held-out gold, start -> end", "PPO: reward-model score, start -> end"], rows) + [""]
    final = rows_with(read_metrics(out / "round2" / "reward" / "metrics.jsonl"), "policy_reward")
    if final:
        for path, reward in final[-1]["policy_reward"].items():
            lines.append(f"- Round 2's reward model on the answers of `{path}`: {fmt(reward)} (gold "
                         f"{fmt(final[-1]['policy_gold'][path])}).")
        lines.append("")
    return lines


@torch.no_grad()
def before_after(out, ckpts, n_prompts):
    """A few held-out prompts answered by each policy, with their reward-model and gold scores.

    Sampled here, from the checkpoints: PPO's samples.jsonl logs the training policy's answers to
    training prompts after sample_interval iterations, so it never shows the SFT policy's answer to the
    same prompt. Every policy gets the same prompts and seed, with PPO's temperature and max_new_tokens,
    the way PPO's own evaluation samples them; on the CPU, so a folder always gives the same answers."""
    lines = ["## Before and after", ""]
    policies = {s: ckpts[s] for s in ("sft", "ppo", "ppo_nokl") if ckpts.get(s)}
    ppo_args = (ckpts.get("ppo") or ckpts.get("ppo_nokl") or {}).get("train_args")
    if not ckpts.get("reward") or not ppo_args or "sft" not in policies:
        return lines + ["Needs the sft, reward and ppo checkpoints; not all are in this folder.", ""]
    builtin = ppo_args["data"] == "default"
    if builtin:  # one held-out prompt of each kind, then more of the eval split
        candidates = task.make_prompts(64, "eval", ppo_args["seed"])
        by_kind = {}
        for p in candidates:
            by_kind.setdefault(task.parse_prompt(p).kind, p)
        prompts = list(dict.fromkeys([*by_kind.values(), *candidates]))[:n_prompts]
    else:
        samples = read_metrics(Path(out) / "ppo" / "samples.jsonl")
        prompts = list(dict.fromkeys(r["prompt"] for r in samples))[:n_prompts]
    if not prompts:
        return lines + ["No prompts to ask (outside data, and no ppo/samples.jsonl).", ""]
    seed, temperature, max_new_tokens = ppo_args["seed"], ppo_args["temperature"], ppo_args["max_new_tokens"]
    tok = Tokenizer.from_state(ckpts["sft"]["tokenizer"])
    # attn_impl "auto": the answers are sampled on this CPU, whichever attention the run trained with (a GPU's
    # Triton kernel cannot run here)
    reward_model = model_from_checkpoint(ckpts["reward"], "auto").eval()
    prompt_ids = [tok.encode(p, "a held-out prompt")[-ppo_args["max_prompt_tokens"]:] for p in prompts]
    answers = {}
    for stage, ckpt in policies.items():
        policy = policy_from_checkpoint(ckpt, "auto").eval()
        tokens, attention_mask, answer_mask = generate(policy, prompt_ids, max_new_tokens, tok.eos_id, temperature,
                                                       seed=seed)
        scores = reward_model(tokens, attention_mask).tolist()  # read at each answer's last token, as PPO does
        answers[stage] = list(zip(decode_answers(tok, tokens, answer_mask), scores))
    lines += [f"{'Held-out prompts of the built-in task' if builtin else 'Prompts from ppo/samples.jsonl'}, answered "
              f"by each policy with PPO's sampling (temperature {temperature}, max_new_tokens {max_new_tokens}, "
              f"seed {seed}). These scores are computed now from the checkpoints (the reward model, "
              f"{'and the gold judge, ' if builtin else ''}on the CPU), not read from a log.", ""]
    for i, prompt in enumerate(prompts):
        asked = task.parse_prompt(prompt).request if builtin else prompt.replace("\n", " ")
        lines += [f"**{cell(asked)}**", ""]
        rows = []
        for stage in policies:
            answer, score = answers[stage][i]
            gold = fmt(task.gold_score(prompt, answer)) if builtin else "n/a"
            rows.append([stage, answer.strip() or "(empty)", fmt(score), gold])
        lines += table(["policy", "answer", "reward", "gold"], rows) + [""]
    return lines


def figures_section(out):
    lines = ["## Figures", ""]
    missing = []
    for name, caption in FIGURES.items():
        if name == "rounds" and not (Path(out) / "round2").is_dir():
            continue  # drawn only for a run in rounds
        if (Path(out) / f"{name}.png").is_file():
            lines += [f"![{name}]({name}.png)", "", f"*{caption}*", ""]
        else:
            missing.append(f"{name}.png")
    if missing:
        lines += [f"Not drawn yet: {', '.join(missing)}; `python notebooks/plots.py OUT` draws them.", ""]
    return lines


# -----------------------------------------------------------------------------


def write_report(out, n_prompts=4):
    """Write out/report.md and return its path."""
    out = Path(out)
    check(out.is_dir(), f"{out}: no such folder; pass the OUT folder of a pipeline.sh run (default out)")
    ckpts = {}
    for stage in STAGES:
        path = out / stage / "ckpt.pt"
        ckpts[stage] = load_checkpoint(path, "ppo" if stage == "ppo_nokl" else stage) if path.is_file() else None
    if not any(ckpts.values()):
        raise LoadError(f"{out}: no sft/, reward/, ppo/ or ppo_nokl/ checkpoint; run bash pipeline.sh (OUT={out}) "
                        "first")
    for stage, ckpt in ckpts.items():  # every number of a stage comes from its log: without it, no report
        log = out / stage / "metrics.jsonl"
        check(ckpt is None or log.is_file(), f"{log} is missing though {out / stage / 'ckpt.pt'} is there; copy "
              "the whole stage folder, or run the stage again")
    for log in sorted(out.glob("**/*s.jsonl")):  # metrics and samples: a broken line stops us before any sampling
        read_metrics(log)
    lines = [f"# Report card of the run in {out}/", "",
             f"Written by `python tools/report.py {out}` from the run's metrics.jsonl, times.txt and checkpoints; "
             "run it again to re-make this page.", ""]
    lines += environment(ckpts) + stages_section(out, ckpts) + key_numbers(out, ckpts) + rounds_section(out)
    lines += before_after(out, ckpts, n_prompts) + figures_section(out)
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write OUT/report.md: a pipeline run on one page.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out", nargs="?", default="out", help="the folder pipeline.sh wrote (its OUT)")
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts in the before/after section")
    args = parser.parse_args(argv)
    if args.prompts < 1:
        raise UsageError(f"--prompts must be positive, got {args.prompts}")
    torch.set_grad_enabled(False)
    print(f"wrote {write_report(args.out, args.prompts)}")


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]))
