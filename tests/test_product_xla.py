"""The numerics tests once more under XLA's own settings, the ones a user's run compiles with.

The suite compiles with test-only XLA flags (``conftest.TEST_XLA_FLAGS``: LLVM at -O0, fusions through the
elemental IR emitter) because compilation is most of its time. Those flags change how XLA emits machine code,
so a code-generation bug, or rounding that only the default pipeline produces, would go unseen by every other
test. This one runs, in a child process with ``JAXRLHF_TEST_PRODUCT_XLA=1`` (the suite's flags left out, the
user's own ``XLA_FLAGS`` kept), the tests that hold the model and its gradients against references:
logits, padding and greedy decoding against ``transformers``' PyTorch models, the attention and its
gradients against float64 at sizes that are not powers of two, the written-out LM-head
backward against autodiff, the scanned blocks' gradients under every remat policy (GQA), and the bfloat16
first-minibatch PPO ratio (≤ 1e-6).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PRODUCT_XLA_TESTS = (
    "tests/models/test_parity.py",
    "tests/models/test_attention.py",
    "tests/models/test_backward_pass.py::test_head_backward_equals_autodiff_of_its_forward",
    "tests/models/test_backward_pass.py::test_every_remat_policy_gives_the_gradients_of_none[scan-llama-gqa]",
    "tests/steps/test_experience.py::test_first_minibatch_ratio_is_one_in_bfloat16",
)


def product_environment(environ: dict, user_xla_flags: str) -> dict:
    """``environ`` for a child suite that compiles as a user's run does: the switch on, XLA_FLAGS back to
    what the user had before the suite added its own (removed if that was nothing)."""
    env = {**environ, "JAXRLHF_TEST_PRODUCT_XLA": "1"}
    env.pop("XLA_FLAGS", None)
    if user_xla_flags:
        env["XLA_FLAGS"] = user_xla_flags
    return env


def test_product_environment_drops_only_the_suites_flags():
    env = product_environment({"XLA_FLAGS": "--a=1 --xla_backend_optimization_level=0", "X": "y"}, "--a=1")
    assert env == {"XLA_FLAGS": "--a=1", "X": "y", "JAXRLHF_TEST_PRODUCT_XLA": "1"}
    assert "XLA_FLAGS" not in product_environment({"XLA_FLAGS": "--xla_backend_optimization_level=0"}, "")


def test_the_conftest_switch_leaves_xla_flags_alone(tmp_path):
    probe = "import conftest, os; print(repr(os.environ.get('XLA_FLAGS')))"
    env = product_environment(dict(os.environ), "--xla_dump_hlo_as_text")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT / "tests", env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == repr("--xla_dump_hlo_as_text")


def test_the_numerics_tests_pass_under_xlas_own_settings(suite_conftest):
    if suite_conftest.PRODUCT_XLA:
        pytest.skip("this process already runs under XLA's own settings")
    env = product_environment(dict(os.environ), suite_conftest.USER_XLA_FLAGS)
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *PRODUCT_XLA_TESTS]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, tail  # 5 (nothing collected) fails too
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, tail
