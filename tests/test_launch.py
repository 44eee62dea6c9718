"""The local multi-process launcher: environment per process, output collection, and failures that name the
process at fault instead of hanging. Plain Python children (no JAX), so these run in seconds."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from jaxrlhf import launch as L
from jaxrlhf import parallel

PY = sys.executable


def test_free_port_is_bindable():
    port = L.free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))


def test_process_env_sets_the_multihost_variables_and_simulated_devices():
    base = {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8", "JAX_PROCESS_ID": "7"}
    env = L.process_env(1, 2, "127.0.0.1:1234", local_devices=4, base=base)
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("2", "1")
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
    assert env["JAX_PLATFORMS"] == "cpu"
    # One process runs as it would on its own: no coordinator, stale variables removed.
    single = L.process_env(0, 1, "127.0.0.1:1234", base=base)
    assert not {"JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"} & single.keys()
    assert single["XLA_FLAGS"] == base["XLA_FLAGS"]
    # The names the launcher sets are the ones jaxrlhf.parallel reads.
    assert (L.NUM_PROCESSES_ENV, L.PROCESS_ID_ENV) == (parallel.NUM_PROCESSES_ENV, parallel.PROCESS_ID_ENV)


def test_launch_collects_each_process_output(tmp_path, monkeypatch):
    code = ("import os, sys; e = os.environ; "
            "print('hello from', e['JAX_PROCESS_ID'], e['JAX_NUM_PROCESSES'], sys.argv[1], e['WHERE'])")
    monkeypatch.setenv("WHERE", "dump/{process_id}")  # {process_id} in an environment value, as in argv
    results = L.launch([PY, "-c", code, "{process_id}"], 3, timeout=60, log_dir=tmp_path)
    assert [r.process_id for r in results] == [0, 1, 2]
    assert [r.output.strip() for r in results] == [f"hello from {i} 3 {i} dump/{i}" for i in range(3)]
    assert all(r.returncode == 0 for r in results)
    assert (tmp_path / "process_2.log").read_text().strip() == "hello from 2 3 2 dump/2"


def test_a_dying_process_is_named_with_its_last_lines_and_the_others_are_stopped(tmp_path):
    # Process 1 fails; the others would wait for it forever (as the peers of a dead JAX process do).
    code = (
        "import sys, time\n"
        "if sys.argv[1] == '1':\n"
        "    print('loading the model'); print('boom: bad config', flush=True); sys.exit(3)\n"
        "time.sleep(600)\n"
    )
    start = time.monotonic()
    with pytest.raises(L.LaunchError) as info:
        L.launch([PY, "-c", code, "{process_id}"], 3, timeout=120, log_dir=tmp_path)
    assert time.monotonic() - start < 60  # processes 0 and 2 were stopped, not waited for
    message = str(info.value)
    assert "process 1 exited with code 3" in message
    assert "boom: bad config" in message and "loading the model" in message
    assert "process 0 (exit code" in message and "process 2 (exit code" in message  # stopped, and said so


def test_a_hanging_launch_times_out_with_a_clear_message(tmp_path):
    code = "import time; print('waiting for the coordinator', flush=True); time.sleep(600)"
    start = time.monotonic()
    with pytest.raises(L.LaunchError, match=r"timed out after 2 s") as info:
        L.launch([PY, "-c", code], 2, timeout=2, log_dir=tmp_path)
    assert time.monotonic() - start < 30
    assert "waiting for the coordinator" in str(info.value)
    assert "[0, 1] still running" in str(info.value)


def test_a_process_that_cannot_start_says_why(tmp_path):
    with pytest.raises(L.LaunchError, match=r"process 0 could not start .*no-such-program"):
        L.launch([str(tmp_path / "no-such-program")], 2, timeout=10, log_dir=tmp_path)


def test_main_runs_a_program_and_reports_failure(tmp_path, capsys):
    ok = L.main(["-n", "2", "--log-dir", str(tmp_path), "--program", "--", PY, "-c", "print('ok')"])
    assert ok == 0
    bad = L.main(["-n", "2", "--log-dir", str(tmp_path), "--program", "--", PY, "-c", "raise SystemExit(4)"])
    assert bad == 1
    assert "exited with code 4" in capsys.readouterr().err
