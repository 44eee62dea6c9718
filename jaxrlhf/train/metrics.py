"""The one metrics logger (JSONL + TensorBoard), the one message-logging setup, and the progress bar.

``metrics.jsonl`` holds one JSON object per :meth:`MetricsLogger.log` call::

    {"step": 10, "time": 1717171717.5, "objective/kl": 0.031, "episode": 640, "loss/value_avg": null}

``time`` is Unix time in seconds. Integer values stay integers; every other value becomes a float.
JSON has no NaN or infinity, so a non-finite value is written as ``null``; :func:`read_metrics_jsonl`
reads ``null`` back as ``nan``. TensorBoard gets the same scalars (NaN/inf included) under the same tags.
A resumed run first cuts the file back to its checkpoint's step (:func:`truncate_jsonl`), so every step
appears once. With ``wandb`` (a project name) the same scalars go to Weights & Biases under the same names,
if the ``wandb`` package is installed (it is not a dependency).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxrlhf.files import OutputWriteError, write_text_atomic

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_RESERVED = ("step", "time")


def _scalar(name: str, value: Any) -> int | float:
    """A metric value as a Python int (integer or bool input) or float; anything else is an error."""
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric {name!r}: expected a scalar, got shape {array.shape}")
    array = array.reshape(())
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer):
        return int(array)
    if array.dtype.kind in "fV":  # "V": bfloat16 and the other ml_dtypes floats
        try:
            return float(array)
        except (TypeError, ValueError):
            pass
    raise TypeError(f"metric {name!r}: expected a real number, got {type(value).__name__} {value!r}")


class MetricsLogger:
    """Scalars to ``run_dir/<jsonl_name>`` (one JSON line per call) and to TensorBoard (tensorboardX).

    ``enabled=False`` (e.g. on non-zero processes of a multi-host run) turns every method into a no-op
    that creates no file or directory.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        tensorboard: bool = True,
        jsonl_name: str = "metrics.jsonl",
        enabled: bool = True,
        wandb: str | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        self.run_dir = os.fspath(run_dir)
        self.enabled = enabled
        self._jsonl = self._text = self._tb = self._wandb = None
        if not enabled:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(self.run_dir, jsonl_name), "a")  # appends on resume
        if tensorboard:
            from tensorboardX import SummaryWriter  # only when asked for: it is slow to import

            self._tb = SummaryWriter(logdir=self.run_dir)
        if wandb:
            self._wandb = start_wandb(wandb, self.run_dir, config)

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
        """Write ``{"step", "time", prefix+name: value, ...}``; values are scalars (Python, NumPy or JAX)."""
        if not self.enabled:
            return
        values = {f"{prefix}{name}": _scalar(f"{prefix}{name}", v) for name, v in metrics.items()}
        for name in _RESERVED:
            if name in values:
                raise ValueError(f"metric name {name!r} is reserved for the record's own field")
        record = {"step": int(step), "time": time.time()}
        record.update({k: v if math.isfinite(v) else None for k, v in values.items()})
        try:
            self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
            self._jsonl.flush()  # a crash loses at most the line being written
        except OSError as e:  # disk full, a file-size limit: one line naming the file (resume drops the tail)
            raise OutputWriteError(f"cannot write {self._jsonl.name}: {e.strerror or e}") from None
        if self._tb is not None:
            for name, v in values.items():
                self._tb.add_scalar(name, v, global_step=int(step))
        if self._wandb is not None:
            self._wandb.log(values, step=int(step))

    def log_text(self, tag: str, text: str, step: int | None = None) -> None:
        """Free text (e.g. sample generations) to TensorBoard and to ``run_dir/text.jsonl``."""
        if not self.enabled:
            return
        if self._text is None:
            self._text = open(os.path.join(self.run_dir, "text.jsonl"), "a")
        record = {"step": step, "time": time.time(), "tag": tag, "text": text}
        self._text.write(json.dumps(record) + "\n")
        self._text.flush()
        if self._tb is not None:
            self._tb.add_text(tag, text, global_step=step)

    def flush(self) -> None:
        for sink in (self._jsonl, self._text, self._tb):
            if sink is not None:
                sink.flush()

    def close(self) -> None:
        for sink in (self._jsonl, self._text, self._tb):
            if sink is not None:
                try:
                    sink.close()
                except OSError as e:  # its buffered tail could not be written: the write error is reported
                    logging.getLogger("jaxrlhf").warning("closing %s: %s", getattr(sink, "name", sink), e)
        if self._wandb is not None:
            self._wandb.finish()
        self._jsonl = self._text = self._tb = self._wandb = None
        self.enabled = False

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


WANDB_ID_FILE = "wandb_run_id"


def require_wandb() -> Any:
    """The ``wandb`` module, or a one-line error saying how to get it (checked before a run loads
    anything)."""
    try:
        import wandb
    except ImportError:
        from jaxrlhf.config import ConfigError

        raise ConfigError("logging.wandb: the wandb package is not installed (pip install wandb), or "
                          "leave logging.wandb null") from None
    return wandb


