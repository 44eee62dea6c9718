"""The compiled decode loop copies no KV-cache-sized buffer per step (read from the optimised HLO)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jaxrlhf.models.config import gpt2_config, llama_config
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.rollout.generate import GenerationConfig, generate
from jaxrlhf.rollout.loop_copies import large_loop_writes

CONFIGS = {
    "gpt2": gpt2_config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64),
    "llama-gqa": llama_config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                              intermediate_size=48, max_position_embeddings=64),
}
BATCH, PROMPT, NEW = 2, 8, 8


def decode_loop_writes(cfg) -> list:
    """Buffers of at least one layer's K (or V) cache that the decode loop writes per step."""
    model = LanguageModel(cfg)
    params = jax.eval_shape(model.init, jax.random.key(0))
    tokens = np.ones((BATCH, PROMPT), np.int32)
    text = generate.lower(model, params, tokens, tokens, jax.random.key(0),
                          GenerationConfig(max_new_tokens=NEW)).compile().as_text()
    layer_cache = BATCH * cfg.num_kv_heads * cfg.head_dim * (PROMPT + NEW)
    return large_loop_writes(text, "decode_loop", layer_cache)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("variant", [{}, {"scan_layers": False}], ids=["default", "unrolled"])
def test_decode_step_copies_no_cache_sized_buffer(name, variant):
    # float32: XLA:CPU has no bfloat16 dynamic-update-slice or dot, and would convert the cache each step.
    writes = decode_loop_writes(dataclasses.replace(CONFIGS[name], **variant))
    assert writes == [], "\n".join(map(str, writes))


def test_a_scanned_decode_step_copies_each_layer_out_of_the_stack():
    """Why decoding is unrolled by default: in a rolled layer loop every weight and cache read is a
    dynamic slice of the stacks, which XLA materialises before the matmul. The check sees those copies."""
    cfg = dataclasses.replace(CONFIGS["gpt2"], scan_decode=True)
    writes = decode_loop_writes(cfg)
    layer_cache = BATCH * cfg.num_kv_heads * cfg.head_dim * (PROMPT + NEW)
    assert any(w.elements == layer_cache and "dynamic_slice" in w.op_name for w in writes), writes
