"""FairGrad: the alpha-fair allocation of progress between tasks, from the Gramian."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_balance import _core

_DEFAULT_MAX_ITERS = 100
_LINE_SEARCH_STEPS = 24  # step sizes t_max * 2^-k, k < this, tried at once
_DIVERGED = 1e6  # a weight this many times its start means no solution (see fairgrad)


class FairGradState(NamedTuple):
    """State of :func:`fairgrad`.

    Attributes:
      weights: ``(T,)`` the weights :math:`w` applied in the last update (solving
        :math:`G w = w^{-1/\\alpha}`; ``1/T`` each for ``alpha=0``; 0 for a zero gradient).
      residual: the residual of the last solve over the tasks with a non-zero gradient,
        as a backward error :math:`\\max_i |(Gw)_i - w_i^{-1/\\alpha}| / ((|G|w)_i +
        w_i^{-1/\\alpha})` (0 for ``alpha=0``); about 1e-7 once solved in float32.
      iterations: Newton iterations of the last solve.
    """

    weights: jax.Array
    residual: jax.Array
    iterations: jax.Array


def _potential_terms(w: jax.Array, q: jax.Array) -> jax.Array:
    """``h(w)`` with ``h'(w) = -w^(-1/alpha)``: ``-log w`` for ``q = 1 - 1/alpha = 0``,
    else ``-(w^q - 1) / q`` (``expm1`` keeps it accurate for ``q`` near 0)."""
    lw = jnp.log(w)
    small = jnp.abs(q) < 1e-6
    return jnp.where(small, -lw, -jnp.expm1(q * lw) / jnp.where(small, 1.0, q))


def solve_fair(
    gram: jax.Array, alpha: jax.Array, *, max_iters: int, tol: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""``w > 0`` with ``(G w)_i = w_i^(-1/alpha)`` on the tasks with ``G_ii > 0``.

    ``gram`` must be scaled to a largest diagonal entry of 1. The solution is the
    minimiser of the strictly convex
    :math:`\Phi(w) = \frac12 w^\top G w + \sum_i h(w_i)`, :math:`h'(w) = -w^{-1/\alpha}`,
    found by Newton's method with a backtracking (Armijo) line search that keeps
    :math:`w > 0`; the step sizes :math:`t_{\max} 2^{-k}` are evaluated at once, not
    in a nested loop. Start: :math:`w_i = G_{ii}^{-\alpha/(1+\alpha)}`, the solution
    for orthogonal gradients, scaled to the best point on its ray. Tasks with
    :math:`G_{ii} = 0` are left out (their equation has no solution; weight 0).
    The residual is the backward error
    :math:`\max_i |(Gw)_i - w_i^{-1/\alpha}| / ((|G| w)_i + w_i^{-1/\alpha})`, which
    rounding can resolve where cancellation in :math:`(Gw)_i` defeats the relative one.
    Stops one step after the residual is below ``tol``, after ``max_iters`` steps, when
    a step makes no progress, or when a weight grows past ``1e6`` times its start (no
    solution: a non-negative combination of the gradients vanishes).

    Returns:
      ``(w, residual, iterations)``.
    """
    dt = gram.dtype
    diag = jnp.diagonal(gram)
    active = diag > 0
    act = active.astype(dt)
    g = gram * act[:, None] * act[None, :]
    inv_a = 1.0 / alpha
    q = 1.0 - inv_a
    gamma = alpha / (1.0 + alpha)

    def pow_neg(w):  # w^(-1/alpha)
        return jnp.exp(-inv_a * jnp.log(w))

    def residual(w):  # backward error: |(Gw)_i - w_i^(-1/a)| relative to its terms' size
        pn = pow_neg(w)
        r = jnp.abs(g @ w - pn) / (jnp.abs(g) @ w + pn)
        return jnp.max(jnp.where(active, r, 0.0), initial=0.0)

    def phi(w):  # w: (..., T)
        return 0.5 * jnp.sum(w * (w @ g), axis=-1) + jnp.sum(
            jnp.where(active, _potential_terms(w, q), 0.0), axis=-1
        )

    w0 = jnp.where(active, jnp.exp(-gamma * jnp.log(jnp.where(active, diag, 1.0))), 1.0)
    quad = w0 @ g @ w0
    mass = jnp.sum(jnp.where(active, jnp.exp(q * jnp.log(w0)), 0.0))
    ray = (quad > 0) & (mass > 0)
    log_ratio = jnp.log(jnp.where(ray, mass, 1.0)) - jnp.log(jnp.where(ray, quad, 1.0))
    scale = jnp.exp(gamma * log_ratio)
    w0 = jnp.where(ray, w0 * scale, w0)
    ks = 2.0 ** -jnp.arange(_LINE_SEARCH_STEPS, dtype=dt)
    eps = jnp.finfo(dt).eps

    def cond(c):
        w, res, it, stalled = c
        return (it < max_iters) & (res > tol) & ~stalled

    def body(c):
        # ``res`` is the residual where the step starts: the step taken from the first
        # point within ``tol`` is the last one, and brings it to rounding level.
        w, _, it, _ = c
        res = residual(w)
        grad = jnp.where(active, g @ w - pow_neg(w), 0.0)
        hdiag = jnp.where(active, inv_a * pow_neg(w) / w, 1.0)
        hess = g + jnp.diag(hdiag)
        chol = jax.scipy.linalg.cho_factor(hess, lower=True)
        step = -jax.scipy.linalg.cho_solve(chol, grad)
        dec2 = jnp.maximum(-grad @ step, 0.0)  # squared Newton decrement
        # The largest step that keeps every weight at least 1% of its value.
        shrink = jnp.where(step < 0, -0.99 * w / jnp.where(step < 0, step, -1.0), jnp.inf)
        t_max = jnp.minimum(1.0, jnp.min(shrink))
        sizes = t_max * ks
        cands = w[None, :] + sizes[:, None] * step[None, :]
        vals = phi(cands)
        armijo = jnp.isfinite(vals) & (vals <= phi(w) - 1e-4 * sizes * dec2)
        # Phi is convex along the step, so a non-positive slope at t means Phi decreased
        # on all of [0, t]: a test on gradients, which keeps its accuracy where the
        # values of Phi (large terms cancelling) lose theirs.
        slopes = jnp.where(active, cands @ g - pow_neg(cands), 0.0) @ step
        ok = (armijo | (slopes <= 0)) & jnp.all(cands > 0, axis=1)
        first = jnp.argmax(ok)
        # Near the solution the decrease drowns in rounding: take the Newton step.
        size = jnp.where(jnp.any(ok), sizes[first], jnp.where(dec2 < 1e-4, t_max, 0.0))
        new = w + size * step
        good = jnp.all(jnp.isfinite(new)) & jnp.all(new > 0) & (size > 0)
        new = jnp.where(good, new, w)
        diverged = jnp.max(new / w0) > _DIVERGED
        still = jnp.max(jnp.abs(new - w) / w) <= 4.0 * eps  # no change left to make
        return new, res, it + 1, ~good | diverged | still

    init = (w0, jnp.array(jnp.inf, dt), jnp.array(0, jnp.int32), jnp.array(False))
    w, _, it, _ = jax.lax.while_loop(cond, body, init)
    return jnp.where(active, w, 0.0), residual(w), it


