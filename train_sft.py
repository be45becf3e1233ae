"""
Stage 2 of RLHF: supervised fine-tuning (SFT).

A pretrained GPT (or, on the built-in task, a tiny GPT from scratch) learns to answer prompts by
imitating demonstrations. The loss is the usual next-token cross-entropy, but only on the answer:

    loss = - 1/N * sum over answer tokens t of log p(a_t | prompt, a_<t)

The prompt is context, not something the model should learn to write, so its tokens (and the padding)
get the target -100, which cross_entropy ignores. The resulting SFT model is stage 3's starting point
(the reward model) and stage 4's policy and reference.

    python train_sft.py                                   # built-in task, tiny GPT from scratch, CPU
    python train_sft.py --init gpt2 --weights DIR --data ../shared/data/demonstrations_sample.jsonl --lr 2e-5
    python train_sft.py --resume                          # continue from out/sft/ckpt.pt
"""

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from model import GPT, PRESETS, config_from_preset
from support import distributed, memory, task
from support.checkpoint import load_checkpoint, policy_from_checkpoint, save_checkpoint
from support.data import (
    DataError, Tokenizer, Truncation, encode_example, encode_prompt, load_demonstrations, pad_batch, train_and_eval,
)
from support.errors import LoadError
from support.gpt2 import load_gpt2_weights
from support.sampling import sample_answers
from support.training import (
    MetricsLog, Progress, adamw, autocast, batch_indices, check, check_finite, check_flags, check_out_dir, fit_lengths,
    flag, parse_args, pick_device, run, set_lr, warmup_cosine,
)

IGNORE = -100  # cross_entropy's ignore_index: prompt and padding positions


@dataclass
class Config:
    """Supervised fine-tuning: cross-entropy on the answer tokens of (prompt, answer) demonstrations."""

    out_dir: str = flag("out/sft", "folder for ckpt.pt and metrics.jsonl")
    data: str = flag("default", "'default' for the built-in task, or a JSONL file of {prompt, response}, TL;DR, "
                     "or preference lines (their chosen answers)")
    eval_data: str = flag("", "held-out JSONL (default: the task's eval split, or the last 10%% of --data)")
    init: str = flag("scratch", "'scratch' (a new GPT of --preset), 'gpt2' (Hugging Face weights in --weights), "
                     "or an sft/ppo checkpoint path")
    preset: str = flag("tiny", "model shape for --init scratch", choices=tuple(PRESETS))
    weights: str = flag("", "local Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin)")
    vocab: str = flag("auto", "token vocabulary for --init scratch: 'task' (the built-in task's ~1000 tokens), "
                      "'gpt2' (all 50257), or 'auto' (task for --data default, else gpt2)",
                      choices=("auto", "task", "gpt2"))
    n_train: int = flag(20000, "number of demonstrations drawn from the built-in task", min=1)
    n_eval: int = flag(500, "number of held-out demonstrations for the eval loss (built-in task)", min=1)
    max_prompt_tokens: int = flag(0, "prompts longer than this keep their last tokens (0: 3/4 of the block size)",
                                  min=0)
    max_answer_tokens: int = flag(0, "answers longer than this are cut, and then do not end with EOS "
                                  "(0: 1/4 of the block size)", min=0)
    batch_size: int = flag(32, "sequences per micro-batch", min=1)
    grad_accum: int = flag(1, "micro-batches per optimizer step", min=1)
    # long enough for the table of sums, which is learned late: the reward model can only check the facts its
    # trunk knows (bench/RESULTS.md, "Longer SFT, the reward model and PPO")
    max_iters: int = flag(2000, "optimizer steps", min=1)
    lr: float = flag(2e-3, "peak learning rate (use ~2e-5 for GPT-2 weights)", above=0)
    min_lr: float = flag(2e-4, "learning rate at the end of the cosine decay", min=0)
    warmup_iters: int = flag(30, "linear warmup steps", min=0)
    weight_decay: float = flag(0.1, "AdamW weight decay, on matrices only", min=0)
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0: off)", min=0)
    eval_interval: int = flag(200, "evaluate, sample and checkpoint every this many steps", min=1)
    eval_prompts: int = flag(256, "held-out prompts sampled for the gold score (built-in task)", min=0)
    temperature: float = flag(1.0, "sampling temperature for the eval samples (1.0: the policy as PPO will see it)",
                              above=0)
    seed: int = flag(1337, "seed for the data, the model init and sampling", min=0, max=2**31 - 1)
    device: str = flag("auto", "'auto' (cuda if available), 'cpu' or 'cuda'")
    attn_impl: str = flag("auto", "attention implementation", choices=("auto", "triton", "sdpa", "naive"))
    resume: bool = flag(False, "continue from out_dir/ckpt.pt at the step it saved")


