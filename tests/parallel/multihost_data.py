"""Run by test_multihost.py under ``jaxrlhf.launch``: each process prints, as one JSON line, the example ids
of its share of a few global batches and the global batch the mesh assembles from the shares.

    python tests/parallel/multihost_data.py NUM_EXAMPLES BATCH_SIZE SEED NUM_BATCHES
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from jaxrlhf import parallel
from jaxrlhf.data import BatchIterator


def main() -> None:
    num_examples, batch_size, seed, num_batches = (int(a) for a in sys.argv[1:5])
    config = parallel.ParallelConfig()
    parallel.initialize_distributed(config)
    mesh = parallel.make_mesh(config)
    batches = BatchIterator(
        list(range(num_examples)),
        batch_size,
        seed=seed,
        shuffle=True,
        collate=lambda rows, **_: {"id": np.asarray(rows, np.int32)},
    )
    local, assembled, back = [], [], []
    for _ in range(num_batches):
        batch = next(batches)
        local.append(batch["id"].tolist())
        placed = parallel.shard_batch(mesh, batch)
        assembled.append(parallel.to_host(placed)["id"].tolist())
        # Back to this process's rows, from the row-split array and from a replicated copy of it.
        replicated = jax.device_put(placed["id"], parallel.replicated(mesh))
        rows = [parallel.process_rows(mesh, x).tolist() for x in (placed["id"], replicated)]
        back.append(rows)
    record = {
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "local": local,
        "global": assembled,
        "process_rows": back,
        # A process-local value comes back as it is, not concatenated with the other processes' copies.
        "local_to_host": parallel.to_host(np.arange(3) + jax.process_index()).tolist(),
    }
    print("ROWS " + json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
