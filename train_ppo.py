"""
Stage 4 of RLHF: PPO against the reward model, on a KL leash.

The language model is an agent. The state is the prompt plus the answer tokens so far; an action is
the next token; the policy pi(a | s) is the model's softmax. The SFT model is the starting policy, and
a frozen copy of it is the reference pi_ref. When the answer is finished, the reward model scores it.
Each token also pays a KL penalty for drifting from the reference, so the reward of the action at t is

    r_t = - kl_coef * (logp_policy(a_t) - logp_ref(a_t))   +   [t is the last token] * score(x, y)

Without the penalty the policy finds whatever the reward model over-rates (reward hacking: run with
--kl_coef 0 and watch the gold score). A value head on the policy estimates V(s_t), the expected
return from state s_t, and Generalised Advantage Estimation turns rewards and values into advantages:

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
    A_t     = delta_t + gamma * lam * A_{t+1}            returns_t = A_t + V(s_t)

Then several epochs of the clipped PPO objective (Schulman et al. 2017) over mini-batches of the rollout:

    ratio_t = exp(logp_new(a_t) - logp_old(a_t))
    policy loss = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_eps, 1 + clip_eps))
    value loss  = mean_t 0.5 * max((V_new - returns)^2, (V_old + clip(V_new - V_old, +-clip_value) - returns)^2)

Every switch below is one of the implementation details that Ziegler et al. 2019, Stiennon et al. 2020,
Ouyang et al. 2022 and Huang et al. 2024 ("The N+ implementation details of RLHF with PPO") found to
matter: several samples per prompt, a penalty for answers without EOS, whitened advantages, optional
reward scaling, value clipping, PPO epochs over mini-batches, gradient clipping, an adaptive KL
coefficient, and log-probs recomputed with the very numerics of training.

Beyond PPO's recipe, two switches: --advantage grpo (or dr_grpo, rloo, reinforce) drops the value head
and takes the other answers sampled for the same prompt as the baseline, and
--reward gold puts the task's own judge where the reward model was: a verifiable reward.

    python train_ppo.py                                  # built-in task, from out/sft and out/reward, CPU
    python train_ppo.py --kl_coef 0 --out_dir out/ppo_nokl      # reward hacking, made visible
    python train_ppo.py --advantage grpo --samples_per_prompt 4 --out_dir out/grpo      # no critic
"""

import copy
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from kernels.logprob import IMPLS as LOGPROB_IMPLS
from kernels.logprob import linear_logprobs
from model import PolicyWithValue, generate, last_token_index
from support import distributed, memory
from support.beyond_ppo import group_advantages, kl_estimate
from support.checkpoint import save_checkpoint
from support.data import decode_answers
from support.ppo_run import evaluate, load_checkpoints, log_iteration, prompt_sets, resume
from support.training import (
    MetricsLog, Progress, autocast, batch_indices, check, check_flags, check_out_dir, fit_lengths, flag, parse_args,
    pick_device, run,
)

ADVANTAGES = ("gae", "grpo", "dr_grpo", "rloo", "reinforce")  # group_advantages: the critic-free ones
KL_ESTIMATORS = ("k1", "k2", "k3")  # kl_estimate


