"""Row-sharding hints for steps traced under a device mesh.

Steps never name devices, but an operation that re-forms a batch (a gather by a random permutation, a
reshape into micro-batches) leaves the compiler free to replicate its result, and then every device would
compute the whole minibatch. :func:`shard_rows` states the intent, that rows stay split over the mesh's batch
axes, when the step is traced inside ``jax.set_mesh(mesh)`` (as ``jaxrlhf.parallel`` and the trainers do);
without a mesh it does nothing, so the same step runs unchanged on one device.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import PartitionSpec

BATCH_AXES = ("data", "fsdp")  # mesh axes that split a batch's rows (jaxrlhf.parallel builds the mesh)


def shard_rows(tree: Any) -> Any:
    """Constrain every leaf's leading axis to be split over the current mesh's batch axes (no-op without a
    mesh, for scalars, and for row counts the batch axes do not divide)."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    if not axes:
        return tree
    shards = math.prod(mesh.shape[a] for a in axes)

    def constrain(x: jax.Array) -> jax.Array:
        if x.ndim == 0 or x.shape[0] % shards:
            return x
        return jax.lax.with_sharding_constraint(x, PartitionSpec(axes, *([None] * (x.ndim - 1))))

    return jax.tree.map(constrain, tree)
