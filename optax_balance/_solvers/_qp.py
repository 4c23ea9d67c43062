"""Small quadratic programs in weight space, in pure JAX.

* :func:`nonneg_qp`: ``argmin_{z >= 0} 1/2 z^T Q z + q^T z`` by a primal active-set method
  (Lawson & Hanson's NNLS scheme, written for a quadratic): every iteration solves the
  unconstrained problem on the current free set exactly, then either accepts it and frees
  the coordinate with the most negative gradient, or steps to the boundary and fixes the
  blocking coordinate. It ends at a point that meets the KKT conditions to working
  precision, in a finite number of steps for a positive definite ``Q``.
* :func:`project_to_dual_cone`: the weights of the projection of ``J^T u`` onto the dual
  cone ``{x : J x >= 0}`` of the rows of ``J``, from the Gramian alone (UPGrad, DualProj).
* :func:`normalize` / :func:`regularize`: the Gramian conventions of UPGrad and DualProj.

Everything runs in ``jax.lax.while_loop`` with fixed shapes; nothing leaves the device.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class QPSolution(NamedTuple):
    z: Array  # (..., T) the minimiser
    iterations: Array  # int32: active-set iterations (linear solves)


def normalize(gram: Array, norm_eps: float | Array) -> Array:
    """``G / trace(G)``, or zeros when ``trace(G) < norm_eps``.

    ``trace(G)`` is the squared Frobenius norm of the Jacobian, so this is the Gramian of
    ``J / ||J||_F``; a (near-)zero Jacobian gives the zero Gramian.
    """
    tr = jnp.trace(gram)
    small = tr < norm_eps
    return jnp.where(small, 0.0, gram / jnp.where(small, 1.0, tr))


def regularize(gram: Array, reg_eps: float | Array) -> Array:
    """``G + reg_eps * I``: makes the Gramian positive definite for the projection QP."""
    return gram + reg_eps * jnp.eye(gram.shape[0], dtype=gram.dtype)


def sym_solve(mat: Array, rhs: Array) -> Array:
    """``mat^+ rhs`` for a symmetric (possibly indefinite) ``mat`` via its eigendecomposition.

    Eigenvalues below ``T * eps * max|lambda|`` in magnitude (numerically zero) are
    dropped, so a singular matrix gives the least-norm solution instead of infinities. One
    step of iterative refinement recovers most of the accuracy lost to conditioning.
    """
    vals, vecs = jnp.linalg.eigh(mat)
    cutoff = mat.shape[0] * jnp.finfo(mat.dtype).eps * jnp.max(jnp.abs(vals))
    keep = jnp.abs(vals) > cutoff
    inv = jnp.where(keep, 1.0 / jnp.where(keep, vals, 1.0), 0.0)

    def apply(r: Array) -> Array:
        return vecs @ (inv * (vecs.T @ r))

    x = apply(rhs)
    return x + apply(rhs - mat @ x)


def _face_solve(q_mat: Array, q_vec: Array, free: Array, simplex: bool) -> Array:
    """Minimiser of ``1/2 z^T Q z + q^T z`` with ``z_i = 0`` off ``free`` (least norm),
    and ``sum(z) = 1`` when ``simplex`` (through the KKT system with its multiplier)."""
    t = q_mat.shape[0]
    f = free.astype(q_mat.dtype)
    mat = q_mat * f[:, None] * f[None, :] + jnp.diag(1.0 - f)
    if not simplex:
        return sym_solve(mat, -q_vec * f) * f
    k = jnp.zeros((t + 1, t + 1), q_mat.dtype).at[:t, :t].set(mat)
    k = k.at[:t, t].set(f).at[t, :t].set(f)
    rhs = jnp.concatenate([-q_vec * f, jnp.ones((1,), q_mat.dtype)])
    return sym_solve(k, rhs)[:t] * f


def _active_set(
    q_mat: Array, q_vec: Array, simplex: bool, max_iters: int, tol: float | None
) -> QPSolution:
    t = q_mat.shape[0]
    dtype = q_mat.dtype
    eps = jnp.finfo(dtype).eps
    abs_q = jnp.abs(q_mat)

    def multiplier(grad: Array, free: Array) -> Array:
        # The multiplier of sum(z) = 1: minus the (common) gradient on the free set.
        if not simplex:
            return jnp.zeros((), dtype)
        f = free.astype(dtype)
        return jnp.sum(grad * f) / jnp.maximum(jnp.sum(f), 1.0)

    def threshold(z: Array, nu: Array) -> Array:
        # Below the rounding error of ``Q z + q`` the sign of a gradient entry means
        # nothing; a fixed tolerance above it would stop early on ill-conditioned Q
        # (a gradient of 1e-5 along an eigenvalue of 1e-4 is a weight error of 0.1).
        if tol is not None:
            return jnp.full((t,), tol, dtype)
        return 4.0 * eps * (abs_q @ jnp.abs(z) + jnp.abs(q_vec) + jnp.abs(nu))

    def cond(carry):
        _, _, it, done = carry
        return (it < max_iters) & ~done

    def body(carry):
        z, free, it, _ = carry
        p = _face_solve(q_mat, q_vec, free, simplex)
        feasible = jnp.all(jnp.where(free, p > 0.0, True))
        # Ratio test: the largest step towards p that keeps z >= 0; fix the blocker.
        neg = free & (p <= 0.0)
        ratios = jnp.where(neg, z / jnp.where(z - p > 0, z - p, 1.0), jnp.inf)
        block = jnp.argmin(ratios)
        gamma = jnp.clip(ratios[block], 0.0, 1.0)
        stepped = jnp.maximum(z + gamma * (p - z), 0.0).at[block].set(0.0)
        if simplex:
            stepped = stepped / jnp.sum(stepped)
        z_new = jnp.where(feasible, p, stepped)
        free_new = jnp.where(feasible, free, free.at[block].set(False) & (stepped > 0))
        # On a face optimum: free the coordinate with the most negative reduced gradient,
        # or stop.
        grad = q_mat @ z_new + q_vec
        nu = multiplier(grad, free_new)
        cand = jnp.where(free_new, jnp.inf, grad - nu)
        j = jnp.argmin(cand)
        optimal = feasible & (cand[j] >= -threshold(z_new, nu)[j])
        free_next = jnp.where(feasible & ~optimal, free_new.at[j].set(True), free_new)
        return z_new, free_next, it + 1, optimal

    if simplex:
        j0 = jnp.argmin(0.5 * jnp.diagonal(q_mat) + q_vec)  # the best vertex
        z0 = jnp.zeros((t,), dtype).at[j0].set(1.0)
        free0 = jnp.zeros((t,), bool).at[j0].set(True)
        done0 = jnp.array(False)
    else:
        z0 = jnp.zeros((t,), dtype)
        j0 = jnp.argmin(q_vec)
        done0 = q_vec[j0] >= -threshold(z0, jnp.zeros((), dtype))[j0]  # z = 0 is optimal
        free0 = jnp.zeros((t,), bool).at[j0].set(~done0)
    init = (z0, free0, jnp.array(0, jnp.int32), done0)
    z, _, it, _ = jax.lax.while_loop(cond, body, init)
    return QPSolution(z, it)


def nonneg_qp(
    q_mat: Array, q_vec: Array, *, max_iters: int, tol: float | None = None
) -> QPSolution:
    """``argmin_{z >= 0} 1/2 z^T Q z + q^T z`` for a symmetric PSD ``Q`` (primal active set).

    KKT conditions at the result: ``z >= 0``, ``grad = Q z + q >= -tol`` and
    ``z_i * grad_i = 0``, with ``tol`` the rounding level of the gradient. Starts from
    ``z = 0`` (feasible); each iteration is one linear solve on the free set. With ``Q``
    positive definite the method terminates finitely (Lawson & Hanson 1974, ch. 23);
    ``max_iters`` bounds it in any case.

    Args:
      q_mat: ``(T, T)`` symmetric positive semi-definite matrix, scaled to O(1).
      q_vec: ``(T,)`` linear term.
      max_iters: maximum number of linear solves.
      tol: optimality tolerance on the gradient; by default the rounding error of each
        gradient entry, ``4 eps (|Q| |z| + |q|)``.

    Returns:
      A :class:`QPSolution` with the minimiser and the iterations used.
    """
    return _active_set(q_mat, q_vec, False, max_iters, tol)


def simplex_qp(
    q_mat: Array, q_vec: Array, *, max_iters: int, tol: float | None = None
) -> QPSolution:
    """``argmin_{z >= 0, sum(z) = 1} 1/2 z^T Q z + q^T z`` for a symmetric PSD ``Q``.

    The same primal active-set method as :func:`nonneg_qp`, started at the best vertex,
    with the equality constraint carried in each face solve. KKT conditions at the
    result: ``z`` on the simplex, ``grad_i - nu >= -tol`` for all ``i`` and ``= 0`` on the
    support, where ``nu`` is the multiplier (the common gradient on the support). Unlike
    :func:`optax_balance._simplex.min_norm_simplex` it takes a linear term directly,
    which matters for accuracy when that term dominates the quadratic.
    """
    return _active_set(q_mat, q_vec, True, max_iters, tol)


def default_max_iters(num_tasks: int) -> int:
    """Cap on active-set iterations; the method usually needs at most about 2T."""
    return int(10 * num_tasks + 10)


def project_to_dual_cone(u: Array, gram: Array, *, max_iters: int) -> QPSolution:
    """Weights ``v`` of the projection of ``J^T u`` onto the dual cone of ``J``'s rows.

    The projection of ``x = J^T u`` onto ``{y : J y >= 0}`` is ``J^T v`` with

    .. math::

      v = \\arg\\min_{v \\ge u} v^\\top G v

    (Quinton & Rey 2024, Proposition 1), solved as a non-negative QP in ``z = v - u``:
    ``min_{z >= 0} 1/2 z^T G z + (G u)^T z``. ``G`` must be positive definite (regularise
    it). ``u`` may carry leading batch axes; the solves are vmapped.

    Returns:
      A :class:`QPSolution` whose ``z`` field holds ``v`` (same shape as ``u``) and whose
      ``iterations`` is the largest iteration count over the batch (the vmapped loops
      run in lockstep).
    """
    if u.ndim == 1:
        sol = nonneg_qp(gram, gram @ u, max_iters=max_iters)
        return QPSolution(u + sol.z, sol.iterations)
    flat = u.reshape(-1, u.shape[-1])
    sol = jax.vmap(lambda r: nonneg_qp(gram, gram @ r, max_iters=max_iters))(flat)
    return QPSolution((flat + sol.z).reshape(u.shape), jnp.max(sol.iterations))


def pref_weights(pref: np.ndarray | None, num_tasks: int, dtype: jnp.dtype) -> Array:
    """The weights ``u`` of the combination to project: ``pref_vector``, or ``1/T``."""
    if pref is None:
        return jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
    return jnp.asarray(pref, dtype)
