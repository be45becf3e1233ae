"""The branches a GPU takes, run on the CPU: RLHF_CUDA_SHAPED=1 (kernels.gpu_path) gives a CPU bf16 autocast,
"auto" resolving to the Triton kernels (under TRITON_INTERPRET=1) and the GPU's sampling sizes. A short run of
every stage and of the chat passes through them, and each problem a first GPU run would have met has a test.

What only a GPU shows: the compiled kernels (bench/gpu_check.sh runs the kernel tests on CUDA), bf16 tl.dot
(the interpreter computes it wrongly on this CPU, so the attention kernel upcasts its dot operands when
interpreted), cuBLAS's rounding, and the memory a real GPU run takes."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

import train_ppo
import train_reward
import train_sft
from model import GPT, GPTConfig, PolicyWithValue, RewardModel, generate, resolve_attn_impl
from support.checkpoint import load_checkpoint
from support.sampling import rows_per_call
from support.training import autocast
from tools.chat import stream_answer

CPU = torch.device("cpu")


@pytest.fixture
def gpu_paths(monkeypatch):
    """The switch: every branch below takes the GPU's path on this CPU."""
    monkeypatch.setenv("RLHF_CUDA_SHAPED", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def tiny_model(cls=GPT, **kw):
    torch.manual_seed(0)
    return cls(GPTConfig(block_size=48, vocab_size=101, n_layer=2, n_head=2, n_embd=64, **kw)).eval()


def test_the_switch_takes_every_gpu_branch(gpu_paths):
    from kernels.logprob import _use_kernel

    with autocast(CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert resolve_attn_impl("auto", CPU, 32) == "triton" and _use_kernel(torch.zeros(1), "auto", "test")


def test_generate_and_the_chat_under_bf16_autocast_with_the_triton_attention(gpu_paths):
    """The KV cache takes the dtype of the keys it is given (bf16 under autocast), so the Triton kernel gets
    one dtype for q, k and v; and the chat's stream is what generate samples, on this path too."""
    model = tiny_model()
    prompt = torch.randint(0, 100, (9,), generator=torch.Generator().manual_seed(1)).tolist()
    with autocast(CPU):
        generate(model, [prompt, prompt[:4], prompt], 10, eos_id=100, seed=5)  # left padding, a shared prefill
        alone, _, alone_mask = generate(model, [prompt], 10, eos_id=100, seed=5)
    streamed = list(stream_answer(model, prompt, 10, 100, 1.0, None, None, torch.Generator().manual_seed(5)))
    assert streamed == [t for t, keep in zip(alone[0].tolist(), alone_mask[0].tolist()) if keep]


def test_reward_and_value_heads_compute_in_fp32_under_autocast():
    """bf16 autocast rounds a matmul's output to 2^-8 of its size: the scalar heads (and the offset) stay
    fp32, equal to the head applied in fp32 to the trunk's hidden states."""
    rm, pv = tiny_model(RewardModel), tiny_model(PolicyWithValue)
    for head in (rm.reward_head, pv.value_head):
        torch.nn.init.normal_(head.proj.weight)
        torch.nn.init.normal_(head.proj.bias)
    rm.offset.fill_(0.1234567)
    idx, mask = torch.randint(0, 100, (3, 7)), torch.ones(3, 7, dtype=torch.long)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rewards = rm(idx, mask)
        hidden, values = pv(idx, mask)
        trunk = rm.transformer(idx, mask)  # (3, 7, C), bf16 here
    assert rewards.dtype == values.dtype == torch.float32
    expected = trunk[:, -1].float() @ rm.reward_head.proj.weight[0] + rm.reward_head.proj.bias[0] - rm.offset
    torch.testing.assert_close(rewards, expected, atol=1e-5, rtol=1e-5)
    expected = hidden.float() @ pv.value_head.proj.weight[0] + pv.value_head.proj.bias[0]
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5)


def test_sampling_rows_come_from_the_device_memory(monkeypatch):
    """A GPU's generate() calls take as many rows as a quarter of its free memory holds in bf16 keys and values
    (GPT-2 124M at 1024 tokens: 36 MiB a row), not the CPU's 1 GiB; the PPO eval at most 128."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * 2**30, 80 * 2**30))
    gpt2 = SimpleNamespace(config=GPTConfig(), transformer=SimpleNamespace(
        wte=SimpleNamespace(weight=SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32))))
    row = 2 * 12 * 768 * 1024 * 2
    assert rows_per_call(gpt2, 1024) == 5 * 2**30 // row == 142
    assert rows_per_call(gpt2, 1024, limit=128) == 128
    assert rows_per_call(gpt2, 64) == 1024  # short sequences: SAMPLE_ROWS caps it
    cpu = SimpleNamespace(config=GPTConfig(), transformer=SimpleNamespace(
        wte=SimpleNamespace(weight=SimpleNamespace(device=CPU, dtype=torch.float32))))
    assert rows_per_call(cpu, 1024) == 2**30 // (2 * 12 * 768 * 1024 * 4) == 14


def test_every_stage_runs_on_the_gpu_path(gpu_paths, tmp_path, capsys):
    """SFT, the reward model and PPO for a few steps each, in bf16 autocast with the Triton attention and
    log-prob kernels (interpreted): each finishes with finite losses; the reward model's outputs and PPO's
    values are fp32; PPO's first rollout comes from the reference, with its first update's ratio 1; and
    each stage says at its start how much memory a step will take."""
    sft = train_sft.main(train_sft.Config(out_dir=str(tmp_path / "sft"), n_train=64, n_eval=4, eval_prompts=1,
                                          batch_size=4, max_iters=2, warmup_iters=1, eval_interval=2,
                                          max_answer_tokens=6))
    assert all(p.dtype == torch.float32 for p in sft.parameters())  # autocast computes in bf16, keeps fp32 weights
    sft_ckpt = str(tmp_path / "sft" / "ckpt.pt")
    _, metrics = train_reward.main(train_reward.Config(out_dir=str(tmp_path / "reward"), sft=sft_ckpt, n_train=4,
                                                       n_eval=2, k=2, batch_size=4, max_iters=1, warmup_iters=1,
                                                       eval_interval=1, max_answer_tokens=6, length_buckets=1))
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
    assert metrics["offset"] == load_checkpoint(tmp_path / "reward" / "ckpt.pt", "reward")["model"]["offset"].item()
    train_ppo.main(train_ppo.Config(out_dir=str(tmp_path / "ppo"), sft=sft_ckpt, reward=str(tmp_path / "reward" /
                                    "ckpt.pt"), n_prompts=16, iterations=1, prompts_per_iter=2, samples_per_prompt=2,
                                    minibatch_size=2, max_new_tokens=6, eval_prompts=2, eval_interval=1))
    log = [json.loads(line) for line in open(tmp_path / "ppo" / "metrics.jsonl")]
    first = next(r for r in log if "policy_loss" in r)
    assert first["kl"] == 0 and first["kl_exact"] == pytest.approx(0, abs=1e-6)  # the reference sampled it
    assert all(math.isfinite(v) for r in log for v in r.values() if isinstance(v, float))
    assert capsys.readouterr().out.count("memory estimate for a training step: ") == 3


def test_the_first_ppo_update_recomputes_the_rollouts_log_probs_exactly(gpu_paths):
    """The rollout is scored in the first epoch's own mini-batches, so the first update computes on the same
    rows in the same shapes: its ratio is exactly 1, whatever a matmul's rounding depends on."""
    cfg = train_ppo.Config(minibatch_size=4, max_new_tokens=10)
    model = tiny_model(PolicyWithValue)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ref, rm = tiny_model(GPT), tiny_model(RewardModel)
    prompts = [torch.randint(1, 100, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (3, 7, 5, 9, 4, 6, 8, 2)]
    with autocast(CPU):
        tokens, attention_mask, answer_mask = generate(model.policy, prompts, 10, eos_id=100, seed=1)
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(3))
    roll = train_ppo.rollout_forward(model, ref, rm, tokens, attention_mask, answer_mask, cfg,
                                     order.split(cfg.minibatch_size))
    assert roll["score"].dtype == roll["values"].dtype == torch.float32
    for mb in order.split(cfg.minibatch_size):
        logp, _, values = train_ppo.policy_forward(model, tokens[mb], attention_mask[mb], answer_mask[mb].float(),
                                                   cfg)
        assert torch.equal(logp.detach(), roll["logp"][mb]) and torch.equal(values.detach(), roll["values"][mb])
