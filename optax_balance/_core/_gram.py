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
import numpy as np

from optax_balance._core._types import Array, stat_dtype

_HIGHEST = jax.lax.Precision.HIGHEST


def rest_axes(g: Array, start: int = 1) -> tuple[int, ...]:
    """The axes of ``g`` from ``start`` on (the parameter axes of a stacked leaf)."""
    return tuple(range(start, g.ndim))


def leaf_sq_norms(g: Array) -> Array:
    """Per-task squared norms ``(T,)`` of one stacked leaf, in the statistics dtype."""
    f = g.astype(stat_dtype())
    return jnp.sum(f * f, axis=rest_axes(g))


def leaf_dots(g1: Array, g2: Array) -> Array:
    """Per-task inner products ``(T,)`` of two stacked leaves of one shape, in f32."""
    dt = stat_dtype()
    return jnp.sum(g1.astype(dt) * g2.astype(dt), axis=rest_axes(g1))


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
# vendor GEMM splits the long contraction). On CPU, XLA sends a (T, n) x (n, T) dot with
# a tiny output and a long contraction to YNNPACK, which packs the transposed operand and
# runs on one thread: 6-17x one pass over the gradients at n = 1e6, growing faster than
# n. The CPU form (benchmarks/gram_kernels.py times the alternatives, RESULTS.md
# section 5) walks the leaf in column chunks in a fori_loop and contracts each chunk:
#   * by "pairs": all T(T+1)/2 row products in one variadic reduce over (c / blk, blk)
#     blocks, one fused multi-threaded pass whose (scalar) work grows as T^2. It wins for
#     T <= 2 at any size and up to T = _PAIR_MAX_T on leaves of at least _PAIR_MIN_N
#     entries per task; below that its fixed cost loses to the dot, above T ~ 12 its
#     accumulators spill.
#   * by the dot otherwise: per chunk, YNNPACK's packing stays in cache (linear in n,
#     2x faster than one dot at n = 1e6, T >= 16).
# The chunks matter beyond cache: inside a train step the stacked gradients often come
# out of the backward pass in a transposed physical layout (a Dense kernel's gradient is
# computed as (T * out, in)). XLA then fuses that relayout into the Gramian's reads; the
# chunk's dynamic_slice pays it once per element, where a whole-leaf reduce pays it in
# each of its T(T+1)/2 products (benchmarks/run.py's train step at T=8: 1.7x the
# equal-weight step with the whole-leaf reduce, 1.1-1.2x with chunks).
# Both accumulate in the statistics dtype and agree with a float64 Gramian to ~1e-7.
_PAIR_MAX_T = 12
_PAIR_MIN_N = 65536
_PAIR_CHUNK = 65536
_CHUNK = 16384


def _block_size(n: int) -> int:
    """The largest divisor of ``n`` in 16..1024, or 256 (the remainder is then a tail).

    Longer rows amortise the reduce's per-row work (T=8, 65536 columns: 4.6 ms per 1e6
    entries at 64, 3.7 at 1024); each row is summed in order, so rows much longer than
    1024 lose float32 accuracy (4e-6 relative at 3750 on bf16 inputs).
    """
    for b in range(min(n, 1024), 15, -1):
        if n % b == 0:
            return b
    return 256


def _pair_index(t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    iu, ju = np.triu_indices(t)
    index = np.zeros((t, t), np.int32)
    index[iu, ju] = index[ju, iu] = np.arange(iu.size)
    return iu, ju, index


def _pair_sums(x: Array, dt: Any) -> Array:
    """``sum(x[i] * x[j])`` for every pair ``i <= j`` of rows of ``x`` (T, m, blk)."""
    iu, ju, _ = _pair_index(x.shape[0])
    rows = [x[i].astype(dt) for i in range(x.shape[0])]
    products = tuple(rows[i] * rows[j] for i, j in zip(iu, ju))
    zeros = tuple(jnp.zeros((), dt) for _ in products)
    sums = jax.lax.reduce(
        products, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)), (products[0].ndim - 1,)
    )
    return jnp.sum(jnp.stack(sums), axis=1)  # one small reduction, not T(T+1)/2 of them


