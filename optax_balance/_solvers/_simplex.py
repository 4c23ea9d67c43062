"""Minimum-norm point of a convex hull: ``min_{a in simplex} a^T G a`` in pure JAX.

Frank-Wolfe with pairwise steps (Sener & Koltun 2018, Algorithm 2, with the exact line
search of the quadratic) identifies the support; a bounded primal active-set phase then
solves the KKT system on that support exactly. Both run in ``jax.lax.while_loop`` with
fixed shapes; nothing leaves the device.
"""

from __future__ import annotations

from typing import NamedTuple, TypeAlias

import jax
import jax.numpy as jnp

Array: TypeAlias = jax.Array


class SimplexSolution(NamedTuple):
    weights: Array  # (T,) on the simplex
    iterations: Array  # int32: Frank-Wolfe iterations + active-set iterations


def _objective(gram: Array, a: Array) -> Array:
    return a @ gram @ a


def two_task_min_norm(gram: Array) -> Array:
    """Closed form for T=2: ``a1 = clip((G22 - G12) / (G11 + G22 - 2 G12), 0, 1)``."""
    g11, g12, g22 = gram[0, 0], gram[0, 1], gram[1, 1]
    den = g11 + g22 - 2.0 * g12
    safe = jnp.where(den > 0, den, 1.0)
    a1 = jnp.where(den > 0, jnp.clip((g22 - g12) / safe, 0.0, 1.0), 0.5)
    # Duplicate gradients (den == 0): every point of the segment is optimal; 0.5 keeps
    # the permutation symmetry.
    return jnp.stack([a1, 1.0 - a1])


def _frank_wolfe(
    gram: Array, epsilon: float | Array, max_iters: int | Array
) -> tuple[Array, Array]:
    t = gram.shape[0]
    dtype = gram.dtype
    a0 = jnp.full((t,), 1.0 / t, dtype)
    eps = jnp.finfo(dtype).eps
    abs_gram = jnp.abs(gram)

    def cond(carry):
        a, it, change, gap, noise = carry
        # The gap is compared with the rounding scale of ``G a`` at the current point,
        # not with an absolute number: with one task 1e3 larger than the others, the
        # gaps that matter are ~1e-6 of the largest entry (see _rounding_scale).
        return (it < max_iters) & (change >= epsilon) & (gap > 10.0 * noise)

    def body(carry):
        a, it, _, _, _ = carry
        ga = gram @ a
        obj = a @ ga
        s = jnp.argmin(ga)  # Frank-Wolfe vertex
        in_support = a > 0
        v = jnp.argmax(jnp.where(in_support, ga, -jnp.inf))  # away vertex
        # Pairwise direction e_s - e_v; exact line search on the quadratic.
        slope = ga[s] - ga[v]
        curv = gram[s, s] + gram[v, v] - 2.0 * gram[s, v]
        step_max = a[v]
        step = jnp.where(curv > 0, -slope / jnp.where(curv > 0, curv, 1.0), step_max)
        step = jnp.clip(step, 0.0, step_max)
        step = jnp.where(s == v, 0.0, step)
        new_a = a.at[s].add(step).at[v].add(-step)
        new_a = jnp.maximum(new_a, 0.0)
        change = jnp.sum(jnp.abs(new_a - a))
        gap = obj - ga[s]
        noise = eps * jnp.max(abs_gram @ a)
        return new_a, it + 1, change, gap, noise

    inf = jnp.array(jnp.inf, dtype)
    init = (a0, jnp.array(0, jnp.int32), inf, inf, jnp.zeros((), dtype))
    a, it, _, _, _ = jax.lax.while_loop(cond, body, init)
    return a, it


def _rounding_scale(gram: Array, a: Array) -> Array:
    """Per-index scale of ``(G a)_i - a^T G a``: ``(|G| a)_i + a^T |G| a`` (never 0).

    Rounding errors in these quantities are ``eps`` times this; comparing with it rather
    than with an absolute tolerance keeps the solver exact when tasks differ in scale.
    """
    ga = jnp.abs(gram) @ a
    s = ga + a @ ga
    return jnp.where(s > 0, s, jnp.finfo(gram.dtype).tiny)


def _support_solve(gram: Array, free: Array) -> Array:
    """Minimiser of ``a^T G a`` s.t. ``sum(a) = 1``, ``a_i = 0`` off ``free`` (least squares).

    Solves the KKT system ``G_SS a = lam 1, 1^T a = 1`` after a Jacobi scaling
    ``a = D b``, ``D = diag(G)^(-1/2)``: ``(D G D)_SS b = lam D 1, (D 1)^T b = 1``, with the
    constraint row scaled to entries <= 1. Unscaled, a support holding tasks far smaller
    than the largest one has a Gramian block that vanishes next to the row of ones, and
    ``pinv`` returns the wrong point (found by the property suite: a task 1e3 larger).
    """
    t = gram.shape[0]
    f = free.astype(gram.dtype)
    diag = jnp.diagonal(gram)
    pos = free & (diag > 0)
    dinv = jnp.where(pos, jax.lax.rsqrt(jnp.where(pos, diag, 1.0)), 1.0)
    c = jnp.max(jnp.where(free, dinv, 0.0))
    c = jnp.where(c > 0, c, 1.0)
    u = dinv / c * f
    k = jnp.zeros((t + 1, t + 1), gram.dtype)
    scaled = gram * dinv[:, None] * dinv[None, :]
    k = k.at[:t, :t].set(scaled * f[:, None] * f[None, :] + jnp.diag(1.0 - f))
    k = k.at[:t, t].set(u).at[t, :t].set(u)
    rhs = jnp.zeros((t + 1,), gram.dtype).at[t].set(1.0 / c)
    pinv = jnp.linalg.pinv(k, hermitian=True)
    sol = pinv @ rhs
    sol = sol + pinv @ (rhs - k @ sol)  # one step of iterative refinement
    return sol[:t] * dinv * f


