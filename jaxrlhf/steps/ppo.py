"""The PPO update: epochs × minibatches of the clipped policy loss + clipped value loss − entropy bonus.

    update(state: RLState, batch: Experience, key) -> (state, metrics)

Epochs and minibatches run in :func:`jaxrlhf.steps.minibatch_epochs.minibatch_epochs` (the loop the
critic-free update shares: shuffled minibatches, gradient accumulation, the non-finite guard, early stopping
on approx-KL). The KL controller then sees the batch's KL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.models.lora import join_params
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.rl.masked import masked_count, masked_mean
from jaxrlhf.rl.policy_losses import ppo_policy_loss, value_loss
from jaxrlhf.steps.actor_critic import (
    ActorCriticParams,
    actor_critic_outputs,
    apply_actor_critic,
    as_float32,
    check_critic,
    kl_controller,
    kl_loss_term,
    update_kl_controller,
)
from jaxrlhf.steps.experience import Experience, policy_gradient_advantages
from jaxrlhf.steps.minibatch_epochs import check_minibatches, minibatch_epochs
from jaxrlhf.steps.optim import current_learning_rate
from jaxrlhf.steps.rl_config import PPOConfig
from jaxrlhf.steps.state import RLState, TrainState, split_frozen

if TYPE_CHECKING:
    from jaxrlhf.steps.rl_iteration import UpdateFn

Metrics = dict[str, jax.Array]


def ppo_loss(
    policy_model: LanguageModel,
    critic_model: LanguageModel | None,
    cfg: PPOConfig,
    params: ActorCriticParams,
    batch: Experience,
    kl_coef: jax.Array,
) -> tuple[jax.Array, tuple[jax.Array, Metrics]]:
    """L = L_clip + vf_coef·L_V − entropy_coef·H (+ β·KL when the KL is in the loss), token means; with
    ``batch.tis_weights`` (``cfg.tis_cap``) L_clip's token terms are weighted by
    w_t = min(π_old/π_sampler, C).

    Returns (loss, (response tokens, metrics)); metrics use the RLHF_REFERENCE names, plus "loss/kl_avg" and
    "val/ratio_abs_dev" (mean |r − 1| over the response tokens).
    """
    out = actor_critic_outputs(policy_model, critic_model, cfg, params, batch)
    mask = batch.response_mask
    # TIS (cfg.tis_cap): w_t·ℓ_clip(r_t, A_t) = ℓ_clip(r_t, w_t·A_t) since w_t ≥ 0.
    pg_advantages = policy_gradient_advantages(batch)
    pg, pg_metrics = ppo_policy_loss(out.logprobs, batch.old_logprobs, pg_advantages, mask, cfg.clip_eps,
                                     cfg.dual_clip, clip_eps_high=cfg.clip_eps_high)
    vf, vf_metrics = value_loss(out.values, batch.old_values, batch.returns, mask, cfg.vf_clip_eps)
    entropy = masked_mean(out.entropy, mask)
    kl = kl_loss_term(cfg, out.logprobs, batch)
    loss = pg + cfg.vf_coef * vf - cfg.entropy_coef * entropy + kl_coef * kl
    ratio = jnp.exp(out.logprobs - batch.old_logprobs)
    metrics = {
        "policy/approxkl_avg": pg_metrics["approxkl"],
        "policy/clipfrac_avg": pg_metrics["clipfrac"],
        "loss/policy_avg": pg,
        "loss/value_avg": vf,
        "loss/kl_avg": kl,
        "val/clipfrac_avg": vf_metrics["clipfrac"],
        "policy/entropy_avg": entropy,
        "val/ratio": pg_metrics["ratio"],
        "val/ratio_var": pg_metrics["ratio_var"],
        "val/ratio_abs_dev": masked_mean(jnp.abs(ratio - 1.0), mask),
    }
    return loss, (masked_count(mask), jax.lax.stop_gradient(metrics))


AVERAGED_METRICS = (
    "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "loss/kl_avg",
    "val/clipfrac_avg", "policy/entropy_avg", "val/ratio", "val/ratio_var", "train/grad_norm",
)


#: Variance metrics and the mean each is taken about (merged exactly over micro-batches).
VARIANCES = {"val/ratio_var": "val/ratio"}


def make_ppo_update(
    policy_model: LanguageModel,
    critic_model: LanguageModel | None,
    cfg: PPOConfig,
    policy_optimizer: optax.GradientTransformation,
    critic_optimizer: optax.GradientTransformation | None = None,
) -> UpdateFn:
    """``update(state, batch, key) -> (state, metrics)``; pure and jittable.

    B must split into ``num_minibatches`` minibatches, and each into ``grad_accum_steps`` micro-batches.
    Metrics (averages over the applied minibatches): policy/approxkl_avg, policy/clipfrac_avg,
    loss/policy_avg, loss/value_avg, loss/kl_avg, val/clipfrac_avg, policy/entropy_avg, val/ratio,
    val/ratio_var, train/grad_norm (before clipping); and val/ratio_abs_dev_first_minibatch (mean |r − 1|
    on the first minibatch, before any update: 0 when sampling and training log-probs agree),
    train/skipped_updates (minibatch updates skipped as not finite), train/early_stopped, train/updates
    (minibatch updates applied), lr, objective/kl_coef (after the controller update).
    """
    check_critic("make_ppo_update", cfg, critic_model, critic_optimizer)
    controller = kl_controller(cfg)

    def update(state: RLState, batch: Experience, key: jax.Array) -> tuple[RLState, Metrics]:
        check_minibatches("make_ppo_update", batch.sequences.shape[0], cfg)
        kl_coef = state.kl.kl_coef

        policy, policy_frozen = split_frozen(state.policy)
        critic, critic_frozen = split_frozen(state.critic)

        def loss_fn(params: ActorCriticParams, minibatch: Experience):
            params = join_params(ActorCriticParams(policy_frozen, critic_frozen), params)
            return ppo_loss(policy_model, critic_model, cfg, params, minibatch, kl_coef)

        def params_of(trainables: tuple[TrainState, TrainState | None]) -> ActorCriticParams:
            policy, critic = trainables
            return ActorCriticParams(policy.params, None if critic is None else critic.params)

        def apply(trainables, grads: ActorCriticParams):
            return apply_actor_critic(trainables, grads, policy_optimizer, critic_optimizer)

        (policy, critic), metrics = minibatch_epochs(loss_fn, params_of, apply, (policy, critic),
                                                     batch, key, cfg, AVERAGED_METRICS, VARIANCES)
        policy = policy._replace(frozen=policy_frozen)
        critic = None if critic is None else critic._replace(frozen=critic_frozen)
        kl = update_kl_controller(controller, state.kl, cfg, batch)
        metrics |= {"lr": current_learning_rate(policy.opt_state), "objective/kl_coef": kl.kl_coef}
        return RLState(policy, critic, kl), as_float32(metrics)

    return update
