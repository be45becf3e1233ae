"""The grader's checks of the PPO exercises kl_rewards, gae, policy_loss and value_loss (tools/coursework.py
EXERCISES): one property a test, each telling the right answer from a common wrong one (a wrong sign, a
wrong mask, a mean over every token, a carry across the mask, a column off by one), in the exercise's
words: what was expected, what came back. The pieces are called through their module (train_ppo.gae), so
tests/test_coursework.py can plant a wrong answer in their place."""

import math

import torch

import train_ppo
from tools.coursework import expect


# -----------------------------------------------------------------------------
# kl_rewards: train_ppo.per_token_rewards

# two answers: columns 2-3 of row 0 (then padding), columns 1-4 of row 1; -9 marks log-probs off the answer
ACTIONS = [[0.0, 0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0, 1.0]]
LOGP = [[-9.0, -9.0, -1.0, -2.0, -9.0], [-9.0, -1.0, -1.0, -1.0, -1.0]]
LOGP_REF = [[-1.0, -1.0, -1.5, -1.0, -1.0], [-1.0, -1.0, -2.0, -1.0, -3.0]]
KL = [[0.0, 0.0, 0.5, -1.0, 0.0], [0.0, 0.0, 1.0, 0.0, 2.0]]  # logp - logp_ref on the actions
KL_WHAT = "answers at columns 2-3 (row 0) and 1-4 (row 1), kl_coef 0.5"


def kl_rewards(score, logp_ref=LOGP_REF):
    return train_ppo.per_token_rewards(torch.tensor(score), torch.tensor(LOGP), torch.tensor(logp_ref),
                                       torch.tensor(ACTIONS), kl_coef=0.5)


def test_kl_rewards_kl_is_logp_minus_logp_ref_on_the_actions():
    _, kl = kl_rewards([0.0, 0.0])
    expect(f"kl of {KL_WHAT}: logp - logp_ref on the actions, 0 elsewhere", kl, KL)


def test_kl_rewards_penalise_the_kl_on_every_action():
    rewards, _ = kl_rewards([0.0, 0.0])
    expect(f"rewards of {KL_WHAT}, score 0: -kl_coef * kl", rewards, (-0.5 * torch.tensor(KL)).tolist())


def test_kl_rewards_give_the_score_on_the_last_action_of_each_row():
    rewards, _ = kl_rewards([2.0, -1.0], logp_ref=LOGP)  # no KL: only the scores are left
    expect(f"rewards of {KL_WHAT}, scores 2 and -1 and logp_ref = logp: each score on its row's last action",
           rewards, [[0.0, 0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0, -1.0]])


def test_kl_rewards_equal_hand_computation():
    rewards, _ = kl_rewards([2.0, -1.0])
    expect(f"rewards of {KL_WHAT}, scores 2 and -1", rewards,
           [[0.0, 0.0, -0.25, 0.5 + 2.0, 0.0], [0.0, 0.0, -0.5, 0.0, -1.0 - 1.0]])


# -----------------------------------------------------------------------------
# gae: train_ppo.gae

# one answer of 3 tokens (columns 1-3) after a 1-token prompt, then 1 padding column
GAE_MASK = [[0.0, 1.0, 1.0, 1.0, 0.0]]
GAE_REWARDS = [[0.0, 0.1, -0.2, 1.0, 0.0]]
GAE_VALUES = [[0.0, 0.5, 0.4, 0.3, 0.0]]
GAMMA, LAM = 0.9, 0.8


def gae_by_hand():
    """Advantages and returns of the answer above, by hand, backwards from the end (V after the last action is 0)."""
    d3 = 1.0 + GAMMA * 0.0 - 0.3
    d2 = -0.2 + GAMMA * 0.3 - 0.4
    d1 = 0.1 + GAMMA * 0.4 - 0.5
    a3 = d3
    a2 = d2 + GAMMA * LAM * a3
    a1 = d1 + GAMMA * LAM * a2
    return [[0.0, a1, a2, a3, 0.0]], [[0.0, a1 + 0.5, a2 + 0.4, a3 + 0.3, 0.0]]


