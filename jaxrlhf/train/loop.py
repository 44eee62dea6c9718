"""The one training loop of every trainer (SFT, reward model, PPO, A2C): batch → step → bookkeeping.

    hooks = LoopHooks(step=..., window_metrics=..., evaluate=..., eval_every=..., postfix=(...))
    state, result = training_loop(run, state, rng, batches, total, hooks)

The loop resumes from the latest checkpoint (state, key and the data iterator's position, so a resumed run
draws the same batches and keys as an uninterrupted one), then opens the run directory, and for each step:
draws a host batch (``timing/data``), splits a key, runs ``hooks.step`` (which times its own phases), does
the per-step bookkeeping (recompilation watch, non-finite policy, metrics window), logs the window every
``logging.log_every`` steps (and before stopping) with ``hooks.window_metrics`` (perf/*, counters),
evaluates every ``train.eval_every`` steps, and checkpoints on schedule, stopping after
``train.stop_at_step``. SIGINT and SIGTERM (Ctrl-C, ``kill``, a scheduler's pre-emption) end the step in
progress, log it, write a checkpoint and raise :class:`~jaxrlhf.train.signals.RunInterrupted`; rerunning
the command resumes there. The first step says it is compiling and how long it took. What differs between
trainers lives in the hooks.

Steps return metrics under their final names (``loss/sft``, ``train/accuracy``, ``objective/kl``, …); the
loop logs them as they are. A step whose ``train/skipped_updates`` is not 0 was not finite: the run gives up
after ``train.max_consecutive_nonfinite`` of those in a row and logs the total as ``train/nonfinite_skips``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

from jaxrlhf.config import ConfigError
from jaxrlhf.data import Batch, BatchIterator
from jaxrlhf.train.run import Run, RunResult
from jaxrlhf.train.signals import GracefulStop

log = logging.getLogger("jaxrlhf")

SKIPPED = "train/skipped_updates"


class StepOutcome(NamedTuple):
    """What one step reports to the loop."""

    metrics: Mapping[str, float]  # host floats under their final names
    tallies: Mapping[str, float]  # amounts summed over the logging window (e.g. tokens)
    seq_len: int  # padded sequence length of the step's batch (for the FLOPs behind MFU)


@dataclasses.dataclass(frozen=True)
class LoopHooks:
    """What differs between trainers.

    step(state, host_batch, key) -> (state, StepOutcome): one training step (the hook puts the batch on the
    mesh and times its phases with ``run.report.timers``). window_metrics(step, last_outcome) -> extra
    metrics of the logging window (perf/*, counters), read from ``run.report.window.tallies`` and the timers.
    after_step(step, state, outcome): anything else per step (sample texts, warnings). evaluate(state) ->
    ``eval/*`` metrics, every ``eval_every`` steps (0: only at the end) and after the last step. postfix:
    metric names for the progress bar.
    """

    step: Callable[[Any, Batch, jax.Array], tuple[Any, StepOutcome]]
    window_metrics: Callable[[int, StepOutcome], dict[str, float]] = lambda step, outcome: {}
    after_step: Callable[[int, Any, StepOutcome], None] | None = None
    evaluate: Callable[[Any], dict[str, float]] | None = None
    eval_every: int = 0
    postfix: tuple[str, ...] = ()


def training_loop(
    run: Run, state: Any, rng: jax.Array, batches: BatchIterator, total: int, hooks: LoopHooks
) -> tuple[Any, RunResult]:
    """Train ``state`` for ``total`` steps, resuming from the latest checkpoint when there is one.

    Returns the final state and a :class:`RunResult` (``export_dir`` left for the caller; ``stopped_early``
    at ``train.stop_at_step``, in which case the final evaluation is skipped too). SIGINT or SIGTERM end
    the step in progress, checkpoint it and raise :class:`~jaxrlhf.train.signals.RunInterrupted`.
    """
    state, rng, step, metadata = run.checkpoints.resume(state, rng, batches)
    if step > total:  # before run.open: the directory's config.yaml stays the checkpoints' own
        raise ConfigError(
            f"train.steps: this run has {total} steps, but {run.checkpoints.directory} holds a checkpoint at "
            f"step {step}; set train.steps (or train.epochs) to more than {step} to train further, or choose "
            "another logging.run_dir to start over")
    finished = step == total
    report = run.report
    report.nonfinite.total_skips = int(metadata.get("nonfinite_skips", 0))
    run.open(step)
    if not finished:  # a finished run says so below, before evaluating and exporting again
        log.info("%s: %s, checkpoints every %d step(s) in %s", run.command,
                 f"steps {step + 1}–{total}" if step else f"{total} steps", run.checkpoints.cfg.every,
                 run.checkpoints.directory)
    report.start_progress(total, step)
    stopped = False
    first = step
    with GracefulStop() as stop:
        while step < total:
            if step == first:
                log.info("step %d: compiling (the first step traces and compiles the jitted steps)", step + 1)
                started = time.perf_counter()
            with report.timers("step_total"):
                with report.timers("data"):
                    batch = next(batches)
                rng, key = jax.random.split(rng)
                state, outcome = hooks.step(state, batch, key)
                step += 1
            if step == first + 1:
                log.info("step %d: compiled and ran in %.1f s; later steps reuse the compiled program",
                         step, time.perf_counter() - started)
            report.after_step(step, outcome.metrics, finite=outcome.metrics.get(SKIPPED, 0.0) == 0.0)
            report.window.tally(**outcome.tallies)
            interrupted = stop.requested()
            if report.should_log(step, total) or run.checkpoints.stops_at(step, total) or interrupted:
                report.flush_window(step, hooks.window_metrics(step, outcome), hooks.postfix)
            if hooks.after_step is not None:
                hooks.after_step(step, state, outcome)
            if (hooks.evaluate is not None and hooks.eval_every and step % hooks.eval_every == 0
                    and step < total and not interrupted):
                report.log_eval(step, hooks.evaluate(state))
            skips = {"nonfinite_skips": report.nonfinite.total_skips}
            if interrupted:
                run.checkpoints.save_now(step, state, rng, batches, skips)
                raise stop.interrupted(step, total, run.checkpoints.directory)
            if run.checkpoints.end_step(step, total, state, rng, batches, skips):
                stopped = True
                break
        run.checkpoints.wait()  # the last checkpoint has committed (or its failure is reported) before export
    final = dict(report.last_logged)
    if finished:
        log.info("%s: already trained to step %d; evaluating and exporting again (metrics.jsonl keeps its "
                 "rows of that step)", run.command, step)
    if hooks.evaluate is not None and not stopped:
        evaluated = hooks.evaluate(state)
        if not finished:  # a finished run's final evaluation is already logged
            report.log_eval(step, evaluated)
        final.update(evaluated)
    return state, RunResult(run.run_dir, step, None, final, stopped_early=stopped)