@dataclass
class Config:
    """PPO: the SFT policy learns to please the reward model, held near the SFT reference by a KL penalty."""

    out_dir: str = flag("out/ppo", "folder for ckpt.pt, metrics.jsonl and samples.jsonl")
    sft: str = flag("out/sft/ckpt.pt", "the SFT checkpoint: the frozen reference, and the policy (unless --policy)")
    policy: str = flag("", "the sft or ppo checkpoint the policy starts from (default: --sft): a later RLHF round "
                       "starts from the last round's policy, still held to the SFT reference (as InstructGPT)")
    reward: str = flag("out/reward/ckpt.pt", "the reward-model checkpoint (train_reward.py writes it), or 'gold': "
                       "the built-in task's gold judge itself, a reward that cannot be gamed the same way")
    data: str = flag("default", "'default' (the built-in task's prompts) or a JSONL of prompts, in any data format")
    n_prompts: int = flag(4000, "built-in task: training prompts drawn (with repeats) from its train split", min=1)
    iterations: int = flag(150, "PPO iterations: each one a rollout, then ppo_epochs of updates on it", min=1)
    prompts_per_iter: int = flag(32, "prompts per rollout", min=1)
    samples_per_prompt: int = flag(2, "answers sampled per prompt", min=1)
    max_prompt_tokens: int = flag(0, "a prompt keeps its last this many tokens (0: 3/4 of the block size)", min=0)
    max_new_tokens: int = flag(24, "longest answer; an answer cut here has no EOS and pays eos_penalty", min=1)
    temperature: float = flag(1.0, "sampling temperature; the log-probs are those of softmax(z / T)", above=0)
    # a leash that keeps the KL near 1.5-2 nats, where gold gained most, with a step large enough that the unleashed
    # run (kl_coef 0) finds its hack in 150 iterations (bench/RESULTS.md, "A stronger push and a stronger leash")
    kl_coef: float = flag(0.2, "weight of the per-token KL penalty (the first value if adaptive_kl)", min=0)
    adaptive_kl: bool = flag(False, "adapt kl_coef towards target_kl (Ziegler et al. 2019, section 2.2)")
    target_kl: float = flag(2.0, "adaptive_kl: wanted KL to the reference per answer, in nats", above=0)
    kl_horizon: int = flag(2000, "adaptive_kl: how many answers the controller averages over", min=1)
    kl_estimator: str = flag("k1", "the per-token KL estimate: k1 = logp - logp_ref (InstructGPT's), k2, k3; see "
                             "support/beyond_ppo.py", choices=KL_ESTIMATORS)
    kl_in: str = flag("reward", "where the KL term goes: 'reward' (a per-token penalty, PPO's) or 'loss' (added to "
                      "the policy loss, GRPO's)", choices=("reward", "loss"))
    eos_penalty: float = flag(1.0, "subtracted from the score of an answer that did not end with EOS", min=0)
    reward_scaling: bool = flag(False, "divide scores by their running standard deviation")
    whiten_advantages: bool = flag(True, "gae: normalise advantages to mean 0, std 1 over the rollout's answer "
                                   "tokens")
    gamma: float = flag(1.0, "discount; 1: a token early in the answer matters as much as a late one", min=0, max=1)
    lam: float = flag(0.95, "GAE lambda: 1 Monte Carlo (high variance), 0 one-step TD (high bias)", min=0, max=1)
    advantage: str = flag("gae", "the advantages: 'gae' (the value head's, PPO's), or critic-free with the other "
                          "answers as the baseline: 'grpo', 'dr_grpo', 'rloo' (the prompt's samples_per_prompt "
                          "answers), 'reinforce' (the whole rollout); see support/beyond_ppo.py", choices=ADVANTAGES)
    ppo_epochs: int = flag(2, "passes over each rollout", min=1)
    minibatch_size: int = flag(32, "answers per PPO update", min=1)
    clip_eps: float = flag(0.2, "policy ratio clip range", above=0, below=1)
    clip_value: float = flag(0.2, "value clip range around the rollout's values (not clip_eps)", above=0)
    vf_coef: float = flag(0.5, "weight of the value loss", min=0)
    lr: float = flag(4e-4, "learning rate of policy and value head (constant)", above=0)
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0: off)", min=0)
    # an eval samples 256 answers, four rollouts' worth: every 25 iterations keeps it a small share of the run.
    # Its prompts and sampling seed are its own, so the interval changes no result.
    eval_interval: int = flag(25, "evaluate on held-out prompts and checkpoint every this many iterations", min=1)
    eval_prompts: int = flag(256, "held-out prompts for the eval, sampled with a fixed seed: every eval of a run "
                             "(and of runs with the same --seed) uses the same draws", min=1)
    sample_interval: int = flag(10, "write a few samples to samples.jsonl every this many iterations", min=1)
    logprob_impl: str = flag("auto", "per-token log-probs: 'auto' (Triton on CUDA), 'triton', 'torch'",
                             choices=LOGPROB_IMPLS)
    seed: int = flag(1337, "seed for prompt order and sampling", min=0, max=2**31 - 1)
    device: str = flag("auto", "'auto' (cuda if available), 'cpu' or 'cuda'")
    attn_impl: str = flag("auto", "attention implementation", choices=("auto", "triton", "sdpa", "naive"))
    resume: bool = flag(False, "continue from out_dir/ckpt.pt at the iteration it saved")


