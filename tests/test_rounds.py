"""RLHF in rounds through pipeline.sh, as a user runs it: a two-round run of tiny stages, stopped in the
middle of round 2's PPO and continued with RESUME=1."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

from support.checkpoint import load_checkpoint

TINY = {  # every stage in seconds: what is checked here is the plumbing of the rounds, not learning
    "SFT_FLAGS": "--max_iters 30 --n_train 500 --n_eval 20 --eval_prompts 16 --eval_interval 30",
    "REWARD_FLAGS": "--n_train 24 --n_eval 16 --k 4 --batch_size 8 --max_iters 6 --eval_interval 6",
    "PPO_FLAGS": "--n_prompts 64 --iterations 4 --prompts_per_iter 8 --minibatch_size 8 --eval_prompts 16 "
                 "--eval_interval 2 --sample_interval 2",
}

# Loaded by every python process of the first run (PYTHONPATH): round 2's PPO dies right after its first
# checkpoint, as a run stopped by hand (Ctrl-C) would.
STOP_IN_ROUND_2 = """
import sys
if any("round2/ppo" in arg for arg in sys.argv):
    sys.path.insert(0, {repo!r})  # site runs this before the script's folder is on the path
    import support.checkpoint
    real_save = support.checkpoint.save_checkpoint
    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt
    support.checkpoint.save_checkpoint = save_then_stop
"""

# The no-KL PPO run crashes as it loads its first checkpoint.
CRASH_NO_KL = """
import sys
if "--kl_coef" in sys.argv:
    sys.path.insert(0, {repo!r})
    import support.checkpoint
    def broken(*args, **kwargs):
        raise RuntimeError("the no-KL run broke")
    support.checkpoint.load_checkpoint = broken
