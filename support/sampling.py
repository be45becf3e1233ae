"""
Answers to many prompts: model.generate in calls of as many rows as memory allows. On a CPU one decoding
step of a few rows of the tiny model is mostly overhead, so many rows go at once; the KV cache (every
layer's keys and values for each row) bounds the rows for big models and long prompts: a quarter of the
GPU's free memory on a GPU, 1 GiB on a CPU.
"""

import torch

from kernels import gpu_path
from model import generate
from support import distributed
from support.training import autocast

SAMPLE_ROWS, CPU_CACHE_BYTES = 1024, 2**30


def cache_budget(device):
    """Bytes the KV cache of one generate() call may take on device: the models, the logits and the
    allocator's slack need the rest of the memory."""
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    return CPU_CACHE_BYTES


def rows_per_call(model, longest, limit=SAMPLE_ROWS):
    """How many rows of `longest` tokens one generate() call of model may take: at most limit, and no more
    than the device's cache_budget holds (bf16 keys and values where autocast makes them so)."""
    weight = model.transformer.wte.weight
    dtype = torch.bfloat16 if gpu_path(weight.device) else weight.dtype  # what support.training.autocast makes
    row_bytes = 2 * model.config.n_layer * model.config.n_embd * longest * dtype.itemsize  # keys + values
    return max(1, min(limit, cache_budget(weight.device) // row_bytes))


@torch.no_grad()
def sample_answers(model, prompt_ids, max_new_tokens, eos_id, temperature=1.0, seed=0, batch_size=None,
                   on_batch=None):
    """Answers for a list of prompts (token ids), batch_size prompts per generate() call (None: rows_per_call),
    sampled under the device's autocast, as the stages score them: a list of token-id lists, each with the
    EOS that ended it (an answer cut at max_new_tokens has none).
    on_batch(n), if given, is called with the number of answers done after each call (a progress bar)."""
    if batch_size is None:  # under torchrun, what fits on every rank: the calls are the same with any number
        batch_size = distributed.smallest(rows_per_call(model, max(map(len, prompt_ids), default=0) + max_new_tokens))
    calls, done = [], 0
    # each call's seed is its first row's: the ranks share out the calls and get the answers one process would
    for start in distributed.share(range(0, len(prompt_ids), batch_size)):
        with autocast(model.transformer.wte.weight.device):
            tokens, _, answer_mask = generate(model, prompt_ids[start : start + batch_size], max_new_tokens, eos_id,
                                              temperature=temperature, seed=seed + start)
        calls.append([[t for t, keep in zip(row, mask) if keep]
                      for row, mask in zip(tokens.tolist(), answer_mask.tolist())])
        done += len(calls[-1])
        if on_batch:
            on_batch(min(done * distributed.WORLD, len(prompt_ids)))  # about as many on every rank
    return [answer for call in distributed.gather(calls) for answer in call]
