"""
Coursework: the student version of this repository, made from the code itself, and graded by its tests.

The pieces a course asks students to write are marked in the code by a comment pair around their body,
the opening one naming the exercise and giving a one-line hint:

    def bradley_terry_loss(r_chosen, r_rejected, margin=None):
        \"\"\"-log sigmoid(r_chosen - r_rejected [- margin]), one value per pair. ...\"\"\"
        # exercise bt_loss: -log P(chosen beats rejected), one per pair (docstring); check: finite when ...
        diff = r_chosen - r_rejected
        ...
        # end exercise

The markers are comments, so the complete code runs as if they were not there. The student version is
the files git tracks, with each marked body replaced by one statement at the body's indentation,

        raise NotImplementedError("exercise bt_loss: -log P(chosen beats rejected), one per pair ...")

and every other line unchanged: the markers, the docstrings and the equations in the comments around the
body included. Inside a @triton.jit kernel a Python raise cannot compile, so there the statement is
tl.static_assert(False, "exercise ..."): the Triton interpreter raises it as an AssertionError with the
hint when the kernel runs, and a GPU compile stops at that line with the hint as its message. Either way
the module still imports and every test file still collects, and the failing test names the exercise.

The exercises and the tests that grade them are listed once, in EXERCISES below, and everything that counts
them (list, grade, docs/coursework.md, checked by tests/test_coursework.py) counts from there. The exercises
that are not kernels are graded by the checks in tests/test_coursework_*.py, one property a test, each
failure saying what was expected and what came back; the kernels by their own tests against the PyTorch
reference. In the student version exactly these and the project's unit tests of the same pieces fail, and
every other unit test passes (tests/test_coursework.py checks it). END_TO_END lists the tests that need the
removed pieces too but grade no single exercise (the training runs, the scripts run as a user meets them,
the GPU compile of the kernels): they pass again once every exercise is written.

    python tools/coursework.py list                               # exercises, where they are, lecture topics
    python tools/coursework.py student --to ../student            # write the student version into a new folder
    python tools/coursework.py grade ../student                   # exercise | lecture topic | tests passed,
                                                                  # then each failure: expected, came back
    python tools/coursework.py grade ../student --exercises gae   # one exercise (comma-separated for several)

docs/coursework.md is the page for instructors.
"""

import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # support/ is one folder up
from support.errors import UsageError
from support.training import check, check_flags, flag, parse_args, run

LINE_LENGTH = 120  # ruff's limit (pyproject.toml): a stub line must fit in it too


@dataclass(frozen=True)
class Exercise:
    """One exercise. Each test in `tests` is one point, earned when it passes (a test named without [params]:
    when every one of its parametrisations passes); `list` and `grade` both count these, so they agree.
    `unit_tests` are the project's own tests that need the same piece: they fail in the student version too
    but are not graded, since the checks in `tests` test what they test, one property each, and say what was
    expected and what came back in the exercise's words."""

    name: str
    where: str  # "file.py:function", the function whose marked lines the student writes
    topic: str  # the lecture topic it belongs to
    tests: tuple  # pytest node ids
    unit_tests: tuple = ()


