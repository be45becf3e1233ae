"""tools/report.py on a tiny pipeline run: every section is there, every number of the report is one that the
run's files hold (the before/after answers, sampled from the checkpoints, are checked on their own),
and the command behaves as pipeline.sh's last stage and a user meet it."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from support import task
import train_ppo
import train_reward
import train_sft

SECTIONS = ("## Environment", "## Stages", "## Key numbers", "### SFT", "### Reward model",
            "### PPO, with and without the KL penalty", "## Before and after", "## Figures")
# a number that stands alone: not part of a word, a path or a version (sft2, pytest-3, 2.5.1)
NUMBER = re.compile(r"(?<![\w./-])-?\d+(?:\.\d+)?(?![\w.]*\w)")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """pipeline.sh's folder, with the tiny settings of notebooks/course.py (a few seconds): the four
    stages, times.txt, and stand-ins for the figures (the report links them; drawing them is
    plots.py's job, tested with the notebooks)."""
    out = tmp_path_factory.mktemp("run")
    sft, reward = str(out / "sft" / "ckpt.pt"), str(out / "reward" / "ckpt.pt")
    train_sft.main(train_sft.Config(out_dir=str(out / "sft"), n_train=256, n_eval=32, eval_prompts=8, batch_size=16,
                                    max_iters=20, warmup_iters=5, eval_interval=10))
    train_reward.main(train_reward.Config(out_dir=str(out / "reward"), sft=sft, n_train=32, n_eval=16, k=2,
                                          batch_size=8, max_iters=5, warmup_iters=2, eval_interval=5))
    for name, kl_coef in (("ppo", 0.2), ("ppo_nokl", 0.0)):
        train_ppo.main(train_ppo.Config(out_dir=str(out / name), sft=sft, reward=reward, kl_coef=kl_coef, n_prompts=64,
                                        iterations=2, prompts_per_iter=8, samples_per_prompt=2, minibatch_size=8,
                                        max_new_tokens=12, eval_prompts=8, ppo_epochs=1, eval_interval=1,
                                        sample_interval=1))
    (out / "times.txt").write_text("sft 3 s\nreward 1 s\nppo 1 s\nppo_nokl 1 s\nfigures 4 s\n")
    for name in ("sft", "reward_model", "ppo", "reward_hacking", "attention"):
        (out / f"{name}.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return out


@pytest.fixture(scope="module")
def made(run_dir):
    """tools/report.py run once on that folder, as pipeline.sh runs it: (exit code, stdout, stderr, report.md)."""
    code, out, err = report(run_dir)
    return code, out, err, (run_dir / "report.md").read_text()


def report(*args):
    proc = subprocess.run([sys.executable, "tools/report.py", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_a_run_trained_with_the_triton_kernel_reports_on_a_cpu(run_dir, made, tmp_path):
    """The report samples its answers on the CPU: a run whose checkpoints say attn_impl "triton" (trained on a
    GPU) still gets its report where the kernel cannot run (no GPU, no interpreter)."""
    shutil.copytree(run_dir, tmp_path / "run")
    for path in (tmp_path / "run").glob("*/ckpt.pt"):
        ckpt = torch.load(path, weights_only=False)
        ckpt["model_config"]["attn_impl"] = "triton"
        torch.save(ckpt, path)
    proc = subprocess.run([sys.executable, "tools/report.py", tmp_path / "run"], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr
    title = "## Before and after"  # the same answers as the run's own report: on a CPU "auto" is SDPA either way
    assert section((tmp_path / "run" / "report.md").read_text(), title) == section(made[3], title)


def section(text, title):
    """The text of one '## ' section."""
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def numbers_of(value):
    """Every number in a JSON value (nested dicts and lists included)."""
    if isinstance(value, bool):
        return [int(value)]
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers_of(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers_of(v)]
    return []


def run_numbers(out):
    """Every number the run's files hold: the logs, times.txt, and the checkpoints' settings and steps."""
    found = []
    for log in out.glob("*/*.jsonl"):
        found += [n for line in log.read_text().splitlines() if line for n in numbers_of(json.loads(line))]
    found += [int(n) for n in re.findall(r"\d+", (out / "times.txt").read_text())]
    for path in out.glob("*/ckpt.pt"):
        ckpt = torch.load(path, weights_only=False)
        found += numbers_of([ckpt["train_args"], ckpt["step"], ckpt["model_config"]])
    return found


def from_the_files(text, found):
    """Whether the printed number `text` is one of `found`, as printed (rounded to its decimals)."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    return any(abs(float(text) - v) <= 0.5 * 10**-decimals + 1e-9 for v in found)


def test_report_has_every_section_and_only_numbers_from_the_files(run_dir, made):
    code, out, err, text = made
    assert code == 0, err
    assert out.strip() == f"wrote {run_dir / 'report.md'}"
    for title in SECTIONS:
        assert f"\n{title}\n" in text, title
    assert "torch.get_num_threads()" in text and "git commit" in text and torch.__version__ in text
    for stage, seconds in (("sft", 3), ("reward", 1), ("ppo", 1), ("ppo_nokl", 1), ("figures", 4)):
        assert re.search(rf"\n\| {stage} \|[^\n]*\| {seconds} s \|", text), stage
    assert "--kl_coef 0.0" in section(text, "## Stages")
    for name in ("sft", "reward_model", "ppo", "reward_hacking", "attention"):
        assert f"![{name}]({name}.png)" in text

    found = run_numbers(run_dir)
    checked = [section(text, title) for title in ("## Stages", "## Key numbers", "## Figures")]
    numbers = [n for part in checked for n in NUMBER.findall(part)]
    assert len(numbers) > 60  # the tables were read, not skipped
    assert [n for n in numbers if not from_the_files(n, found)] == []
    ppo = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    first_eval, last_eval = ppo[0], ppo[-1]
    assert f"| held-out gold score (`eval_gold`) | {first_eval['eval_gold']:.3f} | {last_eval['eval_gold']:.3f} |" \
        in text


def test_before_and_after_are_scored_answers_and_the_same_every_time(run_dir, made):
    """One table per held-out prompt, one row per policy, the gold column the gold judge's score of the
    answer shown; a second report gives the same answers (fixed seed, CPU)."""
    first = section(made[3], "## Before and after")
    assert report(run_dir)[0] == 0
    assert section((run_dir / "report.md").read_text(), "## Before and after") == first
    asked = re.findall(r"\n\*\*(.+)\*\*\n", first)
    assert len(asked) == 4 and {task.parse_prompt(r).kind for r in asked} == set(task.KINDS)
    for request, table in zip(asked, first.split("\n**")[1:]):
        rows = [line.split(" | ") for line in table.splitlines() if line.startswith(("| sft", "| ppo"))]
        assert [row[0] for row in rows] == ["| sft", "| ppo", "| ppo_nokl"]
        for _, answer, reward, gold in rows:
            answer = "" if answer == "(empty)" else answer.replace("\\|", "|")
            assert float(gold.rstrip(" |")) == pytest.approx(task.gold_score(task.format_prompt(request), answer),
                                                             abs=5e-4)
            float(reward)


def test_a_folder_without_a_run_is_one_error_line(tmp_path):
    code, out, err = report(tmp_path)
    assert code == 2
    assert err.splitlines() == [f"error: {tmp_path}: no sft/, reward/, ppo/ or ppo_nokl/ checkpoint; run bash "
                                f"pipeline.sh (OUT={tmp_path}) first"]


def test_a_missing_or_broken_log_is_one_error_line_and_the_old_report_stays(run_dir, made, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    old_report = (run / "report.md").read_text()
    (run / "reward" / "metrics.jsonl").unlink()  # a stage's checkpoint without its log
    code, out, err = report(run)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"error: {run}/reward/metrics.jsonl is missing though {run}/reward/ckpt.pt is "
                                "there; copy the whole stage folder, or run the stage again"]
    assert (run / "report.md").read_text() == old_report

    shutil.copy(run_dir / "reward" / "metrics.jsonl", run / "reward" / "metrics.jsonl")
    with open(run / "ppo" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "eval_rew\n')  # a run cut off in the middle of a line
    n_lines = len((run / "ppo" / "metrics.jsonl").read_text().splitlines())
    for command in ("tools/report.py", "notebooks/plots.py"):  # pipeline.sh's last two steps
        proc = subprocess.run([sys.executable, command, str(run)], capture_output=True, text=True, cwd=REPO,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines() == [f"error: {run}/ppo/metrics.jsonl line {n_lines} is not JSON "
                                            "('{\"step\": 3, \"eval_rew'); the run that wrote it was cut off "
                                            "mid-line? delete that line, or run the stage again"]
    assert (run / "report.md").read_text() == old_report
