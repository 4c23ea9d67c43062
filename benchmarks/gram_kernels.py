"""How the Gramian of one stacked leaf is contracted: the alternatives, timed.

The Gramian ``G = F F^T`` of a ``(T, P)`` leaf has a tiny output and a huge contraction,
a shape CPU GEMM libraries handle poorly (they pack both operands and parallelise over
the output). This section times the ways of writing it in XLA against the one-pass floor
``w @ F`` and PyTorch's ``F @ F.T`` on the same matrix (at torch's best thread count),
and checks each against a NumPy float64 Gramian. ``core`` is what
``optax_balance._core._gram.leaf_gram`` does in this build (on CPU: the dot over column
chunks, with split rows at T=2; see the comment block in that module).

Run alone with ``BENCH_SECTIONS=kernels python -m benchmarks.run``, or, for a few kernels
and sizes, ``python -m benchmarks.gram_kernels --tasks 2,8 --kernels core,pairs``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_balance._core import _gram

_HIGHEST = jax.lax.Precision.HIGHEST
_DN = (((1,), (1,)), ((), ()))
F32 = jnp.float32


def dot(f: jax.Array) -> jax.Array:
    """One ``dot_general`` contracting axis 1 of both operands (YNNPACK on XLA:CPU)."""
    return jax.lax.dot_general(f, f, _DN, precision=_HIGHEST, preferred_element_type=F32)


def chunked_dot(f: jax.Array, chunk: int) -> jax.Array:
    """The dot over column chunks in a ``fori_loop`` (the core's loop, any chunk size)."""
    return _gram._gram_chunked(_gram._gram_dot, f, F32, chunk)


def chunked_split_dot(f: jax.Array, chunk: int) -> jax.Array:
    """The chunked dot on rows split in halves: (2T, c/2) chunks (the core's T=2 form)."""
    if f.shape[1] % 2:
        return chunked_dot(f, chunk)
    return _gram._gram_chunked(_gram._gram_split_dot, f, F32, chunk)


def _pair_sums(x: jax.Array) -> jax.Array:
    """``sum(x[i] * x[j])`` for every pair ``i <= j`` of rows of ``x`` (T, m, blk)."""
    iu, ju = np.triu_indices(x.shape[0])
    rows = [x[i].astype(F32) for i in range(x.shape[0])]
    products = tuple(rows[i] * rows[j] for i, j in zip(iu, ju))
    zeros = tuple(jnp.zeros((), F32) for _ in products)
    sums = jax.lax.reduce(
        products, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)), (products[0].ndim - 1,)
    )
    return jnp.sum(jnp.stack(sums), axis=1)


def pairs(f: jax.Array, chunk: int = 65536, blk: int = 1024) -> jax.Array:
    """All ``T(T+1)/2`` row products in one variadic reduce per column chunk.

    The core's kernel for T <= 12 before issue 17: XLA emits the variadic reduce as scalar
    (multi-threaded) code; the fastest form on the Intel Xeon at T <= 8, 2x slower than
    the chunked dot on the AMD EPYC.
    """
    t = f.shape[0]
    iu, ju = np.triu_indices(t)
    index = np.zeros((t, t), np.int32)
    index[iu, ju] = index[ju, iu] = np.arange(iu.size)

    def kernel(x: jax.Array, dt: Any) -> jax.Array:
        n = x.shape[1]
        m = n // blk
        sums = jnp.zeros((iu.size,), dt)
        if m:
            sums = sums + _pair_sums(x[:, : m * blk].reshape(t, m, blk))
        if n > m * blk:
            sums = sums + _pair_sums(x[:, m * blk :].reshape(t, 1, n - m * blk))
        return sums[index]

    return _gram._gram_chunked(kernel, f, F32, chunk)


def broadcast_reduce(f: jax.Array, chunk: int = 4096) -> jax.Array:
    """``sum(F[:, None] * F[None], -1)`` per chunk: one fused YNNPACK reduce of T^2 products."""

    def kernel(x: jax.Array, dt: Any) -> jax.Array:
        x = x.astype(dt)
        return jnp.sum(x[:, None, :] * x[None, :, :], axis=-1)

    return _gram._gram_chunked(kernel, f, F32, chunk)


