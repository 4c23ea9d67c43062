"""The Gramian ``J J^T`` of one stacked leaf, with kernels chosen for each backend.

The statistics contract or sum over the parameter axes directly, never through a
``reshape(T, -1)`` of a sharded leaf: under sharding-in-types (``AxisType.Explicit``) a
reshape that merges a sharded axis is an error, and elsewhere it can force a relayout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from optax_balance._core._types import Array, stat_dtype

_HIGHEST = jax.lax.Precision.HIGHEST


def rest_axes(g: Array, start: int = 1) -> tuple[int, ...]:
    """The axes of ``g`` from ``start`` on (the parameter axes of a stacked leaf)."""
    return tuple(range(start, g.ndim))


def leaf_sq_norms(g: Array) -> Array:
    """Per-task squared norms ``(T,)`` of one stacked leaf, in the statistics dtype.

    Reduced over the leaf's ``(T, n)`` view, held by an optimization barrier: in a train
    step vmap(grad) leaves a Dense kernel's stacked gradient in a transposed layout, and a
    reduction over the unmerged axes made XLA:CPU write a second, transposed copy of it
    besides the ``(T, n)`` copy the combination reads (XLA sinks a plain reshape into the
    reduction): +30% compiled step memory for the norm-based methods at T=8
    (benchmarks/run.py's memory table). On a row-major leaf the view is free. Not under
    Explicit sharding, where merging a sharded axis is an error.
    """
    dt = stat_dtype()
    if g.ndim > 2 and _replicated_if_explicit(g) is None:
        g = jax.lax.optimization_barrier(g.reshape(g.shape[0], -1))
    f = g.astype(dt)
    return jnp.sum(f * f, axis=rest_axes(g))


def task_rows(*gs: Array) -> tuple[Array, ...]:
    """The ``(T, n)`` views of stacked leaves, held together by an optimization barrier.

    For a reduction over a leaf that is also read elsewhere (its new state, the
    combination): the barrier keeps XLA from merging the reduction's elementwise work
    with the same expression written out elsewhere (the reduction would then read a
    materialised T x n copy of it), and the views keep a train step's transposed
    gradient layout from costing a second copy (see :func:`leaf_sq_norms`). Under
    Explicit sharding, where merging a sharded axis is an error, the leaves keep their
    shapes.
    """
    if all(_replicated_if_explicit(g) is None for g in gs):
        gs = tuple(g.reshape(g.shape[0], -1) for g in gs)
    return tuple(jax.lax.optimization_barrier(gs))


def _replicated_if_explicit(g: Array) -> Any:
    """``out_sharding`` for a contraction of ``g``'s sharded axes, or ``None``.

    Under sharding-in-types, a ``dot_general`` contracting axes sharded over an
    ``Explicit`` mesh axis must name its output sharding; the small statistics are
    replicated. Everywhere else (no mesh, ``Auto`` axes, inside ``shard_map``) the
    compiler decides and ``None`` is passed.
    """
    axis_type = getattr(jax.sharding, "AxisType", None)
    typeof = getattr(jax, "typeof", None)
    if axis_type is None or typeof is None:  # JAX without sharding in types
        return None
    sharding = getattr(typeof(g), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if sharding is None or mesh is None or not mesh.axis_names:
        return None
    explicit = {n for n, k in zip(mesh.axis_names, mesh.axis_types) if k == axis_type.Explicit}
    used = set()
    for entry in sharding.spec:
        used.update(entry if isinstance(entry, tuple) else (entry,))
    if not explicit & used:
        return None
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


# How one leaf's Gramian is contracted. On GPU/TPU it is one ``dot_general`` (the
# vendor GEMM splits the long contraction). On CPU, XLA sends every f32 (and bf16 -> f32)
# dot to YNNPACK, which runs a (T, n) x (n, T) dot (tiny output, long contraction) on one
# thread and packs whole operands: 5-10x one pass over the gradients at n = 1e6. The CPU
# form walks the leaf in column chunks (about _CHUNK_BYTES up to T=12) in a fori_loop
# and contracts each chunk with that dot, so the packing stays in cache. Two tasks are a
# degenerate GEMM (2 of 16 lanes): each chunk's two rows are split in halves and the
# (4, 4) Gramian of the halves is contracted, its two diagonal blocks summed.
# benchmarks/KERNELS.md has the figures behind this, per machine (CPU ms at n = 1e6 on an
# AMD EPYC Zen 5; the Intel Xeon's from an earlier run), and the forms that lost:
#   * T=2: split rows 0.47-0.54 ms; the plain chunked dot 0.65-0.81; "pairs" 1.0-1.4.
#   * T=8: the 4096-column dot 3.0-3.4; "pairs" 6.8-7.0 (on the Xeon 3.2 against 3.6:
#     the one regime where pairs was ahead, by 10%).
#   * "pairs", this module's kernel for T <= 12 until issue 17, is one variadic reduce
#     over all T(T+1)/2 row products; XLA emits it as scalar code.
#   * broadcast products reduced by YNNPACK, stacked row products, batched dots over row
#     blocks, Eigen's dot on a transposed copy, matrix-vector products per task: no faster,
#     most 1.3-15x slower. Independent chunk loops do not run concurrently.
# The chunks matter beyond cache: inside a train step the stacked gradients often come
# out of the backward pass in a transposed physical layout (a Dense kernel's gradient is
# computed as (T * out, in)). XLA then fuses that relayout into the chunk's
# dynamic_slice, once per element. Every form accumulates in the statistics dtype
# (YNNPACK's bf16 dot accumulates in f32) and agrees with a float64 Gramian within
# tests/tolerance.py's float32 bound.
_CHUNK_BYTES = 1 << 17  # 128 KiB of float32 per chunk: 4096 columns at T=8
_MIN_CHUNK = 4096
_MAX_CHUNK = 16384
_BIG_T = 13  # from this many tasks on, chunks of _MAX_CHUNK columns
_SPLIT_T = 2  # up to this many tasks, each chunk's rows are split in two


def _chunk_columns(t: int) -> int:
    """Columns per chunk for ``t`` tasks: a power of two near ``_CHUNK_BYTES``, clipped.

    Measured on the EPYC (CPU ms at n=1e6, benchmarks/KERNELS.md): T=8 3.1-3.4 at 4096
    against 3.5-3.8 at 2048 and 3.5-4.6 at 16384; T=12 6.8 at 4096, 7.4 at 8192, 8.1 at
    16384. The Xeon agrees at T=8 (4096 columns ahead of 16384 and 65536). From T=13 on
    the chunk is _MAX_CHUNK: at T=16-32, 1024-2048 columns cost 0-15% less CPU than 16384
    (and 4096 more), but 8-16x the loop iterations, and each iteration is a thunk XLA's
    runtime may hand to another thread: on the loaded VM that cost the 1024-column loop
    2-3x wall time, the 16384-column one little.
    """
    if t >= _BIG_T:
        return _MAX_CHUNK
    c = _CHUNK_BYTES // (4 * t)
    c = 1 << max(c.bit_length() - 1, 0)
    return int(min(max(c, _MIN_CHUNK), _MAX_CHUNK))


def _gram_dot(x: Array, dt: Any) -> Array:
    """The Gramian of ``x`` (T, n) as one ``dot_general``."""
    return jax.lax.dot_general(
        x, x, (((1,), (1,)), ((), ())), precision=_HIGHEST, preferred_element_type=dt
    ).astype(dt)


def _gram_split_dot(x: Array, dt: Any) -> Array:
    """The Gramian of ``x`` (T, n), n even, from the (2T, 2T) Gramian of its half rows.

    ``x.reshape(2T, n / 2)`` is free (row ``i`` becomes rows ``2i`` and ``2i + 1``);
    ``G[i, j]`` is the sum of the two diagonal entries of block ``(i, j)``.
    """
    t, n = x.shape
    z = _gram_dot(x.reshape(2 * t, n // 2), dt).reshape(t, 2, t, 2)
    return z[:, 0, :, 0] + z[:, 1, :, 1]


def _sum_over_chunks(
    fn: Callable[..., Array],
    tail: Callable[..., Array],
    xs: tuple[Array, ...],
    chunk: int,
    dt: Any,
) -> Array:
    """``fn`` of the column chunks of the ``(T, n)`` arrays ``xs`` (taken together), summed.

    Leaves shorter than two chunks take ``fn`` once; the columns after the last whole
    chunk (any number) take ``tail``. ``fn`` and ``tail`` return a ``(T, T)`` array.
    """
    n = xs[0].shape[1]
    m = n // chunk
    if m < 2:
        return fn(*xs)

    def body(i: Array, acc: Array) -> Array:
        return acc + fn(*(jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1) for x in xs))

    t = xs[0].shape[0]
    acc = jax.lax.fori_loop(0, m, body, jnp.zeros((t, t), dt))
    if n > m * chunk:
        acc = acc + tail(*(x[:, m * chunk :] for x in xs))
    return acc


def _gram_chunked(kernel: Callable[[Array, Any], Array], x: Array, dt: Any, chunk: int) -> Array:
    """``kernel``'s Gramian summed over column chunks of ``x`` (T, n) in a loop.

    The columns after the last whole chunk take the plain dot (the split kernel needs an
    even length).
    """
    return _sum_over_chunks(lambda c: kernel(c, dt), lambda c: _gram_dot(c, dt), (x,), chunk, dt)


def _cpu_kernel(t: int, n: int) -> Callable[[Array, Any], Array]:
    """The CPU kernel for each chunk of a ``(t, n)`` leaf: rows split at T <= _SPLIT_T."""
    return _gram_split_dot if t <= _SPLIT_T and n % 2 == 0 and n >= 2048 else _gram_dot


def _gram_cpu(x: Array, dt: Any) -> Array:
    t, n = x.shape
    return _gram_chunked(_cpu_kernel(t, n), x, dt, _chunk_columns(t))


# ``leaf_gram`` and ``leaf_cross_gram`` are jitted (inlined inside a jitted step): called
# eagerly, the chunk loop's body would be a new closure, compiled again on every call.
@jax.jit
def leaf_gram(g: Array) -> Array:
    """``g.reshape(T, -1) @ g.reshape(T, -1).T`` accumulated in the statistics dtype."""
    t = g.shape[0]
    dt = stat_dtype()
    axes = rest_axes(g)
    out_sharding = _replicated_if_explicit(g)
    if t == 1:
        return leaf_sq_norms(g).reshape(1, 1)
    if out_sharding is not None:
        # A reshape that merges an Explicit-sharded axis is an error: contract the axes
        # as they are, naming the (replicated) output sharding.
        return jax.lax.dot_general(
            g,
            g,
            ((axes, axes), ((), ())),
            precision=_HIGHEST,
            preferred_element_type=dt,
            out_sharding=out_sharding,
        ).astype(dt)
    x = g.reshape(t, -1)
    if x.shape[1] == 0:
        return jnp.zeros((t, t), dt)
    return jax.lax.platform_dependent(
        x, cpu=lambda x: _gram_cpu(x, dt), default=lambda x: _gram_dot(x, dt)
    )


# The Gramian and the squared norms of a *mix* ``Z = diag(a) Y + diag(b) G`` of two
# stacked leaves of one shape, never writing Z: methods with tracked estimates (MoCo's
# y, DB-MTL's moving average) read the statistics of their new estimates while the new
# state is only written once, by the guard's select (in place when the state is donated).
# Expanding them over Y and G instead (Y Y^T, Y G^T, G G^T) costs three Gramians' work.
# On CPU the mix is formed chunk by chunk inside the Gramian's loop (XLA fuses it into
# the chunk's copy); elsewhere in chunks of _MIX_CHUNK columns, which bounds the
# temporary at T x _MIX_CHUNK numbers (a whole mix of a P=1e8 leaf would be T x 400 MB).
_MIX_CHUNK = 1 << 22


def mix_leaf(a: Array, y: Array, b: Array, g: Array) -> Array:
    """``a_i y_i + b_i g_i`` per task (``a``, ``b``: ``(T,)``), in the statistics dtype."""
    dt = stat_dtype()
    shape = (a.shape[0],) + (1,) * (y.ndim - 1)
    return a.reshape(shape).astype(dt) * y.astype(dt) + b.reshape(shape).astype(dt) * g.astype(dt)


def _mix_gram_chunked(
    kernel: Callable[[Array, Any], Array],
    a: Array,
    x: Array,
    b: Array,
    y: Array,
    dt: Any,
    chunk: int,
) -> Array:
    """``kernel``'s Gramian of the mix of ``x`` and ``y`` (T, n), summed over column chunks."""
    return _sum_over_chunks(
        lambda xc, yc: kernel(mix_leaf(a, xc, b, yc), dt),
        lambda xc, yc: _gram_dot(mix_leaf(a, xc, b, yc), dt),
        (x, y),
        chunk,
        dt,
    )


def _mix_gram_cpu(a: Array, x: Array, b: Array, y: Array, dt: Any) -> Array:
    t, n = x.shape
    return _mix_gram_chunked(_cpu_kernel(t, n), a, x, b, y, dt, _chunk_columns(t))


def leaf_mix_gram(a: Array, y: Array, b: Array, g: Array) -> Array:
    """The Gramian ``Z Z^T`` of ``Z = diag(a) Y + diag(b) G`` (one stacked leaf), not writing Z.

    ``a`` and ``b`` are ``(T,)``; ``y`` and ``g`` stacked leaves of one shape (the dtypes
    may differ). Under Explicit sharding the mix is formed whole (a sharded temporary).
    """
    t = y.shape[0]
    dt = stat_dtype()
    a, b = a.astype(dt), b.astype(dt)
    if _replicated_if_explicit(y) is not None:
        return leaf_gram(mix_leaf(a, y, b, g))
    x, z = y.reshape(t, -1), g.reshape(t, -1)
    if x.shape[1] == 0:
        return jnp.zeros((t, t), dt)
    return jax.lax.platform_dependent(
        a,
        x,
        b,
        z,
        cpu=lambda a, x, b, z: _mix_gram_cpu(a, x, b, z, dt),
        default=lambda a, x, b, z: _mix_gram_chunked(_gram_dot, a, x, b, z, dt, _MIX_CHUNK),
    )


def leaf_mix_sq_norms(a: Array, y: Array, b: Array, g: Array) -> Array:
    """Per-task squared norms ``(T,)`` of ``a_i y_i + b_i g_i`` (one leaf), not writing them.

    The operands pass :func:`task_rows`' barrier, the coefficients one of their own:
    otherwise XLA's common-subexpression elimination merges this mix (or the
    coefficients' T x n broadcasts) with the same written as the new state, and the
    reduction then reads materialised T x n copies (XLA:CPU's YNNPACK reduction takes
    its operands from memory).
    """
    y, g = task_rows(y, g)
    # The coefficients too: their (T, n) broadcasts would be merged with the new state's.
    a, b = jax.lax.optimization_barrier((a, b))
    z = mix_leaf(a, y, b, g)
    return jnp.sum(z * z, axis=rest_axes(z))


# The cross-Gramian ``J1 J2^T`` of two batches' stacked gradients of one leaf (SDMGrad,
# MoDo: an unbiased estimate of the Gramian of the expected gradients). The Gramian's
# kernels on two operands: on CPU the dot over column chunks (same chunk sizes, same
# reasons: YNNPACK's packing stays in cache), elsewhere one dot_general.


def _cross_gram_dot(x: Array, y: Array, dt: Any) -> Array:
    return jax.lax.dot_general(
        x, y, (((1,), (1,)), ((), ())), precision=_HIGHEST, preferred_element_type=dt
    ).astype(dt)


def _cross_gram_chunked(
    kernel: Callable[[Array, Array, Any], Array], x: Array, y: Array, dt: Any, chunk: int
) -> Array:
    """``kernel``'s cross-Gramian summed over column chunks of ``x`` and ``y`` (T, n)."""
    fn = lambda xc, yc: kernel(xc, yc, dt)  # noqa: E731
    return _sum_over_chunks(fn, fn, (x, y), chunk, dt)


def _cross_gram_cpu(x: Array, y: Array, dt: Any) -> Array:
    return _cross_gram_chunked(_cross_gram_dot, x, y, dt, _chunk_columns(x.shape[0]))


@jax.jit
def leaf_cross_gram(g1: Array, g2: Array) -> Array:
    """``g1.reshape(T, -1) @ g2.reshape(T, -1).T`` (two batches of one stacked leaf).

    Accumulated in the statistics dtype; not symmetric in general. ``g1`` and ``g2`` have
    the same shape (the dtypes may differ).
    """
    t = g1.shape[0]
    dt = stat_dtype()
    axes = rest_axes(g1)
    out_sharding = _replicated_if_explicit(g1)
    if out_sharding is not None:
        if g1.dtype != g2.dtype:
            g1, g2 = g1.astype(dt), g2.astype(dt)
        return jax.lax.dot_general(
            g1,
            g2,
            ((axes, axes), ((), ())),
            precision=_HIGHEST,
            preferred_element_type=dt,
            out_sharding=out_sharding,
        ).astype(dt)
    x, y = g1.reshape(t, -1), g2.reshape(t, -1)
    if x.shape[1] == 0:
        return jnp.zeros((t, t), dt)
    if x.dtype != y.dtype:  # a dot needs one operand dtype; f32 holds bf16/f16 exactly
        x, y = x.astype(dt), y.astype(dt)
    return jax.lax.platform_dependent(
        x,
        y,
        cpu=lambda x, y: _cross_gram_cpu(x, y, dt),
        default=lambda x, y: _cross_gram_dot(x, y, dt),
    )
