"""KL-coefficient controllers as optax-style pairs of pure functions over a NamedTuple state:

controller = adaptive_kl_controller(init_kl_coef=0.2, target=6.0, horizon=10_000)
state = controller.init()
state = controller.update(state, observed_kl, n_steps)   # n_steps: episodes in this batch
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import chex
import jax.numpy as jnp


class KLControllerState(NamedTuple):
    kl_coef: chex.Array  # β, a float32 scalar


class KLController(NamedTuple):
    init: Callable[[], KLControllerState]
    update: Callable[[KLControllerState, chex.Numeric, chex.Numeric], KLControllerState]


def fixed_kl_controller(kl_coef: chex.Numeric) -> KLController:
    """β stays at `kl_coef`."""

    def init() -> KLControllerState:
        return KLControllerState(kl_coef=jnp.asarray(kl_coef, jnp.float32))

    def update(
        state: KLControllerState, observed_kl: chex.Numeric, n_steps: chex.Numeric
    ) -> KLControllerState:
        del observed_kl, n_steps
        return state

    return KLController(init=init, update=update)


def adaptive_kl_controller(
    init_kl_coef: chex.Numeric = 0.2, target: chex.Numeric = 6.0, horizon: chex.Numeric = 10_000
) -> KLController:
    """Proportional controller of Ziegler et al. (2019) steering the observed KL towards `target`:

    e = clip((KL − target)/target, −0.2, 0.2);  β ← β·(1 + e·n_steps/horizon).
    """

    def init() -> KLControllerState:
        return KLControllerState(kl_coef=jnp.asarray(init_kl_coef, jnp.float32))

    def update(
        state: KLControllerState, observed_kl: chex.Numeric, n_steps: chex.Numeric
    ) -> KLControllerState:
        chex.assert_rank([state.kl_coef, jnp.asarray(observed_kl), jnp.asarray(n_steps)], 0)
        error = jnp.clip((jnp.asarray(observed_kl, jnp.float32) - target) / target, -0.2, 0.2)
        multiplier = 1.0 + error * jnp.asarray(n_steps, jnp.float32) / horizon
        return KLControllerState(kl_coef=(state.kl_coef * multiplier).astype(state.kl_coef.dtype))

    return KLController(init=init, update=update)
