"""
A GPT-2 in one file, with everything the RLHF stages need from it.

Read top to bottom: config, attention, MLP, block, GPT, the two scalar heads (reward and value),
generation with a KV cache, loading real GPT-2 weights, and the checkpoint format shared by every stage.

Shape letters used in every comment:
    B batch, T sequence length, C embedding size (n_embd), nh heads, hs head size (C // nh), V vocabulary.

References: GPT-2 (Radford et al. 2019); the layout follows Hugging Face's GPT2LMHeadModel so that real
weights load by name; the style follows nanoGPT.
"""

import json
import math
import os
import struct
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoadError(Exception):
    """A user-facing problem with a file (weights, checkpoint, data): the message is one line that names
    the file and the fix. The scripts print it without a traceback."""


# -----------------------------------------------------------------------------
# Config


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (learned positions exist only up to here)
    vocab_size: int = 50257  # GPT-2's BPE vocabulary; <|endoftext|> = 50256 is EOS and padding
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # 0 everywhere in RLHF: PPO must recompute the same log-probs it sampled with
    layer_norm_eps: float = 1e-5
    attn_impl: str = "auto"  # "triton" | "sdpa" | "naive" | "auto" (the fastest that runs on the device)
    # Hugging Face GPT-2 config switches that change the maths; GPT-2's own values are the defaults
    tie_word_embeddings: bool = True  # the LM head is the token embedding matrix (one matrix, two uses)
    scale_attn_weights: bool = True  # scores divided by sqrt(hs)
    scale_attn_by_inverse_layer_idx: bool = False  # scores also divided by layer + 1 (Mistral's GPT-2s)
    # GPT-2 was trained with the tanh approximation of GELU ("gelu_new" in Hugging Face), so its weights
    # need it; a model trained from scratch may take the exact (erf) form, 2x as fast on a CPU
    gelu_approximate: str = "tanh"  # F.gelu's `approximate`: "tanh" or "none" (exact)


