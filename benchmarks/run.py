"""What each method costs: against the one-pass floor, against torchjd, in a train step.

Run ``make bench`` (or ``python -m benchmarks.run`` from the repository root). Prints
markdown tables and writes them, with the machine's description, to
``benchmarks/RESULTS.md``. Environment variables:

* ``BENCH_QUICK=1``: a smoke run (one small size, few repeats), written to
  ``benchmarks/RESULTS.quick.md`` unless ``BENCH_OUT`` says otherwise.
* ``BENCH_METHODS=mgda,upgrad``: only these methods (names from ``benchmarks/methods.py``).
* ``BENCH_SECTIONS=agg,step,compile,kernels``: only these sections (``agg`` includes the
  torchjd comparison, which runs on the same stacked gradients, interleaved).
* ``BENCH_OUT=path``: where to write the markdown.

Timing: every figure is the median of repeated calls after two warm-up calls, each call
ended by ``block_until_ready``. The two sides of every ratio are timed back to back in
the same process, interleaved call by call, and the ratio is the median over rounds of
the two timings of the same round, so machine load hits both alike.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_balance as ob
from benchmarks import gram_kernels
from benchmarks.methods import BenchMethod, select

QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
BACKEND = jax.default_backend()
THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

if QUICK:
    TASKS: Sequence[int] = (2,)
    SIZES: Sequence[int] = (10_000,)
    STEP_TASKS: Sequence[int] = (2,)
    MAX_ROUNDS, MIN_ROUNDS, CELL_SECONDS, SAMPLE_SECONDS = 3, 3, 0.0, 0.0
    TORCH_SAMPLE_SECONDS, TORCH_SETTLE_SECONDS = 0.0, 0.0
else:
    TASKS = (2, 8, 32)
    SIZES = (10_000, 1_000_000) + ((10_000_000,) if BACKEND != "cpu" else ())
    STEP_TASKS = (2, 8, 32)
    MAX_ROUNDS, MIN_ROUNDS, CELL_SECONDS, SAMPLE_SECONDS = 31, 5, 1.0, 2e-3
    TORCH_SAMPLE_SECONDS, TORCH_SETTLE_SECONDS = 10e-3, 20e-3

COMPILE_T = 2 if QUICK else 8
# Targets from pass counts over the stacked gradients (the floor is one): two-batch
# methods read both batches for the cross-Gramian and the combination (4); methods with
# gradient-sized state also read the old estimates and write the new (8, see methods.py).
TARGET = {"gram": 3.0, "norm": 2.0, "two_batch": 5.0, "state": 9.0}
STEP_TARGET_T, STEP_TARGET = 8, 1.10


# --------------------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------------------


def load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


class Timings(dict):
    """Median seconds per callable, plus the per-round samples for ratios."""

    def __init__(self, samples: dict[str, list[float]]) -> None:
        super().__init__({k: float(np.median(v)) for k, v in samples.items()})
        self.samples = samples

    def ratio(self, a: str, b: str) -> float:
        """Median over rounds of ``a / b`` timed in the same round (robust to load swings)."""
        return float(np.median(np.asarray(self.samples[a]) / np.asarray(self.samples[b])))


def interleaved(
    calls: dict[str, Callable[[], Any]],
    sample: float | None = None,
    settle: float = 0.0,
    rounds: int | None = None,
) -> Timings:
    """Seconds per call of each callable, timed round-robin (two warm-up calls).

    In each round every callable first runs untimed (once, or for ``settle`` seconds),
    then ``k`` times timed, where ``k`` makes a sample last about ``sample`` seconds
    (default ``SAMPLE_SECONDS``; 1 for slow calls): the first calls after switching
    libraries (torch <-> XLA thread pools) are slowed by the switch, and a single call
    of a few tens of microseconds is mostly timer and dispatch jitter. ``rounds`` fixes
    the number of rounds (default: ``MIN_ROUNDS``..``MAX_ROUNDS`` within ``CELL_SECONDS``).
    """
    sample = SAMPLE_SECONDS if sample is None else sample
    reps: dict[str, int] = {}
    for k, fn in calls.items():
        fn()
        t0 = time.perf_counter()
        fn()
        reps[k] = max(1, min(200, int(sample / max(time.perf_counter() - t0, 1e-7))))
    times: dict[str, list[float]] = {k: [] for k in calls}
    start = time.perf_counter()
    for r in range(MAX_ROUNDS if rounds is None else rounds):
        for k, fn in calls.items():
            t_settle = time.perf_counter()
            fn()
            while time.perf_counter() - t_settle < settle:
                fn()
            t0 = time.perf_counter()
            for _ in range(reps[k]):
                fn()
            times[k].append((time.perf_counter() - t0) / reps[k])
        if rounds is None and r + 1 >= MIN_ROUNDS and time.perf_counter() - start > CELL_SECONDS:
            break
    return Timings(times)


def ms(seconds: float) -> str:
    v = seconds * 1e3
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Report:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.misses: list[str] = []

    def add(self, text: str) -> None:
        print(text + "\n", flush=True)
        self.parts.append(text)

    def note(self, text: str) -> None:
        self.add(f"> {text}")


# --------------------------------------------------------------------------------------
# Inputs.
# --------------------------------------------------------------------------------------


def leaf_shapes(p: int) -> dict[str, tuple[int, ...]]:
    """A few leaves totalling exactly ``p`` parameters (p a multiple of 1000)."""
    a, b, d = p // 2, 3 * p // 10, p // 100
    return {"w1": (a // 100, 100), "w2": (b // 100, 100), "v": (p - a - b - d,), "b": (d,)}


def stacked_grads(t: int, p: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Task gradients ``g_i = s_i (u + z_i)``: a shared direction plus noise, scales 0.1..10.

    Returns the stacked pytree (leaves ``(T, *shape)``, float32) and the same as one
    ``(T, P)`` matrix (what torchjd aggregates).
    """
    rng = np.random.default_rng(seed)
    scales = np.logspace(-1, 1, t).astype(np.float32)
    tree = {}
    for k, shape in leaf_shapes(p).items():
        u = rng.standard_normal(shape, dtype=np.float32)
        z = rng.standard_normal((t, *shape), dtype=np.float32)
        tree[k] = scales.reshape((t,) + (1,) * len(shape)) * (0.5 * u + z)
    mat = np.concatenate([tree[k].reshape(t, -1) for k in tree], axis=1)
    return tree, mat


