"""jaxrlhf.host_memory: after ``retain_freed_memory()`` a jitted call's temporaries are faulted in once,
not on every call; the environment's own malloc settings win; and the console script applies it.

Each case runs in a fresh process: the allocator's settings are per process and must come before the
runtime's threads start."""

import statistics
import subprocess
import sys
import textwrap

import pytest

from jaxrlhf.host_memory import user_chose_malloc_settings

# A jitted matmul of two 32 MiB temporaries, called four times after the first call; prints the minor page
# faults of each call.
PROBE = textwrap.dedent("""
    import resource, sys
    from jaxrlhf.host_memory import retain_freed_memory
    retained = retain_freed_memory() if sys.argv[1] == "retain" else False
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: ((jnp.sin(x) @ jnp.cos(x).T) * 2.0).sum())
    x = jnp.ones((2048, 4096), jnp.float32)
    f(x).block_until_ready()
    faults = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(retained, *faults)
""")


def run_probe(mode: str, **env: str) -> tuple[bool, list[int]]:
    import os

    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
    assert out.returncode == 0, out.stderr[-3000:]
    retained, *faults = out.stdout.split()
    return retained == "True", [int(f) for f in faults]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_is_not_faulted_in_again_on_every_call():
    retained, faults = run_probe("retain")
    _, default = run_probe("glibc")
    assert retained
    # Measured on the 2-core machine: ~278 000 faults per call with glibc's defaults (the temporaries and
    # the matmul's buffers, 4 KiB pages), 0–16 000 retained.
    assert statistics.median(default) > 10_000, default
    assert statistics.median(faults) < 0.2 * statistics.median(default), (faults, default)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_environments_malloc_settings_win():
    retained, faults = run_probe("retain", MALLOC_ARENA_MAX="8")
    assert not retained and statistics.median(faults) > 10_000, faults
    assert user_chose_malloc_settings({"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert user_chose_malloc_settings({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert not user_chose_malloc_settings({"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "PATH": "/bin"})


def test_the_console_script_applies_it(monkeypatch):
    from jaxrlhf import cli, host_memory

    calls = []
    monkeypatch.setattr(host_memory, "retain_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(cli, "main", lambda argv=None: 0)
    assert cli.console() == 0 and calls == [1]
