"""Dynamic weight average: weights from how fast each task's loss has been falling."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core


class DWAState(NamedTuple):
    r"""State of :func:`dwa`.

    Attributes:
      weights: ``(T,)`` the weights of the last update (they sum to T).
      loss_sum: ``(T,)`` the sum of the losses seen in the current period (epoch).
      period_steps: ``int32`` how many updates the current period has seen so far.
      newer: ``(T,)`` the average loss of the last complete period, :math:`L(e-1)`.
      older: ``(T,)`` the average loss of the period before, :math:`L(e-2)`.
      num_averages: ``int32`` how many complete periods ``newer``/``older`` hold (0, 1
        or 2); the weights are 1 until it reaches 2.
    """

    weights: jax.Array
    loss_sum: jax.Array
    period_steps: jax.Array
    newer: jax.Array
    older: jax.Array
    num_averages: jax.Array


def dwa_weighting(*, temperature: float = 2.0, every: int = 1) -> _core.Weighting:
    r"""DWA's weighting: :math:`w = T\,\mathrm{softmax}(r / \tau)`, :math:`r = L(e-1)/L(e-2)`.

    :math:`L(e)` is the average loss over period :math:`e` (``every`` updates); until
    two periods are complete the weights are 1 (see :func:`optax_balance.dwa`).

    Args:
      temperature: :math:`\tau > 0`.
      every: updates per period (an epoch: batches per epoch), an integer :math:`\ge 1`.

    Returns:
      An :class:`optax_balance.Weighting` of the losses; its state is
      :class:`optax_balance.DWAState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> w = ob.weightings.dwa(temperature=2.0)
      >>> weights, state = w(jnp.array([1.0, 1.0]))             # period 0
      >>> weights, state = w(jnp.array([0.5, 1.0]), state)      # period 1
      >>> weights, state = w(jnp.array([0.5, 1.0]), state)      # r = [0.5, 1]
      >>> print(np.asarray(weights).round(4))                   # 2 softmax([0.25, 0.5])
      [0.8756 1.1244]

    References:
      Liu, Johns & Davison, `End-to-End Multi-Task Learning with Attention
      <https://arxiv.org/abs/1803.10704>`_, CVPR 2019.
    """
    _core.check_range("temperature", temperature, low=0.0, low_inclusive=False)
    every = _core.check_int("every", every, low=1)

    def init(t: int) -> DWAState:
        dt = _core.stat_dtype()
        return DWAState(
            weights=jnp.ones((t,), dt),
            loss_sum=jnp.zeros((t,), dt),
            period_steps=jnp.zeros((), jnp.int32),
            newer=jnp.ones((t,), dt),
            older=jnp.ones((t,), dt),
            num_averages=jnp.zeros((), jnp.int32),
        )

    def weigh(stats: _core.Stats, state: DWAState) -> tuple[jax.Array, DWAState]:
        assert stats.losses is not None
        t = stats.num_tasks
        # Rates of the two last complete periods; a period-average of exactly 0 carries
        # no rate (the ratio is undefined), so that task counts as steady (rate 1).
        known = state.older != 0
        rates = jnp.where(known, state.newer / jnp.where(known, state.older, 1.0), 1.0)
        w = jnp.where(
            state.num_averages >= 2, t * jax.nn.softmax(rates / temperature), jnp.ones((t,))
        ).astype(state.weights.dtype)
        # This update's losses join the current period; a full period rolls the history.
        loss_sum = state.loss_sum + stats.losses
        count = state.period_steps + 1
        roll = count >= every
        average = loss_sum / count.astype(loss_sum.dtype)
        new = DWAState(
            weights=w,
            loss_sum=jnp.where(roll, jnp.zeros_like(loss_sum), loss_sum),
            period_steps=jnp.where(roll, jnp.zeros_like(count), count),
            newer=jnp.where(roll, average, state.newer),
            older=jnp.where(roll, state.newer, state.older),
            num_averages=jnp.where(
                roll, jnp.minimum(state.num_averages + 1, 2), state.num_averages
            ),
        )
        return w, new

    return _core.Weighting(init, weigh, needs=("losses",), name="dwa")


def dwa(
    *,
    temperature: float = 2.0,
    every: int = 1,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Dynamic weight average (DWA): weigh up the tasks whose loss has stopped falling.

    With :math:`L_k(e)` the average loss of task :math:`k` over period :math:`e` (an
    epoch in the paper),

    .. math::

      \mathcal L = \sum_k \lambda_k L_k, \qquad
      \lambda_k = \frac{T \exp(r_k / \tau)}{\sum_i \exp(r_i / \tau)}, \qquad
      r_k = \frac{L_k(e-1)}{L_k(e-2)} ,

    so a task whose loss fell less over the last period (:math:`r_k` near 1) gets more
    weight; :math:`\sum_k \lambda_k = T`, and a larger temperature :math:`\tau` makes the
    weights more uniform. During the first two periods the weights are 1.

    Periods: the losses passed to every ``update`` are averaged over ``every``
    consecutive updates, then the history rolls. Set ``every`` to the number of batches
    per epoch for the paper's per-epoch DWA (as LibMTL's epoch buffer and torchjd's
    ``step()`` once per epoch); ``every=1`` is a per-step DWA whose rates compare the last
    two batches' losses (noisier, since they come from different batches). The current
    period's losses only count once it is complete.

    A loss-based method: train with :func:`optax_balance.weighted_loss` and ONE backward
    pass, or give ``update`` stacked per-task gradients (it returns
    :math:`\sum_i \lambda_i g_i`). Losses: rates need losses of one sign (they need not
    be positive); a period average of exactly 0 gives that task rate 1. A step with a
    non-finite loss keeps the state as it was (that batch is left out of its period).

    Args:
      temperature: :math:`\tau > 0` (the paper: 2).
      every: updates per period, an integer :math:`\ge 1` (under
        ``optax.inject_hyperparams``, list it in ``static_args``).
      shared: which parameter leaves are shared (``None``: all). For stacked gradients
        only: other leaves are summed unweighted.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``
        (the losses are averaged over it).
      sync: ``"grads"`` (the output is averaged over ``axis_name``) or ``"stats"``.
      num_tasks: T, if known; gives ``init`` a full-shape state.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``task_losses=`` of shape ``(T,)``; its state is :class:`DWAState`.

    Raises:
      ValueError: at construction for ``temperature <= 0`` or ``every < 1``.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> tx = ob.dwa(every=2, num_tasks=2)                 # periods of two updates
      >>> state, p = tx.init(jnp.zeros(3)), jnp.zeros(3)
      >>> for losses in ([1.0, 1.0], [1.0, 1.0], [0.5, 1.0], [0.5, 1.0]):
      ...     _, state = tx.update(p, state, p, task_losses=jnp.array(losses))
      >>> state.newer, state.older                          # period averages
      (Array([0.5, 1. ], dtype=float32), Array([1., 1.], dtype=float32))
      >>> w = ob.weighted_loss(tx, jnp.array([1.0, 0.0]), state)   # lambda_1 * 1
      >>> print(np.asarray(w).round(4))                     # 2 softmax([0.25, 0.5])[0]
      0.8756

    References:
      Liu, Johns & Davison, `End-to-End Multi-Task Learning with Attention
      <https://arxiv.org/abs/1803.10704>`_, CVPR 2019.
    """
    return _core.balance(
        dwa_weighting(temperature=temperature, every=every),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
