"""Smoke test of the benchmark: quick mode, one method; checks its tables, not timings."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_bench_quick_prints_tables(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "RESULTS.md"
    env = dict(
        os.environ,
        BENCH_QUICK="1",
        BENCH_METHODS="mgda,not_a_method",
        BENCH_OUT=str(out),
        JAX_PLATFORMS="cpu",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for heading in (
        "## 1. Aggregation cost",
        "## 2. Side by side with torchjd",
        "## 3. Train-step overhead",
        "## 4. Compile time",
        "## GPU",
        "## Cells that miss their target",
    ):
        assert heading in text and heading in proc.stdout
    # The aggregation table has a header, a rule and one row for mgda at T=2, P=1e4.
    lines = text.splitlines()
    i = lines.index("| method | kind | T | P | floor ms | ours ms | ours/floor | target |")
    assert lines[i + 1] == "|---|---|---|---|---|---|---|---|"
    row = lines[i + 2].split(" | ")
    assert row[0] == "| mgda" and row[1] == "gram" and row[2] == "2" and row[3] == "1e+04"
    assert float(row[4]) > 0 and float(row[5]) > 0
    assert "unknown method 'not_a_method'" in text
    assert "| mgda | " in text.split("## 4. Compile time")[1]


def test_method_list_skips_what_the_library_lacks(monkeypatch) -> None:
    from benchmarks import methods

    ghost = methods.BenchMethod("ghost", "no_such_method_in_optax_balance", "gram")
    broken = methods.BenchMethod("broken", "mgda", "gram", kwargs=lambda t: {"bogus": 1})
    monkeypatch.setattr(methods, "METHODS", [*methods.METHODS, ghost, broken])
    chosen, notes = methods.select("mgda,ghost,broken")
    assert [m.name for m in chosen] == ["mgda"]
    assert any("`ob.no_such_method_in_optax_balance` is not in this build" in n for n in notes)
    assert any("`ob.mgda` could not be built as listed" in n for n in notes)
    all_chosen, _ = methods.select(None)
    assert {"mgda", "balancer"} <= {m.name for m in all_chosen}
