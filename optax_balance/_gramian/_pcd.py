"""PCD: follow the primary task's gradient, with a guaranteed share of progress for the others."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_balance import _core


class PCDState(NamedTuple):
    """State of :func:`pcd`.

    Attributes:
      weights: ``(T,)`` the weights applied in the last update (see :func:`pcd`:
        :math:`[1, \\mu] \\odot s` rescaled to the primary gradient's norm).
      sq_norm_ema: ``(T,)`` the moving average of the squared gradient norms (not
        bias-corrected).
      step: the number of updates so far (for the bias correction).
      iterations: dual active-set iterations of the last solve.
      feasible: whether the last update's constraints could all be met (if not, they
        were dropped and the output was the primary gradient).
    """

    weights: jax.Array
    sq_norm_ema: jax.Array
    step: jax.Array
    iterations: jax.Array
    feasible: jax.Array


def solve_pcd_qp(
    gram: jax.Array, taus: jax.Array, *, max_iters: int, tol: float, dependence_tol: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""PCD's QP from the Gramian of the (normalised) gradients, task 0 primary.

    .. math::

      \min_d \tfrac12 \|d - g_1\|^2 \ \text{ s.t. } \ g_j^\top d \ge \tau_j \|g_j\|^2
      \quad (j \ge 2)

    by the dual active-set method of Goldfarb & Idnani (1983) for an identity Hessian:
    :math:`d = g_1 + \sum_j \mu_j g_j` at every iteration, so all inner products come
    from :math:`G`. Each iteration adds the most violated constraint (one linear solve on
    the active set) or, when a multiplier would turn negative first, drops that
    constraint. A constraint counts as met within ``tol`` times the size of the terms of
    its slack :math:`(G\mu)_j - b_j` (its rounding scale; torchjd: ``1e-9`` times the
    largest diagonal of :math:`G`, in float64); a gradient counts as dependent on the
    active ones when its component orthogonal to them has a squared norm below
    ``dependence_tol`` times its own. When that happens with no constraint to drop, the
    constraints are infeasible.

    Returns:
      ``(mu, iterations, feasible)``: ``mu`` ``(T-1,)`` the multipliers (0 when
      infeasible).
    """
    n = gram.shape[0] - 1
    dt = gram.dtype
    gs = gram[1:, 1:]
    b = taus * jnp.diagonal(gs) - gram[1:, 0]  # b_j > 0: g_1 alone violates constraint j
    abs_gs = jnp.abs(gs)
    abs_b = jnp.abs(taus * jnp.diagonal(gs)) + jnp.abs(gram[1:, 0])
    idx = jnp.arange(n)

    def cond(c):
        return ~c["done"] & (c["it"] < max_iters)

    def body(c):
        mu, active, p, slack_p = c["mu"], c["active"], c["p"], c["slack_p"]
        # Pick the most violated constraint when none is being added.
        slacks = jnp.where(active, 0.0, gs @ mu - b)
        # Met within tol times the size of the terms of each slack (its rounding scale).
        atol = tol * (abs_gs @ mu + abs_b) + jnp.finfo(dt).tiny
        q = jnp.argmin(slacks + atol).astype(jnp.int32)
        picking = p < 0
        finished = picking & (slacks[q] >= -atol[q])
        p = jnp.where(picking, q, p)
        slack_p = jnp.where(picking, slacks[q], slack_p)
        # Step direction: +1 on mu_p, -r on the active multipliers, where g_p - sum r_j g_j
        # is the part of g_p orthogonal to the active gradients (squared norm z).
        a = active.astype(dt)
        mat = gs * a[:, None] * a[None, :] + jnp.diag(1.0 - a)
        col = gs[:, p] * a
        r = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(mat, lower=True), col) * a
        r = jnp.where(jnp.isfinite(r), r, 0.0)
        z = gs[p, p] - gs[p] @ r
        ratios = jnp.where(active & (r > 0), mu / jnp.where(r > 0, r, 1.0), jnp.inf)
        k = jnp.argmin(ratios)
        partial = ratios[k]
        independent = z > dependence_tol * gs[p, p]
        full = jnp.where(independent, -slack_p / jnp.where(independent, z, 1.0), jnp.inf)
        step = jnp.minimum(partial, full)
        infeasible = ~finished & jnp.isinf(step)
        move = ~finished & ~infeasible
        step = jnp.where(move, step, 0.0)
        new_mu = jnp.where(active, mu - step * r, mu) + jnp.where(idx == p, step, 0.0)
        add = full <= partial
        new_mu = jnp.where(add | (idx != k), new_mu, 0.0)
        new_active = jnp.where(add, active | (idx == p), active & (idx != k))
        new_slack = gs[p] @ new_mu - b[p]
        return dict(
            mu=jnp.where(move, new_mu, mu),
            active=jnp.where(move, new_active, active),
            p=jnp.where(move & ~add, p, -1).astype(jnp.int32),
            slack_p=new_slack,
            it=c["it"] + move.astype(jnp.int32),
            done=finished | infeasible,
            infeasible=infeasible,
        )

    # ``zeros_like(b)``: the carry takes the statistics' type (inside shard_map it varies
    # over the device axis exactly when they do, as the loop's outputs will).
    zero = jnp.zeros_like(b[0])
    init = dict(
        mu=jnp.zeros_like(b),
        active=jnp.zeros_like(b, dtype=bool),
        p=zero.astype(jnp.int32) - 1,
        slack_p=zero,
        it=zero.astype(jnp.int32),
        done=zero.astype(bool),
        infeasible=zero.astype(bool),
    )
    out = jax.lax.while_loop(cond, body, init)
    feasible = ~out["infeasible"]
    mu = jnp.where(feasible, jnp.maximum(out["mu"], 0.0), 0.0)
    return mu, out["it"], feasible


