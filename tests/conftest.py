"""Shared pytest configuration.

- ``tests/multidevice`` needs 8 (forced CPU) devices, which must be set before JAX is
  imported; ``tests/test_devices.py`` runs it in its own process with the flag set. The
  main process does not collect it.
- A fixed hypothesis profile so CI time stays bounded.
"""

import os

from hypothesis import HealthCheck, settings

collect_ignore = [] if os.environ.get("OPTAX_BALANCE_MULTIDEVICE") == "1" else ["multidevice"]

# "ci" (default): deterministic (derandomize: the same examples every run, no example
# database), few examples, no per-example deadline (the first example of a shape pays
# for a jit). "hunt": many random examples, for looking for bugs by hand:
#   HYPOTHESIS_PROFILE=hunt python -m pytest tests/test_properties.py
_COMMON = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.register_profile("ci", max_examples=12, derandomize=True, database=None, **_COMMON)
settings.register_profile("hunt", max_examples=400, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
