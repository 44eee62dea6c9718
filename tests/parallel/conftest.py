"""The multi-device tests need 8 (simulated) devices, fixed when the backend starts: they run in their own
pytest process (test_multidevice*.py, one per file of multidevice/, so that parallel workers can overlap
them) and are skipped by the main collection."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("JAXRLHF_MULTIDEVICE") != "1":
    collect_ignore_glob = ["multidevice/*"]

HERE = Path(__file__).parent


@pytest.fixture
def run_multidevice():
    """``run(name)``: tests/parallel/multidevice/<name> in a pytest subprocess with 8 simulated CPU devices;
    fails with its output unless every test there passed."""

    def run(name: str) -> None:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
        env["JAXRLHF_MULTIDEVICE"] = "1"
        env["JAX_PLATFORMS"] = "cpu"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", str(HERE / "multidevice" / name), "-q", "-p", "no:cacheprovider",
             "-n", "0",  # one process: its 8 simulated devices already use the cores
             "--rootdir", str(HERE.parent.parent)],
            env=env, capture_output=True, text=True, timeout=1200,
        )
        output = proc.stdout + proc.stderr
        print(output)
        assert proc.returncode == 0, f"multi-device tests failed (exit {proc.returncode}):\n{output[-6000:]}"
        assert " passed" in proc.stdout and "no tests ran" not in proc.stdout

    return run