# The exercises that are not kernels are graded by checks written for grading (tests/test_coursework_*.py, one
# file per lecture file, so a file a student broke costs only its own exercises); the kernels by their own tests.
EXERCISES = (
    Exercise("sft_mask", "train_sft.py:sft_batch", "SFT: the loss on the answer tokens only", (
        "tests/test_coursework_sft.py::test_sft_mask_puts_each_answer_token_where_it_is_predicted",
        "tests/test_coursework_sft.py::test_sft_mask_ignores_the_prompt",
        "tests/test_coursework_sft.py::test_sft_mask_ignores_the_padding",
        "tests/test_coursework_sft.py::test_sft_mask_gives_the_loss_of_each_answer_alone",
    ), unit_tests=(
        "tests/test_sft.py::test_loss_mask_covers_exactly_the_answer_tokens",
        "tests/test_sft.py::test_sft_loss_equals_hand_computation",
    )),
    Exercise("bt_loss", "train_reward.py:bradley_terry_loss", "Reward model: the Bradley-Terry loss", (
        "tests/test_coursework_reward.py::test_bt_loss_is_one_value_per_pair",
        "tests/test_coursework_reward.py::test_bt_loss_equals_hand_computation",
        "tests/test_coursework_reward.py::test_bt_loss_subtracts_the_margin",
        "tests/test_coursework_reward.py::test_bt_loss_is_finite_for_a_pair_wrong_by_a_mile",
    ), unit_tests=(
        "tests/test_reward.py::test_bradley_terry_loss_equals_hand_computation",
    )),
    Exercise("reward_at_eos", "model.py:RewardModel.read_reward", "Reward model: a scalar head at the last token", (
        "tests/test_coursework_model.py::test_reward_at_eos_reads_the_last_real_token_with_right_padding",
        "tests/test_coursework_model.py::test_reward_at_eos_reads_the_last_real_token_with_left_padding",
        "tests/test_coursework_model.py::test_reward_at_eos_reads_each_row_of_an_unpadded_batch",
    ), unit_tests=(
        "tests/test_model.py::test_reward_model_reads_last_real_token_whatever_the_padding",
        "tests/test_reward.py::test_reward_batch_ends_each_answer_with_eos_and_the_model_reads_it",
        "tests/test_reward.py::test_shared_prompts_and_length_buckets_give_each_answer_its_own_reward_and_gradient",
    )),
    Exercise("kl_rewards", "train_ppo.py:per_token_rewards", "PPO: per-token rewards with the KL penalty", (
        "tests/test_coursework_ppo.py::test_kl_rewards_kl_is_logp_minus_logp_ref_on_the_actions",
        "tests/test_coursework_ppo.py::test_kl_rewards_penalise_the_kl_on_every_action",
        "tests/test_coursework_ppo.py::test_kl_rewards_give_the_score_on_the_last_action_of_each_row",
        "tests/test_coursework_ppo.py::test_kl_rewards_equal_hand_computation",
    ), unit_tests=(
        "tests/test_ppo.py::test_kl_penalty_lands_on_answer_tokens_and_score_on_the_last",
    )),
    Exercise("gae", "train_ppo.py:gae", "PPO: generalised advantage estimation", (
        "tests/test_coursework_ppo.py::test_gae_advantages_equal_hand_computation",
        "tests/test_coursework_ppo.py::test_gae_returns_equal_hand_computation",
        "tests/test_coursework_ppo.py::test_gae_with_gamma_and_lam_1_returns_the_reward_to_go",
        "tests/test_coursework_ppo.py::test_gae_carries_nothing_across_the_mask",
        "tests/test_coursework_ppo.py::test_gae_returns_are_zero_off_the_mask",
        "tests/test_coursework_ppo.py::test_gae_rows_do_not_leak_into_each_other",
    ), unit_tests=(
        "tests/test_ppo.py::test_gae_equals_hand_computation",
        "tests/test_ppo.py::test_gae_rows_do_not_leak_into_each_other",
    )),
    Exercise("policy_loss", "train_ppo.py:ppo_policy_loss", "PPO: the clipped surrogate objective", (
        "tests/test_coursework_ppo.py::test_policy_loss_equals_hand_computation",
        "tests/test_coursework_ppo.py::test_policy_loss_ratio_is_exp_of_logp_minus_logp_old",
        "tests/test_coursework_ppo.py::test_policy_loss_averages_over_the_actions_only",
        "tests/test_coursework_ppo.py::test_policy_loss_gradient_flows_through_the_unclipped_ratios",
    ), unit_tests=(
        "tests/test_ppo.py::test_policy_loss_equals_hand_computation",
    )),
    Exercise("value_loss", "train_ppo.py:ppo_value_loss", "PPO: the clipped value loss", (
        "tests/test_coursework_ppo.py::test_value_loss_is_half_the_squared_error_when_nothing_clips",
        "tests/test_coursework_ppo.py::test_value_loss_clips_around_the_old_values",
        "tests/test_coursework_ppo.py::test_value_loss_clip_fraction_counts_where_the_clipped_error_is_larger",
        "tests/test_coursework_ppo.py::test_value_loss_averages_over_the_actions_only",
    ), unit_tests=(
        "tests/test_ppo.py::test_value_loss_clips_around_the_old_values",
    )),
    Exercise("group_advantages", "support/beyond_ppo.py:group_advantages", "Beyond PPO: the group as baseline", (
        "tests/test_coursework_beyond_ppo.py::test_group_advantages_grpo_equal_hand_computation",
        "tests/test_coursework_beyond_ppo.py::test_group_advantages_dr_grpo_is_the_return_minus_the_group_mean",
        "tests/test_coursework_beyond_ppo.py::test_group_advantages_rloo_leaves_each_answer_out_of_its_baseline",
        "tests/test_coursework_beyond_ppo.py::test_group_advantages_compare_each_answer_with_its_own_prompts_answers",
        "tests/test_coursework_beyond_ppo.py::test_group_advantages_are_on_every_action_and_0_elsewhere",
    ), unit_tests=(
        "tests/test_ppo.py::test_group_advantages_equal_hand_computation_on_every_action[grpo-expected0]",
        "tests/test_ppo.py::test_group_advantages_equal_hand_computation_on_every_action[dr_grpo-expected1]",
        "tests/test_ppo.py::test_group_advantages_equal_hand_computation_on_every_action[rloo-expected2]",
        "tests/test_ppo.py::test_rloo_is_the_leave_one_out_mean_in_odd_groups",
    )),
    Exercise("kl_k3", "support/beyond_ppo.py:kl_estimate", "Beyond PPO: the k3 estimate of the KL", (
        "tests/test_coursework_beyond_ppo.py::test_kl_k3_equals_hand_computation",
        "tests/test_coursework_beyond_ppo.py::test_kl_k3_averages_to_the_kl_under_the_policy",
        "tests/test_coursework_beyond_ppo.py::test_kl_k3_is_accurate_when_the_policies_nearly_agree",
    ), unit_tests=(
        "tests/test_ppo.py::test_kl_estimates_on_sampled_tokens_approach_the_exact_kl_k1_and_k3_unbiased",
        "tests/test_ppo.py::test_kl_in_the_loss_k1_has_no_gradient_k2_the_kls_and_k3_the_reverse_kls",
    )),
    Exercise("dpo_loss", "train_dpo.py:dpo_loss", "DPO: Bradley-Terry on the implicit rewards", (
        "tests/test_coursework_dpo.py::test_dpo_loss_rewards_are_beta_times_the_log_ratio_to_the_reference",
        "tests/test_coursework_dpo.py::test_dpo_loss_is_one_value_per_pair",
        "tests/test_coursework_dpo.py::test_dpo_loss_equals_hand_computation",
        "tests/test_coursework_dpo.py::test_dpo_loss_of_the_reference_itself_is_log_2",
        "tests/test_coursework_dpo.py::test_dpo_loss_is_finite_for_a_pair_wrong_by_a_mile",
    ), unit_tests=(
        "tests/test_dpo.py::test_dpo_loss_equals_hand_computation",
    )),
    Exercise("online_softmax", "kernels/flash_attention.py:_attn_fwd_kernel", "Kernels: online softmax (attention)", (
        "tests/test_flash_attention.py::test_fp32_matches_reference",
        "tests/test_flash_attention.py::test_half_precision_matches_reference",
        "tests/test_flash_attention.py::test_left_padding",
        "tests/test_flash_attention.py::test_non_contiguous_inputs_and_sm_scale",
        "tests/test_flash_attention.py::test_gpu_launch_configuration_matches_reference",
        "tests/test_model.py::test_model_loss_and_grads_same_for_every_attn_impl[triton]",
        "tests/test_model.py::test_a_padded_batch_computes_each_row_as_alone_and_zeros_at_the_padding[triton]",
    )),
    Exercise("logprob_lse", "kernels/logprob.py:_logprobs_fwd_kernel", "Kernels: online log-sum-exp (log-probs)", (
        "tests/test_logprob.py::test_logprobs_matches_reference",
        "tests/test_logprob.py::test_logprobs_fp16_and_strided_input",
        "tests/test_logprob.py::test_logprobs_extreme_logits",
        "tests/test_logprob.py::test_uniform_logits_by_hand[triton]",
        "tests/test_logprob.py::test_out_of_range_target_gives_nan",
        "tests/test_logprob.py::test_logprobs_with_masked_logits",
        "tests/test_logprob.py::test_masked_logits_by_hand[triton]",
        "tests/test_logprob.py::test_masked_target_gradient_is_finite[triton]",
        "tests/test_logprob.py::test_kernels_do_not_modify_inputs",
        "tests/test_logprob.py::test_gpu_launch_configuration_matches_reference",
        "tests/test_logprob.py::test_gpu_launch_configuration_linear",
        "tests/test_logprob.py::test_linear_logprobs[triton-dtype0-4]",
        "tests/test_logprob.py::test_linear_logprobs[triton-dtype0-16]",
        "tests/test_logprob.py::test_linear_logprobs[triton-dtype1-4]",
        "tests/test_logprob.py::test_linear_logprobs[triton-dtype1-16]",
        "tests/test_logprob.py::test_linear_logprobs_under_autocast[triton]",
        "tests/test_logprob.py::test_linear_logprobs_keeps_no_logits[triton]",
    )),
)

