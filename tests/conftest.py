"""Shared pytest configuration.

- ``tests/multidevice`` needs 8 (forced CPU) devices, which must be set before JAX is
  imported; ``tests/test_devices.py`` runs it in its own process with the flag set. The
  main process does not collect it.
- A fixed hypothesis profile so CI time stays bounded.
"""

import os

import pytest
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


def pytest_collection_modifyitems(config, items):
    """Groups every test of one registry method (``tests/methods.py``) under its name.

    The registry-wide suites (contract, hostile inputs, properties, weightings, ...) share
    each method's compiled steps through ``tests/inputs.py``'s per-process caches; with
    ``--dist loadgroup`` (``make test``) a method's tests run in one worker, which compiles
    them once instead of once per worker.
    """
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or item.get_closest_marker("xdist_group") is not None:
            continue
        for value in callspec.params.values():
            if type(value).__name__ == "Method" and isinstance(getattr(value, "name", None), str):
                item.add_marker(pytest.mark.xdist_group(value.name))
                break


# XLA:CPU maps a few memory regions per compiled program (about 3 per `jit` compile
# here) and never unmaps them while the program is cached. A worker that compiles many
# thousands of programs nears the kernel's per-process limit (vm.max_map_count, 65530 by
# default), past which LLVM's code allocation fails with a segfault inside XLA's compile
# (seen once, at 97% of a full run). Between test modules, a worker past this many
# mappings drops JAX's caches (later tests recompile what they need).
_MAX_MAPS = int(os.environ.get("OPTAX_BALANCE_TEST_MAX_MAPS", "20000"))


def _memory_maps() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no such limit to stay under
        return 0


@pytest.fixture(autouse=True, scope="module")
def _bounded_compiled_programs():
    yield
    if _memory_maps() > _MAX_MAPS:
        import gc

        import jax

        jax.clear_caches()
        gc.collect()
