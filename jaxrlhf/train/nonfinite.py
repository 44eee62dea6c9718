"""The non-finite guard: skip an update whose loss or gradients hold a NaN/inf, and stop after too many.

Inside the jitted step::

    ok = all_finite((loss, grads))
    state = select_if_finite(ok, new_state, state)   # a bad step leaves the state as it was

On the host, once per step::

    tracker.update(step, metrics["train/finite"])   # logs each skip, raises after N in a row
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive training steps produced non-finite values."""


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


class NonFiniteTracker:
    """Host-side count of skipped (non-finite) steps; raises :class:`NonFiniteError` after too many in a row.

    ``total_skips`` is what trainers log as ``train/nonfinite_skips``; ``consecutive_skips`` resets on
    every finite step.
    """

    def __init__(self, max_consecutive: int):
        if max_consecutive < 1:
            raise ValueError(f"NonFiniteTracker: max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.total_skips = 0
        self.consecutive_skips = 0

    def update(self, step: int, ok: bool | jax.Array) -> None:
        """Record whether ``step`` was finite; log a skipped one and raise after ``max_consecutive``."""
        if bool(ok):
            self.consecutive_skips = 0
            return
        self.total_skips += 1
        self.consecutive_skips += 1
        log.warning(
            "step %d: non-finite loss or gradient, update skipped (%d in a row, %d in total)",
            step,
            self.consecutive_skips,
            self.total_skips,
        )
        if self.consecutive_skips >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive_skips} consecutive non-finite steps (last at step {step}); "
                "lower the learning rate or check the data"
            )

    def metrics(self, prefix: str = "train/") -> dict[str, int]:
        """``{prefix + "nonfinite_skips": total_skips}`` for the metrics logger."""
        return {f"{prefix}nonfinite_skips": self.total_skips}