def floor_fn(w: jax.Array, grads: Any) -> Any:
    """The one-pass floor: ``w @ J`` leaf by leaf."""
    return jax.tree.map(lambda g: jnp.tensordot(w, g, axes=1), grads)


def update_fn(tx: optax.GradientTransformationExtraArgs, m: BenchMethod) -> Callable[..., Any]:
    def update(grads: Any, state: Any, losses: jax.Array) -> Any:
        return tx.update(grads, state, None, task_losses=losses, **m.update_kwargs(grads))

    return jax.jit(update)


# --------------------------------------------------------------------------------------
# Sections 1 + 2: aggregation cost, against the floor and against torchjd.
# --------------------------------------------------------------------------------------


def torchjd_setup(rep: Report) -> Any:
    try:
        import torch
        import torchjd
        import torchjd.aggregation
    except ImportError as e:
        rep.note(
            f"torchjd comparison skipped: {e}. Install the `bench` extra "
            '(`pip install -e ".[bench]"`, or `make bench`).'
        )
        return None
    torch.set_num_threads(THREADS)
    version = getattr(torchjd, "__version__", None)
    if version is None:
        from importlib.metadata import version as _v

        version = _v("torchjd")
    return torch, torchjd.aggregation, torch.__version__, version


def agg_cell(
    m: BenchMethod, t: int, grads: Any, tmat: Any, tj: Any
) -> tuple[Timings, Timings | None]:
    """Floor against ours, then (where paired) ours against torchjd; median seconds.

    Two separate interleaved loops, so torch's threads never run between the XLA calls
    whose ratio is the floor target.
    """
    losses = jnp.linspace(1.0, 2.0, t)
    w = jnp.full((t,), 1.0 / t, jnp.float32)
    floor = jax.jit(floor_fn)
    tx = m.make(t)
    state = tx.init(jax.tree.map(lambda g: g[0], grads))
    upd = update_fn(tx, m)

    def ours() -> Any:
        return jax.block_until_ready(upd(grads, state, losses))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = interleaved({"floor": lambda: jax.block_until_ready(floor(w, grads)), "ours": ours})
        if tj is None or m.torchjd is None or not hasattr(tj[1], m.torchjd):
            return res, None
        torch, tja = tj[0], tj[1]
        agg = getattr(tja, m.torchjd)(**m.torchjd_kwargs(t))

        def theirs() -> Any:
            with torch.no_grad():
                return agg(tmat)

        # Each library gets TORCH_SETTLE_SECONDS of untimed calls before its timed block:
        # torch's OpenMP workers keep spinning after a call, and on a small machine
        # they would otherwise slow the XLA calls right after (and vice versa).
        return res, interleaved(
            {"ours": ours, "torchjd": theirs},
            sample=TORCH_SAMPLE_SECONDS,
            settle=TORCH_SETTLE_SECONDS,
        )


