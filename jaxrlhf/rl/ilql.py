"""Implicit Language Q-Learning (Snell et al. 2022): offline token-level Q and V learning, as pure losses.

Layout: a response of T tokens; position t has state s_t (prompt + y_<t) and action a_t = y_t.
Q heads give Q_h(s_t, ·) [..., T, V] over the vocabulary, the V head V(s_t) [..., T], the reward r_t
[..., T] (for RLHF data: the sequence score at the last response token, 0 elsewhere), mask m_t (right-
padded: 1 on the response's tokens). The state after the last valid token is terminal: V = 0 there.

The ILQL objective (`ilql_loss`) is the sum of
- TD: Σ_h masked_mean((Q_h(s_t, a_t) − y_t)²), y_t = r_t + γ·V(s_{t+1}), V held constant
  (`q_learning_targets`, `td_loss`);
- V: expectile regression of V(s_t) towards min_h Q̂_h(s_t, a_t), Q̂ the Polyak-averaged target heads
  (`expectile_loss`, `polyak_update`). With τ > ½ V leans towards the upper expectile of Q over the
  data's actions, an implicit max_a that never queries an action the data does not contain (IQL,
  Kostrikov et al. 2022); the min of two target heads curbs Q's overestimation (Fujimoto et al. 2018);
- conservative: α·Σ_h masked_mean(logsumexp_a Q_h(s_t, a) − Q_h(s_t, a_t)), which pushes Q down on
  tokens the data did not take (CQL, Kumar et al. 2020) (`conservative_q_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp

from jaxrlhf.rl.masked import masked_mean

Metrics = dict[str, chex.Array]


def expectile_loss(u: chex.Array, mask: chex.Array, tau: chex.Numeric = 0.7) -> chex.Array:
    """Expectile regression: L_τ(u) = masked_mean(|τ − 1(u < 0)|·u²) over masked-in entries.

    u = target − prediction. Minimising E[L_τ(y − v)] over v gives the τ-expectile of y (the mean at
    τ = ½); τ → 1 approaches the maximum. ∂/∂u = 2·|τ − 1(u < 0)|·u.
    """
    chex.assert_equal_shape([u, mask])
    u = u.astype(jnp.promote_types(u.dtype, jnp.float32))
    weight = jnp.where(u < 0, 1.0 - tau, tau)
    return masked_mean(weight * jnp.square(u), mask)


def q_learning_targets(
    rewards_t: chex.Array, values_t: chex.Array, mask_t: chex.Array, gamma: chex.Numeric = 1.0
) -> chex.Array:
    """One-step targets y_t = r_t + γ·V(s_{t+1}), with V(s_{t+1}) = 0 after the last valid token.

    rewards_t, values_t, mask_t: [..., T] (time last, right-padded mask); V is held constant
    (stop_gradient). Returns [..., T], 0 on padding.
    """
    chex.assert_equal_shape([rewards_t, values_t, mask_t])
    dtype = jnp.promote_types(jnp.result_type(rewards_t, values_t), jnp.float32)
    values_t = jax.lax.stop_gradient(values_t).astype(dtype)
    real_t = mask_t.astype(bool)
    pad = [(0, 0)] * (values_t.ndim - 1) + [(0, 1)]
    next_real_t = jnp.pad(real_t[..., 1:], pad)  # the position after the array's end is padding
    next_values_t = jnp.where(next_real_t, jnp.pad(values_t[..., 1:], pad), 0.0)
    targets = rewards_t.astype(dtype) + gamma * next_values_t
    return jnp.where(real_t, targets, 0.0).astype(dtype)


def gather_actions(q_values: chex.Array, actions: chex.Array) -> chex.Array:
    """Q(s, a_taken): q_values [..., V], actions [...] (integers) → [...]."""
    chex.assert_rank(q_values, actions.ndim + 1)
    chex.assert_equal_shape_prefix([q_values, actions], actions.ndim)
    chex.assert_type(actions, int)
    return jnp.take_along_axis(q_values, actions[..., None].astype(jnp.int32), axis=-1)[..., 0]


def td_loss(q_taken: chex.Array, targets: chex.Array, mask: chex.Array) -> chex.Array:
    """L = masked_mean((Q(s_t, a_t) − y_t)²), y_t held constant (no ½, as ILQL)."""
    chex.assert_equal_shape([q_taken, targets, mask])
    return masked_mean(jnp.square(q_taken - jax.lax.stop_gradient(targets)), mask)


def conservative_q_loss(q_values: chex.Array, actions: chex.Array, mask: chex.Array) -> chex.Array:
    """CQL term of ILQL: L = masked_mean(logsumexp_a Q(s_t, a) − Q(s_t, a_t)).

    q_values [..., V], actions and mask [...]. Equal to the cross-entropy of softmax(Q) on the data's
    tokens, so it is ≥ 0 and pushes Q up on taken tokens and down on all others.
    """
    chex.assert_equal_shape([actions, mask])
    q_values = q_values.astype(jnp.promote_types(q_values.dtype, jnp.float32))
    gap = jax.nn.logsumexp(q_values, axis=-1) - gather_actions(q_values, actions)
    return masked_mean(gap, mask)


def polyak_update(target: chex.ArrayTree, online: chex.ArrayTree, tau: chex.Numeric) -> chex.ArrayTree:
    """Polyak averaging of target parameters: θ̂ ← (1 − τ)·θ̂ + τ·θ, leaf by leaf (τ = 1 copies θ).

    Leaves keep the target's dtype. Small τ (e.g. 0.005) gives a slowly moving target for the V
    regression.
    """
    chex.assert_trees_all_equal_shapes(target, online)

    def average(t, o):
        return (t + tau * (o.astype(t.dtype) - t)).astype(t.dtype)

    return jax.tree.map(average, target, online)


def ilql_loss(
    q_values: Sequence[chex.Array],
    target_q_values: Sequence[chex.Array],
    values: chex.Array,
    actions: chex.Array,
    rewards: chex.Array,
    mask: chex.Array,
    *,
    gamma: chex.Numeric = 0.99,
    expectile: chex.Numeric = 0.7,
    cql_weight: chex.Numeric = 0.01,
) -> tuple[chex.Array, Metrics]:
    """ILQL objective L = L_TD + L_V + α·L_CQL (see the module docstring).

    L_TD = Σ_h td_loss(Q_h(s_t, a_t), r_t + γ·V(s_{t+1}));
    L_V = expectile_loss(min_h Q̂_h(s_t, a_t) − V(s_t), τ), the targets Q̂ held constant;
    L_CQL = Σ_h conservative_q_loss(Q_h, a, m).
    q_values, target_q_values: one [B, T, V] array per head (usually 2); values, actions, rewards, mask:
    [B, T]. Gradients reach the online Q heads (TD, CQL) and V (expectile) only.
    Metrics: "td_loss", "v_loss", "cql_loss" (each before weighting), "q" (mean Q(s, a_taken) over heads),
    "v" (mean V), "target_q" (mean min_h Q̂_h), "td_target" (mean y), over masked-in tokens.
    """
    if len(q_values) < 1 or len(q_values) != len(target_q_values):
        raise ValueError(
            f"ilql_loss: need the same number (≥ 1) of online and target Q heads, got {len(q_values)} "
            f"and {len(target_q_values)}"
        )
    chex.assert_equal_shape([values, rewards, mask, actions])
    targets = q_learning_targets(rewards, values, mask, gamma)
    q_taken = [gather_actions(q, actions) for q in q_values]
    target_q = jax.lax.stop_gradient(
        jnp.min(jnp.stack([gather_actions(q, actions) for q in target_q_values]), axis=0)
    )
    td = sum(td_loss(q, targets, mask) for q in q_taken)
    v = expectile_loss(target_q - values, mask, expectile)
    cql = sum(conservative_q_loss(q, actions, mask) for q in q_values)
    loss = td + v + cql_weight * cql
    metrics = {
        "td_loss": td,
        "v_loss": v,
        "cql_loss": cql,
        "q": jax.lax.stop_gradient(masked_mean(jnp.mean(jnp.stack(q_taken), axis=0), mask)),
        "v": jax.lax.stop_gradient(masked_mean(values, mask)),
        "target_q": masked_mean(target_q, mask),
        "td_target": masked_mean(targets, mask),
    }
    return loss, metrics
