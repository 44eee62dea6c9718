"""FSDP placement, sharded generation and N→M-device checkpoint restore on 8 simulated devices."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from jaxrlhf.models.config import gpt2_config
from jaxrlhf.models.transformer import LanguageModel
from jaxrlhf.parallel import (
    ParallelConfig,
    make_mesh,
    per_device_bytes,
    place_state,
    shard_batch,
    state_shardings,
)
from jaxrlhf.rollout.generate import GenerationConfig, generate
from jaxrlhf.train.checkpoint import CheckpointManager

MODEL = LanguageModel(
    gpt2_config(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=64)
)


def test_eight_devices():
    assert jax.device_count() == 8


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(lambda p: p * 2.0, MODEL.init(jax.random.key(0)))


def test_fsdp_really_shards_parameters_and_optimizer_state(params):
    state = {"params": params, "opt": optax.adam(1e-3).init(params)}
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    replicated = place_state(make_mesh(ParallelConfig(data=8)), state, min_size=1024)
    sharded = place_state(make_mesh(ParallelConfig(data=2, fsdp=4)), state, min_size=1024)
    assert per_device_bytes(replicated) == total
    # Every large leaf is split 4 ways; only the small vectors (< 1024 elements) stay whole.
    small = sum(x.nbytes for x in jax.tree.leaves(state) if x.size < 1024)
    assert per_device_bytes(sharded) == pytest.approx((total - small) / 4 + small)
    # Block params are stacked [layers, d, 3d]: the largest divisible axis (3d) is split, not the layers.
    qkv = sharded["params"]["layers"]["attn"]["qkv"]["kernel"]
    assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp")
    assert {s.data.shape for s in qkv.addressable_shards} == {(2, 64, 48)}
    mu = sharded["opt"][0].mu["layers"]["attn"]["qkv"]["kernel"]
    assert mu.sharding == qkv.sharding  # Adam moments follow their parameters


@pytest.mark.parametrize(
    "mesh_cfg", [ParallelConfig(data=8), ParallelConfig(data=2, fsdp=4)], ids=["data8", "data2-fsdp4"]
)
def test_sharded_generation_gives_the_same_tokens(params, mesh_cfg):
    rng = np.random.RandomState(0)
    tokens = rng.randint(3, 64, size=(16, 6)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[::3, :2] = 0
    config = GenerationConfig(max_new_tokens=8, temperature=1.1, top_k=20, stop_token_ids=(2,))
    key = jax.random.key(7)
    single = jax.device_get(
        generate(MODEL, jax.device_put(params, jax.devices()[0]), tokens, mask, key, config)
    )

    mesh = make_mesh(mesh_cfg)
    sharded_params = place_state(mesh, params, min_size=1024)
    batch = shard_batch(mesh, {"tokens": tokens, "mask": mask})
    out = generate(MODEL, sharded_params, batch["tokens"], batch["mask"], key, config)
    assert len(out.response_tokens.sharding.device_set) == 8  # each device generated its share
    out = jax.device_get(out)
    np.testing.assert_array_equal(out.response_tokens, single.response_tokens)
    np.testing.assert_allclose(out.logprobs, single.logprobs, atol=1e-5)


def _save_restore(tmp_path, params, save_mesh, restore_mesh):
    state = {"params": params, "opt": optax.adam(1e-3).init(params), "step": np.int32(3)}
    placed = place_state(save_mesh, state, min_size=1024)
    with CheckpointManager(tmp_path, max_to_keep=2) as ckpt:
        ckpt.save(3, placed, {"note": "x"}, force=True)
        ckpt.wait()
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=s),
        state,
        state_shardings(restore_mesh, state, min_size=1024),
    )
    with CheckpointManager(tmp_path) as ckpt:
        restored, meta = ckpt.restore(target=target)
    assert meta["note"] == "x"
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return restored


def test_checkpoint_saved_on_eight_restores_on_one(tmp_path, params):
    restored = _save_restore(
        tmp_path,
        params,
        make_mesh(ParallelConfig(data=2, fsdp=4)),
        make_mesh(ParallelConfig(), devices=jax.devices()[:1]),
    )
    assert {len(x.sharding.device_set) for x in jax.tree.leaves(restored)} == {1}


def test_checkpoint_saved_on_one_restores_on_eight(tmp_path, params):
    restored = _save_restore(
        tmp_path,
        params,
        make_mesh(ParallelConfig(), devices=jax.devices()[:1]),
        make_mesh(ParallelConfig(data=2, fsdp=4)),
    )
    qkv = restored["params"]["layers"]["attn"]["qkv"]["kernel"]
    assert len(qkv.sharding.device_set) == 8
    assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp")