def check_config(cfg):
    """Every flag checked before any work starts (a bad one must not crash after the first evaluation)."""
    check_flags(cfg)
    distributed.check_splits(cfg, "prompts_per_iter", "minibatch_size")  # torchrun: each rank samples its share
    check(cfg.reward != "gold" or cfg.data == "default", "--reward gold needs --data default (the task's judge)")
    check(cfg.advantage in ("gae", "reinforce") or cfg.samples_per_prompt >= 2,
          f"--advantage {cfg.advantage} compares the answers to one prompt: use --samples_per_prompt 2 or more")
    check(cfg.minibatch_size <= cfg.prompts_per_iter * cfg.samples_per_prompt,
          f"--minibatch_size {cfg.minibatch_size} is larger than a rollout "
          f"({cfg.prompts_per_iter} prompts x {cfg.samples_per_prompt} samples)")
    check_out_dir(cfg.out_dir)


# -----------------------------------------------------------------------------
# The pieces worth testing


def at_actions(x, action_mask):
    """x read at the state before each action: column t gets x[:, t-1] where column t holds an action,
    else 0. hidden[:, t] is the state after token t, which chooses token t+1."""
    out = torch.zeros_like(x)
    out[:, 1:] = x[:, :-1]
    return out * action_mask


def action_logprobs(gpt, hidden, tokens, action_mask, temperature, impl):
    """log pi(a_t | s_t) and the entropy of pi(. | s_t) at every action column t, each (B, T) fp32 with zeros
    elsewhere, for any GPT (the policy or the reference) from its hidden states (B, T, C). Only the N action
    states go through the LM head, in the fused log-prob kernel: the (B, T, V) logits never exist."""
    acts = action_mask[:, 1:].bool()  # (B, T-1): column t+1 holds an action taken in state t
    logp_acts, entropy_acts = linear_logprobs(hidden[:, :-1][acts], gpt.lm_head.weight, tokens[:, 1:][acts],
                                              temperature, impl=impl)  # (N,), (N,)
    logp = torch.zeros(tokens.shape, device=tokens.device)  # (B, T)
    entropy = torch.zeros(tokens.shape, device=tokens.device)  # (B, T)
    logp[:, 1:][acts] = logp_acts
    entropy[:, 1:][acts] = entropy_acts
    return logp, entropy


def policy_forward(model, tokens, attention_mask, action_mask, cfg):
    """(logp, entropy, values), each (B, T), zeros outside the answer: what a rollout records and every
    PPO update recomputes, with the same code and numerics."""
    with autocast(tokens.device):
        hidden, values = model(tokens, attention_mask)  # (B, T, C), (B, T)
    logp, entropy = action_logprobs(model.policy, hidden, tokens, action_mask, cfg.temperature, cfg.logprob_impl)
    return logp, entropy, at_actions(values, action_mask)  # values fp32: model.ScalarHead


def per_token_rewards(score, logp, logp_ref, action_mask, kl_coef):
    """r_t = -kl_coef * (logp - logp_ref) on every action, plus the score on the last action. logp - logp_ref is
    the sampled estimate of KL(pi || pi_ref) at that token (its expectation under the policy is the KL); it
    lands only where the policy acted (not on the prompt, not on padding)."""
    # exercise kl_rewards: r_t of the docstring, on actions; check: rewards.sum(1) == score - kl_coef * kl.sum(1)
    kl = (logp - logp_ref) * action_mask  # (B, T)
    rewards = -kl_coef * kl
    rewards[torch.arange(len(score)), last_token_index(action_mask)] += score
    return rewards, kl
    # end exercise


def penalised_rewards(score, logp, logp_ref, action_mask, kl_coef, cfg):
    """(rewards, the k1 estimate logged as kl), each (B, T): per_token_rewards with the KL term where
    cfg.kl_in puts it, estimated by cfg.kl_estimator (k1 as per_token_rewards computes it)."""
    in_reward = cfg.kl_in == "reward"
    rewards, kl = per_token_rewards(score, logp, logp_ref, action_mask,
                                    kl_coef if in_reward and cfg.kl_estimator == "k1" else 0.0)
    if in_reward and cfg.kl_estimator != "k1":
        rewards = rewards - kl_coef * kl_estimate(logp, logp_ref, cfg.kl_estimator) * action_mask
    return rewards, kl


