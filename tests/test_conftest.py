"""The suite's own settings (tests/conftest.py): the XLA flags that cut compile time are added only where
this jaxlib's XLA accepts them, since XLA aborts a process whose XLA_FLAGS names a flag it does not have."""

from __future__ import annotations

import os


def test_the_suites_processes_run_with_the_accepted_flags(suite_conftest):
    flags = os.environ["XLA_FLAGS"].split()
    assert all(f.split("=")[0] in " ".join(flags) for f in suite_conftest.TEST_XLA_FLAGS)


def test_flags_xla_rejects_are_left_out_and_the_answer_is_kept(suite_conftest, monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path))
    bogus = "--xla_cpu_no_such_flag_in_any_jaxlib=1"
    assert not suite_conftest._xla_accepts([bogus])  # a child process tried it and was aborted by XLA
    assert [p.suffix for p in tmp_path.iterdir()] == [".False"]
    monkeypatch.setattr(suite_conftest, "TEST_XLA_FLAGS", ("--xla_backend_optimization_level=0", bogus))
    # answers without child processes
    monkeypatch.setattr(suite_conftest, "_xla_accepts", lambda flags: bogus not in flags)
    assert suite_conftest._with_test_flags("--xla_dump_to=x") == (
        "--xla_dump_to=x --xla_backend_optimization_level=0")
    # a flag the environment sets already is left to it, whatever its value
    assert suite_conftest._with_test_flags("--xla_backend_optimization_level=2") == (
        "--xla_backend_optimization_level=2")