def eigen_transposed(f: jax.Array) -> jax.Array:
    """The dot on a materialised ``(P, T)`` copy: XLA then calls Eigen, not YNNPACK."""
    ft = jax.lax.optimization_barrier(f.T)
    return jax.lax.dot_general(
        ft, ft, (((0,), (0,)), ((), ())), precision=_HIGHEST, preferred_element_type=F32
    )


def matvecs(f: jax.Array, chunk: int = 16384) -> jax.Array:
    """One matrix-vector product ``F f_j`` per task and column chunk (Eigen's GEMV)."""

    def kernel(x: jax.Array, dt: Any) -> jax.Array:
        cols = [
            jax.lax.dot_general(
                x, x[j], (((1,), (0,)), ((), ())), precision=_HIGHEST, preferred_element_type=dt
            )
            for j in range(x.shape[0])
        ]
        return jnp.stack(cols, axis=1)

    return _gram._gram_chunked(kernel, f, F32, chunk)


CANDIDATES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "core": _gram.leaf_gram,
    "dot": dot,
    "chunked dot 1024": partial(chunked_dot, chunk=1024),
    "chunked dot 4096": partial(chunked_dot, chunk=4096),
    "chunked dot 16384": partial(chunked_dot, chunk=16384),
    "chunked split-row dot 16384": partial(chunked_split_dot, chunk=16384),
    "pairs (variadic reduce)": pairs,
    "broadcast reduce 4096": broadcast_reduce,
    "Eigen dot on a transposed copy": eigen_transposed,
    "matrix-vector per task": matvecs,
}
# Beyond these T a candidate is far off (or compiles slowly) and is skipped.
MAX_T = {"pairs (variadic reduce)": 16, "broadcast reduce 4096": 8, "matrix-vector per task": 16}


