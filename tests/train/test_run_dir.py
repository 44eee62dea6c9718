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

    # A run with another config keeps the old one beside the new.
    again = RunDirectory(tmp_path / "run", "sft")
    again.open(TrainSection(steps=4))
    assert yaml.safe_load(directory.config_path.read_text())["steps"] == 4
    assert yaml.safe_load((tmp_path / "run" / "config.yaml.prev").read_text())["steps"] == 3
