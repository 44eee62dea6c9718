"""The one training loop with a toy step (no model): the logging window, evaluation and checkpoint
schedules, ``stop_at_step``, resuming where it stopped, each step logged once, and the non-finite policy."""

from __future__ import annotations

import logging
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.config import ConfigError
from jaxrlhf.data import BatchIterator
from jaxrlhf.train.loop import LoopHooks, StepOutcome, training_loop
from jaxrlhf.train.metrics import read_metrics_jsonl
from jaxrlhf.train.nonfinite import NonFiniteError
from jaxrlhf.train.run import Run
from jaxrlhf.train.run_config import CheckpointSection, LoggingSection, TrainSection

QUIET = dict(tensorboard=False, progress_bar=False, mfu_matmul_size=0, log_every=2)


def make_run(run_dir, train: TrainSection, every: int = 2, async_save: bool = False) -> Run:
    logging_ = LoggingSection(run_dir=str(run_dir), **QUIET)
    checkpoint = CheckpointSection(every=every, keep=5, async_save=async_save)
    return Run("toy", {"train": {"steps": train.steps}}, checkpoint, logging_, train)


def toy_hooks(run: Run, nan_from: int | None = None, evaluate: bool = True,
              signal_at: tuple[int, int] | None = None) -> LoopHooks:
    """state = running sum of the batches; metric loss/toy = the batch's sum (NaN from a given step on);
    ``signal_at=(step, signum)``: the process receives that signal while that step runs."""

    def step(state, batch, key):
        del key
        if signal_at is not None and int(state["steps"]) + 1 == signal_at[0]:
            os.kill(os.getpid(), signal_at[1])
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


def test_rerunning_a_finished_run_logs_nothing_twice_and_fewer_steps_are_refused(tmp_path):
    with make_run(tmp_path, TrainSection(steps=4)) as run:
        state, _ = training_loop(run, *start(), batches(), 4, toy_hooks(run))
    before = (tmp_path / "metrics.jsonl").read_text()
    with make_run(tmp_path, TrainSection(steps=4)) as run:  # the same command again: evaluates, exports
        again, result = training_loop(run, *start(), batches(), 4, toy_hooks(run))
    assert result.step == 4 and result.metrics["eval/sum"] == float(state["sum"]) == float(again["sum"])
    assert (tmp_path / "metrics.jsonl").read_text() == before  # each step's rows once
    config = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"train\.steps: this run has 2 steps, but .* holds a checkpoint at "
                                          r"step 4; set train\.steps"):
        with make_run(tmp_path, TrainSection(steps=2)) as run:
            training_loop(run, *start(), batches(), 2, toy_hooks(run))
    assert (tmp_path / "config.yaml").read_text() == config  # refused before the directory was touched


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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_ends_the_step_checkpoints_and_resuming_ends_as_if_uninterrupted(tmp_path, signum):
    """Ctrl-C (or kill) during step 3 of 7: the step finishes, is logged and checkpointed (with an
    asynchronous checkpoint of step 2 possibly in flight), the loop raises RunInterrupted naming the
    checkpoint; the same call again resumes and ends where an uninterrupted run ends."""
    from jaxrlhf.train.signals import RunInterrupted

    with make_run(tmp_path / "whole", TrainSection(steps=7)) as run:
        whole, _ = training_loop(run, *start(), batches(), 7, toy_hooks(run))
    handler = signal.getsignal(signum)
    with make_run(tmp_path, TrainSection(steps=7), async_save=True) as run:
        with pytest.raises(RunInterrupted) as info:
            training_loop(run, *start(), batches(), 7, toy_hooks(run, signal_at=(3, signum)))
    assert signal.getsignal(signum) is handler  # the loop's handler is gone again
    e = info.value
    assert (e.step, e.exit_code) == (3, 128 + signum)
    assert str(e) == (f"interrupted by {signal.Signals(signum).name} after step 3 of 7: checkpoint saved in "
                      f"{tmp_path / 'checkpoints'}; run the same command again to resume")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]  # committed, no temporary directory
    assert [r["step"] for r in read_metrics_jsonl(tmp_path / "metrics.jsonl") if "loss/toy" in r] == [2, 3]
    with make_run(tmp_path, TrainSection(steps=7), async_save=True) as run:
        state, result = training_loop(run, *start(), batches(), 7, toy_hooks(run))
    assert float(state["sum"]) == float(whole["sum"]) and result.step == 7
    records = read_metrics_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "loss/toy" in r] == [2, 3, 4, 6, 7]
    assert [r["step"] for r in records if "eval/sum" in r] == [6, 7]  # step 3's was skipped to stop fast


