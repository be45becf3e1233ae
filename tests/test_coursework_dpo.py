"""The grader's checks of the exercise dpo_loss (tools/coursework.py EXERCISES), in train_dpo.py: one property
a test, each telling the right answer from a common wrong one (no beta, the log-ratio the wrong way round,
the preference the wrong way round, a mean where one value per pair belongs, log of sigmoid), in the
exercise's words: what was expected, what came back. The piece is called through its module
(train_dpo.dpo_loss), so tests/test_coursework.py can plant a wrong answer in its place."""

import math

import torch

import train_dpo
from tools.coursework import expect

# three pairs: log-probs of the preferred (w) and the other (l) answer under the policy and the reference
LOGP_W, LOGP_L = [-3.0, -5.0, -1.0], [-4.0, -2.0, -6.0]
REF_W, REF_L = [-3.5, -4.0, -1.0], [-3.0, -2.5, -2.0]
PAIRS = "logp_w [-3, -5, -1], logp_l [-4, -2, -6], ref_w [-3.5, -4, -1], ref_l [-3, -2.5, -2], beta 0.5"
REWARD_W, REWARD_L = [0.25, -0.5, 0.0], [-0.5, 0.25, -2.0]  # 0.5 * (logp - ref)


def dpo(logp_w=LOGP_W, logp_l=LOGP_L, ref_w=REF_W, ref_l=REF_L, beta=0.5):
    return train_dpo.dpo_loss(*map(torch.tensor, (logp_w, logp_l, ref_w, ref_l)), beta=beta)


def test_dpo_loss_rewards_are_beta_times_the_log_ratio_to_the_reference():
    _, reward_w, reward_l = dpo()
    expect(f"reward_w of {PAIRS}: beta * (logp_w - ref_w)", reward_w, REWARD_W)
    expect(f"reward_l of {PAIRS}: beta * (logp_l - ref_l)", reward_l, REWARD_L)


def test_dpo_loss_is_one_value_per_pair():
    shape = tuple(dpo()[0].shape)
    if shape != (3,):
        raise AssertionError(f"the loss of {PAIRS}: expected one value per pair, shape (3,) (the caller takes the "
                             f"mean), came back shape {shape}")


def test_dpo_loss_equals_hand_computation():
    loss, _, _ = dpo()
    expected = [math.log1p(math.exp(-(w - worse))) for w, worse in zip(REWARD_W, REWARD_L)]
    expect(f"the loss of {PAIRS}: -log sigmoid(reward_w - reward_l)", loss, expected)


def test_dpo_loss_of_the_reference_itself_is_log_2():
    loss, _, _ = dpo(logp_w=REF_W, logp_l=REF_L)
    expect("the loss of a policy equal to its reference (logp = ref): log 2 per pair", loss, [math.log(2)] * 3)


def test_dpo_loss_is_finite_for_a_pair_wrong_by_a_mile():
    loss, _, _ = dpo([-4e4], [0.0], [0.0], [0.0])
    expect("the loss of a pair with logp_w -4e4, logp_l 0, refs 0, beta 0.5 (reward_w - reward_l = -2e4)", loss,
           [2e4])
