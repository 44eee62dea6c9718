"""LoRA adapters: the adapted model equals the merged weights, B = 0 is the base, config checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.models.config import gpt2_config, llama_config
from jaxrlhf.models.lora import LoRAConfig, init_lora, join_params, merge_lora, strip_lora
from jaxrlhf.models.transformer import LanguageModel, positions_from_mask
from jaxrlhf.rollout.generate import GenerationConfig, generate

CONFIGS = {
    "gpt2": (gpt2_config, ("q", "v", "o", "up", "down")),
    "gpt2_fused": (gpt2_config, ("qkv",)),
    "llama": (llama_config, ("q", "k", "v", "o", "gate", "up", "down")),
}


def setup(name, scan_layers=True):
    make, targets = CONFIGS[name]
    cfg = make(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64,
               scan_layers=scan_layers)
    lora = LoRAConfig(enabled=True, rank=4, alpha=8.0, targets=targets)
    model = LanguageModel(cfg, lora_alpha=lora.alpha)
    base = model.init(jax.random.key(0))
    adapters = init_lora(jax.random.key(1), cfg, lora)
    # Move B off zero so the adapters matter.
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), adapters)
    return model, lora, base, adapters


def batch():
    tokens = jax.random.randint(jax.random.key(3), (2, 7), 0, 64)
    mask = jnp.ones_like(tokens).at[1, :2].set(0)
    return tokens, positions_from_mask(mask), mask


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_adapted_model_equals_merged_weights(name):
    model, lora, base, adapters = setup(name)
    tokens, pos, mask = batch()
    adapted = jax.jit(lambda p: model.apply(p, tokens, pos, mask)[0])(join_params(base, adapters))
    merged = model.apply(merge_lora(base, adapters, model.config, lora), tokens, pos, mask)[0]
    plain = model.apply(base, tokens, pos, mask)[0]
    np.testing.assert_allclose(adapted, merged, atol=2e-6)
    assert float(jnp.abs(adapted - plain).max()) > 1e-2


def test_unrolled_layers_match_scan():
    model, _, base, adapters = setup("llama")
    unrolled = LanguageModel(dataclasses.replace(model.config, scan_layers=False),
                             lora_alpha=model.lora_alpha)
    tokens, pos, mask = batch()
    params = join_params(base, adapters)
    np.testing.assert_allclose(model.apply(params, tokens, pos, mask)[0],
                               unrolled.apply(params, tokens, pos, mask)[0], atol=2e-6)


def test_fresh_adapters_leave_the_base_unchanged():
    model, lora, base, _ = setup("gpt2")
    fresh = init_lora(jax.random.key(5), model.config, lora)
    assert all(float(jnp.abs(b).max()) == 0 for k, b in _leaves(fresh) if k.endswith("_b"))
    tokens, pos, mask = batch()
    np.testing.assert_array_equal(model.apply(join_params(base, fresh), tokens, pos, mask)[0],
                                  model.apply(base, tokens, pos, mask)[0])
    # Stacked like the blocks: [L, d_in, r] and [L, r, d_out].
    a = fresh["layers"]["attn"]["qkv"]["lora_q_a"]
    assert a.shape == (2, 32, 4) and fresh["layers"]["attn"]["qkv"]["lora_q_b"].shape == (2, 4, 32)


def _leaves(tree):
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def test_generation_with_adapters_equals_merged_model():
    model, lora, base, adapters = setup("llama")
    prompts = jax.random.randint(jax.random.key(4), (2, 5), 3, 64)
    mask = jnp.ones_like(prompts)
    gen = GenerationConfig(max_new_tokens=6, greedy=True, stop_token_ids=(2,), pad_token_id=0)
    a = generate(model, join_params(base, adapters), prompts, mask, jax.random.key(0), gen)
    b = generate(model, merge_lora(base, adapters, model.config, lora), prompts, mask, jax.random.key(0), gen)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_join_and_strip():
    _, _, base, adapters = setup("gpt2")
    joined = join_params(base, adapters)
    assert joined["layers"]["attn"]["qkv"]["kernel"] is base["layers"]["attn"]["qkv"]["kernel"]  # no copy
    assert jax.tree.structure(strip_lora(joined)) == jax.tree.structure(base)
    with pytest.raises(ValueError, match="same place"):
        join_params(base, {"embed": jnp.zeros(3)})


def test_model_without_alpha_refuses_adapters():
    model, _, base, adapters = setup("gpt2")
    tokens, pos, mask = batch()
    with pytest.raises(ValueError, match="lora_alpha"):
        LanguageModel(model.config).apply(join_params(base, adapters), tokens, pos, mask)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank"), (dict(alpha=0.0), "alpha"), (dict(targets=("q", "x")), "targets"),
    (dict(targets=("qkv", "q")), "qkv"), (dict(dropout=0.1), "dropout"), (dict(targets=()), "targets"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)


def test_gate_needs_swiglu():
    with pytest.raises(ValueError, match="gate"):
        init_lora(jax.random.key(0), gpt2_config(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4),
                  LoRAConfig(targets=("gate",)))
