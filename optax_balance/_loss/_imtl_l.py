"""IMTL-L: learned loss scales that keep every scaled loss at the same level."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core
from optax_balance._loss import _learned


class IMTLLState(NamedTuple):
    r"""State of :func:`imtl_l`.

    Attributes:
      weights: ``(T,)`` the weights of the last update, :math:`e^{s_i(t)}`.
      log_scales: ``(T,)`` the learned log-scales :math:`s(t+1)`, which the next update
        weighs with.
      weight_opt_state: the state of ``weight_optimizer`` over ``log_scales``.
    """

    weights: jax.Array
    log_scales: jax.Array
    weight_opt_state: optax.OptState


def imtl_l_weighting(
    num_tasks: int,
    *,
    weight_optimizer: optax.GradientTransformation | None = None,
    init: float = 0.0,
) -> _core.Weighting:
    r"""IMTL-L's weighting: :math:`w_i = e^{s_i}`, then a step of :math:`s`.

    The step goes down :math:`\partial_{s_i} = e^{s_i} L_i - 1`, the gradient of
    :math:`\sum_i e^{s_i} L_i - s_i` (see :func:`optax_balance.imtl_l`).

    Args:
      num_tasks: T.
      weight_optimizer: an optax transformation for :math:`s` (default
        ``optax.adam(1e-2)``).
      init: the initial log-scale of every task.

    Returns:
      An :class:`optax_balance.Weighting` of the losses; its state is
      :class:`optax_balance.IMTLLState`.

    Examples:
      >>> import jax.numpy as jnp, optax, optax_balance as ob
      >>> w = ob.weightings.imtl_l(2, weight_optimizer=optax.sgd(0.1))
      >>> weights, state = w(jnp.array([1.0, 4.0]))
      >>> weights, state.log_scales            # s - 0.1 (e^s L - 1)
      (Array([1., 1.], dtype=float32), Array([ 0. , -0.3], dtype=float32))

    References:
      Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, `Towards Impartial Multi-task
      Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021.
    """
    t_cfg = _core.check_num_tasks(num_tasks, required=True)
    _core.check_range("init", init)
    wopt = _learned.check_weight_optimizer(weight_optimizer)

    def init_state(t: int) -> IMTLLState:
        s = jnp.full((t,), init, _core.stat_dtype())
        return IMTLLState(weights=jnp.exp(s), log_scales=s, weight_opt_state=wopt.init(s))

    def weigh(stats: _core.Stats, state: IMTLLState) -> tuple[jax.Array, IMTLLState]:
        assert stats.losses is not None
        s = state.log_scales
        w = jnp.exp(s)
        grad = w * stats.losses - 1.0
        s_next, opt_state = _learned.step(wopt, s, grad, state.weight_opt_state)
        return w, IMTLLState(weights=w, log_scales=s_next, weight_opt_state=opt_state)

    return _core.Weighting(init_state, weigh, needs=("losses",), name="imtl_l", num_tasks=t_cfg)


def imtl_l(
    num_tasks: int,
    *,
    weight_optimizer: optax.GradientTransformation | None = None,
    init: float = 0.0,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
) -> optax.GradientTransformationExtraArgs:
    r"""IMTL-L: learned loss scales that make every scaled loss equal (the loss half of IMTL).

    Each task has a learned log-scale :math:`s_i`, and the model and :math:`s` minimise

    .. math::

      \mathcal L(\theta, s) = \sum_{i=1}^T e^{s_i} L_i(\theta) - s_i ,

    so the model's update is :math:`\sum_i w_i \nabla L_i` with :math:`w_i = e^{s_i}`
    and :math:`s` goes down :math:`\partial \mathcal L / \partial s_i = e^{s_i} L_i - 1`,
    whose zero is :math:`e^{s_i} L_i = 1`: every scaled loss is pulled to 1 (the
    :math:`-s_i` term keeps :math:`s_i` from :math:`-\infty`). It is UW with
    :math:`s \to -s` and twice the objective; the IMTL paper pairs it with IMTL-G
    (:func:`optax_balance.imtl_g`, on the gradients).

    :math:`s` lives in the state and is stepped by ``weight_optimizer`` once per update,
    from the same losses and :math:`s(t)` the model's step weighs with. ``state.weights``
    is :math:`w(t)`, the weights used; ``state.log_scales`` is :math:`s(t+1)`. The
    log-scales start at 0 (the plain sum), as torchjd and LibMTL; ``init`` changes that.

    A loss-based method: train with :func:`optax_balance.weighted_loss` and ONE backward
    pass, or give ``update`` stacked per-task gradients (it returns
    :math:`\sum_i w_i g_i`). Losses: designed for positive losses; a task whose loss
    stays :math:`\le 0` drives its :math:`s_i` up without bound, until its weight
    overflows and the non-finite guard freezes the state. A step with a non-finite loss
    keeps the whole previous state.

    Args:
      num_tasks: T (required: :math:`s` and its optimizer state are created by ``init``).
      weight_optimizer: an optax transformation for :math:`s` (default
        ``optax.adam(1e-2)``, as GradNorm's weights).
      init: the initial log-scale of every task.
      shared: which parameter leaves are shared (``None``: all). For stacked gradients
        only: other leaves are summed unweighted.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``
        (the losses are averaged over it).
      sync: ``"grads"`` (the output is averaged over ``axis_name``) or ``"stats"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``task_losses=`` of shape ``(T,)``; its state is :class:`IMTLLState`.

    Raises:
      ValueError: at construction for ``num_tasks < 1``, a non-finite ``init`` or a
        ``weight_optimizer`` that is not an optax transformation.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax, optax_balance as ob
      >>> tx = ob.imtl_l(2, weight_optimizer=optax.sgd(0.1))
      >>> state = tx.init(jnp.zeros(2))
      >>> losses = jnp.array([1.0, 4.0])
      >>> ob.weighted_loss(tx, losses, state)               # 1 + 4
      Array(5., dtype=float32)
      >>> _, state = tx.update(jnp.zeros(2), state, jnp.zeros(2), task_losses=losses)
      >>> state.log_scales                                  # s - 0.1 (e^s L - 1)
      Array([ 0. , -0.3], dtype=float32)
      >>> print(np.asarray(ob.weighted_loss(tx, losses, state)).round(4))  # 1 + 4 e^-0.3
      3.9633

    References:
      Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, `Towards Impartial Multi-task
      Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021.
    """
    return _core.balance(
        imtl_l_weighting(num_tasks, weight_optimizer=weight_optimizer, init=init),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
