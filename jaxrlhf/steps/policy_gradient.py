"""The critic-free update shared by GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++ and ReMax: epochs ×
minibatches of a policy-gradient loss with no value term.

    update(state: RLState, batch: GroupExperience, key) -> (state, metrics)

Per token ℓ_t, aggregated by ``cfg.loss_agg`` (``jaxrlhf.rl.loss_aggregation``) over the minibatch:

    ratio "token":    ℓ_t = max(−A_t·r_t, −A_t·clip(r_t, 1 − ε_low, 1 + ε_high)), r_t = π/π_old  (PPO-clip)
    ratio "sequence": ℓ_i = max(−A_i·s_i, −A_i·clip(s_i, …)), s_i = exp(mean_t log r_t)        (GSPO)
    ratio "none":     ℓ_t = −A_t·log π_t                                                        (REINFORCE)
    L = agg(ℓ) + β·agg(k(π, π_ref)) [KL in the loss only] − entropy_coef·agg(H)

The loop (shuffled minibatches, gradient accumulation, non-finite guard, early stopping) is PPO's,
:func:`jaxrlhf.steps.minibatch_epochs.minibatch_epochs`. Before the first update the ratio is exactly 1:
old log-probs come from the same forward pass (:func:`jaxrlhf.steps.experience.response_logprobs_and_values`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax

from jaxrlhf.models.lora import join_params
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.rl.kl import kl_estimate
from jaxrlhf.rl.loss_aggregation import aggregate_loss
from jaxrlhf.rl.masked import masked_count, masked_mean, masked_var
from jaxrlhf.rl.policy_losses import a2c_policy_loss, gspo_policy_loss, ppo_policy_loss
from jaxrlhf.steps.actor_critic import as_float32, kl_controller, update_kl_controller
from jaxrlhf.steps.experience import policy_gradient_advantages, response_logprobs_and_values
from jaxrlhf.steps.group_experience import GroupExperience
from jaxrlhf.steps.minibatch_epochs import check_minibatches, minibatch_epochs
from jaxrlhf.steps.optim import current_learning_rate
from jaxrlhf.steps.params import PolicyParams
from jaxrlhf.steps.rl_config import PGConfig
from jaxrlhf.steps.state import RLState, TrainState, apply_gradients, split_frozen

if TYPE_CHECKING:
    from jaxrlhf.steps.rl_iteration import UpdateFn

Metrics = dict[str, jax.Array]


def loss_weight(mask: jax.Array, loss_agg: str) -> jax.Array:
    """The weight of a (micro-)batch's loss under ``loss_agg``, so that accumulating Σ w_i·L_i / Σ w_i over
    micro-batches gives the whole batch's loss: its tokens (token_mean), its rows with tokens
    (sequence_mean), all its rows (token_sum_norm, whose constant is rows × max response length)."""
    if loss_agg == "token_mean":
        return masked_count(mask)
    if loss_agg == "sequence_mean":
        return jnp.sum((masked_count(mask, axis=-1) > 0).astype(jnp.float32))
    return jnp.asarray(mask.shape[0], jnp.float32)


def policy_gradient_loss(
    model: LanguageModel,
    cfg: PGConfig,
    params: PolicyParams,
    batch: GroupExperience,
    kl_coef: jax.Array,
) -> tuple[jax.Array, tuple[jax.Array, Metrics]]:
    """L = agg(ℓ) + β·agg(k) (KL in the loss) − entropy_coef·agg(H) (see the module docstring).

    Returns (loss, (weight, metrics, metric weights)) as :func:`jaxrlhf.steps.accumulate.accumulate_gradients`
    takes it.
    Metrics: loss/policy_avg, loss/kl_avg (the KL term, 0 with the KL in the reward), kl (token mean of the
    configured estimator under the current policy), entropy (token mean), policy/approxkl_avg,
    policy/clipfrac_avg, clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean (TRL's: the share
    of tokens — of sequences with GSPO — clipped below with A < 0, above with A > 0, either), val/ratio,
    val/ratio_var, val/ratio_abs_dev (token mean |r − 1|).
    """
    out = response_logprobs_and_values(model, params._replace(value_head=None), batch.sequences,
                                       batch.sequence_mask, batch.prompt_length, cfg.temperature)
    # TIS (cfg.tis_cap): the policy-gradient term's advantages carry the weights min(π_old/π_sampler, C).
    logp, mask, adv = out.logprobs, batch.response_mask, policy_gradient_advantages(batch)
    agg = lambda x: aggregate_loss(x, mask, cfg.loss_agg)  # token_sum_norm's constant: rows × N
    log_ratio = logp - batch.old_logprobs
    ratio = jax.lax.stop_gradient(jnp.exp(log_ratio))
    zero = jnp.zeros((), jnp.float32)
    if cfg.ratio == "token":
        pg, m = ppo_policy_loss(logp, batch.old_logprobs, adv, mask, cfg.clip_eps, cfg.dual_clip,
                                clip_eps_high=cfg.clip_eps_high, loss_agg=cfg.loss_agg)
    elif cfg.ratio == "sequence":
        sequence_advantage = masked_mean(adv, mask, axis=-1)  # A_i (constant over the row's tokens)
        pg, m = gspo_policy_loss(logp, batch.old_logprobs, sequence_advantage, mask, cfg.clip_eps,
                                 cfg.clip_eps_high)
    else:
        pg = a2c_policy_loss(logp, adv, mask, loss_agg=cfg.loss_agg)
        m = {"clipfrac": zero, "clip_ratio/low_mean": zero, "clip_ratio/high_mean": zero,
             "clip_ratio/region_mean": zero}
    token_kl = kl_estimate(logp, jax.lax.stop_gradient(batch.ref_logprobs), cfg.effective_kl_estimator)
    kl_term = zero if cfg.kl_in_reward else agg(token_kl)
    entropy_term = agg(out.entropy) if cfg.entropy_coef else zero
    loss = pg + kl_coef * kl_term - cfg.entropy_coef * entropy_term
    metrics = {
        "loss/policy_avg": pg,
        "loss/kl_avg": kl_term,
        "kl": masked_mean(token_kl, mask),
        "entropy": masked_mean(out.entropy, mask),
        "policy/approxkl_avg": 0.5 * masked_mean(jnp.square(log_ratio), mask),
        "policy/clipfrac_avg": m["clipfrac"],
        "clip_ratio/low_mean": m["clip_ratio/low_mean"],
        "clip_ratio/high_mean": m["clip_ratio/high_mean"],
        "clip_ratio/region_mean": m["clip_ratio/region_mean"],
        "val/ratio": masked_mean(ratio, mask),
        "val/ratio_var": masked_var(ratio, mask, unbiased=False),
        "val/ratio_abs_dev": masked_mean(jnp.abs(ratio - 1.0), mask),
    }
    # Under gradient accumulation each metric is averaged with the weight of what it is a mean over: tokens,
    # except the loss terms (the loss's own weight) and GSPO's clip shares (sequences with tokens).
    tokens, w = masked_count(mask), loss_weight(mask, cfg.loss_agg)
    sequences = jnp.sum((masked_count(mask, axis=-1) > 0).astype(jnp.float32))
    weights = {k: tokens for k in metrics} | {"loss/policy_avg": w, "loss/kl_avg": w}
    if cfg.ratio == "sequence":
        clip_shares = ("policy/clipfrac_avg", "clip_ratio/low_mean", "clip_ratio/high_mean",
                       "clip_ratio/region_mean")
        weights |= {k: sequences for k in clip_shares}
    return loss, (w, jax.lax.stop_gradient(metrics), weights)


AVERAGED_METRICS = (
    "loss/policy_avg", "loss/kl_avg", "kl", "entropy", "policy/approxkl_avg", "policy/clipfrac_avg",
    "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "val/ratio", "val/ratio_var",
    "train/grad_norm",
)


#: Variance metrics and the mean each is taken about (merged exactly over micro-batches).
VARIANCES = {"val/ratio_var": "val/ratio"}


def make_pg_update(
    policy_model: LanguageModel, cfg: PGConfig, optimizer: optax.GradientTransformation
) -> UpdateFn:
    """``update(state, batch, key) -> (state, metrics)``: epochs × minibatches of
    :func:`policy_gradient_loss`, then the KL controller's step; pure and jittable. ``state.critic`` is None.

    Metrics: the loss's (averaged over the applied minibatches; see :func:`policy_gradient_loss`),
    train/grad_norm, val/ratio_abs_dev_first_minibatch (0 when sampling and training log-probs agree),
    train/skipped_updates, train/early_stopped, train/updates, lr, objective/kl_coef (after the controller).
    """
    controller = kl_controller(cfg)

    def update(state: RLState, batch: GroupExperience, key: jax.Array) -> tuple[RLState, Metrics]:
        if state.critic is not None:
            raise ValueError("make_pg_update: a critic-free update takes a state without a critic")
        check_minibatches("make_pg_update", batch.sequences.shape[0], cfg)
        kl_coef = state.kl.kl_coef

        policy, frozen = split_frozen(state.policy)

        def loss_fn(params: PolicyParams, minibatch: GroupExperience):
            return policy_gradient_loss(policy_model, cfg, join_params(frozen, params), minibatch, kl_coef)

        def apply(policy: TrainState, grads: PolicyParams) -> TrainState:
            return apply_gradients(policy, optimizer, grads)

        policy, metrics = minibatch_epochs(loss_fn, lambda policy: policy.params, apply, policy, batch,
                                           key, cfg, AVERAGED_METRICS, VARIANCES)
        policy = policy._replace(frozen=frozen)
        kl = update_kl_controller(controller, state.kl, cfg, batch)
        metrics |= {"lr": current_learning_rate(policy.opt_state), "objective/kl_coef": kl.kl_coef}
        return RLState(policy, None, kl), as_float32(metrics)

    return update
