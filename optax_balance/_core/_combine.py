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


# Per-coordinate weights: up to this many tasks the sum over the task axis is written out
# term by term (one fused elementwise pass); beyond, a fori_loop over the tasks.
_UNROLL_MAX_T = 32


def _coordinate_sum(w: Array, g: Array) -> Array:
    """``sum_i w[i] * g[i]`` for ``w`` of ``g``'s shape, accumulated in the statistics dtype.

    Row by row, not ``jnp.sum(w * g, axis=0)``: XLA's CPU backend runs that reduction over
    a short leading axis ~30x slower than the elementwise sum of the T rows (233 ms against
    7.7 ms for T=8, P=1e6 on a 2-core EPYC; issue 15, GradDrop's masks).
    """
    dt = stat_dtype()

    def term(i: Any) -> Array:
        return w[i].astype(dt) * g[i].astype(dt)

    t = g.shape[0]
    if t <= _UNROLL_MAX_T:
        out = term(0)
        for i in range(1, t):
            out = out + term(i)
        return out
    return jax.lax.fori_loop(1, t, lambda i, o: o + term(i), term(0))


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