# Tests that need the removed pieces too, but are not graded per exercise: they need several exercises at
# once, take minutes, or test something else that uses the pieces. The short training runs (and the reports,
# rounds and notebooks built on them), the scripts run as a user meets them (most first train or score with
# tiny models), and every kernel compiled for A100 and H100. They fail in the student version and pass again
# once all exercises are written; a file named without a test stands for all of its tests.
END_TO_END = (
    "tests/test_sft.py::test_short_run_lowers_eval_loss_and_raises_gold",
    "tests/test_sft.py::test_resume_continues_exactly_where_it_stopped",
    "tests/test_reward.py::test_short_run_beats_chance_on_held_out_pairs",
    "tests/test_reward.py::test_offset_makes_the_sft_answers_average_zero",
    "tests/test_reward.py::test_wrong_stage_checkpoint_is_a_one_line_error",
    "tests/test_reward.py::test_evaluate_on_a_single_held_out_pair_is_finite",
    "tests/test_ppo.py::test_short_run_raises_reward_and_keeps_reference_frozen",
    "tests/test_ppo.py::test_resume_continues_exactly",
    "tests/test_ppo.py::test_the_kl_term_goes_where_kl_in_says",
    "tests/test_ppo.py::test_a_critic_free_run_raises_reward_without_a_value_loss",
    "tests/test_ppo.py::test_a_run_on_the_gold_reward_raises_gold",
    "tests/test_dpo.py::test_short_run_starts_at_zero_learns_the_labels_and_keeps_the_reference",
    "tests/test_dpo.py::test_resume_continues_exactly",
    "tests/test_dpo.py::test_a_missing_comparisons_file_names_it",
    "tests/test_bad_input.py",
    "tests/test_chat.py::test_side_by_side_scores_each_answer",
    "tests/test_gpu_check.py::test_dry_run_writes_every_section",
    "tests/test_gpu_paths.py::test_generate_and_the_chat_under_bf16_autocast_with_the_triton_attention",
    "tests/test_gpu_paths.py::test_reward_and_value_heads_compute_in_fp32_under_autocast",
    "tests/test_gpu_paths.py::test_every_stage_runs_on_the_gpu_path",
    "tests/test_gpu_paths.py::test_the_first_ppo_update_recomputes_the_rollouts_log_probs_exactly",
    "tests/test_label.py::test_train_reward_trains_on_the_labels",
    "tests/test_notebooks.py::test_notebook_runs",
    "tests/test_report.py::test_report_has_every_section_and_only_numbers_from_the_files",
    "tests/test_report.py::test_before_and_after_are_scored_answers_and_the_same_every_time",
    "tests/test_rounds.py::test_two_rounds_stopped_in_round_2_and_resumed",
    "tests/test_kernels_compile.py::test_every_launch_compiles",
    "tests/test_kernels_compile.py::test_the_compiled_launches_are_what_the_launchers_choose",
    "tests/test_kernels_compile.py::test_fp32_matmuls_are_exact_fp32",
    "tests/test_logprob.py::test_the_byte_budget_bounds_every_buffer[triton]",
)


