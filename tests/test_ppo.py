"""train_ppo.py: GAE, the PPO losses and the KL penalty against hand computations, and short runs:
the reward-model score rises, the reference stays frozen, resume continues exactly."""

import json

import pytest
import torch

from conftest import crash_after_first_checkpoint
import train_ppo
from model import GPT, GPTConfig
from support.checkpoint import load_checkpoint, policy_from_checkpoint
from support.errors import UsageError
from train_ppo import (
    Config, action_logprobs, at_actions, exact_kl, gae, group_advantages, kl_estimate, masked_whiten, penalised_rewards,
    per_token_rewards, ppo_policy_loss, ppo_value_loss,
)


def test_gae_equals_hand_computation():
    # one answer of 3 tokens after a 1-token prompt, then 1 padding column
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    rewards = torch.tensor([[0.0, 0.1, -0.2, 1.0, 0.0]])
    values = torch.tensor([[0.0, 0.5, 0.4, 0.3, 0.0]])
    gamma, lam = 0.9, 0.8
    # by hand, backwards from the end (V after the last action is 0):
    d3 = 1.0 + gamma * 0.0 - 0.3
    d2 = -0.2 + gamma * 0.3 - 0.4
    d1 = 0.1 + gamma * 0.4 - 0.5
    a3 = d3
    a2 = d2 + gamma * lam * a3
    a1 = d1 + gamma * lam * a2
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(advantages, torch.tensor([[0.0, a1, a2, a3, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[0.0, a1 + 0.5, a2 + 0.4, a3 + 0.3, 0.0]]))
    # lam = 1, gamma = 1: the advantage is the Monte-Carlo return minus the value
    advantages, returns = gae(rewards, values, mask, 1.0, 1.0)
    assert torch.allclose(returns[0, 1:4], torch.tensor([0.9, 0.8, 1.0]))


def test_gae_rows_do_not_leak_into_each_other():
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    rewards = torch.tensor([[0.0, 1.0, 5.0], [7.0, 0.0, 2.0]])  # rewards outside the mask must not count
    advantages, _ = gae(rewards * mask, torch.zeros(2, 3), mask, 1.0, 1.0)
    assert advantages.tolist() == [[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]]


def test_kl_penalty_lands_on_answer_tokens_and_score_on_the_last():
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0, 1.0]])
    logp = torch.tensor([[-9.0, -9.0, -1.0, -2.0, -9.0], [-9.0, -1.0, -1.0, -1.0, -1.0]])
    logp_ref = torch.tensor([[-1.0, -1.0, -1.5, -1.0, -1.0], [-1.0, -1.0, -2.0, -1.0, -3.0]])
    score = torch.tensor([2.0, -1.0])
    rewards, kl = per_token_rewards(score, logp, logp_ref, mask, kl_coef=0.5)
    assert kl.tolist() == [[0.0, 0.0, 0.5, -1.0, 0.0], [0.0, 0.0, 1.0, 0.0, 2.0]]
    assert rewards.tolist() == [[0.0, 0.0, -0.25, 0.5 + 2.0, 0.0], [0.0, 0.0, -0.5, 0.0, -1.0 - 1.0]]


def test_policy_loss_equals_hand_computation():
    logp_old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1]]))  # ratios 1, 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -1.0, -2.0]])
    mask = torch.ones(1, 4)
    loss, clip_frac, approx_kl = ppo_policy_loss(logp, logp_old, adv, mask, clip_eps=0.2)
    # per token: max(-A r, -A clip(r)) = -1, max(-1.5, -1.2) = -1.2, max(0.5, 0.8) = 0.8, max(2.2, 2.2) = 2.2
    assert loss.item() == pytest.approx((-1.0 - 1.2 + 0.8 + 2.2) / 4)
    assert clip_frac.item() == pytest.approx(0.5)  # ratios 1.5 and 0.5 are outside [0.8, 1.2]
    r = torch.tensor([1.0, 1.5, 0.5, 1.1])
    assert approx_kl.item() == pytest.approx(((r - 1) - r.log()).mean().item())


