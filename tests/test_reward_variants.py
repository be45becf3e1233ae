"""The reward-model variants of bench/reward_variants.py compute what they say (their figures are in
bench/RESULTS.md)."""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from reward_variants import Pooled, plackett_luce_loss  # noqa: E402

from model import GPTConfig, RewardModel  # noqa: E402


def test_plackett_luce_equals_hand_computation_and_is_bradley_terry_for_two():
    r = torch.tensor([2.0, 0.5, -1.0, 0.3, 0.1])  # a ranking of three, best first, then one of two
    groups = [{"answers": [0, 1, 2]}, {"answers": [3, 4]}]
    first = math.log(math.exp(2.0) + math.exp(0.5) + math.exp(-1.0)) - 2.0  # place 1: answer 0 out of all 3
    second = math.log(math.exp(0.5) + math.exp(-1.0)) - 0.5  # place 2: answer 1 out of the last 2
    pair = math.log(1 + math.exp(-(0.3 - 0.1)))  # two answers: Bradley-Terry, -log sigmoid(r_1 - r_2)
    assert math.isclose(plackett_luce_loss(r, groups).item(), (first + second + pair) / 3, rel_tol=1e-6)


def test_pooled_reward_is_the_head_on_the_answers_tokens():
    torch.manual_seed(0)
    rm = RewardModel(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=16)).eval()
    torch.nn.init.normal_(rm.reward_head.proj.weight)
    suffix = [7, 8]  # stands for "\n\nAssistant:"
    idx = torch.tensor([[1, 2, 7, 8, 3, 4, 5, 0], [1, 7, 8, 6, 5, 0, 0, 0]])
    mask = torch.tensor([[1] * 7 + [0], [1] * 5 + [0] * 3])
    with torch.no_grad():
        head = rm.reward_head(rm.transformer(idx, mask))  # (2, 8)
        mean = Pooled(rm, suffix, "mean")(idx, mask)
        total = Pooled(rm, suffix, "sum")(idx, mask)
        every = Pooled(rm, suffix, "meanall")(idx, mask)
    assert torch.allclose(mean, torch.stack([head[0, 4:7].mean(), head[1, 3:5].mean()]), atol=1e-6)
    assert torch.allclose(total, torch.stack([head[0, 4:7].sum(), head[1, 3:5].sum()]), atol=1e-6)
    assert torch.allclose(every, torch.stack([head[0, :7].mean(), head[1, :5].mean()]), atol=1e-6)
