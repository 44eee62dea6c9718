"""Atomic writes: the new text or the old, never half, and the mode a plain write would give."""

import os
import stat

import pytest

from jaxrlhf.files import make_temp_dir, umask, write_text_atomic


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, mask):
    previous = os.umask(mask)
    try:
        write_text_atomic(tmp_path / "a.txt", "one\n")
        write_text_atomic(tmp_path / "a.txt", "two\n")  # replaced whole
        directory = make_temp_dir(tmp_path, ".tmp-")
        assert umask() == mask and os.umask(mask) == mask  # reading it changed nothing
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").read_text() == "two\n"
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o777 & ~mask  # not mkdtemp's 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.txt", directory.name])  # no leftovers


def test_a_failed_write_keeps_the_old_file(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "old\n")
    with pytest.raises(TypeError):
        write_text_atomic(tmp_path / "a.txt", 3)  # not text
    assert (tmp_path / "a.txt").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
