"""A trainer's checkpoint schedule around the one checkpoint path (:class:`~jaxrlhf.train.checkpoint.
CheckpointManager`): resume from the latest step, save every ``checkpoint.every`` steps and at the end, and
stop at ``train.stop_at_step``.

A checkpoint holds ``{state_key: training state, "rng": key}`` and metadata: the command, the step, the
data iterator's position and the non-finite skips so far. Step ``s`` means "after ``s`` updates". Resuming
only reads, so a trainer resumes before it writes anything in the run directory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import yaml

from jaxrlhf.config import ConfigError
from jaxrlhf.steps.state import attach_frozen, detach_frozen
from jaxrlhf.train.checkpoint import CheckpointManager, CheckpointMismatchError
from jaxrlhf.train.run_config import CheckpointSection, TrainSection

log = logging.getLogger("jaxrlhf")


class Resumed(NamedTuple):
    """Where a run starts: the state, RNG key and step (0 for a fresh run) and the restored metadata."""

    state: Any
    rng: jax.Array
    step: int
    metadata: dict[str, Any]


class Checkpointing:
    """Checkpoints of ``jaxrlhf <command>`` in ``checkpoint.dir`` (default ``<run_dir>/checkpoints``)."""

    def __init__(self, command: str, section: CheckpointSection, train: TrainSection, run_dir: str,
                 state_key: str = "train"):
        self.command, self.cfg, self.state_key, self.run_dir = command, section, state_key, run_dir
        # Called once the saves so far have committed (the run directory's config.yaml then describes them).
        self.on_committed: Callable[[], None] | None = None
        self._unconfirmed = False
        self.stop_at_step = train.stop_at_step
        directory = section.dir or os.path.join(run_dir, "checkpoints")
        # The interval is applied in save(): orbax's own would also save the first step.
        self.manager = CheckpointManager(directory, max_to_keep=section.keep, async_save=section.async_save)

    @property
    def directory(self) -> str:
        return self.manager.directory

    def restore_latest(self, target: Any) -> tuple[Any, dict[str, Any]] | None:
        """The latest checkpoint restored into ``target``'s structure, or ``None`` (fresh start).

        With ``checkpoint.resume`` false, existing checkpoints are an error: a fresh run would interleave its
        steps with them (and prune them), never silently overwrite a good checkpoint.
        """
        step = self.manager.latest_step()
        if step is None:
            return None
        if not self.cfg.resume:
            raise ConfigError(
                f"checkpoint.resume: false, but {self.directory} already holds checkpoints "
                f"(steps {self.manager.all_steps()}); resume them or choose another logging.run_dir / "
                "checkpoint.dir"
            )
        try:
            state, metadata = self.manager.restore(step, target)
        except CheckpointMismatchError as e:
            # Most often the run directory belongs to a run of another model (model.path changed).
            raise CheckpointMismatchError(
                f"{e}; these checkpoints were written for another model or setup{self._saved_model()}: "
                "choose a new logging.run_dir (or checkpoint.dir) to start a new run"
            ) from None
        if metadata.get("command", self.command) != self.command:
            raise ConfigError(
                f"checkpoint.dir: {self.directory} holds a {metadata['command']!r} run, "
                f"not {self.command!r} (set checkpoint.resume=false or another directory)"
            )
        log.info("resuming from step %d of %s", step, self.directory)
        return state, metadata

    def _saved_model(self) -> str:
        """`` (model.path X in its config.yaml)`` for the run that wrote the checkpoints, when known."""
        try:
            saved = yaml.safe_load((Path(self.run_dir) / "config.yaml").read_text())
            model = saved["model"]
            what = f"model.path {model['path']}" if model.get("path") else "model.architecture"
        except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
            return ""
        return f" ({what} in {Path(self.run_dir) / 'config.yaml'})"

    def resume(self, state: Any, rng: jax.Array, batches: Any) -> Resumed:
        """The latest checkpoint's state, key and step (the data iterator's position restored into
        ``batches``), or the given state and key at step 0."""
        # A checkpoint holds only what is trained: LoRA's frozen base is not saved, and is put back here.
        bare, frozen = detach_frozen(state)
        restored = self.restore_latest({self.state_key: bare, "rng": rng})
        if restored is None:
            return Resumed(state, rng, 0, {})
        saved, metadata = restored
        saved = {**saved, self.state_key: attach_frozen(saved[self.state_key], frozen)}
        try:
            batches.restore(metadata["data"])
        except ValueError as e:  # e.g. another train file: this directory belongs to another run
            raise ConfigError(
                f"{self.directory} holds checkpoints of a run on other data ({e}); to start a new run, "
                "choose a new logging.run_dir (or checkpoint.dir)"
            ) from None
        return Resumed(saved[self.state_key], saved["rng"], int(metadata["step"]), metadata)

    def save(self, step: int, state: Any, metadata: Mapping[str, Any], force: bool = False) -> bool:
        """Checkpoint ``state`` at ``step`` every ``checkpoint.every`` steps (or now with ``force``)."""
        if not force and step % self.cfg.every:
            return False
        if step in self.manager.all_steps():  # e.g. the final step of a run that already finished
            return False
        state = detach_frozen(state)[0]  # only what is trained (LoRA: the adapters, not the base)
        metadata = {"command": self.command, "step": step, **metadata}
        saved = self.manager.save(step, state, metadata, force=True)
        self._unconfirmed |= bool(saved)
        return saved

    def _confirm(self) -> None:
        """After a wait that raised nothing: the saves so far have committed."""
        if self._unconfirmed:
            self._unconfirmed = False
            if self.on_committed is not None:
                self.on_committed()

    def save_now(self, step: int, state: Any, rng: jax.Array, batches: Any,
                 metadata: Mapping[str, Any]) -> None:
        """Checkpoint ``step`` now (unless it already is) and wait until it has committed."""
        self.manager.wait()
        self.save(step, {self.state_key: state, "rng": rng}, {"data": batches.state(), **metadata},
                  force=True)
        self.manager.wait()
        self._confirm()

    def wait(self) -> None:
        """Wait for pending saves (a failed one raises ``CheckpointWriteError``)."""
        self.manager.wait()
        self._confirm()

    def stops_at(self, step: int, total: int) -> bool:
        """Whether ``train.stop_at_step`` ends this invocation after ``step`` (before the last step)."""
        return self.stop_at_step == step and step < total

    def end_step(self, step: int, total: int, state: Any, rng: jax.Array, batches: Any,
                 metadata: Mapping[str, Any]) -> bool:
        """Checkpoint on schedule and at the last step; True when ``train.stop_at_step`` ends this
        invocation here (after a checkpoint, so the next one resumes)."""
        stop = self.stops_at(step, total)
        self.save(step, {self.state_key: state, "rng": rng}, {"data": batches.state(), **metadata},
                  force=stop or step == total)
        if stop:
            log.info("stopping at step %d (train.stop_at_step); run again to resume", step)
        return stop

    def close(self) -> None:
        """Wait for pending saves and release orbax's resources."""
        self.manager.close()
        self._confirm()
