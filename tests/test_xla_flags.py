"""XLA flags set before the backend starts (jaxrlhf/xla_flags.py): only flags this jaxlib accepts, the user's
own setting wins, and the ``study`` commands of the console script keep reductions out of YNNPACK fusions."""

from __future__ import annotations

import os
import subprocess

import pytest

from jaxrlhf import xla_flags
from jaxrlhf.xla_flags import STUDY_FLAGS, set_flags_before_start, with_flags, xla_accepts


def test_with_flags_adds_accepted_flags_and_leaves_the_users_own():
    accepts = lambda flags: "--bogus=1" not in flags
    assert with_flags("", ["--a=1", "--bogus=1"], accepts) == "--a=1"
    assert with_flags("--dump=x --a=0", ["--a=1", "--b=2"], accepts) == "--dump=x --a=0 --b=2"
    env = {"XLA_FLAGS": "--dump=x"}
    assert set_flags_before_start(["--b=2"], env, accepts) == "--dump=x --b=2" == env["XLA_FLAGS"]
    env = {}
    assert set_flags_before_start(["--bogus=1"], env, accepts) == "" and "XLA_FLAGS" not in env


def test_xla_accepts_asks_a_child_once_and_keeps_the_answer(tmp_path, monkeypatch):
    assert xla_accepts(list(STUDY_FLAGS), str(tmp_path))  # this jaxlib has the study flag
    assert not xla_accepts(["--xla_cpu_no_such_flag_in_any_jaxlib=1"], str(tmp_path))
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".False", ".True"]

    def no_child(*args, **kwargs):
        raise AssertionError("the kept answer should have been used")

    monkeypatch.setattr(subprocess, "run", no_child)
    assert xla_accepts(list(STUDY_FLAGS), str(tmp_path))
    assert not xla_accepts(["--xla_cpu_no_such_flag_in_any_jaxlib=1"], str(tmp_path))


@pytest.mark.parametrize("argv,flagged", [(["study", "choices", "--quick"], True),
                                          (["demo", "--quick"], False), (["study", "--help"], False)])
def test_the_console_script_sets_the_study_flags_for_studies_only(monkeypatch, argv, flagged):
    from jaxrlhf import cli, host_memory

    monkeypatch.setattr(host_memory, "retain_freed_memory", lambda: True)
    monkeypatch.setattr(cli, "main", lambda argv=None: 0)
    monkeypatch.setattr(xla_flags, "xla_accepts", lambda flags, cache_dir=None: True)
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=somewhere")
    assert cli.console(argv) == 0
    want = " ".join(["--xla_dump_to=somewhere", *STUDY_FLAGS]) if flagged else "--xla_dump_to=somewhere"
    assert os.environ["XLA_FLAGS"] == want
