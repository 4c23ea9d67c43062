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
    # "Which method" has a row for every public method, and the gallery its figure.
    which = unescape((html / "which_method.html").read_text())
    for name in ob.weightings.__all__:
        assert f"ob.{name}(" in which, name
    assert "Measured: " in which and "(to be written)" not in which
    gallery = (html / "gallery.html").read_text()
    assert "toy_pareto.png" in gallery
    assert any(html.rglob("toy_pareto.png")), "the gallery figure was not copied"


def test_which_method_rows_cover_the_registry_and_every_public_method():
    """The page's table has one row per registry entry and per public weighting, each
    with what it reads, its cost and a "pick it when" sentence (no sphinx needed)."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import _method_guide
    finally:
        sys.path.remove(str(ROOT / "docs"))
    import optax_balance as ob
    from tests.methods import METHODS

    rows = _method_guide.rows()
    assert sorted(r.name for r in rows if r.family != "wrappers") == sorted(m.name for m in METHODS)
    assert set(ob.weightings.__all__) <= {r.public for r in rows}
    for r in rows:
        assert r.reads and r.cost and len(r.when) > 40 and r.call.startswith(f"ob.{r.public}("), r
    by_name = {r.name: r for r in rows}
    # Spot checks against the methods' definitions: what they read, what they guarantee.
    assert by_name["famo"].reads.startswith("losses only")
    assert by_name["famo"].cost.startswith("1 backward pass")
    assert by_name["upgrad"].reads == "Gramian"
    assert "non-conflicting" in by_name["upgrad"].guarantees
    assert "gradient-sized state" in by_name["excess_mtl"].reads
    assert "non-conflicting" not in by_name["pcgrad"].guarantees
    assert "random" in by_name["pcgrad"].guarantees


def test_measured_figures_are_read_from_a_results_file(tmp_path):
    """The "measured" column quotes RESULTS.md's cells (T=8) and names the run's CPU."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import _method_guide
    finally:
        sys.path.remove(str(ROOT / "docs"))
    results = tmp_path / "RESULTS.md"
    results.write_text(
        "# b\n\n|  |  |\n|---|---|\n| date (UTC) | 2027-01-01 00:00 |\n| CPU | Some CPU |\n"
        "| cores (usable) | 4 (4) |\n\n## 1. Aggregation cost against the one-pass floor\n\n"
        "| method | kind | T | P | floor ms | ours ms | ours/floor | target |\n"
        "|---|---|---|---|---|---|---|---|\n| mgda | gram | 8 | 1e+06 | 1 | 2.5 | 2.50 | ok |\n"
        "| mgda | gram | 2 | 1e+06 | 1 | 9 | 9.00 | ok |\n\n## 3. Train-step overhead\n\n"
        "| method | T | shared params | equal-weight ms | method ms | ratio | target |\n"
        "|---|---|---|---|---|---|---|\n| mgda | 8 | 10 | 1 | 1.1 | 1.10 |  |\n\n"
        "## 7. Loss-based methods: the cost of one backward pass\n\n"
        "| method | needs | T=2: ms (median, best x plain) | T=8: ms (median, best x plain) |\n"
        "|---|---|---|---|\n| plain sum of the losses | — | 1 | 2 |\n"
        "| famo | losses only | 1 (1.01x, 1.00x) | 2 (1.03x, 1.02x) |\n"
    )
    note, figures = _method_guide.measured(results)
    assert "2027-01-01 00:00" in note and "Some CPU" in note and "stale" not in note
    assert figures["mgda"] == [
        "step 1.10x the equal-weight step (T=8)",
        "update 2.50x the one-pass floor (T=8, P=1e6)",
    ]
    assert figures["famo"] == ["step 1.03x the plain summed-loss step (T=8)"]
    assert "plain" not in figures
