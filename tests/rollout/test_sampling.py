"""Sampling transforms: temperature statistics, top-k / top-p exclusion, greedy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.rollout.sampling import SamplingConfig, sample_tokens, top_k_filter, top_p_filter

LOGITS = jnp.asarray([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5], jnp.float32)


def draw(config: SamplingConfig, n: int = 20000, key: int = 0) -> np.ndarray:
    logits = jnp.broadcast_to(LOGITS, (n, LOGITS.shape[0]))
    return np.asarray(jax.jit(sample_tokens, static_argnums=2)(jax.random.key(key), logits, config))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_empirical_distribution_matches_softmax(temperature):
    n = 20000
    counts = np.bincount(draw(SamplingConfig(temperature=temperature), n), minlength=8)
    p = np.asarray(jax.nn.softmax(LOGITS / temperature))
    # Each frequency within 4 binomial standard errors (tolerance test; the chi-square version is in
    # test_generate.py, through the whole model).
    se = np.sqrt(p * (1 - p) / n)
    np.testing.assert_array_less(np.abs(counts / n - p), 4 * se + 1e-4)


def test_top_k_never_emits_excluded_tokens():
    samples = draw(SamplingConfig(temperature=3.0, top_k=3))
    assert set(np.unique(samples)) == {0, 1, 7}  # the three largest logits


def test_top_p_never_emits_excluded_tokens():
    # Sorted probabilities at T=1: 0.37 (tok 0), 0.22 (tok 7), 0.14 (tok 1), 0.08 (tok 2), ...
    p = np.asarray(jax.nn.softmax(LOGITS))
    order = np.argsort(-p)
    mass_before = np.cumsum(p[order]) - p[order]
    allowed = set(order[mass_before < 0.7].tolist())
    samples = draw(SamplingConfig(top_p=0.7))
    assert set(np.unique(samples)) == allowed
    # Renormalised frequencies of the kept tokens.
    kept = np.array(sorted(allowed))
    q = p[kept] / p[kept].sum()
    freq = np.bincount(samples, minlength=8)[kept] / samples.size
    np.testing.assert_allclose(freq, q, atol=0.02)


def test_filters_by_hand():
    x = jnp.asarray([[1.0, 3.0, 2.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(top_k_filter(x, 2)), [[-np.inf, 3.0, 2.0, -np.inf]])
    # softmax([3,2,1,0]) = [0.644, 0.237, 0.087, 0.032]: p=0.6 keeps only the top token, p=0.9 keeps three.
    np.testing.assert_array_equal(np.asarray(top_p_filter(x, 0.6)), [[-np.inf, 3.0, -np.inf, -np.inf]])
    np.testing.assert_array_equal(np.asarray(top_p_filter(x, 0.9)), [[1.0, 3.0, 2.0, -np.inf]])
    np.testing.assert_array_equal(np.asarray(top_k_filter(x, 0)), np.asarray(x))


def test_greedy_takes_the_argmax_and_configs_validate():
    assert set(np.unique(draw(SamplingConfig(greedy=True), n=10))) == {0}
    for bad in (dict(temperature=0.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_multi_block_sampling_matches_softmax_and_never_picks_excluded_tokens():
    """V = 300 spans three 128-token blocks (the last one padded): frequencies match softmax within 4
    standard errors, and −inf tokens (here every other token) are never drawn."""
    v, n = 300, 40000
    logits = jax.random.normal(jax.random.key(0), (v,)) * 1.5
    logits = jnp.where(jnp.arange(v) % 2 == 0, logits, -jnp.inf)
    from jaxrlhf.rollout.sampling import inverse_cdf_sample

    samples = np.asarray(jax.jit(inverse_cdf_sample)(jax.random.key(1), jnp.broadcast_to(logits, (n, v))))
    counts = np.bincount(samples, minlength=v)
    assert counts[1::2].sum() == 0
    p = np.asarray(jax.nn.softmax(logits))
    se = np.sqrt(p * (1 - p) / n)
    np.testing.assert_array_less(np.abs(counts / n - p), 4 * se + 1e-4)


@pytest.mark.parametrize("jit", [False, True])
def test_top_p_keeps_only_as_many_tied_tokens_as_its_mass_needs(jit):
    """Of tokens tied at the cut, only the smallest prefix's count is kept (the lowest ids): every tied
    token used to be kept, so 1000 equal logits at p = 0.1 kept all 1000 and top-p did nothing."""
    f = jax.jit(top_p_filter, static_argnums=1) if jit else top_p_filter
    kept = lambda logits, p: np.flatnonzero(np.isfinite(np.asarray(f(jnp.log(jnp.asarray([logits])), p))[0]))
    assert kept([0.5, 0.25, 0.25], 0.75).tolist() == [0, 1]  # 0.5 before the third: 0.75 is not < 0.75
    assert kept([0.4, 0.2, 0.2, 0.2], 0.5).tolist() == [0, 1]
    assert kept([0.2, 0.4, 0.2, 0.2], 0.5).tolist() == [0, 1]  # the most likely first, then ties by id
    assert kept([0.25] * 4, 0.5).tolist() == [0, 1]
    assert 99 <= len(kept([1e-3] * 1000, 0.1)) <= 101  # mass 0.1 reached at the 100th (± rounding)


def test_a_small_temperature_samples_the_argmax_with_finite_log_probs():
    """At T = 1e-3 (the smallest allowed) logits of size 10 become 1e4 apart, where XLA's fused division
    used to round the row maximum differently from the rest: the sampler's weights overflowed and every row
    drew token 0. With the maximum taken off before dividing, every row draws the arg-max."""
    from jaxrlhf.rl.policy_losses import token_logprobs
    from jaxrlhf.rollout.sampling import MIN_TEMPERATURE, sampling_logits

    config = SamplingConfig(temperature=MIN_TEMPERATURE)
    logits = jax.random.normal(jax.random.key(1), (64, 300)) * 10.0
    tokens = jax.jit(sample_tokens, static_argnums=2)(jax.random.key(0), logits, config)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(jnp.argmax(logits, -1)))
    filtered = jax.jit(sampling_logits, static_argnums=1)(logits, config)
    assert np.all(np.asarray(jnp.max(filtered, -1)) == 0.0)
    lp = jax.jit(token_logprobs)(logits, tokens, MIN_TEMPERATURE)
    assert np.all(np.isfinite(np.asarray(lp))) and float(jnp.min(lp)) > -1e-3
    for bad in (1e-4, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0\.001"):
            SamplingConfig(temperature=bad)
    with pytest.raises(ValueError, match=r"top_k must be a whole number >= 0"):
        SamplingConfig(top_k=2.5)
