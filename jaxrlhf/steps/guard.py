"""The non-finite guard inside a jitted step: skip an update whose loss or gradients hold a NaN/inf.

    ok = all_finite((loss, grads))
    state = update_if(ok, lambda s: apply_gradients(s, optimizer, grads), state)  # or:
    state, ok = apply_gradients_if_finite(state, optimizer, grads, loss)

A skipped update leaves the state as it was. The host-side counting of skips (and giving up after too many)
lives in ``jaxrlhf.train.nonfinite``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.steps.state import TrainState, apply_gradients


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def all_finite(tree: Any) -> jax.Array:
    """Boolean scalar: every floating (or complex) leaf of ``tree`` is free of NaN and ±inf.

    Integer, boolean and PRNG-key leaves are ignored; an empty tree is finite. Pure and jittable.
    """
    flags = [
        jnp.all(jnp.isfinite(x))
        for x in map(jnp.asarray, jax.tree.leaves(tree))
        if not _is_key(x) and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def apply_gradients_if_finite(
    state: TrainState, optimizer: optax.GradientTransformation, grads: Any, loss: jax.Array
) -> tuple[TrainState, jax.Array]:
    """One optimiser update, rolled back (params, optimiser state and step) when ``loss`` or ``grads``
    hold a NaN/inf. Returns (state, ok)."""
    ok = all_finite((loss, grads))
    return update_if(ok, lambda state: apply_gradients(state, optimizer, grads), state), ok


def update_if(ok: jax.Array, update: Any, state: Any) -> Any:
    """``update(state)`` where ``ok`` (a boolean scalar), else ``state``: the guard inside a jitted step.

    One ``lax.cond`` rather than a ``jnp.where`` per leaf: XLA copies a cheap scalar predicate into every
    consumer fusion, so a select per leaf copied the leaves-way AND behind ``ok`` once per leaf (program
    size and compile time growing with leaves²). A skipped update is also not computed.
    """
    return jax.lax.cond(ok, update, lambda state: state, state)
