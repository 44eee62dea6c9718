"""The run directory: nothing written before it opens; then config.yaml and run.log, with the messages
logged while the inputs were being checked."""

import logging

import yaml

from jaxrlhf.train.run_config import TrainSection
from jaxrlhf.train.run_dir import RunDirectory


def test_nothing_is_written_before_open(tmp_path, restore_root_logging):
    directory = RunDirectory(tmp_path / "run", "sft")
    logging.getLogger("jaxrlhf").info("checking the data")
    directory.close()  # a run that failed while loading its inputs
    assert not (tmp_path / "run").exists()


def test_open_writes_the_config_and_the_held_messages(tmp_path, restore_root_logging):
    directory = RunDirectory(tmp_path / "run", "sft", level="INFO")
    log = logging.getLogger("jaxrlhf.test")
    log.info("before open")
    log.debug("not at INFO")
    directory.open(TrainSection(steps=3))
    log.info("after open")
    for handler in logging.getLogger().handlers:
        handler.flush()
    lines = (tmp_path / "run" / "run.log").read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["before open", "after open"]
    text = directory.config_path.read_text()
    assert text.startswith(f"# jaxrlhf sft --config {directory.config_path}\n")
    assert yaml.safe_load(text)["steps"] == 3
    directory.release()  # the run ends

    # A run with another config keeps the old one beside the new.
    again = RunDirectory(tmp_path / "run", "sft")
    again.open(TrainSection(steps=4))
    assert yaml.safe_load(directory.config_path.read_text())["steps"] == 4
    assert yaml.safe_load((tmp_path / "run" / "config.yaml.prev").read_text())["steps"] == 3


def test_retries_that_write_no_checkpoint_keep_the_checkpoints_config(tmp_path, restore_root_logging):
    """A good run, then two retries with other configs that fail before their first checkpoint: config.yaml
    is the last retry's, config.yaml.prev still the good run's (the config its checkpoints were written
    with), and config.yaml.uncommitted says so. A retry that checkpoints makes its config the committed
    one."""
    good = RunDirectory(tmp_path / "run", "sft")
    good.open(TrainSection(steps=3))
    good.commit_config()  # its checkpoint committed
    good.release()
    assert not (tmp_path / "run" / "config.yaml.uncommitted").exists()
    for steps in (4, 5):  # two failed retries
        retry = RunDirectory(tmp_path / "run", "sft")
        retry.open(TrainSection(steps=steps))
        retry.release()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["steps"] == 5
    assert yaml.safe_load((tmp_path / "run" / "config.yaml.prev").read_text())["steps"] == 3
    assert (tmp_path / "run" / "config.yaml.uncommitted").is_file()
    retry = RunDirectory(tmp_path / "run", "sft")
    retry.open(TrainSection(steps=6))
    retry.commit_config()
    retry.release()
    assert not (tmp_path / "run" / "config.yaml.uncommitted").exists()
    RunDirectory(tmp_path / "run", "sft").open(TrainSection(steps=7))  # the next change rotates again
    assert yaml.safe_load((tmp_path / "run" / "config.yaml.prev").read_text())["steps"] == 6


def test_a_second_process_on_the_same_directory_is_refused(tmp_path, restore_root_logging):
    """Two runs on one directory would interleave checkpoints and metrics (each deleting the other's
    temporary checkpoint): the second stops at once, in one line, and writes nothing."""
    import subprocess
    import sys
    import textwrap

    import pytest

    from jaxrlhf.config import ConfigError

    run = tmp_path / "run dir"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from jaxrlhf.train.run_config import TrainSection
            from jaxrlhf.train.run_dir import RunDirectory
            d = RunDirectory({str(run)!r}, "sft")
            d.open(TrainSection(steps=3))
            print("locked", flush=True)
            sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(p.name for p in run.iterdir())
        second = RunDirectory(run, "sft")
        with pytest.raises(ConfigError, match=r"^logging\.run_dir: .*run dir is in use by another jaxrlhf "
                                              r"process"):
            second.lock()
        with pytest.raises(ConfigError, match="is in use"):
            second.open(TrainSection(steps=4))
        assert sorted(p.name for p in run.iterdir()) == before  # nothing written
        assert "# jaxrlhf sft --config '" in (run / "config.yaml").read_text()  # quoted: a path with a space
    finally:
        holder.communicate("")
    second = RunDirectory(run, "sft")
    second.lock()  # the first process has ended: free
    second.release()
    # A directory that does not exist yet is locked once it is created.
    fresh = RunDirectory(tmp_path / "fresh", "sft")
    fresh.lock()
    assert not (tmp_path / "fresh").exists()
    fresh.open(TrainSection(steps=1))
    with pytest.raises(ConfigError, match="is in use"):
        RunDirectory(tmp_path / "fresh", "sft").lock()
    fresh.release()


def test_a_run_dir_written_with_a_tilde_is_the_home_directory(tmp_path, monkeypatch):
    from jaxrlhf.config import from_dict
    from jaxrlhf.train.run_config import LoggingSection

    monkeypatch.setenv("HOME", str(tmp_path))
    assert RunDirectory("~/runs/x", "sft").path == str(tmp_path / "runs" / "x")
    assert from_dict(LoggingSection, {"run_dir": "~/runs/y"}).run_dir == str(tmp_path / "runs" / "y")
    assert from_dict(LoggingSection, {"run_dir": "a~b"}).run_dir == "a~b"  # only a leading ~/