def gae(rewards, values, action_mask, gamma, lam):
    """Advantages and returns by Generalised Advantage Estimation (Schulman et al. 2016), (B, T). V(s) after
    the last action is 0: the episode ended. Walks backwards over the columns; off the answer stays 0."""
    # exercise gae: lecture's delta_t, A_t from the end back, reset off the mask; check: gamma=lam=1: reward-to-go
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        m = action_mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * m
        # outside the answer, carry nothing back: the next action's value and advantage start at 0
        next_advantage = advantages[:, t]
        next_value = values[:, t] * m
    returns = (advantages + values) * action_mask
    return advantages, returns
    # end exercise


def advantages_and_returns(rewards, values, action_mask, cfg):
    """(advantages, returns), each (B, T): GAE with the value head (whitened if cfg.whiten_advantages), or with
    a critic-free cfg.advantage the group's, and returns None: no value head to train."""
    if cfg.advantage != "gae":
        return group_advantages(rewards.sum(1), action_mask, cfg.samples_per_prompt, cfg.advantage), None
    advantages, returns = gae(rewards, values, action_mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, action_mask)
    return advantages, returns


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the masked entries (of every rank's rollout under torchrun); outside the mask
    stays 0."""
    mean = distributed.masked_mean(x, mask)
    var = distributed.masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def ppo_policy_loss(logp, logp_old, advantages, action_mask, clip_eps):
    """The clipped surrogate: take the pessimistic one of the unclipped and clipped objectives, so that
    a ratio pushed beyond 1 +- clip_eps earns nothing more. Returns (loss, clip fraction, approx KL)."""
    # exercise policy_loss: max(-A ratio, -A clip(ratio)) averaged on the actions; check: logp = logp_old: -mean A
    ratio = torch.exp(logp - logp_old)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.max(unclipped, clipped), action_mask)
    # end exercise
    # the fraction of tokens whose ratio left [1 - clip_eps, 1 + clip_eps], as CleanRL and the PPO paper
    # log it: how far one rollout's updates move the policy
    clip_frac = masked_mean(((ratio - 1).abs() > clip_eps).float(), action_mask)
    # approx KL(old || new) with the low-variance estimator (ratio - 1) - log ratio (Schulman, "Approximating
    # KL divergence", 2020): always >= 0, and the health metric CleanRL logs
    approx_kl = masked_mean((ratio - 1) - (logp - logp_old), action_mask)
    return loss, clip_frac, approx_kl


def ppo_value_loss(values, values_old, returns, action_mask, clip_value):
    """0.5 * squared error, clipped around the rollout's values like the policy ratio: the pessimistic
    (larger) of the two errors. Returns (loss, value clip fraction)."""
    # exercise value_loss: half the larger of clipped and unclipped squared errors; check: V = values_old: 0.5 MSE
    values_clipped = values_old + torch.clamp(values - values_old, -clip_value, clip_value)
    err = (values - returns) ** 2
    err_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(err, err_clipped), action_mask)
    return loss, masked_mean((err_clipped > err).float(), action_mask)
    # end exercise


def update_loss(logp, values, mb, roll, advantages, returns, mb_mask, kl_coef, cfg):
    """One PPO update's loss on the mini-batch rows mb, and its metrics:

        loss = policy loss  +  vf_coef * value loss (with a value head)  +  kl_coef * KL (--kl_in loss)

    The KL term takes its gradient through logp, against the rollout's logp_ref (see kl_estimate)."""
    pg_loss, clip_frac, approx_kl = ppo_policy_loss(logp, roll["logp"][mb], advantages[mb], mb_mask, cfg.clip_eps)
    metrics = {"policy_loss": pg_loss, "clip_frac": clip_frac, "approx_kl": approx_kl}
    loss = pg_loss
    if returns is not None:  # a value head (gae)
        vf_loss, vf_clip_frac = ppo_value_loss(values, roll["values"][mb], returns[mb], mb_mask, cfg.clip_value)
        loss = loss + cfg.vf_coef * vf_loss
        metrics.update(value_loss=vf_loss, value_clip_frac=vf_clip_frac)
    if cfg.kl_in == "loss":
        kl_loss = masked_mean(kl_estimate(logp, roll["logp_ref"][mb], cfg.kl_estimator), mb_mask)
        loss = loss + kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss
    return loss, metrics


class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2: kl_coef *= 1 + e * n / horizon, with the proportional error
    e = KL / target - 1 clipped to [-0.2, 0.2]: raised when the KL is above target, lowered when below,
    by at most 20% per `horizon` answers."""

    def __init__(self, kl_coef, target, horizon):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl, n_answers):
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_answers / self.horizon


class RunningStd:
    """Running variance of the scores (Welford, merged batch by batch), for optional reward scaling."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x):
        n, mean, var = x.numel(), x.mean().item(), x.var(unbiased=False).item()
        delta, total = mean - self.mean, self.count + n
        self.m2 += var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self):
        return (self.m2 / max(self.count - 1, 1)) ** 0.5 if self.count > 1 else 1.0


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns), a 0-dim tensor: 1 is a perfect value head, 0 no better
    than a constant."""
    v, r = values[mask.bool()], returns[mask.bool()]
    return 1 - (r - v).var() / r.var() if r.numel() > 1 else torch.tensor(float("nan"))


@torch.no_grad()
def exact_kl(policy, ref, hidden, hidden_ref, action_mask, temperature, chunk=1024):
    """KL(pi(. | s_t) || pi_ref(. | s_t)) summed over the whole vocabulary at each action state, (B, T): the
    penalty's logp - logp_ref is an unbiased but noisy estimate of it, and this, logged beside it, shows how
    noisy. It needs the full logits, chunk rows at a time, and only as a metric: no gradient goes through it."""
    acts = action_mask[:, 1:].bool()
    h, h_ref = hidden[:, :-1][acts], hidden_ref[:, :-1][acts]  # (N, C) each
    kl = []
    for i in range(0, len(h), chunk):
        logp = F.log_softmax(h[i : i + chunk] @ policy.lm_head.weight.T / temperature, dim=-1)  # (Nc, V)
        logp_ref = F.log_softmax(h_ref[i : i + chunk] @ ref.lm_head.weight.T / temperature, dim=-1)  # (Nc, V)
        kl.append((logp.exp() * (logp - logp_ref)).sum(dim=-1))  # (Nc,)
    out = torch.zeros(action_mask.shape, device=action_mask.device)
    out[:, 1:][acts] = torch.cat(kl)
    return out


@torch.no_grad()
def rollout_forward(model, ref, reward_model, tokens, attention_mask, answer_mask, cfg, minibatches):
    """logp, entropy and values of the policy, logp_ref of the reference, the exact KL, and the reward
    model's scores of a rollout, each (B, T) or (B,) in row order. The rows run in the mini-batches of the
    first PPO epoch (a list of row indices), which recomputes logp with the same function on the same rows:
    its ratio is exactly 1, also on a GPU, where a matmul's rounding depends on its shape."""
    out = {"logp": [], "entropy": [], "values": [], "logp_ref": [], "kl_exact": [], "score": []}
    for rows in minibatches:
        tok, att, act = tokens[rows], attention_mask[rows], answer_mask[rows].float()
        with autocast(tokens.device):
            hidden, values = model(tok, att)  # (B, T, C), (B, T)
            hidden_ref = ref.hidden_states(tok, att)  # (B, T, C)
            score = reward_model(tok, att)  # read at the last real token, the answer's EOS; fp32
        logp, entropy = action_logprobs(model.policy, hidden, tok, act, cfg.temperature, cfg.logprob_impl)
        logp_ref, _ = action_logprobs(ref, hidden_ref, tok, act, cfg.temperature, cfg.logprob_impl)
        kl_exact = exact_kl(model.policy, ref, hidden.float(), hidden_ref.float(), act, cfg.temperature)
        for key, value in zip(out, (logp, entropy, at_actions(values, act), logp_ref, kl_exact, score)):
            out[key].append(value)
    order = torch.cat(minibatches)
    return {key: torch.cat(value)[order.argsort()] for key, value in out.items()}  # back in row order


