"""The distributions build, pass ``twine check``, hold what they should, and install.

``python -m build --no-isolation`` builds the sdist, then the wheel *from the sdist* (so
the sdist is complete enough to build from); ``twine check --strict`` renders the README
as PyPI would. ``build``, ``twine`` and ``hatchling`` come with the dev extra (exact
versions); without them the test is skipped, saying so.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tarfile
import zipfile

import pytest

import optax_balance

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    for module in ("build", "twine", "hatchling"):
        pytest.importorskip(module, reason=f"{module} comes with the dev extra")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_twine_check_passes(dists: dict[str, pathlib.Path]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, dists.values())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASSED") == 2, proc.stdout


def test_wheel_holds_the_package_and_its_metadata(dists: dict[str, pathlib.Path]) -> None:
    (version,) = re.findall(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version == optax_balance.__version__, "pyproject.toml and __version__ disagree"
    assert dists["wheel"].name.startswith(f"optax_balance-{version}-py3-none-any")
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = set(whl.namelist())
        meta = whl.read(f"optax_balance-{version}.dist-info/METADATA").decode()
    src = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "optax_balance").rglob("*")
        if p.suffix in (".py", ".typed") and "__pycache__" not in p.parts
    }
    assert src <= names, sorted(src - names)  # every module, and py.typed
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names)
    assert "Requires-Dist: jax" in meta and "Requires-Dist: optax" in meta
    assert "Description-Content-Type: text/markdown" in meta


def test_sdist_holds_sources_tests_and_docs(dists: dict[str, pathlib.Path]) -> None:
    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for path in (
        "pyproject.toml",
        "README.md",
        "CHANGELOG.md",
        "LICENSE",
        "constraints.txt",
        "optax_balance/py.typed",
        "optax_balance/_core/_transform.py",
        "tests/methods.py",
        "examples/quickstart.py",
    ):
        assert path in names, path


def test_wheel_installs_and_imports_on_its_own(
    dists: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    # A pure-Python wheel installs by unpacking it (what pip does for purelib): jax and
    # optax come from this environment, the package only from the wheel (the subprocess
    # runs outside this checkout, so it cannot import the checkout's copy).
    target = tmp_path / "site"
    with zipfile.ZipFile(dists["wheel"]) as whl:
        whl.extractall(target)
    code = (
        "import jax, jax.numpy as jnp, numpy as np, optax_balance as ob\n"
        "tx = ob.balancer([1.0, 3.0], balance_grads=False)\n"
        "d, _ = jax.jit(tx.update)(jnp.array([[-4.0, 1, 1], [6.0, 1, 1]]), tx.init(jnp.zeros(3)))\n"
        "print(ob.__file__, ob.__version__, np.asarray(d, np.float64).tolist())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, version, *out = proc.stdout.split()
    assert where.startswith(str(target)), where  # the installed copy, not this checkout
    assert version == optax_balance.__version__
    assert " ".join(out) == "[14.0, 4.0, 4.0]"  # 1 * [-4, 1, 1] + 3 * [6, 1, 1]
