"""tools/label.py, the hand-labelling tool, as a labeller meets it: driven through stdin of a subprocess, its
output read back, and the JSONL it writes read by the reward model's own loader (and trainer)."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from model import GPT, GPTConfig
from support import task
from support.checkpoint import save_checkpoint
from support.data import DataError, Tokenizer, load_demonstrations, load_preferences
from tools.label import candidate_items, gold_agreement, gold_scores, parse_key

BANANA = task.format_prompt("What color is a banana?")
SUM = task.format_prompt("What is 3 plus 4?")
COW = task.format_prompt("What sound does a cow make?")
# Gold scores by hand (task.gold_score's docstring): topic +1, right content +1 (a wrong one -1), a capital
# +0.5, one closing period +0.5.
BANANA_ANSWERS = {" A banana is yellow.": 3.0, " a banana is yellow": 2.0, " A banana is red.": 1.0}
SUM_ANSWERS = {" 3 plus 4 is 7.": 3.0, " 3 plus 4 is 8.": 1.0}


def label(*flags, stdin="", script="tools/label.py"):
    """Run tools/label.py (or another script) with flags and stdin (a pipe); (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, script, *map(str, flags)], input=stdin, capture_output=True,
                          text=True, cwd=REPO, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stdout, proc.stderr


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def shown(stdout, number, total):
    """What the session showed for prompt `number`: its text and answers, up to the first key (or the end)."""
    return stdout.split(f"\n[{number}/{total}] ", 1)[1].split("\nrank> ", 1)[0].split("\nstopped at ", 1)[0]


@pytest.fixture(scope="module")
def candidates(tmp_path_factory):
    """Five comparisons of the built-in task in three formats (a ranking of three, pairs, a ranking of two):
    the first two with answers whose gold scores are known by hand."""
    path = tmp_path_factory.mktemp("cand") / "candidates.jsonl"
    records = [{"prompt": BANANA, "answers": list(BANANA_ANSWERS)},
               {"prompt": SUM, "chosen": " 3 plus 4 is 7.", "rejected": " 3 plus 4 is 8."},
               {"prompt": COW, "chosen": " A cow says moo.", "rejected": " A cow says woof."},
               {"prompt": COW, "answers": [" Moo.", " A cow goes moo."]},
               {"prompt": BANANA, "chosen": " It is yellow.", "rejected": " A banana is blue."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory):
    """An untrained one-layer model with the task's compact vocabulary: made in a blink, its answers are
    noise (with words outside the task, which the reward model must spell), which is all we need."""
    tok = Tokenizer.for_texts(task.vocabulary_texts())
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sft") / "ckpt.pt"
    save_checkpoint(path, GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32)),
                    "sft", 0, {}, tok.state())
    return path


POLICY_FLAGS = ("--k", 3, "--n", 4, "--max_new_tokens", 12, "--device", "cpu")
POLICY_KEYS = ["213", "t", "312", "s"]


@pytest.fixture(scope="module")
def policy_session(sft_ckpt, tmp_path_factory):
    """One uninterrupted session on the policy's answers: (labels file, stdout)."""
    out = tmp_path_factory.mktemp("policy") / "labels.jsonl"
    code, stdout, err = label("--policy", sft_ckpt, *POLICY_FLAGS, "--out", out, stdin="\n".join(POLICY_KEYS) + "\n")
    assert code == 0, err
    return out, stdout


# -----------------------------------------------------------------------------
# The pieces


@pytest.mark.parametrize("line, k, expected", [
    ("213", 3, ("rank", [1, 0, 2])), (" 2 1 3 ", 3, ("rank", [1, 0, 2])), ("4123", 4, ("rank", [3, 0, 1, 2])),
    ("2", 2, ("rank", [1, 0])), ("1", 2, ("rank", [0, 1])), ("21", 2, ("rank", [1, 0])),
    ("T", 3, ("tie", None)), ("s", 2, ("skip", None)), ("q", 4, ("quit", None)), ("?", 2, ("help", None)),
    ("2", 3, None), ("21", 3, None), ("5", 2, None), ("11", 2, None), ("3", 2, None), ("x", 2, None), ("", 2, None),
    ("²", 2, None), ("1234", 3, None),
])
def test_parse_key(line, k, expected):
    """A ranking names every answer once, best first (two answers: one digit is enough); a letter is a
    command; anything else (a digit out of range, a repeat, a partial ranking, nothing) is no key."""
    assert parse_key(line, k) == expected


