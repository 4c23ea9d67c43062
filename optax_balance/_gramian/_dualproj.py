"""DualProj: project the weighted mean of the task gradients onto their dual cone."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core
from optax_balance._solvers import _qp


class DualProjState(NamedTuple):
    """State of :func:`dualproj`.

    Attributes:
      weights: ``(T,)`` the weights :math:`v` applied in the last update.
      iterations: active-set iterations of the last update.
    """

    weights: jax.Array
    iterations: jax.Array


def dualproj_weighting(
    *,
    pref_vector: Any = None,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
) -> _core.Weighting:
    r"""DualProj's weighting: the weights of the mean projected onto the dual cone.

    :math:`w = \arg\min_{v \ge u} v^\top \tilde G v` on the trace-normalised, regularised
    Gramian (see :func:`optax_balance.dualproj`).

    Args:
      pref_vector: ``(T,)`` weights :math:`u` of the combination to project; ``None``
        means :math:`1/T` each. Giving it fixes T.
      norm_eps: the Gramian is treated as zero when its trace is below this (absolute).
      reg_eps: ridge added to the trace-normalised Gramian.

    Returns:
      An :class:`optax_balance.Weighting` of the Gramian; its state is
      :class:`optax_balance.DualProjState`.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> weights, state = ob.weightings.dualproj()(J @ J.T)
      >>> weights.round(4)
      Array([0.6109, 0.5   ], dtype=float32)

    References:
      Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
      <https://arxiv.org/abs/2406.16232>`_, 2024.
    """
    _core.check_range("norm_eps", norm_eps, low=0.0)
    _core.check_range("reg_eps", reg_eps, low=0.0)
    pref, t_cfg = _core.check_task_vector("pref_vector", pref_vector)

    def init(t: int) -> DualProjState:
        w = jnp.full((t,), 1.0 / max(t, 1), _core.stat_dtype())
        return DualProjState(weights=w, iterations=jnp.zeros((), jnp.int32))

    def weigh(stats: _core.Stats, state: DualProjState) -> tuple[jax.Array, DualProjState]:
        assert stats.gram is not None
        t = stats.num_tasks
        gram = _qp.regularize(_qp.normalize(stats.gram, norm_eps), reg_eps)
        u = _qp.pref_weights(pref, t, gram.dtype)
        sol = _qp.project_to_dual_cone(u, gram, max_iters=_qp.default_max_iters(t))
        return sol.z, DualProjState(weights=sol.z, iterations=sol.iterations)

    return _core.Weighting(
        init,
        weigh,
        needs=("gram",),
        name="dualproj",
        num_tasks=t_cfg,
    )


def dualproj(
    *,
    pref_vector: Any = None,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""DualProj: the weighted mean of the task gradients, projected onto their dual cone.

    With task gradients :math:`g_i` (the rows of :math:`J`) and the dual cone
    :math:`C = \{x : g_j \cdot x \ge 0 \ \forall j\}`, DualProj returns the Euclidean
    projection of :math:`J^\top u` onto :math:`C` (the projection of Gradient Episodic
    Memory, Lopez-Paz & Ranzato 2017, Eq. 11, applied to a combination of all tasks).
    By Quinton & Rey 2024, Proposition 1, that projection is :math:`J^\top v` with

    .. math::

      v = \arg\min_{v \ge u} v^\top \tilde G v , \qquad d = \sum_j v_j g_j ,

    where :math:`u` is ``pref_vector`` (default :math:`1/T` each: the mean) and, as in
    torchjd, :math:`\tilde G = G / \mathrm{tr}(G) +` ``reg_eps`` :math:`I`, or
    ``reg_eps`` :math:`I` when :math:`\mathrm{tr}(G) <` ``norm_eps`` (absolute; the
    output is then :math:`J^\top u`). :math:`d` conflicts with no task:
    :math:`g_j \cdot d \ge 0` up to the regularisation.

    Solver. A non-negative QP in :math:`z = v - u`, solved exactly by a primal
    active-set method in ``jax.lax.while_loop`` (one linear solve per iteration, KKT
    conditions met to the rounding level of the gradient); no host round-trip.

    Args:
      pref_vector: ``(T,)`` weights :math:`u` of the combination to project; ``None``
        means :math:`1/T` each. Giving it fixes T.
      norm_eps: the Gramian is treated as zero when its trace is below this (absolute).
      reg_eps: ridge added to the trace-normalised Gramian (>= 0).
      shared: which parameter leaves are shared (``None``: all); a pytree of bools, a
        prefix of one, or a callable ``params -> pytree``. Other leaves are summed.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` (exact: average the stacked gradients over ``axis_name``) or
        ``"stats"`` (average only the Gramian).
      num_tasks: T, if known; gives ``init`` a full-shape state.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes stacked
      gradients (leading task axis) and returns :math:`d`; its state is
      :class:`DualProjState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> tx = ob.dualproj()
      >>> d, state = tx.update(J, tx.init(jnp.zeros(3)))
      >>> print(np.asarray(d).round(4))
      [0.5563 1.1109 1.1109]
      >>> print(np.asarray(state.weights).round(4))
      [0.6109 0.5   ]

    References:
      Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
      <https://arxiv.org/abs/2406.16232>`_, 2024.
      Lopez-Paz & Ranzato, `Gradient Episodic Memory for Continual Learning
      <https://arxiv.org/abs/1706.08840>`_, NeurIPS 2017.
    """
    return _core.balance(
        dualproj_weighting(pref_vector=pref_vector, norm_eps=norm_eps, reg_eps=reg_eps),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
