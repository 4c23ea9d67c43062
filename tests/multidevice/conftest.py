"""Forces 8 host (CPU) devices before JAX is imported; run via ``tests/test_devices.py``."""

import os

NUM_DEVICES = 8
_FLAG = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "xdist_group(name): run in one pytest-xdist worker")


def pytest_collection_modifyitems(config, items):
    if jax.device_count() < NUM_DEVICES:
        skip = pytest.mark.skip(
            reason=f"needs {NUM_DEVICES} devices; JAX was imported before XLA_FLAGS was set "
            "(run through tests/test_devices.py)"
        )
        for item in items:
            item.add_marker(skip)
