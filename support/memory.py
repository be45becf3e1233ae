"""How much GPU memory a stage needs: an estimate printed at the start of a run on CUDA.

A training step holds, at its worst moment (the start of the backward pass):
  - the weights, their gradients and AdamW's two moments: 4 + 4 + 8 = 16 bytes per trained parameter
    (fp32 master weights), plus a bf16 copy of each matrix under autocast (2 bytes);
  - the activations autograd saved for the backward, per layer and token. Counting what each op of
    model.Block keeps: the block's input and the residual after attention (LayerNorm's inputs), the two
    LayerNorm outputs (the next matmul's inputs), q, k and v, the attention output, the MLP's 4C hidden
    state before and after the GELU: 16 C numbers, 4 bytes each in fp32. Under bf16 autocast the matmul
    outputs and inputs are bf16 and the LayerNorm ones fp32: about 36 C bytes. Naive attention also keeps
    its (nh, T, T) scores and probabilities; flash attention and SDPA keep one log-sum-exp per row;
  - the logits at the positions that have a target, (rows, V): the logits, the fp32 log-softmax
    cross_entropy saves, and the gradient the backward makes of them, 12 bytes a number (16 under
    autocast, which adds the bf16 logits); PPO's fused log-prob holds one chunk of them at a time
    (kernels/logprob.py, chunk_rows);
  - frozen models (PPO's reference and reward model): their weights only;
  - the KV cache that sampling fills, which support/sampling.py caps at a quarter of the free memory.
tests/test_memory.py checks the estimate against the peak the CPU allocator measures at a small size.
"""

import torch

from kernels.logprob import TORCH_BYTES_PER_LOGIT, chunk_rows

GiB = 2**30


def n_params(cfg):
    """Parameters of model.GPT (the LM head shares the token embedding)."""
    C, L = cfg.n_embd, cfg.n_layer
    per_layer = 12 * C * C + 13 * C  # attention 4 C^2 + 4 C, MLP 8 C^2 + 5 C, two LayerNorms 4 C
    return cfg.vocab_size * C + cfg.block_size * C + L * per_layer + 2 * C


def step_bytes(cfg, rows, seq_len, logit_rows, bf16=False, naive_attention=False, logit_chunk=None, tokens=None,
               logit_bytes=None):
    """{part: bytes} of one training step of a GPT: rows sequences of seq_len tokens (tokens in all, when
    prompts are shared), logits at logit_rows positions (at most logit_chunk at a time, for the fused
    log-prob; logit_bytes per logit), bf16 autocast or fp32."""
    P, C, L, V = n_params(cfg), cfg.n_embd, cfg.n_layer, cfg.vocab_size
    tokens = rows * seq_len if tokens is None else tokens
    per_token_layer = 36 * C if bf16 else 64 * C
    activations = L * tokens * per_token_layer
    if naive_attention:  # the scores and the softmax, (rows, nh, T, T) each
        activations += L * 2 * rows * cfg.n_head * seq_len * seq_len * (2 if bf16 else 4)
    activations += tokens * C * 4 * 2  # the final LayerNorm's input and output
    logit_numbers = min(logit_rows, logit_chunk or logit_rows) * V
    return {
        "weights and AdamW": P * (18 if bf16 else 16),
        "activations": activations,
        "logits": logit_numbers * (logit_bytes or (16 if bf16 else 12)),
    }


def stage_estimate(stage, model_cfg, cfg, bf16):
    """{part: bytes} for one stage's training step at its flags (cfg: the stage's Config, lengths filled)."""
    prompt, naive = cfg.max_prompt_tokens, cfg.attn_impl == "naive"
    if stage == "sft":
        answer = cfg.max_answer_tokens
        return step_bytes(model_cfg, cfg.batch_size, prompt + answer, cfg.batch_size * answer, bf16, naive)
    if stage == "reward":  # each prompt runs once, then each of its answers: one forward, one backward
        answers, answer = (cfg.k if cfg.data == "default" else 2), cfg.max_answer_tokens
        tokens = cfg.batch_size * (prompt + answers * answer)
        return step_bytes(model_cfg, cfg.batch_size * answers, prompt + answer, 0, bf16, naive, tokens=tokens)
    answer = cfg.max_new_tokens  # ppo: the policy trains; the reference and the reward model only score
    # linear_logprobs holds one chunk of logits, sized from its byte budget: in the inputs' dtype on the
    # Triton path (the gradient overwrites them), TORCH_BYTES_PER_LOGIT on the PyTorch one
    torch_path = cfg.logprob_impl == "torch" or not bf16  # "auto" is Triton exactly where bf16 autocast is
    head = torch.empty(model_cfg.vocab_size, model_cfg.n_embd, device="meta",
                       dtype=torch.bfloat16 if bf16 else torch.float32)
    parts = step_bytes(model_cfg, cfg.minibatch_size, prompt + answer, cfg.minibatch_size * answer, bf16, naive,
                       logit_chunk=chunk_rows(head, triton=not torch_path),
                       logit_bytes=TORCH_BYTES_PER_LOGIT if torch_path else head.element_size())
    parts["reference and reward model"] = 2 * n_params(model_cfg) * 4
    return parts


