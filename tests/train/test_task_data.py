"""``jaxrlhf task-data``: existing output files are never overwritten without ``overwrite=true``, and the
files are written with the permissions the umask gives."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from jaxrlhf import cli

SMALL = ["--set", "sft_examples=8", "--set", "eval_examples=4", "--set", "rl_prompts=4"]
OUTPUTS = ("sft.jsonl", "sft_eval.jsonl", "prompts.jsonl", "eval_prompts.jsonl")


def task_data(out: Path, *args: str) -> int:
    return cli.main(["task-data", "--set", f"out_dir={out}", *SMALL, *args])


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def umask():
    """Set the umask for one test, then restore the previous one."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("existing", ["sft.jsonl", "prompts.jsonl", "tokenizer"])
def test_refuses_to_overwrite_an_existing_output_and_writes_nothing(tmp_path, capsys, existing):
    out = tmp_path / "data"
    out.mkdir()
    mine = out / existing
    if existing == "tokenizer":
        mine.mkdir()
        (mine / "tokenizer.json").write_text('{"mine": true}')
    else:
        mine.write_text('{"prompt": "my own data", "completion": "keep me"}\n')
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    assert task_data(out) == 1
    line = error_line(capsys)
    assert line.startswith("jaxrlhf task-data: error: out_dir: ") and str(out) in line, line
    assert existing in line and "overwrite=true" in line, line
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written, not even a temp
    if existing == "tokenizer":
        assert (mine / "tokenizer.json").read_text() == '{"mine": true}'
    else:
        assert mine.read_text() == '{"prompt": "my own data", "completion": "keep me"}\n'


def test_the_error_names_every_existing_output(tmp_path, capsys):
    out = tmp_path / "data"
    assert task_data(out) == 0
    capsys.readouterr()
    snapshot = {name: (out / name).read_bytes() for name in OUTPUTS}
    assert task_data(out, "--set", "seed=1") == 1
    line = error_line(capsys)
    for name in ("tokenizer/", *OUTPUTS):
        assert name in line, line
    assert {name: (out / name).read_bytes() for name in OUTPUTS} == snapshot


def test_overwrite_true_replaces_the_files(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "sft.jsonl").write_text('{"prompt": "old", "completion": "old"}\n')
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "stale.txt").write_text("stale")
    (out / "unrelated.txt").write_text("not ours")
    assert task_data(out, "--set", "overwrite=true") == 0
    rows = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["prompt"] != "old" for r in rows)
    assert not (out / "tokenizer" / "stale.txt").exists()  # the tokenizer directory was replaced whole
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "unrelated.txt").read_text() == "not ours"
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUTS, "tokenizer", "unrelated.txt"])


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_files_follow_the_umask(tmp_path, capsys, umask, mask):
    umask(mask)
    out = tmp_path / "data"
    assert task_data(out) == 0
    for name in OUTPUTS:
        assert mode(out / name) == 0o666 & ~mask, name
    assert mode(out / "tokenizer") == 0o777 & ~mask
    for f in (out / "tokenizer").iterdir():
        assert mode(f) == 0o666 & ~mask, f.name
    assert os.umask(mask) == mask  # reading the umask did not change it


def test_out_dir_that_is_a_file_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "data"
    out.write_text("a file")
    assert task_data(out) == 1
    assert "is not a directory" in error_line(capsys)
    assert out.read_text() == "a file"


def test_overwrite_is_documented_in_the_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["task-data", "--help"])
    help_text = capsys.readouterr().out
    assert "overwrite" in help_text and "replace existing output files" in help_text
