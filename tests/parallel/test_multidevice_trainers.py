"""tests/parallel/multidevice/test_trainers_sharded.py with 8 simulated CPU devices: SFT and PPO trainers on
an FSDP mesh."""

import pytest


@pytest.mark.slow
def test_multidevice_trainers(run_multidevice):
    run_multidevice("test_trainers_sharded.py")
