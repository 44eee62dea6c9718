"""The PPO update: epochs × minibatches of the clipped policy loss + clipped value loss − entropy bonus.

    update(state: RLState, batch: Experience, key) -> (state, metrics)

Epochs and minibatches are nested ``lax.scan``s (a fresh permutation of the rows per epoch from ``key``);
each minibatch's gradient may be accumulated over micro-batches; an update whose loss or gradients are not
finite is skipped (and counted); with ``target_kl_early_stop`` the first minibatch whose approx-KL exceeds
1.5 × target is not applied and neither is any after it. The KL controller then sees the batch's KL.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.rl.masked import masked_count, masked_mean
from jaxrlhf.rl.policy_losses import ppo_policy_loss, value_loss
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
from jaxrlhf.steps.rl_config import PPOConfig
from jaxrlhf.steps.sharding import shard_rows
from jaxrlhf.steps.state import RLState, TrainState

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
    """L = L_clip + vf_coef·L_V − entropy_coef·H (+ β·KL when the KL is in the loss), token means.

    Returns (loss, (response tokens, metrics)); metrics use the RLHF_REFERENCE names, plus "loss/kl_avg" and
    "val/ratio_abs_dev" (mean |r − 1| over the response tokens).
    """
    out = actor_critic_outputs(policy_model, critic_model, cfg, params, batch)
    mask = batch.response_mask
    pg, pg_metrics = ppo_policy_loss(out.logprobs, batch.old_logprobs, batch.advantages, mask,
                                     cfg.clip_eps, cfg.dual_clip)
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


class _Carry(NamedTuple):
    policy: TrainState
    critic: TrainState | None
    stopped: jax.Array  # bool: early stop triggered
    sums: Metrics  # metric sums over applied minibatches
    applied: jax.Array  # float32: minibatch updates applied
    skips: jax.Array  # float32: non-finite updates skipped
    first_ratio_abs_dev: jax.Array
    index: jax.Array  # int32: minibatches seen


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
    threshold = math.inf if cfg.target_kl_early_stop is None else 1.5 * cfg.target_kl_early_stop

    def update(state: RLState, batch: Experience, key: jax.Array) -> tuple[RLState, Metrics]:
        rows = batch.sequences.shape[0]
        if rows % cfg.num_minibatches or (rows // cfg.num_minibatches) % cfg.grad_accum_steps:
            raise ValueError(f"make_ppo_update: batch size {rows} does not split into num_minibatches="
                             f"{cfg.num_minibatches} × grad_accum_steps={cfg.grad_accum_steps} equal parts")
        kl_coef = state.kl.kl_coef

        def loss_fn(params: ActorCriticParams, minibatch: Experience):
            return ppo_loss(policy_model, critic_model, cfg, params, minibatch, kl_coef)

        def train_minibatch(carry: _Carry, indices: jax.Array) -> _Carry:
            minibatch = shard_rows(jax.tree.map(lambda x: x[indices], batch))  # rows stay split
            critic_params = None if carry.critic is None else carry.critic.params
            params = ActorCriticParams(carry.policy.params, critic_params)
            loss, grads, metrics = accumulate_gradients(loss_fn, params, minibatch, cfg.grad_accum_steps)
            metrics = {**metrics, "train/grad_norm": optax.tree.norm(grads)}
            finite = all_finite((loss, grads))
            first = carry.index == 0
            stopped = carry.stopped | (metrics["policy/approxkl_avg"] > threshold)
            apply = finite & ~stopped
            policy, critic = apply_if(apply, carry.policy, carry.critic, grads, policy_optimizer,
                                      critic_optimizer)
            # where, not multiply: a skipped minibatch's metrics may be nan.
            sums = {k: carry.sums[k] + jnp.where(apply, metrics[k], 0.0) for k in carry.sums}
            return _Carry(
                policy, critic, stopped, sums,
                applied=carry.applied + apply,
                skips=carry.skips + (~finite & ~stopped),
                first_ratio_abs_dev=jnp.where(first, metrics["val/ratio_abs_dev"], carry.first_ratio_abs_dev),
                index=carry.index + 1,
            )

        def minibatch_step(carry: _Carry, indices: jax.Array) -> tuple[_Carry, None]:
            # Once stopped, the remaining minibatches are not even computed.
            skip = lambda carry, _: carry._replace(index=carry.index + 1)
            return jax.lax.cond(carry.stopped, skip, train_minibatch, carry, indices), None

        def epoch_step(carry: _Carry, epoch_key: jax.Array) -> tuple[_Carry, None]:
            order = jax.random.permutation(epoch_key, rows).reshape(cfg.num_minibatches, -1)
            return jax.lax.scan(minibatch_step, carry, order)[0], None

        zero = jnp.zeros((), jnp.float32)
        sums = {k: zero for k in AVERAGED_METRICS}
        init = _Carry(state.policy, state.critic, jnp.zeros((), bool), sums, zero, zero, zero,
                      jnp.zeros((), jnp.int32))
        carry, _ = jax.lax.scan(epoch_step, init, jax.random.split(key, cfg.epochs))

        kl = update_kl_controller(controller, state.kl, cfg, batch)
        applied = jnp.maximum(carry.applied, 1.0)
        metrics = {k: v / applied for k, v in carry.sums.items()}
        metrics |= {
            "val/ratio_abs_dev_first_minibatch": carry.first_ratio_abs_dev,
            "train/skipped_updates": carry.skips,
            "train/early_stopped": carry.stopped,
            "train/updates": carry.applied,
            "lr": current_learning_rate(carry.policy.opt_state),
            "objective/kl_coef": kl.kl_coef,
        }
        return RLState(carry.policy, carry.critic, kl), as_float32(metrics)

    return update
