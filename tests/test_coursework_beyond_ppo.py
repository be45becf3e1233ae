"""The grader's checks of the exercises group_advantages and kl_k3 (tools/coursework.py EXERCISES), in
support/beyond_ppo.py: one property a test, each telling the right answer from a common wrong one (the
population std, the mean of the whole group where RLOO leaves the answer out, groups read across prompts,
the advantage on the last action only, the ratio upside down, exp(x) - 1 where it cancels), in the
exercise's words: what was expected, what came back. The pieces are called through their module
(beyond_ppo.group_advantages), so tests/test_coursework.py can plant a wrong answer in their place."""

import math

import torch

from support import beyond_ppo
from tools.coursework import expect

# -----------------------------------------------------------------------------
# group_advantages: beyond_ppo.group_advantages

# two prompts, 3 answers each, in the rollout's order: the answers to one prompt are neighbours
RETURNS = [1.0, 3.0, 2.0, 2.0, 2.0, 5.0]
GROUPS = "returns [1, 3, 2] (prompt 1) and [2, 2, 5] (prompt 2)"
ONE_ACTION = torch.ones(6, 1)


def advantages(method, returns=RETURNS, mask=ONE_ACTION, group_size=3):
    return beyond_ppo.group_advantages(torch.tensor(returns), mask, group_size, method)


def test_group_advantages_grpo_equal_hand_computation():
    # means 2 and 3; sample stds (K - 1) 1 and sqrt(3)
    s = math.sqrt(3) + 1e-4
    expect(f"GRPO advantages of {GROUPS}: (R - group mean) / (group std + 1e-4), the std divided by K - 1",
           advantages("grpo"), [[-1 / 1.0001], [1 / 1.0001], [0.0], [-1 / s], [-1 / s], [2 / s]], atol=1e-4)


def test_group_advantages_dr_grpo_is_the_return_minus_the_group_mean():
    expect(f"Dr. GRPO advantages of {GROUPS}: R - group mean", advantages("dr_grpo"),
           [[-1.0], [1.0], [0.0], [-1.0], [-1.0], [2.0]])


def test_group_advantages_rloo_leaves_each_answer_out_of_its_baseline():
    # 1 - (3 + 2) / 2, 3 - (1 + 2) / 2, 2 - (1 + 3) / 2, 2 - (2 + 5) / 2, ...
    expect(f"RLOO advantages of {GROUPS}: R - the mean of the group's other answers", advantages("rloo"),
           [[-1.5], [1.5], [0.0], [-1.5], [-1.5], [3.0]])


def test_group_advantages_compare_each_answer_with_its_own_prompts_answers():
    # prompt 1's answers all return 1, prompt 2's all 9: nothing to learn inside either group
    expect("Dr. GRPO advantages of returns [1, 1, 9, 9], two prompts with 2 answers each (the answers to one "
           "prompt are neighbours)", advantages("dr_grpo", [1.0, 1.0, 9.0, 9.0], torch.ones(4, 1), 2),
           [[0.0], [0.0], [0.0], [0.0]])


def test_group_advantages_are_on_every_action_and_0_elsewhere():
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1], [1, 0, 0, 0]]).float()
    expected = torch.tensor([-1.0, 1.0, 0.0, -1.0, -1.0, 2.0])[:, None] * mask
    expect(f"Dr. GRPO advantages of {GROUPS}, answers of 2, 1, 4, 2, 3 and 1 actions: each answer's advantage on "
           "every one of its actions, 0 off them", advantages("dr_grpo", mask=mask), expected)


# -----------------------------------------------------------------------------
# kl_k3: beyond_ppo.kl_estimate(..., "k3")


def k3(logp, logp_ref, dtype=torch.float32):
    return beyond_ppo.kl_estimate(torch.tensor(logp, dtype=dtype), torch.tensor(logp_ref, dtype=dtype), "k3")


def test_kl_k3_equals_hand_computation():
    # log r = logp_ref - logp = -1, 1, 0: k3 = (r - 1) - log r
    expect("k3 of logp [-1, -2, -3], logp_ref [-2, -1, -3]: (r - 1) - log r with r = pi_ref / pi",
           k3([-1.0, -2.0, -3.0], [-2.0, -1.0, -3.0]), [math.exp(-1) - 1 + 1, math.exp(1) - 1 - 1, 0.0])


def test_kl_k3_averages_to_the_kl_under_the_policy():
    # E over a ~ pi of k3 is exactly KL(pi || pi_ref): sum pi (pi_ref / pi - 1) = 0, sum pi (-log r) = the KL
    logp = torch.log_softmax(torch.tensor([1.5, -0.5, 0.3, 2.0]), 0)
    logp_ref = torch.log_softmax(torch.tensor([0.0, 1.0, -0.5, 0.5]), 0)
    mean = (logp.exp() * k3(logp.tolist(), logp_ref.tolist())).sum()
    expect("the mean of k3 over the policy's 4 tokens, weighted by pi: KL(pi || pi_ref)", mean,
           (logp.exp() * (logp - logp_ref)).sum(), atol=1e-5)


def test_kl_k3_is_accurate_when_the_policies_nearly_agree():
    # log r = 1e-4 in float32: (r - 1) - log r is (log r)^2 / 2 + ..., 5.0e-9; exp(x) - 1 loses it to rounding
    came_back = k3([-2.0001], [-2.0])
    log_r = torch.tensor(-2.0, dtype=torch.float32) - torch.tensor(-2.0001, dtype=torch.float32)
    expected = (log_r.double() ** 2 / 2 + log_r.double() ** 3 / 6).item()
    expect("k3 of logp -2.0001, logp_ref -2 in float32 (log r ~ 1e-4): (log r)^2 / 2 to within 1%", came_back,
           [expected], atol=0.01 * expected)