def test_gold_agreement_counts_the_pairs_the_judge_tells_apart():
    """Pairs with equal gold scores are left out; the rest agree when the better-ranked answer has more gold."""
    gold = [3.0, 2.0, 1.0, 2.0]
    assert gold_agreement([0, 1, 2, 3], gold) == (4, 5)  # 1 and 3 tie; 3 is ranked below 2 (1.0 < 2.0): a miss
    assert gold_agreement([1, 2, 3, 0], gold) == (1, 5)  # only 1 over 2 (2.0 > 1.0) agrees
    assert gold_agreement([2, 1, 3, 0], gold) == (0, 5)  # the judge's order reversed
    assert gold_agreement([1, 3], gold) == (0, 0)
    # the hand-computed scores the sessions below rely on; a prompt outside the task has none
    assert gold_scores(BANANA, list(BANANA_ANSWERS)) == list(BANANA_ANSWERS.values())
    assert gold_scores(SUM, list(SUM_ANSWERS)) == list(SUM_ANSWERS.values())
    assert gold_scores("Human: Hello?\n\nAssistant:", [" Hi.", " Yo."]) is None


def test_tie_and_skip_lines_are_validated_and_skipped(tmp_path, capsys):
    """load_preferences and load_demonstrations read label.py's file: rankings as they are, ties and skips
    counted and left out; a tie that is not true or false is an error naming the line."""
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps({"prompt": SUM, "answers": list(SUM_ANSWERS), "labeller": "human"}) + "\n"
                    + json.dumps({"prompt": COW, "answers": [" Moo.", " Woof."], "tie": True}) + "\n"
                    + json.dumps({"prompt": COW, "answers": [" Moo.", " Woof."], "skip": True}) + "\n"
                    + json.dumps({"prompt": COW, "answers": [" Moo.", " Woof."], "tie": False}) + "\n")
    assert load_preferences(path) == [{"prompt": SUM, "answers": list(SUM_ANSWERS)},
                                      {"prompt": COW, "answers": [" Moo.", " Woof."]}]
    assert f"{path}: skipped 2 line(s) with a tie or a skip (no order to learn) (line 2, 3)" in capsys.readouterr().out
    assert [d["response"] for d in load_demonstrations(path)] == [" 3 plus 4 is 7.", " Moo."]
    path.write_text(json.dumps({"prompt": COW, "answers": [" Moo.", " Woof."], "tie": "yes"}) + "\n")
    with pytest.raises(DataError, match="labels.jsonl:1: field 'tie' must be true or false"):
        load_preferences(path)


# -----------------------------------------------------------------------------
# Sessions


