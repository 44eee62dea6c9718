"""Best-of-n sampling: its KL from the base policy, and an unbiased estimate of its gold reward.

The estimators take NumPy arrays (and return NumPy, float64) or JAX arrays (and return JAX, jittable
with a traced n), so evaluation scripts can use them on the host without touching a device.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np


def _uses_jax(*xs) -> bool:
    return any(isinstance(x, jax.Array) for x in xs)


def best_of_n_kl(n: chex.Numeric) -> chex.Numeric:
    """KL(best-of-n ‖ base) ≤ log n − (n − 1)/n (Stiennon et al. 2020; exact for continuous rewards
    without ties)."""
    xp = jnp if _uses_jax(n) else np
    n = xp.asarray(n, dtype=xp.float32 if xp is jnp else xp.float64)
    return xp.log(n) - (n - 1) / n


def best_of_n_weights(num_samples: int, n: chex.Numeric, xp=np) -> chex.Array:
    """Weights w_i = C(i − 1, n − 1)/C(N, n) for the i-th smallest proxy score (i = 1..N; 0 for i < n):
    the probability that the i-th smallest of N is the best of a uniformly random n-subset.

    Computed in log space from the top down, log w_N = log(n/N) and w_{i−1}/w_i = (i − n)/(i − 1), so
    that the weights that matter are sums of few small logs: N = 1000, n = 64 is accurate to ~1e-5 in
    float32 (log-gamma differences of numbers near 6000 would lose 1e-3). `n` may be an array: the
    weights then have shape n.shape + [N].
    """
    dtype = jnp.float32 if xp is jnp else np.float64
    n = xp.asarray(n, dtype)[..., None]
    j = xp.arange(1, num_samples + 1, dtype=dtype)
    # log(w_{j−1}/w_j) = log1p(−(n − 1)/(j − 1)); −inf where the weight below j is 0 (j ≤ n).
    above_n = j > n
    log_step_j = xp.where(above_n, xp.log1p(xp.where(above_n, -(n - 1) / xp.maximum(j - 1, 1), 0)), -xp.inf)
    tail_sums = xp.flip(xp.cumsum(xp.flip(log_step_j, -1), axis=-1), -1)  # Σ_{j' ≥ j} log_step_j'
    above_i = xp.concatenate([tail_sums[..., 1:], xp.zeros_like(tail_sums[..., :1])], axis=-1)
    log_w = xp.log(n / num_samples) + above_i
    return xp.where(j >= n, xp.exp(log_w), 0.0)


def _sorted_gold(proxy: chex.Array, gold: chex.Array, xp) -> chex.Array:
    if proxy.ndim != 1 or proxy.shape != gold.shape:
        raise ValueError(
            f"best_of_n: proxy and gold must both be [N]; got shapes {proxy.shape} and {gold.shape}"
        )
    order = xp.argsort(proxy, stable=True)
    return gold[order]


def _check_n(n, num_samples: int) -> None:
    try:
        concrete = np.asarray(n)
    except jax.errors.TracerArrayConversionError:
        return  # a traced n cannot be checked here
    if np.any(concrete < 1) or np.any(concrete > num_samples):
        raise ValueError(f"best_of_n: need 1 ≤ n ≤ N = {num_samples} samples; got n = {concrete}")


def best_of_n_estimate(proxy: chex.Array, gold: chex.Array, n: chex.Numeric) -> chex.Array:
    """Unbiased estimate of E[gold of the best-by-proxy of n samples] from N ≥ n samples [N]:

    sort by proxy ascending; E_n = Σ_{i=n}^{N} C(i − 1, n − 1)/C(N, n)·gold_(i).
    n = 1 gives mean(gold); n = N gives the gold of the highest proxy. Ties in proxy are broken by
    position (a later sample ranks higher). An array n gives one estimate per entry.
    """
    xp = jnp if _uses_jax(proxy, gold, n) else np
    proxy, gold = xp.asarray(proxy), xp.asarray(gold)
    gold_sorted = _sorted_gold(proxy, gold, xp)
    _check_n(n, gold.shape[0])
    weights = best_of_n_weights(gold.shape[0], n, xp)
    return weights @ gold_sorted.astype(weights.dtype)


def best_of_n_curve(proxy: chex.Array, gold: chex.Array, ns: chex.Array) -> chex.Array:
    """`best_of_n_estimate` for each n in `ns` [M] → [M]."""
    xp = jnp if _uses_jax(proxy, gold, ns) else np
    proxy, gold, ns = xp.asarray(proxy), xp.asarray(gold), xp.asarray(ns)
    gold_sorted = _sorted_gold(proxy, gold, xp)
    _check_n(ns, gold.shape[0])
    weights = best_of_n_weights(gold.shape[0], ns, xp)  # [M, N]
    return weights @ gold_sorted.astype(weights.dtype)
