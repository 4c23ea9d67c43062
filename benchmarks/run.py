"""What each method costs: against the one-pass floor, against torchjd, in a train step.

Run ``make bench`` (or ``python -m benchmarks.run`` from the repository root). Prints
markdown tables and writes them, with the machine's description, to
``benchmarks/RESULTS.md``. On a CPU backend the run rewrites that file except its GPU
block; on a GPU (any non-CPU backend) it rewrites only the GPU block (between the
``<!-- gpu:begin -->`` / ``<!-- gpu:end -->`` markers), so one file carries both.
Environment variables:

* ``BENCH_QUICK=1``: a smoke run (one small size, few repeats), written to
  ``benchmarks/RESULTS.quick.md`` unless ``BENCH_OUT`` says otherwise.
* ``BENCH_METHODS=mgda,upgrad``: only these methods (names from ``benchmarks/methods.py``).
* ``BENCH_SECTIONS=agg,step,memory,compile,kernels,lowmem,loss``: only these sections
  (``agg`` includes the torchjd comparison, which runs on the same stacked gradients;
  ``lowmem`` is ``benchmarks/lowmem.py``, ``ob.value_and_weighted_grad``'s memory;
  ``loss`` is ``benchmarks/loss_cost.py``, the loss-based methods' one-backward step); the
  names are the keys of ``SECTIONS`` below.
* ``BENCH_OUT=path``: where to write the markdown.

Timing: every figure is the median of repeated calls after two warm-up calls, each call
ended by ``block_until_ready``. The two sides of every ratio are timed back to back in
the same process, interleaved call by call, and the ratio is the median over rounds of
the two timings of the same round, so machine load hits both alike.

A new section (another benchmark file) plugs in with one entry in ``SECTIONS``: a
function ``section(methods, rep)`` taking the selected :class:`BenchMethod` list and the
:class:`Report`, which adds its heading with ``rep.section("Title")`` (numbered in run
order), its text with ``rep.add`` and each missed target with ``rep.misses.append``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_balance as ob
from benchmarks import gram_kernels, loss_cost, mlp
from benchmarks.methods import BenchMethod, select
from benchmarks.mlp import mlp_losses

QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
BACKEND = jax.default_backend()
ON_CPU = BACKEND == "cpu"
THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
THREADS = THREADS or 1
# torch is timed at each of these thread counts and reported at its best, per cell: on a
# 2-core VM, MKL with 2 OpenMP threads ran an 8 x 1e4 Gramian in 1.8 ms against 0.044 ms
# with 1 (issue 17), so a fixed count can flatter either side. On a GPU: one setting.
TORCH_THREADS: tuple[int | None, ...] = tuple(sorted({1, THREADS})) if ON_CPU else (None,)

if QUICK:
    TASKS: Sequence[int] = (2,)
    SIZES: Sequence[int] = (10_000,)
    EXTRA_CELLS: Sequence[tuple[int, int]] = ()
    STEP_TASKS: Sequence[int] = (2,)
    MAX_ROUNDS, MIN_ROUNDS, CELL_SECONDS, SAMPLE_SECONDS = 3, 3, 0.0, 0.0
    TORCH_SAMPLE_SECONDS, TORCH_SETTLE_SECONDS = 0.0, 0.0
else:
    TASKS = (2, 8, 32)
    SIZES = (10_000, 1_000_000)
    # On a GPU, the same cells plus one of 1e8 parameters (3.2 GB of stacked gradients).
    EXTRA_CELLS = () if ON_CPU else ((8, 100_000_000),)
    STEP_TASKS = (2, 8, 32)
    MAX_ROUNDS, MIN_ROUNDS, CELL_SECONDS, SAMPLE_SECONDS = 31, 5, 1.0, 2e-3
    TORCH_SAMPLE_SECONDS, TORCH_SETTLE_SECONDS = 10e-3, 20e-3

COMPILE_T = 2 if QUICK else 8
STEP_TARGET_T, STEP_TARGET = 8, 1.15  # Gramian methods' train step / equal-weight step


def agg_target(kind: str, t: int) -> float:
    """Issue 17's targets for ``update`` against the one-pass floor (``"coord"``: the
    coordinate-wise methods, GradDrop and TrimmedMean, 4x), and targets from pass counts
    over the stacked gradients for the others: two-batch methods read both batches for the
    cross-Gramian and the combination (5x); methods with gradient-sized state also read the
    old estimates and write the new (9x, see methods.py)."""
    if kind == "gram":
        return 3.0 if t <= 8 else 4.0
    if kind == "coord":
        return 4.0
    if kind == "two_batch":
        return 5.0
    if kind == "state":
        return 9.0
    return 2.0


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
    """The markdown being written: sections numbered in run order, and the missed targets.

    On a GPU run the whole report becomes the GPU block of RESULTS.md: its sections are
    one heading level lower and prefixed ``GPU``.
    """

    def __init__(self, level: int = 2, prefix: str = "") -> None:
        self.parts: list[str] = []
        self.misses: list[str] = []
        self.level, self.prefix, self.count = level, prefix, 0

    def add(self, text: str) -> None:
        print(text + "\n", flush=True)
        self.parts.append(text)

    def note(self, text: str) -> None:
        self.add(f"> {text}")

    def section(self, title: str) -> None:
        """Adds the next numbered section heading, e.g. ``## 3. Train-step overhead``."""
        self.count += 1
        self.add(f"{'#' * self.level} {self.prefix}{self.count}. {title}")

    def heading(self, title: str) -> None:
        """An unnumbered heading at the report's section level."""
        self.add(f"{'#' * self.level} {title}")


