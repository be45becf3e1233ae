"""
Answers to many prompts: model.generate in calls of as many rows as memory allows. On a CPU one decoding
step of a few rows of the tiny model is mostly overhead, so many rows go at once; the KV cache (every
layer's keys and values for each row) bounds the rows for big models and long prompts.
"""

import torch

from model import generate

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
        tokens, _, answer_mask = generate(model, prompt_ids[start : start + batch_size], max_new_tokens, eos_id,
                                          temperature=temperature, seed=seed + start)
        answers += [[t for t, keep in zip(row, mask) if keep]
                    for row, mask in zip(tokens.tolist(), answer_mask.tolist())]
        if on_batch:
            on_batch(len(answers))
    return answers
