"""Value-guided decoding: the tilted distribution against its analytic formula (exactly and by a χ² test
on samples), its exact KL to the base policy, and blockwise controlled-decoding selection."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chi2 as chi2_dist

from jaxrlhf.rl.policy_losses import token_logprobs
from jaxrlhf.rl.value_guidance import (
    blockwise_value_probs,
    blockwise_value_select,
    categorical_kl,
    value_guided_kl,
    value_guided_logits,
)

BASE = np.array([1.0, 0.2, -0.5, 0.0, 2.0, -1.5], np.float32)
Q = np.array([0.3, 1.5, -0.2, 0.8, -1.0, 2.0], np.float32)


def tilted(base_logits, q, beta):
    """π_base·exp(β·Q)/Z in float64."""
    w = np.exp(base_logits.astype(np.float64) - base_logits.max()) * np.exp(beta * q.astype(np.float64))
    return w / w.sum(-1, keepdims=True)


def chi_square_ok(counts, probs):
    expected = probs * counts.sum()
    stat = float(((counts - expected) ** 2 / expected).sum())
    return stat < chi2_dist.ppf(0.999, len(probs) - 1), stat


def test_tilted_distribution_matches_formula(maybe_jit):
    guided = maybe_jit(value_guided_logits)
    for beta in (0.0, 0.5, 2.0):
        logp = guided(BASE, Q, beta)
        np.testing.assert_allclose(np.exp(logp), tilted(BASE, Q, beta), rtol=1e-5, atol=1e-7)
        assert float(jax.nn.logsumexp(logp)) == pytest.approx(0.0, abs=1e-6)  # normalised
    # V(s) cancels: Q − V gives the same distribution; batched states work too
    np.testing.assert_allclose(guided(BASE, Q - 3.7, 1.3), guided(BASE, Q, 1.3), atol=1e-6)
    batch_base = np.stack([BASE, BASE[::-1]])
    batch_q = np.stack([Q, -Q])
    np.testing.assert_allclose(np.exp(guided(batch_base, batch_q, 0.7)), tilted(batch_base, batch_q, 0.7),
                               rtol=1e-5, atol=1e-7)
    # top-k masked (−inf) entries stay impossible, no nan
    masked = BASE.copy()
    masked[[1, 3]] = -np.inf
    logp = np.asarray(guided(masked, Q, 1.0))
    assert np.all(np.isneginf(logp[[1, 3]])) and np.all(np.isfinite(logp[[0, 2, 4, 5]]))


def test_sampling_the_guided_logits_matches_the_tilted_distribution():
    beta, n = 1.5, 40_000
    logits = value_guided_logits(BASE, Q, beta)
    samples = jax.jit(lambda k: jax.random.categorical(k, logits, shape=(n,)))(jax.random.PRNGKey(0))
    counts = np.bincount(np.asarray(samples), minlength=len(BASE))
    ok, stat = chi_square_ok(counts, tilted(BASE, Q, beta))
    assert ok, stat
    # the log-probs a decoder records for those tokens are the guided ones
    first = np.asarray(samples[:5])
    recorded = token_logprobs(jnp.broadcast_to(logits, (5, len(BASE))), samples[:5])
    np.testing.assert_allclose(recorded, np.log(tilted(BASE, Q, beta))[first], rtol=1e-5)


def test_exact_kl(maybe_jit):
    for beta in (0.0, 0.5, 2.0):
        p, base = tilted(BASE, Q, beta), tilted(BASE, Q, 0.0)
        exact = float(np.sum(p * (np.log(p) - np.log(base))))
        kl = maybe_jit(value_guided_kl)(BASE, Q, beta)
        assert float(kl) == pytest.approx(exact, rel=1e-4, abs=1e-7)
        # the identity in the docstring: β·E_{π_β}[Q] − log E_{π_base}[exp(β·Q)]
        identity = beta * np.sum(p * Q) - np.log(np.sum(base * np.exp(beta * Q)))
        assert float(kl) == pytest.approx(identity, rel=1e-4, abs=1e-7)
    assert float(value_guided_kl(BASE, Q, 0.0)) == pytest.approx(0.0, abs=1e-7)
    # KL grows with β here, and −inf entries contribute nothing
    kls = [float(value_guided_kl(BASE, Q, b)) for b in (0.5, 1.0, 2.0)]
    assert kls[0] < kls[1] < kls[2]
    masked = np.array([0.0, -np.inf, 1.0], np.float32)
    assert np.isfinite(float(categorical_kl(masked, np.array([0.0, 0.0, 0.0], np.float32))))
    assert float(categorical_kl(masked, masked)) == 0.0


def test_blockwise_probs_and_selection(maybe_jit):
    values = np.array([[0.1, 0.9, -0.4, 0.5], [2.0, 2.0, 0.0, -1.0]], np.float32)
    beta = 2.0
    probs = maybe_jit(blockwise_value_probs)(values, beta)
    expected = np.exp(beta * values) / np.exp(beta * values).sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, expected, rtol=1e-5)
    mask = np.array([[1, 0, 1, 1], [1, 1, 1, 1]], bool)
    probs_masked = blockwise_value_probs(values, beta, mask)
    assert probs_masked[0, 1] == 0.0 and float(probs_masked[0].sum()) == pytest.approx(1.0)

    n = 30_000
    keys = jax.random.split(jax.random.PRNGKey(1), n)
    select = maybe_jit(jax.vmap(blockwise_value_select, in_axes=(0, None, None, None)))
    index, prob = select(keys, values, beta, mask)  # [n, 2]
    assert index.dtype == jnp.int32
    np.testing.assert_allclose(prob, np.take_along_axis(np.asarray(probs_masked)[None].repeat(n, 0),
                                                        np.asarray(index)[..., None], -1)[..., 0], rtol=1e-6)
    assert not np.any(np.asarray(index)[:, 0] == 1)  # a masked-out candidate is never chosen
    for row in range(2):
        counts = np.bincount(np.asarray(index)[:, row], minlength=4)
        keep = np.asarray(probs_masked[row]) > 0
        ok, stat = chi_square_ok(counts[keep], np.asarray(probs_masked[row], np.float64)[keep])
        assert ok, (row, stat)


def test_blockwise_selection_approaches_the_tilted_block_distribution():
    """K candidates from π_base, selection ∝ exp(β·V): as K grows the chosen block's distribution
    approaches π_base·exp(β·V)/Z (self-normalised importance resampling; bias O(1/K)). The same with
    candidates from a uniform proposal q and ρ = log π_base − log q."""
    base_logits = jnp.array([0.5, 0.0, -0.5, 1.0, -1.0])  # π_base over 5 possible blocks
    base_logp = jax.nn.log_softmax(base_logits)
    block_value = jnp.array([1.0, -0.5, 2.0, 0.0, 0.5])
    beta, prefixes, k = 1.0, 20_000, 64
    target = tilted(np.asarray(base_logits), np.asarray(block_value), beta)

    @functools.partial(jax.jit, static_argnums=2)
    def chosen_blocks(key, proposal_logits, correct):
        draw_key, select_key = jax.random.split(key)
        blocks = jax.random.categorical(draw_key, proposal_logits, shape=(prefixes, k))  # [prefixes, K]
        rho = (base_logp - jax.nn.log_softmax(proposal_logits))[blocks] if correct else None
        index, _ = blockwise_value_select(select_key, block_value[blocks], beta, None, rho)
        return jnp.take_along_axis(blocks, index[:, None], axis=1)[:, 0]

    def frequencies(*args):
        return np.bincount(np.asarray(chosen_blocks(*args)), minlength=5) / prefixes

    freq = frequencies(jax.random.PRNGKey(2), base_logits, False)
    np.testing.assert_allclose(freq, target, atol=0.015)
    base = tilted(np.asarray(base_logits), np.asarray(block_value), 0.0)
    assert np.abs(freq - base).max() > 0.1  # far from the base distribution: the selection did tilt it
    uniform = jnp.zeros(5)
    freq = frequencies(jax.random.PRNGKey(3), uniform, True)
    np.testing.assert_allclose(freq, target, atol=0.015)
