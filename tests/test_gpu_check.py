"""bench/gpu_check.py, the one command for the day a GPU is lent, checked on the CPU: its report layout
(through --dry-run, which runs the same code paths tiny under the Triton interpreter), its argument
errors, and the stage-script flags it uses. The dry run's pipeline section takes minutes on two cores,
so it is left out here (`bash bench/gpu_check.sh --dry-run` runs it); its flags are checked against
each script's --help instead.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check

REPO = Path(__file__).resolve().parents[1]
HEADINGS = ["## 1. Kernel tests on CUDA", "## 2. Attention", "## 3. Per-token log-prob",
            "## 4. Fused LM-head variant", "## 5. Pipeline"]


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "bench/gpu_check.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_dry_run_writes_every_section(tmp_path):
    report = tmp_path / "report.md"
    proc = _run("--dry-run", "--sections", "tests,attention,logprob", "--out", str(report))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = report.read_text()
    positions = [text.find(h) for h in HEADINGS]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), text
    for line in ("- mode: DRY RUN", "- date: ", "- command: ", "- device: CPU", "- versions: torch ", "- git commit: "):
        assert line in text
    sections = dict(zip(HEADINGS, text.split("\n## ")[1:]))
    assert "**PASS**" in sections["## 1. Kernel tests on CUDA"]  # the selected tests ran and passed
    for heading in HEADINGS[1:4]:  # each measured section has its table and no goal verdict on dry-run figures
        assert "| --- |" in sections[heading] and "**PASS**" not in sections[heading]
        assert "**FAIL**" not in sections[heading]
    assert "| 48 | 1 | 2 | 64 | fwd |" in sections["## 2. Attention"]  # the dry run's attention shapes
    assert "| triton |" in sections["## 3. Per-token log-prob"]
    assert "| linear chunked |" in sections["## 4. Fused LM-head variant"]
    # what did not run says so: the unselected pipeline, the goal shape a dry run never reaches
    assert "not measured: not selected" in sections["## 5. Pipeline"]
    assert "T = 2048: not measured" in sections["## 2. Attention"]
    assert "Traceback" not in text and "failed with" not in text


def test_a_failure_leaves_the_other_rows_and_sections(tmp_path, monkeypatch):
    # One attention shape raises (a wrong result, out of memory): that shape is a row saying so and the
    # other shape is measured. Then the run is stopped in the next section: the report on disk keeps
    # the finished section and says which one was running.
    from bench import bench_attention

    real_measure = bench_attention.measure

    def measure(T, *args, **kwargs):
        if T == 80:
            raise RuntimeError("flash_attention differs from SDPA")
        return real_measure(T, *args, **kwargs)

    def stopped(plan, dry_run):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_attention, "measure", measure)
    monkeypatch.setattr(gpu_check, "logprob_section", stopped)
    report = tmp_path / "report.md"
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--dry-run", "--sections", "attention,logprob", "--out", str(report)])
    sections = dict(zip(HEADINGS, report.read_text().split("\n## ")[1:]))
    attention = sections["## 2. Attention"]
    assert "| 48 | 1 | 2 | 64 | fwd |" in attention
    assert "| 80 | 1 | 2 | 64 | all | failed: RuntimeError: flash_attention differs from SDPA |" in attention
    assert "not measured: running when this was written" in sections["## 3. Per-token log-prob"]
    assert "not measured: waiting when this was written" in sections["## 5. Pipeline"]


def test_the_kernel_tests_compile_within_the_sections_budget():
    # On a GPU the first section's time is mostly Triton compiles (about a second each, 300 s allowed);
    # bench/compile_count.py counts them here. 82 today; each attention kernel compiles once per dtype,
    # head dim, mask and Tk % 16, not once per head count or query length.
    proc = subprocess.run([sys.executable, "bench/compile_count.py", "--json"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["compiles"] <= 100, result
    assert result["by_kernel"]["_attn_fwd_kernel"] <= 18, result


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--dry-run", "--sections", "tests,nope"], "--sections: unknown section nope"),
    (["--dry-run", "--sections", ","], "--sections: unknown section (none given)"),
    (["--dry-run", "--out", "/nonexistent-folder/report.md"], "--out: folder /nonexistent-folder does not exist"),
    (["--dry-run", "--out", "."], "is a folder"),
    (["--dry-run", "extra"], "unrecognized arguments: extra"),
])
def test_bad_arguments_give_one_error_line(args, message):
    proc = _run(*args, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check.py: error: ") and message in lines[0], proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the full run is allowed here")
def test_full_run_without_a_gpu_is_refused():
    proc = _run("--sections", "tests", "--out", "/tmp/unused-report.md", timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("gpu_check.py: error: no CUDA device here; on a machine without a GPU run it "
                                   "with --dry-run")


def _script_flags(script):
    """Every --flag in `python script --help`."""
    out = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120).stdout
    return set(re.findall(r"(--[a-z_]+)", out))


def test_pipeline_uses_only_flags_the_scripts_have():
    # The scripts' flags change; stage_commands is the one place that names them.
    flags = {}
    for tiny in (True, False):
        for _, argv in gpu_check.stage_commands("OUT", "cpu", "triton", "triton", tiny):
            script = argv[0]
            flags.setdefault(script, _script_flags(script))
            used = {a for a in argv[1:] if a.startswith("--")}
            assert used <= flags[script], f"{script} has no {sorted(used - flags[script])}"


def test_throughput_reads_every_per_second_figure(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "gen_tokens_per_s": 10.0, "loss": 1.0}, {"step": 2, "gen_tokens_per_s": 30.0},
               {"step": 3, "gen_tokens_per_s": 20.0, "train_tokens_per_s": 5.0}]
    metrics.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert gpu_check._throughput(metrics) == "gen_tokens_per_s 20; train_tokens_per_s 5"
    assert gpu_check._throughput(tmp_path / "missing.jsonl") == "not measured: no metrics.jsonl"
