"""ILQL pieces (expectile, one-step targets, TD, conservative term, Polyak averaging, the whole loss):
NumPy references, hand cases, masks, and where the gradients go."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.rl.ilql import (
    conservative_q_loss,
    expectile_loss,
    gather_actions,
    ilql_loss,
    polyak_update,
    q_learning_targets,
    td_loss,
)


def test_expectile_hand_case(maybe_jit):
    # u = [1, −2, pad], τ = 0.7: (0.7·1 + 0.3·4)/2 = 0.95
    u, mask = jnp.array([1.0, -2.0, 5.0]), jnp.array([1, 1, 0])
    assert maybe_jit(expectile_loss)(u, mask, 0.7) == pytest.approx(0.95)
    assert expectile_loss(u, mask, 0.5) == pytest.approx(0.5 * (1 + 4) / 2)  # ½·mean squared error


def test_expectile_against_numpy(maybe_jit):
    rng = np.random.default_rng(0)
    u = rng.normal(size=(3, 7)).astype(np.float32)
    mask = rng.random((3, 7)) < 0.6
    for tau in (0.5, 0.7, 0.9):
        expected = (np.abs(tau - (u < 0)) * u**2)[mask].mean()
        np.testing.assert_allclose(maybe_jit(expectile_loss)(u, mask, tau), expected, rtol=1e-5)


def numpy_expectile(y, tau):
    """Root of Σ|τ − 1(y < v)|·(y − v) = 0 by bisection."""
    lo, hi = y.min(), y.max()
    for _ in range(100):
        v = 0.5 * (lo + hi)
        g = np.sum(np.abs(tau - (y < v)) * (y - v))
        lo, hi = (v, hi) if g > 0 else (lo, v)
    return v


def test_expectile_loss_is_minimised_at_the_expectile():
    y = np.random.default_rng(1).exponential(size=400).astype(np.float32)
    mask = np.ones_like(y)
    grad = jax.jit(jax.grad(lambda v, tau: expectile_loss(y - v, mask, tau)))
    for tau in (0.5, 0.7, 0.9):
        v = np.float32(numpy_expectile(y.astype(np.float64), tau))
        assert abs(float(grad(v, tau))) < 1e-4
        assert float(grad(v - 0.05, tau)) < 0 < float(grad(v + 0.05, tau))
    assert numpy_expectile(y, 0.5) == pytest.approx(y.mean(), rel=1e-5)
    assert numpy_expectile(y, 0.9) > numpy_expectile(y, 0.7) > y.mean()  # τ → 1 leans to the max


def reference_targets(rewards, values, lengths, gamma):
    out = np.zeros_like(rewards, dtype=np.float64)
    for b, length in enumerate(lengths):
        for t in range(length):
            next_value = values[b, t + 1] if t + 1 < length else 0.0
            out[b, t] = rewards[b, t] + gamma * next_value
    return out


def test_q_learning_targets(maybe_jit):
    # r = [0, 0, 1, pad], V = [0.5, 0.6, 0.7, 9], γ = 0.9 → [0.9·0.6, 0.9·0.7, 1 + 0 (terminal), 0]
    r, v, m = jnp.array([0.0, 0.0, 1.0, 4.0]), jnp.array([0.5, 0.6, 0.7, 9.0]), jnp.array([1, 1, 1, 0])
    np.testing.assert_allclose(maybe_jit(q_learning_targets)(r, v, m, 0.9), [0.54, 0.63, 1.0, 0.0], rtol=1e-6)
    rng = np.random.default_rng(2)
    lengths = np.array([6, 0, 1, 3])
    mask = np.arange(6)[None] < lengths[:, None]
    rewards, values = (rng.normal(size=(4, 6)).astype(np.float32) for _ in range(2))
    got = maybe_jit(q_learning_targets)(rewards, values, mask, 0.95)
    np.testing.assert_allclose(got, reference_targets(rewards, values, lengths, 0.95), rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda v: q_learning_targets(rewards, v, mask).sum())(values)
    np.testing.assert_array_equal(grad, np.zeros_like(values))  # V is held constant in the target


def test_td_and_conservative_losses(maybe_jit):
    rng = np.random.default_rng(3)
    q = rng.normal(size=(2, 5, 7)).astype(np.float32)
    actions = rng.integers(0, 7, size=(2, 5)).astype(np.int32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    targets = rng.normal(size=(2, 5)).astype(np.float32)
    q_taken = np.take_along_axis(q, actions[..., None], -1)[..., 0]
    np.testing.assert_array_equal(maybe_jit(gather_actions)(q, actions), q_taken)
    np.testing.assert_allclose(maybe_jit(td_loss)(q_taken, targets, mask),
                               ((q_taken - targets) ** 2)[mask].mean(), rtol=1e-5)
    lse = np.log(np.exp(q.astype(np.float64)).sum(-1))
    cql = maybe_jit(conservative_q_loss)(q, actions, mask)
    np.testing.assert_allclose(cql, (lse - q_taken)[mask].mean(), rtol=1e-5)
    assert cql > 0
    g_q, g_t = jax.grad(td_loss, argnums=(0, 1))(jnp.asarray(q_taken), jnp.asarray(targets), mask)
    np.testing.assert_allclose(g_q, 2 * (q_taken - targets) * mask / mask.sum(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(g_t, np.zeros_like(targets))
    # ∂CQL/∂Q = (softmax(Q) − onehot(a))·m/n
    g = jax.grad(conservative_q_loss)(jnp.asarray(q), actions, mask)
    soft = np.exp(q - lse[..., None])
    expected = (soft - np.eye(7)[actions]) * mask[..., None] / mask.sum()
    np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-6)


def test_polyak_update(maybe_jit):
    target = {"w": jnp.array([0.0, 1.0]), "b": jnp.array(2.0, jnp.bfloat16)}
    online = {"w": jnp.array([1.0, 3.0]), "b": jnp.array(4.0, jnp.bfloat16)}
    new = maybe_jit(polyak_update)(target, online, 0.25)
    np.testing.assert_allclose(new["w"], [0.25, 1.5])
    assert new["b"].dtype == jnp.bfloat16 and float(new["b"]) == 2.5
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), polyak_update(target, online, 1.0),
                                     online))
    np.testing.assert_array_equal(polyak_update(target, online, 0.0)["w"], target["w"])


def reference_ilql(qs, target_qs, values, actions, rewards, lengths, gamma, tau, alpha):
    mask = np.arange(values.shape[1])[None] < lengths[:, None]
    y = reference_targets(rewards, values, lengths, gamma)

    def taken(q):
        return np.take_along_axis(q, actions[..., None], -1)[..., 0].astype(np.float64)

    td = sum(((taken(q) - y) ** 2)[mask].mean() for q in qs)
    q_hat = np.minimum(*[taken(q) for q in target_qs])
    u = q_hat - values
    v = (np.abs(tau - (u < 0)) * u**2)[mask].mean()
    cql = sum((np.log(np.exp(q.astype(np.float64)).sum(-1)) - taken(q))[mask].mean() for q in qs)
    return td + v + alpha * cql, td, v, cql


def test_ilql_loss_against_numpy_and_gradients(maybe_jit):
    rng = np.random.default_rng(4)
    batch, time, vocab = 3, 5, 6
    lengths = np.array([5, 2, 3])
    mask = np.arange(time)[None] < lengths[:, None]
    qs = [rng.normal(size=(batch, time, vocab)).astype(np.float32) for _ in range(2)]
    target_qs = [rng.normal(size=(batch, time, vocab)).astype(np.float32) for _ in range(2)]
    values = rng.normal(size=(batch, time)).astype(np.float32)
    actions = rng.integers(0, vocab, size=(batch, time)).astype(np.int32)
    rewards = np.zeros((batch, time), np.float32)
    rewards[np.arange(batch), lengths - 1] = rng.normal(size=batch)  # the score at the last token
    loss, metrics = maybe_jit(ilql_loss)(qs, target_qs, values, actions, rewards, mask,
                                         gamma=0.9, expectile=0.8, cql_weight=0.1)
    ref, td, v, cql = reference_ilql(qs, target_qs, values, actions, rewards, lengths, 0.9, 0.8, 0.1)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose([metrics["td_loss"], metrics["v_loss"], metrics["cql_loss"]], [td, v, cql],
                               rtol=1e-5)

    def total(qs, target_qs, values):
        return ilql_loss(qs, target_qs, values, actions, rewards, mask, gamma=0.9, expectile=0.8)[0]

    g_qs, g_target, g_values = jax.jit(jax.grad(total, argnums=(0, 1, 2)))(qs, target_qs, values)
    assert all(float(jnp.abs(g).sum()) == 0.0 for g in g_target)  # targets are held constant
    assert all(float(jnp.abs(g).sum()) > 0 for g in g_qs)
    for g in g_qs:  # padding gets no gradient
        assert float(jnp.abs(g[~mask]).sum()) == 0.0
    # V's gradient is the expectile term's alone (it is held constant in the TD targets)
    g_expectile = jax.grad(lambda v: expectile_loss(
        jnp.minimum(*[gather_actions(q, actions) for q in target_qs]) - v, mask, 0.8))(values)
    np.testing.assert_allclose(g_values, g_expectile, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="same number"):
        ilql_loss(qs, target_qs[:1], values, actions, rewards, mask)
