"""The critic-free update: ratio exactly 1 on the first minibatch, one update equal to an optax step on a
surrogate whose per-row weights come from a NumPy reference of the group advantages (so the advantages reach
the loss on the right rows), gradient accumulation exact under every loss aggregation and ratio, the KL in
the loss, the non-finite guard, epochs × minibatches."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import rl
from jaxrlhf.rl.kl_control import KLControllerState
from jaxrlhf.rollout.scoring import response_hidden, response_logits
from jaxrlhf.steps.accumulate import accumulate_gradients
from jaxrlhf.steps.actor_critic import kl_controller
from jaxrlhf.steps.group_experience import make_group_experience_fn
from jaxrlhf.steps.optim import OptimizerConfig, make_optimizer
from jaxrlhf.steps.params import PolicyParams
from jaxrlhf.steps.policy_gradient import VARIANCES, make_pg_update, policy_gradient_loss
from jaxrlhf.steps.rl_config import GRPOConfig
from jaxrlhf.steps.state import create_rl_state

P, T = 4, 0.7
SCORES = np.array([1.0, -0.5, 2.0, 0.25, 0.0, 1.0, 3.0, -1.0], np.float32)
# Two prompts × four samples; the KL (k2) in the loss against a different reference; an entropy bonus.
CFG = GRPOConfig(group_size=4, kl_coef=0.05, entropy_coef=0.01, missing_eos_penalty=0.5, temperature=T)


@pytest.fixture(scope="module")
def optimizer():
    return make_optimizer(OptimizerConfig(learning_rate=1e-3, schedule="constant"), 100)


@pytest.fixture(scope="module")
def rollout(make_rollout):
    return make_rollout(4, b=8)


@pytest.fixture(scope="module")
def experience(tiny_model, tiny_params, other_params, rollout):
    fn = jax.jit(make_group_experience_fn(tiny_model, tiny_model, CFG))
    return fn(PolicyParams(tiny_params), PolicyParams(other_params), None, rollout, SCORES,
              KLControllerState(jnp.float32(0.05)))[0]


def numpy_row_weights(rollout) -> np.ndarray:
    """w_b = A_b / (L_b·B'): GRPO's advantage of row b spread over its L_b tokens, rows averaged."""
    mask = np.asarray(rollout.response_mask, np.float64)
    shaped = SCORES - 0.5 * ~np.asarray(rollout.stopped)
    groups = shaped.reshape(2, 4).astype(np.float64)
    advantages = ((groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4))
    lengths = mask.sum(1)
    return advantages.reshape(-1) / lengths / len(lengths)


def surrogate(model, params, batch, row_weights, ref_logprobs):
    """−Σ_b w_b Σ_t log π_bt + β·seq_mean(k2) − 0.01·seq_mean(H): the GRPO loss's gradient at ratio 1."""
    hidden = response_hidden(model, params.lm, batch.sequences, batch.sequence_mask, P)
    logits = response_logits(model, params.lm, hidden)
    mask = batch.response_mask
    logp = rl.token_logprobs(logits, batch.sequences[:, P:], T) * mask
    pg = -jnp.sum(jnp.asarray(row_weights, jnp.float32)[:, None] * logp)
    kl = rl.aggregate_loss(rl.kl_estimate(logp, ref_logprobs, "k2"), mask, "sequence_mean")
    entropy = rl.aggregate_loss(rl.entropy_from_logits(logits / T), mask, "sequence_mean")
    return pg + 0.05 * kl - 0.01 * entropy


def test_first_ratio_is_one_and_the_update_follows_the_numpy_advantages(
    tiny_model, tiny_params, optimizer, rollout, experience
):
    state = create_rl_state(PolicyParams(tiny_params), optimizer, kl_controller(CFG).init())
    new_state, metrics = jax.jit(make_pg_update(tiny_model, CFG, optimizer))(state, experience,
                                                                             jax.random.key(0))
    assert float(metrics["val/ratio_abs_dev_first_minibatch"]) <= 1e-6
    assert float(metrics["val/ratio"]) == pytest.approx(1.0, abs=1e-6)
    assert float(metrics["policy/approxkl_avg"]) <= 1e-12
    assert float(metrics["clip_ratio/low_mean"]) == float(metrics["clip_ratio/high_mean"]) == 0.0

    weights = numpy_row_weights(rollout)
    grad_of = jax.jit(lambda p, w: jax.grad(
        lambda q: surrogate(tiny_model, q, experience, w, experience.ref_logprobs))(p))
    grads = grad_of(state.policy.params, weights)
    updates, _ = optimizer.update(grads, state.policy.opt_state, state.policy.params)
    expected = jax.tree.map(jnp.add, state.policy.params, updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), new_state.policy.params, expected)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new_state.policy.params,
                         state.policy.params)
    assert max(jax.tree.leaves(moved)) > 1e-4
    # The same weights on other rows would give another gradient: the test can see a row mix-up.
    other = grad_of(state.policy.params, weights[::-1].copy())
    gap = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), other, grads)))
    assert gap > 1e-3

    # KL in the loss: k2 against the reference, per-sequence token means; the logged token-mean KL too.
    mask = np.asarray(experience.response_mask, np.float64)
    log_r = np.asarray(experience.ref_logprobs - experience.old_logprobs, np.float64)
    k2 = 0.5 * log_r**2 * mask
    assert float(metrics["loss/kl_avg"]) == pytest.approx((k2.sum(1) / mask.sum(1)).mean(), rel=1e-5)
    assert float(metrics["kl"]) == pytest.approx(k2.sum() / mask.sum(), rel=1e-5)
    assert int(new_state.policy.step) == 1 and new_state.critic is None
    assert float(metrics["train/updates"]) == 1 and float(metrics["train/skipped_updates"]) == 0
    assert all(m.dtype == jnp.float32 and m.shape == () for m in metrics.values())