def bench_aggregation(methods: list[BenchMethod], rep: Report, tj: Any) -> None:
    rows_agg, rows_tj = [], []
    load_before = load()
    for p in SIZES:
        for t in TASKS:
            tree_np, mat = stacked_grads(t, p)
            grads = jax.device_put(jax.tree.map(jnp.asarray, tree_np))
            tmat = None if tj is None else tj[0].from_numpy(np.ascontiguousarray(mat))
            del tree_np, mat
            for m in methods:
                res, res_tj = agg_cell(m, t, grads, tmat, tj)
                ratio = res.ratio("ours", "floor")
                target = TARGET[m.kind]
                ok = ratio <= target
                cell = f"{m.name} T={t} P={p:.0e}"
                if not ok:
                    rep.misses.append(
                        f"aggregation {cell}: {ratio:.2f}x floor > {target:g}x ({m.kind} method)"
                    )
                rows_agg.append(
                    [
                        m.name,
                        m.kind,
                        t,
                        f"{p:.0e}",
                        ms(res["floor"]),
                        ms(res["ours"]),
                        f"{ratio:.2f}",
                        "ok" if ok else f"**MISS** (>{target:g})",
                    ]
                )
                if res_tj is not None:
                    r = res_tj.ratio("ours", "torchjd")
                    if r >= 1.0:
                        rep.misses.append(f"torchjd {cell}: ours/theirs = {r:.2f} (not faster)")
                    rows_tj.append(
                        [
                            m.name,
                            m.torchjd,
                            t,
                            f"{p:.0e}",
                            ms(res_tj["ours"]),
                            ms(res_tj["torchjd"]),
                            f"{r:.2f}",
                            "ok" if r < 1.0 else "**MISS**",
                        ]
                    )
                timed = {**res, **({"torchjd": res_tj["torchjd"]} if res_tj else {})}
                print(
                    f"  [{load()}] {cell}: " + ", ".join(f"{k}={ms(v)}ms" for k, v in timed.items())
                )
    rep.add("## 1. Aggregation cost against the one-pass floor")
    rep.add(
        f"Jitted `update` on random stacked float32 gradients (4 leaves totalling P), "
        f"median ms; floor = jitted `w @ J` leaf by leaf (one pass over the gradients), "
        "timed interleaved with ours (each sample averages enough back-to-back calls to "
        f"last ~{SAMPLE_SECONDS * 1e3:g} ms). Target: <= {TARGET['gram']:g}x for Gramian "
        f"methods, <= {TARGET['norm']:g}x for norm methods, <= {TARGET['two_batch']:g}x "
        f"for two-batch methods (fed the same J twice), <= {TARGET['state']:g}x for methods "
        "with gradient-sized state. "
        f"Load (1/5/15 min) before: {load_before}; after: {load()}."
    )
    rep.add(
        table(
            ["method", "kind", "T", "P", "floor ms", "ours ms", "ours/floor", "target"],
            rows_agg,
        )
    )
    rep.add("## 2. Side by side with torchjd")
    if tj is None:
        rep.note("torch/torchjd not installed: section skipped.")
        return
    rep.add(
        f"torch {tj[2]}, torchjd {tj[3]}, `torch.set_num_threads({THREADS})` (XLA uses "
        f"{THREADS} threads). The same J as one (T, P) float32 matrix; torchjd's aggregator "
        "called under `torch.no_grad()`, timed interleaved with ours in a loop of their own "
        f"(the same cells as section 1; the ours column here is that loop's timing): each "
        f"library runs {TORCH_SETTLE_SECONDS * 1e3:g} ms of untimed calls, then a timed "
        f"block of ~{TORCH_SAMPLE_SECONDS * 1e3:g} ms. Both "
        "libraries at their default hyperparameters (CAGrad c=0.5). "
        "Target: ours/theirs < 1 at every cell."
    )
    rep.add(
        table(
            ["ours", "torchjd", "T", "P", "ours ms", "torchjd ms", "ours/theirs", "target"],
            rows_tj,
        )
    )


