"""Diagnostics for logging: how large the task gradients are and how much they conflict."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_balance import _core


class ConflictStats(NamedTuple):
    """What :func:`conflict_stats` returns (arrays only: it crosses ``jit``, logs as is).

    Attributes:
      norms: ``(T,)`` each task's gradient norm :math:`\\|g_i\\|`.
      cosines: ``(T, T)`` cosine similarities :math:`g_i \\cdot g_j / (\\|g_i\\| \\|g_j\\|)`;
        a zero gradient has cosine 0 with every gradient, itself included.
      num_conflicts: the number of task pairs :math:`i < j` whose gradients conflict,
        :math:`g_i \\cdot g_j < 0` (int32).
      min_cosine: the smallest cosine over pairs :math:`i \\ne j` (1 when T = 1): how
        strongly the worst pair conflicts.
    """

    norms: jax.Array
    cosines: jax.Array
    num_conflicts: jax.Array
    min_cosine: jax.Array


def conflict_stats(stacked_grads: Any, shared: _core.SharedMask = None) -> ConflictStats:
    r"""Per-task gradient norms, their cosine matrix and the number of conflicting pairs.

    From the Gramian :math:`G = J J^\top` of the stacked task gradients (one pass over the
    gradients, with the core's kernels, leaf by leaf in float32):

    .. math::

      \|g_i\| = \sqrt{G_{ii}}, \qquad
      \cos_{ij} = \frac{G_{ij}}{\|g_i\|\,\|g_j\|}, \qquad
      \#\{\, i < j : G_{ij} < 0 \,\}.

    Large differences between the norms mean a plain sum is dominated by a few tasks;
    conflicting pairs (negative cosines) are what gradient-surgery methods (PCGrad, MGDA,
    UPGrad, ...) address. Everything is an array computed with fixed shapes, so it runs
    inside a jitted train step and can be returned for logging every N steps.

    Args:
      stacked_grads: the stacked task gradients, leaves ``(T, *param.shape)`` (from
        :func:`optax_balance.value_and_task_grads`).
      shared: which leaves to measure, as the methods' ``shared`` (``None``: all); leave
        the task heads out, since every other task's gradient is zero there.

    Returns:
      A :class:`optax_balance.ConflictStats`: ``norms``, ``cosines``, ``num_conflicts``,
      ``min_cosine``.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> J = {"w": jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]), "b": jnp.ones((2, 1))}
      >>> s = ob.conflict_stats(J, shared={"w": True, "b": False})
      >>> print(np.asarray(s.norms).round(4), np.asarray(s.cosines).round(4).tolist())
      [4.2426 6.1644] [[1.0, -0.8412], [-0.8412, 1.0]]
      >>> int(s.num_conflicts), float(s.min_cosine.round(4))
      (1, -0.8412)

    References:
      Yu et al., `Gradient Surgery for Multi-Task Learning
      <https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020 (conflicting gradients:
      negative cosine similarity).
    """
    t = _core.num_tasks_of(stacked_grads)
    like = _core.unstacked_like(stacked_grads)
    mask = _core.resolve_mask(shared, like, name="shared")
    leaves = [
        jnp.asarray(g) for g, m in zip(jax.tree.leaves(stacked_grads), jax.tree.leaves(mask)) if m
    ]
    if not leaves:
        raise ValueError(
            "conflict_stats: the `shared` mask selects no parameter leaf; mark the leaves "
            "the tasks share True (or pass shared=None)."
        )
    gram = _core.gramian(leaves, t)
    norms = _core.safe_sqrt(jnp.diagonal(gram))
    inv = _core.safe_inverse(norms)
    cosines = jnp.clip(gram * inv[:, None] * inv[None, :], -1.0, 1.0)
    off = ~jnp.eye(t, dtype=bool)
    upper = jnp.triu(jnp.ones((t, t), bool), k=1)
    num_conflicts = jnp.sum((gram < 0) & upper).astype(jnp.int32)
    min_cosine = jnp.min(jnp.where(off, cosines, 1.0))
    return ConflictStats(
        norms=norms, cosines=cosines, num_conflicts=num_conflicts, min_cosine=min_cosine
    )
