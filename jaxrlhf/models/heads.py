"""Scalar heads on a backbone's final hidden states: a value head (per token), a reward head (per sequence).

Both are ``Dense(d_model → 1)`` NNX modules kept as their own params pytree, so a head can sit on a shared
backbone (policy + value head) or on a separate model (a critic, a reward model) without changing the
backbone's params.

- value head: zero-initialised, so a fresh critic predicts 0 and the first advantages equal the returns.
- reward head: weights ~ N(0, 1/(d+1)), bias 0 (Ziegler et al. 2019), read at the last non-pad token.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf.models.transformer import Dense

HeadParams = dict[str, Any]


class ScalarHead(nnx.Module):
    def __init__(self, d_model: int, std: float, rngs: nnx.Rngs):
        self.proj = Dense(d_model, 1, use_bias=True, rngs=rngs, std=std)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return self.proj(hidden.astype(jnp.float32))[..., 0]


def init_value_head(d_model: int) -> HeadParams:
    """A zero-initialised value head: ``V(h) = h·w + b`` with w = 0, b = 0."""
    return nnx.to_pure_dict(nnx.split(ScalarHead(d_model, 0.0, nnx.Rngs(0)))[1])


def init_reward_head(key: jax.Array, d_model: int) -> HeadParams:
    """A reward head with ``w ~ N(0, 1/(d_model+1))``, ``b = 0``."""
    head = ScalarHead(d_model, (1.0 / (d_model + 1)) ** 0.5, nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.split(head)[1])


def head_apply(head: HeadParams, hidden: jax.Array) -> jax.Array:
    """Per-position scalar ``h·w + b`` in float32: [..., d] → [...]."""
    return hidden.astype(jnp.float32) @ head["proj"]["kernel"][:, 0] + head["proj"]["bias"][0]


def last_token_index(mask: jax.Array) -> jax.Array:
    """Index of the last non-pad column of each row of ``mask`` [B, S] (0 for an all-pad row). [B]."""
    cols = jnp.arange(mask.shape[-1])
    return jnp.max(jnp.where(mask > 0, cols, 0), axis=-1)


def sequence_reward(head: HeadParams, hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Reward of each sequence: the head read at its last non-pad token. hidden [B,S,d], mask [B,S] → [B]."""
    idx = last_token_index(mask)
    last = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]
    return head_apply(head, last)
