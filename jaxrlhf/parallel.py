"""Device mesh, shardings and multi-host start-up.

Parallelism is a property of shardings, never of step code. A 2-D mesh has a ``data`` axis and an ``fsdp``
axis. Batches are split along both (every device sees different rows); parameters and optimiser state are
replicated, or with ``fsdp > 1`` split along their largest divisible dimension over the ``fsdp`` axis. The
same jitted ``step(state, batch, key)`` then runs on 1 device, N local devices or many hosts: XLA inserts the
all-reduce of the gradients (pmap semantics, since every loss is a mean over the global batch) and the
all-gathers of FSDP-sharded weights.

    mesh = make_mesh(ParallelConfig(data=-1, fsdp=1))
    state = jax.device_put(state, state_shardings(mesh, state))
    step = jit_step(step_fn, mesh, state)
    state, metrics = step(state, shard_batch(mesh, batch), key)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxrlhf.collective_order import maybe_sequence_loops
from jaxrlhf.steps.sharding import BATCH_AXES
from jaxrlhf.steps.state import FrozenApart, detach_frozen

log = logging.getLogger(__name__)

DATA_AXIS, FSDP_AXIS = BATCH_AXES  # defined beside the steps' row hints, which use the same names


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Mesh shape and multi-host settings.

    data: devices along the data-parallel axis (-1: all devices not used by ``fsdp``).
    fsdp: devices each parameter is split across (1: parameters replicated).
    fsdp_min_size: parameters with fewer elements stay replicated (splitting tiny vectors costs more
        than it saves).
    distributed: "auto" initialises ``jax.distributed`` when a coordinator is configured here or in the
        standard environment (JAX_COORDINATOR_ADDRESS, or a cluster JAX detects: SLURM, Open MPI, TPU pods);
        "always" initialises unconditionally (letting JAX auto-detect); "never" runs single-process.
    coordinator_address, num_processes, process_id: the multi-host settings; each unset one is read from
        JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, else left to JAX's cluster detection.
        With more than one process, CPU collectives go through gloo.
    initialization_timeout: seconds to wait for every process to join (JAX's default when unset).
    """

    data: int = -1
    fsdp: int = 1
    fsdp_min_size: int = 4096
    distributed: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout: int | None = None


_CLUSTER_ENV = (
    "JAX_COORDINATOR_ADDRESS",
    "SLURM_JOB_ID",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)
# JAX itself reads JAX_COORDINATOR_ADDRESS; these two complete it for a cluster JAX does not detect (and
# for python -m jaxrlhf.launch, which sets all three).
NUM_PROCESSES_ENV, PROCESS_ID_ENV = "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def distributed_settings(config: ParallelConfig) -> dict[str, Any]:
    """The ``jax.distributed.initialize`` arguments: the ``parallel.*`` keys, else the environment
    (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``); unset ones are left to JAX's
    cluster detection."""
    address, num, index = config.coordinator_address, config.num_processes, config.process_id
    settings = {
        "coordinator_address": address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None,
        "num_processes": num if num is not None else _env_int(NUM_PROCESSES_ENV),
        "process_id": index if index is not None else _env_int(PROCESS_ID_ENV),
    }
    return {k: v for k, v in settings.items() if v is not None}


