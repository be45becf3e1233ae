"""
A GPT-2 in one file, with the heads that RLHF puts on it. Read top to bottom: config, attention, MLP, block,
the GPT, the two scalar heads (the reward model and the value head), then generation with a KV cache.
GPT-2's own weights load in support/gpt2.py; the stages' checkpoints are support/checkpoint.py's.

Shape letters used in every comment:
    B batch, T sequence length, C embedding size (n_embd), nh heads, hs head size (C // nh), V vocabulary.

References: GPT-2 (Radford et al. 2019); the layout follows Hugging Face's GPT2LMHeadModel so that real
weights load by name; the style follows nanoGPT.
"""

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from support.speedups import prefill_once_per_prompt, real_tokens_forward  # the same numbers with less work

# -----------------------------------------------------------------------------
# Config


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (learned positions exist only up to here)
    vocab_size: int = 50257  # GPT-2's BPE vocabulary; <|endoftext|> = 50256 is EOS and padding
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    layer_norm_eps: float = 1e-5
    attn_impl: str = "auto"  # "triton" | "sdpa" | "naive" | "auto" (the fastest that runs on the device)
    # Hugging Face GPT-2 config switches that change the maths; GPT-2's own values are the defaults
    tie_word_embeddings: bool = True  # the LM head is the token embedding matrix (one matrix, two uses)
    scale_attn_weights: bool = True  # scores divided by sqrt(hs)
    scale_attn_by_inverse_layer_idx: bool = False  # scores also divided by layer + 1 (Mistral's GPT-2s)
    # F.gelu's `approximate`: GPT-2's weights need the tanh form they were trained with ("gelu_new" in Hugging
    # Face); a model trained from scratch may take the exact one, "none", 2x as fast on a CPU
    gelu_approximate: str = "tanh"


# GPT-2's published shapes; `tiny` trains from scratch on the built-in task on a 2-core CPU in minutes
# (~0.9M parameters with the task's compact vocabulary of ~1000 tokens, see support/data.py).
PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, gelu_approximate="none"),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def config_from_preset(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown model preset '{name}': choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


# -----------------------------------------------------------------------------
# Attention: softmax(Q K^T / sqrt(hs)) V, three ways


def attention_mask_allowed(Tq, Tk, kv_start, device):
    """Which keys each query may look at, (B or 1, 1, Tq, Tk) bool. Query i sits at position Tk - Tq + i
    (training: Tq == Tk; KV-cache decoding: Tq == 1) and sees the keys up to it (causal), except the left
    padding of its row: the keys before kv_start[b]."""
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
    from kernels.flash_attention import flash_attention  # kernels/flash_attention.py: the same maths, fused

    return flash_attention(q, k, v, causal=True, kv_start=kv_start, sm_scale=scale)


ATTENTION_IMPLS = {"naive": attention_naive, "sdpa": attention_sdpa, "triton": attention_triton}


def resolve_attn_impl(attn_impl, device, head_size):
    """The attention to run: attn_impl itself, or for "auto" the Triton kernel on CUDA when it takes the head
    size, else SDPA (the interpreter that runs Triton on a CPU is a correctness tool, not a default)."""
    if attn_impl != "auto":
        return attn_impl
    from kernels import gpu_path  # CUDA, or a CPU taking the GPU's path (RLHF_CUDA_SHAPED=1, for the tests)
    from kernels.flash_attention import SUPPORTED_HEAD_DIMS

    if not gpu_path(device):
        return "sdpa"
    if head_size in SUPPORTED_HEAD_DIMS:
        return "triton"
    warnings.warn(f"attention: the Triton kernel takes head sizes {SUPPORTED_HEAD_DIMS}, not {head_size}; "
                  "using PyTorch's SDPA instead")  # said once: Python shows a warning once per place
    return "sdpa"


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd={config.n_embd} is not a multiple of n_head={config.n_head}")
        if config.attn_impl == "triton":
            from kernels.flash_attention import SUPPORTED_HEAD_DIMS

            if config.n_embd // config.n_head not in SUPPORTED_HEAD_DIMS:
                raise ValueError(f"attn_impl='triton' supports head sizes {SUPPORTED_HEAD_DIMS}, this model has "
                                 f"{config.n_embd // config.n_head} (n_embd / n_head); use attn_impl sdpa")
        self.n_head, self.layer, self.attn_impl = config.n_head, layer, config.attn_impl
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        hs = config.n_embd // config.n_head
        self.scale = 1 / math.sqrt(hs) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer + 1

    def forward(self, x, kv_start=None, kv_cache=None):
        """x (B, T, C) -> (B, T, C); kv_start (B,): where left-padded rows start; kv_cache: earlier positions."""
        return self.c_proj(self.attend(self.c_attn(x), kv_start, kv_cache))

    def attend(self, qkv, kv_start=None, kv_cache=None):
        """Every head's attention from the projections qkv (B, T, 3C), the heads side by side: (B, T, C)."""
        B, T, C = qkv.size(0), qkv.size(1), qkv.size(2) // 3
        nh, hs = self.n_head, C // self.n_head
        q, k, v = qkv.split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            # the new keys join the cached ones; the queries stay the T new positions
            k, v = kv_cache.update(self.layer, k, v)  # (B, nh, Tk, hs), Tk = cached + T
        attention = ATTENTION_IMPLS[resolve_attn_impl(self.attn_impl, qkv.device, hs)]
        y = attention(q, k, v, kv_start, self.scale)  # (B, nh, T, hs)
        return y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.gelu_approximate = config.gelu_approximate

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.gelu_approximate))


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, kv_start=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_start, kv_cache)
        return x + self.mlp(self.ln_2(x))


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


