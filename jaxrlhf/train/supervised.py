"""The loop hooks of the supervised trainers (SFT, reward model): one jitted step per batch, timed as
``timing/update``, with throughput and MFU over the real tokens of the batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jaxrlhf.data import Batch
from jaxrlhf.train.loop import LoopHooks, StepOutcome
from jaxrlhf.train.reporting import host_scalars
from jaxrlhf.train.run import Run
from jaxrlhf.train.timing import mfu, throughput

# A jitted step(state, batch, key) -> (state, metrics under their final names).
StepFn = Callable[[Any, Batch, jax.Array], tuple[Any, Mapping[str, jax.Array]]]

TOKEN_MASKS = ("mask", "chosen_mask", "rejected_mask")


def batch_tokens(batch: Batch) -> tuple[int, int]:
    """(real tokens in the batch over all its sequences, padded sequence length)."""
    masks = [np.asarray(batch[k]) for k in TOKEN_MASKS if k in batch]
    return int(sum(m.sum() for m in masks)), int(masks[0].shape[-1])


def supervised_hooks(
    run: Run,
    step_fn: StepFn,
    flops_per_token: Callable[[int], float],
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    eval_every: int = 0,
    postfix: tuple[str, ...] = (),
) -> LoopHooks:
    """Hooks running ``step_fn`` on each batch; ``flops_per_token(seq_len)`` gives the training FLOPs per
    token for MFU (``perf/mfu``, when the peak is known) beside ``perf/tokens_per_s`` of the update."""
    report = run.report
    step_fn = report.watch("step", step_fn)

    def step(state: Any, batch: Batch, key: jax.Array) -> tuple[Any, StepOutcome]:
        with report.timers("update") as t:
            state, metrics = t.block(step_fn(state, run.shard(batch), key))
        tokens, seq_len = batch_tokens(batch)
        return state, StepOutcome(host_scalars(metrics), {"tokens": tokens}, seq_len)

    def window_metrics(step: int, outcome: StepOutcome) -> dict[str, float]:
        seconds, tokens = report.timers.totals.get("update", 0.0), report.window.tallies["tokens"]
        perf = {"perf/tokens_per_s": throughput(tokens, seconds)}
        if report.peak_known:
            perf["perf/mfu"] = mfu(flops_per_token(outcome.seq_len), tokens, seconds, report.peak_flops)
        return perf

    return LoopHooks(step, window_metrics, evaluate=evaluate, eval_every=eval_every, postfix=postfix)
