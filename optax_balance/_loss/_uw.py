"""Uncertainty weighting: learned log-variances weigh each task's loss."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core
from optax_balance._loss import _learned


class UWState(NamedTuple):
    r"""State of :func:`uw`.

    Attributes:
      weights: ``(T,)`` the weights of the last update, :math:`\tfrac12 e^{-s_i(t)}`.
      log_vars: ``(T,)`` the learned log-variances :math:`s(t+1)`, which the next update
        weighs with.
      weight_opt_state: the state of ``weight_optimizer`` over ``log_vars``.
    """

    weights: jax.Array
    log_vars: jax.Array
    weight_opt_state: optax.OptState


def uw_weighting(
    num_tasks: int,
    *,
    weight_optimizer: optax.GradientTransformation | None = None,
    init: float = 0.0,
) -> _core.Weighting:
    r"""UW's weighting: :math:`w_i = \tfrac12 e^{-s_i}`, then a step of :math:`s`.

    The step goes down :math:`\partial_{s_i} = \tfrac12 - \tfrac12 e^{-s_i} L_i`, the
    gradient of :math:`\sum_i \tfrac12 e^{-s_i} L_i + \tfrac12 s_i` (see
    :func:`optax_balance.uw`).

    Args:
      num_tasks: T.
      weight_optimizer: an optax transformation for :math:`s` (default
        ``optax.adam(1e-2)``).
      init: the initial log-variance of every task.

    Returns:
      An :class:`optax_balance.Weighting` of the losses; its state is
      :class:`optax_balance.UWState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax, optax_balance as ob
      >>> w = ob.weightings.uw(2, weight_optimizer=optax.sgd(0.1))
      >>> weights, state = w(jnp.array([1.0, 4.0]))
      >>> weights, state.log_vars              # s - 0.1 (0.5 - 0.5 L)
      (Array([0.5, 0.5], dtype=float32), Array([0.  , 0.15], dtype=float32))

    References:
      Kendall, Gal & Cipolla, `Multi-Task Learning Using Uncertainty to Weigh Losses for
      Scene Geometry and Semantics <https://arxiv.org/abs/1705.07115>`_, CVPR 2018.
    """
    t_cfg = _core.check_num_tasks(num_tasks, required=True)
    _core.check_range("init", init)
    wopt = _learned.check_weight_optimizer(weight_optimizer)

    def init_state(t: int) -> UWState:
        s = jnp.full((t,), init, _core.stat_dtype())
        return UWState(weights=0.5 * jnp.exp(-s), log_vars=s, weight_opt_state=wopt.init(s))

    def weigh(stats: _core.Stats, state: UWState) -> tuple[jax.Array, UWState]:
        assert stats.losses is not None
        s = state.log_vars
        w = 0.5 * jnp.exp(-s)
        grad = 0.5 - w * stats.losses
        s_next, opt_state = _learned.step(wopt, s, grad, state.weight_opt_state)
        return w, UWState(weights=w, log_vars=s_next, weight_opt_state=opt_state)

    return _core.Weighting(init_state, weigh, needs=("losses",), name="uw", num_tasks=t_cfg)


def uw(
    num_tasks: int,
    *,
    weight_optimizer: optax.GradientTransformation | None = None,
    init: float = 0.0,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
) -> optax.GradientTransformationExtraArgs:
    r"""Uncertainty weighting (UW): each loss divided by a learned variance.

    Each task has a learned log-variance :math:`s_i = \log \sigma_i^2`, and the model and
    :math:`s` minimise together

    .. math::

      \mathcal L(\theta, s) = \sum_{i=1}^T \tfrac12 e^{-s_i} L_i(\theta) + \tfrac12 s_i ,

    so the model's update is :math:`\sum_i w_i \nabla L_i` with
    :math:`w_i = \tfrac12 e^{-s_i}` and :math:`s` goes down
    :math:`\partial \mathcal L / \partial s_i = \tfrac12 - \tfrac12 e^{-s_i} L_i`, whose
    zero is :math:`e^{s_i} = L_i`: at equilibrium every task's weighted loss is
    :math:`\tfrac12` (a task with a large loss is weighted down). The form is the
    paper's regression likelihood, used for every task, as torchjd's and LibMTL's ``UW``.

    :math:`s` lives in the state and is stepped by ``weight_optimizer`` (any optax
    transformation, fed :math:`\partial \mathcal L / \partial s` and :math:`s` as params)
    once per update, from the same losses and :math:`s(t)` the model's step weighs with:
    as when :math:`s` and the model share one backward pass and one optimizer step in the
    paper. ``state.weights`` is :math:`w(t)`, the weights used; ``state.log_vars`` is
    :math:`s(t+1)`.

    Initialisation: :math:`s = 0` (equal weights :math:`\tfrac12`), as torchjd (the paper
    reports robustness to it); LibMTL starts at :math:`-0.5` (``init=-0.5``).

    A loss-based method: train with :func:`optax_balance.weighted_loss` and ONE backward
    pass, or give ``update`` stacked per-task gradients (it returns
    :math:`\sum_i w_i g_i`). Losses: the derivation assumes positive losses (negative
    log-likelihoods up to a constant); a task whose loss stays :math:`\le 0` drives its
    :math:`s_i` down without bound, until its weight overflows and the non-finite guard
    freezes the state. A step with a non-finite loss keeps the whole previous state.

    Args:
      num_tasks: T (required: :math:`s` and its optimizer state are created by ``init``).
      weight_optimizer: an optax transformation for :math:`s` (default
        ``optax.adam(1e-2)``, as GradNorm's weights).
      init: the initial log-variance of every task.
      shared: which parameter leaves are shared (``None``: all). For stacked gradients
        only: other leaves are summed unweighted.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``
        (the losses are averaged over it).
      sync: ``"grads"`` (the output is averaged over ``axis_name``) or ``"stats"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``task_losses=`` of shape ``(T,)``; its state is :class:`UWState`.

    Raises:
      ValueError: at construction for ``num_tasks < 1``, a non-finite ``init`` or a
        ``weight_optimizer`` that is not an optax transformation.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax, optax_balance as ob
      >>> tx = ob.uw(2, weight_optimizer=optax.sgd(0.1))
      >>> state = tx.init(jnp.zeros(2))
      >>> losses = jnp.array([1.0, 4.0])
      >>> ob.weighted_loss(tx, losses, state)               # 0.5 (1 + 4)
      Array(2.5, dtype=float32)
      >>> _, state = tx.update(jnp.zeros(2), state, jnp.zeros(2), task_losses=losses)
      >>> state.log_vars                                    # s - 0.1 (0.5 - 0.5 L)
      Array([0.  , 0.15], dtype=float32)
      >>> print(np.asarray(ob.weighted_loss(tx, losses, state)).round(4))  # 0.5 + 2 e^-0.15
      2.2214

    References:
      Kendall, Gal & Cipolla, `Multi-Task Learning Using Uncertainty to Weigh Losses for
      Scene Geometry and Semantics <https://arxiv.org/abs/1705.07115>`_, CVPR 2018.
    """
    return _core.balance(
        uw_weighting(num_tasks, weight_optimizer=weight_optimizer, init=init),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
