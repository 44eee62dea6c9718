"""Atomic file writes: readers see the old file or the new one, never half of one, and a failed write
leaves the previous file in place."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class OutputWriteError(RuntimeError):
    """An output (metrics, an export, …) could not be written: disk full, a file-size limit, a read-only
    place. One line naming the file; what was there before is left as it was."""


def umask() -> int:
    """The process umask (set to 0 and restored at once: the only portable way to read it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new directory in ``parent`` with the mode ``mkdir`` would give it (0777 less the umask), not
    ``mkdtemp``'s 0700: renamed into place, it must be readable as any other output."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, then ``os.replace`` it over ``path``,
    with the mode ``open(path, "w")`` would give (0666 less the umask, not ``mkstemp``'s 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
