"""The grader's checks of exercise sft_mask (tools/coursework.py EXERCISES): one property a test, each telling
the right answer from a common wrong one, in the exercise's words: what was expected, what came back. The
piece is called through its module (train_sft.sft_batch), so tests/test_coursework.py can plant a wrong
answer in its place."""

import torch

import train_sft
from model import GPT, GPTConfig
from tools.coursework import expect

IGNORE = train_sft.IGNORE
EOS = 50256  # GPT-2's end of text, which also pads


# prompt, answer: a one-token prompt, an answer that is only EOS; the longest sequence has 6 tokens, so the
# model reads 5 columns and the shorter rows are padded
SFT_EXAMPLES = [([11, 12, 13], [21, 22, EOS]), ([31], [41, EOS]), ([51, 52, 53, 54], [EOS])]
SFT_TARGETS = [[IGNORE, IGNORE, 21, 22, EOS], [41, EOS, IGNORE, IGNORE, IGNORE], [IGNORE, IGNORE, IGNORE, EOS, IGNORE]]
SFT_WHAT = "targets of (prompt | answer) [11 12 13 | 21 22 EOS], [31 | 41 EOS], [51 52 53 54 | EOS]"


def sft_targets():
    return train_sft.sft_batch(SFT_EXAMPLES, pad_id=EOS)[1]


def test_sft_mask_puts_each_answer_token_where_it_is_predicted():
    expect(SFT_WHAT + " (column t predicts token t + 1)", sft_targets(), SFT_TARGETS)


def test_sft_mask_ignores_the_prompt():
    targets = sft_targets()
    expect(SFT_WHAT + ", at the columns that predict a prompt token (row 0: 0-1, row 2: 0-2)",
           torch.cat([targets[0, :2], targets[2, :3]]), [IGNORE] * 5)


def test_sft_mask_ignores_the_padding():
    targets = sft_targets()
    expect(SFT_WHAT + ", at the padding columns (row 1: 2-4, row 2: 4)", torch.cat([targets[1, 2:], targets[2, 4:]]),
           [IGNORE] * 4)


def test_sft_mask_gives_the_loss_of_each_answer_alone():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32))
    idx, targets, mask = train_sft.sft_batch(SFT_EXAMPLES, pad_id=EOS)
    expected = 0.0
    for p, a in SFT_EXAMPLES:  # each sequence alone, unpadded: -log p(a_t | prompt, a_<t), summed
        logp = torch.log_softmax(gpt(torch.tensor([p + a]))[0], dim=-1)
        expected -= sum(logp[len(p) - 1 + t, a[t]].item() for t in range(len(a)))
    with torch.no_grad():
        loss = train_sft.sft_loss(gpt, idx, targets, mask)
    expect(f"sft_loss with these targets (the sum of -log p over the {sum(len(a) for _, a in SFT_EXAMPLES)} answer "
           "tokens, each sequence alone)", loss, expected, atol=1e-4)
