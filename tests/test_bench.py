"""Smoke test of the benchmark: quick mode, one method; checks its tables, not timings."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np

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
        "## 4. Compiled step memory",
        "## 5. Compile time",
        "## Cells that miss their target",
    ):
        assert heading in text and heading in proc.stdout
    # A CPU run leaves a GPU block (here the placeholder) for a GPU run to fill.
    assert text.count("<!-- gpu:begin -->") == 1 and "## GPU" in text
    # The aggregation table has a header, a rule and one row for mgda at T=2, P=1e4.
    lines = text.splitlines()
    i = lines.index("| method | kind | T | P | floor ms | ours ms | ours/floor | target |")
    assert lines[i + 1] == "|---|---|---|---|---|---|---|---|"
    row = lines[i + 2].split(" | ")
    assert row[0] == "| mgda" and row[1] == "gram" and row[2] == "2" and row[3] == "1e+04"
    assert float(row[4]) > 0 and float(row[5]) > 0
    assert "unknown method 'not_a_method'" in text
    assert "| mgda | " in text.split("## 5. Compile time")[1]
    memory = text.split("## 4. Compiled step memory")[1].split("## 5.")[0]
    row = next(r for r in memory.splitlines() if r.startswith("| mgda | 2 |")).split(" | ")
    assert all(float(v) > 0 for v in row[2:8])
    assert "Host transfers: every timed `update` also ran once" in text
    if "torchjd comparison skipped" not in text:  # torch installed: best of 1 and 2 threads
        torch_row = next(r for r in text.splitlines() if r.startswith("| mgda | MGDA | 2 |"))
        assert torch_row.split(" | ")[6] in {"1", "2"}


def test_results_splice_keeps_the_other_backend(tmp_path: pathlib.Path) -> None:
    from benchmarks import run

    cpu_v1 = "# optax_balance benchmarks\n\n## 1. cpu tables v1"
    first = run.splice("", cpu_v1, gpu=False)
    assert first.startswith(cpu_v1) and run.NO_GPU in first
    with_gpu = run.splice(first, "## GPU\n\ngpu tables", gpu=True)
    assert with_gpu.startswith(cpu_v1) and "gpu tables" in with_gpu
    assert run.NO_GPU not in with_gpu
    again = run.splice(with_gpu, "# optax_balance benchmarks\n\n## 1. cpu tables v2", gpu=False)
    assert "cpu tables v2" in again and "cpu tables v1" not in again and "gpu tables" in again
    assert again.count(run.GPU_BEGIN) == again.count(run.GPU_END) == 1
    assert run.splice("", "## GPU\n\ngpu only", gpu=True).count(run.GPU_BEGIN) == 1


def test_device_drawn_gradients_have_the_benchmark_shapes() -> None:
    from benchmarks import run

    tree, mat = run.stacked_grads_on_device(3, 2000)
    shapes = {k: (3, *s) for k, s in run.leaf_shapes(2000).items()}
    assert {k: v.shape for k, v in tree.items()} == shapes and mat.shape == (3, 2000)
    np.testing.assert_array_equal(np.asarray(mat[:, :1000]), np.asarray(tree["w1"]).reshape(3, -1))


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