"""


def pipeline(out, hook_dir=None, **env):
    env = {**os.environ, **TINY, "OUT": str(out), "ROUNDS": "2", "OMP_NUM_THREADS": "1", "SIDE_BY_SIDE": "0", **env}
    env = {k: v for k, v in env.items() if v is not None}  # None: unset
    if hook_dir:
        env["PYTHONPATH"] = str(hook_dir)
    proc = subprocess.run(["bash", "pipeline.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_rounds_stopped_in_round_2_and_resumed(tmp_path):
    """The round folders, round 2's data (both round-1 policies ranked, both rounds' comparisons trained
    on), and RESUME=1 after a stop inside round 2's PPO: the finished stages kept, the stopped one
    continued from its checkpoint, each iteration logged once."""
    out, hook = tmp_path / "out", tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STOP_IN_ROUND_2.format(repo=str(REPO)))

    code, first_log = pipeline(out, hook)
    assert code != 0 and "stopped; run the same command with --resume" in first_log, first_log[-2000:]
    assert "round2/ppo stopped (exit 130); RESUME=1" in first_log  # what pipeline.sh says to do
    assert "runs beside ppo" not in first_log  # SIDE_BY_SIDE=0: one after the other
    finished = ["sft", "reward", "ppo", "ppo_nokl", "round2/reward"]
    assert all((out / stage / "done").is_file() for stage in finished)
    assert (out / "round2" / "ppo" / "ckpt.pt").is_file() and not (out / "round2" / "ppo" / "done").exists()
    kept = {stage: (out / stage / "ckpt.pt").stat().st_mtime_ns for stage in finished}

    code, log = pipeline(out, RESUME="1")
    assert code == 0, log[-3000:]
    for stage in finished:  # finished stages are kept, not run again
        assert f"{stage}: finished before, kept" in log
        assert (out / stage / "ckpt.pt").stat().st_mtime_ns == kept[stage]
    assert f"resuming {out}/round2/ppo/ckpt.pt at iteration 2" in log
    steps = [r["step"] for r in read_log(out / "round2" / "ppo" / "metrics.jsonl") if "reward" in r]
    assert steps == [1, 2, 3, 4]  # each iteration once: the stopped run's two, then the resumed run's two

    # round 2: the labellers ranked answers of round 1's two policies; its reward model started from round
    # 1's and trained on both rounds' comparisons; its PPO started from round 1's policy, SFT the reference
    reward2 = load_checkpoint(out / "round2" / "reward" / "ckpt.pt", "reward")
    args = reward2["train_args"]
    assert args["policy"] == f"{out}/ppo/ckpt.pt,{out}/ppo_nokl/ckpt.pt"
    assert args["extra_data"] == f"{out}/reward/comparisons.jsonl" and args["init"] == f"{out}/reward/ckpt.pt"
    n_round1 = len((out / "reward" / "comparisons.jsonl").read_text().splitlines())
    n_round2 = len((out / "round2" / "reward" / "comparisons.jsonl").read_text().splitlines())
    assert n_round1 > 0 and n_round2 > 0
    assert f"data: {n_round1 + n_round2} prompts" in first_log
    final = read_log(out / "round2" / "reward" / "metrics.jsonl")[-1]
    assert set(final["policy_reward"]) == {f"{out}/ppo/ckpt.pt", f"{out}/ppo_nokl/ckpt.pt"}
    assert abs(final["policy_reward"][f"{out}/ppo/ckpt.pt"]) < 1e-4  # the offset: round 1's policy scores 0
    ppo2 = load_checkpoint(out / "round2" / "ppo" / "ckpt.pt", "ppo")["train_args"]
    assert ppo2["policy"] == f"{out}/ppo/ckpt.pt" and ppo2["sft"] == f"{out}/sft/ckpt.pt"
    assert ppo2["reward"] == f"{out}/round2/reward/ckpt.pt"

    assert (out / "rounds.png").is_file() and "## Rounds" in (out / "report.md").read_text()

    # a finished stage is kept only for the command that made it: another seed must not reuse it silently
    code, log = pipeline(out, RESUME="1", SEED="7")
    assert code == 2 and f"pipeline.sh: {out}/sft was made by another command" in log and "Traceback" not in log
    times = (out / "times.txt").read_text()
    assert "round2/reward" in times and "round2/ppo" in times


def test_the_no_kl_run_beside_ppo_is_the_run_alone_and_its_failure_stops_the_pipeline(tmp_path):
    """With a core for each thread, round 1's two PPO runs go side by side: the no-KL run
    logs to ppo_nokl.log and computes exactly what it computes alone; if it fails, the pipeline says so
    (with the end of its log) and stops. (The other tests here run them one after the other.)"""
    out = tmp_path / "out"
    code, log = pipeline(out, ROUNDS="1", SIDE_BY_SIDE="auto")
    assert code == 0, log[-3000:]
    seconds = int(log.split("pipeline done in ")[1].split()[0])  # the whole command's time, in times.txt too
    assert (out / "times.txt").read_text().splitlines()[-1] == f"pipeline {seconds} s"
    if len(os.sched_getaffinity(0)) < 2:  # one core: one after the other, as before
        assert "runs beside ppo" not in log and not (out / "ppo_nokl.log").exists()
        return
    assert "ppo_nokl: runs beside ppo (1 of " in log and "ppo_nokl: iteration 4: eval reward" in log
    saved = f"saved {out}/ppo_nokl/ckpt.pt"  # its output is in its log; the pipeline shows its last eval only
    assert log.count(saved) == 1 and (out / "ppo_nokl.log").read_text().count(saved) == 2

    alone = tmp_path / "alone"  # the same command, run by itself
    command = (out / "ppo_nokl" / "done").read_text().split()
    command[command.index("--out_dir") + 1] = str(alone)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, cwd=REPO, env=env, capture_output=True, check=True, timeout=300)
    def untimed(path):  # every logged value but the speeds and times
        return [{k: v for k, v in r.items() if not k.endswith("_per_s") and k != "wall_s"} for r in read_log(path)]
    assert untimed(alone / "metrics.jsonl") == untimed(out / "ppo_nokl" / "metrics.jsonl")

    hook = tmp_path / "hook"  # the no-KL run crashes at its start; RESUME=1 keeps sft, reward and ppo
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASH_NO_KL.format(repo=str(REPO)))
    (out / "ppo_nokl" / "done").unlink()
    first_log = (out / "ppo_nokl.log").read_text()
    # torch's default threads (OMP_NUM_THREADS unset): side by side with half the cores each
    code, log = pipeline(out, hook, ROUNDS="1", RESUME="1", SIDE_BY_SIDE="auto", OMP_NUM_THREADS=None)
    cores = len(os.sched_getaffinity(0))
    assert f"ppo_nokl: runs beside ppo ({cores // 2} of {cores} cores each)" in log
    assert code == 1 and "RuntimeError: the no-KL run broke" in log
    assert log.strip().splitlines()[-1].startswith("pipeline.sh: ppo_nokl stopped (exit 1); RESUME=1")
    assert "ppo: finished before, kept" in log and not (out / "ppo_nokl" / "done").exists()

    # resumed to the end: the no-KL log goes on after the stopped runs' logs; the figures, the report and the
    # wall time appear once each in times.txt, the resumed run's
    code, log = pipeline(out, ROUNDS="1", RESUME="1", SIDE_BY_SIDE="auto", OMP_NUM_THREADS=None)
    assert code == 0, log[-3000:]
    assert (out / "ppo_nokl.log").read_text().startswith(first_log)
    times = (out / "times.txt").read_text().splitlines()
    names = [line.split()[0] for line in times]
    assert names.count("figures") == names.count("report") == names.count("pipeline") == 1
    assert times[-1] == f"pipeline {int(log.split('pipeline done in ')[1].split()[0])} s (resumed)"


def test_bad_rounds_and_resume_values_are_one_line(tmp_path):
    """ROUNDS, RESUME and SIDE_BY_SIDE are checked before any stage runs: one line, exit 2."""
    for env, message in ((dict(ROUNDS="three"), "ROUNDS=three: give the number of rounds"),
                         (dict(ROUNDS="0"), "ROUNDS=0: give the number of rounds"),
                         (dict(RESUME="yes"), "RESUME=yes: use 1"),
                         (dict(SIDE_BY_SIDE="1"), "SIDE_BY_SIDE=1: use auto (when the cores allow) or 0")):
        code, log = pipeline(tmp_path / "out", **env)
        assert code == 2 and log.startswith(f"pipeline.sh: {message}") and len(log.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()  # refused before anything is made


def test_a_stage_that_refuses_its_input_is_not_offered_resume(tmp_path):
    """A stage that exits 2 said what was wrong with its input: pipeline.sh says to fix it, not RESUME=1
    (nothing was trained, so there is nothing to continue)."""
    code, log = pipeline(tmp_path / "out", SFT_FLAGS="--batch_size 0")
    assert code == 2 and "error: --batch_size must be >= 1, got 0" in log
    assert log.strip().splitlines()[-1] == ("pipeline.sh: sft refused its input (exit 2): fix what the error says and "
                                            "run again")
    assert "RESUME" not in log


@pytest.mark.parametrize("variable, value, message", [
    ("SEED", "abc", "SEED=abc: give a whole number from 0 to 999999999"),
    ("SEED", "-1", "SEED=-1: give a whole number"),
    ("ROUNDS", "0", "ROUNDS=0: give the number of rounds, 1 or more"),
    ("RESUME", "yes", "RESUME=yes: use 1"),
    ("SIDE_BY_SIDE", "1", "SIDE_BY_SIDE=1: use auto"),
    ("NPROC", "0", "NPROC=0: give the number of processes per stage, 1 or more"),
    ("METHODS", "grpo ddpg", "METHODS: ddpg is not grpo, dr_grpo, rloo, reinforce or dpo"),
])
def test_a_bad_variable_is_one_line_before_the_run_folder_is_touched(tmp_path, variable, value, message):
    out = tmp_path / "out"  # a finished run: its stage times and a finished stage's marker must survive
    (out / "sft").mkdir(parents=True)
    (out / "times.txt").write_text("sft 245 s\n")
    (out / "sft" / "done").write_text("python train_sft.py --out_dir out/sft --seed 1337\n")
    env = {**os.environ, "OUT": str(out), variable: value}
    proc = subprocess.run(["bash", "pipeline.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("pipeline.sh: ") and message in proc.stderr and proc.stderr.count("\n") == 1
    assert (out / "times.txt").read_text() == "sft 245 s\n" and (out / "sft" / "done").exists()


def test_methods_run_beside_ppo_from_the_same_models(tmp_path):
    """METHODS="grpo dpo": GRPO with and without its KL term from the same SFT and reward model as PPO, 4
    answers a prompt, and DPO on the reward model's comparisons, each in its own folder."""
    out = tmp_path / "out"
    code, log = pipeline(out, ROUNDS="1", METHODS="grpo dpo",
                         DPO_FLAGS="--max_iters 4 --eval_interval 4 --n_eval 8 --k 2 --eval_prompts 8 --batch_size 4")
    assert code == 0, log[-3000:]
    for kl, folder in ((0.2, "grpo"), (0.0, "grpo_nokl")):  # the default kl_coef, and none
        args = load_checkpoint(out / folder / "ckpt.pt", "ppo")["train_args"]
        assert args["advantage"] == "grpo" and args["samples_per_prompt"] == 4 and args["kl_coef"] == kl
        assert args["sft"] == f"{out}/sft/ckpt.pt" and args["reward"] == f"{out}/reward/ckpt.pt"
    dpo = load_checkpoint(out / "dpo" / "ckpt.pt", "sft")
    assert dpo["extra"]["method"] == "dpo" and dpo["train_args"]["data"] == f"{out}/reward/comparisons.jsonl"
    times = (out / "times.txt").read_text()
    assert all(f"{name} " in times for name in ("grpo", "grpo_nokl", "dpo"))
    assert (out / "methods.png").is_file()  # held-out gold over each method's time
    table = subprocess.run([sys.executable, "bench/methods_summary.py", str(out)], cwd=REPO, capture_output=True,
                           text=True, timeout=60, check=True).stdout
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in table.splitlines()[2:]}
    assert list(rows) == ["ppo", "ppo_nokl", "grpo", "grpo_nokl", "dpo"], table
    assert all(cell.strip(" |") != "-" for row in rows.values() for cell in row[:4]), table  # gain, time, KL, length
