"""Runs the multi-device suite (``tests/multidevice``) in its own process.

JAX fixes its device count at import, so 8 CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) need a fresh interpreter.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_multidevice_suite():
    env = dict(os.environ)
    env["OPTAX_BALANCE_MULTIDEVICE"] = "1"
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "pytest", "tests/multidevice", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("xdist") is not None and (os.cpu_count() or 1) > 1:
        cmd += ["-n", "2", "--dist", "loadgroup"]  # compile-bound: two workers halve it
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (
        f"multi-device suite failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout
