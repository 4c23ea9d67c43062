"""Shared pytest configuration.

``tests/multidevice`` needs 8 (forced CPU) devices, which must be set before JAX is
imported; ``tests/test_devices.py`` runs it in its own process with the flag set. The
main process does not collect it.
"""

import os

collect_ignore = [] if os.environ.get("OPTAX_BALANCE_MULTIDEVICE") == "1" else ["multidevice"]