def test_session_from_a_file_with_tie_skip_bad_keys_and_a_resume(candidates, tmp_path, capsys):
    """A file's answers are shown shuffled; a full ranking, the two-answer shortcut, a tie and a skip are
    one line each, best first, after bad keys that only ask again; the end of the input stops the session
    (exit 0, nothing written for the prompt on screen); the same command resumes at that prompt; the
    reward model's loader reads the file back; the agreement with the gold judge is counted by hand."""
    out = tmp_path / "labels.jsonl"
    items = candidate_items(load_preferences(candidates), 0, 1337)  # what the session shows, in its order
    assert any(answers != r["answers"] for (_, answers), r in zip(items, load_preferences(candidates)))
    banana, sum_, tie, skip, last = (answers for _, answers in items)
    best_first = "".join(str(banana.index(a) + 1) for a in BANANA_ANSWERS)  # the gold order: 3 pairs agree
    worse = str(sum_.index(" 3 plus 4 is 8.") + 1)  # the gold judge's worse answer: its 1 pair disagrees
    code, stdout, err = label("--candidates", candidates, "--out", out, stdin=f"x\n{best_first}\n5\n\n{worse}\nt\ns\n")
    assert code == 0, err
    assert shown(stdout, 1, 5) == BANANA + "".join(f"\n  {i}) {a.strip()}" for i, a in enumerate(banana, start=1))
    assert stdout.count("is not a key here") == 3  # x, 5 and the empty line; each asks the same prompt again
    assert "('5' is not a key here: rank the 2 answers best first, each once, e.g. 2 (or 21); or t tie" in stdout
    assert "you agreed on 3 of 3 pairs here, 3 of 3 pairs (100%) so far" in stdout
    assert "you agreed on 0 of 1 pairs here, 3 of 4 pairs (75%) so far" in stdout
    assert stdout.endswith(f"stopped at prompt 5 of 5, nothing written for it; 4 judged in {out}: run the same command "
                           "to continue\nthis session, you agreed with the gold judge on 3 of 4 pairs (75%)\n"
                           f"{out} as a whole (2 rankings on the built-in task): agreed with the gold judge on 3 of 4 "
                           "pairs (75%)\n")
    human = {"labeller": "human"}
    assert lines(out) == [{"prompt": BANANA, "answers": list(BANANA_ANSWERS), **human},
                          {"prompt": SUM, "answers": [" 3 plus 4 is 8.", " 3 plus 4 is 7."], **human},
                          {"prompt": COW, "answers": tie, "tie": True, **human},
                          {"prompt": COW, "answers": skip, "skip": True, **human}]

    code, again, err = label("--candidates", candidates, "--out", out, stdin="1\n")
    assert code == 0, err
    assert "resuming: 4 judgements already in" in again and "[4/5]" not in again
    assert shown(again, 5, 5) == shown(stdout, 5, 5)
    assert "\nall 5 prompts of this session are judged in" in again
    assert lines(out)[4] == {"prompt": BANANA, "answers": last, **human}

    capsys.readouterr()
    assert load_preferences(out) == [{"prompt": BANANA, "answers": list(BANANA_ANSWERS)},
                                     {"prompt": SUM, "answers": [" 3 plus 4 is 8.", " 3 plus 4 is 7."]},
                                     {"prompt": BANANA, "answers": last}]
    assert "skipped 2 line(s) with a tie or a skip (no order to learn) (line 3, 4)" in capsys.readouterr().out


def test_an_interrupted_policy_session_resumes_as_if_uninterrupted(sft_ckpt, policy_session, tmp_path):
    """Sampled answers are a fixed function of the flags: a session stopped with q (nothing after it is
    read) and run again writes exactly the lines of an uninterrupted one, and shows the same answers for
    the prompt it resumes at."""
    whole, whole_stdout = policy_session
    out = tmp_path / "labels.jsonl"
    code, first, err = label("--policy", sft_ckpt, *POLICY_FLAGS, "--out", out, stdin=f"{POLICY_KEYS[0]}\nq\n213\n")
    assert code == 0, err
    assert len(lines(out)) == 1 and "stopped at prompt 2 of 4, nothing written for it; 1 judged in" in first
    code, second, err = label("--policy", sft_ckpt, *POLICY_FLAGS, "--out", out, stdin="\n".join(POLICY_KEYS[1:]))
    assert code == 0, err
    assert "resuming: 1 judgement already in" in second and "[1/4]" not in second
    assert shown(first, 2, 4) == shown(second, 2, 4) == shown(whole_stdout, 2, 4)
    assert out.read_text() == whole.read_text()
    assert [("tie" in r, "skip" in r) for r in lines(out)] == [(False, False), (True, False), (False, False),
                                                               (False, True)]