def kv_start_from_mask(attention_mask):
    """Index of the first real token of each row: the left-pad length. Right padding needs no mask,
    since causality already hides later positions from the real tokens."""
    return (attention_mask.cumsum(dim=1) == 0).sum(dim=1)  # (B,)


def position_ids_from_mask(attention_mask):
    """Positions count real tokens only, so a left-padded prompt gets the same positions as unpadded."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)


class Transformer(nn.Module):
    """The GPT without a head: token ids -> final hidden states (B, T, C). Each model of RLHF is this
    trunk with a head on top: the LM head (policy, reference), the reward head, the value head."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned position embeddings
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
            if not bool(attention_mask[:, 0].all()):  # a CPU-GPU sync point: is any row left-padded?
                kv_start = kv_start_from_mask(attention_mask)
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=idx.device)[None, :]  # (1, T)
        x = self.wte(idx) + self.wpe(position_ids)  # (B, T, C)
        if kv_cache is None and attention_mask is not None and not bool(attention_mask.all()):  # a sync point
            return real_tokens_forward(self, x, attention_mask, kv_start)  # a padded batch: its real tokens only
        for block in self.h:
            x = block(x, kv_start, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        return self.ln_f(x)  # (B, T, C)


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
        """Logits (B, T, V) at every position. For a few positions, or log-probs without the full logits, call
        hidden_states and apply lm_head (or the fused log-prob kernel) yourself."""
        hidden = self.hidden_states(idx, attention_mask, position_ids, kv_cache)
        return self.lm_head(hidden)  # (B, T, V)


# -----------------------------------------------------------------------------
# The two scalar heads of RLHF


class ScalarHead(nn.Module):
    """One linear map from a hidden state (C) to a number: the reward head (stage 3) and the value head
    (stage 4) are both this, each under its own name."""

    def __init__(self, n_embd):
        super().__init__()
        self.proj = nn.Linear(n_embd, 1)
        # Zero-initialised: the first Bradley-Terry loss is log 2 (no pair preferred) and the first value 0 (no
        # expected return yet); the gradient is still non-zero, since it is the hidden state.
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden):
        # in fp32, even under bf16 autocast: a reward or a value rounded to 2^-8 of its size would tie pairs of
        # answers and blur the value targets (the N+ implementation details keep these heads in fp32)
        with torch.autocast(hidden.device.type, enabled=False):
            return self.proj(hidden.float()).squeeze(-1)  # (..., C) -> (...)


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

    def forward(self, idx, attention_mask):
        """Rewards (B,) of the (prompt, answer) sequences idx (B, T)."""
        return self.read_reward(self.transformer(idx, attention_mask), attention_mask)  # (B,)

    def read_reward(self, hidden, attention_mask):
        """r = w . h_last + b - offset from the final hidden states (B, T, C) of the sequences."""
        # exercise reward_at_eos: h_last (B, C), each row's last real token; check: r the same padded left or right
        last = last_token_index(attention_mask)  # (B,)
        h_last = hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # (B, C)
        # end exercise
        return self.reward_head(h_last) - self.offset  # (B,)