def rollout_stats(roll, kl, returns, action_mask, ends_with_eos, sums, n_updates):
    """The iteration's metrics as Python floats: means over the rollout's answers (or answer tokens), and
    the update metrics' means over all updates, fetched from the device in one sync. Under torchrun, over
    every rank's answers (each rank holds as many; the explained variance is the ranks' mean)."""
    stats = {
        "reward": roll["score"].mean(),  # the reward model's score, before penalties
        "kl": kl.sum(1).mean(),  # sum over the answer of logp - logp_ref (the penalty's estimate), mean over answers
        "kl_exact": roll["kl_exact"].sum(1).mean(),  # the same with the exact KL over the vocabulary
        "entropy": distributed.masked_mean(roll["entropy"], action_mask),
        **sums,
        "answer_length": action_mask.sum(1).mean(),
        "eos_fraction": ends_with_eos.float().mean(),
    }
    if returns is not None:  # a value head's (gae)
        stats["explained_variance"] = explained_variance(roll["values"], returns, action_mask)
    values = torch.stack([torch.as_tensor(v).float() for v in stats.values()])
    # the ranks' means averaged, their shares of the update metrics added (torchrun); then the one sync point
    values = distributed.sum_over_ranks(torch.where(torch.tensor([k in sums for k in stats], device=values.device),
                                                    values, values / distributed.WORLD)).tolist()
    return {key: value / n_updates if key in sums else value for key, value in zip(stats, values)}


