"""DB-MTL: log-loss gradients, averaged per task and scaled to the largest norm."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core

_LOG_EPS = 1e-8  # LibMTL: log(L + 1e-8)
_NORM_EPS = 1e-8  # LibMTL: max_j u_j / (u_i + 1e-8)


class DBMTLState(NamedTuple):
    r"""State of :func:`db_mtl`.

    Attributes:
      weights: ``(T,)`` the factors :math:`\alpha_i = \max_j \|m_j\| / (\|m_i\| +
        10^{-8})` the last update applied to the averaged log-loss gradients :math:`m_i`
        (1 at ``init``).
      estimates: a stacked tree with the params' structure: on each statistic leaf the
        ``(T, *leaf.shape)`` moving averages :math:`m_i` of the log-loss gradients, in
        float32, sharded like the params; ``None`` on the other leaves. Zero at ``init``.
      log_loss_scales: ``(T,)`` :math:`1/(L_i + 10^{-8})`, the factor that turned each
        task's gradient into its log-loss gradient in the last update; the task-specific
        leaves are combined with it (1 at ``init``).
      step: the number of updates :math:`k` taken (int32), which sets the decay.
    """

    weights: jax.Array
    estimates: Any
    log_loss_scales: jax.Array
    step: jax.Array


def _is_none(x: Any) -> bool:
    return x is None


def db_mtl_weighting(*, beta: float = 0.9, beta_sigma: float = 0.0) -> _core.Weighting:
    r"""DB-MTL's weighting: moving averages of log-loss gradients, scaled to the largest norm.

    :math:`m_k = \beta_k m_{k-1} + (1 - \beta_k)\, g / (L + 10^{-8})` with
    :math:`\beta_k = \beta / k^{\sigma}`, weights :math:`\alpha_i = \max_j \|m_j\| /
    (\|m_i\| + 10^{-8})`; the transformation combines :math:`\sum_i \alpha_i m_i` (see
    :func:`optax_balance.db_mtl`). Its state holds the averages, so ``init`` takes the
    statistic leaves: ``init(num_tasks, params)``.

    Args:
      beta: :math:`\beta \in [0, 1)`, the averages' decay at :math:`k = 1`.
      beta_sigma: :math:`\sigma \ge 0`: :math:`\beta_k = \beta / k^{\sigma}`.

    Returns:
      An :class:`optax_balance.Weighting` of the stacked gradients and the losses, with
      ``tracked="estimates"`` and ``head_scales="log_loss_scales"``; its state is
      :class:`optax_balance.DBMTLState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> w = ob.weightings.db_mtl()
      >>> state = w.init(2, {"a": jnp.zeros(2)})
      >>> g = {"a": jnp.array([[3.0, 4.0], [0.0, 2.0]])}
      >>> stats = ob.Stats(grads=g, losses=jnp.array([1.0, 4.0]))
      >>> weights, state = w(stats, state)
      >>> print(np.asarray(state.estimates["a"]).round(4))  # 0.1 * g_i / L_i
      [[0.3  0.4 ]
       [0.   0.05]]
      >>> print(np.asarray(weights).round(4))               # max norm / norm: 0.5 / [0.5, 0.05]
      [ 1. 10.]

    References:
      Lin, Ye, Xu, Shi, Zhang & Kwok, `Dual-Balancing for Multi-Task Learning
      <https://arxiv.org/abs/2308.12029>`_, 2023.
    """
    _core.check_range("beta", beta, low=0.0, high=1.0, high_inclusive=False)
    _core.check_range("beta_sigma", beta_sigma, low=0.0)

    def init(t: int, params: Any) -> DBMTLState:
        dt = _core.stat_dtype()
        return DBMTLState(
            weights=jnp.ones((t,), dt),
            estimates=_core.stacked_zeros_like(params, t),
            log_loss_scales=jnp.ones((t,), dt),
            step=jnp.zeros((), jnp.int32),
        )

    def weigh(stats: _core.Stats, state: DBMTLState) -> tuple[jax.Array, DBMTLState]:
        assert stats.losses is not None
        t = stats.num_tasks
        step = jnp.asarray(optax.safe_increment(state.step))
        b = beta / step.astype(stats.losses.dtype) ** beta_sigma
        # d log(L + eps) = g / (L + eps); undefined (NaN: a non-finite step) for L <= -eps.
        shifted = stats.losses + _LOG_EPS
        pos = shifted > 0
        inv = jnp.where(pos, 1.0 / jnp.where(pos, shifted, 1.0), jnp.nan)
        # |m'|^2 for m' = b m + (1 - b) inv g in one pass over the old averages and the
        # gradients, without writing m': the new averages are only ever written once, by
        # the guard (in place if donated).
        old = [m for m in jax.tree.leaves(state.estimates) if m is not None]
        grads = [g for g in jax.tree.leaves(stats.grads) if g is not None]
        keep, a = jnp.full((t,), b, inv.dtype), (1.0 - b) * inv
        sq = _core.mix_sq_norms(keep, old, a, grads, t)
        # NaN where a NaN/Inf gradient reached the norms (safe_sqrt would map NaN to 0):
        # the guard sees it in the weights (it scans neither gradients nor estimates).
        norms = jnp.where(jnp.isfinite(sq), _core.safe_sqrt(sq), jnp.nan)
        alpha = jnp.max(norms) / (norms + _NORM_EPS)

        def average(m: Any, g: Any) -> Any:
            return None if g is None else _core.mix_leaf(keep, m, a, g)

        estimates = jax.tree.map(average, state.estimates, stats.grads, is_leaf=_is_none)
        new = DBMTLState(weights=alpha, estimates=estimates, log_loss_scales=inv, step=step)
        return alpha, new

    return _core.Weighting(
        init,
        weigh,
        needs=("grads", "losses"),
        name="db_mtl",
        init_takes_params=True,
        tracked="estimates",
        head_scales="log_loss_scales",
    )


def db_mtl(
    *,
    beta: float = 0.9,
    beta_sigma: float = 0.0,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""DB-MTL: dual balancing, log-losses and gradients scaled to the largest task's norm.

    DB-MTL (Lin et al. 2023) balances the tasks twice. *Loss scale*: every task trains on
    :math:`\log(L_i + 10^{-8})`, whose gradient is :math:`g_i / (L_i + 10^{-8})` (so the
    scale of a loss does not matter). *Gradient magnitude*: a moving average
    :math:`m_i` of each log-loss gradient is rescaled to the largest one's norm. At update
    :math:`k = 1, 2, \dots` (averages zero at the start):

    .. math::

      m_{k,i} = \beta_k\, m_{k-1,i} + (1 - \beta_k)\, \frac{g_{k,i}}{L_{k,i} + 10^{-8}},
      \quad \beta_k = \frac{\beta}{k^{\sigma}}, \qquad
      \alpha_i = \frac{\max_j \|m_{k,j}\|}{\|m_{k,i}\| + 10^{-8}}, \qquad
      d = \sum_i \alpha_i\, m_{k,i},

    with norms over the statistic (shared) leaves. Task-specific leaves (``shared``)
    train on the log-losses too: :math:`\sum_i g_i / (L_i + 10^{-8})` (no average, no
    :math:`\alpha`). The averages live in the state, once: ``(T, *leaf.shape)`` per shared
    leaf in float32, placed like the params (see :class:`DBMTLState`); the output combines
    them, not the incoming gradients. ``state.weights`` holds :math:`\alpha`.

    Follows LibMTL's ``DB_MTL.backward``, names and defaults (``DB_beta`` -> ``beta``,
    ``DB_beta_sigma`` -> ``beta_sigma``): the average starts at zero without bias
    correction (the first update's :math:`\|d\|` is :math:`1 - \beta` of the gradient's),
    which the paper's Algorithm 1 shares; the heads' log-loss gradients as LibMTL's
    per-task backward passes give them. Losses :math:`L_i \le -10^{-8}`, whose log is
    undefined, make the step a non-finite one.

    Non-finite steps: a NaN/Inf gradient or loss (or a loss :math:`\le -10^{-8}`) keeps
    the whole state and combines the *incoming* gradients with the previous
    :math:`\alpha` on the shared leaves and the previous :math:`1/(L_i + 10^{-8})` on the
    task-specific ones (so a NaN/Inf gradient shows in the output where it sits, for
    ``optax.apply_if_finite``).

    Args:
      beta: :math:`\beta \in [0, 1)`, the moving average's decay at :math:`k = 1`
        (0: no averaging).
      beta_sigma: :math:`\sigma \ge 0`, the decay's schedule :math:`\beta / k^\sigma`
        (0: constant).
      shared: which parameter leaves are shared (``None``: all); the others train on the
        summed log-loss gradients and have no averages.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``
        (the losses are averaged over it before the log).
      sync: ``"grads"`` only when ``axis_name`` is set (the averages track the averaged
        stacked gradients, so the state is the one-device state on the global batch).
      num_tasks: T, if known; gives ``init`` a full-shape state (the averages are then
        allocated by ``init``, not at the first update).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``task_losses=``; its state is :class:`DBMTLState`.

    Raises:
      ValueError: for ``beta`` outside ``[0, 1)`` or ``beta_sigma < 0``;
        ``sync="stats"`` with ``axis_name``; at ``update`` when ``task_losses`` is
        missing.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> tx = ob.db_mtl(num_tasks=2)
      >>> grads = jnp.array([[3.0, 4.0], [0.0, 2.0]])
      >>> state = tx.init(jnp.zeros(2))
      >>> d, state = tx.update(grads, state, task_losses=jnp.array([1.0, 4.0]))
      >>> print(np.asarray(state.weights).round(4))       # |m| = 0.1 * [5, 0.5]
      [ 1. 10.]
      >>> print(np.asarray(d).round(4))                   # 0.1 * (g_1 / 1 + 10 g_2 / 4)
      [0.3 0.9]

    References:
      Lin, Ye, Xu, Shi, Zhang & Kwok, `Dual-Balancing for Multi-Task Learning
      <https://arxiv.org/abs/2308.12029>`_, 2023; LibMTL ``DB_MTL``.
    """
    return _core.balance(
        db_mtl_weighting(beta=beta, beta_sigma=beta_sigma),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