def fairgrad_weighting(*, alpha: float = 1.0, max_iters: int | None = None) -> _core.Weighting:
    r"""FairGrad's weighting: the :math:`\alpha`-fair weights :math:`G w = w^{-1/\alpha}`.

    Solved in JAX by damped Newton (see :func:`optax_balance.fairgrad`); ``alpha=0``
    gives :math:`1/T` each (the mean).

    Args:
      alpha: the fairness parameter :math:`\alpha \ge 0` (1: proportional fairness, as
        Nash-MTL; 0: the mean; large: towards max-min fairness).
      max_iters: maximum Newton iterations (``None``: 100).

    Returns:
      An :class:`optax_balance.Weighting` of the Gramian; its state is
      :class:`optax_balance.FairGradState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> weights, state = ob.weightings.fairgrad(alpha=2.0)(J @ J.T)
      >>> print(np.asarray(weights).round(4))
      [0.4714 0.3195]
      >>> print(np.asarray(weights**0.5 * (J @ J.T @ weights)).round(4))   # w^(1/a) G w = 1
      [1. 1.]

    References:
      Ban & Ji, `Fair Resource Allocation in Multi-Task Learning
      <https://arxiv.org/abs/2402.15638>`_, ICML 2024.
    """
    _core.check_range("alpha", alpha, low=0.0)
    iters = _DEFAULT_MAX_ITERS
    if max_iters is not None:
        iters = _core.check_int("max_iters", max_iters, low=1)
    is_mean = _core.is_concrete(alpha) and float(np.asarray(alpha)) == 0.0

    def init(t: int) -> FairGradState:
        dt = _core.stat_dtype()
        return FairGradState(
            weights=jnp.full((t,), 1.0 / max(t, 1), dt),
            residual=jnp.zeros((), dt),
            iterations=jnp.zeros((), jnp.int32),
        )

    def weigh(stats: _core.Stats, state: FairGradState) -> tuple[jax.Array, FairGradState]:
        assert stats.gram is not None
        gram = stats.gram
        t = stats.num_tasks
        dt = gram.dtype
        mean = jnp.full((t,), 1.0 / t, dt)
        if is_mean:
            return mean, FairGradState(mean, jnp.zeros((), dt), jnp.zeros((), jnp.int32))
        a = jnp.asarray(alpha, dt)
        zero_alpha = a <= 0  # alpha = 0 given through inject_hyperparams
        a_safe = jnp.where(zero_alpha, 1.0, a)
        # The system on G / c has the solution c^(alpha/(1+alpha)) w: solve it scale-free.
        c = jnp.max(jnp.diagonal(gram))
        pos = c > 0
        c = jnp.where(pos, c, 1.0)
        tol = 1e-5 if dt == jnp.float32 else 1e-11
        w_n, res, its = solve_fair(gram / c, a_safe, max_iters=iters, tol=tol)
        w = w_n * jnp.exp(-(a_safe / (1.0 + a_safe)) * jnp.log(c))
        w = jnp.where(zero_alpha, mean, jnp.where(pos, w, 0.0))
        res = jnp.where(zero_alpha | ~pos, 0.0, res)
        its = jnp.where(zero_alpha | ~pos, 0, its)
        return w, FairGradState(weights=w, residual=res, iterations=its)

    return _core.Weighting(init, weigh, needs=("gram",), name="fairgrad")


