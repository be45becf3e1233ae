"""
Beyond PPO's recipe (train_ppo.py's --advantage and --kl_estimator): critic-free advantages, where the other
answers sampled for the same prompt are the baseline instead of a value head, and the estimators of the
per-token KL term with what each one's value and gradient are.
"""

import torch

from support import distributed


def group_advantages(returns, action_mask, group_size, method):
    """Critic-free advantages (B, T): each answer's whole return R (its score minus its KL penalties) against
    a baseline made of other answers instead of a value head, on every one of its actions. The rollout's rows
    come in groups of group_size answers to one prompt.

        grpo       A = (R - mean) / std over the group       (Shao et al. 2024, DeepSeekMath)
        dr_grpo    A = R - mean over the group               (Liu et al. 2025: the std favours groups of equals)
        rloo       A = R - mean of the group's other answers (Ahmadian et al. 2024) = K/(K-1) (R - mean)
        reinforce  A = R - mean over the whole rollout       (Williams 1992, with a baseline)

    The std is the sample std (divided by K - 1, as torch.std and TRL compute it), plus 1e-4: a group of equal
    returns teaches nothing. The policy loss is a mean over the mini-batch's tokens, not over each answer's,
    so Dr. GRPO's other change (no 1/length per answer) holds for every method here."""
    if method == "reinforce":  # the mean of every rank's rollout under torchrun
        return (returns - distributed.masked_mean(returns, torch.ones_like(returns))).unsqueeze(1) * action_mask
    # exercise group_advantages: the docstring's A per answer, on each of its actions; check: a group's A sums to 0
    r = returns.view(-1, group_size)  # (prompts, K)
    centred = r - r.mean(dim=1, keepdim=True)
    if method == "grpo":
        advantage = centred / (r.std(dim=1, keepdim=True) + 1e-4)
    elif method == "dr_grpo":
        advantage = centred
    else:  # rloo
        advantage = centred * group_size / (group_size - 1)
    return advantage.reshape(-1, 1) * action_mask
    # end exercise


def kl_estimate(logp, logp_ref, estimator):
    """Per-token estimates of KL(pi || pi_ref) from the sampled tokens' log-probs (Schulman, "Approximating KL
    divergence", 2020), with log r = logp_ref - logp:

        k1 = -log r             unbiased for the KL's value; often negative, noisy
        k2 = (log r)^2 / 2      biased for the value (low variance, >= 0)
        k3 = (r - 1) - log r    unbiased for the value, >= 0, low variance while pi stays near pi_ref

    In the reward only the value counts. In the loss (--kl_in loss) the gradient does, through logp on the
    tokens the policy sampled: k1's is 0 in expectation (the mean of a score function), so k1 in the loss
    does nothing; k2's is exactly the gradient of KL(pi || pi_ref); k3's is the gradient of the other KL,
    KL(pi_ref || pi): a biased gradient for the penalty it is meant to be (GRPO uses it all the same)."""
    log_r = logp_ref - logp
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    # exercise kl_k3: the docstring's k3 from log r; check: >= 0, and (log r)^2 / 2 when log r = 1e-4 in float32
    return torch.expm1(log_r) - log_r  # expm1: r - 1 without cancellation when r is near 1
    # end exercise