def _check_tau(tau: Any) -> tuple[Any, int | None]:
    """``(tau, T)``: a scalar in [0, 1], or one value in [0, 1] per secondary task."""
    if np.ndim(tau) == 0 and not isinstance(tau, (list, tuple)):
        _core.check_range("tau", tau, low=0.0, high=1.0)
        return tau, None
    vec, n = _core.check_task_vector("tau", tau)
    if _core.is_concrete(vec) and np.any((vec < 0) | (vec > 1)):
        raise ValueError(f"`tau` must be in [0, 1] (every entry), got {tau!r}.")
    return vec, None if n is None else n + 1


def pcd_weighting(*, tau: Any = 0.02, beta: float = 0.999, eps: float = 1e-8) -> _core.Weighting:
    r"""PCD's weighting: task 0 primary, each other task guaranteed a share ``tau`` of progress.

    :math:`w = [1, \mu] \odot s` rescaled so that :math:`\|\sum_i w_i g_i\| = \|g_1\|`,
    with :math:`\mu` the multipliers of the constrained projection of the normalised
    primary gradient (see :func:`optax_balance.pcd`).

    Args:
      tau: the fraction :math:`\tau \in [0, 1]` of normalised first-order progress
        guaranteed to each secondary task: a scalar, or one value per secondary task
        (length T - 1, which fixes T).
      beta: decay :math:`\beta \in [0, 1)` of the moving average of squared norms.
      eps: :math:`\epsilon \ge 0` added to that average before its inverse square root.

    Returns:
      An :class:`optax_balance.Weighting` of the Gramian; its state is
      :class:`optax_balance.PCDState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> J = jnp.array([[1.0, 0.0], [-3.0, 0.0]])   # the secondary task opposes the primary
      >>> weights, state = ob.weightings.pcd(tau=0.02)(J @ J.T)
      >>> print(np.asarray(weights @ J).round(2))    # torchjd: the primary is sacrificed
      [-1.  0.]

    References:
      `Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical
      Multi-Objective Optimization <https://openreview.net/forum?id=HT01yGHLEt>`_, TMLR 2026.
    """
    taus, t_cfg = _check_tau(tau)
    _core.check_range("beta", beta, low=0.0, high=1.0, high_inclusive=False)
    _core.check_range("eps", eps, low=0.0)

    def init(t: int) -> PCDState:
        dt = _core.stat_dtype()
        zero = jnp.zeros((), jnp.int32)
        return PCDState(
            weights=jnp.zeros((t,), dt).at[:1].set(1.0),
            sq_norm_ema=jnp.zeros((t,), dt),
            step=zero,
            iterations=zero,
            feasible=jnp.array(True),
        )

    def weigh(stats: _core.Stats, state: PCDState) -> tuple[jax.Array, PCDState]:
        assert stats.gram is not None
        gram = stats.gram
        t = stats.num_tasks
        dt = gram.dtype
        if t_cfg is not None and t != t_cfg:
            raise ValueError(
                f"`tau` has {t_cfg - 1} entries (one per secondary task) but the Gramian has "
                f"T={t} tasks; give T - 1 = {t - 1} values or a scalar."
            )
        sq = jnp.diagonal(gram)
        step = state.step + 1
        ema = beta * state.sq_norm_ema + (1.0 - beta) * sq
        debiased = ema / (1.0 - jnp.asarray(beta, dt) ** step.astype(dt))
        den = jnp.sqrt(debiased + eps)
        s = jnp.where(den > 0, 1.0 / jnp.where(den > 0, den, 1.0), 0.0)
        norm_gram = gram * s[:, None] * s[None, :]
        eps_dt = float(jnp.finfo(dt).eps)
        precision = 10.0 * eps_dt
        if t > 1:
            tau_vec = jnp.broadcast_to(jnp.asarray(taus, dt), (t - 1,))
            mu, its, feasible = solve_pcd_qp(
                norm_gram,
                tau_vec,
                max_iters=10 * (t - 1),
                tol=max(1e-9, 100.0 * eps_dt),
                dependence_tol=max(1e-9, precision),
            )
            w = jnp.concatenate([jnp.ones((1,), dt), mu])
        else:
            w, its, feasible = jnp.ones((1,), dt), jnp.zeros((), jnp.int32), jnp.array(True)
        # Rescale d~ = sum_i w_i s_i g_i to ||g_1||, unless it is zero up to the rounding
        # of its norm computed from the Gramian.
        d_sq = w @ norm_gram @ w
        size = (jnp.abs(w) @ jnp.sqrt(jnp.maximum(jnp.diagonal(norm_gram), 0.0))) ** 2
        ok = (sq[0] > 0) & (d_sq > precision * size)
        ratio = jnp.sqrt(sq[0] / jnp.where(ok, d_sq, 1.0))
        weights = jnp.where(ok, w * s * ratio, 0.0)
        new_state = PCDState(
            weights=weights, sq_norm_ema=ema, step=step, iterations=its, feasible=feasible
        )
        return weights, new_state

    return _core.Weighting(init, weigh, needs=("gram",), name="pcd", num_tasks=t_cfg)


