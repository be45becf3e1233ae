"""tools/coursework.py: the exercise markers are well formed and change nothing; the student version differs from
this repository only inside them, fails exactly the tests of the exercises and passes every other unit test
of the files they touch; grade passes the complete repository; the commands as a user meets them."""

import ast
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

from tools import coursework
from tools.coursework import END_TO_END, EXERCISES, exercise_regions, find_regions, names, run_pytest, student_text
from support.errors import UsageError


def coursework_cli(*args):
    """Run tools/coursework.py as a user does; (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "tools/coursework.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def complete_regions():
    """The regions of this checkout, or a skip in a student version (an exercise still a stub): it has no
    complete code to compare with."""
    regions = exercise_regions()
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
    modules = sorted({test.split("::")[0] for e in EXERCISES for test in e.tests})
    deselect = [arg for test in END_TO_END for arg in ("--deselect", test)]
    results, broken, output, _ = run_pytest(student, [*modules, *deselect], timeout=600)
    assert results and not broken, output[-3000:]
    graded = {node: e.name for node in results for e in EXERCISES for test in e.tests if names(test, node)}
    assert all(any(names(test, node) for node in graded) for e in EXERCISES for test in e.tests)
    failed = {node for node, (outcome, _) in results.items() if outcome != "passed"}
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
    assert [row[-1] for row in rows[1:4]] == ["0/1", "0/2", "0/3"]
    # bt_loss ran (and failed on its stub) although the file of gae's tests does not import
    assert "bt_loss: tests/test_reward.py::test_bradley_terry_loss_equals_hand_computation: NotImplementedError: " \
           "exercise bt_loss: -log sigmoid" in out
    assert "gae: tests/test_ppo.py::test_gae_equals_hand_computation: did not run: tests/test_ppo.py does not " \
           "collect (SyntaxError: expected ':')" in out


def test_grade_passes_the_exercises_of_the_complete_repository():
    """grade's table on this checkout says every test passed, for the six exercises whose tests take seconds:
    every exercise test runs in this suite anyway (the kernels' take minutes under the interpreter), and
    test_student_version_fails_exactly_the_exercise_tests checks that each one is graded."""
    complete_regions()
    quick = ("sft_mask", "bt_loss", "kl_rewards", "gae", "policy_loss", "value_loss")
    code, out, err = coursework_cli("grade", ".", "--exercises", ",".join(quick))
    assert code == 0, out + err
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines() if line.split()}
    expected = {e.name: len(e.tests) for e in EXERCISES if e.name in quick}  # no parametrised tests among them
    assert {name: rows[name] for name in quick} == {name: f"{n}/{n}" for name, n in expected.items()}
    assert rows["all"] == f"{sum(expected.values())}/{sum(expected.values())}"


def test_every_test_named_exists():
    """EXERCISES and END_TO_END name tests by hand: each must be a test function of its file."""
    for test in [t for e in EXERCISES for t in e.tests] + list(END_TO_END):
        file, _, name = test.partition("::")
        assert (REPO / file).is_file(), test
        if name:
            tree = ast.parse((REPO / file).read_text())
            assert name.split("[")[0] in {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}, test


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


def test_list_names_every_exercise():
    code, out, _ = coursework_cli("list")
    assert code == 0
    for e in EXERCISES:
        assert e.name in out and e.where in out and e.topic in out
