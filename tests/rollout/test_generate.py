"""Generation: KV-cache correctness, log-prob parity with a fresh forward pass (and the behaviour
distribution's log-probs under filtering), stopping, recompilation, group sampling, position limits."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.models.config import gpt2_config, llama_config
from jaxrlhf.models.transformer import LanguageModel, positions_from_mask
from jaxrlhf.rollout.generate import GenerationConfig, generate
from jaxrlhf.rollout.scoring import response_logprobs

V = 40
MODELS = {
    "gpt2": LanguageModel(
        gpt2_config(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64)
    ),
    "llama-gqa": LanguageModel(
        llama_config(
            vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48
        )
    ),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_and_params(request):
    model = MODELS[request.param]
    # Doubled weights give peaked, token-dependent distributions (a stronger test than near-uniform init).
    # Much larger scales make attention logits so sharp that float32 rounding alone nears 1e-5.
    return model, jax.tree.map(lambda p: p * 2.0, model.init(jax.random.key(0)))


def prompts(batch=4, length=7, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, V, size=(batch, length)).astype(np.int32)
    mask = np.ones_like(tokens)
    for i, pad in enumerate([0, 2, 5, 1][:batch]):
        mask[i, :pad] = 0
        tokens[i, :pad] = 0
    return tokens, mask


def test_cached_decode_equals_full_forward(model_and_params):
    model, params = model_and_params
    tokens, mask = prompts()
    n = 6
    cont = np.random.RandomState(1).randint(3, V, size=(tokens.shape[0], n)).astype(np.int32)
    full_tokens = np.concatenate([tokens, cont], 1)
    full_mask = np.concatenate([mask, np.ones_like(cont)], 1)
    ref, _, _ = model.apply(params, full_tokens, positions_from_mask(jnp.asarray(full_mask)), full_mask)

    p = tokens.shape[1]
    cache = model.init_cache(tokens.shape[0], p + n)
    logits, _, cache = model.apply(params, tokens, positions_from_mask(jnp.asarray(mask)), full_mask, cache)
    got = [logits[:, -1]]
    step = jax.jit(model.apply)
    for j in range(n - 1):
        pos = mask.sum(1, keepdims=True) + j
        logits, _, cache = step(params, cont[:, j : j + 1], pos, full_mask, cache)
        got.append(logits[:, 0])
    got = np.stack([np.asarray(g) for g in got], 1)
    np.testing.assert_allclose(got, np.asarray(ref)[:, p - 1 : p + n - 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("scan_decode", [False, True], ids=["per-layer", "stacked"])
def test_prefill_equals_a_forward_over_an_empty_cache(model_and_params, scan_decode):
    model, params = model_and_params
    model = LanguageModel(dataclasses.replace(model.config, scan_decode=scan_decode))
    tokens, mask = prompts()
    b, p = tokens.shape
    pos = positions_from_mask(jnp.asarray(mask))
    full_mask = np.concatenate([mask, np.ones((b, 5), np.int32)], 1)
    want_hidden, want = model.forward(params, tokens, pos, full_mask, model.init_cache(b, p + 5))
    hidden, got = model.prefill(params, tokens, pos, mask, p + 5)
    real = mask > 0  # padded query rows compute garbage in both, and are never attended to
    np.testing.assert_allclose(np.asarray(hidden)[real], np.asarray(want_hidden)[real], atol=1e-5, rtol=0)
    assert int(got.index) == p and isinstance(got.keys, tuple) == (not scan_decode)
    want = model.decode_cache(want)
    cols = np.concatenate([real, np.ones((b, 5), bool)], 1)  # [B, S]
    for k_got, k_want in zip(got.keys, want.keys):  # [..., B, K, hd, S]
        np.testing.assert_allclose(np.moveaxis(np.asarray(k_got), -1, -3)[..., cols, :, :],
                                   np.moveaxis(np.asarray(k_want), -1, -3)[..., cols, :, :], atol=1e-5)
    for v_got, v_want in zip(got.values, want.values):  # [..., B, K, S, hd]
        np.testing.assert_allclose(np.moveaxis(np.asarray(v_got), -2, -3)[..., cols, :, :],
                                   np.moveaxis(np.asarray(v_want), -2, -3)[..., cols, :, :], atol=1e-5)


@pytest.mark.parametrize("sampling", [dict(temperature=0.7), dict(temperature=1.3)], ids=["t0.7", "t1.3"])
def test_sampled_logprobs_equal_fresh_forward(model_and_params, sampling):
    model, params = model_and_params
    tokens, mask = prompts()
    config = GenerationConfig(max_new_tokens=10, stop_token_ids=(2,), **sampling)
    assert not config.filtered
    out = generate(model, params, tokens, mask, jax.random.key(3), config)
    fresh = response_logprobs(
        model, params, out.sequences, out.sequence_mask, tokens.shape[1], config.temperature
    )
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(fresh), atol=1e-5, rtol=0)
    assert np.all(np.asarray(out.logprobs)[np.asarray(out.response_mask) == 0] == 0)


def test_stopping_padding_and_masks(model_and_params):
    model, params = model_and_params
    tokens, mask = prompts(batch=4)
    # Several stop ids, common enough at this temperature that rows stop at different steps.
    config = GenerationConfig(
        max_new_tokens=12, temperature=2.0, stop_token_ids=(5, 6, 7, 8, 9, 10), pad_token_id=0
    )
    out = jax.device_get(generate(model, params, tokens, mask, jax.random.key(11), config))
    stop = np.isin(out.response_tokens, config.stop_token_ids)
    for row in range(tokens.shape[0]):
        hits = np.flatnonzero(stop[row])
        length = hits[0] + 1 if hits.size else config.max_new_tokens
        np.testing.assert_array_equal(out.response_mask[row], np.arange(12) < length)
        assert np.all(out.response_tokens[row, length:] == 0)  # finished rows stop changing
        assert out.stopped[row] == bool(hits.size)
    assert out.stopped.any(), "test needs at least one stopped row"
    np.testing.assert_array_equal(out.sequences[:, : tokens.shape[1]], tokens)
    np.testing.assert_array_equal(out.sequence_mask, np.concatenate([mask, out.response_mask], 1))


def test_min_new_tokens_blocks_stop_tokens(model_and_params):
    model, params = model_and_params
    tokens, mask = prompts()
    stop = tuple(range(3, V))  # almost every token stops, so without min_new_tokens rows end at once
    config = GenerationConfig(max_new_tokens=6, min_new_tokens=4, stop_token_ids=stop, temperature=1.0)
    out = jax.device_get(generate(model, params, tokens, mask, jax.random.key(0), config))
    assert np.all(out.response_mask[:, :4] == 1)
    assert not np.isin(out.response_tokens[:, :3], stop).any()


def _numpy_behaviour_logprobs(logits, tokens, config: GenerationConfig) -> np.ndarray:
    """log of the renormalised probability of each token under temperature, stop-token blocking before
    min_new_tokens, top-k then top-p (kept: tokens whose strictly-more-likely mass is < p), in float64."""
    logits = np.asarray(logits, np.float64).copy()  # [B, N, V]
    if config.min_new_tokens and config.stop_token_ids:
        logits[:, : config.min_new_tokens, list(config.stop_token_ids)] = -np.inf
    z = logits / config.temperature
    if config.top_k:
        kth = np.sort(z, axis=-1)[..., -config.top_k][..., None]
        z = np.where(z < kth, -np.inf, z)
    if config.top_p < 1.0:
        desc = -np.sort(-z, axis=-1)
        p = np.exp(desc - desc.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        n_keep = ((np.cumsum(p, -1) - p) < config.top_p).sum(-1, keepdims=True)
        cutoff = np.take_along_axis(desc, n_keep - 1, -1)
        z = np.where(z < cutoff, -np.inf, z)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return np.take_along_axis(logp, np.asarray(tokens)[..., None], -1)[..., 0]


@pytest.mark.parametrize(
    "sampling",
    [
        dict(temperature=1.3, top_k=5),
        dict(temperature=1.0, top_p=0.8),
        dict(temperature=0.9, top_k=8, top_p=0.9),
        dict(temperature=1.0, min_new_tokens=4, stop_token_ids=tuple(range(3, 20))),
    ],
    ids=["topk", "topp", "topk-topp", "min-new-tokens"],
)
def test_filtered_sampling_returns_the_behaviour_logprobs(model_and_params, sampling):
    """With filtering, each log-prob is that of the tempered, filtered, renormalised distribution the
    token was drawn from (NumPy reference from a fresh forward pass's logits), not the fresh pass's own."""
    model, params = model_and_params
    tokens, mask = prompts()
    config = GenerationConfig(max_new_tokens=8, **{"stop_token_ids": (2,), **sampling})
    assert config.filtered
    out = jax.device_get(generate(model, params, tokens, mask, jax.random.key(3), config))
    p = tokens.shape[1]
    logits, _, _ = model.apply(params, out.sequences, positions_from_mask(jnp.asarray(out.sequence_mask)),
                               out.sequence_mask)
    want = _numpy_behaviour_logprobs(np.asarray(logits)[:, p - 1 : -1], out.response_tokens, config)
    real = out.response_mask > 0
    np.testing.assert_allclose(out.logprobs[real], want[real], atol=1e-5, rtol=0)
    assert np.all(out.logprobs[~real] == 0)
    # Filtering removed mass, so the behaviour log-probs exceed the fresh forward pass's somewhere.
    fresh = response_logprobs(model, params, out.sequences, out.sequence_mask, p, config.temperature)
    assert np.all(out.logprobs[real] >= np.asarray(fresh)[real] - 1e-6)
    assert np.any(out.logprobs[real] > np.asarray(fresh)[real] + 1e-3)


def test_no_recompilation_for_new_prompts_and_keys(model_and_params):
    model, params = model_and_params
    config = GenerationConfig(max_new_tokens=5, temperature=0.9)
    t1, m1 = prompts(seed=1)
    a = generate(model, params, t1, m1, jax.random.key(1), config)
    before = generate._cache_size()
    t2, m2 = prompts(seed=2)
    b = generate(model, params, t2, m2, jax.random.key(2), config)
    assert generate._cache_size() == before
    assert not np.array_equal(np.asarray(a.response_tokens), np.asarray(b.response_tokens))
    # Same key, same prompts: same tokens.
    c = generate(model, params, t1, m1, jax.random.key(1), config)
    np.testing.assert_array_equal(np.asarray(a.response_tokens), np.asarray(c.response_tokens))


def test_first_token_distribution_matches_tempered_softmax():
    """Empirical distribution of the first sampled token equals softmax(logits / T) (chi-square)."""
    model = MODELS["gpt2"]
    params = jax.tree.map(lambda p: p * 4.0, model.init(jax.random.key(0)))
    n, temperature = 4000, 0.8
    tokens = np.tile(np.array([[4, 9, 13]], np.int32), (n, 1))
    mask = np.ones_like(tokens)
    out = generate(
        model,
        params,
        tokens,
        mask,
        jax.random.key(5),
        GenerationConfig(max_new_tokens=1, temperature=temperature),
    )
    logits, _, _ = model.apply(params, tokens[:1], positions_from_mask(jnp.asarray(mask[:1])), mask[:1])
    probs = np.asarray(jax.nn.softmax(logits[0, -1] / temperature))
    counts = np.bincount(np.asarray(out.response_tokens[:, 0]), minlength=V)
    # Pool rare tokens so every expected count is ≥ 5, then a chi-square test at the 0.1% level.
    expected = probs * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    chi2 = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    from scipy.stats import chi2 as chi2_dist

    assert chi2 < chi2_dist.ppf(0.999, dof), (chi2, dof)


def test_group_rows_equal_generation_from_repeated_prompts(model_and_params):
    """Group sampling prefills each prompt once; every row equals, token for token and log-prob for
    log-prob, the row generated from n repeated copies of the prompt with the same key."""
    model, params = model_and_params
    tokens, mask = prompts(batch=3)
    n = 4
    grouped_cfg = GenerationConfig(max_new_tokens=8, temperature=1.1, stop_token_ids=(2,), group_size=n)
    repeated_cfg = GenerationConfig(max_new_tokens=8, temperature=1.1, stop_token_ids=(2,))
    run = lambda p, t, m, k, c: generate(model, p, t, m, k, c)
    grouped = jax.device_get(run(params, tokens, mask, jax.random.key(7), grouped_cfg))
    repeated = jax.device_get(
        run(params, np.repeat(tokens, n, 0), np.repeat(mask, n, 0), jax.random.key(7), repeated_cfg)
    )
    assert grouped.sequences.shape == (3 * n, tokens.shape[1] + 8)
    np.testing.assert_array_equal(grouped.sequences[:, : tokens.shape[1]], np.repeat(tokens, n, 0))
    np.testing.assert_array_equal(grouped.response_tokens, repeated.response_tokens)
    np.testing.assert_array_equal(grouped.response_mask, repeated.response_mask)
    np.testing.assert_allclose(grouped.logprobs, repeated.logprobs, atol=1e-6, rtol=0)
    # A group's responses are distinct samples, and their log-probs equal a fresh forward pass.
    for i in range(3):
        rows = {tuple(r) for r in grouped.response_tokens[i * n : (i + 1) * n]}
        assert len(rows) > 1
    fresh = response_logprobs(model, params, grouped.sequences, grouped.sequence_mask, tokens.shape[1], 1.1)
    np.testing.assert_allclose(grouped.logprobs, np.asarray(fresh), atol=1e-5, rtol=0)


def test_a_right_padded_host_mask_is_refused(model_and_params):
    """generate continues each row from its last column; a right-padded row would be continued from its
    padding without a word (transformers only warns). A NumPy mask is checked; a traced one (inside jit) and
    an all-padding row (a batch filled up) are not errors."""
    model, params = model_and_params
    tokens, mask = prompts()
    right = mask[:, ::-1].copy()
    with pytest.raises(ValueError, match=r"prompt_mask row 1 is not left-padded \(a 0 at column 5 after"):
        generate(model, params, tokens, right, jax.random.key(0), GenerationConfig(2))
    mask[3] = 0  # a filler row
    generate(model, params, tokens, mask, jax.random.key(0), GenerationConfig(2))
    traced = jax.jit(lambda t, m: generate(model, params, t, m, jax.random.key(0), GenerationConfig(2)))
    assert traced(tokens, right).response_tokens.shape == (4, 2)  # not checked under a trace


def test_group_size_and_token_ids_are_validated():
    with pytest.raises(ValueError, match="group_size"):
        GenerationConfig(group_size=0)
    with pytest.raises(ValueError, match=r"pad_token_id: token ids must be whole numbers >= 0, got -5"):
        GenerationConfig(pad_token_id=-5)
    with pytest.raises(ValueError, match=r"stop_token_ids: .* got 2\.5"):
        GenerationConfig(stop_token_ids=(3, 2.5))
    numpy_ids = GenerationConfig(stop_token_ids=(np.int64(2),), pad_token_id=np.int32(0), top_k=np.int64(5))
    assert numpy_ids.sampling.top_k == 5
    # An id the model's vocabulary does not have could never stop a row: refused before tracing.
    model = MODELS["gpt2"]
    tokens = np.ones((1, 4), np.int32)
    with pytest.raises(ValueError, match=rf"stop_token_ids 99999 is not a token of the model \(vocab_size "
                                         rf"{model.config.vocab_size}\)"):
        generate(model, model.init(jax.random.key(0)), tokens, np.ones_like(tokens), jax.random.key(0),
                 GenerationConfig(4, stop_token_ids=(99999,)))


def test_learned_position_table_overflow_is_an_error():
    model = MODELS["gpt2"]  # max_position_embeddings=64
    params = model.init(jax.random.key(0))
    tokens = np.ones((2, 40), np.int32)
    with pytest.raises(ValueError, match=r"prompt length 40 \+ max_new_tokens 30 = 70 exceeds .*=64\)"):
        generate(model, params, tokens, np.ones_like(tokens), jax.random.key(0), GenerationConfig(30))
    long = np.ones((1, 65), np.int32)
    for fn in (model.apply, jax.jit(model.apply)):
        with pytest.raises(ValueError, match=r"sequence length 65 exceeds .*max_position_embeddings=64"):
            fn(params, long, positions_from_mask(jnp.asarray(long)), long)
    # At the limit it still works, and RoPE models have no table to overflow.
    ok, _, _ = model.apply(params, long[:, :64], positions_from_mask(jnp.asarray(long[:, :64])), long[:, :64])
    assert np.isfinite(np.asarray(ok)).all()
    rope = MODELS["llama-gqa"]
    out, _, _ = rope.apply(rope.init(jax.random.key(0)), np.ones((1, 80), np.int32),
                           jnp.arange(80)[None], np.ones((1, 80), np.int32))
    assert np.isfinite(np.asarray(out)).all()