def check_config(cfg):
    """Every flag checked before any work starts: each within its limits, then the rules that tie two."""
    check_flags(cfg)
    distributed.check_splits(cfg, "batch_size")  # under torchrun: each rank takes its share of every micro-batch
    check(cfg.vocab != "task" or cfg.data == "default", "--vocab task only fits --data default (the built-in task)")
    check(cfg.init != "gpt2" or cfg.weights, "--init gpt2 needs --weights DIR, a local Hugging Face GPT-2 folder")
    check_out_dir(cfg.out_dir)


# -----------------------------------------------------------------------------
# The pieces worth testing


def sft_batch(examples, pad_id, device="cpu"):
    """(prompt ids, answer ids) pairs -> idx, targets, mask (B, T), right-padded.

    The model reads seq[:-1] and predicts seq[1:]. A target is kept only when it is an answer token:
    position t predicts seq[t+1], which is in the answer iff t+1 >= len(prompt)."""
    seqs = [p + a for p, a in examples]
    idx, mask = pad_batch([s[:-1] for s in seqs], pad_id=pad_id)  # (B, T)
    # exercise sft_mask: IGNORE but where seq[t+1] is an answer token; check: targets[b][targets[b] != IGNORE] == a
    targets = torch.full_like(idx, IGNORE)
    for b, (p, a) in enumerate(examples):
        targets[b, len(p) - 1 : len(p) - 1 + len(a)] = torch.tensor(a)
    # end exercise
    return idx.to(device), targets.to(device), mask.to(device)


def sft_loss(model, idx, targets, mask):
    """Sum of -log p(target) over the answer tokens. The logits are computed only at answer positions:
    the (B, T, V) logits of the prompt would cost memory and time for targets we ignore."""
    hidden = model.hidden_states(idx, mask)  # (B, T, C)
    keep = targets != IGNORE
    logits = model.lm_head(hidden[keep])  # (N, V), N answer tokens
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


