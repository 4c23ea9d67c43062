"""Fixed linear scalarisations: the mean, the sum, and constant weights of the losses."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_balance import _core


class ConstantState(NamedTuple):
    """State of :func:`mean`, :func:`sum` and :func:`constant`.

    Attributes:
      weights: ``(T,)`` the fixed weights (1/T for ``mean``, 1 for ``sum``).
    """

    weights: jax.Array


def _fixed(name: str, fill: Any, num_tasks: int | None) -> _core.Weighting:
    """A weighting that returns ``fill(T)`` whatever the losses."""

    def init(t: int) -> ConstantState:
        return ConstantState(weights=jnp.asarray(fill(t), _core.stat_dtype()))

    def weigh(stats: _core.Stats, state: ConstantState) -> tuple[jax.Array, ConstantState]:
        w = jnp.asarray(fill(stats.num_tasks), _core.stat_dtype())
        return w, ConstantState(weights=w)

    return _core.Weighting(init, weigh, needs=("losses",), name=name, num_tasks=num_tasks)


def mean_weighting() -> _core.Weighting:
    r"""The mean's weighting: :math:`w_i = 1/T`, whatever the losses.

    Returns:
      An :class:`optax_balance.Weighting` of the losses; its state is
      :class:`optax_balance.ConstantState`.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> weights, state = ob.weightings.mean()(jnp.array([1.0, 3.0, 5.0, 7.0]))
      >>> weights
      Array([0.25, 0.25, 0.25, 0.25], dtype=float32)

    References:
      torchjd's ``Mean`` scalarizer (`SimplexLab/TorchJD
      <https://github.com/SimplexLab/TorchJD>`_).
    """
    return _fixed("mean", lambda t: np.full((t,), 1.0 / max(t, 1)), None)


def sum_weighting() -> _core.Weighting:
    r"""The sum's weighting: :math:`w_i = 1`, whatever the losses.

    Returns:
      An :class:`optax_balance.Weighting` of the losses; its state is
      :class:`optax_balance.ConstantState`.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> weights, state = ob.weightings.sum()(jnp.array([1.0, 3.0]))
      >>> weights
      Array([1., 1.], dtype=float32)

    References:
      torchjd's ``Sum`` scalarizer (`SimplexLab/TorchJD
      <https://github.com/SimplexLab/TorchJD>`_).
    """
    return _fixed("sum", lambda t: np.ones((t,)), None)


def constant_weighting(weights: Any) -> _core.Weighting:
    r"""Constant weights :math:`w`, whatever the losses.

    Args:
      weights: ``(T,)`` the weights, finite and :math:`\ge 0` with a positive sum; their
        length fixes T.

    Returns:
      An :class:`optax_balance.Weighting` of the losses; its state is
      :class:`optax_balance.ConstantState`.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> weights, state = ob.weightings.constant([1.0, 0.1])(jnp.array([1.0, 3.0]))
      >>> weights
      Array([1. , 0.1], dtype=float32)

    References:
      torchjd's ``Constant`` scalarizer (`SimplexLab/TorchJD
      <https://github.com/SimplexLab/TorchJD>`_).
    """
    vec, t = _core.check_task_vector("weights", weights, nonnegative=True)
    if vec is None:
        raise ValueError("`weights` is required: one non-negative weight per task.")
    return _fixed("constant", lambda _: vec, t)


def mean(
    *,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The mean of the losses: every task weighted :math:`1/T` (the equal-weight baseline).

    .. math::

      \mathcal L = \frac1T \sum_{i=1}^T L_i, \qquad w_i = \frac1T .

    A loss-based method: train with :func:`optax_balance.weighted_loss` and ONE backward
    pass (``update`` then returns that gradient unchanged), or give ``update`` stacked
    per-task gradients (it returns :math:`\sum_i w_i g_i`). Like every loss-based method
    it needs ``task_losses``, although its weights do not depend on them.

    Args:
      shared: which parameter leaves are shared (``None``: all). For stacked gradients
        only: other leaves are summed unweighted (through ``ob.weighted_loss`` every leaf,
        heads included, gets the weighted loss's gradient).
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` (the output is averaged over ``axis_name``) or ``"stats"``.
      num_tasks: T, if known; gives ``init`` a full-shape state.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``task_losses=`` of shape ``(T,)``; its state is :class:`ConstantState`.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> tx = ob.mean(num_tasks=2)
      >>> state = tx.init(jnp.zeros(3))
      >>> losses = jnp.array([1.0, 3.0])
      >>> ob.weighted_loss(tx, losses, state)                   # (1 + 3) / 2
      Array(2., dtype=float32)
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])    # stacked gradients
      >>> d, state = tx.update(J, state, jnp.zeros(3), task_losses=losses)
      >>> d
      Array([1., 1., 1.], dtype=float32)

    References:
      torchjd's ``Mean`` scalarizer (`SimplexLab/TorchJD
      <https://github.com/SimplexLab/TorchJD>`_); the equal-weighting baseline of every
      multi-task benchmark.
    """
    return _core.balance(
        mean_weighting(), shared=shared, axis_name=axis_name, sync=sync, num_tasks=num_tasks
    )


def sum_(
    *,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The sum of the losses: every task weighted 1 (public as ``ob.sum``).

    .. math::

      \mathcal L = \sum_{i=1}^T L_i, \qquad w_i = 1 .

    A loss-based method: train with :func:`optax_balance.weighted_loss` and ONE backward
    pass, or give ``update`` stacked per-task gradients (it returns :math:`\sum_i g_i`).

    Args:
      shared: which parameter leaves are shared (``None``: all); for stacked gradients.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` (the output is averaged over ``axis_name``) or ``"stats"``.
      num_tasks: T, if known; gives ``init`` a full-shape state.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``task_losses=`` of shape ``(T,)``; its state is :class:`ConstantState`.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> tx = ob.sum(num_tasks=2)
      >>> ob.weighted_loss(tx, jnp.array([1.0, 3.0]), tx.init(jnp.zeros(3)))
      Array(4., dtype=float32)

    References:
      torchjd's ``Sum`` scalarizer (`SimplexLab/TorchJD
      <https://github.com/SimplexLab/TorchJD>`_).
    """
    return _core.balance(
        sum_weighting(), shared=shared, axis_name=axis_name, sync=sync, num_tasks=num_tasks
    )


def constant(
    weights: Any,
    *,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Constant task weights: :math:`\mathcal L = \sum_i w_i L_i` with a fixed :math:`w`.

    A loss-based method: train with :func:`optax_balance.weighted_loss` and ONE backward
    pass, or give ``update`` stacked per-task gradients (it returns
    :math:`\sum_i w_i g_i`).

    Args:
      weights: ``(T,)`` the weights, finite and :math:`\ge 0` with a positive sum (under
        ``optax.inject_hyperparams``, list it in ``static_args``); their length fixes T.
      shared: which parameter leaves are shared (``None``: all); for stacked gradients.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` (the output is averaged over ``axis_name``) or ``"stats"``.
      num_tasks: T, if given: must equal ``len(weights)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``task_losses=`` of shape ``(T,)``; its state is :class:`ConstantState`.

    Raises:
      ValueError: at construction for negative, non-finite or all-zero weights.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> tx = ob.constant([1.0, 0.1])
      >>> ob.weighted_loss(tx, jnp.array([1.0, 30.0]), tx.init(jnp.zeros(3)))
      Array(4., dtype=float32)

    References:
      torchjd's ``Constant`` scalarizer (`SimplexLab/TorchJD
      <https://github.com/SimplexLab/TorchJD>`_).
    """
    return _core.balance(
        constant_weighting(weights),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
