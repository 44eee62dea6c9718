"""Value-guided generation: tokens are drawn from the tilted distribution π_base·exp(β·Q)/Z (a χ² test over a
small vocabulary), their log-probs are the tilted ones, the reported KL is the exact KL to the base summed
over the response's steps, β = 0 is plain sampling, and the guided decode loop still copies no cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxrlhf.models.config import gpt2_config
from jaxrlhf.models.q_heads import init_q_head, min_q_values
from jaxrlhf.models.transformer import LanguageModel, positions_from_mask
from jaxrlhf.rollout.generate import GenerationConfig, generate
from jaxrlhf.rollout.guidance import value_guidance
from jaxrlhf.rollout.loop_copies import large_loop_writes

VOCAB = 16
MODEL = LanguageModel(gpt2_config(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                  max_position_embeddings=32))


@pytest.fixture(scope="module")
def setup():
    params = jax.jit(MODEL.init)(jax.random.key(0))
    # Q values of order 1 (std 0.3 on unit-scale hidden states), so the tilt is far from the base.
    heads = tuple(init_q_head(k, 32, VOCAB, std=0.3) for k in jax.random.split(jax.random.key(1), 2))
    prompt = np.array([[0, 5, 9, 3]], np.int32)
    mask = np.array([[0, 1, 1, 1]], np.int32)
    return params, heads, prompt, mask


def next_token_tables(params, heads, tokens, mask, temperature=1.0):
    """log π_base [B, T, V] (tempered) and min_h Q [B, T, V] of a fresh forward pass."""
    logits, hidden, _ = MODEL.apply(params, tokens, positions_from_mask(mask), mask)
    return jax.nn.log_softmax(logits / temperature, -1), min_q_values(heads, hidden)


def tilted(log_base, q, beta):
    logp = log_base + beta * q
    return logp - jax.scipy.special.logsumexp(logp, -1, keepdims=True)


def test_guided_samples_follow_the_tilted_distribution(setup):
    params, heads, prompt, mask = setup
    beta, draws = 1.5, 4000
    config = GenerationConfig(max_new_tokens=1, group_size=draws, temperature=0.8)
    rollout = generate(MODEL, params, prompt, mask, jax.random.key(2), config, value_guidance(heads, beta))
    log_base, q = next_token_tables(params, heads, prompt, mask, temperature=0.8)
    log_base, q = log_base[0, -1], q[0, -1]
    logp = np.asarray(tilted(log_base, q, beta), np.float64)
    tokens = np.asarray(rollout.response_tokens[:, 0])
    counts = np.bincount(tokens, minlength=VOCAB)
    expected = np.exp(logp) * draws
    assert abs(expected.sum() - draws) < 1e-3
    expected *= draws / expected.sum()  # float32 rounding; chisquare wants equal totals to 1e-8
    _, p_value = stats.chisquare(counts, expected)
    assert p_value > 1e-3, (counts, expected)
    # The base's sampling would look different: the tilt is real.
    base = np.exp(np.asarray(log_base, np.float64))
    _, p_base = stats.chisquare(counts, base / base.sum() * draws)
    assert p_base < 1e-6
    np.testing.assert_allclose(rollout.logprobs[:, 0], logp[tokens], atol=1e-5)
    exact_kl = float(np.sum(np.exp(logp) * (logp - np.asarray(log_base, np.float64))))
    assert exact_kl > 0.05
    np.testing.assert_allclose(rollout.kl, exact_kl, rtol=1e-4)


def test_reported_kl_sums_the_exact_kl_over_the_responses_steps(setup):
    params, heads, prompt, mask = setup
    beta, stop = 2.0, 4
    config = GenerationConfig(max_new_tokens=5, group_size=64, stop_token_ids=(stop,), pad_token_id=0)
    rollout = generate(MODEL, params, prompt, mask, jax.random.key(3), config, value_guidance(heads, beta))
    log_base, q = next_token_tables(params, heads, rollout.sequences, rollout.sequence_mask)
    p = prompt.shape[1]
    log_base, q = log_base[:, p - 1:-1], q[:, p - 1:-1]  # the states before each response token
    logp = tilted(log_base, q, beta)
    step_kl = jnp.sum(jnp.exp(logp) * (logp - log_base), -1)
    response_mask = np.asarray(rollout.response_mask)
    assert response_mask.sum(1).min() < 5 < response_mask.sum(1).max() + 1  # some rows stopped early
    np.testing.assert_allclose(rollout.kl, np.sum(step_kl * response_mask, 1), rtol=1e-4, atol=1e-5)
    token_logp = jnp.take_along_axis(logp, rollout.response_tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(rollout.logprobs, token_logp * response_mask, atol=1e-4)


def test_beta_zero_is_plain_sampling_and_a_new_beta_reuses_the_program(setup):
    params, heads, prompt, mask = setup
    config = GenerationConfig(max_new_tokens=4, group_size=8)
    plain = generate(MODEL, params, prompt, mask, jax.random.key(4), config)
    zero = generate(MODEL, params, prompt, mask, jax.random.key(4), config, value_guidance(heads, 0.0))
    np.testing.assert_array_equal(zero.response_tokens, plain.response_tokens)
    np.testing.assert_allclose(zero.logprobs, plain.logprobs, atol=1e-5)
    np.testing.assert_allclose(zero.kl, 0.0, atol=1e-6)
    np.testing.assert_array_equal(plain.kl, 0.0)
    before = generate._cache_size()
    generate(MODEL, params, prompt, mask, jax.random.key(4), config, value_guidance(heads, 3.0))
    assert generate._cache_size() == before


def test_greedy_with_a_large_beta_takes_argmax_q(setup):
    params, heads, prompt, mask = setup
    config = GenerationConfig(max_new_tokens=1, greedy=True)
    rollout = generate(MODEL, params, prompt, mask, jax.random.key(5), config, value_guidance(heads, 1e4))
    _, q = next_token_tables(params, heads, prompt, mask)
    assert int(rollout.response_tokens[0, 0]) == int(jnp.argmax(q[0, -1]))


def test_the_guided_decode_loop_copies_no_cache_sized_buffer():
    params = jax.eval_shape(MODEL.init, jax.random.key(0))
    heads = jax.eval_shape(lambda: tuple(init_q_head(jax.random.key(0), 32, VOCAB) for _ in range(2)))
    tokens = np.ones((2, 8), np.int32)
    guidance = value_guidance(heads, 1.0)
    config = GenerationConfig(max_new_tokens=8)
    lowered = generate.lower(MODEL, params, tokens, tokens, jax.random.key(0), config, guidance)
    text = lowered.compile().as_text()
    layer_cache = 2 * MODEL.config.num_kv_heads * MODEL.config.head_dim * 16
    assert large_loop_writes(text, "decode_loop", layer_cache) == []


def test_a_negative_or_infinite_beta_is_refused():
    """Concrete β of any kind (NumPy and JAX scalars passed unchecked before), not only Python floats."""
    from jaxrlhf.rollout.guidance import value_guidance

    for beta in (-1.0, float("inf"), float("nan"), np.float32(-1.0), jnp.float32(-1.0), np.array(-1.0), "2"):
        with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
            value_guidance((), beta)
    assert float(value_guidance((), 0).beta) == 0.0