def test_value_loss_clips_around_the_old_values():
    values_old = torch.tensor([[0.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.1, -0.5]])
    returns = torch.tensor([[1.0, 1.0, 1.0]])
    loss, frac = ppo_value_loss(values, values_old, returns, torch.ones(1, 3), clip_value=0.2)
    # clipped values 0.2, 0.1, -0.2; errors max((0.5)^2,(0.8)^2), max(0.81, 0.81), max(2.25, 1.44)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 2.25) / 3)
    assert frac.item() == pytest.approx(1 / 3)


def test_whitening_uses_only_the_answer_tokens():
    x = torch.tensor([[100.0, 1.0, 2.0, 3.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    w = masked_whiten(x, mask)
    assert w[0, 0] == 0 and w[0, 1:].mean().abs() < 1e-6 and w[0, 1:].pow(2).mean().sqrt() == pytest.approx(1, abs=1e-4)


@pytest.mark.parametrize("method, expected", [
    # two groups of 2 (returns 1, 3 and 0, 0), by hand: mean 2 and 0, unbiased std sqrt(2) and 0
    ("grpo", [-1 / (2**0.5 + 1e-4), 1 / (2**0.5 + 1e-4), 0.0, 0.0]),
    ("dr_grpo", [-1.0, 1.0, 0.0, 0.0]),
    ("rloo", [1 - 3, 3 - 1, 0.0, 0.0]),  # each against the other answer
    ("reinforce", [1 - 1, 3 - 1, 0 - 1, 0 - 1]),  # against the rollout's mean, 1
])
def test_group_advantages_equal_hand_computation_on_every_action(method, expected):
    returns = torch.tensor([1.0, 3.0, 0.0, 0.0])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1]]).float()
    advantages = group_advantages(returns, mask, 2, method)
    torch.testing.assert_close(advantages, torch.tensor(expected)[:, None] * mask)  # zero off the answer


def test_rloo_is_the_leave_one_out_mean_in_odd_groups():
    returns = torch.tensor([0.0, 1.0, 5.0, 2.0, -1.0, 2.0])  # two groups of 3
    rloo = group_advantages(returns, torch.ones(6, 1), 3, "rloo")[:, 0]
    others = torch.tensor([(1 + 5) / 2, (0 + 5) / 2, (0 + 1) / 2, (-1 + 2) / 2, (2 + 2) / 2, (2 - 1) / 2])
    torch.testing.assert_close(rloo, returns - others)
    grpo = group_advantages(returns, torch.ones(6, 1), 3, "grpo")[:, 0]
    assert grpo[:3].std().item() == pytest.approx(1.0, abs=1e-3)  # each group to std 1
    assert grpo[:3].sum().item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "rloo"])
def test_a_group_of_one_answer_is_refused(method, tmp_path):
    with pytest.raises(UsageError, match=f"--advantage {method} compares the answers to one prompt"):
        train_ppo.check_config(Config(out_dir=str(tmp_path), advantage=method, samples_per_prompt=1,
                                      minibatch_size=16))


def two_distributions():
    """A policy and a reference over 6 tokens, far enough apart for the estimators' biases to show."""
    theta = torch.tensor([1.5, -0.5, 0.3, 2.0, -1.0, 0.0], requires_grad=True)
    ref_logits = torch.tensor([0.0, 1.0, -0.5, 0.5, 0.8, -1.5])
    return theta, torch.log_softmax(ref_logits, 0)


