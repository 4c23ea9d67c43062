"""The combination ``sum_i w_i g_i``, leaf by leaf, accumulated in f32."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_balance._core._types import Array, PyTree, stat_dtype

_HIGHEST = jax.lax.Precision.HIGHEST


def combine_leaf(w: Array | np.ndarray, g: Array, *, keep_f32: bool = False) -> Array:
    """``sum_i w_i g_i`` for one stacked leaf, accumulated in f32, returned in g's dtype.

    ``w`` is ``(T,)`` (one weight per task, a contraction) or ``g``'s full shape (one
    weight per task and coordinate, as GradDrop's masks). ``keep_f32``: return the f32
    accumulator (the statistics dtype) instead, for a caller that adds more terms.
    """
    g = jnp.asarray(g)
    dt = stat_dtype()
    out_dt = dt if keep_f32 else g.dtype
    if np.ndim(w) > 1:
        return _coordinate_sum(jnp.asarray(w), g).astype(out_dt)
    # A dot over the task axis, not ``jnp.sum(w[:, None] * g, 0)``: XLA's CPU backend runs
    # a reduction over a short leading axis of a long array far slower (21 ms against
    # 0.35 ms for a (2, 1e6) leaf, issue 17's figures).
    out = jax.lax.dot_general(
        jnp.asarray(w).astype(dt),
        g,
        (((0,), (0,)), ((), ())),
        precision=_HIGHEST,
        preferred_element_type=dt,
    )
    return out.astype(out_dt)


def fused_sum(x: Array, axes: tuple[int, ...], flag: Array) -> Array:
    """``sum(x, axes)`` for an ``x`` computed in the program, never written out; NaN where
    ``flag`` (an array of ``x``'s shape, the weights ``x`` is made from) is not finite.

    XLA:CPU hands a plain sum to YNNPACK, whose fusion cannot take most producers (a
    compare, a select), so the summand is first written out in full, and a fresh buffer
    of T x P entries costs its page faults on every call (a (32, 5e5) GradDrop mask: 64
    ms for two sums over it, against 13 ms here; AMD EPYC). A reduce of two operands stays
    XLA's own, with the producers fused in: ``x`` is reduced together with ``flag * 0``,
    whose sum is added so that XLA cannot drop it (a reduce left with one operand goes to
    YNNPACK). ``flag * 0`` rather than ``x * 0``: the cheaper operand (GradDrop at T=32,
    P=1e6: 44 against 57 ms).
    """
    dt = x.dtype
    total, zero = jax.lax.reduce(
        (x, flag.astype(dt) * 0),
        (jnp.zeros((), dt), jnp.zeros((), dt)),
        lambda a, b: (a[0] + b[0], a[1] + b[1]),
        axes,
    )
    return total + zero


# Up to this many tasks the rows are summed term by term: one fused elementwise pass, into
# which XLA also fuses computed weights (GradDrop's masks at T=8) and which reads
# written-out weights (TrimmedMean's) fastest.
_ROWS_MAX_T = 8


def _coordinate_sum(w: Array, g: Array) -> Array:
    """``sum_i w[i] * g[i]`` for ``w`` of ``g``'s shape, accumulated in the statistics dtype.

    Beyond ``_ROWS_MAX_T`` tasks, one reduce over the task axis (:func:`fused_sum`), which
    XLA:CPU runs as its own reduction with the weights' producer fused in, so computed
    weights (GradDrop's masks) are never written out. Measured on a 2-core EPYC with the
    masks computed from (5e5,) arrays, against the floor ``ones @ g``: T=8 0.89 ms (floor
    0.58), T=32 8.3 ms (floor 2.0). ``jnp.sum(w * g, 0)`` goes to YNNPACK, which writes the
    product out first: 20 and 95 ms; the rows summed term by term fuse up to T=8 (0.77 ms), but at
    T=32 XLA writes the (T, P) masks out before slicing them (24 ms, page faults on a
    fresh T x P buffer every call).
    """
    dt = stat_dtype()
    w, g = w.astype(dt), g.astype(dt)
    if g.shape[0] <= _ROWS_MAX_T:
        out = w[0] * g[0]
        for i in range(1, g.shape[0]):
            out = out + w[i] * g[i]
        return out
    return fused_sum(w * g, (0,), w)


def sum_leaf(g: Array, *, keep_f32: bool = False) -> Array:
    """``sum_i g_i`` over the task axis (a task-specific leaf), accumulated in f32."""
    g = jnp.asarray(g)
    return combine_leaf(jnp.ones((g.shape[0],), stat_dtype()), g, keep_f32=keep_f32)


def is_task_vector(weights: Any) -> bool:
    """Whether ``weights`` is one ``(T,)`` array (not a per-leaf pytree).

    A params tree of one leaf has per-coordinate weights that are a single array too:
    those have the leaf's stacked shape, of two or more dimensions.
    """
    return isinstance(weights, jax.Array | np.ndarray) and np.ndim(weights) == 1


def combine(
    updates: PyTree,
    weights: Array | PyTree,
    shared_mask: PyTree,
    *,
    keep_f32: bool = False,
    head_scales: Array | None = None,
) -> PyTree:
    """Weighted sum over the task axis on shared leaves; plain sum on task-specific ones.

    ``weights`` is a ``(T,)`` array, or a pytree with the params' structure holding, per
    statistic leaf, a ``(T,)`` array (per-leaf weights, as in MetaBalance) or an array of
    the leaf's stacked shape (per-coordinate weights), and ``None`` elsewhere (shared
    leaves outside the statistics then get a plain sum). ``keep_f32``: every leaf as its
    f32 accumulator, not cast back to its dtype. ``head_scales``: ``(T,)`` weights of the
    task-specific leaves instead of the plain sum (``Weighting.head_scales``).
    """
    f32 = keep_f32

    def rest(g: Array) -> Array:
        if head_scales is None:
            return sum_leaf(g, keep_f32=f32)
        return combine_leaf(head_scales, g, keep_f32=f32)

    if is_task_vector(weights):
        return jax.tree.map(
            lambda g, m: combine_leaf(weights, g, keep_f32=f32) if m else rest(g),
            updates,
            shared_mask,
        )
    return jax.tree.map(
        lambda g, m, w: (
            combine_leaf(w, g, keep_f32=f32)
            if (m and w is not None)
            else (sum_leaf(g, keep_f32=f32) if m else rest(g))
        ),
        updates,
        shared_mask,
        weights,
        is_leaf=lambda x: x is None,
    )