# --------------------------------------------------------------------------------------
# Section 3: train-step overhead.
# --------------------------------------------------------------------------------------

D_IN, HIDDEN, BATCH = (16, 32, 16) if QUICK else (128, 512, 256)


def mlp_params(t: int, key: jax.Array) -> dict[str, Any]:
    k = jax.random.split(key, 4)
    return {
        "trunk": {
            "w1": jax.random.normal(k[0], (D_IN, HIDDEN)) / np.sqrt(D_IN),
            "b1": jnp.zeros(HIDDEN),
            "w2": jax.random.normal(k[1], (HIDDEN, HIDDEN)) / np.sqrt(HIDDEN),
            "b2": jnp.zeros(HIDDEN),
        },
        "heads": {"w": jax.random.normal(k[2], (t, HIDDEN)) / np.sqrt(HIDDEN), "b": jnp.zeros(t)},
    }


def mlp_losses(params: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
    tr = params["trunk"]
    h = jax.nn.relu(x @ tr["w1"] + tr["b1"])
    h = jax.nn.relu(h @ tr["w2"] + tr["b2"])
    pred = h @ params["heads"]["w"].T + params["heads"]["b"]  # (B, T)
    return jnp.mean((pred - y) ** 2, axis=0)


SHARED = {"trunk": True, "heads": False}


def make_step(
    tx: optax.GradientTransformationExtraArgs | None, t: int, m: BenchMethod | None = None
) -> Callable[..., Any]:
    adam = optax.adam(1e-3)
    full = adam if tx is None else optax.chain(tx, adam)
    w = jnp.full((t,), 1.0 / t)

    def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
        losses, grads = ob.value_and_task_grads(mlp_losses)(params, x, y)
        if tx is None:  # fixed equal weights on the same stacked grads
            grads = jax.tree.map(lambda g: jnp.tensordot(w, g, axes=1), grads)
            updates, opt_state = full.update(grads, opt_state, params)
        else:
            extra = {} if m is None else m.update_kwargs(grads)
            updates, opt_state = full.update(grads, opt_state, params, task_losses=losses, **extra)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1))


def step_cell(m: BenchMethod, t: int, key: jax.Array, x: jax.Array, y: jax.Array) -> Timings:
    """The equal-weight step and the method's step, interleaved; median seconds."""
    tx = m.make(t, shared=SHARED)
    steps = {"base": make_step(None, t), "ours": make_step(tx, t, m)}
    carry = {}
    for k in steps:
        p0 = mlp_params(t, key)
        full = optax.adam(1e-3) if k == "base" else optax.chain(tx, optax.adam(1e-3))
        carry[k] = (p0, full.init(p0))

    def call(k: str) -> Callable[[], Any]:
        def run() -> None:
            carry[k] = jax.block_until_ready(steps[k](*carry[k], x, y))

        return run

    return interleaved({k: call(k) for k in steps})


