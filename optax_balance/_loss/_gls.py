"""GLS: the geometric mean of the losses."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core


class GLSState(NamedTuple):
    r"""State of :func:`gls`.

    Attributes:
      weights: ``(T,)`` the weights of the last update,
        :math:`\partial \bar L / \partial L_i = \bar L / (T L_i)` (initially 1/T, their
        value at equal losses).
    """

    weights: jax.Array


def gls_weights(losses: jax.Array) -> jax.Array:
    r"""The geometric mean's gradient :math:`\bar L / (T L_i)`; NaN unless every :math:`L_i > 0`.

    Computed as :math:`\exp(\overline{\log L} - \log L_i) / T`, which neither overflows
    nor underflows where the product of the losses would.
    """
    pos = losses > 0
    logs = jnp.log(jnp.where(pos, losses, 1.0))
    w = jnp.exp(jnp.mean(logs) - logs) / losses.shape[0]
    return jnp.where(jnp.all(pos), w, jnp.nan)


def gls_weighting() -> _core.Weighting:
    r"""GLS's weighting: :math:`w_i = \bar L / (T L_i)`, :math:`\bar L = (\prod_j L_j)^{1/T}`.

    Needs every :math:`L_i > 0`; otherwise the weights are NaN, which the transformation's
    guard replaces by the previous ones (see :func:`optax_balance.gls`).

    Returns:
      An :class:`optax_balance.Weighting` of the losses; its state is
      :class:`optax_balance.GLSState`.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> weights, state = ob.weightings.gls()(jnp.array([1.0, 4.0]))
      >>> weights                                    # GM = 2: [2 / 2, 2 / 8]
      Array([1.  , 0.25], dtype=float32)

    References:
      Chennupati, Sistu, Yogamani & Rawashdeh, `MultiNet++: Multi-Stream Feature
      Aggregation and Geometric Loss Strategy for Multi-Task Learning
      <https://arxiv.org/abs/1904.08492>`_, CVPR Workshops 2019.
    """

    def init(t: int) -> GLSState:
        return GLSState(weights=jnp.full((t,), 1.0 / max(t, 1), _core.stat_dtype()))

    def weigh(stats: _core.Stats, state: GLSState) -> tuple[jax.Array, GLSState]:
        assert stats.losses is not None
        w = gls_weights(stats.losses)
        return w, GLSState(weights=w)

    return _core.Weighting(init, weigh, needs=("losses",), name="gls")


def gls(
    *,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Geometric loss strategy (GLS): minimise the geometric mean of the losses.

    .. math::

      \bar L = \Big(\prod_{i=1}^T L_i\Big)^{1/T}, \qquad
      \nabla \bar L = \sum_i w_i \nabla L_i, \quad w_i = \frac{\bar L}{T L_i} ,

    so each task is weighted by the inverse of its loss (times a common factor): the
    geometric mean is invariant to rescaling any one loss, and a task whose loss is
    small is weighted up. Equivalently, :math:`\log \bar L` is the mean of the log
    losses. As torchjd's ``GeometricMean`` and LibMTL's ``GLS``.

    A loss-based method: train with :func:`optax_balance.weighted_loss` and ONE backward
    pass (its value is :math:`\sum_i w_i L_i = \bar L`), or give ``update`` stacked
    per-task gradients (it returns :math:`\sum_i w_i g_i`).

    Losses it cannot take: the geometric mean needs every :math:`L_i > 0` (its gradient
    is infinite at a zero loss and undefined below). A step with a loss
    :math:`\le 0` or non-finite is treated as a non-finite step: the weights are the
    previous step's (``state.weights``, 1/T before any valid step), in ``update`` and in
    ``weighted_loss`` alike, and the state is kept.

    Args:
      shared: which parameter leaves are shared (``None``: all). For stacked gradients
        only: other leaves are summed unweighted.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``
        (the losses are averaged over it).
      sync: ``"grads"`` (the output is averaged over ``axis_name``) or ``"stats"``.
      num_tasks: T, if known; gives ``init`` a full-shape state.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``task_losses=`` of shape ``(T,)``; its state is :class:`GLSState`.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> tx = ob.gls(num_tasks=2)
      >>> ob.weighted_loss(tx, jnp.array([1.0, 4.0]), tx.init(jnp.zeros(3)))   # sqrt(1 * 4)
      Array(2., dtype=float32)

    References:
      Chennupati, Sistu, Yogamani & Rawashdeh, `MultiNet++: Multi-Stream Feature
      Aggregation and Geometric Loss Strategy for Multi-Task Learning
      <https://arxiv.org/abs/1904.08492>`_, CVPR Workshops 2019.
    """
    return _core.balance(
        gls_weighting(), shared=shared, axis_name=axis_name, sync=sync, num_tasks=num_tasks
    )