# -----------------------------------------------------------------------------
# The markers

OPEN = re.compile(r"^(?P<indent> *)# exercise (?P<name>\w+): (?P<hint>\S.*)$")
CLOSE = re.compile(r"^(?P<indent> *)# end exercise$")


@dataclass(frozen=True)
class Region:
    """One marked body: lines open + 1 .. close - 1 of the file (0-based), between its two markers."""

    name: str
    hint: str
    path: str  # relative to the repository
    open: int  # index of the opening marker line
    close: int  # index of the closing marker line
    indent: str
    function: str  # the enclosing function, "Class.method" for a method
    kernel: bool  # inside a @triton.jit function


def stub_lines(region):
    """What the student version has between the markers: one statement at the body's indentation (wrapped
    after its opening parenthesis if it would pass the line length)."""
    message = f'"exercise {region.name}: {region.hint}"'
    call, args = ("tl.static_assert", f"False, {message}") if region.kernel else ("raise NotImplementedError", message)
    line = f"{region.indent}{call}({args})"
    return [line] if len(line) <= LINE_LENGTH else [f"{region.indent}{call}(", f"{region.indent}    {args})"]


def _functions(tree):
    """(qualified name, node, is a Triton kernel) of every function in a module, outer ones first."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                kernel = any(ast.unparse(d).split("(")[0] in ("triton.jit", "jit") for d in child.decorator_list)
                found.append((prefix + child.name, child, kernel))
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def find_regions(path, text):
    """The marked regions of one file's text, each checked: opened and closed at the same indentation, not
    nested, around at least one line of code indented as deep, inside a function, a hint that fits in a
    string literal and on one stub line; and the markers are comments that change nothing."""
    lines = text.splitlines()
    spans, start = [], None
    for i, line in enumerate(lines):
        where = f"{path}:{i + 1}"
        if OPEN.match(line):
            if start is not None:
                raise UsageError(f"{where}: an exercise opens inside the one of line {start + 1}; close that one first")
            start = i
        elif CLOSE.match(line):
            check(start is not None, f"{where}: '# end exercise' without its '# exercise NAME: hint' above")
            spans.append((start, i))
            start = None
    if start is not None:
        raise UsageError(f"{path}:{start + 1}: exercise never closed; add '# end exercise' after its body")
    if not spans:
        return []

    markers = {i for span in spans for i in span}
    bare = "".join(line + "\n" for i, line in enumerate(lines) if i not in markers)
    try:
        same = ast.dump(ast.parse(text)) == ast.dump(ast.parse(bare))
    except SyntaxError as e:
        raise UsageError(f"{path}:{e.lineno}: {e.msg} (the file itself, or without its exercise markers)") from None
    check(same, f"{path}: an exercise marker is not a comment of its own (inside a string?); markers must change "
                "nothing")
    functions = _functions(ast.parse(text))

    regions = []
    for start, end in spans:
        opening = OPEN.match(lines[start])
        name, hint, indent = opening.group("name"), opening.group("hint"), opening.group("indent")
        where = f"{path}:{start + 1}: exercise {name}"
        check(CLOSE.match(lines[end]).group("indent") == indent,
              f"{where}: its '# end exercise' (line {end + 1}) must have the opening marker's indentation")
        body = [line for line in lines[start + 1 : end] if line.strip()]
        check(any(not line.strip().startswith("#") for line in body), f"{where}: marks no code")
        check(all(line.startswith(indent) for line in body), f"{where}: a body line is indented less than its marker")
        check('"' not in hint and "\\" not in hint, f"{where}: the hint may not contain a double quote or a backslash")
        inside = [(qualname, kernel) for qualname, node, kernel in functions
                  if node.lineno <= start + 1 <= node.end_lineno]
        check(inside, f"{where}: outside any function; mark the body of a function")
        function, kernel = inside[-1]
        region = Region(name, hint, path, start, end, indent, function, kernel)
        longest = max(len(line) for line in stub_lines(region))
        check(longest <= LINE_LENGTH, f"{where}: the hint is too long: its stub line has {longest} characters "
                                      f"(at most {LINE_LENGTH})")
        regions.append(region)
    return regions


def student_text(text, regions):
    """text with the body of each region replaced by its stub; the markers and every other line unchanged."""
    lines = text.splitlines(keepends=True)
    out, start = [], 0
    for region in regions:
        out += lines[start : region.open + 1]
        out += [line + "\n" for line in stub_lines(region)]
        start = region.close
    return "".join(out + lines[start:])


def is_stub(text, region):
    """Whether the region still holds its stub (an exercise not written yet)."""
    return text.splitlines()[region.open + 1 : region.close] == stub_lines(region)


# -----------------------------------------------------------------------------
# The repository's files and their exercises


def repo_files(repo=REPO):
    """The files git tracks in the checkout, as they are in the working tree, and the untracked files that
    .gitignore does not exclude, which are left out (a lecturer's labels or notes are not the course's; what
    students need is committed, or at least `git add`-ed). Returns (tracked, left out), sorted."""
    def ls(*args):
        try:
            out = subprocess.run(["git", "ls-files", "-z", *args], cwd=repo, capture_output=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            raise UsageError(f"{repo} is not a git checkout (git ls-files failed): the student version holds only the "
                             "files git tracks; run this from a clone of the course's repository") from None
        return sorted(p for p in out.decode().split("\0") if p and (repo / p).is_file())

    return ls("--cached"), ls("--others", "--exclude-standard")


def exercise_regions(repo=REPO, files=None):
    """{exercise name: Region} for every marker in the given files (default: the files EXERCISES names),
    checked against EXERCISES: every exercise marked exactly once, in the function it names, and no marker
    without an exercise."""
    files = sorted({e.where.split(":")[0] for e in EXERCISES}) if files is None else files
    regions = {}
    for path in files:
        # not this file, whose docstring shows the markers, nor the tests, which hold no exercise
        if path.endswith(".py") and path != "tools/coursework.py" and not path.startswith("tests/"):
            for region in find_regions(path, (repo / path).read_text()):
                if region.name in regions:
                    other = regions[region.name]
                    raise UsageError(f"{path}:{region.open + 1}: exercise {region.name} is marked twice (also "
                                     f"{other.path}:{other.open + 1})")
                regions[region.name] = region
    table = {e.name: e for e in EXERCISES}
    for name, region in regions.items():
        check(name in table, f"{region.path}:{region.open + 1}: exercise {name} is not in coursework.EXERCISES")
        check(f"{region.path}:{region.function}" == table[name].where,
              f"{region.path}:{region.open + 1}: exercise {name} is in {region.function}, coursework.EXERCISES "
              f"says {table[name].where}")
    missing = [name for name in table if name not in regions]
    check(not missing, f"no marker for exercise(s) {', '.join(missing)} named in coursework.EXERCISES")
    return regions


def pick_exercises(text):
    """The exercises named by --exercises ('all', or names separated by commas), in EXERCISES' order."""
    known = [e.name for e in EXERCISES]
    if text == "all":
        return list(EXERCISES)
    asked = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in asked if name not in known]
    check(asked and not unknown, f"--exercises {text!r}: use all, or some of {', '.join(known)}")
    return [e for e in EXERCISES if e.name in asked]


