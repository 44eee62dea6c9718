"""The one training loop with a toy step (no model): the logging window, evaluation and checkpoint
schedules, ``stop_at_step``, resuming where it stopped, each step logged once, and the non-finite policy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.data import BatchIterator
from jaxrlhf.train.loop import LoopHooks, StepOutcome, training_loop
from jaxrlhf.train.metrics import read_metrics_jsonl
from jaxrlhf.train.nonfinite import NonFiniteError
from jaxrlhf.train.run import Run
from jaxrlhf.train.run_config import CheckpointSection, LoggingSection, TrainSection

QUIET = dict(tensorboard=False, progress_bar=False, mfu_matmul_size=0, log_every=2)


def make_run(run_dir, train: TrainSection, every: int = 2) -> Run:
    logging_ = LoggingSection(run_dir=str(run_dir), **QUIET)
    checkpoint = CheckpointSection(every=every, keep=5, async_save=False)
    return Run("toy", {"train": {"steps": train.steps}}, checkpoint, logging_, train)


def toy_hooks(run: Run, nan_from: int | None = None, evaluate: bool = True) -> LoopHooks:
    """state = running sum of the batches; metric loss/toy = the batch's sum (NaN from a given step on)."""

    def step(state, batch, key):
        del key
        total = float(np.sum(batch))
        skipped = float(nan_from is not None and int(state["steps"]) + 1 >= nan_from)
        if not skipped:
            state = {"sum": state["sum"] + total, "steps": state["steps"] + 1}
        else:
            state = {"sum": state["sum"], "steps": state["steps"] + 1}
        return state, StepOutcome({"loss/toy": total, "train/skipped_updates": skipped}, {"rows": 2.0}, 2)

    def window_metrics(step, outcome):
        return {"rows_in_window": run.report.window.tallies["rows"]}

    evaluate_fn = (lambda state: {"eval/sum": float(state["sum"])}) if evaluate else None
    return LoopHooks(step, window_metrics, evaluate=evaluate_fn, eval_every=3)


def batches() -> BatchIterator:
    return BatchIterator(list(range(10)), 2, seed=0, shuffle=True)  # batches: lists of two numbers


def start():
    return {"sum": jnp.zeros(()), "steps": jnp.zeros((), jnp.int32)}, jax.random.key(0)


def test_schedules_stop_and_resume(tmp_path):
    with make_run(tmp_path, TrainSection(steps=7)) as run:
        state, result = training_loop(run, *start(), batches(), 7, toy_hooks(run))
    whole = float(state["sum"])
    assert result.step == 7 and not result.stopped_early and result.metrics["eval/sum"] == whole
    records = read_metrics_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "loss/toy" in r] == [2, 4, 6, 7]  # every 2 steps and the last
    assert [r["step"] for r in records if "eval/sum" in r] == [3, 6, 7]  # every 3 steps and at the end
    assert [r["rows_in_window"] for r in records if "loss/toy" in r] == [4.0, 4.0, 4.0, 2.0]
    assert all(r["train/nonfinite_skips"] == 0 for r in records if "loss/toy" in r)
    assert (tmp_path / "config.yaml").is_file()

    # Stopped at step 5 (checkpointed), then resumed: the same sum, every step logged once.
    other = tmp_path / "resumed"
    with make_run(other, TrainSection(steps=7, stop_at_step=5)) as run:
        _, result = training_loop(run, *start(), batches(), 7, toy_hooks(run))
    assert result.stopped_early and result.step == 5 and "eval/sum" not in result.metrics
    with make_run(other, TrainSection(steps=7)) as run:
        state, result = training_loop(run, *start(), batches(), 7, toy_hooks(run))
    assert float(state["sum"]) == whole and result.step == 7
    records = read_metrics_jsonl(other / "metrics.jsonl")
    assert [r["step"] for r in records if "loss/toy" in r] == [2, 4, 5, 6, 7]
    assert [r["step"] for r in records if "eval/sum" in r] == [3, 6, 7]


def test_steps_logged_after_the_last_checkpoint_are_not_logged_twice(tmp_path):
    with make_run(tmp_path, TrainSection(steps=7, stop_at_step=5), every=4) as run:
        training_loop(run, *start(), batches(), 7, toy_hooks(run, evaluate=False))
    # A crash after logging step 5 but before its checkpoint committed: only step 4's remains.
    import shutil

    shutil.rmtree(tmp_path / "checkpoints" / "5")
    with make_run(tmp_path, TrainSection(steps=7), every=4) as run:
        training_loop(run, *start(), batches(), 7, toy_hooks(run, evaluate=False))
    assert [r["step"] for r in read_metrics_jsonl(tmp_path / "metrics.jsonl")] == [2, 4, 6, 7]


def test_non_finite_steps_are_counted_and_stop_the_run(tmp_path):
    train = TrainSection(steps=7, max_consecutive_nonfinite=2)
    with make_run(tmp_path, train, every=1) as run:
        with pytest.raises(NonFiniteError, match="2 consecutive non-finite steps"):
            training_loop(run, *start(), batches(), 7, toy_hooks(run, nan_from=3, evaluate=False))
        assert run.checkpoints.manager.all_steps() == [1, 2, 3]  # step 4 raised before its checkpoint
    records = read_metrics_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["train/nonfinite_skips"]) for r in records] == [(2, 0)]