def test_kl_estimates_on_sampled_tokens_approach_the_exact_kl_k1_and_k3_unbiased():
    theta, logp_ref = two_distributions()
    logp = torch.log_softmax(theta.detach(), 0)
    exact = (logp.exp() * (logp - logp_ref)).sum()
    tokens = torch.multinomial(logp.exp(), 400_000, replacement=True, generator=torch.Generator().manual_seed(0))
    means = {k: kl_estimate(logp[tokens], logp_ref[tokens], k).mean() for k in ("k1", "k2", "k3")}
    # the expectation of each, exactly, over the policy's distribution
    expected = {k: (logp.exp() * kl_estimate(logp, logp_ref, k)).sum() for k in ("k1", "k2", "k3")}
    for k in means:
        assert means[k].item() == pytest.approx(expected[k].item(), abs=0.01), k
    assert expected["k1"].item() == pytest.approx(exact.item(), rel=1e-5)
    assert expected["k3"].item() == pytest.approx(exact.item(), rel=1e-5)
    assert abs(expected["k2"].item() - exact.item()) > 0.05  # biased for the value
    assert (kl_estimate(logp, logp_ref, "k3") >= 0).all() and (kl_estimate(logp, logp_ref, "k1") < 0).any()


def test_kl_in_the_loss_k1_has_no_gradient_k2_the_kls_and_k3_the_reverse_kls():
    """The expected gradient of each estimator as a loss term, on tokens sampled from the policy (gradient
    through logp only, as the update takes it), against the analytic gradients of the two KLs."""
    theta, logp_ref = two_distributions()

    def expected_gradient(k):
        logp = torch.log_softmax(theta, 0)
        weights = logp.exp().detach()  # the sampling distribution: no gradient through it
        (grad,) = torch.autograd.grad((weights * kl_estimate(logp, logp_ref, k)).sum(), theta)
        return grad

    def kl_gradient(forward):
        logp = torch.log_softmax(theta, 0)
        kl = (logp_ref.exp() * (logp_ref - logp)).sum() if forward else (logp.exp() * (logp - logp_ref)).sum()
        (grad,) = torch.autograd.grad(kl, theta)
        return grad

    torch.testing.assert_close(expected_gradient("k1"), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(expected_gradient("k2"), kl_gradient(forward=False))  # KL(pi || pi_ref)
    torch.testing.assert_close(expected_gradient("k3"), kl_gradient(forward=True))  # KL(pi_ref || pi)
    assert (kl_gradient(forward=True) - kl_gradient(forward=False)).abs().max() > 0.1


def test_the_kl_term_goes_where_kl_in_says():
    score = torch.tensor([1.0, -0.5])
    logp = torch.tensor([[0.0, -1.0, -2.0, -0.5], [0.0, -0.3, -1.2, 0.0]])
    logp_ref = torch.tensor([[0.0, -1.5, -1.0, -0.7], [0.0, -0.2, -2.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    k1 = (logp - logp_ref) * mask
    for estimator in ("k1", "k2", "k3"):
        rewards, kl = penalised_rewards(score, logp, logp_ref, mask, 0.2, Config(kl_estimator=estimator))
        penalty = kl_estimate(logp, logp_ref, estimator) * mask
        torch.testing.assert_close(rewards.sum(1), score - 0.2 * penalty.sum(1))
        torch.testing.assert_close(kl, k1)  # what is logged as kl stays the k1 estimate
    rewards, _ = penalised_rewards(score, logp, logp_ref, mask, 0.2, Config(kl_in="loss"))
    assert torch.equal(rewards, per_token_rewards(score, logp, logp_ref, mask, 0.0)[0])  # the score alone


def test_action_logprobs_equal_log_softmax_shifted_by_one_column():
    """On a left-padded prompt batch with answers of different lengths: the log-prob at action column t
    is log_softmax of the logits at column t-1, read at token t; zeros off the actions; entropy likewise."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=32, vocab_size=53, n_layer=1, n_head=2, n_embd=32)).eval()
    tokens = torch.randint(0, 52, (3, 9))
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[0, :3] = 0  # left padding of a short prompt
    action_mask = torch.zeros(3, 9)
    action_mask[0, 5:] = 1
    action_mask[1, 4:7] = 1  # an answer that ended early: its tail is padding, not actions
    action_mask[2, 8:] = 1
    attention_mask[1, 7:] = 0
    with torch.no_grad():
        hidden = gpt.hidden_states(tokens, attention_mask)
        logp, entropy = action_logprobs(gpt, hidden, tokens, action_mask, temperature=0.7, impl="torch")
        logp_all = torch.log_softmax(gpt(tokens, attention_mask) / 0.7, dim=-1)  # (B, T, V)
    for b in range(3):
        for t in range(9):
            if action_mask[b, t]:
                assert logp[b, t] == pytest.approx(logp_all[b, t - 1, tokens[b, t]].item(), abs=1e-5)
                h = -(logp_all[b, t - 1].exp() * logp_all[b, t - 1]).sum()
                assert entropy[b, t] == pytest.approx(h.item(), abs=1e-5)
            else:
                assert logp[b, t] == 0 and entropy[b, t] == 0
    values = torch.arange(27.0).view(3, 9)
    assert at_actions(values, action_mask)[1].tolist() == [0, 0, 0, 0, 12, 13, 14, 0, 0]


def test_exact_kl_is_the_kl_of_the_next_token_distributions_at_each_action():
    """The logged exact KL at action column t is KL(pi(. | s) || pi_ref(. | s)) of the state before it, over the
    whole vocabulary (torch.distributions here), at the temperature of sampling; 0 off the actions."""
    policy, ref = (GPT(GPTConfig(block_size=16, vocab_size=37, n_layer=1, n_head=2, n_embd=32)).eval() for _ in "ab")
    tokens = torch.randint(0, 37, (2, 7), generator=torch.Generator().manual_seed(0))
    action_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1]]).float()
    with torch.no_grad():
        kl = exact_kl(policy, ref, policy.hidden_states(tokens), ref.hidden_states(tokens), action_mask, 0.7, chunk=3)
        p, q = (torch.distributions.Categorical(logits=m(tokens) / 0.7) for m in (policy, ref))  # (B, T, V) each
        expected = torch.distributions.kl_divergence(p, q)  # (B, T): the distributions after each token
    expected = at_actions(expected, action_mask)
    torch.testing.assert_close(kl, expected, atol=1e-6, rtol=1e-5)
    assert (kl[action_mask.bool()] > 0).all() and (kl[~action_mask.bool()] == 0).all()


def ppo_cfg(out, sft_run, reward_dir, **kw):
    base = dict(out_dir=str(out), sft=str(sft_run / "ckpt.pt"), reward=str(reward_dir / "ckpt.pt"),
                prompts_per_iter=16, samples_per_prompt=2, minibatch_size=16, max_new_tokens=16, ppo_epochs=2,
                iterations=4, eval_interval=2, eval_prompts=32, sample_interval=2)
    return Config(**{**base, **kw})


@pytest.fixture(scope="module")
def reward_dir(reward_run):
    return reward_run[0]


def test_short_run_raises_reward_and_keeps_reference_frozen(sft_run, reward_dir, tmp_path):
    cfg = ppo_cfg(tmp_path, sft_run, reward_dir, iterations=12, eval_interval=12, lr=3e-4)
    model, ref = train_ppo.main(cfg)
    log = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    evals = [r for r in log if "eval_reward" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 12
    assert evals[-1]["eval_reward"] > evals[0]["eval_reward"] + 0.1, evals
    sft = policy_from_checkpoint(load_checkpoint(sft_run / "ckpt.pt", "sft"))
    for (name, p_ref), p_sft, p_pol in zip(ref.named_parameters(), sft.parameters(), model.policy.parameters()):
        assert not p_ref.requires_grad and torch.equal(p_ref, p_sft), name
    assert any(not torch.equal(p, q) for p, q in zip(model.policy.parameters(), sft.parameters()))
    updates = [r for r in log if "policy_loss" in r]
    assert updates[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout comes from the reference itself
    for key in ("clip_frac", "approx_kl", "explained_variance", "entropy", "eos_fraction", "gold", "value_loss"):
        assert key in updates[-1]
    # the exact KL (over the vocabulary) starts at 0 too, and the sampled estimate tracks it
    assert updates[0]["kl_exact"] == pytest.approx(0.0, abs=1e-4)
    assert updates[-1]["kl_exact"] > 0


def test_resume_continues_exactly(sft_run, reward_dir, tmp_path, monkeypatch):
    straight, _ = train_ppo.main(ppo_cfg(tmp_path / "a", sft_run, reward_dir))
    restore = crash_after_first_checkpoint(train_ppo, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_ppo.main(ppo_cfg(tmp_path / "b", sft_run, reward_dir))
    restore()
    assert load_checkpoint(tmp_path / "b" / "ckpt.pt", "ppo")["step"] == 2
    resumed, _ = train_ppo.main(ppo_cfg(tmp_path / "b", sft_run, reward_dir, resume=True))
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


@pytest.mark.parametrize("method, estimator, kl_in", [("grpo", "k3", "loss"), ("rloo", "k1", "reward")])
def test_a_critic_free_run_raises_reward_without_a_value_loss(method, estimator, kl_in, sft_run, reward_dir,
                                                              tmp_path):
    """The group is the baseline: the reward model's score rises as with PPO's value head, no value head is
    built (none in the checkpoint) and no value loss is computed or logged. GRPO as its paper runs it: k3 in
    the loss."""
    cfg = ppo_cfg(tmp_path, sft_run, reward_dir, iterations=12, eval_interval=12, lr=3e-4, advantage=method,
                  samples_per_prompt=4, prompts_per_iter=8, kl_estimator=estimator, kl_in=kl_in)
    model, _ = train_ppo.main(cfg)
    log = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    evals = [r for r in log if "eval_reward" in r]
    assert evals[-1]["eval_reward"] > evals[0]["eval_reward"] + 0.1, evals
    updates = [r for r in log if "policy_loss" in r]
    assert not any(key in r for r in updates for key in ("value_loss", "value_clip_frac", "explained_variance"))
    assert model.value_head is None
    assert not any(name.startswith("value_head.") for name in torch.load(tmp_path / "ckpt.pt")["model"])
    assert all(("kl_loss" in r) == (kl_in == "loss") for r in updates)
    assert updates[-1]["kl"] > 0  # the k1 estimate is logged wherever the KL term goes


def test_the_gold_reward_is_the_judges_score_of_each_answer(tmp_path):
    """--reward gold: no reward model; each answer of a rollout is scored by the task's judge, called as a
    reward model is (prompt + answer ids, left-padded, each answer ending with EOS)."""
    from support import task
    from support.data import Tokenizer, pad_batch
    from support.ppo_run import GoldJudge

    tok = Tokenizer.for_texts(task.vocabulary_texts())
    rows = task.demonstrations(8, "eval", 1)  # the demonstrator's answers, of mixed quality
    rows[0]["response"] = " purple purple purple"
    sequences = [tok.encode(r["prompt"]) + tok.encode(r["response"]) + [tok.eos_id] for r in rows]
    tokens, attention_mask = pad_batch(sequences, tok.eos_id, side="left")
    expected = [task.gold_score(r["prompt"], r["response"]) for r in rows]
    assert GoldJudge(tok)(tokens, attention_mask).tolist() == expected
    assert len(set(expected)) > 1  # answers the judge tells apart
    with pytest.raises(UsageError, match="--reward gold needs --data default"):
        train_ppo.check_config(Config(out_dir=str(tmp_path), reward="gold", data="prompts.jsonl"))


def test_a_run_on_the_gold_reward_raises_gold(sft_run, tmp_path):
    cfg = ppo_cfg(tmp_path, sft_run, tmp_path, reward="gold", iterations=12, eval_interval=12, lr=3e-4)
    train_ppo.main(cfg)
    evals = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "eval_reward" in r]
    assert [r["eval_reward"] for r in evals] == [r["eval_gold"] for r in evals]  # the reward is the gold score
    assert evals[-1]["eval_gold"] > evals[0]["eval_gold"] + 0.1, evals