def write_student_version(to, exercises, repo=REPO):
    """Copy the files git tracks into the new folder `to`, the bodies of the given exercises replaced by their
    stubs. Returns (number of files, the untracked files left out)."""
    files, left_out = repo_files(repo)
    regions = exercise_regions(repo, files)
    by_file = {}
    for e in exercises:
        by_file.setdefault(regions[e.name].path, []).append(regions[e.name])
    for path in files:
        target = to / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if path in by_file:
            text = student_text((repo / path).read_text(), sorted(by_file[path], key=lambda r: r.open))
            ast.parse(text, filename=path)  # a stub that broke the syntax would be our bug: fail loudly here
            target.write_text(text)
            shutil.copymode(repo / path, target)
        else:
            shutil.copy2(repo / path, target)
    return len(files), left_out


# -----------------------------------------------------------------------------
# How a check says what went wrong (the checks in tests/test_coursework_*.py)


def show(x):
    """A short, readable form of a tensor, a number or anything else that came back: values to 4 digits,
    whole numbers (token ids, IGNORE) as they are."""
    import torch

    if not isinstance(x, torch.Tensor):
        return show(torch.tensor(x)) if isinstance(x, (int, float)) else f"a {type(x).__name__}"
    if x.numel() > 24:
        return f"a tensor of shape {tuple(x.shape)}"

    def fmt(v):
        if isinstance(v, list):
            return "[" + ", ".join(map(fmt, v)) + "]"
        if isinstance(v, float):
            return str(int(v)) if v.is_integer() else f"{v:.4g}"
        return str(v)

    return fmt(x.detach().cpu().tolist())


