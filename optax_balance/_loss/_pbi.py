"""PBI: penalty-based boundary intersection of the losses with a preference ray."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core

EPSILON = 1e-12  # under the square root of d_2, as torchjd: a finite gradient at d_2 = 0


class PBIState(NamedTuple):
    r"""State of :func:`pbi`.

    Attributes:
      weights: ``(T,)`` the weights of the last update,
        :math:`\hat w + \theta\, (I - \hat w \hat w^\top) p / d_2`.
    """

    weights: jax.Array


def pbi_weights(losses: jax.Array, direction: jax.Array, theta: Any) -> jax.Array:
    r"""The gradient of :math:`d_1 + \theta d_2` with respect to the losses.

    With :math:`f = L - z^*` (the caller shifts), :math:`\hat w` the unit preference,
    :math:`d_1 = f^\top \hat w`, :math:`p = f - d_1 \hat w` and
    :math:`d_2 = \sqrt{p^\top p + \epsilon}`:
    :math:`\partial d_1 / \partial f = \hat w` and
    :math:`\partial d_2 / \partial f = (I - \hat w \hat w^\top)\, p / d_2`.
    """
    d1 = jnp.dot(losses, direction)
    p = losses - d1 * direction
    d2 = jnp.sqrt(jnp.dot(p, p) + EPSILON)
    return direction + theta * (p - jnp.dot(direction, p) * direction) / d2


def pbi_weighting(*, theta: float, weights: Any, reference: Any = None) -> _core.Weighting:
    r"""PBI's weighting: the gradient of :math:`d_1 + \theta d_2` in the losses.

    See :func:`optax_balance.pbi`.

    Args:
      theta: the penalty :math:`\theta \ge 0` on the distance to the preference ray.
      weights: ``(T,)`` the preference :math:`w \ge 0`; fixes T.
      reference: ``(T,)`` the reference point :math:`z^*` (default 0).

    Returns:
      An :class:`optax_balance.Weighting` of the losses; its state is
      :class:`optax_balance.PBIState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> w = ob.weightings.pbi(theta=5.0, weights=[1.0, 0.0])
      >>> weights, state = w(jnp.array([1.0, 2.0]))      # [1, 0] + 5 [0, 2] / 2
      >>> print(np.asarray(weights).round(4))
      [1. 5.]

    References:
      Zhang & Li, `MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition
      <https://doi.org/10.1109/TEVC.2007.892759>`_, IEEE TEVC 2007.
    """
    _core.check_range("theta", theta, low=0.0)
    pref, t_cfg = _core.check_task_vector("weights", weights, nonnegative=True)
    if pref is None:
        raise ValueError("`weights` is required: the preference vector w, one entry per task.")
    ref, t_cfg = _core.check_task_vector("reference", reference, t_cfg)

    def init(t: int) -> PBIState:
        d = jnp.asarray(pref, _core.stat_dtype())
        return PBIState(weights=d / jnp.sqrt(jnp.sum(d * d)))

    def weigh(stats: _core.Stats, state: PBIState) -> tuple[jax.Array, PBIState]:
        assert stats.losses is not None
        dt = state.weights.dtype
        d = jnp.asarray(pref, dt)
        d = d / jnp.sqrt(jnp.sum(d * d))
        f = stats.losses if ref is None else stats.losses - jnp.asarray(ref, dt)
        w = pbi_weights(f, d, theta).astype(dt)
        return w, PBIState(weights=w)

    return _core.Weighting(init, weigh, needs=("losses",), name="pbi", num_tasks=t_cfg)


def pbi(
    *,
    theta: float,
    weights: Any,
    reference: Any = None,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Penalty-based boundary intersection (PBI): progress along a preference ray, kept near it.

    With :math:`f = L - z^*` and :math:`\hat w = w / \|w\|`,

    .. math::

      \mathcal L = d_1 + \theta d_2, \qquad d_1 = f^\top \hat w, \qquad
      d_2 = \| f - d_1 \hat w \| , \qquad
      \frac{\partial \mathcal L}{\partial L} = \hat w + \theta\, \frac{p}{d_2},
      \quad p = f - d_1 \hat w ,

    MOEA/D's decomposition (as torchjd's ``PBI``): :math:`d_1` is the progress along the
    preference direction, :math:`d_2` the distance from it, penalised by
    :math:`\theta`. A small :math:`\epsilon = 10^{-12}` under the square root of
    :math:`d_2` keeps the gradient finite on the ray (torchjd's choice). The penalty
    term's weights sum to about 0 and can be negative: the step may raise a loss to
    get back to the ray.

    A loss-based method: train with :func:`optax_balance.weighted_loss` and ONE backward
    pass, or give ``update`` stacked per-task gradients (it returns
    :math:`\sum_i w_i g_i`). Any finite losses work; a step with a non-finite loss keeps
    the previous weights.

    Args:
      theta: the penalty :math:`\theta \ge 0` (0: the projection on the preference
        direction; the paper uses 5).
      weights: ``(T,)`` the preference :math:`w`, finite and :math:`\ge 0` with a
        positive sum; fixes T.
      reference: ``(T,)`` the reference point :math:`z^*`, a lower bound of the losses
        (default 0, for non-negative losses).
      shared: which parameter leaves are shared (``None``: all). For stacked gradients
        only: other leaves are summed unweighted.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``
        (the losses are averaged over it).
      sync: ``"grads"`` (the output is averaged over ``axis_name``) or ``"stats"``.
      num_tasks: T, if given: must equal ``len(weights)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``task_losses=`` of shape ``(T,)``; its state is :class:`PBIState`.

    Raises:
      ValueError: at construction for ``theta < 0``, ``weights`` that are not finite and
        non-negative with a positive sum, or a ``reference`` of another length.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> tx = ob.pbi(theta=0.0, weights=[3.0, 4.0])
      >>> loss = ob.weighted_loss(tx, jnp.array([1.0, 2.0]), tx.init(jnp.zeros(3)))
      >>> print(np.asarray(loss).round(4))              # d_1 = (3 + 8) / 5
      2.2

    References:
      Zhang & Li, `MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition
      <https://doi.org/10.1109/TEVC.2007.892759>`_, IEEE TEVC 2007.
    """
    return _core.balance(
        pbi_weighting(theta=theta, weights=weights, reference=reference),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
