"""Single-device checks of the sharding rules and mesh arithmetic."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrlhf.parallel import (
    ParallelConfig,
    fsdp_spec,
    initialize_distributed,
    make_mesh,
    mesh_shape,
    shard_batch,
    split_fraction,
)


def test_fsdp_spec_picks_the_largest_divisible_dimension():
    assert fsdp_spec((384, 1152), 4, 16) == P(None, "fsdp")
    assert fsdp_spec((8192, 384), 4, 16) == P("fsdp", None)
    assert fsdp_spec((1536, 384), 4, 16) == P("fsdp", None)
    assert fsdp_spec((10, 7), 4, 16) == P()  # nothing divisible
    assert fsdp_spec((384,), 4, 4096) == P()  # below the size threshold
    assert fsdp_spec((384, 1152), 1, 16) == P()  # no fsdp axis
    assert fsdp_spec((), 4, 0) == P()


def test_split_fraction_counts_the_bytes_fsdp_splits():
    """What Run.place warns about: an fsdp size that divides no dimension saves no memory."""
    tree = {"w": np.zeros((320, 32), np.float32), "b": np.zeros((32,), np.float32), "step": np.int32(0)}
    total = 320 * 32 * 4 + 32 * 4 + 4
    assert split_fraction(tree, 4, 16) == pytest.approx((320 * 32 * 4 + 32 * 4) / total)
    assert split_fraction(tree, 4, 4096) == pytest.approx(320 * 32 * 4 / total)  # b below the threshold
    assert split_fraction(tree, 3, 16) == 0.0  # 320 and 32: neither divisible by 3
    assert split_fraction({"k": jax.random.key(0)}, 2, 0) == 0.0 and split_fraction({}, 2) == 1.0


def test_mesh_shape_arithmetic_and_errors():
    assert mesh_shape(ParallelConfig(), 8) == (8, 1)
    assert mesh_shape(ParallelConfig(data=2, fsdp=4), 8) == (2, 4)
    assert mesh_shape(ParallelConfig(fsdp=2), 8) == (4, 2)
    with pytest.raises(ValueError, match="fsdp=3 must be >= 1 and divide the device count 8"):
        mesh_shape(ParallelConfig(fsdp=3), 8)
    with pytest.raises(ValueError, match="does not fit 8 devices"):
        mesh_shape(ParallelConfig(data=4, fsdp=4), 8)


def test_single_device_mesh_and_batch():
    mesh = make_mesh(ParallelConfig())
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
    batch = shard_batch(mesh, {"tokens": np.arange(8).reshape(4, 2), "n": np.float32(3)})
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), np.arange(8).reshape(4, 2))


def test_distributed_is_not_started_without_a_coordinator(monkeypatch):
    for var in (
        "JAX_COORDINATOR_ADDRESS",
        "SLURM_JOB_ID",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
        "MEGASCALE_COORDINATOR_ADDRESS",
    ):
        monkeypatch.delenv(var, raising=False)
    assert initialize_distributed(ParallelConfig()) is False
    assert initialize_distributed(ParallelConfig(distributed="never")) is False
    with pytest.raises(ValueError, match="expected auto"):
        initialize_distributed(ParallelConfig(distributed="sometimes"))


def test_distributed_settings_come_from_the_config_else_the_environment(monkeypatch):
    from jaxrlhf.parallel import distributed_settings

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:4000")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert distributed_settings(ParallelConfig()) == {
        "coordinator_address": "10.0.0.1:4000",
        "num_processes": 4,
        "process_id": 3,
    }
    given = ParallelConfig(coordinator_address="host0:1234", num_processes=2, process_id=0)
    assert distributed_settings(given) == {
        "coordinator_address": "host0:1234",
        "num_processes": 2,
        "process_id": 0,
    }
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var)
    assert distributed_settings(ParallelConfig()) == {}  # left to JAX's cluster detection (SLURM, …)
    monkeypatch.setenv("JAX_PROCESS_ID", "first")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='first' is not an integer"):
        distributed_settings(ParallelConfig())


def test_cpu_collectives_default_to_gloo():
    from jaxrlhf.parallel import _use_cpu_collectives

    before = jax.config.jax_cpu_collectives_implementation
    try:
        jax.config.update("jax_cpu_collectives_implementation", None)
        _use_cpu_collectives()
        assert jax.config.jax_cpu_collectives_implementation == "gloo"
        jax.config.update("jax_cpu_collectives_implementation", "mpi")
        _use_cpu_collectives()  # a deliberate choice is kept
        assert jax.config.jax_cpu_collectives_implementation == "mpi"
    finally:
        jax.config.update("jax_cpu_collectives_implementation", before)
