"""A boolean config choice that may be traced: :func:`choose` picks a branch in Python for a bool, and selects
between both branches' values with ``jnp.where`` for a traced number (0./1.).

    advantages = choose(cfg.whiten_advantages, lambda: masked_whiten(advantages, mask), lambda: advantages)

With a Python bool (every trainer) only the chosen branch is traced, so the program is the one an ``if``
would give. A traced flag lets a vmapped sweep (``jaxrlhf.experiments.pipeline``) flip the choice per member
in one compiled program; both branches are then computed, and since the selection is exact the member's
values are those of the branch it selects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

T = TypeVar("T")


def is_static_flag(flag: Any) -> bool:
    """Whether ``flag`` is a Python (or NumPy) bool/number known at trace time, not a traced array."""
    return not isinstance(flag, jax.Array)


def choose(flag: Any, if_true: Callable[[], T], if_false: Callable[[], T]) -> T:
    """``if_true()`` where ``flag`` holds, else ``if_false()``: a Python choice for a bool or number, an
    elementwise ``jnp.where(flag != 0, …)`` over the two results' pytrees for a (traced) array."""
    if is_static_flag(flag):
        return if_true() if flag else if_false()
    on, off = if_true(), if_false()
    flag = jnp.asarray(flag) != 0
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), on, off)