def _active_set(gram: Array, a: Array, max_iters: int) -> tuple[Array, Array]:
    """Primal active-set polish started from a feasible ``a``; at most ``max_iters`` steps."""
    t = gram.shape[0]
    tol = 1e3 * jnp.finfo(gram.dtype).eps  # on the weights, which live on the simplex

    def kkt_violation(a):
        ga = gram @ a
        lam = a @ ga
        # >= 0 everywhere at the optimum; in units of the rounding scale of each entry.
        return (ga - lam) / _rounding_scale(gram, a)

    def cond(carry):
        _, _, it, done = carry
        return (it < max_iters) & ~done

    def body(carry):
        a, free, it, _ = carry
        p = _support_solve(gram, free)
        feasible = jnp.all(jnp.where(free, p >= -tol, True))
        # Ratio test towards p when it leaves the simplex; drop the blocking index.
        dec = free & (p < a - tol)
        ratios = jnp.where(dec & (p < -tol), a / jnp.where(dec, a - p, 1.0), jnp.inf)
        block = jnp.argmin(ratios)
        gamma = jnp.clip(jnp.min(ratios), 0.0, 1.0)
        moved = jnp.maximum(a + gamma * (p - a), 0.0)
        moved = moved.at[block].set(0.0)
        p_clean = jnp.maximum(p, 0.0)
        new_a = jnp.where(feasible, p_clean, moved)
        new_a = new_a / jnp.sum(new_a)
        free_after = jnp.where(feasible, free, free.at[block].set(False))
        # At a feasible support optimum: add the most violating index, or stop.
        viol = jnp.where(free_after, jnp.inf, kkt_violation(new_a))
        worst = jnp.argmin(viol)
        optimal = feasible & (viol[worst] >= -tol)
        free_next = jnp.where(feasible & ~optimal, free_after.at[worst].set(True), free_after)
        return new_a, free_next, it + 1, optimal

    # Start from the iterate with negligible coordinates dropped: fewer ratio-test steps.
    a = jnp.where(a > 1e-3 / t, a, 0.0)
    a = a / jnp.sum(a)
    free0 = a > 0
    init = (a, free0, jnp.array(0, jnp.int32), jnp.array(False))
    a_out, _, it, _ = jax.lax.while_loop(cond, body, init)
    return a_out, it


def min_norm_simplex(
    gram: Array, *, epsilon: float | Array = 1e-5, max_iters: int | Array = 250
) -> SimplexSolution:
    """``argmin_{a >= 0, sum(a) = 1} a^T G a`` for a PSD Gramian ``G``.

    Frank-Wolfe with pairwise steps and exact line search runs until the change in ``a``
    (L1) falls below ``epsilon``, the duality gap vanishes (the optimum is a vertex or has
    been reached), or ``max_iters`` iterations. An active-set phase (at most ``2T + 2``
    KKT solves on the support) then makes the result exact; it is kept only if it does not
    increase the objective. ``G`` is rescaled to unit maximum diagonal first (the
    minimiser is scale-invariant), so inputs from 1e-10 to 1e10 behave alike.
    """
    t = gram.shape[0]
    if t == 1:
        return SimplexSolution(jnp.ones((1,), gram.dtype), jnp.array(0, jnp.int32))
    scale = jnp.max(jnp.diagonal(gram))
    g = gram / jnp.where(scale > 0, scale, 1.0)
    g = 0.5 * (g + g.T)
    if t == 2:
        return SimplexSolution(two_task_min_norm(g), jnp.array(0, jnp.int32))
    a_fw, it_fw = _frank_wolfe(g, epsilon, max_iters)
    a_as, it_as = _active_set(g, a_fw, 2 * t + 2)
    # Keep the polished point unless it is worse by more than rounding (relative to the
    # objective's own scale: an absolute slack would accept a worse point whenever the
    # optimum is small next to the largest task).
    slack = 10.0 * jnp.finfo(g.dtype).eps * (a_fw @ jnp.abs(g) @ a_fw)
    better = _objective(g, a_as) <= _objective(g, a_fw) + slack
    ok = better & jnp.all(jnp.isfinite(a_as))
    a = jnp.where(ok, a_as, a_fw)
    # A zero gradient puts 0 in the hull: the weights are exactly on the zero rows.
    zero = jnp.diagonal(g) <= 0
    a = jnp.where(jnp.any(zero), zero.astype(g.dtype) / jnp.maximum(jnp.sum(zero), 1), a)
    return SimplexSolution(a, it_fw + it_as)