# GPT-2's published shapes; `tiny` trains from scratch on the built-in task on a 2-core CPU in minutes
# (~0.9M parameters with the task's compact vocabulary of ~1000 tokens, see data.py).
PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, gelu_approximate="none"),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def config_from_preset(name, **overrides):
    if name not in PRESETS:
        raise LoadError(f"unknown model preset '{name}': choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


# -----------------------------------------------------------------------------
# Attention: one function, three implementations of softmax(Q K^T / sqrt(hs)) V


def attention_mask_allowed(Tq, Tk, kv_start, device):
    """Which keys each query may look at, (B or 1, 1, Tq, Tk) bool.

    Queries are aligned to the end of the keys (query i sits at position Tk - Tq + i), which covers
    training (Tq == Tk), KV-cache decoding (Tq == 1) and chunked prefill. Causal: key j <= that position.
    Left padding: keys before kv_start[b] are the pad tokens of sequence b, masked for every query."""
    q_pos = torch.arange(Tk - Tq, Tk, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(Tk, device=device)[None, :]  # (1, Tk)
    allowed = (k_pos <= q_pos)[None, None]  # (1, 1, Tq, Tk)
    if kv_start is not None:
        allowed = allowed & (k_pos >= kv_start.view(-1, 1, 1, 1))  # (B, 1, Tq, Tk)
    return allowed


def attention_naive(q, k, v, kv_start=None, scale=None):
    """The readable reference: materialises the (Tq, Tk) score matrix per head, O(T^2) memory.
    scale multiplies the scores; None is GPT-2's 1 / sqrt(hs)."""
    Tq, Tk, hs = q.size(2), k.size(2), q.size(3)
    allowed = attention_mask_allowed(Tq, Tk, kv_start, q.device)
    scale = 1.0 / math.sqrt(hs) if scale is None else scale
    att = (q @ k.transpose(-2, -1)) * scale  # (B, nh, Tq, Tk)
    # finfo.min instead of -inf: a left-pad query has no allowed key at all, and softmax over a row of
    # -inf is NaN (in the backward too); with finfo.min the row is finite and we zero it below.
    att = att.masked_fill(~allowed, torch.finfo(att.dtype).min)
    att = F.softmax(att, dim=-1) * allowed.any(dim=-1, keepdim=True)
    return att @ v  # (B, nh, Tq, hs)


def attention_sdpa(q, k, v, kv_start=None, scale=None):
    """PyTorch's fused attention. Without padding and with Tq == Tk, is_causal picks the flash backend;
    otherwise an explicit boolean mask (rows with no allowed key come out as zeros)."""
    if kv_start is None and q.size(2) == k.size(2):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    allowed = attention_mask_allowed(q.size(2), k.size(2), kv_start, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def attention_triton(q, k, v, kv_start=None, scale=None):
    from kernels.flash_attention import flash_attention

    return flash_attention(q, k, v, causal=True, kv_start=kv_start, sm_scale=scale)


ATTENTION_IMPLS = {"naive": attention_naive, "sdpa": attention_sdpa, "triton": attention_triton}
_said_sdpa_instead = False  # "auto" says once per process why it did not take the Triton kernel


def resolve_attn_impl(attn_impl, device, head_size):
    """The attention implementation to run: attn_impl itself, or for "auto" the Triton kernel on CUDA
    when it supports the head size, else SDPA. (The interpreter that runs Triton on a CPU is a
    correctness tool, far too slow to be a default.)"""
    global _said_sdpa_instead
    if attn_impl == "auto" and device.type != "cuda":
        return "sdpa"
    from kernels.flash_attention import SUPPORTED_HEAD_DIMS

    if attn_impl == "auto":
        if head_size in SUPPORTED_HEAD_DIMS:
            return "triton"
        if not _said_sdpa_instead:
            print(f"attention: the Triton kernel supports head sizes {SUPPORTED_HEAD_DIMS}, this model has "
                  f"{head_size}; using PyTorch's SDPA instead")
            _said_sdpa_instead = True
        return "sdpa"
    if attn_impl not in ATTENTION_IMPLS:
        raise LoadError(f"attn_impl='{attn_impl}' is not one of auto, {', '.join(ATTENTION_IMPLS)}")
    if attn_impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise LoadError("attn_impl='triton' needs a CUDA device (or TRITON_INTERPRET=1 to interpret it on a CPU)")
    if attn_impl == "triton" and head_size not in SUPPORTED_HEAD_DIMS:
        raise LoadError(f"attn_impl='triton' supports head sizes {SUPPORTED_HEAD_DIMS}, this model has "
                        f"{head_size} (n_embd / n_head); use attn_impl sdpa")
    return attn_impl


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        if config.n_embd % config.n_head:
            raise LoadError(f"n_embd={config.n_embd} is not a multiple of n_head={config.n_head}")
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.attn_impl = config.attn_impl
        hs = config.n_embd // config.n_head
        self.scale = (1 / math.sqrt(hs) if config.scale_attn_weights else 1.0)
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer + 1

    def forward(self, x, kv_start=None, kv_cache=None, layer=0, real=None):
        qkv = self.c_attn(x)
        if real is not None:  # x holds only the real tokens (N, C): put them back in their (B, T) places
            qkv = real.unpack(qkv)  # (B, T, 3C), zeros at the padding, which attention never reads
        B, T, C = qkv.size(0), qkv.size(1), self.n_embd
        nh, hs = self.n_head, C // self.n_head
        q, k, v = qkv.split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            # the new keys join the cached ones; the queries stay the T new positions
            k, v = kv_cache.update(layer, k, v)  # (B, nh, Tk, hs), Tk = cached + T
        impl = ATTENTION_IMPLS[resolve_attn_impl(self.attn_impl, x.device, hs)]
        y = impl(q, k, v, kv_start, self.scale)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        if real is not None:
            y = real.pack(y)  # (N, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.gelu_approximate = config.gelu_approximate

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.gelu_approximate)))


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, kv_start=None, kv_cache=None, layer=0, real=None):
        x = x + self.attn(self.ln_1(x), kv_start, kv_cache, layer, real)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys and values of every layer for the positions already processed, so that generating one more
    token costs one position of compute instead of re-running the whole prefix."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled, the same for every layer once a forward pass ends

    def update(self, layer, k, v):
        start, end = self.length, self.length + k.size(2)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, nh, end, hs)

    def take_rows(self, rows):
        """The cache of the given rows only (a bool mask, or indices, repeats allowed): the sequences of a
        batch that are still going, or one prompt's cache copied for each answer sampled from it."""
        k = self.k.new_empty(self.k[:, rows].shape)  # positions past self.length are written before being read
        v = self.v.new_empty(k.shape)
        k[:, :, :, : self.length] = self.k[:, rows, :, : self.length]
        v[:, :, :, : self.length] = self.v[:, rows, :, : self.length]
        self.k, self.v = k, v