def run_gae(rewards=GAE_REWARDS, values=GAE_VALUES, mask=GAE_MASK, gamma=GAMMA, lam=LAM):
    return train_ppo.gae(torch.tensor(rewards), torch.tensor(values), torch.tensor(mask), gamma, lam)


GAE_WHAT = "an answer at columns 1-3 of 5, rewards [0, 0.1, -0.2, 1, 0], values [0, 0.5, 0.4, 0.3, 0]"


def test_gae_advantages_equal_hand_computation():
    advantages, _ = run_gae()
    expect(f"advantages of {GAE_WHAT}, gamma 0.9, lam 0.8", advantages, gae_by_hand()[0])


def test_gae_returns_equal_hand_computation():
    _, returns = run_gae()
    expect(f"returns (advantages + values) of {GAE_WHAT}, gamma 0.9, lam 0.8", returns, gae_by_hand()[1])


def test_gae_with_gamma_and_lam_1_returns_the_reward_to_go():
    _, returns = run_gae(gamma=1.0, lam=1.0)
    expect(f"returns of {GAE_WHAT}, gamma = lam = 1: the sum of the rewards still to come", returns,
           [[0.0, 0.9, 0.8, 1.0, 0.0]])


def test_gae_carries_nothing_across_the_mask():
    # reward 5 and value 3 on the padding column: neither may reach the answer (V after the last action is 0)
    advantages, _ = run_gae(rewards=[[0.0, 0.1, -0.2, 1.0, 5.0]], values=[[0.0, 0.5, 0.4, 0.3, 3.0]])
    expect(f"advantages of {GAE_WHAT}, but reward 5 and value 3 on the padding column after the answer (they must "
           "not count)", advantages, gae_by_hand()[0])


def test_gae_returns_are_zero_off_the_mask():
    _, returns = run_gae(values=[[3.0, 0.5, 0.4, 0.3, 0.0]])
    expect(f"returns of {GAE_WHAT}, but value 3 on the prompt column (returns are 0 off the answer)", returns,
           gae_by_hand()[1])


def test_gae_rows_do_not_leak_into_each_other():
    advantages, _ = run_gae(rewards=[[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]], values=[[0.0] * 3] * 2,
                            mask=[[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], gamma=1.0, lam=1.0)
    expect("advantages of two rows, answers at columns 0-1 (reward 1 at the end) and 1-2 (reward 2), values 0, "
           "gamma = lam = 1", advantages, [[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])


# -----------------------------------------------------------------------------
# policy_loss: train_ppo.ppo_policy_loss

RATIOS, ADVANTAGES = [1.0, 1.5, 0.5, 1.1], [1.0, 1.0, -1.0, -2.0]
# per token max(-A r, -A clip(r, 0.8, 1.2)): -1, max(-1.5, -1.2) = -1.2, max(0.5, 0.8) = 0.8, max(2.2, 2.2) = 2.2
POLICY_LOSS = (-1.0 - 1.2 + 0.8 + 2.2) / 4
POLICY_WHAT = f"ratios {RATIOS}, advantages {ADVANTAGES}, clip_eps 0.2"


def policy_loss(logp, logp_old, advantages, mask):
    return train_ppo.ppo_policy_loss(torch.tensor(logp), torch.tensor(logp_old), torch.tensor(advantages),
                                     torch.tensor(mask), clip_eps=0.2)


def test_policy_loss_equals_hand_computation():
    loss, _, _ = policy_loss([[math.log(r) for r in RATIOS]], [[0.0] * 4], [ADVANTAGES], [[1.0] * 4])
    expect(f"loss of {POLICY_WHAT}: the mean of max(-A ratio, -A clip(ratio))", loss, POLICY_LOSS)


def test_policy_loss_ratio_is_exp_of_logp_minus_logp_old():
    # the same ratios from logp_old = -1: pi / pi_old = exp(logp - logp_old), whatever logp_old is
    logp_old = [[-1.0] * 4]
    logp = [[math.log(r) - 1.0 for r in RATIOS]]
    loss, clip_frac, approx_kl = policy_loss(logp, logp_old, [ADVANTAGES], [[1.0] * 4])
    expect(f"loss of {POLICY_WHAT}, with logp_old = -1", loss, POLICY_LOSS)
    expect(f"clip fraction of {POLICY_WHAT} (computed from the exercise's ratio)", clip_frac, 0.5)
    r = torch.tensor(RATIOS)
    expect(f"approx KL of {POLICY_WHAT} (computed from the exercise's ratio)", approx_kl, ((r - 1) - r.log()).mean())


def test_policy_loss_averages_over_the_actions_only():
    # the same four tokens in two rows, with two more off the mask: ratio 9 and advantage 100 there
    logp = [[0.0, math.log(1.5), math.log(9.0)], [math.log(9.0), math.log(0.5), math.log(1.1)]]
    loss, _, _ = policy_loss(logp, [[0.0] * 3] * 2, [[1.0, 1.0, 100.0], [100.0, -1.0, -2.0]],
                             [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    expect(f"loss of {POLICY_WHAT} on the 4 answer tokens of a (2, 3) batch whose other 2 tokens (ratio 9, "
           "advantage 100) are off the mask", loss, POLICY_LOSS)


def test_policy_loss_gradient_flows_through_the_unclipped_ratios():
    # d loss / d logp = -A ratio / N where the unclipped term is the larger, 0 where the clipped one is
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5, 0.5]])).requires_grad_()
    loss, _, _ = train_ppo.ppo_policy_loss(logp, torch.zeros(1, 4), torch.tensor([[1.0, 1.0, -1.0, 1.0]]),
                                           torch.ones(1, 4), clip_eps=0.2)
    if loss.requires_grad:
        loss.backward()
    expect("d loss / d logp of ratios [1, 1.5, 0.5, 0.5], advantages [1, 1, -1, 1] (None: the loss does not "
           "depend on logp)", logp.grad, [[-0.25, 0.0, 0.0, -0.125]])