# -----------------------------------------------------------------------------
# The training run


def main(cfg):
    check_config(cfg)
    device = distributed.setup(pick_device(cfg.device, cfg.attn_impl))  # torchrun: this rank's device
    torch.manual_seed(cfg.seed)
    ckpt_path = f"{cfg.out_dir}/ckpt.pt"

    # ---- the models: the policy with a value head (trained), the reference and the reward model (frozen) ----
    sft_policy, start_policy, reward_model, tok = load_checkpoints(cfg, device)
    ref = copy.deepcopy(sft_policy).to(device).eval().requires_grad_(False)  # pi_ref: a frozen copy of the SFT model
    # the value head starts afresh (a policy of an earlier round has none); critic-free advantages need none
    model = PolicyWithValue(sft_policy.config, value_head=cfg.advantage == "gae")
    model.policy.load_state_dict(start_policy.state_dict())
    # eval(): PPO's ratio compares the log-probs of the sampling policy and the updated one, and train-time
    # noise (dropout, were a model to have it) would count as a change of the policy
    model.to(device).eval()
    cfg = fit_lengths(cfg, model.config.block_size, "max_new_tokens")
    memory.announce("ppo", model.config, cfg, device)  # on a GPU: will an update fit, and what to lower if not
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    score_std = RunningStd()
    start_iter, kl_coef = resume(ckpt_path, model, optimizer, score_std) if cfg.resume else (0, cfg.kl_coef)
    kl_ctl = AdaptiveKLController(kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl else None
    log = MetricsLog(f"{cfg.out_dir}/metrics.jsonl", resume_step=start_iter if cfg.resume else None)
    samples_log = MetricsLog(f"{cfg.out_dir}/samples.jsonl", resume_step=start_iter if cfg.resume else None)
    train_prompts, train_ids, eval_prompts, eval_ids = prompt_sets(cfg, tok)
    if start_iter == 0:
        metrics = evaluate(model, reward_model, tok, eval_prompts, eval_ids, cfg, device, 0)
        log.write(metrics)
        print(f"iteration 0 ({cfg.policy or 'the SFT policy'}): eval reward {metrics['eval_reward']:.3f}, "
              f"eval gold {metrics.get('eval_gold', float('nan')):.3f}")

    progress = Progress("ppo", cfg.iterations, start_iter)
    for it in range(start_iter, cfg.iterations):
        # ---- 1. rollout: sample answers from the current policy ----
        t0 = time.time()
        # under torchrun each rank samples its share of the prompts, with a seed of its own
        rows = distributed.share(batch_indices(it, len(train_prompts), cfg.prompts_per_iter, cfg.seed))
        rows = [i for i in rows for _ in range(cfg.samples_per_prompt)]
        with autocast(device):  # sampled with the numerics that score it (bf16 on a GPU)
            tokens, attention_mask, answer_mask = generate(model.policy, [train_ids[i] for i in rows],
                                                           cfg.max_new_tokens, tok.eos_id, cfg.temperature,
                                                           seed=(cfg.seed * 1000 + it) * distributed.WORLD
                                                           + distributed.RANK)
        gen_time = time.time() - t0
        action_mask = answer_mask.float()

        # ---- 2. score it: reward model, log-probs of policy and reference, values ----
        t1 = time.time()
        # each PPO epoch's shuffle of the rollout, in mini-batches (of this rank's share of each under torchrun)
        epochs = [torch.randperm(len(tokens), generator=torch.Generator().manual_seed(cfg.seed + 31 * it + epoch))
                  .to(device).split(cfg.minibatch_size // distributed.WORLD) for epoch in range(cfg.ppo_epochs)]
        roll = rollout_forward(model, ref, reward_model, tokens, attention_mask, answer_mask, cfg, epochs[0])
        ends_with_eos = ((tokens == tok.eos_id) & answer_mask.bool()).any(dim=1)
        score = roll["score"] - cfg.eos_penalty * (~ends_with_eos).float()
        if cfg.reward_scaling:
            score_std.update(torch.tensor(distributed.gather(score.tolist())))  # every rank's scores
            score = score / score_std.std

        # ---- 3. per-token rewards with the KL penalty, then GAE (or, critic-free, the answers of a group) ----
        rewards, kl = penalised_rewards(score, roll["logp"], roll["logp_ref"], action_mask, kl_coef, cfg)
        advantages, returns = advantages_and_returns(rewards, roll["values"], action_mask, cfg)

        # ---- 4. PPO epochs over shuffled mini-batches of the rollout ----
        sums, n_updates = {}, 0
        for minibatches in epochs:
            for mb in minibatches:
                mb_mask = action_mask[mb]
                logp, _, values = policy_forward(model, tokens[mb], attention_mask[mb], mb_mask, cfg)
                loss, metrics = update_loss(logp, values, mb, roll, advantages, returns, mb_mask, kl_coef, cfg)
                # a mean over the mini-batch's tokens on every rank: this rank's mean, weighted by its share
                share = distributed.share_weight(mb_mask.sum())
                optimizer.zero_grad(set_to_none=True)
                (loss * share).backward()
                distributed.sync_gradients(model)  # torchrun: the whole mini-batch's gradient on every rank
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
                optimizer.step()
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value.detach() * share
                n_updates += 1
        train_time = time.time() - t1

        # ---- 5. adapt the KL coefficient, log; evaluate and checkpoint every eval_interval ----
        step = it + 1
        record = {"step": step, **rollout_stats(roll, kl, returns, action_mask, ends_with_eos, sums, n_updates)}
        n_answers = len(rows) * distributed.WORLD  # every rank's
        if kl_ctl is not None:
            kl_ctl.update(record["kl"], n_answers)
            kl_coef = kl_ctl.value
        # counted on the host (this rank's prompts, every rank's answers)
        n_tokens = sum(len(train_ids[i]) for i in rows) * distributed.WORLD + record["answer_length"] * n_answers
        record.update(kl_coef=kl_coef, gen_tokens_per_s=record["answer_length"] * n_answers / gen_time,
                      train_tokens_per_s=n_tokens * (cfg.ppo_epochs + 1) / train_time)
        prompts, answers = [train_prompts[i] for i in rows], decode_answers(tok, tokens, answer_mask)
        log_iteration(log, samples_log, progress, record, prompts, answers, roll["score"].tolist(), cfg)
        if step % cfg.eval_interval == 0 or step == cfg.iterations:
            metrics = evaluate(model, reward_model, tok, eval_prompts, eval_ids, cfg, device, step)
            log.write(metrics)
            save_checkpoint(ckpt_path, model, "ppo", step, asdict(cfg), tok.state(), optimizer,
                            extra={"kl_coef": kl_coef, "score_std": vars(score_std), "metrics": metrics})
            progress.close()
            print(f"iteration {step}: eval reward {metrics['eval_reward']:.3f}, eval gold "
                  f"{metrics.get('eval_gold', float('nan')):.3f}, kl {record['kl']:.3f}; saved {ckpt_path}")
            for p, a, s in list(zip(prompts, answers, roll["score"].tolist()))[:2]:
                print(f"  {p!r} -> {a!r} (reward {s:.2f})")
    progress.close()
    return model, ref


if __name__ == "__main__":
    run(lambda: main(parse_args(Config)))
