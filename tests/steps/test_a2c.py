"""The A2C update equals one hand-computed optax step on −A·log π + c_v·(V − R)² − c_e·H; the guard
skips a non-finite batch; a separate critic gets its own step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import rl
from jaxrlhf.models.heads import init_reward_head, init_value_head
from jaxrlhf.rl.kl_control import KLControllerState
from jaxrlhf.rollout.scoring import response_hidden, response_logits, response_values
from jaxrlhf.steps.a2c import make_a2c_update
from jaxrlhf.steps.actor_critic import kl_controller
from jaxrlhf.steps.experience import make_experience_fn
from jaxrlhf.steps.optim import OptimizerConfig, make_optimizer
from jaxrlhf.steps.params import CriticParams, PolicyParams
from jaxrlhf.steps.rl_config import A2CConfig
from jaxrlhf.steps.state import create_rl_state

P, T = 4, 0.7
SCORES = jnp.array([1.0, -0.5, 2.0, 0.25])
CFG = A2CConfig(temperature=T, vf_coef=0.5, entropy_coef=0.01, kl_coef=0.05, grad_accum_steps=2)
KL_STATE = KLControllerState(jnp.float32(0.05))


@pytest.fixture(scope="module")
def optimizer():
    return make_optimizer(OptimizerConfig(learning_rate=1e-3, schedule="constant"), 100)


def hand_a2c_loss(model, params, batch):
    hidden = response_hidden(model, params.lm, batch.sequences, batch.sequence_mask, P)
    logits = response_logits(model, params.lm, hidden)
    logp = rl.token_logprobs(logits, batch.sequences[:, P:], T) * batch.response_mask
    values, _ = response_values(params.value_head, hidden)
    mask = batch.response_mask
    pg = rl.a2c_policy_loss(logp, batch.advantages, mask)
    vf = rl.a2c_value_loss(values, batch.returns, mask)
    entropy = rl.masked_mean(rl.entropy_from_logits(logits / T), mask)
    return pg + 0.5 * vf - 0.01 * entropy, (pg, vf)


def test_a2c_update_is_one_optax_step_and_skips_nan(tiny_model, tiny_params, other_params, optimizer,
                                                    make_rollout):
    policy = PolicyParams(tiny_params, init_reward_head(jax.random.key(7), 32))
    batch, _ = jax.jit(make_experience_fn(tiny_model, tiny_model, None, CFG))(
        policy, PolicyParams(other_params), None, make_rollout(0), SCORES, KL_STATE)
    state = create_rl_state(policy, optimizer, kl_controller(CFG).init())
    update = jax.jit(make_a2c_update(tiny_model, None, CFG, optimizer))
    new_state, metrics = update(state, batch, jax.random.key(0))

    @jax.jit
    def manual_step(params, opt_state):
        (_, (pg, vf)), grads = jax.value_and_grad(lambda p: hand_a2c_loss(tiny_model, p, batch),
                                                  has_aux=True)(params)
        updates, _ = optimizer.update(grads, opt_state, params)
        return jax.tree.map(jnp.add, params, updates), pg, vf

    expected, pg, vf = manual_step(state.policy.params, state.policy.opt_state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), new_state.policy.params, expected)
    assert float(metrics["loss/policy_avg"]) == pytest.approx(float(pg), abs=1e-6)
    assert float(metrics["loss/value_avg"]) == pytest.approx(float(vf), rel=1e-5)
    assert float(metrics["val/ratio_abs_dev_first_minibatch"]) <= 1e-6
    assert float(metrics["train/updates"]) == 1 and float(metrics["train/skipped_updates"]) == 0
    assert int(new_state.policy.step) == 1

    bad = batch._replace(returns=batch.returns.at[0, 0].set(jnp.inf))
    skipped, metrics = update(state, bad, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, skipped.policy, state.policy)
    assert float(metrics["train/skipped_updates"]) == 1 and float(metrics["train/updates"]) == 0


def test_a2c_with_a_separate_critic(tiny_model, tiny_params, other_params, optimizer, make_rollout):
    cfg = A2CConfig(temperature=T, critic="separate")
    critic = CriticParams(other_params, init_value_head(32))
    batch, _ = jax.jit(make_experience_fn(tiny_model, tiny_model, tiny_model, cfg))(
        PolicyParams(tiny_params), PolicyParams(tiny_params), critic, make_rollout(1), SCORES, KL_STATE)
    kl_state = kl_controller(cfg).init()
    state = create_rl_state(PolicyParams(tiny_params), optimizer, kl_state, critic, optimizer)
    new_state, metrics = jax.jit(make_a2c_update(tiny_model, tiny_model, cfg, optimizer, optimizer))(
        state, batch, jax.random.key(0))
    assert int(new_state.policy.step) == 1 and int(new_state.critic.step) == 1
    bias = new_state.critic.params.value_head["proj"]["bias"]
    assert float(bias[0]) == pytest.approx(1e-3, rel=1e-3)  # Adam's first step: lr·sign(−∂L/∂b)
    assert float(metrics["objective/kl_coef"]) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="critic"):
        make_a2c_update(tiny_model, None, cfg, optimizer)