def no_host_transfer(fn: Callable[[], Any]) -> str | None:
    """``None`` if ``fn`` (a jitted call, already compiled) runs under
    ``jax.transfer_guard("disallow")``; else the error, shortened."""
    try:
        with jax.transfer_guard("disallow"):
            fn()
    except Exception as e:  # noqa: BLE001 - any failure is reported, not raised
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return None


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


def stacked_grads_on_device(t: int, p: int, seed: int = 0) -> tuple[dict[str, Any], Any]:
    """:func:`stacked_grads` drawn on the default device (``jax.random``): GPU-sized P."""
    key = jax.random.key(seed)
    scales = jnp.logspace(-1, 1, t, dtype=jnp.float32)
    tree = {}
    for i, (k, shape) in enumerate(leaf_shapes(p).items()):
        ku, kz = jax.random.split(jax.random.fold_in(key, i))
        u = jax.random.normal(ku, shape, jnp.float32)
        z = jax.random.normal(kz, (t, *shape), jnp.float32)
        tree[k] = scales.reshape((t,) + (1,) * len(shape)) * (0.5 * u + z)
    mat = jnp.concatenate([tree[k].reshape(t, -1) for k in tree], axis=1)
    return tree, jax.block_until_ready(mat)


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


class TorchJD(NamedTuple):
    torch: Any
    aggregation: Any
    torch_version: str
    version: str
    device: str  # "cpu" or "cuda"


def torchjd_setup(rep: Report) -> TorchJD | None:
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
    device = "cpu"
    if not ON_CPU:
        if not torch.cuda.is_available():
            rep.note(
                f"torchjd comparison skipped: JAX runs on {BACKEND} but this torch "
                f"({torch.__version__}) has no CUDA device; install a CUDA build of torch."
            )
            return None
        device = "cuda"
    version = getattr(torchjd, "__version__", None)
    if version is None:
        from importlib.metadata import version as _v

        version = _v("torchjd")
    return TorchJD(torch, torchjd.aggregation, torch.__version__, version, device)


def torch_matrix(tj: TorchJD, mat: Any) -> Any:
    """The ``(T, P)`` matrix as a torch tensor on torchjd's device (zero-copy on a GPU)."""
    if tj.device == "cuda":
        return tj.torch.from_dlpack(mat)
    return tj.torch.from_numpy(np.ascontiguousarray(np.asarray(mat)))


