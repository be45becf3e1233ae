"""train_dpo.py: the DPO loss against a hand computation, the answers' log-probs against the full softmax,
and short runs on the reward stage's comparisons: the implicit rewards start at 0, the reference stays
frozen, the held-out accuracy rises, a stopped run resumes exactly."""

import json
import math

import pytest
import torch

import train_dpo
from conftest import crash_after_first_checkpoint
from model import GPT, GPTConfig
from support.checkpoint import load_checkpoint, policy_from_checkpoint
from support.errors import LoadError
from train_dpo import Config, answer_logprobs, dpo_loss


def test_dpo_loss_equals_hand_computation():
    logp_w, logp_l = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    ref_w, ref_l = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -2.5])
    loss, reward_w, reward_l = dpo_loss(logp_w, logp_l, ref_w, ref_l, beta=0.5)
    # by hand: rewards 0.5 * (logp - ref); loss -log sigmoid(reward_w - reward_l)
    expected_w, expected_l = [0.25, -0.5], [-0.5, 0.25]
    expected = [-math.log(1 / (1 + math.exp(-(w - worse)))) for w, worse in zip(expected_w, expected_l)]
    torch.testing.assert_close(reward_w, torch.tensor(expected_w))
    torch.testing.assert_close(reward_l, torch.tensor(expected_l))
    torch.testing.assert_close(loss, torch.tensor(expected))
    zero, _, _ = dpo_loss(ref_w, ref_l, ref_w, ref_l, beta=0.5)  # the reference itself: no preference yet
    torch.testing.assert_close(zero, torch.full((2,), math.log(2)))


def test_answer_logprobs_are_the_sums_of_the_answer_tokens_log_probs():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=32, vocab_size=41, n_layer=1, n_head=2, n_embd=32)).eval()
    groups = [{"prompt": [1, 2, 3], "answers": [[4, 5], [6, 7, 8, 9]]}, {"prompt": [10], "answers": [[11]]}]
    got = answer_logprobs(gpt, groups, 0, "cpu", "torch")
    expected = []
    for g in groups:
        for a in g["answers"]:
            seq = torch.tensor([g["prompt"] + a])
            logp = torch.log_softmax(gpt(seq)[0], dim=-1)  # (T, V)
            expected.append(sum(logp[len(g["prompt"]) + j - 1, t] for j, t in enumerate(a)))
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-5)


def dpo_cfg(out, sft_run, reward_run, **kw):
    base = dict(out_dir=str(out), sft=str(sft_run / "ckpt.pt"), data=str(reward_run[0] / "comparisons.jsonl"),
                n_eval=48, k=4, eval_prompts=32, max_iters=30, eval_interval=15, lr=3e-4, warmup_iters=2,
                logprob_impl="torch")
    return Config(**{**base, **kw})


def read_log(path):
    return [json.loads(line) for line in open(path)]


def test_short_run_starts_at_zero_learns_the_labels_and_keeps_the_reference(sft_run, reward_run, tmp_path):
    policy, ref = train_dpo.main(dpo_cfg(tmp_path, sft_run, reward_run))
    evals = [r for r in read_log(tmp_path / "metrics.jsonl") if "eval_accuracy" in r]
    # step 0: the policy is the reference, every implicit reward is 0, every pair a tie
    assert evals[0]["step"] == 0 and evals[0]["eval_margin"] == 0.0 and evals[0]["eval_accuracy"] == 0.5
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2))
    assert evals[-1]["eval_accuracy"] > 0.55 and evals[-1]["eval_margin"] > 0, evals
    assert {"gold_agreement", "eval_gold"} <= set(evals[-1])
    # the held-out answers' KL to the reference: 0 while the policy is the reference, then what DPO moved
    assert evals[0]["eval_kl"] == 0.0 and evals[-1]["eval_kl"] > 0 and evals[0]["eval_answer_length"] > 1
    sft = policy_from_checkpoint(load_checkpoint(sft_run / "ckpt.pt", "sft"))
    for (name, p_ref), p_sft in zip(ref.named_parameters(), sft.parameters()):
        assert not p_ref.requires_grad and torch.equal(p_ref, p_sft), name
    assert any(not torch.equal(p, q) for p, q in zip(policy.parameters(), sft.parameters()))
    assert load_checkpoint(tmp_path / "ckpt.pt", ("sft", "ppo"))["extra"]["method"] == "dpo"  # PPO or chat can load it


def test_resume_continues_exactly(sft_run, reward_run, tmp_path, monkeypatch):
    straight, _ = train_dpo.main(dpo_cfg(tmp_path / "a", sft_run, reward_run))
    restore = crash_after_first_checkpoint(train_dpo, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_dpo.main(dpo_cfg(tmp_path / "b", sft_run, reward_run))
    restore()
    resumed, _ = train_dpo.main(dpo_cfg(tmp_path / "b", sft_run, reward_run, resume=True))
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name
    untimed = [[{k: v for k, v in r.items() if k not in ("steps_per_s", "wall_s")}
                for r in read_log(d / "metrics.jsonl")] for d in (tmp_path / "a", tmp_path / "b")]
    assert untimed[0] == untimed[1]


def test_a_missing_comparisons_file_names_it(sft_run, tmp_path):
    with pytest.raises(LoadError, match="nowhere.jsonl"):
        train_dpo.main(Config(out_dir=str(tmp_path), sft=str(sft_run / "ckpt.pt"),
                              data=str(tmp_path / "nowhere.jsonl")))
