"""
Three ways to compute what model.py computes, with less work. Each gives the numbers of the plain path up
to float rounding, and a test checks it (tests/test_model.py, tests/test_reward.py).

1. Real tokens only (real_tokens_forward). A padded batch of the built-in task is about 30% padding, and
   every layer but attention treats each position on its own (LayerNorm, the q/k/v and output
   projections, the MLP: almost all of a step's arithmetic). So those layers run on the N real tokens,
   packed as (N, C), and only attention sees the (B, T) layout: each block puts its tokens back in place
   for it and takes them out after ("unpadding", as BERT and FlashAttention's variable-length kernels do).
   model.Transformer.forward takes this path for every padded batch it runs without a KV cache.

2. Shared prompts (SharedPrompts, answer_rewards). The reward model scores K answers to each prompt, and
   on the built-in task the prompt is more than half of each (prompt, answer) sequence. The prompts run
   once; their keys and values then serve every answer that continues them, and the answers run sorted by
   length in a few slices, so that a short one is not padded to the longest: a reward-model step costs
   about a third less than running every answer with its own copy of its prompt (bench/RESULTS.md).

3. One prefill per prompt (prefill_once_per_prompt). PPO and the labellers sample K answers to each
   prompt: model.generate runs each distinct prompt once and copies its KV cache for the K rows.
"""

import torch

from support.data import pad_batch
from support.training import autocast

# -----------------------------------------------------------------------------
# 1. Real tokens only


class RealTokens:
    """Where the real tokens of a padded batch are: pack (B, T, D) -> (N, D) and back."""

    def __init__(self, attention_mask):
        self.shape = attention_mask.shape  # (B, T)
        self.index = attention_mask.flatten().nonzero().squeeze(1)  # (N,) the real positions; a sync point

    def pack(self, x):
        """(B, T, D) -> (N, D), the real positions in row order."""
        return x.reshape(-1, x.size(-1)).index_select(0, self.index)

    def unpack(self, x):
        """(N, D) -> (B, T, D), zeros at the padding."""
        out = x.new_zeros(self.shape[0] * self.shape[1], x.size(-1))
        return out.index_copy(0, self.index, x).view(*self.shape, x.size(-1))


def real_tokens_forward(transformer, x, attention_mask, kv_start):
    """model.Transformer's blocks and final LayerNorm on the embedded batch x (B, T, C), computed on its
    real tokens only: (B, T, C), zeros at the padding. Each line is Block.forward's, with the tokens put
    in their (B, T) places for attention (attend) and taken out again after it."""
    real = RealTokens(attention_mask)
    x = real.pack(x)  # (N, C)
    for block in transformer.h:
        attn = block.attn
        qkv = real.unpack(attn.c_attn(block.ln_1(x)))  # (B, T, 3C), zeros at the padding, which no query reads
        x = x + attn.c_proj(real.pack(attn.attend(qkv, kv_start)))  # (N, C)
        x = x + block.mlp(block.ln_2(x))  # (N, C)
    return real.unpack(transformer.ln_f(x))  # (B, T, C)


# -----------------------------------------------------------------------------
# 2. Shared prompts


class SharedPrompts:
    """A batch of prompts run once, whose keys and values then serve every answer that continues one of
    them. It is a KV cache that keeps gradients: unlike model.KVCache (generation, no_grad) nothing is
    written in place, because autograd needs the prompts' keys and values unchanged for the backward; an
    answer pass reads its prompts' rows and puts its own keys after them (torch.cat)."""

    def __init__(self, transformer, prompt_idx, prompt_mask):
        # left-padded prompts (B, Tp): every answer then starts at column Tp, whatever its prompt's length
        self.mask = prompt_mask
        self.k, self.v = [], []  # per layer, (B, nh, Tp, hs)
        self.rows = None  # during an answer pass: the prompt row each answer continues
        self.length = 0
        transformer(prompt_idx, prompt_mask, kv_cache=self)  # update() below keeps each layer's keys and values

    def update(self, layer, k, v):
        if self.rows is None:  # the prompts' own pass
            self.k.append(k)
            self.v.append(v)
            return k, v
        return torch.cat([self.k[layer][self.rows], k], dim=2), torch.cat([self.v[layer][self.rows], v], dim=2)

    def continue_with(self, transformer, rows, idx, attention_mask):
        """Final hidden states (N, Ta, C) of N right-padded answers idx (N, Ta), answer i continuing the
        prompt in row rows[i]: the same as running prompt + answer, up to float rounding."""
        self.rows, self.length = rows, self.mask.size(1)
        mask = torch.cat([self.mask[rows], attention_mask], dim=1)  # (N, Tp + Ta): the prompt's padding stays masked
        # positions count real tokens only: an answer starts right after its prompt's last real token
        positions = self.mask.sum(dim=1)[rows, None] + torch.arange(idx.size(1), device=idx.device)  # (N, Ta)
        hidden = transformer(idx, mask, positions, kv_cache=self)
        self.rows = None
        return hidden


def answer_rewards(model, groups, pad_id, device, length_buckets=1):
    """The rewards r(x, y) of every answer of the groups ({"prompt": ids, "answers": [ids, ...]}), one
    after the other in group order: model(prompt + answer) for each (model a model.RewardModel). Each
    prompt runs once, and the answers run sorted by length in `length_buckets` slices."""
    answers = [a for g in groups for a in g["answers"]]
    rows = torch.tensor([i for i, g in enumerate(groups) for _ in g["answers"]], device=device)  # answer -> prompt
    order = torch.tensor(sorted(range(len(answers)), key=lambda i: len(answers[i])))
    rewards = []
    with autocast(device):
        prompts = SharedPrompts(model.transformer, *pad_batch([g["prompt"] for g in groups], pad_id, "left", device))
        for bucket in order.tensor_split(min(length_buckets, len(answers))):
            idx, mask = pad_batch([answers[i] for i in bucket], pad_id=pad_id, device=device)
            hidden = prompts.continue_with(model.transformer, rows[bucket.to(device)], idx, mask)  # (n, Ta, C)
            rewards.append(model.read_reward(hidden, mask))
    return torch.cat(rewards)[order.argsort().to(device)]  # back in batch order


# -----------------------------------------------------------------------------
# 3. One prefill per prompt


def prefill_once_per_prompt(model, prompts, tokens, attention_mask, cache):
    """generate's prefill of the left-padded prompts tokens (B, Tp) into cache, a model.KVCache with a row
    for each distinct prompt: the logits after each row's last prompt token (B, V). Each distinct prompt runs
    once, and its cache is then copied for every row that continues it, so the cache ends with B rows."""
    distinct = {}  # prompt -> (its number, its first row)
    for b, p in enumerate(prompts):
        distinct.setdefault(tuple(p), (len(distinct), b))
    prompt_of_row = torch.tensor([distinct[tuple(p)][0] for p in prompts], device=tokens.device)  # (B,)
    first_rows = torch.tensor([b for _, b in distinct.values()], device=tokens.device)  # (U,)
    hidden = model.hidden_states(tokens[first_rows], attention_mask[first_rows], kv_cache=cache)  # (U, Tp, C)
    # logits at the last column only (left padding puts every prompt's last token there): the (U, Tp, V)
    # logits of whole long prompts under GPT-2's vocabulary would take gigabytes
    logits = model.lm_head(hidden[:, -1])[prompt_of_row]  # (B, V)
    cache.take_rows(prompt_of_row)
    return logits
