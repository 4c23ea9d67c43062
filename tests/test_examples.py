"""Every example runs, in its fast mode, exactly as its docstring says; Flax state round-trips.

The examples are run as subprocesses (``sys.executable examples/<name>.py --steps N``)
from the repository root, so they see the package the way a user does.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, timeout: float = 240.0) -> str:
    # PYTHONPATH: import this checkout's optax_balance, whatever is installed in the venv.
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = dict(
        os.environ,
        PYTHONPATH=pythonpath,
        MPLBACKEND="Agg",
        PYTHONWARNINGS="error::DeprecationWarning",
    )
    proc = subprocess.run(
        [sys.executable, f"examples/{name}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def final_relative_losses(out: str) -> list[float]:
    m = re.search(r"final relative losses: \[([^\]]*)\]", out)
    assert m, out
    return [float(v) for v in m.group(1).split(",")]


def test_quickstart_fast() -> None:
    out = run_example("quickstart.py", "--steps", "20")
    # ob.conflict_stats at the start: the norms follow the targets' scales, 1 : 10 : 100.
    m = re.search(r"norms on the trunk at the start \[([^\]]*)\], (\d) conflicting pairs", out)
    assert m, out
    norms = np.array([float(v) for v in m.group(1).split(",")])
    assert np.all(np.diff(norms) > 0) and norms[2] / norms[0] > 30, out
    assert 0 <= int(m.group(2)) <= 3
    rel = {}
    for name in ("plain sum", "MGDA (l2)", "balancer"):
        m = re.search(
            rf"^{re.escape(name)}\s+relative losses \[([^\]]*)\]\s+task weights", out, re.M
        )
        assert m, (name, out)
        rel[name] = np.array([float(v) for v in m.group(1).split(",")])
        assert rel[name].shape == (3,) and np.all(np.isfinite(rel[name])), (name, out)
        assert rel[name].max() < 1.0, (name, out)  # every task improved
    # The point of the demo: the balancer helps the two small tasks more than the plain sum
    # (20 steps: about 0.22 and 0.58 against 0.29 and 0.65).
    assert np.all(rel["balancer"][:2] < rel["plain sum"][:2] - 0.03), out
    assert "applies them to the raw ones" in out


@pytest.mark.parametrize("name", ["flax_nnx.py", "flax_linen.py"])
def test_flax_examples_fast(name: str) -> None:
    pytest.importorskip("flax")
    out = run_example(name, "--steps", "30")
    rel = final_relative_losses(out)
    assert len(rel) == 3 and all(np.isfinite(rel)) and max(rel) < 1.0  # every task improved
    weights = re.findall(r"task weights ([^\n]*)", out)
    assert weights and len(weights[-1].split()) == 3


def test_task_weights_through_nnx_optimizer() -> None:
    """``ob.task_weights`` reads the weights out of ``nnx.Optimizer``'s wrapped state.

    Expected value: two-task MGDA in closed form, the min-norm point of the segment
    [g1, g2] is ``gamma * g1 + (1 - gamma) * g2`` with
    ``gamma = clip((g2 - g1) . g2 / ||g1 - g2||^2, 0, 1)``.
    """
    nnx = pytest.importorskip("flax.nnx")
    import jax.numpy as jnp
    import optax

    import optax_balance as ob

    class Tiny(nnx.Module):
        def __init__(self) -> None:
            self.w = nnx.Param(jnp.zeros(3))

    g = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    gamma = np.clip((g[1] - g[0]) @ g[1] / np.sum((g[0] - g[1]) ** 2), 0.0, 1.0)
    expected = np.array([gamma, 1.0 - gamma])

    model = Tiny()
    optimizer = nnx.Optimizer(model, optax.chain(ob.mgda(), optax.sgd(1.0)), wrt=nnx.Param)
    grads = nnx.State({"w": nnx.Param(jnp.asarray(g, jnp.float32))})
    optimizer.update(model, grads)
    w = ob.task_weights(optimizer.opt_state)
    np.testing.assert_allclose(np.asarray(w), expected, atol=1e-5)
    # The update applied is -(expected @ g) with sgd(1.0).
    np.testing.assert_allclose(np.asarray(model.w[...]), -(expected @ g), atol=1e-4)


def test_gradnorm_toy_fast(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("matplotlib")
    out_png = tmp_path / "toy.png"
    out = run_example("gradnorm_toy.py", "--steps", "20", "--out", str(out_png))
    for name in ("equal weights", "GradNorm", "MGDA", "balancer", "MetaBalance"):
        assert re.search(rf"^{name}\s+\d", out, re.MULTILINE), (name, out)
    assert "note:" not in out  # every method is present in this checkout
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out_png.stat().st_size > 20_000  # a real figure, not an empty canvas


def test_multi_digits_fast() -> None:
    pytest.importorskip("sklearn")
    out = run_example("multi_digits.py", "--steps", "60")
    rows = {}
    for name in ("equal weights", "MGDA", "GradNorm", "balancer", "MetaBalance"):
        m = re.search(rf"^{name}\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)", out, re.MULTILINE)
        assert m, (name, out)
        rows[name] = [float(v) for v in m.groups()]
    for name, (left, right, mean) in rows.items():
        assert 0.0 <= left <= 1.0 and 0.0 <= right <= 1.0, (name, out)
        assert abs(mean - (left + right) / 2) < 2e-3, (name, out)
    # 60 steps are enough to beat chance (0.1) on the task each method favours.
    assert all(max(r[:2]) > 0.2 for r in rows.values()), out
    # Loss-based methods (one backward pass) in the same table, with the time per step.
    for name in ("UW", "IMTL-L", "FAMO", "GLS", "DWA", "RLW"):
        m = re.search(rf"^{name}\s+([0-9.]+)\s+([0-9.]+)\s+[0-9.]+\s+losses\s+([0-9.]+)", out, re.M)
        assert m and max(float(m[1]), float(m[2])) > 0.2 and float(m[3]) > 0, (name, out)
    assert re.search(r"^MGDA\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+\s+grads\s+[0-9.]+", out, re.M), out
