"""Tests for the metrics logger (JSONL + TensorBoard), logging setup, postfix formatting and progress bar."""

import glob
import json
import logging
import math
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from jaxrlhf.train import metrics as metrics_module
from jaxrlhf.train.metrics import (
    MetricsLogger,
    format_postfix,
    progress,
    read_metrics_jsonl,
    setup_logging,
    truncate_jsonl,
)


def _tensorboard_scalars(run_dir):
    """{(tag, step): value} read from the TFRecord-framed event files in run_dir."""
    scalars = {}
    for path in glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars[(value.tag, event.step)] = value.simple_value
    return scalars


def test_log_writes_exact_jsonl_and_tensorboard_scalars(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics_module.time, "time", lambda: 1000.5)
    run_dir = str(tmp_path / "run")
    with MetricsLogger(run_dir) as logger:
        logger.log(
            3,
            {
                "objective/kl": jnp.float32(0.25),
                "episode": 64,
                "val/num_eos_tokens": jnp.array(5, jnp.int32),
                "loss/value_avg": np.float64(np.nan),
                "lr": np.array([1.5e-6]),
                "flag": np.bool_(True),
            },
        )
        logger.log(4, {"kl": 0.5, "inf": -math.inf}, prefix="train/")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = f.read().splitlines()
    assert json.loads(lines[0]) == {
        "step": 3,
        "time": 1000.5,
        "objective/kl": 0.25,
        "episode": 64,
        "val/num_eos_tokens": 5,
        "loss/value_avg": None,
        "lr": 1.5e-6,
        "flag": 1,
    }
    assert lines[1] == '{"step": 4, "time": 1000.5, "train/kl": 0.5, "train/inf": null}'
    records = read_metrics_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    assert math.isnan(records[0]["loss/value_avg"]) and records[1]["train/kl"] == 0.5

    scalars = _tensorboard_scalars(run_dir)
    assert scalars[("objective/kl", 3)] == 0.25
    assert scalars[("episode", 3)] == 64
    assert scalars[("train/kl", 4)] == 0.5
    assert math.isnan(scalars[("loss/value_avg", 3)])


def test_log_text_and_append_on_resume(tmp_path):
    run_dir = str(tmp_path)
    with MetricsLogger(run_dir, tensorboard=False) as logger:
        logger.log(1, {"a": 1.0})
        logger.log_text("samples", "A→B→C", step=1)
    with MetricsLogger(run_dir, tensorboard=False) as logger:
        logger.log(2, {"a": 2.0})
    assert [r["a"] for r in read_metrics_jsonl(tmp_path / "metrics.jsonl")] == [1.0, 2.0]
    text = read_metrics_jsonl(tmp_path / "text.jsonl")
    assert (text[0]["tag"], text[0]["text"], text[0]["step"]) == ("samples", "A→B→C", 1)
    assert not glob.glob(str(tmp_path / "events.out.tfevents.*"))


def test_disabled_logger_creates_nothing(tmp_path):
    run_dir = tmp_path / "never"
    logger = MetricsLogger(run_dir, enabled=False)
    logger.log(1, {"a": 1.0})
    logger.log_text("t", "x")
    logger.flush()
    logger.close()
    assert not run_dir.exists()


