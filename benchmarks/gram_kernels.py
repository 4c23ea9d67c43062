"""How the Gramian of one stacked leaf is contracted: the alternatives, timed.

The Gramian ``G = F F^T`` of a ``(T, P)`` leaf has a tiny output and a huge contraction,
a shape CPU GEMM libraries handle poorly (they pack both operands and parallelise over
the output). This section times the ways of writing it in XLA against the one-pass floor
``w @ F`` and PyTorch's ``F @ F.T`` on the same matrix, and checks each against a NumPy
float64 Gramian. ``core`` is what ``optax_balance._gram.leaf_gram`` does in this build: on
CPU, ``variadic reduce`` up to ``_gram._PAIR_MAX_T`` tasks and ``chunked dot`` beyond.

Run alone with ``BENCH_SECTIONS=kernels python -m benchmarks.run``.
"""

from __future__ import annotations

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


def dot(f: jax.Array) -> jax.Array:
    """One ``dot_general`` contracting axis 1 of both operands (the original core)."""
    return jax.lax.dot_general(f, f, _DN, precision=_HIGHEST, preferred_element_type=jnp.float32)


def dot_transposed(f: jax.Array) -> jax.Array:
    """The same on an explicit ``(P, T)`` transpose (contract axis 0)."""
    ft = f.T
    return jax.lax.dot_general(
        ft, ft, (((0,), (0,)), ((), ())), precision=_HIGHEST, preferred_element_type=jnp.float32
    )


def batched(f: jax.Array, blk: int) -> jax.Array:
    """Reshape to ``(T, nb, blk)``, one batched dot over the blocks, then sum the blocks."""
    t, p = f.shape
    nb = p // blk
    out = jnp.zeros((t, t), jnp.float32)
    if nb:
        a = f[:, : nb * blk].reshape(t, nb, blk)
        out = jax.lax.dot_general(
            a,
            a,
            (((2,), (2,)), ((1,), (1,))),
            precision=_HIGHEST,
            preferred_element_type=jnp.float32,
        ).sum(0)
    if p > nb * blk:
        out = out + dot(f[:, nb * blk :])
    return out


def split(f: jax.Array, k: int) -> jax.Array:
    """``k`` independent dots on column slices, summed (lets the runtime overlap them)."""
    edges = np.linspace(0, f.shape[1], k + 1).astype(int)
    out = jnp.zeros((f.shape[0],) * 2, jnp.float32)
    for a, b in zip(edges[:-1], edges[1:]):
        out = out + dot(f[:, a:b])
    return out


def pairwise(f: jax.Array) -> jax.Array:
    """One fused reduction per pair ``i <= j`` (``sum(f_i * f_j)``), mirrored."""
    t = f.shape[0]
    iu = np.triu_indices(t)
    f32 = f.astype(jnp.float32)
    vals = jnp.stack([jnp.sum(f32[i] * f32[j]) for i, j in zip(*iu)])
    g = jnp.zeros((t, t), jnp.float32).at[iu].set(vals)
    return g + jnp.triu(g, 1).T


def broadcast_blocks(f: jax.Array, blk: int) -> jax.Array:
    """Elementwise ``F[:, None] * F[None]`` over ``(T, nb, blk)`` blocks, reduced."""
    t, p = f.shape
    nb = p // blk
    a = f[:, : nb * blk].reshape(t, nb, blk).astype(jnp.float32)
    out = jnp.sum(a[:, None] * a[None, :], axis=(2, 3))
    if p > nb * blk:
        out = out + dot(f[:, nb * blk :])
    return out


def variadic_reduce(f: jax.Array) -> jax.Array:
    """All ``T(T+1)/2`` row products in one variadic reduce (``_gram._gram_pairs``)."""
    return _gram._gram_pairs(f, jnp.float32)  # one reduce over the whole leaf


def chunked_dot(f: jax.Array, chunk: int) -> jax.Array:
    """The dot over column chunks in a ``fori_loop`` (the core's loop, any chunk size)."""
    return _gram._gram_chunked(_gram._gram_dot, f, jnp.float32, chunk)


def conv_1x1(f: jax.Array) -> jax.Array:
    """The Gramian as a 1x1 convolution (XLA's convolution path instead of its dot)."""
    t = f.shape[0]
    out = jax.lax.conv_general_dilated(
        f[:, None, :],
        f.T[None],
        (1,),
        "VALID",
        dimension_numbers=("NHC", "HIO", "NHC"),
        precision=_HIGHEST,
        preferred_element_type=jnp.float32,
    )
    return out.reshape(t, t)


def matvecs(f: jax.Array) -> jax.Array:
    """One matrix-vector product ``F f_j`` per task over 4096-column chunks (no GEMM)."""

    def kernel(x: jax.Array, dt: Any) -> jax.Array:
        cols = [
            jax.lax.dot_general(
                x, x[j], (((1,), (0,)), ((), ())), precision=_HIGHEST, preferred_element_type=dt
            )
            for j in range(x.shape[0])
        ]
        return jnp.stack(cols, axis=1)

    return _gram._gram_chunked(kernel, f, jnp.float32, 4096)


