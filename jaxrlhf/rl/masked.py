"""Masked statistics: sums, means, variances and whitening over the masked-in entries of an array.

A mask has the shape of the data; it may be bool, integer or float (a float mask acts as weights).
Masked-out entries never reach the arithmetic, so they may hold anything, even inf or nan.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

Axis = int | tuple[int, ...] | None


def _float(x: chex.Array) -> chex.Array:
    """Bool and integer data are averaged as float32; float data keeps at least float32 precision."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _weights(mask: chex.Array, dtype) -> chex.Array:
    return jnp.asarray(mask).astype(dtype)


def _safe_divide(num: chex.Array, den: chex.Array) -> chex.Array:
    """num / den, and 0 where den == 0 (with no nan in either value or gradient)."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), 0)


def masked_sum(x: chex.Array, mask: chex.Array, axis: Axis = None) -> chex.Array:
    """Σ_i m_i·x_i over the masked-in entries (along `axis`, or over everything)."""
    x = _float(x)
    chex.assert_equal_shape([x, mask])
    m = _weights(mask, x.dtype)
    return jnp.sum(jnp.where(m != 0, x * m, 0), axis=axis)


def masked_count(mask: chex.Array, axis: Axis = None) -> chex.Array:
    """Σ_i m_i: the number of masked-in entries (their total weight for a float mask), as float32."""
    return jnp.sum(_weights(mask, jnp.float32), axis=axis)


def masked_mean(x: chex.Array, mask: chex.Array, axis: Axis = None) -> chex.Array:
    """Σ m_i·x_i / Σ m_i. Returns 0 where the mask is empty (so an empty batch gives a zero loss)."""
    x = _float(x)
    return _safe_divide(masked_sum(x, mask, axis), jnp.sum(_weights(mask, x.dtype), axis=axis))


def masked_var(x: chex.Array, mask: chex.Array, unbiased: bool = True, axis: Axis = None) -> chex.Array:
    """Var = Σ m_i·(x_i − x̄)² / Σ m_i, times n/(n − 1) when `unbiased` (Bessel).

    n = Σ m_i. With n ≤ 1 the Bessel factor is skipped (the biased value, 0 for one entry, is returned);
    an empty mask gives 0.
    """
    x = _float(x)
    mean = masked_mean(x, mask, axis)
    if axis is not None:
        mean = jnp.expand_dims(mean, axis)
    var = masked_mean(jnp.square(x - mean), mask, axis)
    if unbiased:
        n = jnp.sum(_weights(mask, x.dtype), axis=axis)
        var = jnp.where(n > 1, var * n / jnp.where(n > 1, n - 1, 1), var)
    return var


def masked_whiten(x: chex.Array, mask: chex.Array, shift_mean: bool = True, eps: float = 1e-8) -> chex.Array:
    """(x − x̄)/√(Var + eps) over the masked-in entries (unbiased Var, as TRL); masked-out entries are 0.

    With `shift_mean=False` the mean is added back: x̄ + (x − x̄)/√(Var + eps) (rescale only).
    """
    x = _float(x)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) / jnp.sqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(_weights(mask, x.dtype) != 0, whitened, 0)


def explained_variance(pred: chex.Array, target: chex.Array, mask: chex.Array) -> chex.Array:
    """1 − Var[target − pred] / Var[target] over the masked-in entries.

    When Var[target] == 0 the ratio is undefined; then 1.0 is returned if Var[target − pred] == 0 too
    (a perfect prediction) and 0.0 otherwise (scikit-learn's `force_finite` convention), never nan.
    """
    pred, target = _float(pred), _float(target)
    chex.assert_equal_shape([pred, target, mask])
    var_target = masked_var(target, mask, unbiased=False)
    var_residual = masked_var(target - pred, mask, unbiased=False)
    ratio = _safe_divide(var_residual, var_target)
    return jnp.where(var_target > 0, 1 - ratio, jnp.where(var_residual > 0, 0.0, 1.0).astype(ratio.dtype))
