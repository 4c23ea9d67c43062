"""Runs ``examples/data_parallel.py`` in fast mode, as a user would (a fresh process)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("sync", ["grads", "stats"])
def test_data_parallel_example(sync):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the script sets it
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "examples/data_parallel.py", "--steps", "60", "--sync", sync],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.startswith("8 cpu devices, global batch 128"), out
    rows = re.findall(r"^\s*(.+?):\s+([\d.]+) ->\s+([\d.]+)$", out, flags=re.M)
    assert len(rows) == 3, out
    for name, first, last in rows:  # every task's loss goes down
        assert float(last) < float(first), f"{name}: {first} -> {last}\n{out}"
