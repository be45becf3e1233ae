"""train_sft.py: the answer-only loss mask, the loss against a hand computation, a short run on the
built-in task that must improve it, and resume."""

import json

import pytest
import torch
import torch.nn.functional as F

import train_sft
from conftest import crash_after_first_checkpoint
from model import GPT, GPTConfig
from support.checkpoint import load_checkpoint
from support.errors import LoadError, UsageError
from support.training import fit_lengths, warmup_cosine
from train_sft import IGNORE, Config, sft_batch, sft_loss


def test_loss_mask_covers_exactly_the_answer_tokens():
    # prompt [11, 12, 13], answer [21, 22, EOS]; prompt [31], answer [41, EOS]
    idx, targets, mask = sft_batch([([11, 12, 13], [21, 22, 50256]), ([31], [41, 50256])], pad_id=50256)
    assert idx.tolist() == [[11, 12, 13, 21, 22], [31, 41, 50256, 50256, 50256]]
    # position t predicts token t+1: the first answer token is predicted from the last prompt token
    assert targets.tolist() == [[IGNORE, IGNORE, 21, 22, 50256], [41, 50256, IGNORE, IGNORE, IGNORE]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_sft_loss_equals_hand_computation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32))  # GPT-2's vocabulary: EOS pads
    examples = [([1, 2, 3], [4, 5, 50256]), ([6], [7, 50256])]
    idx, targets, mask = sft_batch(examples, pad_id=50256)
    loss = sft_loss(model, idx, targets, mask)
    expected = 0.0
    for p, a in examples:  # each sequence alone, unpadded: -log p(a_t | prompt, a_<t), summed
        seq = torch.tensor([p + a])
        logp = F.log_softmax(model(seq)[0], dim=-1)
        for t in range(len(a)):
            expected -= logp[len(p) - 1 + t, a[t]]
    assert torch.allclose(loss, expected, atol=1e-5)


def test_lr_schedule_warms_up_then_decays_to_min():
    lr_at = lambda it: warmup_cosine(it, lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)  # noqa: E731
    assert lr_at(0) == pytest.approx(0.1) and lr_at(9) == pytest.approx(1.0)
    assert lr_at(60) == pytest.approx(0.55) and lr_at(110) == pytest.approx(0.1)


def test_lengths_left_at_zero_are_filled_in_a_copy_and_said(capsys):
    cfg = Config(max_answer_tokens=20)
    fitted = fit_lengths(cfg, 128)
    assert (fitted.max_prompt_tokens, fitted.max_answer_tokens) == (96, 20)
    assert (cfg.max_prompt_tokens, cfg.max_answer_tokens) == (0, 20)  # the caller's config is not changed
    assert capsys.readouterr().out == "lengths: --max_prompt_tokens 96 (from the model's block size 128)\n"
    with pytest.raises(UsageError, match="--max_prompt_tokens \\+ --max_answer_tokens = 152 exceeds"):
        fit_lengths(Config(max_prompt_tokens=120), 128)


def read_log(path):
    return [json.loads(line) for line in open(path)]


def test_short_run_lowers_eval_loss_and_raises_gold(sft_run):
    evals = [r for r in read_log(sft_run / "metrics.jsonl") if "eval_loss" in r]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0
    assert last["eval_loss"] < 0.25 * first["eval_loss"], (first, last)  # ~6.9 -> ~1.2 nats/token
    # untrained: random tokens (gold near -1.5); after 300 steps: answers in the demonstrations' form
    # (gold ~0.3; the full 2000-step run reaches ~1.6)
    assert last["gold"] > first["gold"] + 1.2, (first, last)
    ckpt = load_checkpoint(sft_run / "ckpt.pt", "sft")
    assert ckpt["step"] == last["step"] and ckpt["train_args"]["max_iters"] == last["step"]


def small_cfg(out_dir, **kw):
    base = dict(out_dir=str(out_dir), n_train=256, n_eval=32, eval_prompts=4, batch_size=8, max_iters=8,
                eval_interval=4, warmup_iters=2, max_answer_tokens=24)
    return Config(**{**base, **kw})


def test_resume_continues_exactly_where_it_stopped(tmp_path, monkeypatch):
    straight = train_sft.main(small_cfg(tmp_path / "a"))

    # the same run, killed right after its first checkpoint (step 4), then resumed
    restore = crash_after_first_checkpoint(train_sft, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_sft.main(small_cfg(tmp_path / "b"))
    restore()
    assert load_checkpoint(tmp_path / "b" / "ckpt.pt", "sft")["step"] == 4
    resumed = train_sft.main(small_cfg(tmp_path / "b", resume=True))

    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    steps = [r["step"] for r in read_log(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps))  # the log reads as one run, no step twice


def test_the_log_says_when_and_a_resumed_log_goes_on_from_its_last_kept_time(tmp_path, monkeypatch):
    """wall_s, what the figures of gold over time plot: seconds since the log was opened; on resume the lines
    after the checkpoint go and the clock goes on from the last line kept, not from 0 nor from the lost ones."""
    from support import training

    now = [100.0]
    monkeypatch.setattr(training.time, "time", lambda: now[0])
    log = training.MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        now[0] += 10
        log.write({"step": step})
    assert [r["wall_s"] for r in read_log(tmp_path / "metrics.jsonl")] == [10, 20, 30]
    now[0] = 500.0  # stopped after step 3, resumed from the checkpoint of step 2
    log = training.MetricsLog(tmp_path / "metrics.jsonl", resume_step=2)
    now[0] += 5
    log.write({"step": 3})
    assert [(r["step"], r["wall_s"]) for r in read_log(tmp_path / "metrics.jsonl")] == [(1, 10), (2, 20), (3, 25)]


def test_resume_without_checkpoint_and_wrong_stage_are_one_line_errors(tmp_path):
    with pytest.raises(LoadError, match="no such checkpoint"):
        train_sft.main(small_cfg(tmp_path, resume=True))
    with pytest.raises(UsageError, match="--weights"):
        train_sft.main(small_cfg(tmp_path, init="gpt2"))