# -----------------------------------------------------------------------------
# value_loss: train_ppo.ppo_value_loss

# values_old 1, -1, 0.5 and clip 0.2: the values clipped to [0.8, 1.2], [-1.2, -0.8], [0.3, 0.7] are 1.2, -0.9, 0.3;
# squared errors (unclipped, clipped) against returns 2, 0, 1: (0.25, 0.64), (0.81, 0.81), (1.0, 0.49)
VALUES_OLD, VALUES, RETURNS = [1.0, -1.0, 0.5], [1.5, -0.9, 0.0], [2.0, 0.0, 1.0]
VALUE_WHAT = f"values {VALUES}, values_old {VALUES_OLD}, returns {RETURNS}, clip_value 0.2"


def value_loss(values=VALUES, values_old=VALUES_OLD, returns=RETURNS, mask=(1.0, 1.0, 1.0)):
    return train_ppo.ppo_value_loss(torch.tensor([values]), torch.tensor([values_old]), torch.tensor([returns]),
                                    torch.tensor([mask]), clip_value=0.2)


def test_value_loss_is_half_the_squared_error_when_nothing_clips():
    loss, _ = value_loss(values=VALUES_OLD)
    expect(f"loss of values = values_old = {VALUES_OLD}, returns {RETURNS}: 0.5 * mean (V - R)^2", loss,
           0.5 * (1.0 + 1.0 + 0.25) / 3)


def test_value_loss_clips_around_the_old_values():
    loss, _ = value_loss()
    expect(f"loss of {VALUE_WHAT}: 0.5 * mean of the larger squared error", loss, 0.5 * (0.64 + 0.81 + 1.0) / 3)


def test_value_loss_clip_fraction_counts_where_the_clipped_error_is_larger():
    _, frac = value_loss()
    expect(f"value clip fraction of {VALUE_WHAT}: the share of tokens whose clipped error is the larger", frac,
           1 / 3)


def test_value_loss_averages_over_the_actions_only():
    loss, _ = value_loss(values=[1.5, -0.9, 10.0], returns=[2.0, 0.0, -10.0], mask=(1.0, 1.0, 0.0))
    expect(f"loss of {VALUE_WHAT}, with the third token off the mask (value 10, return -10 there)", loss,
           0.5 * (0.64 + 0.81) / 2)
