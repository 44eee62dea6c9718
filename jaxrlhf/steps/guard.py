"""The non-finite guard inside a jitted step: skip an update whose loss or gradients hold a NaN/inf.

    ok = all_finite((loss, grads))
    state = select_if_finite(ok, new_state, state)   # a bad step leaves the state as it was
    # inside a jitted step, update_if / apply_gradients_if_finite: one lax.cond, not a select per leaf

The host-side counting of skips (and giving up after too many) lives in ``jaxrlhf.train.nonfinite``.
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


def select_if_finite(ok: jax.Array | bool, new_state: Any, old_state: Any) -> Any:
    """``new_state`` where ``ok`` else ``old_state``, leaf by leaf (``jnp.where``); pure and jittable.

    ``ok`` is a boolean scalar (e.g. from :func:`all_finite`). Both states must have the same structure
    and leaf shapes; PRNG-key leaves are selected through their key data. Pass only what a skipped step
    should roll back (e.g. params and optimiser state, not the step counter or the RNG).
    """
    ok = jnp.asarray(ok)
    if ok.shape != ():
        raise ValueError(f"select_if_finite: ok must be a scalar, got shape {ok.shape}")

    def select(path, new, old):
        new, old = jnp.asarray(new), jnp.asarray(old)
        if new.shape != old.shape or new.dtype != old.dtype:
            raise ValueError(
                f"select_if_finite: leaf {jax.tree_util.keystr(path)} is {new.dtype}{list(new.shape)} in "
                f"new_state but {old.dtype}{list(old.shape)} in old_state"
            )
        if _is_key(new):
            data = jnp.where(ok, jax.random.key_data(new), jax.random.key_data(old))
            return jax.random.wrap_key_data(data, dtype=new.dtype)
        return jnp.where(ok, new, old)

    return jax.tree_util.tree_map_with_path(select, new_state, old_state)


def apply_gradients_if_finite(
    state: TrainState, optimizer: optax.GradientTransformation, grads: Any, loss: jax.Array
) -> tuple[TrainState, jax.Array]:
    """One optimiser update, rolled back (params, optimiser state and step) when ``loss`` or ``grads``
    hold a NaN/inf. Returns (state, ok)."""
    ok = all_finite((loss, grads))
    return update_if(ok, lambda state: apply_gradients(state, optimizer, grads), state), ok


def update_if(ok: jax.Array, update: Any, state: Any) -> Any:
    """``update(state)`` where ``ok`` (a boolean scalar), else ``state``: the guard inside a jitted step.

    One ``lax.cond`` rather than :func:`select_if_finite`: XLA copies a cheap scalar predicate into every
    consumer fusion, so a select per leaf copied the leaves-way AND behind ``ok`` once per leaf (program
    size and compile time growing with leaves²). A skipped update is also not computed.
    """
    return jax.lax.cond(ok, update, lambda state: state, state)