def _time(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds per call: ``benchmarks.run.interleaved`` with ~5 ms samples."""
    from benchmarks.run import interleaved

    return dict(interleaved(calls, sample=5e-3, rounds=rounds))


def _torch_call(f_np: np.ndarray, threads: int) -> Callable[[], Any]:
    import torch

    tf = torch.from_numpy(f_np.copy())

    def call() -> Any:
        torch.set_num_threads(threads)
        return tf @ tf.T

    return call


def measure(
    t: int, p: int, thread_choices: tuple[int, ...], rounds: int = 9, names: Any = None
) -> dict[str, tuple[float, float]]:
    """``{name: (median seconds, max relative error vs NumPy f64)}`` for one ``(T, P)``.

    torch is timed at each of ``thread_choices`` and reported at its best, as
    ``torch F @ F.T (k threads)``.
    """
    rng = np.random.default_rng(t)
    f_np = rng.standard_normal((t, p), dtype=np.float32)
    ref = f_np.astype(np.float64) @ f_np.astype(np.float64).T
    f = jnp.asarray(f_np)
    w = jnp.full((t,), 1.0 / t, F32)
    floor = jax.jit(lambda w, f: jnp.tensordot(w, f, axes=1))
    calls: dict[str, Callable[[], Any]] = {"floor": lambda: jax.block_until_ready(floor(w, f))}
    errs: dict[str, float] = {"floor": 0.0}
    for name, fn in CANDIDATES.items():
        if (names is not None and name not in names) or t > MAX_T.get(name, t):
            continue
        jf = jax.jit(fn)
        got = np.asarray(jf(f), np.float64)
        errs[name] = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
        calls[name] = lambda jf=jf: jax.block_until_ready(jf(f))
    torch_names = []
    try:
        import torch

        got = (torch.from_numpy(f_np) @ torch.from_numpy(f_np).T).double().numpy()
        for k in thread_choices:
            calls[f"torch {k}"] = _torch_call(f_np, k)
            errs[f"torch {k}"] = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
            torch_names.append(f"torch {k}")
    except ImportError:
        pass
    res = _time(calls, rounds)
    out = {k: (res[k], errs[k]) for k in res if k not in torch_names}
    if torch_names:
        best = min(torch_names, key=lambda k: res[k])
        threads = best.split()[1]
        out[f"torch F @ F.T ({threads} thread{'s' if threads != '1' else ''})"] = (
            res[best],
            errs[best],
        )
    return out


# XLA lowers f32 dots on CPU to YNNPACK; this flag value turns that off (Eigen instead).
NO_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def measure_dot_without_ynn(t: int, p: int, rounds: int = 9) -> dict[str, float] | None:
    """Floor, ``core`` and ``dot`` timed in a child process with YNNPACK fusions disabled."""
    code = (
        "import json, jax, jax.numpy as jnp, numpy as np\n"
        "from benchmarks import gram_kernels as gk\n"
        f"rng = np.random.default_rng({t})\n"
        f"f = jnp.asarray(rng.standard_normal(({t}, {p}), dtype=np.float32))\n"
        f"w = jnp.full(({t},), 1.0 / {t}, jnp.float32)\n"
        "fl = jax.jit(lambda w, f: jnp.tensordot(w, f, axes=1))\n"
        "d = jax.jit(gk.dot)\n"
        "c = jax.jit(gk._gram.leaf_gram)\n"
        "r = gk._time({'floor': lambda: jax.block_until_ready(fl(w, f)),"
        " 'core': lambda: jax.block_until_ready(c(f)),"
        f" 'dot': lambda: jax.block_until_ready(d(f))}}, {rounds})\n"
        "print('RESULT', json.dumps(r))\n"
    )
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + NO_YNN_FLAG).strip()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return None


def rows(results: dict[int, dict[str, tuple[float, float]]], tasks: tuple[int, ...]) -> list:
    """Table rows: ``ms (ratio to floor), err`` per candidate and T (torch rows merged)."""
    from benchmarks.run import ms

    def key(name: str) -> str:
        return "torch F @ F.T" if name.startswith("torch F @ F.T") else name

    names = list(dict.fromkeys(key(k) for r in results.values() for k in r))
    out = []
    for name in names:
        row = [name]
        for t in tasks:
            hit = [k for k in results[t] if key(k) == name]
            if hit:
                s, e = results[t][hit[0]]
                extra = f", {hit[0][len(name) :].strip(' ()')}" if hit[0] != name else ""
                row.append(f"{ms(s)} ({s / results[t]['floor'][0]:.1f}x), err {e:.0e}{extra}")
            else:
                row.append("—")
        out.append(row)
    return out


def section(
    rep: Any,
    thread_choices: tuple[int, ...],
    tasks: tuple[int, ...] = (2, 8, 16, 32),
    p: int = 1_000_000,
) -> None:
    from benchmarks.run import load, ms, table

    load_before = load()
    results = {t: measure(t, p, thread_choices) for t in tasks}
    table_rows = rows(results, tasks)
    no_ynn = {t: measure_dot_without_ynn(t, p) for t in tasks}
    for name in ("core", "dot"):
        row = [f"{name}, `XLA_FLAGS={NO_YNN_FLAG}` (own process)"]
        for t in tasks:
            r = no_ynn[t]
            row.append("failed" if r is None else f"{ms(r[name])} ({r[name] / r['floor']:.1f}x)")
        table_rows.append(row)
    rep.section("Gramian kernels (one leaf)")
    rep.add(
        f"`G = F F^T` of one (T, P={p:.0e}) float32 leaf: median ms (ratio to the floor "
        "`w @ F`), and max |G - G_f64| / max |G_f64| against a NumPy float64 Gramian. "
        "`core` is `optax_balance._core._gram.leaf_gram`; torch at its best of "
        f"{' and '.join(map(str, thread_choices))} threads (named in its cell). The last "
        "two rows run the core and the plain dot in a separate process with XLA's YNNPACK "
        "dot fusion switched off (XLA then uses Eigen); the library cannot set that flag, "
        f"a user can. Load before: {load_before}; after: {load()}."
    )
    rep.add(table(["kernel"] + [f"T={t}" for t in tasks], table_rows))


def main(argv: list[str] | None = None) -> int:
    from benchmarks.run import Report, table

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="2,8,16,32")
    ap.add_argument("--size", type=float, default=1e6)
    ap.add_argument("--kernels", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args(argv)
    tasks = tuple(int(t) for t in args.tasks.split(","))
    names = None if args.kernels is None else set(args.kernels.split(",")) | {"floor"}
    results = {t: measure(t, int(args.size), (1, 2), args.rounds, names) for t in tasks}
    Report().add(table(["kernel"] + [f"T={t}" for t in tasks], rows(results, tasks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
