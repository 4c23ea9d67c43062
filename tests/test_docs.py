"""The docs site builds from a fresh clone, warnings as errors (what ``make docs`` runs)."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from html import unescape

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    pytest.importorskip("furo")
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "docs",
         str(tmp_path / "html")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    html = tmp_path / "html"
    # Every public name has an entry in the API reference, and every README section
    # made it onto a page.
    import optax_balance as ob

    api = (html / "_generated" / "api.html").read_text()
    for name in ob.__all__:
        anchor = "module-optax_balance." if name == "weightings" else "optax_balance."
        assert f'id="{anchor}{name}"' in api, name
    for name in ob.weightings.__all__:
        assert f'id="optax_balance.weightings.{name}"' in api, name
    pages = "".join(p.read_text() for p in (html / "_generated").glob("*.html"))
    pages = unescape(pages).replace("\u2019", "'")  # Sphinx's smart quotes
    readme = (ROOT / "README.md").read_text()
    for title in [ln[3:].strip() for ln in readme.splitlines() if ln.startswith("## ")]:
        if title != "License":
            assert title.split(" (")[0].split(":")[0] in pages, title
