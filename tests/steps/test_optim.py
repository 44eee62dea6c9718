"""Learning-rate schedules against closed forms, the readable lr, and clipping + AdamW's first step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf.config import load_config
from jaxrlhf.steps.optim import OptimizerConfig, current_learning_rate, learning_rate_at, make_optimizer

WITH_AND_WITHOUT_JIT = pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])


def expected_lr(schedule, step, peak=1.0, warmup=4, total=14, end=0.1):
    if step < warmup:
        return peak * step / warmup
    p = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
    if schedule == "linear":
        return peak * (1 - (1 - end) * p)
    if schedule == "cosine":
        return peak * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * p)))
    return peak


@WITH_AND_WITHOUT_JIT
@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedule_matches_closed_form(schedule, transform):
    cfg = OptimizerConfig(learning_rate=1.0, schedule=schedule, warmup_steps=4, end_lr_factor=0.1)
    lr = transform(lambda s: learning_rate_at(cfg, 14, s))
    steps = [0, 1, 3, 4, 5, 9, 13, 14, 20]
    got = [float(lr(jnp.int32(s))) for s in steps]
    np.testing.assert_allclose(got, [expected_lr(schedule, s) for s in steps], rtol=1e-6, atol=1e-7)
    assert got[0] == 0.0 and got[3] == pytest.approx(1.0)  # warm-up starts at 0 and reaches the peak


def test_lr_readable_from_state_is_the_one_used():
    cfg = OptimizerConfig(learning_rate=0.5, warmup_steps=2, end_lr_factor=0.0)
    opt = make_optimizer(cfg, total_steps=6)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    assert float(current_learning_rate(state)) == 0.0  # what the first update will use
    for step in range(5):
        _, state = opt.update({"w": jnp.ones(3)}, state, params)
        expected = expected_lr("linear", step, 0.5, 2, 6, 0.0)
        assert float(current_learning_rate(state)) == pytest.approx(expected)
    assert math.isnan(float(current_learning_rate(optax.sgd(0.1).init(params))))


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_first_update_is_clipped_adam(max_grad_norm):
    # eps = 1 makes the first Adam step −lr·g/(|g| + 1) depend on |g|, so clipping is visible.
    cfg = OptimizerConfig(learning_rate=0.1, schedule="constant", eps=1.0, max_grad_norm=max_grad_norm)
    opt = make_optimizer(cfg, total_steps=10)
    params = {"w": jnp.zeros(2)}
    grads = {"w": jnp.array([3.0, 4.0])}  # norm 5
    updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    g = np.array([3.0, 4.0]) * (1 / 5 if max_grad_norm else 1.0)
    np.testing.assert_allclose(updates["w"], -0.1 * g / (np.abs(g) + 1.0), rtol=1e-5)


def test_weight_decay_and_config_loading():
    cfg = load_config(OptimizerConfig, overrides=["learning_rate=0.1", "schedule=constant",
                                                  "weight_decay=0.5", "max_grad_norm=null"])
    opt = make_optimizer(cfg, 10)
    params = {"w": jnp.array([2.0])}
    updates, _ = opt.update({"w": jnp.zeros(1)}, opt.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.1 * 0.5 * 2.0], rtol=1e-6)  # decoupled decay only
    with pytest.raises(ValueError, match="schedule"):
        OptimizerConfig(schedule="step")
    with pytest.raises(ValueError, match="total_steps"):
        make_optimizer(cfg, 0)