def agg_cell(
    m: BenchMethod, t: int, grads: Any, tmat: Any, tj: TorchJD | None
) -> tuple[Timings, Timings | None, str | None]:
    """Floor against ours, then (where paired) ours against torchjd at each thread count.

    Two separate interleaved loops, so torch's threads never run between the XLA calls
    whose ratio is the floor target. Also returns the host-transfer check of ``update``.
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
        transfer = no_host_transfer(ours)
        if tj is None or m.torchjd is None or not hasattr(tj.aggregation, m.torchjd):
            return res, None, transfer
        torch = tj.torch
        agg = getattr(tj.aggregation, m.torchjd)(**m.torchjd_kwargs(t))

        def theirs(threads: int | None) -> Callable[[], Any]:
            def call() -> Any:
                if threads is not None:
                    torch.set_num_threads(threads)
                with torch.no_grad():
                    out = agg(tmat)
                if tj.device == "cuda":
                    torch.cuda.synchronize()
                return out

            return call

        # Each library gets TORCH_SETTLE_SECONDS of untimed calls before its timed block:
        # torch's OpenMP workers keep spinning after a call, and on a small machine
        # they would otherwise slow the XLA calls right after (and vice versa).
        calls = {"ours": ours} | {f"torchjd {k}": theirs(k) for k in TORCH_THREADS}
        res_tj = interleaved(calls, sample=TORCH_SAMPLE_SECONDS, settle=TORCH_SETTLE_SECONDS)
        if tj.device == "cpu":
            torch.set_num_threads(THREADS)
        return res, res_tj, transfer


def best_torch(res_tj: Timings) -> str:
    """The torchjd entry (thread count) with the smallest median."""
    return min((k for k in res_tj if k.startswith("torchjd")), key=lambda k: res_tj[k])


def thread_label(key: str) -> str:
    k = key.split()[1]
    return "—" if k == "None" else k


def bench_aggregation(methods: list[BenchMethod], rep: Report) -> None:
    tj = torchjd_setup(rep)
    rows_agg, rows_tj, transfers = [], [], []
    load_before = load()
    cells = [(t, p) for p in SIZES for t in TASKS] + list(EXTRA_CELLS)
    for t, p in cells:
        if ON_CPU:
            tree_np, mat = stacked_grads(t, p)
            grads = jax.device_put(jax.tree.map(jnp.asarray, tree_np))
            del tree_np
        else:
            grads, mat = stacked_grads_on_device(t, p)
        tmat = None if tj is None else torch_matrix(tj, mat)
        del mat
        for m in methods:
            if t < m.min_tasks:
                continue
            res, res_tj, transfer = agg_cell(m, t, grads, tmat, tj)
            if transfer is not None:
                transfers.append(f"{m.name} T={t} P={p:.0e}: {transfer}")
            ratio = res.ratio("ours", "floor")
            target = agg_target(m.kind, t)
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
            timed = dict(res)
            if res_tj is not None:
                best = best_torch(res_tj)
                r = res_tj.ratio("ours", best)
                if r > 1.0:
                    rep.misses.append(
                        f"torchjd {cell}: ours/theirs = {r:.2f} (torchjd at "
                        f"{thread_label(best)} thread(s))"
                    )
                per_threads = ", ".join(
                    f"{thread_label(k)}: {ms(v)}" for k, v in res_tj.items() if k != "ours"
                )
                rows_tj.append(
                    [
                        m.name,
                        m.torchjd,
                        t,
                        f"{p:.0e}",
                        ms(res_tj["ours"]),
                        ms(res_tj[best]),
                        *([thread_label(best), per_threads] if ON_CPU else []),
                        f"{r:.2f}",
                        "ok" if r <= 1.0 else "**MISS**",
                    ]
                )
                timed |= {k: v for k, v in res_tj.items() if k != "ours"}
            print(f"  [{load()}] {cell}: " + ", ".join(f"{k}={ms(v)}ms" for k, v in timed.items()))
        del grads, tmat
    rep.section("Aggregation cost against the one-pass floor")
    rep.add(
        "Jitted `update` on random stacked float32 gradients (4 leaves totalling P), "
        "median ms; floor = jitted `w @ J` leaf by leaf (one pass over the gradients), "
        "timed interleaved with ours (each sample averages enough back-to-back calls to "
        f"last ~{SAMPLE_SECONDS * 1e3:g} ms). Targets (issue 17): Gramian methods <= 3x "
        "at T <= 8 and <= 4x at T = 32; norm methods <= 2x; coordinate-wise methods "
        "(GradDrop, TrimmedMean) <= 4x; two-batch methods (fed the same J twice) <= 5x; "
        "methods with gradient-sized state <= 9x. "
        f"Load (1/5/15 min) before: {load_before}; after: {load()}."
    )
    rep.add(
        table(
            ["method", "kind", "T", "P", "floor ms", "ours ms", "ours/floor", "target"],
            rows_agg,
        )
    )
    if transfers:
        rep.misses += [f"host transfer in update {x}" for x in transfers]
    rep.add(
        "Host transfers: every timed `update` also ran once under "
        '`jax.transfer_guard("disallow")`: '
        + ("none." if not transfers else f"{len(transfers)} failed (listed with the misses).")
    )
    rep.section("Side by side with torchjd")
    if tj is None:
        rep.note("torch/torchjd not installed or not usable here: section skipped.")
        return
    threads = " and ".join(str(k) for k in TORCH_THREADS)
    rep.add(
        f"torch {tj.torch_version}, torchjd {tj.version} on {tj.device}. The same J as one "
        "(T, P) float32 matrix; torchjd's aggregator called under `torch.no_grad()`, timed "
        "interleaved with ours in a loop of their own (the same cells as the table above; "
        "the ours column here is that loop's timing): each library runs "
        f"{TORCH_SETTLE_SECONDS * 1e3:g} ms of untimed calls, then a timed block of "
        f"~{TORCH_SAMPLE_SECONDS * 1e3:g} ms. "
        + (
            f"torchjd runs at {threads} threads (`torch.set_num_threads`), interleaved, "
            "and is compared at its best per cell (the threads column; the next column has "
            f"each count's median). XLA uses its own pool ({THREADS} threads). "
            if ON_CPU
            else ""
        )
        + "Both libraries at their default hyperparameters (CAGrad c=0.5). "
        "Target: ours/theirs <= 1 at every cell."
    )
    rep.add(
        table(
            [
                "ours",
                "torchjd",
                "T",
                "P",
                "ours ms",
                "torchjd ms",
                *(["torchjd threads", "torchjd ms per thread count"] if ON_CPU else []),
                "ours/theirs",
                "target",
            ],
            rows_tj,
        )
    )


# --------------------------------------------------------------------------------------
# Sections 3 + 4: train-step overhead and compiled memory.
# --------------------------------------------------------------------------------------

D_IN, HIDDEN, BATCH = (16, 32, 16) if QUICK else (128, 512, 256)


def mlp_params(t: int, key: jax.Array) -> dict[str, Any]:
    return mlp.mlp_params(t, D_IN, HIDDEN, key)


SHARED = {"trunk": True, "heads": False}


def make_step(
    tx: optax.GradientTransformationExtraArgs | None, t: int, m: BenchMethod | None = None
) -> Callable[..., Any]:
    """A jitted train step: the method's, or (``tx=None``) equal weights on the same
    stacked gradients."""
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


def make_sum_step() -> Callable[..., Any]:
    """A plain step on the summed loss (one backward pass, no stacked gradients)."""
    adam = optax.adam(1e-3)

    def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
        grads = jax.grad(lambda p: jnp.sum(mlp_losses(p, x, y)))(params)
        updates, opt_state = adam.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1))


def step_inputs(t: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    key = jax.random.key(t)
    x = jax.random.normal(jax.random.fold_in(key, 1), (BATCH, D_IN))
    y = jax.random.normal(jax.random.fold_in(key, 2), (BATCH, t))
    return key, x, y


def step_cell(
    m: BenchMethod, t: int, key: jax.Array, x: jax.Array, y: jax.Array
) -> tuple[Timings, str | None]:
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

    res = interleaved({k: call(k) for k in steps})
    return res, no_host_transfer(call("ours"))


def bench_train_step(methods: list[BenchMethod], rep: Report) -> None:
    rows, transfers = [], []
    load_before = load()
    for t in STEP_TASKS:
        key, x, y = step_inputs(t)
        n_trunk = sum(v.size for v in jax.tree.leaves(mlp_params(t, key)["trunk"]))
        for m in methods:
            if t < m.min_tasks:
                continue
            res, transfer = step_cell(m, t, key, x, y)
            if transfer is not None:
                transfers.append(f"{m.name} T={t}: {transfer}")
            ratio = res.ratio("ours", "base")
            flag = ""
            if t == STEP_TARGET_T and m.kind == "gram":
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
    rep.section("Train-step overhead")
    rep.add(
        f"A jitted step of an MLP ({D_IN}-{HIDDEN}-{HIDDEN} ReLU trunk, shared; T linear "
        f"heads, task-specific), batch {BATCH}: per-task gradients "
        "(`ob.value_and_task_grads`) + method + adam, against the same step where the same "
        "stacked gradients are combined with fixed equal weights. Median ms per step. "
        f"Target (issue 17): <= {STEP_TARGET:g} at T={STEP_TARGET_T} for Gramian methods. "
        f"Load before: {load_before}; after: {load()}."
    )
    rep.add(
        table(
            ["method", "T", "shared params", "equal-weight ms", "method ms", "ratio", "target"],
            rows,
        )
    )
    if transfers:
        rep.misses += [f"host transfer in train step {x}" for x in transfers]
    rep.add(
        "Host transfers: every method's step also ran once under "
        '`jax.transfer_guard("disallow")`: '
        + ("none." if not transfers else f"{len(transfers)} failed (listed with the misses).")
    )


def compiled_bytes(step: Callable[..., Any], *args: Any) -> tuple[int, int]:
    """``(temp, output)`` bytes of the compiled step (XLA's buffer assignment)."""
    mem = step.lower(*args).compile().memory_analysis()  # type: ignore[attr-defined]
    return int(mem.temp_size_in_bytes), int(mem.output_size_in_bytes)


def bench_memory(methods: list[BenchMethod], rep: Report) -> None:
    rows = []
    for t in STEP_TASKS:
        key, x, y = step_inputs(t)
        p0 = mlp_params(t, key)
        adam = optax.adam(1e-3)
        plain = sum(compiled_bytes(make_sum_step(), p0, adam.init(p0), x, y))
        equal = sum(compiled_bytes(make_step(None, t), p0, adam.init(p0), x, y))
        for m in methods:
            if t < m.min_tasks:
                continue
            tx = m.make(t, shared=SHARED)
            opt_state = optax.chain(tx, adam).init(p0)
            temp, out = compiled_bytes(make_step(tx, t, m), p0, opt_state, x, y)
            rows.append(
                [
                    m.name,
                    t,
                    f"{plain / 2**20:.2f}",
                    f"{equal / 2**20:.2f}",
                    f"{temp / 2**20:.2f}",
                    f"{out / 2**20:.2f}",
                    f"{(temp + out) / 2**20:.2f}",
                    f"{(temp + out) / plain:.2f}",
                    f"{(temp + out) / equal:.2f}",
                ]
            )
    rep.section("Compiled step memory")
    rep.add(
        "The train step of the table above, compiled (`jax.jit(step).lower(...).compile()"
        ".memory_analysis()`, params and optimizer state donated): temporary plus output "
        "buffers, MiB, against a plain step on the summed loss (one backward pass, "
        "`jax.grad` of `sum(losses)`) and against the equal-weight step on the same stacked "
        "gradients. The stacked gradients (T x the shared parameters) are what every "
        "method adds over the summed loss; the method's own statistics and state are the "
        "difference to the equal-weight step."
    )
    rep.add(
        table(
            [
                "method",
                "T",
                "summed-loss MiB",
                "equal-weight MiB",
                "method temp MiB",
                "method output MiB",
                "method MiB",
                "/ summed loss",
                "/ equal weight",
            ],
            rows,
        )
    )


# --------------------------------------------------------------------------------------
# Section 5: compile time.
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
        if t < m.min_tasks:
            continue
        tx = m.make(t)
        state = tx.init(jax.tree.map(lambda g: g[0], grads))

        def upd(g: Any, s: Any, losses: jax.Array, tx: Any = tx, m: BenchMethod = m) -> Any:
            return tx.update(g, s, None, task_losses=losses, **m.update_kwargs(g))

        rows.append([m.name, f"{compile_seconds(upd, grads, state, losses):.2f}"])
    rep.section("Compile time")
    rep.add(
        f"Trace + lower + compile of the first jitted `update`, T={t}, P={p:.0e} (4 leaves), "
        f"seconds (one sample each). Load: {load()}."
    )
    rep.add(table(["method", "compile s"], rows))


# --------------------------------------------------------------------------------------
# Section 6: the Gramian kernels (benchmarks/gram_kernels.py).
# --------------------------------------------------------------------------------------


def bench_kernels(methods: list[BenchMethod], rep: Report) -> None:
    del methods
    if QUICK or not ON_CPU:  # the kernels are XLA:CPU's; on a GPU the core uses one dot
        return
    gram_kernels.section(rep, tuple(k for k in TORCH_THREADS if k is not None))


# The sections, in run order: BENCH_SECTIONS selects by key. A benchmark file plugs in
# with one entry, ``"name": module.section``, where ``section(methods, rep)``.
SECTIONS: dict[str, Callable[[list[BenchMethod], Report], None]] = {
    "agg": bench_aggregation,
    "step": bench_train_step,
    "memory": bench_memory,
    "compile": bench_compile,
    "kernels": bench_kernels,
    "lowmem": lambda methods, rep: _lowmem_section(rep),
    # Loss-based methods: one backward pass against the plain summed loss.
    "loss": lambda methods, rep: loss_cost.section(
        rep, quick=QUICK, names=os.environ.get("BENCH_METHODS")
    ),
}


def _lowmem_section(rep: Report) -> None:
    from benchmarks import lowmem  # imports this module: loaded here, not at the top

    lowmem.section(rep)


# --------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------


WHY = """Why (what this benchmark's own tables show; benchmarks/KERNELS.md has the kernel
figures per machine):

- **Gramian methods at P = 1e6 (floor and torchjd).** The Gramian `J J^T` is a
  (T, P) x (P, T) product: a tiny output and a very long contraction. XLA's CPU backend
  sends every f32 dot to YNNPACK, which runs that shape on one core (the Gramian-kernel
  section: `dot`). The core walks each leaf in column chunks of ~128 KiB and contracts
  each with that dot (at T=2 on rows split in halves, a (4, 4) product): 2-5x faster than
  one dot and than the old variadic-reduce kernel on an AMD EPYC, but still one core,
  while the floor `w @ J` streams the gradients on every core at memory speed. On the
  EPYC the Gramian alone is ~2.5x the floor at T=2, ~4-6x at T=8 (64 multiply-adds per
  column at a fifth of one core's vector peak) and ~5x at T=32 (compute-bound); with the
  combination pass on top, Gramian methods land above the 3x/4x targets there. No XLA
  form tried uses the second core: independent chunk loops run one after the other, and
  Eigen's multi-threaded dot is reached only through a transposed copy (dearer than it
  saves) or the process flag `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`, which
  the library cannot set. torch's GEMM (MKL) is multi-threaded where that pays and
  computed the same Gramian in 1-3x the floor on the Xeon (the kernel section's torch
  row), which is why torchjd stays ahead at P = 1e6 for the methods whose aggregator is
  that GEMM plus a cheap solve.
- **P = 1e4.** The floor is a few tens of microseconds: one update's fixed cost (the
  solver's `while_loop`, state update, non-finite guard, a dozen small kernels each
  dispatched by XLA's CPU runtime) is of that size, so ratios there measure dispatch. At
  T = 32 the Gramian itself is compute-bound (1e7 multiply-adds on one core, ~0.14 ms).
- **Norm methods.** The weights depend on the norms, so two passes (norms, then the
  weighted sum) are the minimum; 2x is the ideal, and any fixed cost lands above it.
- **Solver-bound cells** (a method far above MGDA at the same T and P): the method's
  small dense QP/Newton solver, not the Gramian (issue 17's solver part).
- **Train step.** The step is dominated by the T backward passes; the method adds the
  Gramian (or norms) of the stacked trunk gradients plus the combination, both on one
  core, against a step XLA runs on all of them.
- **Load.** On a shared machine single cells swing by 2x between runs (the load average
  is printed with each table); rerun on a quiet machine for final figures."""


def cpu_name() -> str:
    """The CPU as ``lscpu`` names it (model name; vendor, family/model, AVX-512)."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if ":" in line:
                k, v = (x.strip() for x in line.split(":", 1))
                info.setdefault(k, v)
            if not line.strip() and info:
                break
    name = info.get("model name") or platform.processor() or "unknown"
    extra = [info.get("vendor_id", "")]
    if "cpu family" in info:
        extra.append(f"family {info['cpu family']} model {info.get('model', '?')}")
    flags = info.get("flags", "").split()
    if flags:
        extra.append("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "")
    return f"{name} ({', '.join(e for e in extra if e)})"


def machine() -> str:
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return table(
        ["", ""],
        [
            ["date (UTC)", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")],
            ["CPU", cpu_name()],
            ["cores (usable)", f"{os.cpu_count()} ({THREADS})"],
            ["JAX / jaxlib", f"{jax.__version__} / {jax.lib.__version__}"],
            ["optax", optax.__version__],
            ["backend / devices", f"{BACKEND} / {devices}"],
            ["python", platform.python_version()],
            ["load at start (1/5/15 min)", load()],
            ["mode", "quick (BENCH_QUICK=1)" if QUICK else "full"],
        ],
    )


GPU_BEGIN, GPU_END = "<!-- gpu:begin -->", "<!-- gpu:end -->"
NO_GPU = (
    "## GPU\n\nNot measured: no GPU was lent to the session that wrote this file. On a GPU "
    "host, `make bench` (JAX's default backend then being the GPU) rewrites this section "
    "alone: the same tables on the GPU, torchjd on CUDA (a CUDA build of torch), the cells "
    "plus P=1e8 at T=8, and a check that no jitted update or train step moves data "
    'between host and device (`jax.transfer_guard("disallow")`).'
)


def gpu_block(text: str) -> str:
    return f"{GPU_BEGIN}\n{text.strip()}\n{GPU_END}"


def splice(old: str, new: str, gpu: bool) -> str:
    """RESULTS.md from the old file and this run: a CPU run keeps the old GPU block, a GPU
    run replaces only that block."""
    pattern = re.compile(re.escape(GPU_BEGIN) + ".*?" + re.escape(GPU_END), re.S)
    found = pattern.search(old)
    if gpu:
        if found is None:
            return (old.rstrip() + "\n\n" if old.strip() else "") + gpu_block(new) + "\n"
        return old[: found.start()] + gpu_block(new) + old[found.end() :]
    kept = found.group(0) if found is not None else gpu_block(NO_GPU)
    return new.rstrip() + "\n\n" + kept + "\n"


def main() -> int:
    names = (os.environ.get("BENCH_SECTIONS") or ",".join(SECTIONS)).replace(" ", "").split(",")
    unknown = [n for n in names if n not in SECTIONS]
    methods, notes = select(os.environ.get("BENCH_METHODS"))
    out = os.environ.get("BENCH_OUT") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "RESULTS.quick.md" if QUICK else "RESULTS.md",
    )
    gpu = not ON_CPU
    rep = Report(level=3, prefix="GPU ") if gpu else Report()
    if gpu:
        rep.add("## GPU")
        rep.add(f"Written by `make bench` on a {BACKEND} backend (`benchmarks/run.py`).")
    else:
        rep.add("# optax_balance benchmarks")
        rep.add(
            "Written by `make bench` (`benchmarks/run.py`). CPU timings on a shared machine "
            "are noisy: the load average is printed with every table, and every ratio "
            "compares two timings taken interleaved in the same process."
        )
    rep.add(machine())
    notes += [f"unknown section {n!r} (not in benchmarks/run.py SECTIONS)" for n in unknown]
    for n in notes:
        rep.note(n)
    t0 = time.perf_counter()
    for name, fn in SECTIONS.items():
        if name in names:
            fn(methods, rep)
    rep.heading("Cells that miss their target" if not gpu else "GPU cells that miss their target")
    if rep.misses:
        rep.add("\n".join(f"- {m}" for m in rep.misses))
        if not gpu:
            rep.add(WHY)
    else:
        rep.add("None.")
    rep.add(f"Total benchmark time: {time.perf_counter() - t0:.0f} s. Load at end: {load()}.")
    old = ""
    with contextlib.suppress(OSError), open(out) as f:
        old = f.read()
    with open(out, "w") as f:
        f.write(splice(old, "\n\n".join(rep.parts), gpu))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