def _use_cpu_collectives() -> None:
    """Cross-process collectives on the CPU backend go through gloo (TCP) unless another implementation
    (e.g. "mpi") was chosen. Accelerators use their own collectives; this only concerns the CPU client, and
    must be set before the backend starts."""
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize_distributed(config: ParallelConfig) -> bool:
    """Start JAX's multi-process runtime when configured; returns whether it is (now) initialised.

    Must run before any other JAX call touches the devices. Safe to call twice.
    """
    if config.distributed not in ("auto", "always", "never"):
        raise ValueError(f"parallel.distributed: expected auto|always|never, got {config.distributed!r}")
    if config.distributed == "never":
        return False
    from jax._src import distributed as _dist  # the public API has no "is initialised" query

    if _dist.global_state.client is not None:
        return True
    explicit = config.coordinator_address is not None
    detected = any(v in os.environ for v in _CLUSTER_ENV)
    if config.distributed == "auto" and not (explicit or detected):
        return False
    kwargs = distributed_settings(config)
    if kwargs.get("num_processes", 2) > 1:
        _use_cpu_collectives()
    if config.initialization_timeout is not None:
        kwargs["initialization_timeout"] = config.initialization_timeout
    jax.distributed.initialize(**kwargs)
    log.info(
        "jax.distributed initialised: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def mesh_shape(config: ParallelConfig, num_devices: int | None = None) -> tuple[int, int]:
    """``(data, fsdp)`` sizes for ``num_devices`` (default: all devices), checking they multiply up."""
    n = jax.device_count() if num_devices is None else num_devices
    fsdp = config.fsdp
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"parallel.fsdp={fsdp} must be >= 1 and divide the device count {n}")
    data = n // fsdp if config.data == -1 else config.data
    if data < 1 or data * fsdp > n or n % (data * fsdp):
        raise ValueError(f"parallel.data={config.data} × parallel.fsdp={fsdp} does not fit {n} devices")
    return data, fsdp


