"""support/memory.py: the per-stage memory estimate a GPU run prints at its start, checked against the
peak the CPU allocator measures (memory.allocated: torch.profiler's memory events) for one steady-state training step of
each stage at a small size, in fp32 and under bf16 autocast (the GPU's path, RLHF_CUDA_SHAPED=1)."""

import re
from pathlib import Path

import pytest
import torch

import train_ppo
import train_reward
import train_sft
from model import GPT, GPTConfig, PolicyWithValue, RewardModel
from kernels import logprob
from support import memory
from support.training import adamw

REPO = Path(__file__).resolve().parents[1]
B, TP, TA = 16, 48, 16  # sequences, prompt and answer tokens


def _measured(model, loss_fn):
    """The peak of a training step once AdamW's moments exist (the steady state), with the weights and the
    moments that were there before it: what a GPU's allocator would report as its high-water mark."""
    optimizer = adamw(model, 1e-3, 0.1)

    def step():
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    return memory.allocated(step)[0] + memory.n_params(model.config) * 12


def _config(attn="sdpa", V=1000):
    return GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=128, vocab_size=V, attn_impl=attn)


def _sft(cfg, bf16):
    model = GPT(cfg)
    idx = torch.randint(cfg.vocab_size, (B, TP + TA))
    targets = torch.full_like(idx, train_sft.IGNORE)
    targets[:, TP:] = torch.randint(cfg.vocab_size, (B, TA))
    mask = torch.ones_like(idx, dtype=torch.bool)

    def loss():
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return train_sft.sft_loss(model, idx, targets, mask)

    return _measured(model, loss), memory.step_bytes(cfg, B, TP + TA, B * TA, bf16, cfg.attn_impl == "naive")


def _reward(cfg, bf16, K=4):
    model = RewardModel(cfg)
    g = torch.Generator().manual_seed(0)
    groups = [{"prompt": torch.randint(1, cfg.vocab_size, (TP,), generator=g).tolist(),
               "answers": [torch.randint(1, cfg.vocab_size, (TA,), generator=g).tolist() for _ in range(K)],
               "scores": list(range(K, 0, -1))} for _ in range(B // 2)]

    def loss():
        return train_reward.pair_loss(model, groups, 0, 0.0, torch.device("cpu"), length_buckets=4)[0]

    expected = memory.step_bytes(cfg, B // 2 * K, TP + TA, 0, bf16, tokens=B // 2 * (TP + K * TA))
    return _measured(model, loss), expected


def _ppo(cfg, bf16):
    model = PolicyWithValue(cfg)
    tokens = torch.randint(cfg.vocab_size, (B, TP + TA))
    attention_mask = torch.ones_like(tokens, dtype=torch.bool)
    action_mask = torch.zeros(B, TP + TA)
    action_mask[:, TP:] = 1
    flags = train_ppo.Config(logprob_impl="torch")

    def loss():
        logp, _, values = train_ppo.policy_forward(model, tokens, attention_mask, action_mask, flags)
        return logp.sum() + values.sum()

    head = torch.empty(cfg.vocab_size, cfg.n_embd, device="meta", dtype=torch.bfloat16 if bf16 else torch.float32)
    return _measured(model, loss), memory.step_bytes(cfg, B, TP + TA, B * TA, bf16,
                                                     logit_chunk=logprob.chunk_rows(head, triton=False),
                                                     logit_bytes=logprob.TORCH_BYTES_PER_LOGIT)


@pytest.mark.parametrize("stage, bf16, attn, V", [
    ("sft", False, "sdpa", 1000), ("sft", True, "sdpa", 1000), ("sft", False, "naive", 1000),
    ("sft", False, "sdpa", 8000), ("reward", False, "sdpa", 1000), ("reward", True, "sdpa", 1000),
    ("ppo", False, "sdpa", 1000), ("ppo", True, "sdpa", 8000),
])
def test_the_estimate_bounds_the_measured_peak_closely(stage, bf16, attn, V, monkeypatch):
    # bf16: the scripts' own autocast is on where the GPU's path is taken
    monkeypatch.setenv("RLHF_CUDA_SHAPED", "1" if bf16 else "0")
    torch.manual_seed(0)
    measured, parts = {"sft": _sft, "reward": _reward, "ppo": _ppo}[stage](_config(attn, V), bf16)
    estimate = sum(parts.values())
    # an upper estimate (a step that fits by it fits), and a close one: measured 2-19% below it
    assert measured <= estimate <= 1.3 * measured, (measured / 2**20, {k: v / 2**20 for k, v in parts.items()})


def test_the_stage_estimates_read_the_stage_flags():
    cfg = _config()
    sft = train_sft.Config(batch_size=8, max_prompt_tokens=40, max_answer_tokens=8)
    assert memory.stage_estimate("sft", cfg, sft, bf16=True) == memory.step_bytes(cfg, 8, 48, 64, True)
    reward = train_reward.Config(batch_size=4, k=3, max_prompt_tokens=40, max_answer_tokens=8)
    assert memory.stage_estimate("reward", cfg, reward, bf16=False) == memory.step_bytes(
        cfg, 12, 48, 0, False, tokens=4 * (40 + 3 * 8))
    ppo = train_ppo.Config(minibatch_size=6, max_prompt_tokens=40, max_new_tokens=8, logprob_impl="triton")
    parts = memory.stage_estimate("ppo", cfg, ppo, bf16=True)
    assert parts["reference and reward model"] == 2 * 4 * memory.n_params(cfg)
    assert parts["logits"] == 48 * cfg.vocab_size * 2  # one chunk (all 48 rows) of bf16 logits, in place
    assert memory.n_params(cfg) == sum(p.numel() for p in GPT(cfg).parameters())


def test_a_step_that_does_not_fit_names_the_flag_to_lower():
    parts = {"weights and AdamW": 3 * 2**30, "activations": 6 * 2**30, "logits": 2**30}
    fits = memory.describe("ppo", parts, 24 * 2**30)
    assert fits.startswith("memory estimate for a training step: 10.0 GiB of the GPU's 24 GiB (weights and AdamW 3.0")
    assert "does not fit" not in fits
    too_big = memory.describe("sft", parts, 8 * 2**30)
    assert too_big.endswith("does not fit: lower --batch_size (with --grad_accum to keep the batch) or "
                            "--max_answer_tokens")


def test_the_readme_table_is_the_estimate():
    table = memory.readme_table()
    assert "\n".join("  " + line for line in table.splitlines()) in (REPO / "README.md").read_text()
    assert re.search(r"\| GPT-2 124M \| sft \(32 sequences\) \| \d+ GB \|", table)
