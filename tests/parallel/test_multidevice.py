"""tests/parallel/multidevice/test_sharding.py with 8 simulated CPU devices (FSDP placement, sharded
generation, N→M-device checkpoints); the steps and trainers have files of their own beside this one."""

import pytest


@pytest.mark.slow
def test_multidevice_sharding(run_multidevice):
    run_multidevice("test_sharding.py")
