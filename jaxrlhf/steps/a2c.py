"""The A2C update (RL4LMs style): one gradient step over the whole batch, no ratio, no clipping.

    L = masked_mean(−A·log π) + vf_coef·masked_mean((V − R)²) − entropy_coef·H  (+ β·KL in the loss)

Advantages come from the same experience pipeline as PPO, by default with λ = 1 (Monte-Carlo / n-step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.models.lora import join_params
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.rl.masked import masked_count, masked_mean
from jaxrlhf.rl.policy_losses import a2c_policy_loss, a2c_value_loss
from jaxrlhf.steps.accumulate import accumulate_gradients
from jaxrlhf.steps.actor_critic import (
    ActorCriticParams,
    actor_critic_outputs,
    apply_if,
    as_float32,
    check_critic,
    kl_controller,
    kl_loss_term,
    update_kl_controller,
)
from jaxrlhf.steps.experience import Experience
from jaxrlhf.steps.guard import all_finite
from jaxrlhf.steps.optim import current_learning_rate
from jaxrlhf.steps.rl_config import A2CConfig
from jaxrlhf.steps.state import RLState, split_frozen

if TYPE_CHECKING:
    from jaxrlhf.steps.rl_iteration import UpdateFn

Metrics = dict[str, jax.Array]


def a2c_loss(
    policy_model: LanguageModel,
    critic_model: LanguageModel | None,
    cfg: A2CConfig,
    params: ActorCriticParams,
    batch: Experience,
    kl_coef: jax.Array,
) -> tuple[jax.Array, tuple[jax.Array, Metrics]]:
    """L = −A·log π + vf_coef·(V − R)² − entropy_coef·H (+ β·KL), token means over the batch.

    Returns (loss, (response tokens, metrics)).
    """
    out = actor_critic_outputs(policy_model, critic_model, cfg, params, batch)
    mask = batch.response_mask
    pg = a2c_policy_loss(out.logprobs, batch.advantages, mask)
    vf = a2c_value_loss(out.values, batch.returns, mask)
    entropy = masked_mean(out.entropy, mask)
    kl = kl_loss_term(cfg, out.logprobs, batch)
    loss = pg + cfg.vf_coef * vf - cfg.entropy_coef * entropy + kl_coef * kl
    log_ratio = out.logprobs - batch.old_logprobs
    metrics = {
        "loss/policy_avg": pg,
        "loss/value_avg": vf,
        "loss/kl_avg": kl,
        "policy/entropy_avg": entropy,
        "policy/approxkl_avg": 0.5 * masked_mean(jnp.square(log_ratio), mask),
        "val/ratio": masked_mean(jnp.exp(log_ratio), mask),
        "val/ratio_abs_dev_first_minibatch": masked_mean(jnp.abs(jnp.exp(log_ratio) - 1.0), mask),
    }
    return loss, (masked_count(mask), jax.lax.stop_gradient(metrics))


def make_a2c_update(
    policy_model: LanguageModel,
    critic_model: LanguageModel | None,
    cfg: A2CConfig,
    policy_optimizer: optax.GradientTransformation,
    critic_optimizer: optax.GradientTransformation | None = None,
) -> UpdateFn:
    """``update(state, batch, key) -> (state, metrics)``: one guarded gradient step; pure and jittable.

    Metrics: loss/policy_avg, loss/value_avg, loss/kl_avg, policy/entropy_avg, policy/approxkl_avg,
    val/ratio, val/ratio_abs_dev_first_minibatch (mean |r − 1|; all before the step), train/grad_norm,
    train/skipped_updates (1 when the step was not finite), train/updates, lr, objective/kl_coef (after the
    controller update).
    """
    check_critic("make_a2c_update", cfg, critic_model, critic_optimizer)
    controller = kl_controller(cfg)

    def update(state: RLState, batch: Experience, key: jax.Array) -> tuple[RLState, Metrics]:
        del key  # one full-batch step: nothing to shuffle
        kl_coef = state.kl.kl_coef

        policy, policy_frozen = split_frozen(state.policy)
        critic, critic_frozen = split_frozen(state.critic)

        def loss_fn(params: ActorCriticParams, batch: Experience):
            params = join_params(ActorCriticParams(policy_frozen, critic_frozen), params)
            return a2c_loss(policy_model, critic_model, cfg, params, batch, kl_coef)

        critic_params = None if critic is None else critic.params
        loss, grads, metrics = accumulate_gradients(
            loss_fn, ActorCriticParams(policy.params, critic_params), batch, cfg.grad_accum_steps)
        finite = all_finite((loss, grads))
        policy, critic = apply_if(finite, policy, critic, grads, policy_optimizer, critic_optimizer)
        policy = policy._replace(frozen=policy_frozen)
        critic = None if critic is None else critic._replace(frozen=critic_frozen)
        kl = update_kl_controller(controller, state.kl, cfg, batch)
        metrics = {
            **metrics,
            "train/grad_norm": optax.tree.norm(grads),
            "train/skipped_updates": ~finite,
            "train/updates": finite,
            "lr": current_learning_rate(policy.opt_state),
            "objective/kl_coef": kl.kl_coef,
        }
        return RLState(policy, critic, kl), as_float32(metrics)

    return update