def test_train_reward_trains_on_the_labels(sft_ckpt, policy_session, tmp_path):
    """train_reward.py --data reads a labelling session's file (the policy's made-up words spelled with
    the compact vocabulary's tokens) and trains on its rankings."""
    labels, _ = policy_session
    code, stdout, err = label("--sft", sft_ckpt, "--data", labels, "--out_dir", tmp_path / "reward", "--batch_size", 1,
                              "--max_iters", 1, "--eval_interval", 1, "--device", "cpu", script="train_reward.py")
    assert code == 0, err
    assert "skipped 2 line(s) with a tie or a skip" in stdout
    assert "data: 1 prompts (3 pairs) train, 1 eval" in stdout
    assert (tmp_path / "reward" / "ckpt.pt").is_file()


def readme_labeller_commands():
    """The commands of README.md's "Be the labeller" item, in their order, each as its words."""
    readme = (REPO / "README.md").read_text()
    item = readme.split("- **Be the labeller.**", 1)[1].split("\n- **", 1)[0]
    commands = re.findall(r"`(python [^`]+)`|^ {6}(python [^#\n]+)", item, flags=re.MULTILINE)
    return [shlex.split(inline or block) for inline, block in commands]


def test_readme_labeller_commands_work_as_written(sft_ckpt, tmp_path):
    """After the session the README shows (ten prompts, two answers each, a tie and a skip among them), its
    commands train a reward model on the labels alone and beside the simulated labellers', run as written in
    a folder laid out as pipeline.sh lays it out: a short session's few comparisons make each step's whole
    batch. The run beside the simulated labellers gets the smaller --n_train and --max_iters the README names
    for a shorter run."""
    label_cmd, alone_cmd, beside_cmd = readme_labeller_commands()
    assert label_cmd[:2] == ["python", "tools/label.py"] and "--data" in alone_cmd and "--extra_data" in beside_cmd
    (tmp_path / "out" / "sft").mkdir(parents=True)
    shutil.copy(sft_ckpt, tmp_path / "out" / "sft" / "ckpt.pt")

    def run(words, stdin="", extra=()):
        proc = subprocess.run([sys.executable, str(REPO / words[1]), *words[2:], *map(str, extra)], input=stdin,
                              capture_output=True, text=True, cwd=tmp_path, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    session = run(label_cmd, stdin="2\n1\nt\n2\n2\ns\n1\n2\n1\n2\n")
    assert "[10/10]" in session and "all 10 prompts of this session are judged in labels.jsonl" in session
    alone = run(alone_cmd)
    assert "data: 7 prompts (7 pairs) train, 1 eval, from labels.jsonl" in alone
    assert "labels.jsonl: 7 comparisons to train on, fewer than --batch_size 16: each step takes all 7" in alone
    beside = run(beside_cmd, extra=("--n_train", 16, "--max_iters", 10))
    assert "labels.jsonl: 8 more comparisons to train on" in beside
    for out_dir in (alone_cmd, beside_cmd):
        assert (tmp_path / out_dir[out_dir.index("--out_dir") + 1] / "ckpt.pt").is_file()


def test_one_ranking_is_too_few_to_hold_one_out(sft_ckpt, tmp_path):
    """The eval holds out the last 10% of --data, at least one comparison: one ranking leaves none to train on."""
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"prompt": SUM, "answers": list(SUM_ANSWERS), "labeller": "human"}) + "\n")
    code, stdout, err = label("--sft", sft_ckpt, "--data", labels, "--out_dir", tmp_path / "reward", "--device", "cpu",
                              script="train_reward.py")
    assert code == 2 and err == (f"error: {labels}: no comparison to train on (1 held out for the eval); rank more "
                                 "answers (ties and skips teach no order), or pass --eval_data FILE\n")


def test_a_session_that_judged_nothing_leaves_no_file(candidates, tmp_path):
    """The labels file is made at the first judgement: quitting at once leaves nothing for train_reward.py to
    trip over."""
    out = tmp_path / "labels.jsonl"
    code, stdout, err = label("--candidates", candidates, "--out", out, stdin="q\n")
    assert code == 0, err
    assert f"stopped at prompt 1 of 5, nothing written for it; 0 judged in {out}" in stdout
    assert not out.exists()


