"""tools/coursework.py: the exercise markers are well formed and change nothing; the student version holds the
files git tracks, differs from this repository only inside the markers, fails exactly the tests of the
exercises and passes every other unit test of the files they touch; planted wrong answers fail a check that
says what was expected and what came back; list, grade and docs/coursework.md count the same tests; grade
passes the complete repository; the commands as a user meets them."""

import ast
import functools
import importlib
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

from tools import coursework
from tools.coursework import END_TO_END, EXERCISES, exercise_regions, find_regions, names, run_pytest, student_text
from support.errors import UsageError

TABLE = {e.name: e for e in EXERCISES}


def coursework_cli(*args):
    """Run tools/coursework.py as a user does; (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "tools/coursework.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


@functools.cache
def regions_of_this_checkout():
    return exercise_regions()


def complete_regions():
    """The regions of this checkout, or a skip in a student version (an exercise still a stub): it has no
    complete code to compare with."""
    regions = regions_of_this_checkout()
    stubs = [name for name in (e.name for e in EXERCISES)
             if coursework.is_stub((REPO / regions[name].path).read_text(), regions[name])]
    if stubs:
        pytest.skip(f"a student version: exercise(s) {', '.join(stubs)} not written yet (coursework.py grade . says "
                    "which tests they need)")
    return regions


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """The student version of this checkout, written by the command as an instructor runs it."""
    complete_regions()
    try:
        coursework.repo_files()
    except UsageError as e:  # a copy without .git: no file list to copy from
        pytest.skip(str(e))
    folder = tmp_path_factory.mktemp("coursework") / "student"
    code, out, err = coursework_cli("student", "--to", folder)
    assert code == 0, err
    assert f"{len(EXERCISES)} exercise(s) removed" in out
    return folder


def test_markers_are_well_formed_and_change_nothing():
    regions = complete_regions()
    assert sorted(regions) == sorted(e.name for e in EXERCISES)
    for region in regions.values():
        text = (REPO / region.path).read_text()
        lines = text.splitlines()
        # the markers are comments: the module's syntax tree is the same without them
        bare = "\n".join(line for i, line in enumerate(lines) if i not in (region.open, region.close))
        assert ast.dump(ast.parse(text)) == ast.dump(ast.parse(bare)), region.name
        # a docstring, where there is one, stays outside the marked lines
        assert not any('"""' in line for line in lines[region.open : region.close]), region.name
    kernels = {name for name, region in regions.items() if region.kernel}
    assert kernels == {"online_softmax", "logprob_lse"}


BAD_MARKERS = [
    ("def f():\n    # exercise a: hint\n    return 1\n", "never closed"),
    ("def f():\n    return 1\n    # end exercise\n", "without its"),
    ("def f():\n    # exercise a: h\n    # exercise b: h\n    return 1\n    # end exercise\n", "opens inside"),
    ("def f():\n    # exercise a: h\n    # only a comment\n    # end exercise\n    return 1\n", "marks no code"),
    ("# exercise a: h\nx = 1\n# end exercise\n", "outside any function"),
    ("def f():\n    # exercise a: say \"hi\"\n    return 1\n    # end exercise\n", "double quote"),
    ("def f():\n    # exercise a: h\n    return 1\n        # end exercise\n", "indentation"),
    ('def f():\n    """\n    # exercise a: h\n    """\n    return 1\n    # end exercise\n', "not a comment"),
    ("def f():\n    # exercise a: " + "x" * 100 + "\n    return 1\n    # end exercise\n", "too long"),
]


@pytest.mark.parametrize("text, message", BAD_MARKERS)
def test_bad_markers_are_one_line_errors(text, message):
    with pytest.raises(UsageError, match=message):
        find_regions("f.py", text)


KERNEL_BODY = "        x = x + 1\n        x = x * 1\n"
FUNCTION_BODY = "    return y + 2\n"
MARKED = f"""import triton


@triton.jit
def k(X):
    x = 1
    for i in range(2):
        # exercise a: add one
{KERNEL_BODY}        # end exercise
    return x


def f(y):
    \"\"\"y + 2.\"\"\"
    # exercise b: add two
{FUNCTION_BODY}    # end exercise
"""