class PolicyWithValue(nn.Module):
    """Stage 4: the policy (a GPT with its LM head) and a value head beside the LM head, on the same
    hidden states. The value at position t estimates the return after the token at t."""

    def __init__(self, config, value_head=True):
        super().__init__()
        self.config = config
        self.policy = GPT(config)
        # critic-free methods (train_ppo.py --advantage grpo, rloo, ...) take their baseline from other answers
        self.value_head = ScalarHead(config.n_embd) if value_head else None

    def forward(self, idx, attention_mask):
        """(hidden (B, T, C), values (B, T)): the caller turns hidden into log-probs with lm_head or the
        fused kernel, so the full (B, T, V) logits need not exist. Without a value head the values are 0."""
        hidden = self.policy.transformer(idx, attention_mask)  # (B, T, C)
        if self.value_head is None:
            return hidden, hidden.new_zeros(hidden.shape[:2], dtype=torch.float32)
        return hidden, self.value_head(hidden)  # (B, T, C), (B, T)


# -----------------------------------------------------------------------------
# Generation: the KV cache and sampling


class KVCache:
    """Keys and values of every layer for the positions already processed, so that generating one more
    token costs one position of compute instead of re-running the whole prefix."""

    def __init__(self, config, batch_size, max_len):
        self.shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = self.v = None  # made by the first update, in the keys' dtype: bf16 under autocast, as q is
        self.length = 0  # positions filled, the same for every layer once a forward pass ends

    def update(self, layer, k, v):
        if self.k is None:
            self.k, self.v = k.new_zeros(self.shape), v.new_zeros(self.shape)
        start, end = self.length, self.length + k.size(2)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, nh, end, hs)

    def take_rows(self, rows):
        """The cache of the given rows only (a bool mask, or indices, repeats allowed): the sequences of a
        batch that are still going, or one prompt's cache copied for each answer sampled from it."""
        n = int(rows.sum()) if rows.dtype == torch.bool else len(rows)  # a sync point for a mask
        k = self.k.new_empty(self.k.shape[:1] + (n,) + self.k.shape[2:])  # positions past self.length: written
        v = self.v.new_empty(k.shape)  # before they are read
        k[:, :, :, : self.length] = self.k[:, rows, :, : self.length]
        v[:, :, :, : self.length] = self.v[:, rows, :, : self.length]
        self.k, self.v = k, v


@torch.no_grad()
def generate(model, prompts, max_new_tokens, eos_id, temperature=1.0, top_k=None, top_p=None, seed=None):
    """Sample answers from a GPT for a batch of prompts (lists of token ids, any lengths) with a KV cache.

    Prompts are left-padded so that every row's next token is at the same column. Each row stops at its own
    EOS, after which it is filled with EOS, masked out, and soon leaves the batch. temperature=0 is greedy;
    top_k and top_p as in sample_next_token. Returns (tokens, attention_mask, answer_mask), each (B, Tp + n):
    answer_mask is 1 exactly on the generated tokens, the EOS that ended a row included (an action too);
    attention_mask is 1 on the prompt and the answer, so the last 1 of a row is its last real token."""
    check_sampling(temperature, top_k, top_p)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (there is no state to continue)")
    B, Tp = len(prompts), max(len(p) for p in prompts)
    if max_new_tokens < 1 or Tp + max_new_tokens > model.config.block_size:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be at least 1, and the prompt ({Tp}) + "
                         f"max_new_tokens at most block_size={model.config.block_size}")
    device = model.transformer.wte.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    tokens = torch.full((B, Tp + max_new_tokens), eos_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros(B, Tp + max_new_tokens, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, Tp - len(p) : Tp] = torch.tensor(p, dtype=torch.long)
        attention_mask[b, Tp - len(p) : Tp] = 1
    answer_mask = torch.zeros_like(attention_mask)

    # prefill: the prompts in one pass (each distinct prompt once, its cache then copied for each of its rows),
    # then one position per step
    cache = KVCache(model.config, len(set(map(tuple, prompts))), Tp + max_new_tokens)
    logits = prefill_once_per_prompt(model, prompts, tokens[:, :Tp], attention_mask[:, :Tp], cache)  # (B, V)
    next_pos = position_ids_from_mask(attention_mask[:, :Tp])[:, -1] + 1  # (B,)
    # the rows still in the batch (and the cache): once a quarter of them have ended, the ended ones leave,
    # so that the longest answer does not keep every short one computing
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
        logits = model(next_token[:, None], attention_mask[rows, : t + 1], next_pos[:, None], cache)[:, -1]
        next_pos += 1
    attention_mask[:, Tp:] = answer_mask[:, Tp:]  # the EOS padding after a finished answer is not real
    return tokens[:, :n], attention_mask[:, :n], answer_mask[:, :n]


def check_sampling(temperature, top_k=None, top_p=None):
    """ValueError for settings that cannot sample."""
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
