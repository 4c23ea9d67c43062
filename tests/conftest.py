"""Shared pytest configuration.

- ``tests/multidevice`` needs 8 (forced CPU) devices, which must be set before JAX is
  imported; ``tests/test_devices.py`` runs it in its own process with the flag set. The
  main process does not collect it.
- A fixed hypothesis profile so CI time stays bounded.
- Compile time, most of the suite's: JAX's persistent compilation cache in a folder of
  each process, XLA:CPU's fast-compile flags, and a bound on a worker's compiled
  programs (memory mappings).
"""

import atexit
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings


def _compile_each_program_once() -> None:
    """Turns on JAX's persistent compilation cache, in a temporary folder of this process.

    JAX's jit cache is keyed on the Python function, and most tests build their
    transformation afresh, so two tests that run the same program (same method, shapes
    and options) compile it twice; compiling is most of this suite's time. The persistent
    cache is keyed on the program (its StableHLO, named after the function, the backend
    and the flags; not the function object or source lines): a program compiled once in
    this process is loaded from disk afterwards (an eager DualProj update: 0.3 s instead
    of 1.5 s). One folder per process, because JAX writes cache entries in place: a
    process reading another's half-written entry would fail. Subprocesses the tests
    start while waiting on them (the x64 run, examples) inherit it; a pytest subprocess
    makes its own. Removed at exit. ``OPTAX_BALANCE_TEST_JAX_CACHE=0`` turns it off.
    """
    if os.environ.get("OPTAX_BALANCE_TEST_JAX_CACHE", "1") == "0":
        return
    path = tempfile.mkdtemp(prefix="optax_balance-jax-cache-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    options = {
        "jax_compilation_cache_dir": path,
        "jax_persistent_cache_min_compile_time_secs": 0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    for name, value in options.items():
        os.environ[name.upper()] = str(value)
    import jax  # after the environment, for JAX's import-time reads

    for name, value in options.items():
        jax.config.update(name, value)


# Compiling is most of this suite's time, and XLA:CPU's default code generation is built
# for fast programs, not fast compiles. The tests' programs are tiny (8 parameters, a few
# tasks), so the suite compiles them with LLVM's optimisation off and XLA's classic
# elemental emitters instead of its newer fusion emitters, which cuts compile time to
# about a third (ten registry methods' hostile batches: 8.8 s -> 3.0 s on an AMD EPYC). LLVM's
# remaining "expensive" passes off and the module compiled in one piece (XLA splits it for
# parallel code generation, which two workers on two cores cannot use) cut the backend
# compile by another quarter (twelve methods' steps: 2.7 -> 2.0 s on a Zen 3 EPYC). The HLO
# program, hence its math, is the same; every numerical tolerance here comes from float32
# error bounds, not from one code generator's rounding. Subprocesses inherit the flags.
# ``OPTAX_BALANCE_TEST_FAST_COMPILE=0`` compiles as XLA does by default. XLA aborts on a
# flag it does not know, so they are set only under the jaxlib release line they were
# measured on (constraints.txt pins it); another jaxlib compiles with XLA's defaults.
_FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
    " --xla_llvm_disable_expensive_passes=true --xla_cpu_parallel_codegen_split_count=1"
)
_FAST_COMPILE_JAXLIB = (0, 10)


def _jaxlib_release() -> tuple[int, ...]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(part) for part in version("jaxlib").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return ()


if (
    os.environ.get("OPTAX_BALANCE_TEST_FAST_COMPILE", "1") != "0"
    and _jaxlib_release() == _FAST_COMPILE_JAXLIB
):
    _flags = os.environ.get("XLA_FLAGS", "")
    if _FAST_COMPILE_FLAGS not in _flags:
        os.environ["XLA_FLAGS"] = f"{_flags} {_FAST_COMPILE_FLAGS}".strip()

_compile_each_program_once()

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
