"""Masked statistics against NumPy on the masked-in entries, plus hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.rl.masked import (
    explained_variance,
    masked_count,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)


def random_batch(seed=0, shape=(4, 9)):
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 3.0, shape).astype(np.float32)
    mask = rng.random(shape) < 0.6
    mask[0, :2] = True  # at least two entries in, so the unbiased variance is defined
    return x, mask


def test_hand_case(maybe_jit):
    x = jnp.array([1.0, 2.0, 3.0, 100.0])
    mask = jnp.array([1, 1, 1, 0])
    # in: 1, 2, 3 → sum 6, mean 2, Σ(x − 2)² = 2, biased var 2/3, unbiased var 1
    assert maybe_jit(masked_sum)(x, mask) == pytest.approx(6.0)
    assert maybe_jit(masked_mean)(x, mask) == pytest.approx(2.0)
    assert maybe_jit(masked_var)(x, mask) == pytest.approx(1.0)
    assert maybe_jit(masked_var, static_argnames="unbiased")(x, mask, unbiased=False) == pytest.approx(2 / 3)
    assert masked_count(mask) == 3


def test_against_numpy(maybe_jit):
    x, mask = random_batch()
    xin = x[mask]
    np.testing.assert_allclose(maybe_jit(masked_sum)(x, mask), xin.sum(), rtol=1e-5)
    np.testing.assert_allclose(maybe_jit(masked_mean)(x, mask), xin.mean(), rtol=1e-5)
    np.testing.assert_allclose(maybe_jit(masked_var)(x, mask), xin.var(ddof=1), rtol=1e-5)
    rows = [x[b][mask[b]] for b in range(x.shape[0])]
    mean_rows = maybe_jit(masked_mean, static_argnames="axis")(x, mask, axis=1)
    np.testing.assert_allclose(mean_rows, [r.mean() if r.size else 0.0 for r in rows], rtol=1e-5)
    var_rows = masked_var(x, mask, unbiased=False, axis=1)
    np.testing.assert_allclose(var_rows, [r.var() if r.size else 0.0 for r in rows], rtol=1e-5, atol=1e-6)


def test_float_mask_is_a_weight_and_masked_out_garbage_is_ignored():
    x = jnp.array([1.0, 3.0, jnp.nan, jnp.inf])
    weights = jnp.array([1.0, 3.0, 0.0, 0.0])
    # (1·1 + 3·3) / (1 + 3) = 2.5
    assert masked_mean(x, weights) == pytest.approx(2.5)
    assert jnp.isfinite(masked_var(x, weights))
    grad = jax.grad(lambda v: masked_mean(v, weights))(jnp.array([1.0, 3.0, 5.0, 7.0]))
    np.testing.assert_allclose(grad, [0.25, 0.75, 0.0, 0.0])


def test_empty_and_single_entry_masks():
    x = jnp.arange(4.0)
    empty = jnp.zeros(4, bool)
    assert masked_mean(x, empty) == 0.0
    assert masked_var(x, empty) == 0.0
    assert jnp.all(masked_whiten(x, empty) == 0.0)
    one = jnp.array([False, True, False, False])
    assert masked_var(x, one) == 0.0  # the Bessel factor is skipped for n = 1
    assert jnp.isfinite(jax.grad(lambda v: masked_mean(v, empty))(x)).all()


def test_whiten(maybe_jit):
    x, mask = random_batch(seed=1)
    white = np.asarray(maybe_jit(masked_whiten)(x, mask))
    assert np.all(white[~mask] == 0.0)
    assert white[mask].mean() == pytest.approx(0.0, abs=1e-5)
    assert white[mask].std(ddof=1) == pytest.approx(1.0, abs=1e-4)
    rescaled = np.asarray(maybe_jit(masked_whiten, static_argnames="shift_mean")(x, mask, shift_mean=False))
    assert rescaled[mask].mean() == pytest.approx(x[mask].mean(), rel=1e-4)
    assert rescaled[mask].std(ddof=1) == pytest.approx(1.0, abs=1e-4)


def test_explained_variance(maybe_jit):
    rng = np.random.default_rng(2)
    target = rng.normal(size=(3, 8)).astype(np.float32)
    pred = (target + 0.3 * rng.normal(size=target.shape)).astype(np.float32)
    mask = rng.random(target.shape) < 0.7
    expected = 1 - np.var(target[mask] - pred[mask]) / np.var(target[mask])
    np.testing.assert_allclose(maybe_jit(explained_variance)(pred, target, mask), expected, rtol=1e-5)
    assert explained_variance(target, target, mask) == pytest.approx(1.0)
    # constant target: 1 for a perfect prediction, 0 otherwise, never nan
    const = jnp.full((5,), 2.0)
    full = jnp.ones(5, bool)
    assert explained_variance(const, const, full) == 1.0
    assert explained_variance(jnp.arange(5.0), const, full) == 0.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(AssertionError, match="shape"):
        masked_mean(jnp.zeros((2, 3)), jnp.ones((2, 4)))
