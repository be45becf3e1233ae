"""
The checkpoint format of every stage: one ckpt.pt holds what is needed to use a stage's model or to
resume its training, and says which stage wrote it, so that a checkpoint of the wrong stage is one clear
error instead of a model silently built from the wrong weights.
"""

import os
from dataclasses import asdict, fields
from pathlib import Path

import torch

from model import GPT, GPTConfig, PolicyWithValue, RewardModel
from support.distributed import is_main
from support.errors import LoadError

FORMAT = "rlhf-course-checkpoint/2"
STAGE_MODELS = {"sft": GPT, "reward": RewardModel, "ppo": PolicyWithValue}
STAGE_SCRIPTS = {"sft": "train_sft.py", "reward": "train_reward.py", "ppo": "train_ppo.py"}


def save_checkpoint(path, model, stage, step, train_args, tokenizer, optimizer=None, extra=None):
    """Everything needed to use or resume a stage: config, weights, which stage wrote it, the tokenizer
    (data.Tokenizer.state(): its compact table, if any), the training arguments, the step, the optimizer
    state, and stage-specific extras. Written to a temporary file and renamed, so a run stopped mid-save
    never leaves a half-written checkpoint (and a leftover temporary file is overwritten next time)."""
    assert stage in STAGE_MODELS
    if not is_main():  # every rank holds the same weights; rank 0 writes them (support/distributed.py)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "format": FORMAT,
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
    if path.is_dir():
        raise LoadError(f"{path} is a folder; pass the checkpoint in it, {path / 'ckpt.pt'}")
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
    if ckpt["format"] != FORMAT:
        raise LoadError(f"{path}: written by another version of this repository ({ckpt['format']}, this one reads "
                        f"{FORMAT}); train it again")
    if ckpt["stage"] not in stages:
        want = " or ".join(f"'{s}' (from {STAGE_SCRIPTS[s]})" for s in stages)
        raise LoadError(f"{path} is a '{ckpt['stage']}' checkpoint, but a {want} checkpoint is needed here")
    return ckpt


def model_from_checkpoint(ckpt, attn_impl=None):
    """Rebuild the stage's model (GPT, RewardModel or PolicyWithValue) with its weights. Fields a GPTConfig
    no longer has (an older checkpoint's) are left out."""
    known = {f.name for f in fields(GPTConfig)}
    config = GPTConfig(**{k: v for k, v in ckpt["model_config"].items() if k in known})
    if attn_impl is not None:
        config.attn_impl = attn_impl
    try:
        if ckpt["stage"] == "ppo":  # a critic-free run's policy has no value head
            model = PolicyWithValue(config, value_head=any(k.startswith("value_head.") for k in ckpt["model"]))
        else:
            model = STAGE_MODELS[ckpt["stage"]](config)
    except ValueError as e:  # e.g. attn_impl triton for a head size the kernel does not take
        raise LoadError(str(e)) from None
    model.load_state_dict(ckpt["model"])
    return model


def policy_from_checkpoint(ckpt, attn_impl=None):
    """The language model inside an sft or ppo checkpoint: what samples answers, and what the next
    RLHF round (or the reward model) starts from."""
    model = model_from_checkpoint(ckpt, attn_impl)
    return model.policy if isinstance(model, PolicyWithValue) else model