@pytest.mark.parametrize("changes", [
    {"loss_agg": "token_mean", "clip_eps_high": 0.28},
    {"loss_agg": "sequence_mean"},
    {"loss_agg": "token_sum_norm", "kl_in_reward": True},
    {"ratio": "sequence", "clip_eps": 3e-4, "clip_eps_high": 4e-4},
    {"ratio": "none", "loss_agg": "token_sum_norm"},
])
def test_grad_accumulation_equals_one_pass_and_ratio_starts_at_one(changes, tiny_model, tiny_params,
                                                                   experience):
    cfg = dataclasses.replace(CFG, **changes)
    # Perturbed advantages and a flat (dropped) row, so that every aggregation weighs rows differently.
    batch = experience._replace(
        advantages=experience.advantages * jnp.linspace(0.5, 2.0, 8)[:, None],
        response_mask=experience.response_mask.at[5].set(0.0))
    loss_fn = lambda params, batch: policy_gradient_loss(tiny_model, cfg, params, batch, jnp.float32(0.3))
    params = PolicyParams(tiny_params)
    run = jax.jit(lambda n: accumulate_gradients(loss_fn, params, batch, n, VARIANCES), static_argnums=0)
    (loss1, grads1, metrics1), (loss2, grads2, _) = run(1), run(2)
    assert float(loss1) == pytest.approx(float(loss2), rel=1e-5, abs=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads1, grads2)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads1)) > 1e-3
    assert float(metrics1["val/ratio_abs_dev"]) <= 1e-6


@pytest.mark.parametrize("changes", [
    {"loss_agg": "sequence_mean"},
    {"loss_agg": "token_sum_norm", "kl_in_reward": False, "kl_estimator": "k3"},
    {"ratio": "sequence", "clip_eps": 3e-4, "clip_eps_high": 4e-4},
])
def test_accumulated_metrics_are_the_whole_batchs_means(changes, tiny_model, tiny_params, experience):
    """Token-mean metrics are token means (not row-weighted) and the ratio's variance is the batch's, under
    every split, when the loss is averaged over sequences (they were off by up to 10% at 4 micro-batches)."""
    cfg = dataclasses.replace(CFG, entropy_coef=0.01, **changes)
    lengths = jnp.array([3, 6, 6, 6, 1, 6, 6, 6])  # uneven rows: row-weighting and token-weighting differ
    mask = (jnp.arange(experience.response_mask.shape[1])[None] < lengths[:, None]).astype(jnp.float32)
    key = jax.random.key(3)
    batch = experience._replace(response_mask=mask * experience.response_mask,
                                advantages=jax.random.normal(key, experience.advantages.shape),
                                old_logprobs=experience.old_logprobs + 0.3 * jax.random.normal(
                                    jax.random.fold_in(key, 1), experience.old_logprobs.shape))
    loss_fn = lambda params, batch: policy_gradient_loss(tiny_model, cfg, params, batch, jnp.float32(0.3))
    params = PolicyParams(tiny_params)
    run = jax.jit(lambda n: accumulate_gradients(loss_fn, params, batch, n, VARIANCES)[2], static_argnums=0)
    whole = run(1)
    assert float(whole["val/ratio_var"]) > 1e-3 and 0 < float(whole["clip_ratio/region_mean"]) < 1
    for n in (2, 4):
        split = run(n)
        for k in whole:
            np.testing.assert_allclose(split[k], whole[k], rtol=2e-5, atol=1e-7, err_msg=f"{k} at {n}")


def test_nan_in_the_batch_leaves_the_state_unchanged(tiny_model, tiny_params, optimizer, experience):
    state = create_rl_state(PolicyParams(tiny_params), optimizer, kl_controller(CFG).init())
    bad = experience._replace(advantages=experience.advantages.at[1, 2].set(jnp.nan))
    new_state, metrics = jax.jit(make_pg_update(tiny_model, CFG, optimizer))(state, bad, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, new_state.policy, state.policy)
    assert float(metrics["train/skipped_updates"]) == 1 and float(metrics["train/updates"]) == 0


def test_epochs_times_minibatches_and_bad_splits(tiny_model, tiny_params, optimizer, experience):
    cfg = dataclasses.replace(CFG, epochs=2, num_minibatches=2, grad_accum_steps=2)
    state = create_rl_state(PolicyParams(tiny_params), optimizer, kl_controller(cfg).init())
    new_state, metrics = jax.jit(make_pg_update(tiny_model, cfg, optimizer))(state, experience,
                                                                            jax.random.key(1))
    assert int(new_state.policy.step) == 4 and float(metrics["train/updates"]) == 4
    assert float(metrics["val/ratio_abs_dev_first_minibatch"]) <= 1e-6
    assert float(metrics["policy/approxkl_avg"]) > 0  # later minibatches are off-policy
    with pytest.raises(ValueError, match="batch size 8 does not split into num_minibatches=3"):
        make_pg_update(tiny_model, dataclasses.replace(CFG, num_minibatches=3), optimizer)(
            state, experience, jax.random.key(1))