def test_student_text_replaces_only_the_body():
    regions = find_regions("f.py", MARKED)
    assert [(r.name, r.function, r.kernel) for r in regions] == [("a", "k", True), ("b", "f", False)]
    kernel_stub = '        tl.static_assert(False, "exercise a: add one")\n'
    function_stub = '    raise NotImplementedError("exercise b: add two")\n'
    student = student_text(MARKED, regions)
    assert student == MARKED.replace(KERNEL_BODY, kernel_stub).replace(FUNCTION_BODY, function_stub)
    assert [coursework.is_stub(student, r) for r in find_regions("f.py", student)] == [True, True]
    # a subset: the other exercise stays complete
    assert student_text(MARKED, regions[1:]) == MARKED.replace(FUNCTION_BODY, function_stub)


def test_student_version_differs_only_inside_the_markers(student):
    files, _ = coursework.repo_files()
    assert sorted(str(p.relative_to(student)) for p in student.rglob("*") if p.is_file()) == files
    regions = complete_regions()
    marked = {r.path for r in regions.values()}
    for path in files:
        ours, theirs = (REPO / path).read_bytes(), (student / path).read_bytes()
        if path not in marked:
            assert ours == theirs, path
            continue
        ours, theirs = ours.decode(), theirs.decode()
        ours_regions, theirs_regions = find_regions(path, ours), find_regions(path, theirs)
        assert [r.name for r in ours_regions] == [r.name for r in theirs_regions], path
        assert all(coursework.is_stub(theirs, r) for r in theirs_regions), path
        # what is left with every body cut out (markers kept) is the same line for line
        assert outside(ours, ours_regions) == outside(theirs, theirs_regions), path


def outside(text, regions):
    """The lines of text outside the bodies of the regions."""
    body = {i for r in regions for i in range(r.open + 1, r.close)}
    return [line for i, line in enumerate(text.splitlines()) if i not in body]


def test_student_version_fails_exactly_the_exercise_tests(student):
    """Every test file an exercise is graded by, run in the student version (the END_TO_END tests aside):
    the tests that fail are exactly the exercises' tests (so every exercise scores 0), and every other test
    passes."""
    modules = sorted({test.split("::")[0] for e in EXERCISES for test in e.tests + e.unit_tests})
    deselect = [arg for test in END_TO_END for arg in ("--deselect", test)]
    results, broken, output, _ = run_pytest(student, [*modules, *deselect], timeout=600)
    assert results and not broken, output[-3000:]
    graded = {node: e.name for node in results for e in EXERCISES for test in e.tests + e.unit_tests
              if names(test, node)}
    assert all(any(names(test, node) for node in graded) for e in EXERCISES for test in e.tests + e.unit_tests)
    # skipped: a test of an optional peer (trl) where it is not installed
    failed = {node for node, (outcome, _) in results.items() if outcome not in ("passed", "skipped")}
    assert failed == set(graded), f"fail, not graded: {sorted(failed - set(graded))}; " \
                                  f"graded, pass: {sorted(set(graded) - failed)}"
    # each fails on its own exercise's stub, not on something the stubs broke elsewhere
    for node, name in graded.items():
        assert f"exercise {name}:" in results[node][1], (node, results[node][1][:300])