@torch.no_grad()
def evaluate(model, tok, eval_examples, eval_prompts, cfg, device, seed):
    """Held-out loss per answer token, and on the built-in task the mean gold score of sampled answers."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(eval_examples), cfg.batch_size):
        batch = eval_examples[start : start + cfg.batch_size]
        idx, targets, mask = sft_batch(batch, tok.eos_id, device)
        with autocast(device):
            total += sft_loss(model, idx, targets, mask).item()  # a sync point, fine at eval time
        count += sum(len(a) for _, a in batch)
    metrics = {"eval_loss": total / count}
    samples = []
    if eval_prompts:
        trunc = Truncation(cfg.max_prompt_tokens, cfg.max_answer_tokens)
        prompt_ids = [encode_prompt(tok, p, trunc) for p in eval_prompts]
        answer_ids = sample_answers(model, prompt_ids, cfg.max_answer_tokens, tok.eos_id, cfg.temperature, seed)
        answers = [tok.decode_answer(a) for a in answer_ids]
        gold = [task.gold_score(p, a) for p, a in zip(eval_prompts, answers)]
        metrics["gold"] = sum(gold) / len(gold)
        samples = [{"prompt": p, "answer": a, "gold": g} for p, a, g in zip(eval_prompts, answers, gold)]
    model.train()
    return metrics, samples


# -----------------------------------------------------------------------------
# Model and data


def build_model(cfg, ckpt_path):
    """(model, tokenizer, the checkpoint to resume from or None): a tiny GPT from scratch, GPT-2's weights,
    an sft/ppo checkpoint, or with --resume this run's own checkpoint."""
    resume = None
    if cfg.resume:
        resume = load_checkpoint(ckpt_path, "sft")
        model, tok = policy_from_checkpoint(resume, cfg.attn_impl), Tokenizer.from_state(resume["tokenizer"])
        print(f"resuming {ckpt_path} at step {resume['step']}")
    elif cfg.init == "scratch":
        # the task's texts use ~1000 of GPT-2's tokens: a compact vocabulary makes a tiny model several times faster
        use_task_vocab = cfg.vocab == "task" or (cfg.vocab == "auto" and cfg.data == "default")
        tok = Tokenizer.for_texts(task.vocabulary_texts()) if use_task_vocab else Tokenizer()
        model = GPT(config_from_preset(cfg.preset, attn_impl=cfg.attn_impl, vocab_size=tok.vocab_size))
    elif cfg.init == "gpt2":
        model, tok = load_gpt2_weights(cfg.weights, cfg.attn_impl), Tokenizer()
    else:
        init_ckpt = load_checkpoint(cfg.init, ("sft", "ppo"))
        model, tok = policy_from_checkpoint(init_ckpt, cfg.attn_impl), Tokenizer.from_state(init_ckpt["tokenizer"])
    if model.config.vocab_size < tok.vocab_size:
        raise LoadError(f"{cfg.weights or cfg.init}: the model has {model.config.vocab_size} token embeddings, its "
                        f"tokenizer {tok.vocab_size} ids; it cannot read them (is this a GPT-2 model?)")
    return model, tok, resume


def load_data(cfg, tok):
    """(train examples, eval examples, eval prompts for the gold score, eval rows): demonstrations as
    (prompt ids, answer ids), from the built-in task or from --data."""
    if cfg.data == "default":
        train_rows = task.demonstrations(cfg.n_train, "train", cfg.seed)
        eval_rows = task.demonstrations(cfg.n_eval, "eval", cfg.seed)
        eval_prompts = task.make_prompts(cfg.eval_prompts, "eval", cfg.seed + 1)
    else:
        train_rows, eval_rows = train_and_eval(load_demonstrations, cfg.data, cfg.eval_data)
        eval_prompts = []  # no gold judge for outside data: the eval loss is the measure
    trunc = Truncation(cfg.max_prompt_tokens, cfg.max_answer_tokens)
    train = [encode_example(tok, r["prompt"], r["response"], trunc, cfg.data) for r in train_rows]
    eval_source = cfg.eval_data or cfg.data
    eval_examples = [encode_example(tok, r["prompt"], r["response"], trunc, eval_source) for r in eval_rows]
    print(f"data: {len(train)} train and {len(eval_examples)} eval demonstrations from {cfg.data}; {trunc.report()}")
    if len(train) < cfg.batch_size:
        raise DataError(f"{cfg.data}: {len(train)} training examples, fewer than --batch_size {cfg.batch_size}")
    return train, eval_examples, eval_prompts, eval_rows


# -----------------------------------------------------------------------------
# The training run


