"""The multi-device tests need 8 (simulated) devices, fixed when the backend starts: they run in their own
pytest process (see test_multidevice.py) and are skipped by the main collection."""

import os

if os.environ.get("JAXRLHF_MULTIDEVICE") != "1":
    collect_ignore_glob = ["multidevice/*"]