def test_the_signal_handler_writes_nothing_and_the_loop_logs_the_warning_once(caplog):
    """A signal can land mid-write to stderr; a log call from the handler would be a reentrant write (the
    `jaxrlhf sft` process once printed a "Logging error" traceback that way). The handler only records the
    signal; :meth:`GracefulStop.requested`, called by the loop, logs the warning once; a second signal
    raises KeyboardInterrupt and puts the previous handler back."""
    from jaxrlhf.train.signals import GracefulStop

    before = signal.getsignal(signal.SIGINT)
    with caplog.at_level(logging.WARNING, logger="jaxrlhf"):
        with GracefulStop() as stop:
            assert not stop.requested()
            handler = signal.getsignal(signal.SIGINT)
            handler(signal.SIGTERM, None)
            assert stop.signum == signal.SIGTERM and caplog.records == []  # the handler wrote nothing
            assert stop.requested() and stop.requested()
            assert [r.getMessage() for r in caplog.records] == [
                "SIGTERM: finishing the current step, then writing a checkpoint (send it again to stop at "
                "once)"]
            with pytest.raises(KeyboardInterrupt, match="second SIGINT: stopping without a checkpoint"):
                handler(signal.SIGINT, None)
            assert signal.getsignal(signal.SIGINT) is before
    assert signal.getsignal(signal.SIGINT) is before


def test_the_first_step_says_it_compiles_and_each_window_is_a_progress_line(tmp_path, restore_root_logging):
    with make_run(tmp_path, TrainSection(steps=5)) as run:
        training_loop(run, *start(), batches(), 5, toy_hooks(run, evaluate=False))
    for handler in logging.getLogger().handlers:
        handler.flush()
    messages = [line.split(" jaxrlhf: ", 1)[1] for line in (tmp_path / "run.log").read_text().splitlines()
                if " jaxrlhf: " in line]
    assert "step 1: compiling (the first step traces and compiles the jitted steps)" in messages
    assert any(m.startswith("step 1: compiled and ran in ") for m in messages)
    assert any(m.startswith("toy: 5 steps, checkpoints every 2 step(s) in ") for m in messages)
    progress = [m for m in messages if "steps/s" in m]
    assert [m.split(" (")[0] for m in progress] == ["step 2/5", "step 4/5", "step 5/5"]
    assert " left" in progress[0] and " left" not in progress[-1]


def test_a_run_logs_to_weights_and_biases_under_the_same_names(tmp_path, fake_wandb):
    fake = fake_wandb
    logging_ = LoggingSection(run_dir=str(tmp_path), wandb="proj", **QUIET)
    run = Run("toy", {"train": {"steps": 3}}, CheckpointSection(every=2, async_save=False), logging_,
              TrainSection(steps=3))
    with run:
        training_loop(run, *start(), batches(), 3, toy_hooks(run))
    assert fake.calls[0][1]["config"] == {"train": {"steps": 3}} and fake.calls[-1] == ("finish",)
    logged = [(c[1], sorted(c[2])) for c in fake.calls if c[0] == "log"]
    written = [(r["step"], sorted(set(r) - {"step", "time"})) for r in
               read_metrics_jsonl(tmp_path / "metrics.jsonl")]
    assert logged == written and logged