def expect(what, came_back, expected, atol=1e-5):
    """Fail unless came_back equals expected (to atol), saying what was checked, what was expected and what came
    back: the shapes if they differ, else the values and the first position where they differ. grade prints
    this message as it is, on the failing test's line."""
    import torch  # here, not at the top: list and student need no torch

    expected = torch.as_tensor(expected, dtype=torch.float64)
    if not isinstance(came_back, torch.Tensor):
        if not isinstance(came_back, (int, float)):
            raise AssertionError(f"{what}: expected {show(expected)}, came back {show(came_back)}")
        came_back = torch.tensor(came_back)
    if came_back.shape != expected.shape:
        raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, came back shape "
                             f"{tuple(came_back.shape)}: expected {show(expected)}, came back {show(came_back)}")
    got = came_back.detach().cpu().to(torch.float64)
    wrong = ~torch.isclose(got, expected, rtol=1e-5, atol=atol)
    if wrong.any():
        message = f"{what}: expected {show(expected)}, came back {show(came_back)}"
        if wrong.dim() > 0:
            i = tuple(wrong.nonzero()[0].tolist())
            message += (f"; first difference at {list(i)}: expected {show(expected[i].item())}, came back "
                        f"{show(got[i].item())}")
        raise AssertionError(message)


# -----------------------------------------------------------------------------
# Running the tests


