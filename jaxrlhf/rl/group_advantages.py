"""Critic-free advantages: the baseline of a response comes from the other responses to the same prompt
(or from a greedy response, or from the batch), not from a learned value.

Layout: sequence scores are grouped as [P, n], P prompts with n sampled responses each. A flat batch of
B = P·n rows is prompt-major (row b is sample b % n of prompt b // n), which is what `split_groups`
(a checked `reshape`) assumes; `jnp.reshape(adv, (-1,))` goes back. Token-level arrays ([B, T]) follow
the same row order. Every estimator that needs a group raises a ValueError for n < 2 at trace time
(group sizes are static shapes), never a silent NaN or an all-zero advantage.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

from jaxrlhf.rl.advantages import batched_discounted_returns
from jaxrlhf.rl.kl import kl_penalized_rewards
from jaxrlhf.rl.masked import masked_whiten


def split_groups(x: chex.Array, group_size: int) -> chex.Array:
    """[B, ...] → [B/n, n, ...] (prompt-major rows); ValueError when B is not a multiple of n ≥ 1."""
    if group_size < 1:
        raise ValueError(f"split_groups: group size must be ≥ 1, got {group_size}")
    if x.ndim < 1 or x.shape[0] % group_size:
        raise ValueError(
            f"split_groups: batch of shape {x.shape} is not divisible into groups of {group_size}"
        )
    return jnp.reshape(x, (x.shape[0] // group_size, group_size, *x.shape[1:]))


def _check_groups(scores: chex.Array, where: str, min_size: int = 2) -> chex.Array:
    chex.assert_rank(scores, 2)
    if scores.shape[1] < min_size:
        raise ValueError(
            f"{where}: group size {scores.shape[1]} (scores of shape {scores.shape}) is below {min_size}; "
            "a group baseline needs at least 2 responses per prompt"
        )
    return scores.astype(jnp.promote_types(scores.dtype, jnp.float32))


def grpo_advantages(scores: chex.Array, eps: chex.Numeric = 1e-4, unbiased_std: bool = True) -> chex.Array:
    """GRPO (Shao et al. 2024, DeepSeekMath): A_i = (r_i − mean(r)) / (std(r) + ε) within each group.

    scores: [P, n], n ≥ 2 → [P, n]. std is the sample standard deviation (Bessel, n − 1) by default, as
    in TRL, OpenRLHF and verl (torch.std's default); the paper does not say. For small groups the two
    differ by √(n/(n − 1)) (√2 at n = 2). `unbiased_std=False` divides by the population std. A group
    whose scores are all equal gets A = 0 (its std is 0; ε keeps the division finite).
    """
    r = _check_groups(scores, "grpo_advantages")
    centred = r - jnp.mean(r, axis=1, keepdims=True)
    std = jnp.std(r, axis=1, keepdims=True, ddof=1 if unbiased_std else 0)
    return centred / (std + eps)


def dr_grpo_advantages(scores: chex.Array) -> chex.Array:
    """Dr. GRPO (Liu et al. 2025): A_i = r_i − mean(r) within each group, no division by the std.

    scores: [P, n], n ≥ 2 → [P, n]. Dividing by the group std weights prompts that are nearly always
    solved (or never) most, a difficulty bias Dr. GRPO removes.
    """
    r = _check_groups(scores, "dr_grpo_advantages")
    return r - jnp.mean(r, axis=1, keepdims=True)


def rloo_advantages(scores: chex.Array) -> chex.Array:
    """RLOO (Ahmadian et al. 2024; Kool et al. 2019): A_i = r_i − (1/(n − 1))·Σ_{j≠i} r_j
    = n/(n − 1)·(r_i − mean(r)).

    scores: [P, n], n ≥ 2 → [P, n]. The baseline of sample i does not depend on sample i, so
    E[A_i·∇log π(y_i)] = ∇E[r]: the policy-gradient estimate is unbiased (subtracting the plain group
    mean, which includes r_i, shrinks it by (n − 1)/n).
    """
    r = _check_groups(scores, "rloo_advantages")
    n = r.shape[1]
    leave_one_out = (jnp.sum(r, axis=1, keepdims=True) - r) / (n - 1)
    return r - leave_one_out


def remax_advantages(scores: chex.Array, greedy_scores: chex.Array) -> chex.Array:
    """ReMax (Li et al. 2023): A_i = r_i − r(ȳ), ȳ the greedy-decoded response to the same prompt.

    scores: [P, n] (n ≥ 1: ReMax needs no group); greedy_scores: [P] → [P, n].
    """
    chex.assert_rank([scores, greedy_scores], [2, 1])
    chex.assert_equal_shape_prefix([scores, greedy_scores], 1)
    dtype = jnp.promote_types(jnp.result_type(scores, greedy_scores), jnp.float32)
    return scores.astype(dtype) - greedy_scores.astype(dtype)[:, None]


def reinforce_pp_advantages(
    scores: chex.Array,
    kl: chex.Array,
    mask: chex.Array,
    beta: chex.Numeric,
    gamma: chex.Numeric = 1.0,
    eps: float = 1e-8,
) -> chex.Array:
    """REINFORCE++ (Hu 2025): token advantages from KL-penalised returns, whitened over the whole batch.

    r_{b,t} = −β·kl_{b,t} + 1[t = last token of b]·score_b; G_{b,t} = Σ_{t' ≥ t} γ^{t'−t}·r_{b,t'};
    A = (G − mean(G)) / √(Var(G) + eps), mean and (unbiased) Var over every masked-in token of the
    batch. scores: [B]; kl, mask: [B, T] → [B, T], 0 on padding. kl is a per-token estimate of
    KL(π_old ‖ π_ref) on the sampled tokens (k1 as usual in a reward, `kl.kl_estimate`); β = 0 when the
    KL is in the loss instead.
    A missing-EOS penalty is the caller's to fold into `scores`.
    """
    chex.assert_rank([scores, kl, mask], [1, 2, 2])
    rewards, _ = kl_penalized_rewards(scores, kl, mask, beta, jnp.ones(scores.shape, bool))
    returns = batched_discounted_returns(rewards, mask, 0.0, gamma)
    return masked_whiten(returns, mask, eps=eps)


def reinforce_pp_baseline_advantages(
    scores: chex.Array,
    kl: chex.Array,
    mask: chex.Array,
    beta: chex.Numeric,
    gamma: chex.Numeric = 1.0,
    eps: float = 1e-8,
) -> chex.Array:
    """REINFORCE++-baseline (Hu 2025): the group mean is subtracted from each score first,
    score'_i = r_i − mean(r) within the group, then `reinforce_pp_advantages` (KL-penalised returns,
    batch whitening) on score'.

    scores: [P, n], n ≥ 2; kl, mask: [P·n, T] (prompt-major rows) → [P·n, T].
    """
    r = _check_groups(scores, "reinforce_pp_baseline_advantages")
    chex.assert_rank([kl, mask], 2)
    if kl.shape[0] != r.size:
        raise ValueError(
            f"reinforce_pp_baseline_advantages: kl has {kl.shape[0]} rows, scores {scores.shape} "
            f"have {r.size}"
        )
    centred = jnp.reshape(r - jnp.mean(r, axis=1, keepdims=True), (-1,))
    return reinforce_pp_advantages(centred, kl, mask, beta, gamma, eps)


def dynamic_sampling_filter(scores: chex.Array, atol: chex.Numeric = 0.0) -> tuple[chex.Array, chex.Array]:
    """DAPO's dynamic-sampling filter (Yu et al. 2025): keep the groups whose scores are not all equal.

    keep_p = max(r_p) − min(r_p) > atol. A group of equal scores has zero group-relative advantage
    under every estimator above, so it carries no gradient signal, only dilution of the batch.
    scores: [P, n] → (keep [P] bool, num_dropped int32 scalar). The caller decides whether to drop,
    mask or resample; num_dropped / P is TRL's `frac_reward_zero_std` when atol = 0.
    """
    chex.assert_rank(scores, 2)
    spread = jnp.max(scores, axis=1) - jnp.min(scores, axis=1)
    keep = spread > atol
    return keep, jnp.sum(~keep).astype(jnp.int32)


def sequence_to_token_advantages(advantages: chex.Array, mask: chex.Array) -> chex.Array:
    """A_{b,t} = A_b·m_{b,t}: one advantage per response spread over its tokens. [B], [B, T] → [B, T]."""
    chex.assert_rank([advantages, mask], [1, 2])
    chex.assert_equal_shape_prefix([advantages, mask], 1)
    dtype = jnp.promote_types(advantages.dtype, jnp.float32)
    return jnp.where(mask.astype(bool), advantages.astype(dtype)[:, None], 0.0).astype(dtype)