def test_ctrl_c_stops_the_session_cleanly(candidates, tmp_path):
    """Ctrl-C while the tool waits for a key (or is about to): exit 0, the judgements made are kept, none
    for the prompt on screen, and the message says how to continue."""
    out = tmp_path / "labels.jsonl"
    proc = subprocess.Popen([sys.executable, "tools/label.py", "--candidates", candidates, "--out", out], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    proc.stdin.write("t\n")
    proc.stdin.flush()
    while (line := proc.stdout.readline()) and not line.startswith("[2/5]"):
        pass
    while (line := proc.stdout.readline()) and not line.startswith("  2) "):  # prompt 2 shown: the tool waits
        pass
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    # At the question, ask() stops ("stopped at prompt 2 of 5, ..."); a moment before it, main() does.
    assert stdout.startswith(("stopped at prompt 2 of 5", "\nstopped;")), stdout
    assert stdout.endswith(": run the same command to continue\n"), stdout
    assert [r.get("tie") for r in lines(out)] == [True]


# -----------------------------------------------------------------------------
# Refusals: one line, exit 2, no traceback


@pytest.mark.parametrize("flags, message", [
    ((), "error: pass --policy CKPT (rank its sampled answers) or --candidates FILE"),
    (("--policy", "x.pt", "--candidates", "CANDIDATES"), "error: pass --policy CKPT"),
    (("--policy", "x.pt", "--k", 5), "error: --k must be 2 to 4"),
    (("--policy", "x.pt", "--n", 0), "error: --n must be positive (0, all of it, needs --prompts or --candidates)"),
    (("--candidates", "CANDIDATES", "--out", "tests"), "error: --out tests is a folder"),
    (("--candidates", "CANDIDATES", "--out", "CANDIDATES"), "error: --out must not be the --candidates file"),
    (("--policy", "x.pt"), "error: x.pt: no such checkpoint"),
])
def test_bad_flags_are_one_line(candidates, flags, message):
    """Flags that cannot work, and a missing checkpoint, stop the tool before it asks anything."""
    code, stdout, err = label(*(candidates if f == "CANDIDATES" else f for f in flags), stdin="1\n")
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(message), err


def test_broken_labels_file_is_named_not_overwritten(candidates, tmp_path):
    """A line of --out that is not JSON stops the tool with its line, rather than a session that starts over."""
    out = tmp_path / "labels.jsonl"
    out.write_text('{"prompt": "a", "answers": ["b", "c"]}\n{"prompt": \n')
    code, stdout, err = label("--candidates", candidates, "--out", out, stdin="1\n")
    assert code == 2 and err == f"error: {out}:2: not valid JSON (Expecting value); fix or delete that line\n"


def test_stdin_from_dev_null_is_refused_unless_the_session_is_finished(candidates, tmp_path):
    """/dev/null (what a job started without input gets) would end the session before its first key:
    refused with one line, before anything is shown or written. A finished session asks nothing: with the
    same stdin it says that it is finished."""
    out = tmp_path / "labels.jsonl"
    proc = subprocess.run([sys.executable, "tools/label.py", "--candidates", candidates, "--out", out], cwd=REPO,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["error: stdin is neither a terminal, a file nor a pipe; run tools/label.py in "
                                        "a terminal or pipe the keys in (e.g. printf '21\\n12\\n' | python "
                                        "tools/label.py ...)"]
    assert not out.exists()
    code, stdout, err = label("--candidates", candidates, "--out", out, "--n", 2, stdin="123\n1\n")
    assert code == 0, err
    proc = subprocess.run([sys.executable, "tools/label.py", "--candidates", candidates, "--out", out, "--n", "2"],
                          cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming: 2 judgements already in {out}\n\nall 2 prompts of this session are judged in {out}\n" \
        in proc.stdout
