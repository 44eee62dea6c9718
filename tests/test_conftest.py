"""The suite's own settings (tests/conftest.py): the XLA flags that cut compile time are added only where
this jaxlib's XLA accepts them, since XLA aborts a process whose XLA_FLAGS names a flag it does not have."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def conftest(request):
    here = Path(__file__).with_name("conftest.py")
    return next(p for p in request.config.pluginmanager.get_plugins()
                if getattr(p, "__file__", None) and Path(p.__file__) == here)


def test_the_suites_processes_run_with_the_accepted_flags(conftest):
    flags = os.environ["XLA_FLAGS"].split()
    assert all(f.split("=")[0] in " ".join(flags) for f in conftest.TEST_XLA_FLAGS)


def test_flags_xla_rejects_are_left_out_and_the_answer_is_kept(conftest, monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path))
    bogus = "--xla_cpu_no_such_flag_in_any_jaxlib=1"
    assert not conftest._xla_accepts([bogus])  # a child process tried it and was aborted by XLA
    assert [p.suffix for p in tmp_path.iterdir()] == [".False"]
    monkeypatch.setattr(conftest, "TEST_XLA_FLAGS", ("--xla_backend_optimization_level=0", bogus))
    monkeypatch.setattr(conftest, "_xla_accepts", lambda flags: bogus not in flags)  # answers, no children
    assert conftest._with_test_flags("--xla_dump_to=x") == (
        "--xla_dump_to=x --xla_backend_optimization_level=0")
    # a flag the environment sets already is left to it, whatever its value
    assert conftest._with_test_flags("--xla_backend_optimization_level=2") == (
        "--xla_backend_optimization_level=2")