def main(cfg):
    check_config(cfg)
    device = distributed.setup(pick_device(cfg.device, cfg.attn_impl))  # torchrun: this rank's device
    torch.manual_seed(cfg.seed)
    ckpt_path = f"{cfg.out_dir}/ckpt.pt"

    # ---- 1. the model and its tokenizer ----
    model, tok, resume = build_model(cfg, ckpt_path)
    cfg = fit_lengths(cfg, model.config.block_size)
    memory.announce("sft", model.config, cfg, device)  # on a GPU: will a step fit, and what to lower if not

    # ---- 2. data: demonstrations -> (prompt ids, answer ids) ----
    train, eval_examples, eval_prompts, eval_rows = load_data(cfg, tok)
    model.to(device).train()
    vocab = "the task's compact vocabulary" if tok.table else "GPT-2's vocabulary"
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.config.n_layer} layers, d={model.config.n_embd}, "
          f"{tok.vocab_size} tokens ({vocab}), device {device}")

    # ---- 3. the optimizer, the log, and the model before training (the "before" of every curve) ----
    optimizer = adamw(model, cfg.lr, cfg.weight_decay)
    start_iter = resume["step"] if resume else 0
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
    log = MetricsLog(f"{cfg.out_dir}/metrics.jsonl", resume_step=start_iter if resume else None)
    if start_iter == 0:
        metrics, samples = evaluate(model, tok, eval_examples, eval_prompts, cfg, device, cfg.seed)
        log.write({"step": 0, **metrics})
        print("step 0: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    # ---- 4. train: cross-entropy on the answer tokens ----
    progress = Progress("sft", cfg.max_iters, start_iter)
    t0, tokens_seen = time.time(), 0
    loss_sum = torch.zeros((), device=device)
    for it in range(start_iter, cfg.max_iters):
        lr = warmup_cosine(it, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)
        set_lr(optimizer, lr)
        batches = [[train[i] for i in batch_indices(it * cfg.grad_accum + m, len(train), cfg.batch_size, cfg.seed)]
                   for m in range(cfg.grad_accum)]
        # the loss is a mean over all answer tokens of the step, however they fall into micro-batches and ranks
        # (counted from the lists: no sync with the GPU)
        n_answer = sum(len(a) for batch in batches for _, a in batch)
        for batch in batches:
            idx, targets, mask = sft_batch(distributed.share(batch), tok.eos_id, device)
            with autocast(device):
                loss = sft_loss(model, idx, targets, mask) / n_answer
            loss.backward()
            loss_sum += loss.detach()
            tokens_seen += sum(len(p) + len(a) - 1 for p, a in batch)
        distributed.sync_gradients(model)  # torchrun: every rank's gradient is now the step's whole gradient
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # ---- 5. log every 10 steps; evaluate, sample and checkpoint every eval_interval ----
        step = it + 1
        if step % 10 == 0 or step == cfg.max_iters:
            # a sync point, once every 10 steps (and the ranks' parts of the loss added up)
            loss_value = distributed.sum_over_ranks(loss_sum).item() / (10 if step % 10 == 0 else step % 10)
            loss_sum.zero_()
            check_finite(loss_value, f"the training loss at step {step}", "lower --lr and start again")
            tok_s = tokens_seen / (time.time() - t0)
            log.write({"step": step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                       "tokens_per_s": tok_s})
            progress.update(step, loss=loss_value, lr=lr, tok_s=f"{tok_s:.0f}")
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            metrics, samples = evaluate(model, tok, eval_examples, eval_prompts, cfg, device, cfg.seed + step)
            log.write({"step": step, **metrics})
            save_checkpoint(ckpt_path, model, "sft", step, asdict(cfg), tok.state(), optimizer,
                            extra={"metrics": metrics})
            progress.close()
            print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f"; saved {ckpt_path}")
            for s in samples[:3]:
                print(f"  {s['prompt']!r} -> {s['answer']!r} (gold {s['gold']:.2f})")
    progress.close()
    if cfg.data == "default":
        print(f"gold score: the best possible is {task.GOLD_MAX}; the demonstrations average "
              f"{sum(task.gold_score(r['prompt'], r['response']) for r in eval_rows) / len(eval_rows):.3f}")
    return model


if __name__ == "__main__":
    run(lambda: main(parse_args(Config)))
