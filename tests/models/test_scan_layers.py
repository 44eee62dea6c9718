"""``ModelConfig.scan_layers``: the blocks as one ``lax.scan`` compute what the unrolled blocks compute."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.models.config import gpt2_config, llama_config
from jaxrlhf.models.transformer import LanguageModel, positions_from_mask
from jaxrlhf.rollout.generate import GenerationConfig, generate
from jaxrlhf.train.model_setup import load_model
from jaxrlhf.train.run_config import ArchitectureConfig, ModelSection

CONFIGS = {
    "gpt2": gpt2_config(vocab_size=40, hidden_size=32, num_layers=3, num_heads=4, max_position_embeddings=64),
    "llama-gqa": llama_config(vocab_size=40, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                              intermediate_size=48, max_position_embeddings=64),
}


@pytest.fixture(params=sorted(CONFIGS))
def pair(request):
    cfg = CONFIGS[request.param]
    unrolled = LanguageModel(cfg)
    scanned = LanguageModel(dataclasses.replace(cfg, scan_layers=True))
    return unrolled, scanned, unrolled.init(jax.random.key(0))


def _batch():
    tokens = jnp.asarray(np.random.RandomState(0).randint(3, 40, (3, 9)), jnp.int32)
    mask = jnp.ones((3, 9), jnp.int32).at[0, :3].set(0)  # one left-padded row
    return tokens, mask, positions_from_mask(mask)


def test_same_params_pytree(pair):
    _, scanned, params = pair
    assert jax.tree.structure(scanned.abstract_params()) == jax.tree.structure(params)


@pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])
def test_logits_and_gradients_match_the_unrolled_blocks(pair, transform):
    unrolled, scanned, params = pair
    tokens, mask, pos = _batch()
    want = transform(unrolled.apply)(params, tokens, pos, mask)[0]
    got = transform(scanned.apply)(params, tokens, pos, mask)[0]
    np.testing.assert_allclose(got, want, atol=1e-6)

    def loss(model):
        return lambda p: jnp.mean(model.apply(p, tokens, pos, mask)[0] ** 2)

    g_want = transform(jax.grad(loss(unrolled)))(params)
    g_got = transform(jax.grad(loss(scanned)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), g_got, g_want)


def test_generation_with_a_stacked_cache_matches(pair):
    unrolled, scanned, params = pair
    tokens, mask, _ = _batch()
    cache = scanned.init_cache(3, 16)
    cfg = scanned.config
    assert cache.keys.shape == (cfg.num_layers, 3, cfg.num_kv_heads, cfg.head_dim, 16)
    assert cache.values.shape == (cfg.num_layers, 3, cfg.num_kv_heads, 16, cfg.head_dim)
    gen = GenerationConfig(max_new_tokens=6, temperature=0.8)
    want = generate(unrolled, params, tokens, mask, jax.random.key(1), gen)
    got = generate(scanned, params, tokens, mask, jax.random.key(1), gen)
    np.testing.assert_array_equal(got.response_tokens, want.response_tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-6)


def test_model_section_turns_it_on():
    section = ModelSection(architecture=ArchitectureConfig(hidden_size=32, num_layers=2, num_heads=2),
                           tokenizer="char:abc", scan_layers=True)
    loaded = load_model(section, jax.random.key(0))
    assert loaded.model.config.scan_layers
    assert section.runtime("some/dir") == ModelSection(path="some/dir", scan_layers=True)