def bench_train_step(methods: list[BenchMethod], rep: Report) -> None:
    rows = []
    load_before = load()
    for t in STEP_TASKS:
        key = jax.random.key(t)
        x = jax.random.normal(jax.random.fold_in(key, 1), (BATCH, D_IN))
        y = jax.random.normal(jax.random.fold_in(key, 2), (BATCH, t))
        n_trunk = sum(v.size for v in jax.tree.leaves(mlp_params(t, key)["trunk"]))
        for m in methods:
            res = step_cell(m, t, key, x, y)
            ratio = res.ratio("ours", "base")
            flag = ""
            if t == STEP_TARGET_T:
                ok = ratio <= STEP_TARGET
                flag = "ok" if ok else f"**MISS** (>{STEP_TARGET:g})"
                if not ok:
                    rep.misses.append(
                        f"train step {m.name} T={t}: {ratio:.2f}x the equal-weight step "
                        f"> {STEP_TARGET:g}"
                    )
            rows.append(
                [m.name, t, f"{n_trunk:,}", ms(res["base"]), ms(res["ours"]), f"{ratio:.2f}", flag]
            )
            print(
                f"  [{load()}] step {m.name} T={t}: "
                + ", ".join(f"{k}={ms(v)}ms" for k, v in res.items())
            )
    rep.add("## 3. Train-step overhead")
    rep.add(
        f"A jitted step of an MLP ({D_IN}-{HIDDEN}-{HIDDEN} ReLU trunk, shared; T linear "
        f"heads, task-specific), batch {BATCH}: per-task gradients "
        "(`ob.value_and_task_grads`) + method + adam, against the same step where the same "
        "stacked gradients are combined with fixed equal weights. Median ms per step. "
        f"Target: <= {STEP_TARGET:g} at T={STEP_TARGET_T}. "
        f"Load before: {load_before}; after: {load()}."
    )
    rep.add(
        table(
            ["method", "T", "shared params", "equal-weight ms", "method ms", "ratio", "target"],
            rows,
        )
    )


# --------------------------------------------------------------------------------------
# Section 4: compile time.
# --------------------------------------------------------------------------------------


def bench_compile(methods: list[BenchMethod], rep: Report) -> None:
    t, p = COMPILE_T, SIZES[0]
    tree_np, _ = stacked_grads(t, p)
    grads = jax.tree.map(jnp.asarray, tree_np)
    losses = jnp.linspace(1.0, 2.0, t)
    rows = []

    def compile_seconds(fn: Callable[..., Any], *args: Any) -> float:
        t0 = time.perf_counter()
        jax.jit(fn).lower(*args).compile()
        return time.perf_counter() - t0

    w = jnp.full((t,), 1.0 / t)
    rows.append(["(floor `w @ J`)", f"{compile_seconds(floor_fn, w, grads):.2f}"])
    for m in methods:
        tx = m.make(t)
        state = tx.init(jax.tree.map(lambda g: g[0], grads))

        def upd(g: Any, s: Any, losses: jax.Array, tx: Any = tx, m: BenchMethod = m) -> Any:
            return tx.update(g, s, None, task_losses=losses, **m.update_kwargs(g))

        rows.append([m.name, f"{compile_seconds(upd, grads, state, losses):.2f}"])
    rep.add("## 4. Compile time")
    rep.add(
        f"Trace + lower + compile of the first jitted `update`, T={t}, P={p:.0e} (4 leaves), "
        f"seconds (one sample each). Load: {load()}."
    )
    rep.add(table(["method", "compile s"], rows))


# --------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------


