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


def test_retries_that_write_no_checkpoint_keep_the_checkpoints_config(tmp_path, restore_root_logging):
    """A good run, then two retries with other configs that fail before their first checkpoint: config.yaml
    is the last retry's, config.yaml.prev still the good run's (the config its checkpoints were written
    with), and config.yaml.uncommitted says so. A retry that checkpoints makes its config the committed
    one."""
    good = RunDirectory(tmp_path / "run", "sft")
    good.open(TrainSection(steps=3))
    good.commit_config()  # its checkpoint committed
    assert not (tmp_path / "run" / "config.yaml.uncommitted").exists()
    for steps in (4, 5):  # two failed retries
        RunDirectory(tmp_path / "run", "sft").open(TrainSection(steps=steps))
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["steps"] == 5
    assert yaml.safe_load((tmp_path / "run" / "config.yaml.prev").read_text())["steps"] == 3
    assert (tmp_path / "run" / "config.yaml.uncommitted").is_file()
    retry = RunDirectory(tmp_path / "run", "sft")
    retry.open(TrainSection(steps=6))
    retry.commit_config()
    assert not (tmp_path / "run" / "config.yaml.uncommitted").exists()
    RunDirectory(tmp_path / "run", "sft").open(TrainSection(steps=7))  # the next change rotates again
    assert yaml.safe_load((tmp_path / "run" / "config.yaml.prev").read_text())["steps"] == 6
