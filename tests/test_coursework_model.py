"""The grader's checks of exercise reward_at_eos (tools/coursework.py EXERCISES): one property a test, each
telling the right answer from a common wrong one, in the exercise's words: what was expected, what came
back. The piece is called through its class (RewardModel.read_reward), so tests/test_coursework.py can
plant a wrong answer in its place."""

import torch

from model import GPTConfig, RewardModel
from tools.coursework import expect


def rewards_read(attention_mask):
    """The rewards read_reward gives for hidden states whose row b, column t holds 10 b + t (in the one channel
    the reward head reads): the reward says which row and column it was read at."""
    attention_mask = torch.tensor(attention_mask)
    B, T = attention_mask.shape
    rm = RewardModel(GPTConfig(block_size=T, vocab_size=16, n_layer=1, n_head=1, n_embd=4))
    with torch.no_grad():
        rm.reward_head.proj.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
        hidden = torch.zeros(B, T, 4)
        hidden[..., 0] = 10 * torch.arange(B)[:, None] + torch.arange(T)[None, :]  # (B, T)
        return rm.read_reward(hidden, attention_mask)


READ_WHAT = "the rewards of {} rows, hidden row b column t = 10 b + t, so 10 b + the column read"


def test_reward_at_eos_reads_the_last_real_token_with_right_padding():
    mask = [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0, 0]]  # last real tokens at 4, 6, 0
    expect(READ_WHAT.format("right-padded") + " (last real tokens at columns 4, 6, 0)", rewards_read(mask),
           [4, 16, 20])


def test_reward_at_eos_reads_the_last_real_token_with_left_padding():
    mask = [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1]]  # every row ends at column 6
    expect(READ_WHAT.format("left-padded") + " (last real tokens at column 6)", rewards_read(mask), [6, 16, 26])


def test_reward_at_eos_reads_each_row_of_an_unpadded_batch():
    expect(READ_WHAT.format("2 unpadded") + " (one reward per row, at column 2)", rewards_read([[1, 1, 1]] * 2),
           [2, 12])