def fairgrad(
    *,
    alpha: float = 1.0,
    max_iters: int | None = None,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""FairGrad: the update that shares progress between tasks :math:`\alpha`-fairly.

    Ban & Ji (2024) pick the update :math:`d` that maximises the :math:`\alpha`-fair
    utility :math:`\sum_i u_\alpha(g_i \cdot d)` of the tasks' first-order progress,
    :math:`u_\alpha(x) = x^{1-\alpha}/(1-\alpha)` (:math:`\log x` for :math:`\alpha=1`),
    within a ball. Its solution is :math:`d = \sum_i w_i g_i` with :math:`w > 0` solving
    (their Eq. 4)

    .. math::

      G w = w^{-1/\alpha}, \qquad\text{i.e.}\qquad g_i \cdot d = w_i^{-1/\alpha}
      \ \text{ for every task},

    with :math:`G = J J^\top` the raw Gramian: every task improves, the more so the
    smaller its weight. :math:`\alpha = 1` is proportional fairness (the Nash bargaining
    system of Nash-MTL, without its norm clipping), :math:`\alpha \to \infty` tends to
    max-min fairness, and :math:`\alpha = 0` is linear scalarisation: the weights are
    :math:`1/T` each (the mean), as in the paper (Section 3) and torchjd. Scaling
    :math:`J` by :math:`c` scales :math:`d` by :math:`c^{(1-\alpha)/(1+\alpha)}`.

    Solver. The system is the optimality condition of the strictly convex
    :math:`\Phi(w) = \frac12 w^\top G w + \sum_i h(w_i)` with
    :math:`h'(w) = -w^{-1/\alpha}`, so its solution, when it exists, is unique. It is
    computed on :math:`G / \max_i G_{ii}` (the weights then scale back exactly) by
    Newton's method with an Armijo line search (all step sizes of the search evaluated at
    once) in ``jax.lax.while_loop``, from the solution for orthogonal gradients, until
    one step after the residual
    :math:`\max_i |(Gw)_i - w_i^{-1/\alpha}| / ((|G|w)_i + w_i^{-1/\alpha})` is below
    :math:`10^{-5}` (float32; :math:`10^{-11}` under x64), which leaves it at rounding
    level: 3-6 iterations for :math:`\alpha = 1`, up to a few tens for large
    :math:`\alpha` and gradients of very different sizes. The residual and the
    iteration count are in the state. No host round-trip (the official code and torchjd call SciPy's
    ``least_squares`` on the host, from :math:`1/T` each, bounded to :math:`w \ge 0`).

    No solution exists when a non-negative combination of the gradients vanishes: a
    zero gradient (its equation reads :math:`0 = w_i^{-1/\alpha}`), two opposite
    gradients. A task with a zero gradient gets weight 0 and the others are solved
    exactly; otherwise the weights of the tasks involved grow without bound, and the
    solve stops at ``max_iters`` or when a weight passes :math:`10^6` times its start,
    with a finite output and the residual in the state.

    Args:
      alpha: the fairness parameter :math:`\alpha \ge 0` (torchjd requires it; DESIGN's
        default 1 is proportional fairness).
      max_iters: maximum Newton iterations per update (``None``: 100). torchjd's
        ``max_iters`` bounds SciPy's function evaluations instead (default 100 T).
      shared: which parameter leaves are shared (``None``: all); a pytree of bools, a
        prefix of one, or a callable ``params -> pytree``. Other leaves are summed.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` (exact: average the stacked gradients over ``axis_name``) or
        ``"stats"`` (average only the Gramian).
      num_tasks: T, if known; gives ``init`` a full-shape state.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes stacked
      gradients (leading task axis) and returns :math:`d`; its state is
      :class:`FairGradState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> tx = ob.fairgrad(alpha=1.0)
      >>> d, state = tx.update(J, tx.init(jnp.zeros(3)))
      >>> print(np.asarray(d).round(4))
      [0.0766 0.9985 0.9985]
      >>> print(np.asarray(J @ d * state.weights).round(4))   # g_i . d = 1 / w_i
      [1. 1.]

    References:
      Ban & Ji, `Fair Resource Allocation in Multi-Task Learning
      <https://arxiv.org/abs/2402.15638>`_, ICML 2024.
      Mo & Walrand, `Fair End-to-End Window-Based Congestion Control
      <https://doi.org/10.1109/90.879343>`_, IEEE/ACM ToN 2000 (:math:`\alpha`-fairness).
    """
    return _core.balance(
        fairgrad_weighting(alpha=alpha, max_iters=max_iters),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