def run_pytest(folder, args, timeout):
    """pytest with args in folder, one subprocess. Returns ({node id: (outcome, message)} for every test that
    ran, where outcome is passed, failed, error or skipped; {test file: message} for the files that did not
    collect; pytest's output; its exit code, None if it timed out)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # write nothing into the folder graded
    tiktoken_cache = REPO.parent / "shared" / "data" / "tiktoken_cache"
    if tiktoken_cache.is_dir():  # tests/conftest.py looks beside the folder graded, which may be anywhere
        env.setdefault("TIKTOKEN_CACHE_DIR", str(tiktoken_cache))
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "results.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                   f"--junitxml={xml}", *args]
        try:
            proc = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {}, {}, f"the tests did not finish in --timeout {timeout} seconds", None
        if not xml.exists():
            return {}, {}, proc.stdout + proc.stderr, proc.returncode
        results, broken = {}, {}
        for case in ET.parse(xml).iter("testcase"):
            problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
            message = "" if problem is None else (problem.get("message") or problem.text or "").strip()
            if not case.get("classname"):  # a file that did not collect, which pytest names tests.test_x
                why = (problem.text or message).strip().splitlines() if problem is not None else []
                broken[case.get("name").replace(".", "/") + ".py"] = why[-1].removeprefix("E").strip() if why else ""
                continue
            node_id = case.get("classname").replace(".", "/") + ".py::" + case.get("name")
            results[node_id] = ("passed" if problem is None else problem.tag.replace("failure", "failed"), message)
    return results, broken, proc.stdout + proc.stderr, proc.returncode


def run_tests(folder, tests, timeout):
    """The given tests (node ids) in folder: one pytest run, or, when pytest refuses to start it (exit code 4:
    a test file that does not import, a test that is not there), one run per test file, so that a file a
    student broke costs only its own tests. Returns run_pytest's results, files that did not collect, output."""
    results, broken, output, code = run_pytest(folder, tests, timeout)
    if code != 4:
        return results, broken, output
    for file in dict.fromkeys(test.split("::")[0] for test in tests):
        found, failed, out, _ = run_pytest(folder, [test for test in tests if test.split("::")[0] == file], timeout)
        results.update(found)
        broken.update(failed)
        output += out
    return results, broken, output


def names(test, node):
    """Whether the node id `node` is one the test id `test` names: itself, or one of its parametrisations."""
    return node == test or ("[" not in test and node.startswith(test + "["))


def outcomes(test, results, broken):
    """(node id, outcome, message) of every test item that `test` names; a test that did not run counts as
    one failure."""
    found = [(node, *results[node]) for node in results if names(test, node)]
    if found:
        return found
    file = test.split("::")[0]
    return [(test, "failed", f"did not run: {file} does not collect ({broken[file]})" if file in broken else
             "did not run")]


def one_line(message, width=400):
    """A failure's message on one line: its lines joined, pytest's 'AssertionError: ' and 'Failed: ' dropped
    (the checks' messages are the whole story), cut at width characters."""
    text = " ".join(line.strip() for line in message.splitlines() if line.strip()) or "failed"
    text = text.removeprefix("AssertionError: ").removeprefix("Failed: ")
    return text if len(text) <= width else text[: width - 3] + "..."


def failure(test, results, broken):
    """None if the named test passed (it ran, and so did every parametrisation it stands for), else (which of
    its parametrisations failed, "" if it has none; why the first failed, on one line)."""
    found = outcomes(test, results, broken)
    failed = [(node, message) for node, outcome, message in found if outcome != "passed"]
    if not failed:
        return None
    node, message = failed[0]
    which = f" ({len(failed)} of {len(found)} parametrisations, the first {node[len(test):]})" if len(found) > 1 else ""
    return which, one_line(message)


def grade(folder, exercises, timeout, verbose=False):
    """Run the tests of the given exercises in folder, one point a named test. Returns [(exercise, points,
    {test: failure(test)} for the tests that failed)]."""
    results, broken, output = run_tests(folder, [t for e in exercises for t in e.tests], timeout)
    if verbose or not results:
        print(output)
    rows = []
    for e in exercises:
        failed = {test: why for test in e.tests if (why := failure(test, results, broken)) is not None}
        rows.append((e, len(e.tests) - len(failed), failed))
    return rows


# -----------------------------------------------------------------------------
# The commands


@dataclass
class ListConfig:
    """List the exercises: name, the function that holds the marked code, the lecture topic, the tests."""


@dataclass
class StudentConfig:
    """Write the student version of this repository into a new folder: every file git tracks, the body of each
    exercise replaced by raise NotImplementedError("exercise NAME: hint"), nothing else changed."""

    to: str = flag("", "the new folder to write (it must not exist yet, or be empty)")
    exercises: str = flag("all", "the exercises to remove, comma-separated (see `python tools/coursework.py list`), "
                          "or all")