def allocated(fn):
    """(peak, largest): the most bytes torch's allocator held at once while fn() ran, above what it held
    before, and the largest single block it handed out; read from the profiler's memory events, which
    see the CPU's allocator as torch.cuda.max_memory_allocated sees CUDA's. What the tests check the
    estimate with, and what bench/bench_logprob.py reports on a CPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return peak, max((nbytes for _, nbytes in events), default=0)


LOWER = {  # what to lower when it does not fit
    "sft": "--batch_size (with --grad_accum to keep the batch) or --max_answer_tokens",
    "reward": "--batch_size, or --max_prompt_tokens / --max_answer_tokens",
    "ppo": "--minibatch_size, or --max_prompt_tokens / --max_new_tokens",
}


def describe(stage, parts, device_bytes):
    """One line: the estimate, its parts, and what to lower when it is more than the device has."""
    total = sum(parts.values())
    detail = ", ".join(f"{name} {b / GiB:.1f}" for name, b in parts.items())
    line = (f"memory estimate for a training step: {total / GiB:.1f} GiB of the GPU's {device_bytes / GiB:.0f} GiB "
            f"({detail}; sampling takes at most a quarter of what is free)")
    if total > 0.9 * device_bytes:
        line += f"; it does not fit: lower {LOWER[stage]}"
    return line


def announce(stage, model_cfg, cfg, device):
    """Print the estimate where the GPU's path runs (a CPU run takes its time, not its memory, to the limit).
    Under torchrun each GPU holds its share of the batch (support/distributed.py)."""
    import os
    from dataclasses import replace

    from kernels import gpu_path
    from support.distributed import WORLD

    if not gpu_path(device):
        return
    cfg = replace(cfg, **{f: getattr(cfg, f) // WORLD for f in ("batch_size", "minibatch_size") if hasattr(cfg, f)})
    if torch.device(device).type == "cuda":
        device_bytes = torch.cuda.get_device_properties(device).total_memory
    else:  # RLHF_CUDA_SHAPED=1 on a CPU: the machine's memory stands in for the GPU's
        device_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(describe(stage, stage_estimate(stage, model_cfg, cfg, bf16=True), device_bytes))


CARDS = {"16 GB": 16e9, "24 GB": 24e9, "40 GB": 40e9, "80 GB": 80e9}


def readme_table():
    """The README's table: each stage's estimate for GPT-2 small and medium at the defaults of a GPT-2 run
    (block 1024: prompts of 768 tokens, answers of 256, PPO's of 24), and the cards it fits on."""
    from dataclasses import replace

    import train_ppo
    import train_reward
    import train_sft
    from model import config_from_preset

    rows = ["| model | stage (default batch) | estimate | fits (with 10% to spare) |", "| --- | --- | --- | --- |"]
    for preset, name in (("gpt2", "GPT-2 124M"), ("gpt2-medium", "GPT-2 355M")):
        model_cfg = config_from_preset(preset, vocab_size=50257)
        stages = {
            "sft": (replace(train_sft.Config(), max_prompt_tokens=768, max_answer_tokens=256), "32 sequences"),
            "reward": (replace(train_reward.Config(), data="pairs.jsonl", max_prompt_tokens=768, max_answer_tokens=256),
                       "16 pairs"),
            "ppo": (replace(train_ppo.Config(), max_prompt_tokens=768), "32 answers"),
        }
        for stage, (cfg, batch) in stages.items():
            total = sum(stage_estimate(stage, model_cfg, cfg, bf16=True).values())
            fits = [card for card, size in CARDS.items() if total <= 0.9 * size]
            rows.append(f"| {name} | {stage} ({batch}) | {total / 1e9:.0f} GB | {', '.join(fits) or 'none of these'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(readme_table())
