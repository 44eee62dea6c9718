"""Fixtures of the run-layer tests."""

import logging

import pytest


@pytest.fixture
def restore_root_logging():
    """Put the root logger's handlers and level back after a test that reconfigures logging."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture
def disk_full_at(monkeypatch):
    """``disk_full_at(n)``: the n-th checkpoint save from now on fails inside orbax's write path (its
    metadata writer, in orbax's background thread when saving asynchronously) with ENOSPC, as a full disk
    would; every other save goes through."""
    import errno
    import sys

    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    # A failed save routes the late errors of its background writes to the log file; give pytest its own
    # hook back afterwards.
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)

    def arm(n: int) -> list[int]:
        calls = [0]
        original = json_checkpoint_handler.JsonCheckpointHandler._save_fn

        async def save(self, x, directory):
            calls[0] += 1
            if calls[0] == n:
                raise OSError(errno.ENOSPC, "No space left on device", str(directory))
            return await original(self, x, directory)

        monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", save)
        return calls

    return arm


class FakeWandb:
    """What the tests need of the wandb module: init, log, finish, recorded."""

    def __init__(self):
        self.calls = []
        self.util = type("util", (), {"generate_id": staticmethod(lambda: "abc123")})

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self

    def log(self, values, step):
        self.calls.append(("log", step, dict(values)))

    def finish(self):
        self.calls.append(("finish",))



@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in ``wandb`` module in ``sys.modules`` (wandb is not a dependency); its ``calls`` record
    what a run sent."""
    import sys

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake
