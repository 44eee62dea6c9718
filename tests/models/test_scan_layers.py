"""Stacked block params: the scanned blocks compute what the unrolled blocks compute (logits, gradients,
generation), and the per-layer layout converts both ways."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.models.config import gpt2_config, llama_config
from jaxrlhf.models.transformer import LanguageModel, positions_from_mask, stack_layers, unstack_layers
from jaxrlhf.rollout.generate import GenerationConfig, generate

CONFIGS = {
    "gpt2": gpt2_config(vocab_size=40, hidden_size=32, num_layers=3, num_heads=4, max_position_embeddings=64),
    "llama-gqa": llama_config(vocab_size=40, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                              intermediate_size=48, max_position_embeddings=64),
}
WITH_AND_WITHOUT_JIT = pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["eager", "jit"])


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request):
    cfg = CONFIGS[request.param]
    variants = {
        "scan": LanguageModel(dataclasses.replace(cfg, scan_layers=True, scan_decode=True)),
        "default": LanguageModel(cfg),
        "unrolled": LanguageModel(dataclasses.replace(cfg, scan_layers=False)),
    }
    return variants, jax.tree.map(lambda p: 2.0 * p, variants["default"].init(jax.random.key(0)))


def _batch():
    tokens = jnp.asarray(np.random.RandomState(0).randint(3, 40, (3, 9)), jnp.int32)
    mask = jnp.ones((3, 9), jnp.int32).at[0, :3].set(0)  # one left-padded row
    return tokens, mask, positions_from_mask(mask)


def test_params_are_stacked_along_a_leading_layer_axis(models):
    variants, params = models
    cfg = variants["default"].config
    assert params["layers"]["attn"]["qkv"]["kernel"].shape == (
        cfg.num_layers, cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size
    )
    assert all(leaf.shape[0] == cfg.num_layers for leaf in jax.tree.leaves(params["layers"]))
    for m in variants.values():  # one params pytree whatever the program
        assert jax.tree.structure(m.abstract_params()) == jax.tree.structure(params)


def test_unstack_and_stack_round_trip(models):
    _, params = models
    per_layer = unstack_layers(params)
    assert sorted(per_layer["layers"]) == [0, 1, 2]
    np.testing.assert_array_equal(per_layer["layers"][1]["attn"]["qkv"]["kernel"],
                                  params["layers"]["attn"]["qkv"]["kernel"][1])
    jax.tree.map(np.testing.assert_array_equal, stack_layers(per_layer), params)
    # Numpy in, numpy out (the checkpoint I/O path).
    host = stack_layers(jax.tree.map(np.asarray, per_layer))
    assert isinstance(host["layers"]["attn"]["qkv"]["kernel"], np.ndarray)


@WITH_AND_WITHOUT_JIT
def test_logits_match_the_unrolled_blocks(models, transform):
    variants, params = models
    tokens, mask, pos = _batch()
    want = transform(variants["unrolled"].apply)(params, tokens, pos, mask)[0]
    got = transform(variants["default"].apply)(params, tokens, pos, mask)[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_gradients_match_the_unrolled_blocks(models):
    variants, params = models
    tokens, mask, pos = _batch()

    def loss(model):
        return lambda p: jnp.mean(model.apply(p, tokens, pos, mask)[0] ** 2)

    g_want = jax.jit(jax.grad(loss(variants["unrolled"])))(params)
    g_got = jax.jit(jax.grad(loss(variants["default"])))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), g_got, g_want)


def test_cache_layouts(models):
    variants, _ = models
    cfg = variants["default"].config
    stacked = variants["default"].init_cache(3, 16)
    assert stacked.keys.shape == (cfg.num_layers, 3, cfg.num_kv_heads, cfg.head_dim, 16)
    assert stacked.values.shape == (cfg.num_layers, 3, cfg.num_kv_heads, 16, cfg.head_dim)
    per_layer = variants["default"].decode_cache(stacked)  # what the (unrolled) decode loop carries
    assert len(per_layer.keys) == cfg.num_layers and per_layer.keys[0].shape == stacked.keys.shape[1:]
    assert variants["scan"].decode_cache(stacked) is stacked
    assert isinstance(variants["unrolled"].init_cache(3, 16).keys, tuple)


def test_generation_is_the_same_in_every_layout(models):
    variants, params = models
    tokens, mask, _ = _batch()
    gen = GenerationConfig(max_new_tokens=6, temperature=0.8)
    want = generate(variants["unrolled"], params, tokens, mask, jax.random.key(1), gen)
    for name in ("scan", "default"):
        got = generate(variants[name], params, tokens, mask, jax.random.key(1), gen)
        np.testing.assert_array_equal(got.response_tokens, want.response_tokens, err_msg=name)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5, err_msg=name)
