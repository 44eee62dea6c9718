"""Pieces shared by the PPO and A2C updates: the policy/critic forward pass on an Experience batch, the
guarded update of policy and critic, the KL term of the loss and the KL-controller update."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.rl.kl import kl_loss
from jaxrlhf.rl.kl_control import (
    KLController,
    KLControllerState,
    adaptive_kl_controller,
    fixed_kl_controller,
)
from jaxrlhf.steps.choice import choose, is_static_flag
from jaxrlhf.steps.experience import (
    Experience,
    ResponseOutputs,
    critic_values,
    response_logprobs_and_values,
    sequence_kl,
)
from jaxrlhf.steps.guard import update_if
from jaxrlhf.steps.params import CriticParams, PolicyParams
from jaxrlhf.steps.rl_config import ActorCriticConfig, RLConfig
from jaxrlhf.steps.state import TrainState, apply_gradients


class ActorCriticParams(NamedTuple):
    """What the actor-critic loss is differentiated against: the policy and, if separate, the critic."""

    policy: PolicyParams
    critic: CriticParams | None


def kl_controller(cfg: RLConfig) -> KLController:
    """The adaptive controller (from β = kl_coef towards kl_target over kl_horizon) or a fixed β.

    ``cfg.adaptive_kl`` may be a traced 0./1. (a sweep): the update then computes both and selects.
    """
    adaptive = adaptive_kl_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    fixed = fixed_kl_controller(cfg.kl_coef)
    if is_static_flag(cfg.adaptive_kl):
        return adaptive if cfg.adaptive_kl else fixed

    def update(state: KLControllerState, observed_kl: jax.Array, n_steps: jax.Array) -> KLControllerState:
        return choose(cfg.adaptive_kl, lambda: adaptive.update(state, observed_kl, n_steps),
                      lambda: fixed.update(state, observed_kl, n_steps))

    return KLController(init=fixed.init, update=update)


def check_critic(where: str, cfg: ActorCriticConfig, critic_model: Any, critic_optimizer: Any) -> None:
    separate = cfg.critic == "separate"
    if separate != (critic_model is not None) or separate != (critic_optimizer is not None):
        raise ValueError(
            f"{where}: cfg.critic={cfg.critic!r} needs critic_model and critic_optimizer "
            f"{'given' if separate else 'None'}"
        )


def actor_critic_outputs(
    policy_model: LanguageModel,
    critic_model: LanguageModel | None,
    cfg: ActorCriticConfig,
    params: ActorCriticParams,
    batch: Experience,
) -> ResponseOutputs:
    """New log-probs, entropies and values of the batch's responses (values from the shared value head
    or the separate critic), through the same forward pass as the experience."""
    p, sequences, mask = batch.prompt_length, batch.sequences, batch.sequence_mask
    out = response_logprobs_and_values(policy_model, params.policy, sequences, mask, p, cfg.temperature)
    if critic_model is not None:
        values, bootstrap = critic_values(critic_model, params.critic, sequences, mask, p)
        out = out._replace(values=values, bootstrap_values=bootstrap)
    return out


def kl_loss_term(cfg: RLConfig, logprobs: jax.Array, batch: Experience) -> jax.Array:
    """KL(π ‖ π_ref) in the loss (GRPO style) when ``cfg.kl_in_reward`` is False, else 0 (not multiplied
    by β: the caller does)."""
    if cfg.kl_in_reward:
        return jnp.zeros((), jnp.float32)
    return kl_loss(logprobs, batch.ref_logprobs, batch.response_mask, cfg.effective_kl_estimator)


def apply_actor_critic(
    trainables: tuple[TrainState, TrainState | None],
    grads: ActorCriticParams,
    policy_optimizer: optax.GradientTransformation,
    critic_optimizer: optax.GradientTransformation | None,
) -> tuple[TrainState, TrainState | None]:
    """One optimiser update of the policy and (with its own optimiser) the critic: ``(policy, critic)``."""
    policy, critic = trainables
    new_critic = None if critic is None else apply_gradients(critic, critic_optimizer, grads.critic)
    return apply_gradients(policy, policy_optimizer, grads.policy), new_critic


def apply_if(
    ok: jax.Array,
    policy: TrainState,
    critic: TrainState | None,
    grads: ActorCriticParams,
    policy_optimizer: optax.GradientTransformation,
    critic_optimizer: optax.GradientTransformation | None,
) -> tuple[TrainState, TrainState | None]:
    """Apply ``grads`` to the policy (and the critic, with its own optimiser) where ``ok``, else keep both."""
    return update_if(ok, lambda states: apply_actor_critic(states, grads, policy_optimizer, critic_optimizer),
                     (policy, critic))


def update_kl_controller(
    controller: KLController, state: KLControllerState, cfg: RLConfig, batch: Experience
) -> KLControllerState:
    """β update from the batch's mean sequence KL (the config's estimator), n_steps = batch size.

    ``batch``: any batch with ``old_logprobs``, ``ref_logprobs``, ``sequence_mask`` and ``sequences`` (an
    :class:`Experience` or the critic-free ``GroupExperience``). The KL is taken over every sampled
    response token (``sequence_mask``'s response columns), as ``objective/kl`` logs it: the training mask
    (``response_mask``) is 0 on the rows of DAPO's dropped groups, whose KL still counts."""
    sampled = batch.sequence_mask[:, batch.prompt_length:].astype(jnp.float32)
    observed = jnp.mean(sequence_kl(batch.old_logprobs, batch.ref_logprobs, sampled,
                                    cfg.effective_kl_estimator))
    return controller.update(state, observed, batch.sequences.shape[0])


def as_float32(metrics: dict[str, Any]) -> dict[str, jax.Array]:
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)
