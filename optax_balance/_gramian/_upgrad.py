"""UPGrad: project every task gradient onto the dual cone of all of them, and average."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core
from optax_balance._solvers import _qp


class UPGradState(NamedTuple):
    """State of :func:`upgrad`.

    Attributes:
      weights: ``(T,)`` the weights applied in the last update,
        ``w = sum_i v^(i)`` (see :func:`upgrad`).
      iterations: active-set iterations of the last update (the largest count over the T
        projections, which are solved side by side).
    """

    weights: jax.Array
    iterations: jax.Array


def upgrad_weighting(
    *,
    pref_vector: Any = None,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
) -> _core.Weighting:
    r"""UPGrad's weighting: the sum of the weights of each task's dual-cone projection.

    :math:`w = \sum_i v^{(i)}`, :math:`v^{(i)} = \arg\min_{v \ge u_i e_i} v^\top \tilde G v`
    on the trace-normalised, regularised Gramian :math:`\tilde G` (see
    :func:`optax_balance.upgrad`).

    Args:
      pref_vector: ``(T,)`` weights :math:`u` of the combination whose terms are
        projected; ``None`` means :math:`1/T` each. Giving it fixes T.
      norm_eps: the Gramian is treated as zero when its trace is below this (absolute).
      reg_eps: ridge added to the trace-normalised Gramian.

    Returns:
      An :class:`optax_balance.Weighting` of the Gramian; its state is
      :class:`optax_balance.UPGradState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> weights, state = ob.weightings.upgrad()(J @ J.T)    # torchjd's UPGradWeighting
      >>> print(np.asarray(weights).round(4))
      [1.1109 0.7894]

    References:
      Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
      <https://arxiv.org/abs/2406.16232>`_, 2024.
    """
    _core.check_range("norm_eps", norm_eps, low=0.0)
    _core.check_range("reg_eps", reg_eps, low=0.0)
    pref, t_cfg = _core.check_task_vector("pref_vector", pref_vector)

    def init(t: int) -> UPGradState:
        w = jnp.full((t,), 1.0 / max(t, 1), _core.stat_dtype())
        return UPGradState(weights=w, iterations=jnp.zeros((), jnp.int32))

    def weigh(stats: _core.Stats, state: UPGradState) -> tuple[jax.Array, UPGradState]:
        assert stats.gram is not None
        t = stats.num_tasks
        gram = _qp.regularize(_qp.normalize(stats.gram, norm_eps), reg_eps)
        u = _qp.pref_weights(pref, t, gram.dtype)
        sol = _qp.project_to_dual_cone(jnp.diag(u), gram, max_iters=_qp.default_max_iters(t))
        w = jnp.sum(sol.z, axis=0)
        return w, UPGradState(weights=w, iterations=sol.iterations)

    return _core.Weighting(
        init,
        weigh,
        needs=("gram",),
        name="upgrad",
        num_tasks=t_cfg,
    )


def upgrad(
    *,
    pref_vector: Any = None,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""UPGrad: the average of every task gradient projected onto the dual cone of all of them.

    With task gradients :math:`g_1, \dots, g_T` (the rows of :math:`J`), the dual cone
    :math:`C = \{x : g_j \cdot x \ge 0 \ \forall j\}` holds the directions that conflict
    with no task. UPGrad projects each weighted gradient :math:`u_i g_i` onto :math:`C` and
    sums the projections. The projection of :math:`J^\top a` onto :math:`C` is
    :math:`J^\top v` with :math:`v = \arg\min_{v \ge a} v^\top G v` (Quinton & Rey 2024,
    Proposition 1), so the whole method is a weighting of the Gramian :math:`G = J J^\top`:

    .. math::

      v^{(i)} = \arg\min_{v \ge u_i e_i} v^\top \tilde G v, \qquad
      w = \sum_i v^{(i)}, \qquad d = \sum_j w_j g_j ,

    where :math:`u` is ``pref_vector`` (default :math:`1/T` each, i.e. the mean of the
    projections) and, following torchjd, :math:`\tilde G = G / \mathrm{tr}(G) +`
    ``reg_eps`` :math:`I` (the Gramian of :math:`J/\|J\|_F`, made positive definite),
    with :math:`\tilde G =` ``reg_eps`` :math:`I` when :math:`\mathrm{tr}(G) <`
    ``norm_eps``. ``norm_eps`` is absolute: if the squared Frobenius norm of the
    gradients is below it, the output is the plain weighted combination
    :math:`\sum_i u_i g_i`. Every :math:`J^\top v^{(i)}` lies in :math:`C` up to the
    regularisation, so :math:`g_j \cdot d \ge 0` for every task (non-conflicting), and
    :math:`d = 0` only at a Pareto-stationary point.

    Solver. Each of the T projections is a non-negative QP in :math:`z = v - u_i e_i`,
    solved exactly by a primal active-set method (one linear solve per iteration, ending
    when the KKT conditions hold to the rounding level of the gradient), vmapped over the T
    problems inside one ``jax.lax.while_loop``; no host round-trip (torchjd calls
    quadprog on the host).

    Args:
      pref_vector: ``(T,)`` weights :math:`u` of the combination whose terms are
        projected; ``None`` means :math:`1/T` each. Giving it fixes T.
      norm_eps: the Gramian is treated as zero when its trace is below this (absolute).
      reg_eps: ridge added to the trace-normalised Gramian (>= 0; 0 risks a singular QP).
      shared: which parameter leaves are shared (``None``: all); a pytree of bools, a
        prefix of one, or a callable ``params -> pytree``. Other leaves are summed.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` (exact: average the stacked gradients over ``axis_name``) or
        ``"stats"`` (average only the Gramian).
      num_tasks: T, if known; gives ``init`` a full-shape state.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes stacked
      gradients (leading task axis) and returns :math:`d`; its state is
      :class:`UPGradState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> tx = ob.upgrad()
      >>> d, state = tx.update(J, tx.init(jnp.zeros(3)))
      >>> print(np.asarray(d).round(4))
      [0.2929 1.9004 1.9004]
      >>> print(np.asarray(state.weights).round(4))
      [1.1109 0.7894]

    References:
      Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
      <https://arxiv.org/abs/2406.16232>`_, 2024.
      Lawson & Hanson, *Solving Least Squares Problems*, 1974 (active-set method).
    """
    return _core.balance(
        upgrad_weighting(pref_vector=pref_vector, norm_eps=norm_eps, reg_eps=reg_eps),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
