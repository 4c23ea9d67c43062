"""COSMOS: a linear scalarisation rewarded for pointing the losses along a preference."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core


class COSMOSState(NamedTuple):
    r"""State of :func:`cosmos`.

    Attributes:
      weights: ``(T,)`` the weights of the last update,
        :math:`r - \lambda\, \partial \cos(r, L) / \partial L`.
    """

    weights: jax.Array


def cosmos_weights(losses: jax.Array, pref: jax.Array, lambda_: Any) -> jax.Array:
    r"""The gradient of :math:`r^\top L - \lambda \cos(r, L)` with respect to :math:`L`.

    .. math::

      \frac{\partial \cos(r, L)}{\partial L} = \frac{r}{\|r\|\|L\|}
        - \frac{(r^\top L)\, L}{\|r\| \|L\|^3} ,

    taken as 0 where :math:`L = 0` (the cosine is undefined there).
    """
    norm_r = jnp.sqrt(jnp.sum(pref * pref))
    sq_l = jnp.sum(losses * losses)
    pos = sq_l > 0
    inv_l = jnp.where(pos, 1.0 / jnp.sqrt(jnp.where(pos, sq_l, 1.0)), 0.0)
    cos_grad = pref * inv_l / norm_r - jnp.dot(pref, losses) * losses * inv_l**3 / norm_r
    return pref - lambda_ * cos_grad


def cosmos_weighting(*, lambda_: float, weights: Any) -> _core.Weighting:
    r"""COSMOS's weighting: the gradient of :math:`r^\top L - \lambda \cos(r, L)` in :math:`L`.

    See :func:`optax_balance.cosmos`.

    Args:
      lambda_: the cosine penalty :math:`\lambda \ge 0`.
      weights: ``(T,)`` the preference :math:`r \ge 0`; fixes T.

    Returns:
      An :class:`optax_balance.Weighting` of the losses; its state is
      :class:`optax_balance.COSMOSState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> w = ob.weightings.cosmos(lambda_=1.0, weights=[1.0, 1.0])
      >>> weights, state = w(jnp.array([3.0, 4.0]))    # r - [0.0226, -0.0170]
      >>> print(np.asarray(weights).round(4))
      [0.9774 1.017 ]

    References:
      Ruchte & Grabocka, `Scalable Pareto Front Approximation for Deep Multi-Objective
      Learning <https://arxiv.org/abs/2103.13392>`_, ICDM 2021.
    """
    _core.check_range("lambda_", lambda_, low=0.0)
    pref, t_cfg = _core.check_task_vector("weights", weights, nonnegative=True)
    if pref is None:
        raise ValueError("`weights` is required: the preference vector r, one entry per task.")

    def init(t: int) -> COSMOSState:
        return COSMOSState(weights=jnp.asarray(pref, _core.stat_dtype()))

    def weigh(stats: _core.Stats, state: COSMOSState) -> tuple[jax.Array, COSMOSState]:
        assert stats.losses is not None
        r = jnp.asarray(pref, state.weights.dtype)
        w = cosmos_weights(stats.losses, r, lambda_).astype(state.weights.dtype)
        return w, COSMOSState(weights=w)

    return _core.Weighting(init, weigh, needs=("losses",), name="cosmos", num_tasks=t_cfg)


def cosmos(
    *,
    lambda_: float,
    weights: Any,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""COSMOS: a preference-weighted sum of the losses plus a cosine alignment reward.

    .. math::

      \mathcal L = r^\top L - \lambda \cos(r, L)
        = \sum_i r_i L_i - \lambda \frac{r^\top L}{\|r\|\, \|L\|}, \qquad
      w = r - \lambda \Big(\frac{r}{\|r\|\|L\|} - \frac{(r^\top L) L}{\|r\|\|L\|^3}\Big) ,

    the scalarisation of COSMOS (as torchjd's ``COSMOS``): the cosine term pulls the
    vector of losses towards the direction of the preference :math:`r`, which spreads
    the solutions over the Pareto front as :math:`r` varies. It is 0-homogeneous in
    :math:`L`, so its part of the weights is orthogonal to :math:`L` and grows as
    :math:`1/\|L\|`: it can make weights negative when the losses are small.

    The full method also samples :math:`r` from a Dirichlet distribution at every step
    and feeds it to the model as an input; that is the user's model. To resample it
    here, build the method under ``optax.inject_hyperparams`` with ``weights`` an array
    (not in ``static_args``) and set ``opt_state.hyperparams["weights"]`` each step;
    ``ob.weighted_loss`` then takes the injected transformation.

    A loss-based method: train with :func:`optax_balance.weighted_loss` and ONE backward
    pass, or give ``update`` stacked per-task gradients (it returns
    :math:`\sum_i w_i g_i`). At :math:`L = 0` the cosine is undefined and its gradient is
    taken as 0 (the weights are :math:`r`); a step with a non-finite loss keeps the
    previous weights.

    Args:
      lambda_: the cosine penalty :math:`\lambda \ge 0` (0: the linear scalarisation;
        the paper uses 0.01 to 8).
      weights: ``(T,)`` the preference :math:`r`, finite and :math:`\ge 0` with a
        positive sum; fixes T.
      shared: which parameter leaves are shared (``None``: all). For stacked gradients
        only: other leaves are summed unweighted.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``
        (the losses are averaged over it).
      sync: ``"grads"`` (the output is averaged over ``axis_name``) or ``"stats"``.
      num_tasks: T, if given: must equal ``len(weights)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``task_losses=`` of shape ``(T,)``; its state is :class:`COSMOSState`.

    Raises:
      ValueError: at construction for ``lambda_ < 0`` or ``weights`` that are not finite
        and non-negative with a positive sum.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> tx = ob.cosmos(lambda_=0.0, weights=[1.0, 3.0])
      >>> ob.weighted_loss(tx, jnp.array([1.0, 2.0]), tx.init(jnp.zeros(3)))  # 1 + 3 * 2
      Array(7., dtype=float32)

    References:
      Ruchte & Grabocka, `Scalable Pareto Front Approximation for Deep Multi-Objective
      Learning <https://arxiv.org/abs/2103.13392>`_, ICDM 2021.
    """
    return _core.balance(
        cosmos_weighting(lambda_=lambda_, weights=weights),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
