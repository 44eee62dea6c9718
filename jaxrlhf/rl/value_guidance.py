"""Decoding guided by learned values: the token-level tilt of ILQL and blockwise controlled decoding.

Token level (Snell et al. 2022, ILQL): π_β(a|s) ∝ π_base(a|s)·exp(β·(Q(s, a) − V(s))), the solution of
max_π E_π[Q] − (1/β)·KL(π ‖ π_base) per state. Block level (Mudgal et al. 2024, controlled decoding,
blockwise "CD-b"): draw K candidate blocks from π_base, score each extended prefix with a learned prefix
value V, and select among the K.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def _float(x: chex.Array) -> chex.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def value_guided_logits(base_logits: chex.Array, q_values: chex.Array, beta: chex.Numeric) -> chex.Array:
    """log π_β(a|s) = log π_base(a|s) + β·(Q(s, a) − V(s)) − log Z(s), normalised over the last axis.

    base_logits, q_values: [..., V] → [..., V] normalised log-probs (logsumexp 0), usable as logits by
    `jax.random.categorical` and `token_logprobs`. V(s) is constant over a, so it cancels in the
    normalisation: only Q enters, and Z(s) = Σ_a π_base(a|s)·exp(β·Q(s, a)) up to the factor exp(β·V(s)).
    β = 0 gives π_base; −inf base logits (top-k / top-p masking) stay −inf. Apply any temperature to
    `base_logits` before calling.
    """
    chex.assert_equal_shape([base_logits, q_values])
    base_logp = jax.nn.log_softmax(_float(base_logits), axis=-1)
    return jax.nn.log_softmax(base_logp + beta * _float(q_values), axis=-1)


def categorical_kl(logits_p: chex.Array, logits_q: chex.Array) -> chex.Array:
    """Exact KL(p ‖ q) = Σ_a p_a·(log p_a − log q_a) over the last axis, p = softmax(logits_p),
    q = softmax(logits_q). [..., V] → [...]. Entries with p_a = 0 contribute 0 (no nan from −inf logits).
    """
    chex.assert_equal_shape([logits_p, logits_q])
    logp = jax.nn.log_softmax(_float(logits_p), axis=-1)
    logq = jax.nn.log_softmax(_float(logits_q), axis=-1)
    p = jnp.exp(logp)
    return jnp.sum(jnp.where(p > 0, p * (logp - jnp.where(p > 0, logq, 0.0)), 0.0), axis=-1)


def value_guided_kl(base_logits: chex.Array, q_values: chex.Array, beta: chex.Numeric) -> chex.Array:
    """Exact per-state KL(π_β ‖ π_base) = β·E_{π_β}[Q] − log E_{π_base}[exp(β·Q)] ≥ 0, [..., V] → [...].

    The KL a value-guided decoder adds at each step; summed over a response's steps it is the KL of
    the guided sequence distribution to the base's along that response's states (its expectation over
    guided responses is the sequence-level KL).
    """
    return categorical_kl(value_guided_logits(base_logits, q_values, beta), base_logits)


def blockwise_value_probs(
    block_values: chex.Array,
    beta: chex.Numeric,
    mask: chex.Array | None = None,
    proposal_log_ratio: chex.Array | None = None,
) -> chex.Array:
    """Controlled decoding, blockwise (Mudgal et al. 2024): selection probabilities over K candidates,
    p_k = exp(β·V(x + z_k) + ρ_k) / Σ_j exp(β·V(x + z_j) + ρ_j), z_1..z_K drawn from a proposal q.

    block_values: [..., K], the learned value of each extended prefix. proposal_log_ratio ρ: [..., K],
    log π_base(z_k | x) − log q(z_k | x) from the blocks' base and proposal log-probs; None (ρ = 0) when
    the candidates are drawn from π_base itself (then the base log-probs must not enter: the draw
    already weights by them). mask [..., K] (False: candidate absent, p = 0; at least one must be in).
    β must be finite: the limit β → ∞ is best-of-K (CD-b's argmax of V), β = 0 a uniform draw among
    base samples, i.e. plain sampling from π_base. As K → ∞ the selected block is distributed as
    π_base(z)·exp(β·V(x + z)) / Z (self-normalised importance resampling).
    """
    scaled = beta * _float(block_values)
    if proposal_log_ratio is not None:
        chex.assert_equal_shape([block_values, proposal_log_ratio])
        scaled = scaled + _float(proposal_log_ratio)
    if mask is not None:
        chex.assert_equal_shape([block_values, mask])
        scaled = jnp.where(mask.astype(bool), scaled, -jnp.inf)
    return jax.nn.softmax(scaled, axis=-1)


def blockwise_value_select(
    key: chex.PRNGKey,
    block_values: chex.Array,
    beta: chex.Numeric,
    mask: chex.Array | None = None,
    proposal_log_ratio: chex.Array | None = None,
) -> tuple[chex.Array, chex.Array]:
    """Draw one candidate per prefix with probability `blockwise_value_probs(...)` (same arguments).

    block_values: [..., K] → (index [...] int32, its selection probability [...]).
    """
    probs = blockwise_value_probs(block_values, beta, mask, proposal_log_ratio)
    logits = jnp.log(probs)  # −inf for masked-out candidates, so they are never drawn
    index = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    return index, jnp.take_along_axis(probs, index[..., None], axis=-1)[..., 0]
