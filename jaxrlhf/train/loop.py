"""The supervised training loop shared by SFT and reward-model training: batch → jitted step → bookkeeping.

The checkpointed state is ``{"train": TrainState, "rng": key}`` plus metadata holding the data iterator's
position, so a resumed run draws the same batches and keys as an uninterrupted one and reaches the same
parameters. Step ``s`` in logs and checkpoints means "after ``s`` updates".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jaxrlhf.data import Batch, BatchIterator
from jaxrlhf.train.common import Run, RunResult, to_host
from jaxrlhf.train.timing import mfu, throughput

log = logging.getLogger("jaxrlhf")

# A jitted step(state, batch, key) -> (state, metrics); an eval(state) -> metrics run on the host.
StepFn = Callable[[Any, Batch, jax.Array], tuple[Any, Mapping[str, jax.Array]]]
EvalFn = Callable[[Any], dict[str, float]]

TOKEN_MASKS = ("mask", "chosen_mask", "rejected_mask")


def batch_tokens(batch: Batch) -> tuple[int, int]:
    """(real tokens in the batch over all its sequences, padded sequence length)."""
    masks = [np.asarray(batch[k]) for k in TOKEN_MASKS if k in batch]
    return int(sum(m.sum() for m in masks)), int(masks[0].shape[-1])


def rename_step_metrics(metrics: Mapping[str, float], loss_name: str) -> dict[str, float]:
    """Step metrics under logged names: ``loss`` → ``loss/<loss_name>``, ``lr`` kept, others ``train/*``.

    ``nonfinite`` and ``tokens`` are dropped (the tracker logs ``train/nonfinite_skips``; tokens feed perf/*).
    """
    out = {}
    for k, v in metrics.items():
        if k in ("nonfinite", "tokens"):
            continue
        out["loss/" + loss_name if k == "loss" else k if k == "lr" or "/" in k else "train/" + k] = v
    return out


def supervised_loop(
    run: Run,
    state: Any,
    rng: jax.Array,
    step_fn: StepFn,
    batches: BatchIterator,
    total: int,
    *,
    loss_name: str,
    flops_per_token: Callable[[int], float],
    eval_fn: EvalFn | None = None,
    eval_every: int = 0,
    postfix: tuple[str, ...] = (),
) -> tuple[Any, RunResult]:
    """Train ``state`` for ``total`` steps, resuming from the latest checkpoint when there is one.

    ``flops_per_token(seq_len)`` gives the training FLOPs per token for MFU. Returns the final state and a
    :class:`RunResult` (``export_dir`` left for the caller; ``stopped_early`` at ``train.stop_at_step``).
    """
    state, rng, step = run.resume_loop(state, rng, batches)
    run.start_progress(total, step)
    step_fn = run.watch("step", step_fn)
    stopped = False
    while step < total:
        with run.timers("step_total"):
            with run.timers("data"):
                batch = next(batches)
            rng, key = jax.random.split(rng)
            with run.timers("update") as t:
                state, metrics = t.block(step_fn(state, run.shard(batch), key))
            step += 1
            real, seq_len = batch_tokens(batch)
            run.window.tally(tokens=real)
            host = to_host(metrics)
        run.after_step(step, rename_step_metrics(host, loss_name), finite=host.get("nonfinite", 0.0) == 0.0)
        if run.should_log(step, total):
            seconds, tokens = run.timers.totals.get("update", 0.0), run.window.tallies["tokens"]
            perf = {"perf/tokens_per_s": throughput(tokens, seconds)}
            if run.peak_known:
                perf["perf/mfu"] = mfu(flops_per_token(seq_len), tokens, seconds, run.peak_flops)
            run.flush_window(step, perf, postfix)
        if eval_fn is not None and eval_every and step % eval_every == 0 and step < total:
            run.log_eval(step, eval_fn(state))
        if run.end_step(step, total, state, rng, batches):
            stopped = True
            break
    final = dict(run.last_logged)
    if eval_fn is not None and not stopped:
        evaluated = eval_fn(state)
        run.log_eval(step, evaluated)
        final.update(evaluated)
    return state, RunResult(run.run_dir, step, None, final, stopped_early=stopped)