WHY = """Why (what this benchmark's own tables show):

- **Gramian methods, T >= 8, P = 1e6 (floor and torchjd).** The Gramian `J J^T` is a
  (T, P) x (P, T) product: a tiny output and a very long contraction. XLA on CPU sends
  every dot of that shape to YNNPACK, which runs it on one thread at 6-17x the one-pass
  floor and grows faster than P (section 5: `dot`). The core avoids it on CPU: it walks
  each leaf in column chunks in a `fori_loop` and contracts each chunk either with one
  variadic reduce over all T(T+1)/2 row products ("pairs": T <= 2, or T <= 12 on leaves
  of >= 65536 entries per task) or with the dot on the in-cache chunk (the rest). That
  halves the Gramian (T=8: ~9 -> ~4.5 ms, T=32: ~80 -> ~40 ms at P=1e6) but leaves it
  at 3-4x the floor for T=8 and 5-7x for T=32: XLA emits the variadic reduce as scalar
  code (T(T+1)/2 multiply-adds per entry), and the chunked dot is still single-threaded.
  With the combination pass on top, Gramian methods land at 3.5-4.5x (T=8) and ~8x
  (T=32) across runs. PyTorch's GEMM (multi-threaded) computes the same Gramian in
  2-5x, which is why torchjd stays ahead there. XLA's Eigen dot, reachable only with
  `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=` (a user's process flag, not the
  library's), is multi-threaded too: with it the core's T=32 Gramian drops to ~28 ms.
  Forms that lose (section 5): batched dots over P-blocks, split dots, a transposed
  operand, outer-product broadcasts, one reduction per pair, a 1x1 convolution, and
  matrix-vector products per task.
- **T = 2, P = 1e6 against torchjd.** Ours is two passes (the pairs Gramian and the
  combination), about 2x the floor (section 1, ~1.2 ms); torchjd's whole aggregator takes
  0.85-1 ms because PyTorch's GEMM reads the matrix as fast as XLA's single pass does
  (section 5, T=2: torch `F @ F.T` vs the floor).
- **P = 1e4.** The floor is a few tens of microseconds: one update's fixed cost (the
  solver's `while_loop`, state update, non-finite guard, a dozen small kernels each
  dispatched by XLA's CPU runtime) is of that size, so ratios there measure dispatch.
- **Norm methods.** The weights depend on the norms, so two passes (norms, then the
  weighted sum) are the minimum; 2x is the ideal, and any fixed cost lands above it.
- **Train step.** The step is dominated by the T backward passes; the method adds the
  Gramian (or norms) of the stacked trunk gradients plus the combination. At T=8 the
  328,704 shared parameters' Gramian costs ~2.5 ms inside the step against a 15-16 ms
  equal-weight step, hence ~1.15. Inside a step, vmap(grad) hands the Gramian its Dense
  kernels' gradients in a transposed physical layout; the chunked loop pays that
  relayout once per entry (a whole-leaf reduce paid it in every row product: 1.7x).
- **Load.** The machine's 2 cores were shared (load average printed with each table):
  single cells swing by 2x between runs; rerun on a quiet machine for final figures."""


def machine() -> str:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return table(
        ["", ""],
        [
            ["date (UTC)", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")],
            ["CPU", cpu],
            ["cores (usable)", f"{os.cpu_count()} ({THREADS})"],
            ["JAX / jaxlib", f"{jax.__version__} / {jax.lib.__version__}"],
            ["optax", optax.__version__],
            ["backend / devices", f"{BACKEND} / {devices}"],
            ["python", platform.python_version()],
            ["load at start (1/5/15 min)", load()],
            ["mode", "quick (BENCH_QUICK=1)" if QUICK else "full"],
        ],
    )


def main() -> int:
    sections = set(
        (os.environ.get("BENCH_SECTIONS") or "agg,step,compile,kernels").replace(" ", "").split(",")
    )
    methods, notes = select(os.environ.get("BENCH_METHODS"))
    out = os.environ.get("BENCH_OUT") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "RESULTS.quick.md" if QUICK else "RESULTS.md",
    )
    rep = Report()
    rep.add("# optax_balance benchmarks")
    rep.add(
        "Written by `make bench` (`benchmarks/run.py`). CPU timings on a shared machine are "
        "noisy: the load average is printed with every table, and every ratio compares two "
        "timings taken interleaved in the same process."
    )
    rep.add(machine())
    for n in notes:
        rep.note(n)
    t0 = time.perf_counter()
    if "agg" in sections:
        bench_aggregation(methods, rep, torchjd_setup(rep))
    if "step" in sections:
        bench_train_step(methods, rep)
    if "compile" in sections:
        bench_compile(methods, rep)
    if "kernels" in sections and not QUICK:
        gram_kernels.section(rep, THREADS)
    rep.add("## GPU")
    if BACKEND == "cpu":
        rep.add(
            "Not measured: this run used the CPU backend. No GPU was lent to the session that "
            "wrote this benchmark (the device tool reported `can_start_another=false`), so "
            "there are no GPU figures; on a GPU machine `make bench` runs the same tables with "
            "P up to 1e7."
        )
    else:
        rep.add(f"This run used the {BACKEND} backend: the tables above are its figures.")
    rep.add("## Cells that miss their target")
    if rep.misses:
        rep.add("\n".join(f"- {m}" for m in rep.misses))
        rep.add(WHY)
    else:
        rep.add("None.")
    rep.add(f"Total benchmark time: {time.perf_counter() - t0:.0f} s. Load at end: {load()}.")
    with open(out, "w") as f:
        f.write("\n\n".join(rep.parts) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
