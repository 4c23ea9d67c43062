"""CR-MOGM: an exponential moving average of any weighting's weights."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core


class CRMOGMState(NamedTuple):
    r"""State of :func:`cr_mogm`.

    Attributes:
      weights: ``(T,)`` the smoothed weights :math:`\lambda_k` applied in the last update.
      inner: the wrapped weighting's state (its own ``weights`` are :math:`\hat\lambda_k`).
      started: whether :math:`\lambda_{k-1}` exists (``initial_weights`` given, or one
        update made); until then the first update applies :math:`\hat\lambda_1` itself.
    """

    weights: jax.Array
    inner: Any
    started: jax.Array


def cr_mogm_weighting(
    weighting: _core.Weighting, *, alpha: float = 0.9, initial_weights: Any = None
) -> _core.Weighting:
    r"""CR-MOGM's weighting: an exponential moving average of another weighting's weights.

    .. math::

      \lambda_k = \alpha\, \lambda_{k-1} + (1 - \alpha)\, \hat\lambda_k ,

    where :math:`\hat\lambda_k` are the weights ``weighting`` returns at step :math:`k` and
    :math:`\lambda_0` is ``initial_weights``, or :math:`\hat\lambda_1` when it is not given
    (so the first smoothed weights are the wrapped weighting's, whatever :math:`\alpha`).
    The wrapped weighting reads the same statistics and keeps its own state inside this
    one. Averaging the weights rather than the update reduces the correlation between
    the weights and the stochastic gradients they multiply, which is what lets
    stochastic MGDA-type methods converge (Zhou et al. 2022).

    Args:
      weighting: the :class:`optax_balance.Weighting` to smooth (any whose weights are one
        ``(T,)`` vector), e.g. ``ob.weightings.mgda()``.
      alpha: :math:`\alpha \in [0, 1]`, the weight of the past: 0 returns the wrapped
        weights, 1 freezes the weights at :math:`\lambda_0`. The paper's Corollary 1
        raises it towards 1 as the learning rate decays; under
        ``optax.inject_hyperparams`` it can follow a schedule.
      initial_weights: ``(T,)`` :math:`\lambda_0`; ``None``: :math:`\hat\lambda_1`.
        Giving it fixes T.

    Returns:
      An :class:`optax_balance.Weighting` with the wrapped one's statistics; its state is
      :class:`optax_balance.CRMOGMState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> w = ob.weightings.cr_mogm(ob.weightings.mgda(), alpha=0.5, initial_weights=[1.0, 0.0])
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])     # MGDA's weights: [0.6, 0.4]
      >>> weights, state = w(J @ J.T)
      >>> weights                                               # 0.5 [1, 0] + 0.5 [0.6, 0.4]
      Array([0.8, 0.2], dtype=float32)
      >>> weights, state = w(J @ J.T, state)
      >>> print(np.asarray(weights).round(4))                   # 0.5 [0.8, 0.2] + 0.5 [0.6, 0.4]
      [0.7 0.3]

    References:
      Zhou, Zhang, Jiang, Lu & Xiang, `On the Convergence of Stochastic Multi-Objective
      Gradient Manipulation and Beyond
      <https://openreview.net/forum?id=ScwfQ7hdwyP>`_, NeurIPS 2022.
    """
    if not isinstance(weighting, _core.Weighting):
        raise ValueError(
            "`weighting` must be an ob.Weighting, e.g. ob.weightings.mgda() (not the "
            f"transformation ob.mgda()); got {weighting!r}."
        )
    _core.check_range("alpha", alpha, low=0.0, high=1.0)
    init_w, t_cfg = _core.check_task_vector("initial_weights", initial_weights)
    if t_cfg is not None and weighting.num_tasks not in (None, t_cfg):
        raise ValueError(
            f"`initial_weights` has {t_cfg} entries but the wrapped {weighting.name} "
            f"weighting was built for {weighting.num_tasks} tasks."
        )
    inner = weighting

    def init(t: int, *params: Any) -> CRMOGMState:
        inner_state = inner.init(t, *params)
        dt = _core.stat_dtype()
        if init_w is None or t == 0:
            w = jnp.asarray(inner_state.weights, dt)
            started = False
        else:
            w = jnp.asarray(init_w, dt)
            started = True
        return CRMOGMState(weights=w, inner=inner_state, started=jnp.asarray(started))

    def weigh(stats: _core.Stats, state: CRMOGMState) -> tuple[jax.Array, CRMOGMState]:
        hat, inner_state = inner.weigh(stats, state.inner)
        if not isinstance(hat, jax.Array):
            raise ValueError(
                f"cr_mogm smooths one (T,) weight vector, but the {inner.name} weighting "
                "returns per-leaf weights."
            )
        hat = hat.astype(state.weights.dtype)
        prev = jnp.where(state.started, state.weights, hat)
        lam = alpha * prev + (1.0 - alpha) * hat
        return lam, CRMOGMState(weights=lam, inner=inner_state, started=jnp.asarray(True))

    return _core.Weighting(
        init,
        weigh,
        needs=inner.needs,
        name=f"cr_mogm({inner.name})",
        num_tasks=t_cfg if t_cfg is not None else inner.num_tasks,
        stat_mask=inner.stat_mask,
        stat_mask_name=inner.stat_mask_name,
        init_takes_params=inner.init_takes_params,
        nonnegative_losses=inner.nonnegative_losses,
    )


def cr_mogm(
    weighting: _core.Weighting,
    *,
    alpha: float = 0.9,
    initial_weights: Any = None,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""CR-MOGM: any weighting's weights smoothed by an exponential moving average.

    :math:`d_k = \sum_i \lambda_{k,i}\, g_i` with
    :math:`\lambda_k = \alpha\lambda_{k-1} + (1-\alpha)\hat\lambda_k`, where
    :math:`\hat\lambda_k` are the weights the wrapped weighting computes from this step's
    statistics (see :func:`optax_balance.weightings.cr_mogm`). With stochastic
    gradients, MGDA-type weights correlate with the noise of the very gradients they
    multiply, which biases the update; the moving average breaks that correlation and
    gives the convergence guarantees of the paper.

    Args:
      weighting: the :class:`optax_balance.Weighting` to smooth, e.g.
        ``ob.weightings.mgda()`` or ``ob.weightings.upgrad()``.
      alpha: :math:`\alpha \in [0, 1]`, the weight of the past.
      initial_weights: ``(T,)`` :math:`\lambda_0`; ``None``: the first update's
        :math:`\hat\lambda_1`.
      shared: which parameter leaves are shared (``None``: all); a pytree of bools, a
        prefix of one, or a callable ``params -> pytree``. Other leaves are summed.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` (exact) or ``"stats"`` (average only the statistics).
      num_tasks: T, if known; gives ``init`` a full-shape state.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state is
      :class:`optax_balance.CRMOGMState`.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> tx = ob.cr_mogm(ob.weightings.mgda(), alpha=0.5, num_tasks=2)
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> d, state = tx.update(J, tx.init(jnp.zeros(3)))
      >>> state.weights                           # the first step: MGDA's own weights
      Array([0.6, 0.4], dtype=float32)

    References:
      Zhou, Zhang, Jiang, Lu & Xiang, `On the Convergence of Stochastic Multi-Objective
      Gradient Manipulation and Beyond
      <https://openreview.net/forum?id=ScwfQ7hdwyP>`_, NeurIPS 2022.
    """
    return _core.balance(
        cr_mogm_weighting(weighting, alpha=alpha, initial_weights=initial_weights),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
