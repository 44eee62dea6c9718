"""Training-state pytrees threaded through the pure steps.

- :class:`TrainState` — params, optimiser state and the number of optimiser updates applied.
- :class:`RLState` — the policy's TrainState, the critic's (``None`` when the critic shares the policy's
  backbone), and the KL-controller state.

LoRA: a TrainState's ``params`` are what is trained (the adapters, and any head) and ``frozen`` what is not
(the base weights, in the same container type), so only the trained part gets gradients and optimiser state.
The model runs on :func:`model_params` (the two joined without copying a weight). A step that jits a
state with a frozen part donates only the trained part (``jaxrlhf.train.run.compile_step``), and a
checkpoint holds only the trained part.

Param layouts (``jaxrlhf.steps.params``): an RL policy's TrainState holds :class:`PolicyParams`, a separate
critic's :class:`CriticParams`, a reward model's :class:`RewardModelParams`, an SFT model's bare LM params.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.models.lora import join_params
from jaxrlhf.rl.kl_control import KLControllerState


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array  # int32 scalar: optimiser updates applied (a skipped non-finite update does not count)
    frozen: Any = None  # untrained params the model also runs on (LoRA's base), joined to params


def model_params(state: TrainState) -> Any:
    """The params the model runs on: ``join_params(state.frozen, state.params)`` (``state.params`` when
    nothing is frozen)."""
    return join_params(state.frozen, state.params)


def split_frozen(state: TrainState | None) -> tuple[TrainState | None, Any]:
    """``(state without its frozen part, the frozen part)``: a step runs its guarded update and minibatch
    loops on the trained part only (no ``cond`` or ``scan`` carries the base) and puts it back after."""
    if state is None:
        return None, None
    return state._replace(frozen=None), state.frozen


def with_frozen(loss_fn: Any, frozen: Any) -> Any:
    """``loss_fn(params, *args)`` as a function of the trained params only: the model sees them joined with
    ``frozen``, and a gradient of the result covers the trained params alone."""
    if frozen is None:
        return loss_fn
    return lambda params, *args: loss_fn(join_params(frozen, params), *args)


class RLState(NamedTuple):
    policy: TrainState
    critic: TrainState | None
    kl: KLControllerState


def create_train_state(params: Any, optimizer: optax.GradientTransformation,
                       frozen: Any = None) -> TrainState:
    """A fresh state: ``optimizer.init(params)`` and step 0; ``frozen`` params ride along untrained."""
    return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32),
                      frozen=frozen)


def create_rl_state(
    policy_params: Any,
    policy_optimizer: optax.GradientTransformation,
    kl: KLControllerState,
    critic_params: Any | None = None,
    critic_optimizer: optax.GradientTransformation | None = None,
    policy_frozen: Any = None,
) -> RLState:
    """An :class:`RLState`; pass ``critic_params`` and ``critic_optimizer`` together for a separate critic.
    ``policy_frozen``: the policy's untrained part (LoRA: ``PolicyParams(base_lm)``)."""
    if (critic_params is None) != (critic_optimizer is None):
        raise ValueError("create_rl_state: critic_params and critic_optimizer go together (both or neither)")
    critic = None if critic_params is None else create_train_state(critic_params, critic_optimizer)
    return RLState(policy=create_train_state(policy_params, policy_optimizer, policy_frozen), critic=critic,
                   kl=kl)


def apply_gradients(state: TrainState, optimizer: optax.GradientTransformation, grads: Any) -> TrainState:
    """One optimiser update: ``params ← params + optimizer.update(grads)``, step + 1."""
    with jax.named_scope("optimizer"):  # a region of jaxrlhf.op_profile
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return state._replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                              step=state.step + 1)


def _is_named_tuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def detach_frozen(state: Any) -> tuple[Any, tuple[Any, ...]]:
    """``(state with every TrainState's frozen part set to None, those parts in order)``, through
    NamedTuples and dicts: how a jitted step takes the base as an argument of its own, which it does not
    donate (it lives on: the RL reference is the same arrays), and what a checkpoint leaves out."""
    parts: list[Any] = []

    def strip(x: Any) -> Any:
        if isinstance(x, TrainState):
            parts.append(x.frozen)
            return x._replace(frozen=None)
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()}
        return type(x)(*map(strip, x)) if _is_named_tuple(x) else x

    return strip(state), tuple(parts)


def attach_frozen(state: Any, parts: tuple[Any, ...]) -> Any:
    """Inverse of :func:`detach_frozen`."""
    it = iter(parts)

    def put(x: Any) -> Any:
        if isinstance(x, TrainState):
            return x._replace(frozen=next(it))
        if isinstance(x, dict):
            return {k: put(v) for k, v in x.items()}
        return type(x)(*map(put, x)) if _is_named_tuple(x) else x

    return put(state)


class FrozenApart:
    """A donating jit of ``step(state, *args) -> (state, *rest)`` whose frozen params (LoRA's base,
    ``TrainState.frozen``) are an argument of their own, ``apart(bare, frozen, *args)``, that ``jit`` does not
    donate: they are the same arrays as the RL reference and must outlive the call. ``jit`` compiles
    ``apart`` (e.g. ``lambda f: jax.jit(f, donate_argnums=(0,))``); ``lower`` and the cache size pass through.
    """

    def __init__(self, step: Callable[..., Any], jit: Callable[[Callable[..., Any]], Any]):
        def apart(bare: Any, frozen: tuple[Any, ...], *args: Any) -> Any:
            state, *rest = step(attach_frozen(bare, frozen), *args)
            return (detach_frozen(state)[0], *rest)

        self.jitted = jit(apart)

    def __call__(self, state: Any, *args: Any) -> Any:
        bare, frozen = detach_frozen(state)
        new_state, *rest = self.jitted(bare, frozen, *args)
        return (attach_frozen(new_state, frozen), *rest)

    def lower(self, state: Any, *args: Any) -> Any:
        bare, frozen = detach_frozen(state)
        return self.jitted.lower(bare, frozen, *args)

    def _cache_size(self) -> int:
        return self.jitted._cache_size()