@dataclass
class GradeConfig:
    """Grade a copy of this repository (a student version, or this one): run each exercise's tests in that folder,
    print exercise | lecture topic | tests passed, then what each failing test expected and what came back. Exit
    code 0 only if every test passes."""

    folder: str = flag(".", "the folder to grade (may also come first without --folder: grade ../student)")
    exercises: str = flag("all", "the exercises to grade, comma-separated, or all")
    timeout: int = flag(1800, "seconds before the test run is stopped (a loop that never ends)", min=1)
    verbose: bool = flag(False, "print pytest's own output too")


COMMANDS = {"list": ListConfig, "student": StudentConfig, "grade": GradeConfig}


def list_exercises(cfg):
    exercise_regions()  # the markers checked against the table
    name, where, topic = (max(len(getattr(e, key)) for e in EXERCISES) + 2 for key in ("name", "where", "topic"))
    print(f"{'exercise':<{name}}{'where':<{where}}{'lecture topic':<{topic}}tests")
    for e in EXERCISES:
        print(f"{e.name:<{name}}{e.where:<{where}}{e.topic:<{topic}}{len(e.tests)}")
    return 0


def make_student_version(cfg):
    check(cfg.to, "--to is needed: the new folder to write the student version into, e.g. --to ../student")
    to = Path(cfg.to).resolve()
    check(not to.exists() or (to.is_dir() and not any(to.iterdir())),
          f"--to {cfg.to} exists and is not an empty folder; choose a new one")
    check(to != REPO and REPO not in to.parents, f"--to {cfg.to} is inside this repository; choose a folder outside")
    exercises = pick_exercises(cfg.exercises)
    n_files, left_out = write_student_version(to, exercises)
    print(f"wrote {cfg.to}: the {n_files} files git tracks, with {len(exercises)} exercise(s) removed: "
          f"{', '.join(e.name for e in exercises)}")
    if left_out:
        print(f"left out, as git does not track them: {', '.join(left_out)} (git add the ones students need, then "
              "write the student version again)")
    shared = REPO.parent / "shared"
    if shared.is_dir() and not (to.parent / "shared").exists():
        print(f"note: the tests read the data and the tokenizer from a folder 'shared' beside the repository; "
              f"link it beside the new one: ln -s {shared} {to.parent / 'shared'}")
    only = "" if cfg.exercises == "all" else f" --exercises {cfg.exercises}"
    print(f"grade it with: python tools/coursework.py grade {cfg.to}{only}")
    return 0


def grade_folder(cfg):
    folder = Path(cfg.folder)
    check((folder / "tests" / "conftest.py").is_file(),
          f"{cfg.folder}: not a copy of this repository (no tests/conftest.py); give the folder to grade")
    check_flags(cfg)
    rows = grade(folder, pick_exercises(cfg.exercises), cfg.timeout, cfg.verbose)
    name, width = max(len(e.name) for e, *_ in rows) + 2, max(len(e.topic) for e, *_ in rows) + 2
    print(f"{'exercise':<{name}}{'lecture topic':<{width}}passed")
    for e, passed, _ in rows:
        print(f"{e.name:<{name}}{e.topic:<{width}}{passed:>3}/{len(e.tests)}")
    passed, total = sum(r[1] for r in rows), sum(len(e.tests) for e, *_ in rows)
    print(f"{'all':<{name}}{'':<{width}}{passed:>3}/{total}")
    # every failing test with what was expected and what came back; tests that fail the same way (an
    # exercise not written yet) share one line
    for e, _, failed in rows:
        tests_by_why = {}
        for test, (which, why) in failed.items():
            tests_by_why.setdefault(why, []).append(test + which)
        for why, tests in tests_by_why.items():
            more = f" and {len(tests) - 1} more" if len(tests) > 1 else ""
            print(f"{e.name}: {tests[0]}{more}: {why}")
    return 0 if passed == total else 1


def main(argv):
    """Run one command; returns the exit code."""
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    check(argv, "give a command: list, student or grade (python tools/coursework.py --help)")
    check(argv[0] in COMMANDS, f"unknown command {argv[0]!r}: use list, student or grade")
    command, rest = argv[0], argv[1:]
    if command == "grade" and rest and not rest[0].startswith("-"):
        rest = ["--folder", *rest]  # `grade ../student`: the folder without --folder
    cfg = parse_args(COMMANDS[command], rest)
    try:
        return {"list": list_exercises, "student": make_student_version, "grade": grade_folder}[command](cfg)
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    run(lambda: sys.exit(main(sys.argv[1:])))