def make_mesh(config: ParallelConfig = ParallelConfig(), devices: list | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh. ``fsdp`` is the inner axis so that it stays within a host's fast links."""
    devices = jax.devices() if devices is None else list(devices)
    data, fsdp = mesh_shape(config, len(devices))
    used = devices[: data * fsdp]
    # Auto axes: XLA propagates shardings through the step (GSPMD), so step code never names an axis.
    auto = (AxisType.Auto, AxisType.Auto)
    if len(used) == jax.device_count():
        # Let JAX order devices for the physical topology (ICI rings on TPU, NVLink islands on GPU).
        return jax.make_mesh((data, fsdp), BATCH_AXES, devices=used, axis_types=auto)
    return Mesh(np.asarray(used).reshape(data, fsdp), BATCH_AXES, axis_types=auto)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> PartitionSpec:
    """Split the largest dimension divisible by ``fsdp`` over the fsdp axis (replicate small/indivisible)."""
    if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    candidates = [(size, -i) for i, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return PartitionSpec()
    _, neg_axis = max(candidates)
    spec: list[Any] = [None] * len(shape)
    spec[-neg_axis] = FSDP_AXIS
    return PartitionSpec(*spec)


def split_fraction(tree: Any, fsdp: int, min_size: int = 4096) -> float:
    """The share of ``tree``'s bytes that :func:`fsdp_spec` splits over ``fsdp`` devices (1 when empty)."""
    total = split = 0
    for x in jax.tree.leaves(tree):
        shape = tuple(getattr(x, "shape", ()))
        try:
            itemsize = np.dtype(getattr(x, "dtype", np.float32)).itemsize
        except TypeError:  # e.g. a typed PRNG key
            itemsize = 8
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        total += nbytes
        split += nbytes if fsdp_spec(shape, fsdp, min_size) != PartitionSpec() else 0
    return split / total if total else 1.0


def state_shardings(mesh: Mesh, tree: Any, min_size: int = 4096) -> Any:
    """Shardings for params / optimiser state / any training state: by shape, so Adam's moments follow
    their parameters. Scalars and small leaves are replicated."""
    fsdp = mesh.shape[FSDP_AXIS]

    def leaf(x: Any) -> NamedSharding:
        shape = tuple(getattr(x, "shape", ()))
        return NamedSharding(mesh, fsdp_spec(shape, fsdp, min_size))

    return jax.tree.map(leaf, tree)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Rows split over every device (both mesh axes); other dimensions whole."""
    if ndim == 0:
        return replicated(mesh)
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shardings(mesh: Mesh, batch: Any) -> Any:
    return jax.tree.map(lambda x: batch_sharding(mesh, np.ndim(x)), batch)


def shard_batch(mesh: Mesh, batch: Any) -> Any:
    """Place a batch on the mesh, split along rows.

    Single process: ``batch`` is the global batch. Multi-host: each process passes its own rows (as the data
    loader splits them) and the result is one global array.
    """

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        if x.ndim and jax.process_count() == 1 and x.shape[0] % sharding.num_devices:
            raise ValueError(
                f"batch dimension {x.shape[0]} is not divisible by the {sharding.num_devices} "
                f"devices of the mesh {dict(mesh.shape)}"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def process_rows(mesh: Mesh, tree: Any) -> Any:
    """This process's rows of row-split global arrays, as NumPy, in global row order: the inverse of
    :func:`shard_batch` (e.g. for a host function that must see real values, then ``shard_batch`` of its
    per-row output). A leaf split differently is first resharded by rows; a scalar comes back whole."""

    def leaf(x: Any) -> np.ndarray:
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.ndim == 0:
            return np.asarray(x.addressable_data(0))
        x = jax.device_put(x, batch_sharding(mesh, x.ndim))  # no copy when already split by rows
        starts = {}
        for shard in x.addressable_shards:
            starts.setdefault(shard.index[0].start or 0, shard.data)  # one copy of each row block
        return np.concatenate([np.asarray(starts[s]) for s in sorted(starts)])

    return jax.tree.map(leaf, tree)


class MeshJit:
    """A jitted function traced and run inside ``jax.set_mesh(mesh)``, so that the steps' row hints
    (:func:`jaxrlhf.steps.sharding.shard_rows`) see the mesh. ``lower`` and the cache size pass through."""

    def __init__(self, jitted: Any, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self.jitted(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args, **kwargs)

    def _cache_size(self) -> int:
        return self.jitted._cache_size()


def jit_step(step: Callable, mesh: Mesh, state: Any, donate: bool = True, min_size: int = 4096) -> MeshJit:
    """``jax.jit(step)`` over ``mesh``, with the state's shardings pinned on input and output (so a step
    never silently changes layouts) and the state buffers donated, except a TrainState's frozen params
    (LoRA's base: the RL reference shares them), which go in as an argument of their own and live on.
    ``step(state, batch, key) -> (state, metrics)``."""
    state_sh = state_shardings(mesh, state, min_size)
    step = maybe_sequence_loops(step)  # several CPU processes: one collective order on every device
    if not donate:
        jitted = jax.jit(step, in_shardings=(state_sh, None, replicated(mesh)),
                         out_shardings=(state_sh, replicated(mesh)))
        return MeshJit(jitted, mesh)
    bare_sh, frozen_sh = detach_frozen(state_sh)
    jitted = FrozenApart(step, lambda apart: jax.jit(
        apart,
        in_shardings=(bare_sh, frozen_sh, None, replicated(mesh)),
        out_shardings=(bare_sh, replicated(mesh)),
        donate_argnums=(0,),
    ))
    return MeshJit(jitted, mesh)


def place_state(mesh: Mesh, state: Any, min_size: int = 4096) -> Any:
    """Put a (host or single-device) state on the mesh with :func:`state_shardings`."""
    return jax.device_put(state, state_shardings(mesh, state, min_size))


def per_device_bytes(tree: Any) -> int:
    """Bytes of ``tree`` held by the first local device (what FSDP divides)."""
    device = jax.local_devices()[0]
    total = 0
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            total += sum(s.data.nbytes for s in x.addressable_shards if s.device == device)
        else:
            total += np.asarray(x).nbytes
    return total


def to_host(tree: Any) -> Any:
    """Full numpy copies of (possibly sharded, possibly multi-host) arrays on every process.

    A global array spanning other processes is gathered (a collective: every process must call this with
    the same tree); a process-local array or host value is copied as it is (never concatenated with the
    other processes' copies).
    """

    def leaf(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:  # every process already holds the whole value
                return np.asarray(x.addressable_data(0))
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(leaf, tree)


def is_main_process() -> bool:
    """Only process 0 logs, writes metrics and exports."""
    return jax.process_index() == 0