class SharedPrompts:
    """A batch of prompts run once, whose keys and values then serve every answer that continues one of
    them: the reward model's K answers to a prompt all read the same prompt. On the built-in task the
    prompt is more than half of each (prompt, answer) sequence, so a reward-model step costs about a
    third less than running every answer with its own copy of the prompt (bench/RESULTS.md).

    It is a KV cache that keeps gradients: unlike KVCache (generation, no_grad) nothing is written in
    place, because autograd needs the prompts' keys and values unchanged for the backward; an answer pass
    reads its prompts' rows and puts its own keys after them (torch.cat)."""

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


class RealTokens:
    """Where the real tokens of a padded batch are, to run the layers that treat each position on its
    own (LayerNorm, the q/k/v and output projections, the MLP: almost all of a step's arithmetic) on
    those tokens only. A batch of the built-in task is about 30% padding; only attention needs the
    (B, T) layout, so each block puts its tokens back in place for it and takes them out after
    ("unpadding", as BERT and FlashAttention's variable-length kernels do). The real tokens' results
    are those of the padded batch, up to float rounding."""

    def __init__(self, attention_mask):
        self.shape = attention_mask.shape  # (B, T)
        self.index = attention_mask.flatten().nonzero().squeeze(1)  # (N,) flat positions of the real tokens

    def pack(self, x):
        """(B, T, D) -> (N, D), the real positions in row order."""
        return x.reshape(-1, x.size(-1)).index_select(0, self.index)

    def unpack(self, x):
        """(N, D) -> (B, T, D), zeros at the padding."""
        out = x.new_zeros(self.shape[0] * self.shape[1], x.size(-1))
        return out.index_copy(0, self.index, x).view(*self.shape, x.size(-1))


def kv_start_from_mask(attention_mask):
    """Index of the first real token of each row: the left-pad length. Right padding needs no mask,
    since causality already hides later positions from the real tokens."""
    return (attention_mask.cumsum(dim=1) == 0).sum(dim=1)  # (B,)


def position_ids_from_mask(attention_mask):
    """Positions count real tokens only, so a left-padded prompt gets the same positions as unpadded."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)


# -----------------------------------------------------------------------------
# The GPT


def init_weights(module, n_layer):
    """GPT-2's initialisation: N(0, 0.02) for every matrix and embedding, zero biases, and the residual
    projections (c_proj) scaled by 1/sqrt(2 * n_layer) so that the residual stream's variance does not
    grow with depth (two residual adds per block)."""
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj") else 0.02
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class Transformer(nn.Module):
    """The GPT without a head: token ids -> final hidden states (B, T, C). Each model of RLHF is this
    trunk with a head on top: the LM head (policy, reference), the reward head, the value head."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned position embeddings
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        init_weights(self, config.n_layer)

    def forward(self, idx, attention_mask=None, position_ids=None, kv_cache=None):
        """attention_mask (B, T_total) marks real tokens (1) and padding (0), where T_total counts the
        cached positions too; padding may be on the left (generation) or the right."""
        B, T = idx.size()
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than block_size={self.config.block_size}")
        kv_start = None
        if attention_mask is not None:
            if position_ids is None:
                position_ids = position_ids_from_mask(attention_mask)[:, past:]
            if not bool(attention_mask[:, 0].all()):  # a CPU-GPU sync point, once per forward
                kv_start = kv_start_from_mask(attention_mask)
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=idx.device)[None, :]  # (1, T)
        x = self.drop(self.wte(idx) + self.wpe(position_ids))  # (B, T, C)
        real = None
        if attention_mask is not None and kv_cache is None and not bool(attention_mask.all()):
            real = RealTokens(attention_mask)  # a padded batch: the blocks compute its real tokens only
            x = real.pack(x)  # (N, C)
        for layer, block in enumerate(self.h):
            x = block(x, kv_start, kv_cache, layer, real)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.ln_f(x)
        return real.unpack(x) if real is not None else x  # (B, T, C), zeros at the padding


