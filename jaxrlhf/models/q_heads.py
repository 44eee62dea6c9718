"""Token-level Q heads over the vocabulary, on a backbone's final hidden states (ILQL, Snell et al. 2022).

A Q head is a ``Dense(d_model → vocab)``: Q(s_t, ·) = h_t·W + b, [..., d] → [..., V] in float32, one value per
next token of the state (prefix) whose hidden state is h_t. It is kept as its own params pytree
``{"proj": {"kernel" [d, V], "bias" [V]}}`` (the layout of ``jaxrlhf.models.heads``), so Q heads sit on
a policy's backbone without changing the backbone's params. The scalar V head of ILQL is the value head of
``jaxrlhf.models.heads`` (``init_value_head``, ``head_apply``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxrlhf.models.transformer import matmul_tokens

HeadParams = dict[str, Any]


def init_q_head(key: jax.Array, d_model: int, vocab_size: int, std: float = 0.02) -> HeadParams:
    """A Q head with ``W ~ N(0, std²)``, ``b = 0``: [d, V] and [V] float32. Independent keys give the
    two heads of double Q-learning different starting points (equal heads would stay equal)."""
    kernel = std * jax.random.normal(key, (d_model, vocab_size), jnp.float32)
    return {"proj": {"kernel": kernel, "bias": jnp.zeros((vocab_size,), jnp.float32)}}


def q_head_apply(head: HeadParams, hidden: jax.Array) -> jax.Array:
    """Q(s, ·) = h·W + b in float32: hidden [..., d] → [..., V]."""
    kernel = head["proj"]["kernel"]
    return (matmul_tokens(hidden.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)
            + head["proj"]["bias"].astype(jnp.float32))


def min_q_values(heads: Sequence[HeadParams], hidden: jax.Array) -> jax.Array:
    """min_h Q_h(s, ·) over the heads (the pessimistic estimate of double Q-learning): [..., d] → [..., V]."""
    if not heads:
        raise ValueError("min_q_values: need at least one Q head")
    values = [q_head_apply(h, hidden) for h in heads]
    out = values[0]
    for v in values[1:]:
        out = jnp.minimum(out, v)
    return out