def test_grade_prints_the_table_and_a_broken_file_costs_only_its_own_tests(student, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(student, broken)
    source = (broken / "train_ppo.py").read_text()
    (broken / "train_ppo.py").write_text(source.replace("def gae(rewards, values, action_mask, gamma, lam):",
                                                        "def gae(rewards, values, action_mask, gamma, lam)"))
    code, out, err = coursework_cli("grade", broken, "--exercises", "bt_loss,gae")
    assert code == 1, err
    rows = [line.split() for line in out.splitlines()]
    assert [row[0] for row in rows[:4]] == ["exercise", "bt_loss", "gae", "all"]
    n_bt, n_gae = len(TABLE["bt_loss"].tests), len(TABLE["gae"].tests)
    assert [row[-1] for row in rows[1:4]] == [f"0/{n_bt}", f"0/{n_gae}", f"0/{n_bt + n_gae}"]
    # bt_loss ran (and failed on its stub) although the file of gae's tests does not import; the tests that fail
    # the same way share one line
    assert f"bt_loss: {TABLE['bt_loss'].tests[0]} and {n_bt - 1} more: NotImplementedError: exercise bt_loss: " \
           "-log P(chosen beats rejected)" in out
    assert f"gae: {TABLE['gae'].tests[0]} and {n_gae - 1} more: did not run: tests/test_coursework_ppo.py does not " \
           "collect (SyntaxError: expected ':')" in out


def test_grade_passes_the_exercises_of_the_complete_repository():
    """grade's table on this checkout says every test passed, for the exercises whose tests take seconds:
    every exercise test runs in this suite anyway (the kernels' take minutes under the interpreter), and
    test_student_version_fails_exactly_the_exercise_tests checks that each one is graded."""
    complete_regions()
    quick = [e.name for e in EXERCISES if e.name not in ("online_softmax", "logprob_lse")]
    code, out, err = coursework_cli("grade", ".", "--exercises", ",".join(quick))
    assert code == 0, out + err
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines() if line.split()}
    assert {name: rows[name] for name in quick} == {name: f"{len(TABLE[name].tests)}/{len(TABLE[name].tests)}"
                                                     for name in quick}
    total = sum(len(TABLE[name].tests) for name in quick)
    assert rows["all"] == f"{total}/{total}"


def test_every_test_named_exists_and_every_check_is_graded():
    """EXERCISES and END_TO_END name tests by hand: each must be a test function of its file, and each check in
    the checks' files must be graded by its exercise (the name says which)."""
    for test in [t for e in EXERCISES for t in e.tests + e.unit_tests] + list(END_TO_END):
        file, _, name = test.partition("::")
        assert (REPO / file).is_file(), test
        if name:
            tree = ast.parse((REPO / file).read_text())
            assert name.split("[")[0] in {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}, test
    graded = {t for e in EXERCISES for t in e.tests}
    for path in sorted((REPO / "tests").glob("test_coursework_*.py")):
        for f in ast.parse(path.read_text()).body:
            if isinstance(f, ast.FunctionDef) and f.name.startswith("test_"):
                test = f"tests/{path.name}::{f.name}"
                assert test in graded, f"{test} is graded by no exercise"
                assert any(test in e.tests and f.name.startswith(f"test_{e.name}_") for e in EXERCISES), test


