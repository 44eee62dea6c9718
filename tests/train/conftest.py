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
