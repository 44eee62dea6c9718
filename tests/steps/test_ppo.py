"""The PPO update: ratio 1 before the first update, equality with one hand-computed optax step, gradient
accumulation, early stopping, the non-finite guard, a separate critic, and the KL controller."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import rl
from jaxrlhf.models.heads import init_reward_head, init_value_head
from jaxrlhf.rollout.scoring import response_hidden, response_logits, response_values
from jaxrlhf.steps.accumulate import accumulate_gradients
from jaxrlhf.steps.actor_critic import ActorCriticParams, kl_controller
from jaxrlhf.steps.experience import make_experience_fn
from jaxrlhf.steps.optim import OptimizerConfig, make_optimizer
from jaxrlhf.steps.params import CriticParams, PolicyParams
from jaxrlhf.steps.ppo import VARIANCES, make_ppo_update, ppo_loss
from jaxrlhf.steps.rl_config import PPOConfig
from jaxrlhf.steps.state import create_rl_state

P, T = 4, 0.7
SCORES = jnp.array([1.0, -0.5, 2.0, 0.25])
CFG = PPOConfig(epochs=1, num_minibatches=1, temperature=T, kl_coef=0.05, vf_coef=0.1, entropy_coef=0.01,
                missing_eos_penalty=0.5)


@pytest.fixture(scope="module")
def optimizer():
    return make_optimizer(OptimizerConfig(learning_rate=1e-3, schedule="constant"), 100)


@pytest.fixture(scope="module")
def policy(tiny_params):
    # A non-zero value head, so the value loss and its clipping see varied values.
    return PolicyParams(tiny_params, init_reward_head(jax.random.key(7), 32))


@pytest.fixture(scope="module")
def experience(tiny_model, policy, other_params, make_rollout):
    fn = jax.jit(make_experience_fn(tiny_model, tiny_model, None, CFG))
    return fn(policy, PolicyParams(other_params), None, make_rollout(0), SCORES, kl_controller(CFG).init())[0]


@pytest.fixture(scope="module")
def update(tiny_model, optimizer):
    return jax.jit(make_ppo_update(tiny_model, None, CFG, optimizer))


@pytest.fixture(scope="module")
def first_update(update, policy, optimizer, experience):
    state = create_rl_state(policy, optimizer, kl_controller(CFG).init())
    return state, update(state, experience, jax.random.key(0))


def hand_ppo_loss(model, params, batch):
    """The PPO loss written out from the rl functions and the scoring passes."""
    hidden = response_hidden(model, params.lm, batch.sequences, batch.sequence_mask, P)
    logits = response_logits(model, params.lm, hidden)
    logp = rl.token_logprobs(logits, batch.sequences[:, P:], T) * batch.response_mask
    values, _ = response_values(params.value_head, hidden)
    mask = batch.response_mask
    pg, _ = rl.ppo_policy_loss(logp, batch.old_logprobs, batch.advantages, mask, 0.2)
    vf, _ = rl.value_loss(values, batch.old_values, batch.returns, mask, 0.2)
    entropy = rl.masked_mean(rl.entropy_from_logits(logits / T), mask)
    return pg + 0.1 * vf - 0.01 * entropy, pg


def test_first_ratio_is_one_and_update_is_one_optax_step(first_update, tiny_model, optimizer, experience):
    state, (new_state, metrics) = first_update
    assert float(metrics["val/ratio_abs_dev_first_minibatch"]) <= 1e-6
    assert float(metrics["val/ratio"]) == pytest.approx(1.0, abs=1e-6)
    assert float(metrics["policy/approxkl_avg"]) <= 1e-12 and float(metrics["policy/clipfrac_avg"]) == 0.0

    @jax.jit
    def manual_step(params, opt_state):
        (_, pg), grads = jax.value_and_grad(lambda p: hand_ppo_loss(tiny_model, p, experience),
                                               has_aux=True)(params)
        updates, _ = optimizer.update(grads, opt_state, params)
        return jax.tree.map(jnp.add, params, updates), pg

    expected, pg = manual_step(state.policy.params, state.policy.opt_state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), new_state.policy.params, expected)
    assert float(metrics["loss/policy_avg"]) == pytest.approx(float(pg), abs=1e-6)
    assert int(new_state.policy.step) == 1 and new_state.critic is None
    assert float(metrics["train/updates"]) == 1 and float(metrics["train/early_stopped"]) == 0
    assert float(metrics["train/skipped_updates"]) == 0 and float(metrics["lr"]) == pytest.approx(1e-3)
    assert float(metrics["objective/kl_coef"]) == pytest.approx(0.05)  # fixed controller
    assert all(m.dtype == jnp.float32 and m.shape == () for m in metrics.values())


def test_nan_in_batch_leaves_state_unchanged(first_update, update, experience):
    state, _ = first_update
    bad = experience._replace(advantages=experience.advantages.at[1, 2].set(jnp.nan))
    new_state, metrics = update(state, bad, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, new_state.policy, state.policy)
    assert float(metrics["train/skipped_updates"]) == 1 and float(metrics["train/updates"]) == 0
    assert np.isfinite(float(metrics["loss/policy_avg"]))


def test_early_stop_prevents_further_updates(first_update, tiny_model, optimizer, experience):
    state, (one_update, _) = first_update
    cfg = dataclasses.replace(CFG, epochs=3, target_kl_early_stop=1e-12)
    new_state, metrics = jax.jit(make_ppo_update(tiny_model, None, cfg, optimizer))(
        state, experience, jax.random.key(0))
    # The first update sees ratio 1 (approx-KL 0) and is applied; the second sees KL > 0 and stops.
    assert float(metrics["train/early_stopped"]) == 1 and float(metrics["train/updates"]) == 1
    assert int(new_state.policy.step) == 1
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), new_state.policy.params,
                 one_update.policy.params)


def test_grad_accumulation_equals_one_pass(tiny_model, policy, experience):
    cfg = dataclasses.replace(CFG, kl_in_reward=False)  # include the KL-in-the-loss term as well
    loss_fn = lambda params, batch: ppo_loss(tiny_model, None, cfg, params, batch, jnp.float32(0.3))
    params = ActorCriticParams(policy, None)
    old = experience.old_logprobs + 0.2 * jax.random.normal(jax.random.key(5), experience.old_logprobs.shape)
    batch = experience._replace(old_logprobs=old)  # ratios ≠ 1: a variance to merge across micro-batches
    run = jax.jit(lambda n: accumulate_gradients(loss_fn, params, batch, n, VARIANCES), static_argnums=0)
    (_, one, metrics1), (_, two, metrics2) = run(1), run(2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), one, two)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(one)) > 1e-3
    assert float(metrics1["val/ratio_var"]) > 1e-3
    for k in metrics1:  # the ratio's variance too: the batch's, not the mean of the micro-batches'
        np.testing.assert_allclose(metrics2[k], metrics1[k], rtol=2e-5, atol=1e-7, err_msg=k)


def test_separate_critic_minibatches_and_adaptive_kl(tiny_model, optimizer, tiny_params, other_params,
                                                     make_rollout):
    cfg = PPOConfig(epochs=2, num_minibatches=2, grad_accum_steps=2, critic="separate", dual_clip=3.0,
                    kl_in_reward=False, kl_estimator="k3", adaptive_kl=True, kl_coef=0.2, kl_target=0.01,
                    temperature=T)
    critic = CriticParams(other_params, init_value_head(32))
    kl_state = kl_controller(cfg).init()
    batch, _ = jax.jit(make_experience_fn(tiny_model, tiny_model, tiny_model, cfg))(
        PolicyParams(tiny_params), PolicyParams(other_params), critic, make_rollout(3), SCORES, kl_state)
    critic_optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, schedule="constant"), 100)
    state = create_rl_state(PolicyParams(tiny_params), optimizer, kl_state, critic, critic_optimizer)
    update = jax.jit(make_ppo_update(tiny_model, tiny_model, cfg, optimizer, critic_optimizer))
    new_state, metrics = update(state, batch, jax.random.key(1))

    assert int(new_state.policy.step) == 4 and int(new_state.critic.step) == 4
    assert float(metrics["train/updates"]) == 4
    assert float(jnp.max(jnp.abs(new_state.critic.params.value_head["proj"]["bias"]))) > 0
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new_state.policy.params,
                         state.policy.params)
    assert max(jax.tree.leaves(moved)) > 1e-4
    assert float(metrics["val/ratio_abs_dev_first_minibatch"]) <= 1e-6 and float(metrics["loss/kl_avg"]) > 0
    assert all(np.isfinite(float(v)) for v in metrics.values())
    # β ← β·(1 + clip((KL − target)/target, ±0.2)·B/horizon), KL = mean over sequences of the summed k3.
    log_r = np.asarray(batch.ref_logprobs - batch.old_logprobs, np.float64)
    kl = ((np.expm1(log_r) - log_r) * np.asarray(batch.response_mask)).sum(1).mean()
    error = np.clip((kl - 0.01) / 0.01, -0.2, 0.2)
    assert float(metrics["objective/kl_coef"]) == pytest.approx(0.2 * (1 + error * 4 / 10000), rel=1e-6)


def test_tis_weights_the_policy_gradient_term(tiny_model, policy, experience):
    """With TIS weights w_t the policy term is −Σ_t m_t·w_t·r_t·A_t / Σ m (before clipping): its gradient
    equals that of the weighted surrogate written out, and differs from the unweighted one."""
    cfg = dataclasses.replace(CFG, vf_coef=0.0, entropy_coef=0.0, tis_cap=2.0)
    rng = np.random.RandomState(3)
    weights = jnp.asarray(rng.uniform(0.2, 2.0, experience.old_logprobs.shape), jnp.float32)
    weights = weights * experience.response_mask
    # The old log-probs shifted by a small amount: ratios near 1, inside the clip range.
    shifted = experience._replace(old_logprobs=experience.old_logprobs + 0.01 * experience.response_mask)
    params = ActorCriticParams(policy, None)
    kl_coef = jnp.float32(0.0)

    def loss(p, batch):
        return ppo_loss(tiny_model, None, cfg, p, batch, kl_coef)[0]

    def weighted_surrogate(p):
        hidden = response_hidden(tiny_model, p.policy.lm, shifted.sequences, shifted.sequence_mask, P)
        logits = response_logits(tiny_model, p.policy.lm, hidden)
        logp = rl.token_logprobs(logits, shifted.sequences[:, P:], T)
        ratio = jnp.exp(logp - shifted.old_logprobs)
        m = shifted.response_mask
        return -jnp.sum(m * weights * ratio * shifted.advantages) / jnp.sum(m)

    weighted = jax.grad(loss)(params, shifted._replace(tis_weights=weights))
    expected = jax.grad(weighted_surrogate)(params)
    plain = jax.grad(loss)(params, shifted)
    flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g.policy.lm)])
    np.testing.assert_allclose(flat(weighted), flat(expected), atol=1e-6)
    assert np.abs(flat(weighted) - flat(plain)).max() > 1e-4


def test_fenced_update_equals_the_plain_one(first_update, update, tiny_model, optimizer, experience):
    """Multi-process CPU runs fence every loop of a step (``jaxrlhf.collective_order``); the PPO update,
    whose attention keeps its padding mask (float32's minimum) live across the loops, must give the same
    state and metrics (to float rounding: a fence stops XLA fusing across it, which may reorder a sum), and
    its non-finite guard must still leave the state unchanged."""
    from jaxrlhf.collective_order import sequence_loops

    state, _ = first_update
    # A left-padded row first: the attention mask's first element is then float32's minimum.
    experience = jax.tree.map(lambda x: x[jnp.array([1, 0, 2, 3])], experience)
    assert int(experience.sequence_mask[0, 0]) == 0
    expected_state, expected_metrics = update(state, experience, jax.random.key(0))
    fenced = jax.jit(sequence_loops(make_ppo_update(tiny_model, None, CFG, optimizer)))
    new_state, metrics = fenced(state, experience, jax.random.key(0))
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7)
    jax.tree.map(close, new_state, expected_state)
    jax.tree.map(close, metrics, expected_metrics)
    bad = experience._replace(advantages=experience.advantages.at[1, 2].set(jnp.nan))
    skipped, metrics = fenced(state, bad, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, skipped.policy, state.policy)
    assert float(metrics["train/skipped_updates"]) == 1
