"""The grader's checks of exercise bt_loss (tools/coursework.py EXERCISES): one property a test, each telling
the right answer from a common wrong one, in the exercise's words: what was expected, what came back. The
piece is called through its module (train_reward.bradley_terry_loss), so tests/test_coursework.py can plant
a wrong answer in its place."""

import math

import torch

import train_reward
from tools.coursework import expect


R_CHOSEN, R_REJECTED = [1.0, -0.5, 3.0], [0.0, 0.5, 3.0]  # chosen ahead by 1, behind by 1, a tie
BT_WHAT = f"the loss of pairs r_chosen {R_CHOSEN}, r_rejected {R_REJECTED}"


def bt_loss(margin=None):
    margin = None if margin is None else torch.tensor(margin)
    return train_reward.bradley_terry_loss(torch.tensor(R_CHOSEN), torch.tensor(R_REJECTED), margin)


def test_bt_loss_is_one_value_per_pair():
    shape = tuple(bt_loss().shape)
    if shape != (3,):
        raise AssertionError(f"{BT_WHAT}: expected one value per pair, shape (3,) (the caller takes the mean), came "
                             f"back shape {shape}")


def test_bt_loss_equals_hand_computation():
    # -log sigmoid(d) = log(1 + exp(-d)): small when the chosen answer is ahead, log 2 for a tie
    expect(BT_WHAT + ": -log sigmoid(r_chosen - r_rejected)", bt_loss(),
           [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(1.0)), math.log(2.0)])


def test_bt_loss_subtracts_the_margin():
    # the chosen answer must win by the margin to be as good as a tie
    expect(BT_WHAT + " with margin 0.5: -log sigmoid(r_chosen - r_rejected - margin)", bt_loss([0.5] * 3),
           [math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.5)), math.log(1 + math.exp(0.5))])


def test_bt_loss_is_finite_for_a_pair_wrong_by_a_mile():
    # -log sigmoid(-2e4) = 2e4 + log(1 + exp(-2e4)); log(sigmoid(-2e4)) underflows to log 0 = -inf
    loss = train_reward.bradley_terry_loss(torch.tensor([-1e4]), torch.tensor([1e4]))
    expect("the loss of r_chosen -1e4, r_rejected 1e4 (log(sigmoid) would give inf)", loss, [2e4])