def pcd(
    *,
    tau: Any = 0.02,
    beta: float = 0.999,
    eps: float = 1e-8,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Priority-Constrained Descent: the primary task's gradient, bent just enough for the rest.

    Task 0 is the primary objective. PCD follows its gradient as closely as possible
    while every secondary task :math:`j` keeps at least a fraction :math:`\tau_j` of the
    first-order progress a step along its own normalised gradient would give:

    .. math::

      \tilde d = \arg\min_d \tfrac12 \|d - \tilde g_1\|^2 \quad\text{s.t.}\quad
      \tilde g_j \cdot d \ge \tau_j \|\tilde g_j\|^2 \ \ (j = 2, \dots, T),
      \qquad d = \frac{\|g_1\|}{\|\tilde d\|}\, \tilde d ,

    where :math:`\tilde g_i = s_i g_i`, :math:`s_i = 1/\sqrt{\hat v_i + \epsilon}` and
    :math:`\hat v_i` is the bias-corrected moving average (decay :math:`\beta`) of
    :math:`\|g_i\|^2` over the updates, kept in the state. The solution is
    :math:`\tilde d = \tilde g_1 + \sum_j \mu_j \tilde g_j` with the constraints'
    multipliers :math:`\mu \ge 0`, so PCD is a weighting of the Gramian:
    :math:`w = [1, \mu] \odot s \cdot \|g_1\| / \|\tilde d\|`. Because of the
    normalisation :math:`\tau` is scale-free. This follows torchjd 0.18's ``PCD``:

    - if :math:`g_1 = 0`, or :math:`\tilde d = 0` up to the rounding of its norm computed
      from the Gramian (10 eps), the output is zero;
    - if the constraints cannot all hold (for T >= 3, e.g. two anti-parallel secondary
      gradients), they are dropped and the output is :math:`g_1` (``state.feasible`` is
      then False);
    - a step with NaN/Inf keeps the moving average, as everywhere in this library (the
      output then follows the core's policy; torchjd returns NaN).

    PCD is not symmetric in the tasks, and not non-conflicting for task 0: a secondary
    task opposed to the primary one can reverse the direction.

    Solver. The QP is solved exactly in ``jax.lax.while_loop`` by the dual active-set
    method of Goldfarb & Idnani (1983) written on the Gramian, as torchjd does (there in
    float64 on the host; here on the device, in the statistics dtype, with the
    tolerances scaled to it): at most :math:`10(T-1)` iterations, each one Cholesky
    solve on the active set, usually about :math:`T`. The reference implementation
    enumerates the working sets instead (exponential in :math:`T`).

    Args:
      tau: :math:`\tau \in [0, 1]`: a scalar shared by the secondary tasks, or one value
        per secondary task (length T - 1; this fixes T).
      beta: decay :math:`\beta \in [0, 1)` of the moving average of squared norms.
      eps: :math:`\epsilon \ge 0` added to the moving average before its inverse square
        root (a zero average gives scale 0 when ``eps=0``).
      shared: which parameter leaves are shared (``None``: all); a pytree of bools, a
        prefix of one, or a callable ``params -> pytree``. Other leaves are summed.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` (exact: average the stacked gradients over ``axis_name``) or
        ``"stats"`` (average only the Gramian).
      num_tasks: T, if known; gives ``init`` a full-shape state.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes stacked
      gradients (leading task axis, task 0 primary) and returns :math:`d`; its state is
      :class:`PCDState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> tx = ob.pcd(tau=0.5)
      >>> d, state = tx.update(J, tx.init(jnp.zeros(3)))
      >>> print(np.asarray(d).round(4))    # the closed form for T=2 (the paper's Cor. 4.6)
      [2.0889 2.6112 2.6112]
      >>> print(np.asarray(state.weights).round(4), bool(state.feasible))
      [1.3578 1.2534] True

    References:
      `Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical
      Multi-Objective Optimization <https://openreview.net/forum?id=HT01yGHLEt>`_, TMLR 2026
      (reference code: github.com/DaraVaram/priority-constrained-descent).
      Goldfarb & Idnani, `A numerically stable dual method for solving strictly convex
      quadratic programs <https://doi.org/10.1007/BF02591962>`_, Math. Prog. 1983.
    """
    return _core.balance(
        pcd_weighting(tau=tau, beta=beta, eps=eps),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