def _gram_pairs(x: Array, dt: Any) -> Array:
    """The Gramian of ``x`` (T, n) from one variadic reduction over its row products."""
    t, n = x.shape
    blk = _block_size(n)
    m = n // blk
    sums = jnp.zeros((t * (t + 1) // 2,), dt)
    if m:
        sums = sums + _pair_sums(x[:, : m * blk].reshape(t, m, blk), dt)
    if n > m * blk:
        sums = sums + _pair_sums(x[:, m * blk :].reshape(t, 1, n - m * blk), dt)
    return sums[_pair_index(t)[2]]


def _gram_dot(x: Array, dt: Any) -> Array:
    """The Gramian of ``x`` (T, n) as one ``dot_general``."""
    return jax.lax.dot_general(
        x, x, (((1,), (1,)), ((), ())), precision=_HIGHEST, preferred_element_type=dt
    ).astype(dt)


def _gram_chunked(kernel: Callable[[Array, Any], Array], x: Array, dt: Any, chunk: int) -> Array:
    """``kernel``'s Gramian summed over column chunks of ``x`` (T, n) in a loop."""
    t, n = x.shape
    m = n // chunk
    if m < 2:
        return kernel(x, dt)

    def body(i: Array, acc: Array) -> Array:
        return acc + kernel(jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1), dt)

    acc = jax.lax.fori_loop(0, m, body, jnp.zeros((t, t), dt))
    if n > m * chunk:
        acc = acc + kernel(x[:, m * chunk :], dt)
    return acc


def _gram_cpu(x: Array, dt: Any) -> Array:
    t, n = x.shape
    if t <= 2 or (t <= _PAIR_MAX_T and n >= _PAIR_MIN_N):
        return _gram_chunked(_gram_pairs, x, dt, _PAIR_CHUNK)
    return _gram_chunked(_gram_dot, x, dt, _CHUNK)


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


# The cross-Gramian ``J1 J2^T`` of two batches' stacked gradients of one leaf (SDMGrad,
# MoDo: an unbiased estimate of the Gramian of the expected gradients). The same kernels
# as the Gramian, on two operands: on CPU a chunked loop of "pairs" (all T^2 row products
# in one variadic reduce) up to _CROSS_PAIR_MAX_T tasks, of dots beyond (at T = 8 the two
# tie on a (8, 1e6) leaf; at T = 12 the chunked dot is ~9x faster, the 144 accumulators of
# the pairs spill; rough figures from the shared 2-core CPU);
# elsewhere one dot_general.
_CROSS_PAIR_MAX_T = 6


def _cross_pairs(x: Array, y: Array, dt: Any) -> Array:
    """``sum(x[i] * y[j])`` for every pair of rows, x and y (T, m, blk) -> (T, T)."""
    t = x.shape[0]
    xs = [x[i].astype(dt) for i in range(t)]
    ys = [y[j].astype(dt) for j in range(t)]
    products = tuple(xs[i] * ys[j] for i in range(t) for j in range(t))
    zeros = tuple(jnp.zeros((), dt) for _ in products)
    sums = jax.lax.reduce(
        products, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)), (products[0].ndim - 1,)
    )
    return jnp.sum(jnp.stack(sums), axis=1).reshape(t, t)


def _cross_gram_pairs(x: Array, y: Array, dt: Any) -> Array:
    t, n = x.shape
    blk = _block_size(n)
    m = n // blk
    out = jnp.zeros((t, t), dt)
    if m:
        out = out + _cross_pairs(
            x[:, : m * blk].reshape(t, m, blk), y[:, : m * blk].reshape(t, m, blk), dt
        )
    if n > m * blk:
        rest = n - m * blk
        out = out + _cross_pairs(
            x[:, m * blk :].reshape(t, 1, rest), y[:, m * blk :].reshape(t, 1, rest), dt
        )
    return out


def _cross_gram_dot(x: Array, y: Array, dt: Any) -> Array:
    return jax.lax.dot_general(
        x, y, (((1,), (1,)), ((), ())), precision=_HIGHEST, preferred_element_type=dt
    ).astype(dt)


def _cross_gram_chunked(
    kernel: Callable[[Array, Array, Any], Array], x: Array, y: Array, dt: Any, chunk: int
) -> Array:
    """``kernel``'s cross-Gramian summed over column chunks of ``x`` and ``y`` (T, n)."""
    t, n = x.shape
    m = n // chunk
    if m < 2:
        return kernel(x, y, dt)

    def body(i: Array, acc: Array) -> Array:
        xi = jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)
        yi = jax.lax.dynamic_slice_in_dim(y, i * chunk, chunk, axis=1)
        return acc + kernel(xi, yi, dt)

    acc = jax.lax.fori_loop(0, m, body, jnp.zeros((t, t), dt))
    if n > m * chunk:
        acc = acc + kernel(x[:, m * chunk :], y[:, m * chunk :], dt)
    return acc


def _cross_gram_cpu(x: Array, y: Array, dt: Any) -> Array:
    t, n = x.shape
    if t <= 2 or (t <= _CROSS_PAIR_MAX_T and n >= _PAIR_MIN_N):
        return _cross_gram_chunked(_cross_gram_pairs, x, y, dt, _PAIR_CHUNK)
    return _cross_gram_chunked(_cross_gram_dot, x, y, dt, _CHUNK)


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