def test_bad_metrics_are_named(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(ValueError, match=r"'policy/ratio'.*shape \(2,\)"):
            logger.log(0, {"policy/ratio": jnp.ones(2)})
        with pytest.raises(TypeError, match="'name'"):
            logger.log(0, {"name": "abc"})
        with pytest.raises(ValueError, match="reserved"):
            logger.log(0, {"step": 1})


def test_read_metrics_jsonl_names_bad_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2"):
        read_metrics_jsonl(path)


def test_truncate_jsonl_drops_records_past_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert truncate_jsonl(path, 3) == 0 and not path.exists()  # nothing to cut
    lines = [{"step": 1, "a": 1}, {"step": 2, "a": 2}, {"step": None, "tag": "t"}, {"step": 3}, {"step": 4}]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 5, "a": '  # torn by a crash
    path.write_text(text)
    steps = lambda: [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert truncate_jsonl(path, 3) == 2
    assert steps() == [1, 2, None, 3]
    before = path.read_text()
    assert truncate_jsonl(path, 3) == 0 and path.read_text() == before
    assert truncate_jsonl(path, 0) == 3
    assert steps() == [None]


def test_setup_logging_writes_run_log_once_per_message(tmp_path, restore_root_logging):
    setup_logging("INFO", run_dir=tmp_path)
    setup_logging(logging.INFO, run_dir=tmp_path)  # a second call replaces, not duplicates, handlers
    logging.getLogger("jaxrlhf.test").info("hello %d", 7)
    logging.getLogger("jaxrlhf.test").debug("hidden")
    logging.getLogger("absl").info("chatter")
    for handler in logging.getLogger().handlers:
        handler.flush()
    lines = (tmp_path / "run.log").read_text().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(" INFO jaxrlhf.test: hello 7")
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("LOUD")


def test_format_postfix_short_names_and_rounding():
    metrics = {"objective/kl": 0.0123456, "loss/value_avg": jnp.float32(2.5), "episode": 640}
    assert format_postfix(metrics, ["objective/kl", "loss/value_avg", "missing", "episode"]) == {
        "kl": "0.01235",
        "value_avg": "2.5",
        "episode": "640",
    }
    clash = {"objective/entropy": 1.0, "policy/entropy": 2.0}
    assert format_postfix(clash, clash) == {"objective/entropy": "1", "policy/entropy": "2"}


def test_progress_is_disabled_off_a_terminal_and_does_not_crash():
    for enabled in (True, False):
        bar = progress(10, desc="ppo", enabled=enabled)
        bar.set_postfix(format_postfix({"objective/kl": 0.5}, ["objective/kl"]))
        bar.update(3)
        bar.close()
        assert bar.disable  # pytest's stderr is not a TTY


def test_run_log_keeps_info_lines_when_the_console_is_quieter(tmp_path, restore_root_logging, capsys):
    """A WARNING console (the demo's default) still leaves every INFO line in run.log; lines marked
    file-only (progress under a progress bar) and orbax's thread tracebacks stay off the console."""
    setup_logging("WARNING", run_dir=tmp_path)
    log = logging.getLogger("jaxrlhf.test")
    log.info("step 10/100 (10%)")
    log.warning("careful")
    log.warning("bar shows this", extra={metrics_module.FILE_ONLY: True})
    try:
        raise OSError(28, "No space left on device")
    except OSError:
        logging.getLogger("absl").error("background save thread failed", exc_info=True)
    for handler in logging.getLogger().handlers:
        handler.flush()
    logged = (tmp_path / "run.log").read_text()
    for text in ("INFO jaxrlhf.test: step 10/100 (10%)", "careful", "bar shows this", "Traceback"):
        assert text in logged, text
    err = capsys.readouterr().err
    assert "careful" in err and "step 10/100" not in err and "bar shows this" not in err
    assert "Traceback" not in err and "background save" not in err


def test_wandb_gets_the_same_metric_names_and_resumes_the_same_run(tmp_path, fake_wandb):
    fake = fake_wandb
    with MetricsLogger(tmp_path, tensorboard=False, wandb="my-project", config={"train": {"steps": 3}}) as m:
        m.log(1, {"objective/kl": 0.5, "episode": 64})
    init = fake.calls[0]
    assert init[0] == "init" and init[1]["project"] == "my-project" and init[1]["id"] == "abc123"
    assert init[1]["resume"] == "allow" and init[1]["config"] == {"train": {"steps": 3}}
    assert fake.calls[1] == ("log", 1, {"objective/kl": 0.5, "episode": 64})
    assert fake.calls[-1] == ("finish",)
    assert read_metrics_jsonl(tmp_path / "metrics.jsonl")[0]["objective/kl"] == 0.5  # the same names
    fake.util.generate_id = staticmethod(lambda: "other")
    MetricsLogger(tmp_path, tensorboard=False, wandb="my-project").close()
    assert fake.calls[-2][1]["id"] == "abc123"  # a resumed run logs to the same W&B run


def test_wandb_without_the_package_is_a_one_line_config_error(monkeypatch):
    import sys

    from jaxrlhf.config import ConfigError
    from jaxrlhf.train.reporting import Reporting
    from jaxrlhf.train.run_config import LoggingSection, TrainSection

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match=r"logging\.wandb: the wandb package is not installed"):
        Reporting("sft", LoggingSection(wandb="p", mfu_matmul_size=0), TrainSection(steps=1))


def test_a_metrics_file_that_cannot_be_written_is_one_error_naming_it(tmp_path):
    """Disk full or a file-size limit: an OutputWriteError naming metrics.jsonl (the CLI prints one line; it
    was two chained tracebacks), and closing the logger afterwards does not raise again."""
    import errno

    from jaxrlhf.files import OutputWriteError

    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"loss": 1.0})
    real = logger._jsonl

    class Full:
        name = real.name

        def write(self, text):
            raise OSError(errno.EFBIG, "File too large")

        def flush(self):
            pass

        def close(self):
            real.close()
            raise OSError(errno.EFBIG, "File too large")

    logger._jsonl = Full()
    where = tmp_path / "metrics.jsonl"
    with pytest.raises(OutputWriteError, match=rf"^cannot write {where}: File too large$"):
        logger.log(2, {"loss": 0.5})
    logger.close()  # logs a warning, raises nothing
    assert read_metrics_jsonl(tmp_path / "metrics.jsonl")[0]["loss"] == 1.0


def test_a_run_log_that_cannot_be_written_says_so_once_and_the_console_goes_on(restore_root_logging, capsys):
    """A full disk under run.log: one line naming it (logging's default printed a traceback per record), then
    the console alone; a record that fails to format is still reported in full."""
    from jaxrlhf.train.metrics import RunLogFile

    handler = RunLogFile("/dev/full")  # every write fails with ENOSPC
    log = logging.getLogger("jaxrlhf.test.full")
    log.addHandler(handler)
    log.propagate = False  # pytest's own capture handler would raise on the badly formatted record
    try:
        for i in range(3):
            log.warning("record %d", i)
        err = capsys.readouterr().err
        assert err.count("cannot write /dev/full") == 1 and "Traceback" not in err and handler.failed
        assert "No space left on device" in err and "the log continues on the console only" in err
        fresh = RunLogFile(os.devnull)
        log.addHandler(fresh)
        log.warning("%d", "not a number")
        assert "Logging error" in capsys.readouterr().err and not fresh.failed
    finally:
        log.propagate = True
        for h in log.handlers[:]:
            log.removeHandler(h)
            h.close()