def start_wandb(project: str, run_dir: str, config: Mapping[str, Any] | None) -> Any:
    """A Weights & Biases run for ``run_dir`` in ``project``; a resumed run continues the same W&B run (its
    id is kept in ``run_dir/wandb_run_id``)."""
    wandb = require_wandb()
    id_file = Path(run_dir) / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    if not run_id:
        run_id = wandb.util.generate_id() if hasattr(wandb, "util") else os.urandom(8).hex()
        write_text_atomic(id_file, run_id + "\n")
    return wandb.init(project=project, id=run_id, resume="allow", dir=run_dir, name=Path(run_dir).name,
                      config=dict(config or {}))


def read_metrics_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file, ``null`` values read back as ``nan``.

    A malformed line raises ``ValueError`` naming the file and line number.
    """
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{os.fspath(path)}:{lineno}: not a JSON record: {e}") from e
            records.append({k: math.nan if v is None else v for k, v in record.items()})
    return records


def truncate_jsonl(path: str | os.PathLike, step: int) -> int:
    """Drop the records of a JSONL log (``metrics.jsonl``, ``text.jsonl``) whose ``step`` is above ``step``;
    returns how many were dropped. The file is rewritten atomically, and only when something is dropped.

    A resumed run calls this before logging again: records past its checkpoint were written by the
    interrupted invocation and are about to be written anew. A torn last line (a crash mid-write) goes too.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            record_step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            dropped += 1
            continue
        if record_step is not None and record_step > step:
            dropped += 1
            continue
        kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        write_text_atomic(path, "".join(kept))
    return dropped


FILE_ONLY = "file_only"  # a record with this attribute set (``extra={FILE_ONLY: True}``) skips stderr


class _ForTheTerminal(logging.Filter):
    """Keeps off stderr what only the log file wants: records marked :data:`FILE_ONLY` (progress lines while
    a progress bar shows them) and orbax's error reports with their thread tracebacks (the run reports a
    failed checkpoint in one line of its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, FILE_ONLY, False):
            return False
        return not (record.name == "absl" and record.levelno >= logging.ERROR)


class RunLogFile(logging.FileHandler):
    """``run.log``: a file handler that, when a write fails (disk full, EFBIG, a vanished mount), says so
    once on stderr and stops writing the file, where logging's default prints a traceback per record."""

    def __init__(self, filename: str) -> None:
        super().__init__(filename)
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if self.failed or not isinstance(error, OSError):
            super().handleError(record)  # a formatting bug is still reported in full
            return
        self.failed = True
        stream, self.stream = self.stream, None
        try:  # drop what is buffered: closing flushes it, and that would fail again at exit
            stream.close()
        except (OSError, AttributeError):
            pass
        sys.stderr.write(f"jaxrlhf: cannot write {self.baseFilename}: {error}; the log continues on the "
                         "console only\n")


def setup_logging(level: int | str = "INFO", run_dir: str | os.PathLike | None = None) -> logging.Logger:
    """Send log messages to stderr (from ``level`` up) and, with ``run_dir``, to ``run_dir/run.log`` (from
    INFO up whatever ``level`` says, so a quiet console still leaves a full record), in one format.

    Configures the root logger (so every module's ``logging.getLogger(__name__)`` follows), replacing
    the handlers already there (an earlier call's, or a default one a library's import left behind).
    Chatty libraries (absl/orbax, jax) are held at WARNING unless ``level`` is DEBUG. Returns the
    ``jaxrlhf`` logger.
    """
    level = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(level, int):
        raise ValueError(f"setup_logging: unknown log level {level!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(LOG_FORMAT, datefmt=LOG_DATE_FORMAT)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level)
    console.addFilter(_ForTheTerminal())
    handlers: list[logging.Handler] = [console]
    file_level = min(level, logging.INFO)
    if run_dir is not None:
        os.makedirs(run_dir, exist_ok=True)
        log_file = RunLogFile(os.path.join(run_dir, "run.log"))
        log_file.setLevel(file_level)
        handlers.append(log_file)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(file_level)  # INFO records reach a run.log opened later too (RunDirectory holds them)
    for noisy in ("absl", "jax"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING) if level > logging.DEBUG else level)
    return logging.getLogger("jaxrlhf")


def format_postfix(metrics: Mapping[str, Any], keys: Iterable[str]) -> dict[str, str]:
    """A few metrics for a progress bar: ``{short name: value to 4 significant digits}``.

    The short name is the part after the last ``/`` (``objective/kl`` → ``kl``) unless two keys would
    share it. Keys missing from ``metrics`` are left out.
    """
    present = [k for k in keys if k in metrics]
    shorts = [k.rsplit("/", 1)[-1] for k in present]
    return {
        (short if shorts.count(short) == 1 else key): f"{_scalar(key, metrics[key]):.4g}"
        for key, short in zip(present, shorts)
    }


def progress(total: int | None, desc: str = "", enabled: bool = True, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr; disabled (every method a silent no-op) when ``enabled`` is False or stderr
    is not a terminal. Show numbers with ``bar.set_postfix(format_postfix(metrics, keys))``.
    """
    disable = not enabled or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, initial=initial, file=sys.stderr, disable=disable, dynamic_ncols=True)