@pytest.mark.parametrize("args, message", [
    (["student"], "--to is needed"),
    (["student", "--to", "{repo}/tests"], "exists and is not an empty folder"),
    (["student", "--to", "{repo}/new_student_folder"], "inside this repository"),
    (["student", "--to", "{tmp}/new", "--exercises", "gae,nope"], "--exercises 'gae,nope'"),
    (["grade", "{tmp}/new"], "not a copy of this repository"),
    (["teach"], "unknown command 'teach'"),
    ([], "give a command"),
])
def test_bad_commands_are_refused_before_any_work(args, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        coursework.main([arg.format(repo=REPO, tmp=tmp_path) for arg in args])
    assert not (REPO / "new_student_folder").exists() and not (tmp_path / "new").exists()


def test_a_bad_command_is_one_error_line():
    code, out, err = coursework_cli("student", "--to", "tests")
    assert code == 2 and err == "error: --to tests exists and is not an empty folder; choose a new one\n"


def test_list_and_the_doc_count_the_tests_grade_counts():
    """One number of tests per exercise, len(Exercise.tests): grade's denominators (checked by the tests that
    run grade), list's last column, and docs/coursework.md's table and its example of grade's output."""
    code, out, _ = coursework_cli("list")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert list(rows) == list(TABLE)
    for e in EXERCISES:
        assert e.where in rows[e.name] and e.topic in rows[e.name] and rows[e.name].split()[-1] == str(len(e.tests))

    doc = (REPO / "docs" / "coursework.md").read_text()
    table = {m[0]: m[1:] for m in re.findall(r"^\| `(\w+)` \| `([^`]+)` \| ([^|]+?) \| (\d+) \|", doc, re.M)}
    assert table == {e.name: (e.where, e.topic, str(len(e.tests))) for e in EXERCISES}
    shown = {m[0]: (int(m[1]), int(m[2])) for m in re.findall(r"^(\w+) .* (\d+)/(\d+)$", doc, re.M)}
    passed, total = shown.pop("all")
    assert {name: n for name, (_, n) in shown.items()} == {e.name: len(e.tests) for e in EXERCISES}
    assert total == sum(len(e.tests) for e in EXERCISES) and passed == sum(p for p, _ in shown.values())


def test_the_student_version_holds_only_what_git_tracks(tmp_path):
    """A lecturer's untracked file (labels.jsonl) stays out of the student version, and the command says so;
    run from a folder that is not a git checkout, the command is one error line saying what to do."""
    files, _ = coursework.repo_files()
    source = tmp_path / "course"
    for path in files:
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, source / path)
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tmp_path))  # no git checkout above tmp_path counts

    def student(to):
        proc = subprocess.run([sys.executable, "tools/coursework.py", "student", "--to", str(to)], cwd=source,
                              env=env, capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stdout, proc.stderr

    code, out, err = student(tmp_path / "not_a_checkout")
    assert code == 2 and err == f"error: {source} is not a git checkout (git ls-files failed): the student version " \
                                "holds only the files git tracks; run this from a clone of the course's repository\n"
    subprocess.run(["git", "init", "-q"], cwd=source, env=env, check=True)
    subprocess.run(["git", "add", "-A"], cwd=source, env=env, check=True)
    (source / "labels.jsonl").write_text('{"prompt": "a lecturer\'s labels"}\n')
    (source / "out").mkdir()
    (source / "out" / "ckpt.pt").write_text("ignored by .gitignore")
    code, out, err = student(tmp_path / "student")
    assert code == 0, err
    written = sorted(str(p.relative_to(tmp_path / "student")) for p in (tmp_path / "student").rglob("*") if p.is_file())
    assert written == files
    assert "left out, as git does not track them: labels.jsonl (git add the ones students need" in out


# -----------------------------------------------------------------------------
# Planted wrong answers: each fails a check that says what was expected and what came back

# (exercise, the wrong answer, its body, the check that must catch it, what that check's message must say)
PLANTED = [
    ("sft_mask", "one column late", """
        targets = torch.full_like(idx, IGNORE)
        for b, (p, a) in enumerate(examples):
            seq = (p + a)[1:]
            targets[b, : len(seq)] = torch.tensor(seq)
            targets[b, : len(p)] = IGNORE  # one too many: the first answer token is lost
     """, "test_sft_mask_puts_each_answer_token_where_it_is_predicted",
     "first difference at [0, 2]: expected 21, came back -100"),
    ("sft_mask", "the prompt kept", """
        targets = torch.full_like(idx, IGNORE)
        for b, (p, a) in enumerate(examples):
            targets[b, : len(p) + len(a) - 1] = torch.tensor((p + a)[1:])
     """, "test_sft_mask_ignores_the_prompt", "first difference at [0]: expected -100, came back 12"),
    ("sft_mask", "padded with the pad id", """
        targets = torch.full_like(idx, pad_id)
        for b, (p, a) in enumerate(examples):
            targets[b, : len(p) - 1] = IGNORE
            targets[b, len(p) - 1 : len(p) - 1 + len(a)] = torch.tensor(a)
     """, "test_sft_mask_ignores_the_padding", "first difference at [0]: expected -100, came back 50256"),
    ("bt_loss", "the wrong sign", """
        diff = r_rejected - r_chosen
        if margin is not None:
            diff = diff - margin
        return -F.logsigmoid(diff)
     """, "test_bt_loss_equals_hand_computation", "first difference at [0]: expected 0.3133, came back 1.313"),
    ("bt_loss", "the mean where one value per pair belongs", """
        diff = r_chosen - r_rejected
        if margin is not None:
            diff = diff - margin
        return -F.logsigmoid(diff).mean()
     """, "test_bt_loss_is_one_value_per_pair", "expected one value per pair, shape (3,)"),
    ("bt_loss", "the margin added", """
        diff = r_chosen - r_rejected
        if margin is not None:
            diff = diff + margin
        return -F.logsigmoid(diff)
     """, "test_bt_loss_subtracts_the_margin", "first difference at [0]"),
    ("bt_loss", "log of sigmoid", """
        diff = r_chosen - r_rejected
        if margin is not None:
            diff = diff - margin
        return -torch.log(torch.sigmoid(diff))
     """, "test_bt_loss_is_finite_for_a_pair_wrong_by_a_mile", "expected [20000], came back [inf]"),
    ("reward_at_eos", "the last column", """
        h_last = hidden[:, -1]  # (B, C)
     """, "test_reward_at_eos_reads_the_last_real_token_with_right_padding",
     "expected [4, 16, 20], came back [6, 16, 26]"),
    ("reward_at_eos", "the count of real tokens", """
        h_last = hidden[torch.arange(hidden.size(0)), attention_mask.sum(1) - 1]  # (B, C)
     """, "test_reward_at_eos_reads_the_last_real_token_with_left_padding",
     "expected [6, 16, 26], came back [4, 16, 20]"),
    ("kl_rewards", "the KL the wrong way round", """
        kl = (logp_ref - logp) * action_mask
        rewards = -kl_coef * kl
        rewards[torch.arange(len(score)), last_token_index(action_mask)] += score
        return rewards, kl
     """, "test_kl_rewards_kl_is_logp_minus_logp_ref_on_the_actions",
     "first difference at [0, 2]: expected 0.5, came back -0.5"),
    ("kl_rewards", "the KL off the mask too", """
        kl = logp - logp_ref
        rewards = -kl_coef * kl
        rewards[torch.arange(len(score)), last_token_index(action_mask)] += score
        return rewards, kl
     """, "test_kl_rewards_kl_is_logp_minus_logp_ref_on_the_actions",
     "first difference at [0, 0]: expected 0, came back -8"),
    ("kl_rewards", "the penalty with the wrong sign", """
        kl = (logp - logp_ref) * action_mask
        rewards = kl_coef * kl
        rewards[torch.arange(len(score)), last_token_index(action_mask)] += score
        return rewards, kl
     """, "test_kl_rewards_penalise_the_kl_on_every_action",
     "first difference at [0, 2]: expected -0.25, came back 0.25"),
    ("kl_rewards", "the score on the last column", """
        kl = (logp - logp_ref) * action_mask
        rewards = -kl_coef * kl
        rewards[:, -1] += score
        return rewards, kl
     """, "test_kl_rewards_give_the_score_on_the_last_action_of_each_row",
     "first difference at [0, 3]: expected 2, came back 0"),
    ("gae", "a carry across the mask", """
        advantages = torch.zeros_like(rewards)
        next_advantage = torch.zeros_like(rewards[:, 0])
        next_value = torch.zeros_like(rewards[:, 0])
        for t in reversed(range(rewards.size(1))):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            next_advantage = delta + gamma * lam * next_advantage
            advantages[:, t] = next_advantage * action_mask[:, t]
            next_value = values[:, t]
        returns = (advantages + values) * action_mask
        return advantages, returns
     """, "test_gae_carries_nothing_across_the_mask", "first difference at [0, 1]"),
    ("gae", "returns off the mask", """
        advantages = torch.zeros_like(rewards)
        next_advantage = torch.zeros_like(rewards[:, 0])
        next_value = torch.zeros_like(rewards[:, 0])
        for t in reversed(range(rewards.size(1))):
            m = action_mask[:, t]
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            advantages[:, t] = (delta + gamma * lam * next_advantage) * m
            next_advantage = advantages[:, t]
            next_value = values[:, t] * m
        return advantages, advantages + values
     """, "test_gae_returns_are_zero_off_the_mask", "first difference at [0, 0]: expected 0, came back 3"),
    ("gae", "no lam", """
        advantages = torch.zeros_like(rewards)
        next_advantage = torch.zeros_like(rewards[:, 0])
        next_value = torch.zeros_like(rewards[:, 0])
        for t in reversed(range(rewards.size(1))):
            m = action_mask[:, t]
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            advantages[:, t] = (delta + gamma * next_advantage) * m
            next_advantage = advantages[:, t]
            next_value = values[:, t] * m
        returns = (advantages + values) * action_mask
        return advantages, returns
     """, "test_gae_advantages_equal_hand_computation", "first difference at [0, 1]"),
    ("policy_loss", "min where the pessimistic max belongs", """
        ratio = torch.exp(logp - logp_old)
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
        loss = masked_mean(torch.min(unclipped, clipped), action_mask)
     """, "test_policy_loss_equals_hand_computation", "expected 0.2, came back"),
    ("policy_loss", "the mean over every token", """
        ratio = torch.exp(logp - logp_old)
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
        loss = torch.max(unclipped, clipped).mean()
     """, "test_policy_loss_averages_over_the_actions_only", "expected 0.2, came back -39.87"),
    ("policy_loss", "the ratio upside down", """
        ratio = torch.exp(logp_old - logp)
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
        loss = masked_mean(torch.max(unclipped, clipped), action_mask)
     """, "test_policy_loss_ratio_is_exp_of_logp_minus_logp_old", "expected 0.2, came back"),
    ("policy_loss", "the ratio detached", """
        ratio = torch.exp(logp - logp_old).detach()
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
        loss = masked_mean(torch.max(unclipped, clipped), action_mask)
     """, "test_policy_loss_gradient_flows_through_the_unclipped_ratios", "came back a NoneType"),
    ("value_loss", "clipped around 0", """
        values_clipped = torch.clamp(values, -clip_value, clip_value)
        err = (values - returns) ** 2
        err_clipped = (values_clipped - returns) ** 2
        loss = 0.5 * masked_mean(torch.max(err, err_clipped), action_mask)
        return loss, masked_mean((err_clipped > err).float(), action_mask)
     """, "test_value_loss_clips_around_the_old_values", "expected 0.4083, came back"),
    ("value_loss", "the mean over every token", """
        values_clipped = values_old + torch.clamp(values - values_old, -clip_value, clip_value)
        err = (values - returns) ** 2
        err_clipped = (values_clipped - returns) ** 2
        loss = 0.5 * torch.max(err, err_clipped).mean()
        return loss, masked_mean((err_clipped > err).float(), action_mask)
     """, "test_value_loss_averages_over_the_actions_only", "expected 0.3625, came back"),
    ("value_loss", "no 0.5", """
        values_clipped = values_old + torch.clamp(values - values_old, -clip_value, clip_value)
        err = (values - returns) ** 2
        err_clipped = (values_clipped - returns) ** 2
        loss = masked_mean(torch.max(err, err_clipped), action_mask)
        return loss, masked_mean((err_clipped > err).float(), action_mask)
     """, "test_value_loss_is_half_the_squared_error_when_nothing_clips", "expected 0.375, came back 0.75"),
    ("value_loss", "the clip fraction of the values clipped", """
        values_clipped = values_old + torch.clamp(values - values_old, -clip_value, clip_value)
        err = (values - returns) ** 2
        err_clipped = (values_clipped - returns) ** 2
        loss = 0.5 * masked_mean(torch.max(err, err_clipped), action_mask)
        return loss, masked_mean((values_clipped != values).float(), action_mask)
     """, "test_value_loss_clip_fraction_counts_where_the_clipped_error_is_larger",
     "expected 0.3333, came back 0.6667"),
    ("group_advantages", "the population std", """
        r = returns.view(-1, group_size)
        centred = r - r.mean(dim=1, keepdim=True)
        if method == "grpo":
            advantage = centred / (r.std(dim=1, unbiased=False, keepdim=True) + 1e-4)
        elif method == "dr_grpo":
            advantage = centred
        else:
            advantage = centred * group_size / (group_size - 1)
        return advantage.reshape(-1, 1) * action_mask
     """, "test_group_advantages_grpo_equal_hand_computation", "first difference at [0, 0]: expected -0.9999"),
    ("group_advantages", "RLOO against the whole group", """
        r = returns.view(-1, group_size)
        centred = r - r.mean(dim=1, keepdim=True)
        if method == "grpo":
            advantage = centred / (r.std(dim=1, keepdim=True) + 1e-4)
        else:
            advantage = centred
        return advantage.reshape(-1, 1) * action_mask
     """, "test_group_advantages_rloo_leaves_each_answer_out_of_its_baseline",
     "first difference at [0, 0]: expected -1.5, came back -1"),
    ("group_advantages", "groups across prompts", """
        r = returns.view(group_size, -1)
        centred = r - r.mean(dim=0, keepdim=True)
        if method == "grpo":
            advantage = centred / (r.std(dim=0, keepdim=True) + 1e-4)
        elif method == "dr_grpo":
            advantage = centred
        else:
            advantage = centred * group_size / (group_size - 1)
        return advantage.reshape(-1, 1) * action_mask
     """, "test_group_advantages_compare_each_answer_with_its_own_prompts_answers",
     "first difference at [0, 0]: expected 0, came back -4"),
    ("group_advantages", "off the actions too", """
        r = returns.view(-1, group_size)
        centred = r - r.mean(dim=1, keepdim=True)
        if method == "grpo":
            advantage = centred / (r.std(dim=1, keepdim=True) + 1e-4)
        elif method == "dr_grpo":
            advantage = centred
        else:
            advantage = centred * group_size / (group_size - 1)
        return advantage.reshape(-1, 1).expand_as(action_mask)
     """, "test_group_advantages_are_on_every_action_and_0_elsewhere",
     "first difference at [0, 0]: expected 0, came back -1"),
    ("kl_k3", "the ratio upside down", """
        return torch.expm1(-log_r) + log_r
     """, "test_kl_k3_equals_hand_computation", "first difference at [0]: expected 0.3679, came back 0.7183"),
    ("kl_k3", "k2 in its place", """
        return 0.5 * log_r**2
     """, "test_kl_k3_averages_to_the_kl_under_the_policy", "expected 0.4608, came back 0.3075"),
    ("kl_k3", "exp(x) - 1", """
        return torch.exp(log_r) - 1 - log_r
     """, "test_kl_k3_is_accurate_when_the_policies_nearly_agree", "came back [0]"),
    ("dpo_loss", "no beta", """
        reward_w, reward_l = logp_w - ref_w, logp_l - ref_l
        return -F.logsigmoid(reward_w - reward_l), reward_w, reward_l
     """, "test_dpo_loss_rewards_are_beta_times_the_log_ratio_to_the_reference",
     "first difference at [0]: expected 0.25, came back 0.5"),
    ("dpo_loss", "the log-ratio the wrong way round", """
        reward_w, reward_l = beta * (ref_w - logp_w), beta * (ref_l - logp_l)
        return -F.logsigmoid(reward_w - reward_l), reward_w, reward_l
     """, "test_dpo_loss_rewards_are_beta_times_the_log_ratio_to_the_reference",
     "first difference at [0]: expected 0.25, came back -0.25"),
    ("dpo_loss", "the preference the wrong way round", """
        reward_w, reward_l = beta * (logp_w - ref_w), beta * (logp_l - ref_l)
        return -F.logsigmoid(reward_l - reward_w), reward_w, reward_l
     """, "test_dpo_loss_equals_hand_computation", "first difference at [0]: expected 0.3869, came back 1.137"),
    ("dpo_loss", "the mean where one value per pair belongs", """
        reward_w, reward_l = beta * (logp_w - ref_w), beta * (logp_l - ref_l)
        return -F.logsigmoid(reward_w - reward_l).mean(), reward_w, reward_l
     """, "test_dpo_loss_is_one_value_per_pair", "expected one value per pair, shape (3,)"),
    ("dpo_loss", "log of sigmoid", """
        reward_w, reward_l = beta * (logp_w - ref_w), beta * (logp_l - ref_l)
        return -torch.log(torch.sigmoid(reward_w - reward_l)), reward_w, reward_l
     """, "test_dpo_loss_is_finite_for_a_pair_wrong_by_a_mile", "expected [20000], came back [inf]"),
]


def with_body(text, region, body):
    """text with the marked body of region replaced by body (dedented, then at the region's indentation)."""
    lines = text.splitlines(keepends=True)
    body = textwrap.indent(textwrap.dedent(body).strip("\n") + "\n", region.indent)
    return "".join(lines[: region.open + 1]) + body + "".join(lines[region.close :])


def planted(exercise, body):
    """(the module or class that holds the exercise's function, its name, the function with body planted in it),
    compiled from the planted source in a copy of its module's namespace."""
    region = regions_of_this_checkout()[exercise]
    module = importlib.import_module(region.path.removesuffix(".py").replace("/", "."))
    text = with_body((REPO / region.path).read_text(), region, body)
    node = next(node for qualname, node, _ in coursework._functions(ast.parse(text)) if qualname == region.function)
    source = textwrap.dedent("".join(text.splitlines(keepends=True)[node.lineno - 1 : node.end_lineno]))
    namespace = dict(vars(module))
    exec(compile(source, f"{region.path} with {exercise} planted", "exec"), namespace)
    *owner, name = region.function.split(".")
    return (getattr(module, owner[0]) if owner else module), name, namespace[name]


def run_checks(exercise):
    """{check name: its message} for the checks of the exercise that fail, each called as pytest would."""
    failed = {}
    for test in TABLE[exercise].tests:
        file, name = test.split("::")
        check = getattr(importlib.import_module(file.removeprefix("tests/").removesuffix(".py")), name)
        try:
            check()
        except Exception as e:
            failed[name] = f"{type(e).__name__}: {e}"
    return failed


@pytest.mark.parametrize("exercise, wrong, body, check, says", PLANTED, ids=[f"{p[0]}: {p[1]}" for p in PLANTED])
def test_a_planted_wrong_answer_fails_a_check_that_says_expected_and_came_back(exercise, wrong, body, check, says,
                                                                               monkeypatch):
    complete_regions()
    monkeypatch.setattr(*planted(exercise, body))
    failed = run_checks(exercise)
    assert check in failed, f"{wrong}: {check} passed; failed: {failed}"
    message = failed[check]
    assert message.startswith("AssertionError: ") and "expected" in message and "came back" in message, message
    assert says in message, message


def test_grade_says_what_each_planted_wrong_answer_expected_and_got(student, tmp_path):
    """One wrong answer planted in each exercise that is not a kernel, as a student would write it: grade gives
    each some of its points and a line per failing check, with what was expected and what came back."""
    folder = tmp_path / "planted"
    shutil.copytree(student, folder)
    chosen = {p[0]: p for p in PLANTED if p[1] in ("one column late", "the margin added", "the last column",
                                                      "the score on the last column", "a carry across the mask",
                                                      "the mean over every token", "clipped around 0",
                                                      "the population std", "exp(x) - 1", "no beta")}
    regions = regions_of_this_checkout()
    for exercise, _, body, _, _ in chosen.values():
        path = folder / regions[exercise].path
        region = next(r for r in find_regions(regions[exercise].path, path.read_text()) if r.name == exercise)
        path.write_text(with_body(path.read_text(), region, body))
    code, out, err = coursework_cli("grade", folder, "--exercises", ",".join(chosen))
    assert code == 1, err
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines() if line.split()}
    for exercise, wrong, _, check, says in chosen.values():
        passed, total = map(int, rows[exercise].split("/"))
        assert 0 < passed < total == len(TABLE[exercise].tests), (wrong, rows[exercise])
        line = next(line for line in out.splitlines() if line.startswith(f"{exercise}: ") and check in line)
        assert "expected" in line and "came back" in line and says in line and "AssertionError" not in line, line
