"""KL controllers: fixed stays put; adaptive matches a hand-iterated Python loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.rl.kl_control import KLControllerState, adaptive_kl_controller, fixed_kl_controller


def test_fixed():
    controller = fixed_kl_controller(0.05)
    state = controller.init()
    assert isinstance(state, KLControllerState)
    state = jax.jit(controller.update)(state, jnp.float32(100.0), jnp.float32(64))
    assert state.kl_coef == pytest.approx(0.05)


def test_adaptive_hand_case():
    # β = 0.2, KL 9, target 6 → e = clip(0.5, −0.2, 0.2) = 0.2; n = 100, horizon 1000 → β·(1 + 0.02) = 0.204
    controller = adaptive_kl_controller(0.2, target=6.0, horizon=1000)
    state = controller.update(controller.init(), 9.0, 100)
    assert state.kl_coef == pytest.approx(0.204, rel=1e-6)
    # KL 5.4 → e = −0.1 → 0.204·(1 − 0.01)
    state = controller.update(state, 5.4, 100)
    assert state.kl_coef == pytest.approx(0.204 * 0.99, rel=1e-6)


def test_adaptive_matches_python_loop(maybe_jit):
    kls = np.array([0.5, 3.0, 6.0, 7.0, 12.0, 20.0, 1.0, 6.5], np.float32)
    n_steps = 64
    beta = 0.2
    expected = []
    for kl in kls:
        error = min(max((kl - 6.0) / 6.0, -0.2), 0.2)
        beta = beta * (1 + error * n_steps / 10_000)
        expected.append(beta)
    controller = adaptive_kl_controller()

    def run(kls):
        def step(state, kl):
            state = controller.update(state, kl, n_steps)
            return state, state.kl_coef

        return jax.lax.scan(step, controller.init(), kls)[1]

    np.testing.assert_allclose(maybe_jit(run)(jnp.asarray(kls)), expected, rtol=1e-6)


def test_vmap_over_target():
    def one(target):
        controller = adaptive_kl_controller(0.1, target=target, horizon=100)
        return controller.update(controller.init(), 4.0, 10).kl_coef

    # targets 2, 4, 8 → e = 0.2 (clipped), 0, −0.2 (clipped: −0.5) → β·(1 + e·0.1)
    np.testing.assert_allclose(jax.vmap(one)(jnp.array([2.0, 4.0, 8.0])), [0.102, 0.1, 0.098], rtol=1e-6)
