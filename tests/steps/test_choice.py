"""Traced hyper-parameters in the steps: ``choose`` with a Python bool traces one branch, with a traced flag
selects exactly; the experience's whitening, the KL controller and the optimiser's learning rate give the
same values traced (one vmapped program over both settings) as set statically."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.models.heads import init_value_head
from jaxrlhf.rl.kl_control import KLControllerState
from jaxrlhf.steps import OptimizerConfig, PolicyParams, PPOConfig, kl_controller, make_optimizer
from jaxrlhf.steps.choice import choose, is_static_flag
from jaxrlhf.steps.experience import make_experience_fn

SCORES = jnp.asarray([1.0, -0.5, 2.0, 0.25], jnp.float32)


def test_choose_static_traces_one_branch_and_traced_selects():
    calls = []

    def branch(name, value):
        def f():
            calls.append(name)
            return value
        return f

    assert choose(True, branch("a", 1.0), branch("b", 2.0)) == 1.0 and calls == ["a"]
    assert choose(0, branch("a", 1.0), branch("b", 2.0)) == 2.0 and calls == ["a", "b"]
    assert is_static_flag(True) and is_static_flag(1.0) and not is_static_flag(jnp.float32(1.0))
    picked = jax.jit(jax.vmap(lambda f: choose(f, lambda: {"x": jnp.float32(1.5)}, lambda: {"x": -f})))(
        jnp.asarray([1.0, 0.0, 1.0]))
    np.testing.assert_array_equal(picked["x"], [1.5, -0.0, 1.5])


def test_traced_whitening_equals_static(tiny_model, tiny_params, other_params, make_rollout):
    rollout = make_rollout()
    policy = PolicyParams(tiny_params, init_value_head(32))
    kl = KLControllerState(jnp.float32(0.1))
    base = PPOConfig(kl_coef=0.1, temperature=0.7)

    def run(whiten_advantages, whiten_rewards):
        cfg = dataclasses.replace(base, whiten_advantages=whiten_advantages, whiten_rewards=whiten_rewards)
        experience = make_experience_fn(tiny_model, tiny_model, None, cfg)
        return experience(policy, PolicyParams(other_params), None, rollout, SCORES, kl)[0]

    flags = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    traced = jax.jit(jax.vmap(lambda f: run(f[0], f[1])))(flags)
    for i, (adv, rew) in enumerate([(True, False), (False, True), (False, False)]):
        static = jax.jit(lambda adv=adv, rew=rew: run(adv, rew))()
        np.testing.assert_allclose(traced.advantages[i], static.advantages, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(traced.returns[i], static.returns, rtol=1e-6, atol=1e-6)
    assert not np.allclose(traced.advantages[0], traced.advantages[2])  # the flag does something


@pytest.mark.parametrize("adaptive", [True, False])
def test_traced_adaptive_kl_equals_static(adaptive):
    cfg = PPOConfig(kl_coef=0.1, kl_target=1.0, kl_horizon=100)

    def beta_after(flag, observed):
        controller = kl_controller(dataclasses.replace(cfg, adaptive_kl=flag))
        return controller.update(controller.init(), observed, 64).kl_coef

    traced = jax.jit(beta_after)(jnp.float32(adaptive), jnp.float32(3.0))
    static = jax.jit(lambda observed: beta_after(adaptive, observed))(jnp.float32(3.0))
    assert float(traced) == float(static)
    assert (float(static) > 0.11) == adaptive  # KL above target: the adaptive β grows, the fixed one stays


def test_traced_learning_rate_equals_static():
    cfg = OptimizerConfig(learning_rate=1e-3, warmup_steps=2, schedule="cosine", end_lr_factor=0.1)
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
    grads = {"w": jnp.asarray([[0.3, -0.2, 0.1], [0.0, 0.5, -0.4]])}

    def updates(learning_rate):
        opt = make_optimizer(cfg, 10, learning_rate)
        state = opt.init(params)
        out = []
        for _ in range(3):
            u, state = opt.update(grads, state, params)
            out.append(u["w"])
        return jnp.stack(out)

    traced = jax.jit(jax.vmap(updates))(jnp.asarray([1e-3, 3e-3], jnp.float32))
    np.testing.assert_array_equal(traced[0], jax.jit(lambda: updates(None))())
    np.testing.assert_array_equal(traced[1], jax.jit(lambda: updates(3e-3))())
