"""tests/parallel/multidevice/test_steps_sharded.py with 8 simulated CPU devices: every jitted step on the
(data, fsdp) meshes equals one device."""

import pytest


@pytest.mark.slow
def test_multidevice_steps(run_multidevice):
    run_multidevice("test_steps_sharded.py")
