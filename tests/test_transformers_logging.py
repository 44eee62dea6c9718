"""``transformers``' advice about a missing PyTorch is not shown to a jaxrlhf user (PyTorch hidden)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Hide PyTorch the way a user without it sees it: `import torch` fails and find_spec finds nothing.
_NO_TORCH = "import sys; sys.modules['torch'] = None\n"


def _stderr_of(script: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
    done = subprocess.run(
        [sys.executable, "-c", _NO_TORCH + script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.mark.parametrize(
    "use",
    [
        "import jaxrlhf.data\nfrom jaxrlhf.data import make_char_tokenizer\nmake_char_tokenizer('ab')",
        "from jaxrlhf.models import hf_io\nimport transformers\ntransformers.AutoConfig",
    ],
    ids=["data", "hf_io"],
)
def test_no_pytorch_advice_through_jaxrlhf(use):
    err = _stderr_of(use)
    assert "PyTorch" not in err, err


def test_transformers_alone_still_gives_the_advice():
    """The control: without jaxrlhf the advice appears, so the test above is not vacuous."""
    assert "PyTorch was not found" in _stderr_of("import transformers")


def test_other_transformers_messages_still_show():
    import logging

    import jaxrlhf  # noqa: F401  (installs the filter)

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    logger, keep = logging.getLogger("transformers"), Keep()
    logger.addHandler(keep)  # on the logger itself: transformers stops propagation to the root
    try:
        logger.warning("PyTorch was not found. Models won't be available.")
        logger.warning("something else about PyTorch")
    finally:
        logger.removeHandler(keep)
    assert keep.messages == ["something else about PyTorch"]