CANDIDATES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "core": _gram.leaf_gram,
    "variadic reduce": variadic_reduce,
    "chunked dot 4096": partial(chunked_dot, chunk=4096),
    "chunked dot 16384": partial(chunked_dot, chunk=16384),
    "chunked dot 65536": partial(chunked_dot, chunk=65536),
    "dot": dot,
    "dot on F.T": dot_transposed,
    "batched blk=4096": partial(batched, blk=4096),
    "batched blk=65536": partial(batched, blk=65536),
    "split k=2": partial(split, k=2),
    "split k=8": partial(split, k=8),
    "pairwise reduce": pairwise,
    "broadcast blk=64": partial(broadcast_blocks, blk=64),
    "1x1 convolution": conv_1x1,
    "matrix-vector per task": matvecs,
}
MAX_T_PAIRWISE = 8  # T(T+1)/2 reductions; beyond this they are no longer one pass
MAX_T_BROADCAST = 8
MAX_T_VARIADIC = 16  # T=16 already spills (slower than the dot); larger T compiles slowly


def _time(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds per call: ``benchmarks.run.interleaved`` with ~5 ms samples."""
    from benchmarks.run import interleaved

    return dict(interleaved(calls, sample=5e-3, rounds=rounds))


def measure(t: int, p: int, threads: int, rounds: int = 9) -> dict[str, tuple[float, float]]:
    """``{name: (median seconds, max relative error vs NumPy f64)}`` for one ``(T, P)``."""
    rng = np.random.default_rng(t)
    f_np = rng.standard_normal((t, p), dtype=np.float32)
    ref = f_np.astype(np.float64) @ f_np.astype(np.float64).T
    f = jnp.asarray(f_np)
    w = jnp.full((t,), 1.0 / t, jnp.float32)
    floor = jax.jit(lambda w, f: jnp.tensordot(w, f, axes=1))
    calls: dict[str, Callable[[], Any]] = {"floor": lambda: jax.block_until_ready(floor(w, f))}
    errs: dict[str, float] = {"floor": 0.0}
    for name, fn in CANDIDATES.items():
        if name == "pairwise reduce" and t > MAX_T_PAIRWISE:
            continue
        if name.startswith("broadcast") and t > MAX_T_BROADCAST:
            continue
        if name == "variadic reduce" and t > MAX_T_VARIADIC:
            continue
        jf = jax.jit(fn)
        got = np.asarray(jf(f), np.float64)
        errs[name] = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
        calls[name] = lambda jf=jf: jax.block_until_ready(jf(f))
    try:
        import torch

        torch.set_num_threads(threads)
        tf = torch.from_numpy(f_np.copy())
        calls["torch F @ F.T"] = lambda: tf @ tf.T
        errs["torch F @ F.T"] = float(
            np.max(np.abs((tf @ tf.T).double().numpy() - ref)) / np.max(np.abs(ref))
        )
    except ImportError:
        pass
    res = _time(calls, rounds)
    return {k: (res[k], errs[k]) for k in res}


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


def section(
    rep: Any, threads: int, tasks: tuple[int, ...] = (2, 8, 16, 32), p: int = 1_000_000
) -> None:
    from benchmarks.run import load, ms, table

    load_before = load()
    results = {t: measure(t, p, threads) for t in tasks}
    names = list(dict.fromkeys(k for r in results.values() for k in r))
    rows = []
    for name in names:
        row = [name]
        for t in tasks:
            if name in results[t]:
                s, e = results[t][name]
                row.append(f"{ms(s)} ({s / results[t]['floor'][0]:.1f}x), err {e:.0e}")
            else:
                row.append("—")
        rows.append(row)
    no_ynn = {t: measure_dot_without_ynn(t, p) for t in tasks}
    for name in ("core", "dot"):
        row = [f"{name}, `XLA_FLAGS={NO_YNN_FLAG}` (own process)"]
        for t in tasks:
            r = no_ynn[t]
            row.append("failed" if r is None else f"{ms(r[name])} ({r[name] / r['floor']:.1f}x)")
        rows.append(row)
    rep.add("## 5. Gramian kernels (one leaf)")
    rep.add(
        f"`G = F F^T` of one (T, P={p:.0e}) float32 leaf: median ms (ratio to the floor "
        "`w @ F`), and max |G - G_f64| / max |G_f64| against a NumPy float64 Gramian. "
        f"`core` is `optax_balance._gram.leaf_gram`. The last two rows run the core and the "
        "plain dot in a separate process with XLA's YNNPACK dot fusion switched off (XLA then "
        "uses Eigen); the library cannot set that flag, a user can. "
        f"Load before: {load_before}; after: {load()}."
    )
    rep.add(table(["kernel"] + [f"T={t}" for t in tasks], rows))