class GPT(nn.Module):
    """The language model: the transformer and the LM head that turns a hidden state into logits."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:  # as in GPT-2: the output layer is the input embedding
            self.lm_head.weight = self.transformer.wte.weight
        else:
            init_weights(self.lm_head, config.n_layer)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx, attention_mask=None, position_ids=None, kv_cache=None):
        """The final hidden states (after ln_f), (B, T, C): what the LM head reads."""
        return self.transformer(idx, attention_mask, position_ids, kv_cache)

    def forward(self, idx, attention_mask=None, position_ids=None, kv_cache=None):
        """Logits (B, T, V) at every position. A caller that needs only a few positions, or log-probs
        without the full logits, calls hidden_states and applies lm_head (or the fused log-prob kernel)
        itself."""
        hidden = self.hidden_states(idx, attention_mask, position_ids, kv_cache)
        return self.lm_head(hidden)  # (B, T, V)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, eos_id, temperature=1.0, top_k=None, top_p=None, seed=None):
        """Sample answers for a batch of prompts (lists of token ids, any lengths) with a KV cache.

        Prompts are left-padded so that every row's next token is at the same column. Each row stops at
        its own EOS; after it, the row is filled with EOS and masked out, and soon leaves the batch.
        temperature=0 is greedy (the most likely token every time); top_k and top_p as in sample_next_token.
        Returns (tokens, attention_mask, answer_mask), each (B, Tp + n): answer_mask is 1 exactly on the
        generated tokens, the EOS that ended a row included (it was an action too); attention_mask is 1
        on the prompt and the answer, so the last 1 of a row is its last real token."""
        check_sampling(temperature, top_k, top_p)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token (an empty prompt has no state to "
                             "continue from)")
        if max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be at least 1, got {max_new_tokens}")
        device = self.transformer.wte.weight.device
        B, Tp = len(prompts), max(len(p) for p in prompts)
        if Tp + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt ({Tp}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"block_size={self.config.block_size}")
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        tokens = torch.full((B, Tp + max_new_tokens), eos_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros(B, Tp + max_new_tokens, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            tokens[b, Tp - len(p) : Tp] = torch.tensor(p, dtype=torch.long)
            attention_mask[b, Tp - len(p) : Tp] = 1
        answer_mask = torch.zeros_like(attention_mask)

        # prefill: the whole prompt in one pass, once per distinct prompt (the K answers sampled for one
        # prompt share it), its cache then copied for each row; then one position per step
        distinct = {}  # prompt -> (its number, its first row)
        for b, p in enumerate(prompts):
            distinct.setdefault(tuple(p), (len(distinct), b))
        prompt_of_row = torch.tensor([distinct[tuple(p)][0] for p in prompts], device=device)  # (B,)
        first_rows = torch.tensor([b for _, b in distinct.values()], device=device)  # (U,)
        cache = KVCache(self.config, len(first_rows), Tp + max_new_tokens, device, self.transformer.wte.weight.dtype)
        # logits at the last column only (left padding puts every prompt's last token there): the
        # (U, Tp, V) logits of whole long prompts under GPT-2's vocabulary would take gigabytes
        hidden = self.hidden_states(tokens[first_rows, :Tp], attention_mask[first_rows, :Tp], kv_cache=cache)
        logits = self.lm_head(hidden[:, -1])  # (U, V)
        logits = logits[prompt_of_row]  # (B, V)
        cache.take_rows(prompt_of_row)
        next_pos = position_ids_from_mask(attention_mask[:, :Tp])[:, -1] + 1  # (B,)
        # The rows still in the batch (and in the cache). Once a quarter of them have ended, the ended
        # ones leave it: the longest answer of the batch then does not keep every short one computing.
        rows = torch.arange(B, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)  # for each of those rows
        n = Tp
        for t in range(Tp, Tp + max_new_tokens):
            next_token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (b,)
            next_token = torch.where(finished, eos_id, next_token)
            tokens[rows, t] = next_token
            answer_mask[rows, t] = (~finished).long()
            attention_mask[rows, t] = 1  # ended rows too: their tail is masked by answer_mask, not here
            finished |= next_token == eos_id
            n, ended = t + 1, int(finished.sum())  # a sync point, once per step
            if ended == len(rows) or t + 1 == Tp + max_new_tokens:
                break
            if 4 * ended >= len(rows):
                keep = ~finished
                rows, finished, next_token, next_pos = rows[keep], finished[keep], next_token[keep], next_pos[keep]
                cache.take_rows(keep)
            logits = self(next_token[:, None], attention_mask[rows, : t + 1], next_pos[:, None], cache)[:, -1]
            next_pos += 1
        attention_mask[:, Tp:] = answer_mask[:, Tp:]  # the EOS padding after a finished answer is not real
        return tokens[:, :n], attention_mask[:, :n], answer_mask[:, :n]


def check_sampling(temperature, top_k=None, top_p=None):
    """ValueError for settings that cannot sample: what the scripts check their flags with, too."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a whole number >= 1 (or None: no cut), got {top_k}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (or None: no cut), got {top_p}")


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from logits (B, V): temperature, then keep the top_k most likely tokens and/or
    the smallest set whose probability reaches top_p (nucleus), then sample. temperature=0: argmax."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Subtract the row max before dividing: every logit becomes <= 0, so even a temperature of 1e-45
    # gives -inf or 0, never inf - inf = nan; a tiny temperature then samples the argmax, as its limit does.
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature  # (B, V)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first one always stays)
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    # inverse-CDF sampling: the first token whose cumulative probability exceeds u ~ U[0, 1).
    # (torch.multinomial does the same job but is ~50x slower on CPU for a 50k vocabulary.)
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    u = torch.rand(cdf.size(0), 1, device=cdf.device, generator=generator) * cdf[:, -1:]  # (B, 1)
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.size(-1) - 1)  # (B,)


