"""XLA flags a process sets for itself, before its backend starts.

XLA reads ``XLA_FLAGS`` once, when the first backend starts, and aborts the process (``Unknown flag in
XLA_FLAGS``) if it names a flag this jaxlib does not have; a flag that a later jaxlib drops would then kill
every run. So a flag is added only after a child process has started JAX with it, and the answer is kept
per jaxlib version and flag set in a small cache directory.

The ``jaxrlhf study`` commands add :data:`STUDY_FLAGS` this way. A study runs its whole pipeline under
``jax.vmap`` over seeds and over the grid of a choice, around the ensemble's own ``vmap``, so its programs
hold reductions of rank 7 and 8 with size-1 axes (found in the compiled HLO of ``jaxrlhf study feedback
--quick``), and XLA's CPU backend in jaxlib 0.10.2 (also 0.11.0) hands such reductions to YNNPACK fusions
that can crash the process (jax#40412, jax#39257: reproduced here with jax#40412's program, SIGSEGV) or, for
a dot followed by a reduction, return a wrong element (jax#39103, reproduced here). With
``--xla_cpu_experimental_ynn_fusion_type=-reduce`` reductions stay with XLA's own code: both reproducers
then run correctly, and ``jaxrlhf study feedback --quick`` gives the same table and is no slower (1 min 26 s
with the flag, 1 min 42 s without, one run each). The flag names the CPU backend only; a user's own
``XLA_FLAGS`` setting of it wins.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import MutableMapping, Sequence
from importlib.metadata import version

STUDY_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-reduce",)


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/jaxrlhf`` (``~/.cache/jaxrlhf``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxrlhf")


def xla_accepts(flags: Sequence[str], cache_dir: str | None = None) -> bool:
    """Whether this jaxlib's XLA starts with ``flags`` in ``XLA_FLAGS`` (a child process tries; ~2 s the
    first time). The answer is kept in ``cache_dir`` as ``xla-flags-<key>.True|False``; an unwritable
    directory only means asking again next time."""
    cache_dir = cache_dir or default_cache_dir()
    key = hashlib.sha1(" ".join([version("jaxlib"), *flags]).encode()).hexdigest()[:16]
    marker = os.path.join(cache_dir, f"xla-flags-{key}")
    for answer in (True, False):
        if os.path.exists(f"{marker}.{answer}"):
            return answer
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    child = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True)
    answer = child.returncode == 0
    try:
        os.makedirs(cache_dir, exist_ok=True)
        open(f"{marker}.{answer}", "w").close()
    except OSError:
        pass
    return answer


def with_flags(xla_flags: str, wanted: Sequence[str], accepts=None) -> str:
    """``xla_flags`` plus each flag of ``wanted`` whose name it does not set already (the user's value wins)
    and that ``accepts([flag])`` (default :func:`xla_accepts`)."""
    accepts = accepts or xla_accepts
    names = {f.split("=")[0] for f in xla_flags.split()}
    added = [f for f in wanted if f.split("=")[0] not in names and accepts([f])]
    return " ".join([xla_flags, *added]).strip()


def set_flags_before_start(wanted: Sequence[str], environ: MutableMapping[str, str] | None = None,
                           accepts=None) -> str:
    """Put ``wanted`` into ``environ["XLA_FLAGS"]`` (default ``os.environ``) by :func:`with_flags`; returns
    the new value. Only takes effect if no JAX backend has started in this process yet."""
    environ = os.environ if environ is None else environ
    value = with_flags(environ.get("XLA_FLAGS", ""), wanted, accepts)
    if value:
        environ["XLA_FLAGS"] = value
    return value
