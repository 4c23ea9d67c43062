"""MoDo: task weights stepped on the cross-Gramian of two independent mini-batches."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import projections

from optax_balance import _core


class MoDoState(NamedTuple):
    r"""State of :func:`modo`.

    Attributes:
      weights: ``(T,)`` the task weights :math:`\lambda_{t+1}` on the simplex, the ones
        the last update applied and the next one starts from (:math:`1/T` at ``init``).
    """

    weights: jax.Array


def modo_weights(cross_gram: jax.Array, lam: jax.Array, gamma: Any, rho: Any) -> jax.Array:
    r"""One MoDo step: :math:`\Pi_\Delta(\lambda - \gamma (A \lambda + \rho \lambda))`.

    :math:`\Pi_\Delta` is the Euclidean projection onto the probability simplex and
    :math:`A = J_1 J_2^\top` the cross-Gramian.
    """
    step = lam - gamma * (cross_gram @ lam + rho * lam)
    return projections.projection_simplex(step).astype(lam.dtype)


def modo_weighting(*, gamma: float = 0.1, rho: float = 0.1) -> _core.Weighting:
    r"""MoDo's weighting: one projected gradient step on the task weights per update.

    :math:`\lambda_{t+1} = \Pi_\Delta\big(\lambda_t - \gamma (A \lambda_t + \rho
    \lambda_t)\big)` with :math:`A = J_1 J_2^\top` the cross-Gramian of two independent
    mini-batches (see :func:`optax_balance.modo`). Called directly on a ``(T, T)`` array,
    it reads it as :math:`A`.

    Args:
      gamma: :math:`\gamma > 0`, the weights' step size.
      rho: :math:`\rho \ge 0`, the :math:`\ell_2` regularisation of the weights.

    Returns:
      An :class:`optax_balance.Weighting` of the cross-Gramian; its state is
      :class:`optax_balance.MoDoState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> A = jnp.diag(jnp.array([1.0, 0.25, 0.0]))   # J1 @ J2.T
      >>> weights, state = ob.weightings.modo(gamma=1.0, rho=0.0)(A)
      >>> print(np.asarray(weights).round(4))      # Pi([0, 1/4, 1/3]): + 5/36 each
      [0.1389 0.3889 0.4722]

    References:
      Chen, Fernando, Ying, Chen, `Three-Way Trade-Off in Multi-Objective Learning:
      Optimization, Generalization and Conflict-Avoidance
      <https://www.jmlr.org/papers/volume25/23-1287/23-1287.pdf>`_, JMLR 2024.
    """
    _core.check_range("gamma", gamma, low=0.0, low_inclusive=False)
    _core.check_range("rho", rho, low=0.0)

    def init(t: int) -> MoDoState:
        return MoDoState(weights=jnp.full((t,), 1.0 / max(t, 1), _core.stat_dtype()))

    def weigh(stats: _core.Stats, state: MoDoState) -> tuple[jax.Array, MoDoState]:
        assert stats.cross_gram is not None
        lam = modo_weights(stats.cross_gram, state.weights, gamma, rho)
        return lam, MoDoState(weights=lam)

    return _core.Weighting(init, weigh, needs=("cross_gram",), name="modo")


def modo(
    *,
    gamma: float = 0.1,
    rho: float = 0.1,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""MoDo: multi-objective gradient with double sampling (two independent mini-batches).

    MoDo (Chen et al., JMLR 2024) looks for MGDA's min-norm weights
    :math:`\min_{\lambda \in \Delta} \tfrac12\|\nabla F\, \lambda\|^2` by one stochastic
    projected gradient step per update. The gradient of that objective,
    :math:`\nabla F^\top \nabla F \lambda`, is estimated without bias by the cross-Gramian
    of two *independent* mini-batches, :math:`A = J_1 J_2^\top` (a one-batch Gramian
    :math:`J_1 J_1^\top` overestimates it by the batch noise and breaks the method's
    guarantee):

    .. math::

      \lambda_{t+1} = \Pi_\Delta\big(\lambda_t - \gamma\,(A \lambda_t + \rho\,
      \lambda_t)\big), \qquad
      d = \sum_i \lambda_{t+1,i}\, \tfrac12\big(g_i^{(1)} + g_i^{(2)}\big),

    with :math:`\Pi_\Delta` the Euclidean projection onto the probability simplex and
    :math:`\lambda_0 = 1/T`. As torchjd 0.18's ``MoDoWeighting`` (names and defaults;
    LibMTL's ``MoDo_gamma`` defaults to 1e-3): the direction is the weighted mean of both
    batches, the gradient of the weighted loss on every sample drawn (eq. 2.9b of the
    paper, torchjd's two-batch example). LibMTL and the authors' ``three_grads`` option
    combine a third batch instead; that variant is the weighting
    (:func:`optax_balance.weightings.modo` on :math:`J_1 J_2^\top`) with the weights
    applied to the third batch's gradients by the caller.

    The second batch's stacked gradients are the keyword ``task_grads2`` of ``update``
    (same structure and shapes as the first; a ``ValueError`` says so if missing).
    Task-specific leaves get the mean over batches of :math:`\sum_i g_i`. A step with a
    non-finite cross-Gramian keeps :math:`\lambda_t` and combines with it.

    Args:
      gamma: :math:`\gamma > 0`, the step size of the weights (torchjd's default 0.1).
      rho: :math:`\rho \ge 0`, the :math:`\ell_2` regularisation of the weights.
      shared: which parameter leaves are shared (``None``: all); other leaves are summed
        over the task axis, unweighted.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` (exact: average both batches' stacked gradients over
        ``axis_name``) or ``"stats"`` (average only the cross-Gramian, still unbiased).
      num_tasks: T, if known; gives ``init`` a full-shape state.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``task_grads2=``; its state is :class:`MoDoState`.

    Raises:
      ValueError: for ``gamma <= 0`` or ``rho < 0``; at ``update`` when ``task_grads2`` is
        missing or does not match the first batch.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> tx = ob.modo(gamma=1.0, rho=0.0)
      >>> j1 = jnp.array([[1.0, 0.0], [0.0, 0.5]])         # batch 1: (T, P)
      >>> j2 = jnp.array([[1.0, 0.0], [0.0, 0.5]])         # batch 2
      >>> d, state = tx.update(j1, tx.init(jnp.zeros(2)), task_grads2=j2)
      >>> print(np.asarray(state.weights).round(4))      # Pi([0.5, 0.5] - [0.5, 0.125])
      [0.3125 0.6875]
      >>> print(np.asarray(d).round(4))
      [0.3125 0.3438]

    References:
      Chen, Fernando, Ying, Chen, `Three-Way Trade-Off in Multi-Objective Learning:
      Optimization, Generalization and Conflict-Avoidance
      <https://www.jmlr.org/papers/volume25/23-1287/23-1287.pdf>`_, JMLR 2024;
      torchjd ``MoDoWeighting``; LibMTL ``MoDo``.
    """
    return _core.balance(
        modo_weighting(gamma=gamma, rho=rho),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