# Rows per generate() call: on a CPU, one decoding step of 64 rows of the tiny model is a few small
# matrix products, mostly overhead; 1024 rows sample 3200 answers 2.1x faster on two cores (1.5x on one).
# The KV cache (every layer's keys and values for each row) bounds it for big models and long prompts.
SAMPLE_ROWS, SAMPLE_CACHE_BYTES = 1024, 2**30


@torch.no_grad()
def sample_answers(model, prompt_ids, max_new_tokens, eos_id, temperature=1.0, seed=0, batch_size=None,
                   on_batch=None):
    """Answers for a list of prompts (token ids), batch_size prompts per generate() call (None: up to
    SAMPLE_ROWS, fewer when their KV cache would pass SAMPLE_CACHE_BYTES): a list of token-id lists,
    each with the EOS that ended it (an answer cut at max_new_tokens has none).
    on_batch(n), if given, is called with the number of answers done after each call (a progress bar)."""
    if batch_size is None:
        c, longest = model.config, max(map(len, prompt_ids), default=0) + max_new_tokens
        row_bytes = 2 * c.n_layer * c.n_embd * longest * model.transformer.wte.weight.element_size()  # keys + values
        batch_size = max(1, min(SAMPLE_ROWS, SAMPLE_CACHE_BYTES // row_bytes))
    answers = []
    for start in range(0, len(prompt_ids), batch_size):
        tokens, _, answer_mask = model.generate(prompt_ids[start : start + batch_size], max_new_tokens, eos_id,
                                                temperature=temperature, seed=seed + start)
        answers += [[t for t, keep in zip(row, mask) if keep]
                    for row, mask in zip(tokens.tolist(), answer_mask.tolist())]
        if on_batch:
            on_batch(len(answers))
    return answers


# -----------------------------------------------------------------------------
# The two scalar heads of RLHF


class ScalarHead(nn.Module):
    """One linear map from a hidden state (C) to a number: the reward head (stage 3) and the value head
    (stage 4) are both this, each under its own name."""

    def __init__(self, n_embd):
        super().__init__()
        self.proj = nn.Linear(n_embd, 1)
        # Zero-initialised: the head starts at exactly 0 for every input, so the first Bradley-Terry
        # loss is log 2 (no pair preferred) and the first value estimate is 0 (no expected return yet);
        # the gradient of a zero-initialised final layer is still non-zero, since it is the hidden state.
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden):
        return self.proj(hidden).squeeze(-1)  # (...,C) -> (...)


def last_token_index(attention_mask):
    """Index of the last real token of each row (the EOS that ends the answer), for left or right padding."""
    T = attention_mask.size(1)
    return T - 1 - attention_mask.flip(dims=[1]).argmax(dim=1)  # (B,)


class RewardModel(nn.Module):
    """Stage 3: the SFT transformer with its vocabulary head replaced by a scalar head, read at the last
    token of the (prompt, answer) sequence. `offset` is subtracted so that the SFT policy's own answers
    score 0 on average (set after training; stored in the state dict, hence in the checkpoint)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.reward_head = ScalarHead(config.n_embd)
        self.register_buffer("offset", torch.zeros(()))

    def forward(self, idx, attention_mask, prompts=None, rows=None):
        """Rewards (B,) of the (prompt, answer) sequences idx (B, T); or, with prompts (SharedPrompts),
        of the answers idx alone, answer i continuing the prompt in row rows[i] of prompts."""
        if prompts is None:
            hidden = self.transformer(idx, attention_mask)  # (B, T, C)
        else:
            hidden = prompts.continue_with(self.transformer, rows, idx, attention_mask)  # (B, T, C): the answers'
        # exercise reward_at_eos: h_last (B, C), hidden at each row's last real token (last_token_index)
        last = last_token_index(attention_mask)  # (B,)
        h_last = hidden[torch.arange(idx.size(0), device=idx.device), last]  # (B, C)
        # end exercise
        return self.reward_head(h_last) - self.offset  # (B,)


class PolicyWithValue(nn.Module):
    """Stage 4: the policy (a GPT with its LM head) and a value head beside the LM head, on the same
    hidden states. The value at position t estimates the return after the token at t."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.policy = GPT(config)
        self.value_head = ScalarHead(config.n_embd)

    def forward(self, idx, attention_mask):
        """(hidden (B, T, C), values (B, T)): the caller turns hidden into log-probs with lm_head or the
        fused kernel, so the full (B, T, V) logits need not exist."""
        hidden = self.policy.transformer(idx, attention_mask)  # (B, T, C)
        return hidden, self.value_head(hidden)  # (B, T, C), (B, T)


# -----------------------------------------------------------------------------
# Loading real GPT-2 weights from a local Hugging Face folder (no download, no extra dependency)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path):
    """The safetensors format: 8 bytes (little-endian u64) = N, then N bytes of JSON describing each
    tensor (dtype, shape, byte range), then the raw bytes of all tensors."""
    path = Path(path)
    broken = f"{path}: not a complete safetensors file"
    with open(path, "rb") as f:
        raw = f.read()
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        if 8 + n > len(raw):
            raise ValueError(f"header of {n} bytes, file of {len(raw)}")
        header = json.loads(raw[8 : 8 + n])
    except (struct.error, ValueError) as e:
        raise LoadError(f"{broken} ({e}); download or save it again") from None
    data = bytearray(raw[8 + n :])
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = info["shape"]
        except (KeyError, TypeError, ValueError):
            raise LoadError(f"{broken}: tensor '{name}' has an unreadable entry {info}") from None
        count = math.prod(shape)
        if end > len(data) or end - begin != count * torch.empty((), dtype=dtype).element_size():
            raise LoadError(f"{broken}: tensor '{name}' needs bytes {begin}..{end}, the file holds {len(data)} "
                            "(cut short?); download or save it again")
        t = torch.frombuffer(data, dtype=dtype, count=count, offset=begin) if count else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(shape).clone()
    return tensors


# Hugging Face's GPT-2 stores these as Conv1D, whose weight is (in, out): transpose into nn.Linear's (out, in)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_config(folder, attn_impl="auto"):
    """Our GPTConfig from a Hugging Face GPT-2 config.json; every field that changes the maths is read,
    and one we do not implement is refused by name rather than silently ignored."""
    path = Path(folder) / "config.json"
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: not valid JSON ({e}); restore the Hugging Face config.json") from None
    if not isinstance(hf, dict):
        raise LoadError(f"{path}: expected a JSON object")
    gelu = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # Hugging Face's names
    activation = hf.get("activation_function", "gelu_new")
    if hf.get("model_type", "gpt2") != "gpt2" or activation not in gelu:
        raise LoadError(f"{path}: not a GPT-2 config (model_type={hf.get('model_type')}, "
                        f"activation_function={hf.get('activation_function')})")
    for key in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd"):
        if isinstance(hf.get(key), bool) or not isinstance(hf.get(key), int) or hf[key] <= 0:
            raise LoadError(f"{path}: field '{key}' is missing or not a positive integer ({hf.get(key)!r})")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise LoadError(f"{path}: n_inner={hf['n_inner']} is not supported (the MLP here is 4 * n_embd wide)")
    if hf.get("add_cross_attention"):
        raise LoadError(f"{path}: add_cross_attention is not supported (a decoder-only GPT-2 is expected)")
    # reorder_and_upcast_attn only changes the precision of the scores (fp32 on the GPU); accepted.
    return GPTConfig(
        block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
        n_embd=hf["n_embd"], layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), attn_impl=attn_impl,
        tie_word_embeddings=hf.get("tie_word_embeddings", True), scale_attn_weights=hf.get("scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
        gelu_approximate=gelu[activation],
    )


def load_gpt2_weights(folder, attn_impl="auto"):
    """A GPT from a local Hugging Face GPT-2 folder: config.json plus model.safetensors or pytorch_model.bin."""
    folder = Path(folder)
    expected = "config.json plus model.safetensors or pytorch_model.bin (a Hugging Face GPT-2 folder)"
    if not folder.is_dir():
        raise LoadError(f"{folder}: no such folder; --weights must point at {expected}")
    if not (folder / "config.json").is_file():
        raise LoadError(f"{folder}: config.json is missing; expected {expected}")
    config = gpt2_config(folder, attn_impl)
    if (folder / "model.safetensors").is_file():
        state = read_safetensors(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        try:
            state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # a file cut short, or not a state dict; torch's own message is long
            raise LoadError(f"{folder}/pytorch_model.bin: cannot be read ({type(e).__name__}); was it fully "
                            "downloaded?") from None
        if not isinstance(state, dict):
            raise LoadError(f"{folder}/pytorch_model.bin: not a state dict of tensors")
    else:
        raise LoadError(f"{folder}: no model.safetensors or pytorch_model.bin; expected {expected}")

    model = GPT(config)
    ours = model.state_dict()
    loaded = {}
    for name, tensor in state.items():
        key = name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
        if key.endswith(("attn.bias", "attn.masked_bias")) and key not in ours:
            continue  # old checkpoints store the causal mask as a buffer; we build it on the fly
        if key not in ours:
            raise LoadError(f"{folder}: unexpected tensor '{name}' for GPT-2; is this a GPT-2 checkpoint?")
        if key.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        if tensor.shape != ours[key].shape:
            raise LoadError(f"{folder}: '{name}' has shape {tuple(tensor.shape)}, config.json implies "
                            f"{tuple(ours[key].shape)}")
        loaded[key] = tensor
    if config.tie_word_embeddings:
        loaded["lm_head.weight"] = loaded.get("transformer.wte.weight")  # one matrix, often stored once
    missing = [k for k in ours if loaded.get(k) is None]
    if missing:
        raise LoadError(f"{folder}: weights are missing {len(missing)} tensors (first: {missing[0]})")
    model.load_state_dict(loaded)
    return model


# -----------------------------------------------------------------------------
# Checkpoints: one format for every stage

CHECKPOINT_FORMAT = "rlhf-course-checkpoint/2"  # /2: the tokenizer's table is saved, RewardModel.transformer
STAGE_MODELS = {"sft": GPT, "reward": RewardModel, "ppo": PolicyWithValue}
STAGE_SCRIPTS = {"sft": "train_sft.py", "reward": "train_reward.py", "ppo": "train_ppo.py"}


def save_checkpoint(path, model, stage, step, train_args, tokenizer, optimizer=None, extra=None):
    """Everything needed to use or resume a stage: config, weights, which stage wrote it, the tokenizer
    (data.Tokenizer.state(): its compact table, if any), the training arguments, the step, the optimizer
    state, and stage-specific extras. Written to a temporary file and renamed, so a run stopped mid-save
    never leaves a half-written checkpoint (and a leftover temporary file is overwritten next time)."""
    assert stage in STAGE_MODELS
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "stage": stage,
        "model_config": asdict(model.config),
        "model": model.state_dict(),
        "tokenizer": tokenizer,
        "train_args": train_args,
        "step": step,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "extra": extra or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there if the save failed


def load_checkpoint(path, stages, map_location="cpu"):
    """The checkpoint dict, after checking that it is ours and was written by one of `stages`."""
    path = Path(path)
    stages = (stages,) if isinstance(stages, str) else tuple(stages)
    if not path.is_file():
        hint = " or ".join(dict.fromkeys(STAGE_SCRIPTS[s] for s in stages))
        raise LoadError(f"{path}: no such checkpoint; train one with {hint}, or fix the path")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file; torch's own message is long
        raise LoadError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}); was it fully written?") from None
    if not isinstance(ckpt, dict) or not str(ckpt.get("format", "")).startswith("rlhf-course-checkpoint/"):
        raise LoadError(f"{path}: not a checkpoint of this repository (for Hugging Face GPT-2 weights use "
                        "--init gpt2 --weights DIR)")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise LoadError(f"{path}: written by another version of this repository ({ckpt['format']}, this one reads "
                        f"{CHECKPOINT_FORMAT}); train it again")
    if ckpt["stage"] not in stages:
        want = " or ".join(f"'{s}' (from {STAGE_SCRIPTS[s]})" for s in stages)
        raise LoadError(f"{path} is a '{ckpt['stage']}' checkpoint, but a {want} checkpoint is needed here")
    return ckpt


def model_from_checkpoint(ckpt, attn_impl=None):
    """Rebuild the stage's model (GPT, RewardModel or PolicyWithValue) with its weights."""
    known = {f.name for f in fields(GPTConfig)}
    config = GPTConfig(**{k: v for k, v in ckpt["model_config"].items() if k in known})
    if attn_impl is not None:
        config.attn_impl = attn_impl
    model = STAGE_MODELS[ckpt["stage"]](config)
    model.load_state_dict(ckpt["model"])
    return model


def policy_from_checkpoint(ckpt, attn_impl=None):
    """The language model inside an sft or ppo checkpoint: what samples answers, and what the next
    RLHF round (or the reward model) starts from."""
    model = model_from_checkpoint(ckpt, attn_impl)
    return model.policy if isinstance(model, PolicyWithValue) else model
