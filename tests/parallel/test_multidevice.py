"""Runs tests/parallel/multidevice/ in a subprocess with 8 simulated CPU devices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_multidevice_suite():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAXRLHF_MULTIDEVICE"] = "1"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(HERE / "multidevice"),
            "-q",
            "-p",
            "no:cacheprovider",
            "-n",
            "0",  # one process: its 8 simulated devices already use the cores
            "--rootdir",
            str(HERE.parent.parent),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    output = proc.stdout + proc.stderr
    print(output)
    assert proc.returncode == 0, f"multi-device tests failed (exit {proc.returncode}):\n{output[-6000:]}"
    assert " passed" in proc.stdout and "no tests ran" not in proc.stdout
