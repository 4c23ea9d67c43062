"""MoCo: MGDA-type weights on tracked estimates of the task gradients."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core


class MoCoState(NamedTuple):
    r"""State of :func:`moco`.

    Attributes:
      weights: ``(T,)`` the weights :math:`\lambda_k` on the tracked estimates that the
        last update applied (:math:`d = \sum_i \lambda_{k,i} y_{k,i}`; :math:`1/T` at
        ``init``). They are a softmax: positive, summing to 1.
      estimates: a stacked tree with the params' structure: on each statistic leaf the
        ``(T, *leaf.shape)`` tracked estimates :math:`y_k` of the (normalised, see
        :func:`moco`) task gradients, in float32, sharded like the params; ``None`` on the
        other leaves. Zero at ``init``.
      step: the number of updates :math:`k` taken (int32), which sets the step sizes.
    """

    weights: jax.Array
    estimates: Any
    step: jax.Array


def _is_none(x: Any) -> bool:
    return x is None


def moco_weighting(
    *,
    beta: float = 0.5,
    beta_sigma: float = 0.5,
    gamma: float = 0.1,
    gamma_sigma: float = 0.5,
    rho: float = 0.0,
) -> _core.Weighting:
    r"""MoCo's weighting: tracked gradient estimates and weights stepped on their Gramian.

    :math:`y_k = y_{k-1} - \beta_k (y_{k-1} - \hat g_k)` with
    :math:`\hat g_i = L_i\, g_i / (\|g_i\| + 10^{-8})`, then
    :math:`\lambda_k = \mathrm{softmax}(\lambda_{k-1} - \gamma_k (Y Y^\top + \rho I)
    \lambda_{k-1})`; the transformation combines :math:`\sum_i \lambda_{k,i} y_{k,i}` (see
    :func:`optax_balance.moco`). Its state holds the estimates, so ``init`` takes the
    statistic leaves: ``init(num_tasks, params)``.

    Args:
      beta: :math:`\beta \in (0, 1]`, the estimates' step size at :math:`k = 1`.
      beta_sigma: :math:`\sigma_\beta \ge 0`, its decay: :math:`\beta_k = \beta /
        k^{\sigma_\beta}`.
      gamma: :math:`\gamma \ge 0`, the weights' step size at :math:`k = 1`.
      gamma_sigma: :math:`\sigma_\gamma \ge 0`, its decay.
      rho: :math:`\rho \ge 0`, the :math:`\ell_2` regularisation of the weights.

    Returns:
      An :class:`optax_balance.Weighting` of the stacked gradients, their squared norms
      and the losses, with ``tracked="estimates"``; its state is
      :class:`optax_balance.MoCoState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> w = ob.weightings.moco()
      >>> state = w.init(2, {"a": jnp.zeros(2)})
      >>> g = {"a": jnp.array([[3.0, 4.0], [0.0, 2.0]])}    # norms 5 and 2
      >>> stats = ob.Stats(grads=g, sq_norms=jnp.array([25.0, 4.0]),
      ...                  losses=jnp.array([1.0, 2.0]))
      >>> weights, state = w(stats, state)
      >>> print(np.asarray(state.estimates["a"]).round(4))  # 0.5 * L_i g_i / |g_i|
      [[0.3 0.4]
       [0.  1. ]]
      >>> print(np.asarray(weights).round(4))  # softmax(1/2 - 0.1 Y Y^T [1/2, 1/2])
      [0.5094 0.4906]

    References:
      Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, `Mitigating Gradient Bias in
      Multi-objective Learning: A Provably Convergent Approach
      <https://openreview.net/forum?id=dLAYGdKTi2>`_, ICLR 2023.
    """
    _core.check_range("beta", beta, low=0.0, high=1.0, low_inclusive=False)
    _core.check_range("beta_sigma", beta_sigma, low=0.0)
    _core.check_range("gamma", gamma, low=0.0)
    _core.check_range("gamma_sigma", gamma_sigma, low=0.0)
    _core.check_range("rho", rho, low=0.0)

    def init(t: int, params: Any) -> MoCoState:
        dt = _core.stat_dtype()
        return MoCoState(
            weights=jnp.full((t,), 1.0 / max(t, 1), dt),
            estimates=_core.stacked_zeros_like(params, t),
            step=jnp.zeros((), jnp.int32),
        )

    def weigh(stats: _core.Stats, state: MoCoState) -> tuple[jax.Array, MoCoState]:
        assert stats.sq_norms is not None and stats.losses is not None
        t = stats.num_tasks
        dt = stats.sq_norms.dtype
        step = jnp.asarray(optax.safe_increment(state.step))
        k = step.astype(dt)
        b = beta / k**beta_sigma
        gamma_k = gamma / k**gamma_sigma
        # g_hat_i = c_i g_i with c_i = L_i / (|g_i| + 1e-8); Y' = (1 - b) Y + b diag(c) G.
        c = stats.losses / (_core.safe_sqrt(stats.sq_norms) + 1e-8)
        keep, mix = jnp.full((t,), 1.0 - b, dt), b * c
        # Y' Y'^T without writing Y' (one Gramian's work), so the new estimates are only
        # ever written once, by the guard (in place if donated).
        old = [y for y in jax.tree.leaves(state.estimates) if y is not None]
        grads = [g for g in jax.tree.leaves(stats.grads) if g is not None]
        new_gram = _core.mix_gramian(keep, old, mix, grads, t)
        lam = state.weights
        reg = new_gram + rho * jnp.eye(t, dtype=dt)
        lam = jax.nn.softmax(lam - gamma_k * (reg @ lam))

        def track(y: Any, g: Any) -> Any:
            return None if g is None else _core.mix_leaf(keep, y, mix, g)

        estimates = jax.tree.map(track, state.estimates, stats.grads, is_leaf=_is_none)
        return lam, MoCoState(weights=lam, estimates=estimates, step=step)

    return _core.Weighting(
        init,
        weigh,
        needs=("grads", "sq_norms", "losses"),
        name="moco",
        init_takes_params=True,
        tracked="estimates",
    )


def moco(
    *,
    beta: float = 0.5,
    beta_sigma: float = 0.5,
    gamma: float = 0.1,
    gamma_sigma: float = 0.5,
    rho: float = 0.0,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""MoCo: MGDA-type weights on tracked estimates of the task gradients.

    MoCo (Fernando et al., ICLR 2023) removes the bias of stochastic MGDA by tracking
    every task gradient with a moving estimate :math:`y_i` and stepping the weights
    :math:`\lambda` on the estimates' Gramian. At update :math:`k = 1, 2, \dots`, with
    :math:`Y_k` the ``(T, P)`` estimates (zero at the start):

    .. math::

      \hat g_{k,i} = \frac{L_{k,i}}{\|g_{k,i}\| + 10^{-8}}\, g_{k,i}, \qquad
      Y_k = Y_{k-1} - \frac{\beta}{k^{\sigma_\beta}} (Y_{k-1} - \hat G_k),

      \lambda_k = \mathrm{softmax}\Big(\lambda_{k-1} - \frac{\gamma}{k^{\sigma_\gamma}}
      (Y_k Y_k^\top + \rho I)\, \lambda_{k-1}\Big), \qquad
      d = \sum_i \lambda_{k,i}\, y_{k,i},

    with :math:`\lambda_0 = 1/T`; the norms are over the statistic (shared) leaves and
    task-specific leaves get :math:`\sum_i g_i`. The estimates live in the state, once:
    ``(T, *leaf.shape)`` per shared leaf in float32, placed like the params (see
    :class:`MoCoState`); the output combines them, not the incoming gradients.

    Follows LibMTL's ``MoCo.backward`` (implemented from the authors' code), names and
    defaults (``MoCo_beta`` -> ``beta``, ``MoCo_beta_sigma`` -> ``beta_sigma``,
    ``MoCo_gamma`` -> ``gamma``, ``MoCo_gamma_sigma`` -> ``gamma_sigma``, ``MoCo_rho`` ->
    ``rho``), including where it departs from the paper's Algorithm 1: each gradient is
    normalised and scaled by its loss before tracking (the paper projects the estimate
    onto a ball instead), the weights go through a softmax (the paper projects onto the
    simplex), and the step sizes decay as :math:`k^{-\sigma}`. The hyperparameters are
    tuned for that code, which is the published reference implementation. The losses
    set the lengths of the tracked directions, so they are expected to be >= 0.

    Non-finite steps: a NaN/Inf gradient or loss keeps the whole state (estimates,
    weights, step) and combines the *incoming* gradients with the previous
    :math:`\lambda` (so the NaN/Inf shows in the output where it sits, for
    ``optax.apply_if_finite``; a non-finite loss alone gives the finite
    :math:`\sum_i \lambda_i g_i`).

    Args:
      beta: :math:`\beta \in (0, 1]`, the estimates' step size at :math:`k = 1`.
      beta_sigma: :math:`\sigma_\beta \ge 0`, the decay of the estimates' step size.
      gamma: :math:`\gamma \ge 0`, the weights' step size at :math:`k = 1`.
      gamma_sigma: :math:`\sigma_\gamma \ge 0`, the decay of the weights' step size.
      rho: :math:`\rho \ge 0`, the :math:`\ell_2` regularisation of the weights.
      shared: which parameter leaves are shared (``None``: all); other leaves are summed
        over the task axis, unweighted, and have no estimates.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` only when ``axis_name`` is set (the estimates track the averaged
        stacked gradients, so the state is the one-device state on the global batch).
      num_tasks: T, if known; gives ``init`` a full-shape state (the estimates are then
        allocated by ``init``, not at the first update).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``task_losses=``; its state is :class:`MoCoState`.

    Raises:
      ValueError: for a hyperparameter outside its range; ``sync="stats"`` with
        ``axis_name``; at ``update`` when ``task_losses`` is missing.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> tx = ob.moco(num_tasks=2)
      >>> grads = jnp.array([[3.0, 4.0], [0.0, 2.0]])       # norms 5 and 2
      >>> state = tx.init(jnp.zeros(2))
      >>> d, state = tx.update(grads, state, task_losses=jnp.array([1.0, 2.0]))
      >>> print(np.asarray(state.estimates).round(4))     # 0.5 * L_i g_i / |g_i|
      [[0.3 0.4]
       [0.  1. ]]
      >>> print(np.asarray(d).round(4))                   # lambda @ Y
      [0.1528 0.6944]

    References:
      Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, `Mitigating Gradient Bias in
      Multi-objective Learning: A Provably Convergent Approach
      <https://openreview.net/forum?id=dLAYGdKTi2>`_, ICLR 2023; LibMTL ``MoCo``.
    """
    return _core.balance(
        moco_weighting(
            beta=beta, beta_sigma=beta_sigma, gamma=gamma, gamma_sigma=gamma_sigma, rho=rho
        ),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
