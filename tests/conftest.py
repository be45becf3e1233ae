"""Shared test setup: every test runs offline on CPU, with the Triton interpreter and the shared
GPT-2 tokenizer cache (the same settings .ci/run uses)."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(REPO.parent / "shared" / "data" / "tiktoken_cache"))
sys.path.insert(0, str(REPO))
if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker per core: one torch thread each, not two fighting over one core
    os.environ["OMP_NUM_THREADS"] = "1"
SHARED_DATA = REPO.parent / "shared" / "data"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """One short SFT run on the built-in task, shared by the SFT, reward-model and PPO tests."""
    import train_sft

    out = tmp_path_factory.mktemp("sft")
    cfg = train_sft.Config(out_dir=str(out), n_train=4000, n_eval=100, eval_prompts=64, max_iters=300,
                           eval_interval=300, warmup_iters=10)
    train_sft.main(cfg)
    return out


@pytest.fixture(scope="session")
def reward_run(sft_run, tmp_path_factory):
    """One short reward-model run from that SFT model: (out dir, config, model, final metrics)."""
    import train_reward

    out = tmp_path_factory.mktemp("reward")
    cfg = train_reward.Config(out_dir=str(out), sft=str(sft_run / "ckpt.pt"), n_train=800, n_eval=256, k=4,
                              max_iters=150, eval_interval=150)
    model, metrics = train_reward.main(cfg)
    return out, cfg, model, metrics


def crash_after_first_checkpoint(script, monkeypatch):
    """Make `script`.main die (KeyboardInterrupt) right after it writes its first checkpoint, as a run
    stopped by hand would; returns the function that undoes it."""
    real_save = script.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "save_checkpoint", save_then_die)
    return lambda: monkeypatch.setattr(script, "save_checkpoint", real_save)
