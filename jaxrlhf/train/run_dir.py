"""The run directory: ``config.yaml`` (reloadable with ``--config``) and the message log ``run.log``.

Nothing is written before :meth:`RunDirectory.open`, which a trainer calls once its inputs (model, tokenizer,
data files, checkpoints) have been read and checked: a run that fails on bad input leaves the directory as
it was, in particular the ``config.yaml`` that produced its checkpoints. Messages logged before ``open`` go
to stderr at once and are copied into ``run.log`` when it opens.
"""

from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
import shlex
from pathlib import Path
from typing import Any

import yaml

from jaxrlhf.config import ConfigError, to_dict
from jaxrlhf.files import write_text_atomic
from jaxrlhf.train.metrics import setup_logging

log = logging.getLogger("jaxrlhf")


class _Held(logging.handlers.BufferingHandler):
    """Keeps the records logged before the run directory opens (never flushes on its own)."""

    def __init__(self) -> None:
        super().__init__(capacity=0)

    def shouldFlush(self, record: logging.LogRecord) -> bool:
        return False


class RunDirectory:
    """``path`` (made absolute) for ``jaxrlhf <command>``; only the main process writes (``enabled``)."""

    def __init__(self, path: str | os.PathLike, command: str, level: str = "INFO", enabled: bool = True):
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        self.command, self.level, self.enabled = command, level, enabled
        self._lock_fd: int | None = None
        setup_logging(level, None)
        self._held = _Held()
        logging.getLogger().addHandler(self._held)

    def lock(self) -> None:
        """Hold an exclusive lock on the directory (flock on its descriptor: no file is written) while this
        process runs, so that a second ``jaxrlhf`` started on it stops at once instead of interleaving
        checkpoints and metrics with this one's. Nothing happens for a directory that does not exist yet (the
        run locks it once :meth:`open` creates it) or where this process holds it already."""
        if not self.enabled or self._lock_fd is not None or not os.path.isdir(self.path):
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"logging.run_dir: {self.path} is in use by another jaxrlhf process (wait for "
                              "it to finish, or choose another run_dir)") from None
        self._lock_fd = fd

    def release(self) -> None:
        """Let the directory go (the end of the run; the process's exit does the same)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def config_path(self) -> Path:
        return Path(self.path) / "config.yaml"

    def open(self, config: Any) -> None:
        """Create the directory, write ``config.yaml`` and start ``run.log`` (with the messages so far)."""
        held = list(self._held.buffer)
        self.close()
        if not self.enabled:
            return
        os.makedirs(self.path, exist_ok=True)
        self.lock()
        self._write_config(config)
        setup_logging(self.level, self.path)
        files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
        for record in held:
            for handler in files:
                if record.levelno >= handler.level:
                    handler.handle(record)

    def close(self) -> None:
        """Stop holding messages (a run that failed before :meth:`open`)."""
        logging.getLogger().removeHandler(self._held)
        self._held.buffer.clear()

    @property
    def _uncommitted_marker(self) -> Path:
        return Path(self.path) / "config.yaml.uncommitted"

    def _write_config(self, config: Any) -> None:
        """Write ``config.yaml``; a different one already there moves to ``config.yaml.prev``, unless it is
        marked as a run that never wrote a checkpoint (``config.yaml.uncommitted``, removed by
        :meth:`commit_config`) and a ``.prev`` exists: then ``.prev`` keeps describing the checkpoints,
        however many retries fail before their first one."""
        path = self.config_path
        # Reloadable as is: `jaxrlhf <command> --config <run_dir>/config.yaml` repeats the run.
        header = f"# jaxrlhf {self.command} --config {shlex.quote(str(path))}\n"
        text = header + yaml.safe_dump(to_dict(config), sort_keys=False)
        if path.is_file() and path.read_text() == text:
            return
        marker, prev = self._uncommitted_marker, path.with_suffix(".yaml.prev")
        if path.is_file():
            if marker.exists() and prev.exists():
                log.warning("%s differs from this run's config; replacing it (it wrote no checkpoint; "
                            "config.yaml.prev still holds the config of the checkpoints before it)", path)
            else:
                log.warning("%s differs from this run's config; replacing it (old one: config.yaml.prev)",
                            path)
                os.replace(path, prev)
        marker.write_text("config.yaml is the config of a run that has written no checkpoint yet; the "
                          "directory's earlier checkpoints (if any) were written with config.yaml.prev\n")
        write_text_atomic(path, text)

    def commit_config(self) -> None:
        """A checkpoint of this run's config has been written: ``config.yaml`` now describes the
        directory's latest checkpoint (called by the run's checkpointing)."""
        if self.enabled:
            self._uncommitted_marker.unlink(missing_ok=True)
