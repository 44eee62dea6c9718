"""Keep ``transformers``' advice about a missing PyTorch off the terminal of a user who does not need it.

jaxrlhf uses ``transformers`` for tokenizers and configs only, which work without PyTorch, but importing
``transformers`` without PyTorch logs "PyTorch was not found. Models won't be available…" (older versions:
"None of PyTorch, TensorFlow >= 2.0, or Flax have been found…"; with too old a PyTorch: "Disabling
PyTorch…"). :func:`hide_missing_framework_advice` adds a filter that drops exactly those records on the
loggers that emit them; every other ``transformers`` message is untouched. ``jaxrlhf/__init__.py`` installs
it, so it is in place before any jaxrlhf module imports ``transformers``.
"""

from __future__ import annotations

import logging
import re

# The loggers that emit the advice: the package's own (at import) and its import utilities.
_LOGGERS = ("transformers", "transformers.utils.import_utils")
_ADVICE = re.compile(r"^(PyTorch was not found|None of PyTorch, TensorFlow|Disabling PyTorch because)")


class _MissingFrameworkAdvice(logging.Filter):
    """Drops the records that only say a deep-learning framework is absent."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and _ADVICE.match(record.msg))


def hide_missing_framework_advice() -> None:
    """Install the filter (idempotent)."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _MissingFrameworkAdvice) for f in logger.filters):
            logger.addFilter(_MissingFrameworkAdvice())
