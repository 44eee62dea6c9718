"""Training-state pytrees threaded through the pure steps.

- :class:`TrainState` — params, optimiser state and the number of optimiser updates applied.
- :class:`RLState` — the policy's TrainState, the critic's (``None`` when the critic shares the policy's
  backbone), and the KL-controller state.

Param layouts (``jaxrlhf.steps.params``): an RL policy's TrainState holds :class:`PolicyParams`, a separate
critic's :class:`CriticParams`, a reward model's :class:`RewardModelParams`, an SFT model's bare LM params.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.rl.kl_control import KLControllerState


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array  # int32 scalar: optimiser updates applied (a skipped non-finite update does not count)


class RLState(NamedTuple):
    policy: TrainState
    critic: TrainState | None
    kl: KLControllerState


def create_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh state: ``optimizer.init(params)`` and step 0."""
    return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))


def create_rl_state(
    policy_params: Any,
    policy_optimizer: optax.GradientTransformation,
    kl: KLControllerState,
    critic_params: Any | None = None,
    critic_optimizer: optax.GradientTransformation | None = None,
) -> RLState:
    """An :class:`RLState`; pass ``critic_params`` and ``critic_optimizer`` together for a separate critic."""
    if (critic_params is None) != (critic_optimizer is None):
        raise ValueError("create_rl_state: critic_params and critic_optimizer go together (both or neither)")
    critic = None if critic_params is None else create_train_state(critic_params, critic_optimizer)
    return RLState(policy=create_train_state(policy_params, policy_optimizer), critic=critic, kl=kl)


def apply_gradients(state: TrainState, optimizer: optax.GradientTransformation, grads: Any) -> TrainState:
    """One optimiser update: ``params ← params + optimizer.update(grads)``, step + 1."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)

