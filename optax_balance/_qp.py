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


def psd_solve(mat: Array, rhs: Array) -> Array:
    """``mat^+ rhs`` for a symmetric PSD ``mat`` via its eigendecomposition.

    Eigenvalues below ``T * eps * lambda_max`` (numerically zero) are dropped, so a
    singular matrix gives the least-norm solution instead of infinities. One step of
    iterative refinement recovers most of the accuracy lost to conditioning.
    """
    vals, vecs = jnp.linalg.eigh(mat)
    cutoff = mat.shape[0] * jnp.finfo(mat.dtype).eps * jnp.max(jnp.abs(vals))
    inv = jnp.where(vals > cutoff, 1.0 / jnp.where(vals > cutoff, vals, 1.0), 0.0)

    def apply(r: Array) -> Array:
        return vecs @ (inv * (vecs.T @ r))

    x = apply(rhs)
    return x + apply(rhs - mat @ x)


def _face_solve(q_mat: Array, q_vec: Array, free: Array) -> Array:
    """Minimiser of ``1/2 z^T Q z + q^T z`` with ``z_i = 0`` off ``free`` (least norm)."""
    f = free.astype(q_mat.dtype)
    mat = q_mat * f[:, None] * f[None, :] + jnp.diag(1.0 - f)
    return psd_solve(mat, -q_vec * f) * f


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
    t = q_mat.shape[0]
    dtype = q_mat.dtype
    eps = jnp.finfo(dtype).eps
    abs_q = jnp.abs(q_mat)

    def threshold(z: Array) -> Array:
        # Below the rounding error of ``Q z + q`` the sign of a gradient entry means
        # nothing; a fixed tolerance above it would stop early on ill-conditioned Q
        # (a gradient of 1e-5 along an eigenvalue of 1e-4 is a weight error of 0.1).
        if tol is not None:
            return jnp.full((t,), tol, dtype)
        return 4.0 * eps * (abs_q @ jnp.abs(z) + jnp.abs(q_vec))

    def cond(carry):
        _, _, it, done = carry
        return (it < max_iters) & ~done

    def body(carry):
        z, free, it, _ = carry
        p = _face_solve(q_mat, q_vec, free)
        feasible = jnp.all(jnp.where(free, p > 0.0, True))
        # Ratio test: the largest step towards p that keeps z >= 0; fix the blocker.
        neg = free & (p <= 0.0)
        ratios = jnp.where(neg, z / jnp.where(z - p > 0, z - p, 1.0), jnp.inf)
        block = jnp.argmin(ratios)
        gamma = jnp.clip(ratios[block], 0.0, 1.0)
        stepped = jnp.maximum(z + gamma * (p - z), 0.0).at[block].set(0.0)
        z_new = jnp.where(feasible, p, stepped)
        free_new = jnp.where(feasible, free, free.at[block].set(False) & (stepped > 0))
        # On a face optimum: free the coordinate with the most negative gradient, or stop.
        grad = q_mat @ z_new + q_vec
        cand = jnp.where(free_new, jnp.inf, grad)
        j = jnp.argmin(cand)
        optimal = feasible & (cand[j] >= -threshold(z_new)[j])
        free_next = jnp.where(feasible & ~optimal, free_new.at[j].set(True), free_new)
        return z_new, free_next, it + 1, optimal

    z0 = jnp.zeros((t,), dtype)
    j0 = jnp.argmin(q_vec)
    done0 = q_vec[j0] >= -threshold(z0)[j0]  # z = 0 is already optimal
    free0 = jnp.zeros((t,), bool).at[j0].set(~done0)
    init = (z0, free0, jnp.array(0, jnp.int32), done0)
    z, _, it, _ = jax.lax.while_loop(cond, body, init)
    return QPSolution(z, it)


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


def check_pref_vector(
    pref_vector: object, num_tasks: int | None
) -> tuple[np.ndarray | None, int | None]:
    """Validates ``pref_vector`` (1-D, finite) against ``num_tasks``; returns it and T."""
    if pref_vector is None:
        return None, num_tasks
    try:
        pref = np.asarray(pref_vector, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"`pref_vector` must be a 1-D array of numbers, got {pref_vector!r}."
        ) from None
    if pref.ndim != 1 or pref.shape[0] < 1:
        raise ValueError(f"`pref_vector` must be a non-empty 1-D array, got shape {pref.shape}.")
    if not np.all(np.isfinite(pref)):
        raise ValueError(f"`pref_vector` must be finite, got {pref_vector!r}.")
    t = int(pref.shape[0])
    if num_tasks is not None and num_tasks != t:
        raise ValueError(
            f"`pref_vector` has {t} entries but num_tasks={num_tasks}; give one per task."
        )
    return pref, t


def pref_weights(pref: np.ndarray | None, num_tasks: int, dtype: jnp.dtype) -> Array:
    """The weights ``u`` of the combination to project: ``pref_vector``, or ``1/T``."""
    if pref is None:
        return jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
    return jnp.asarray(pref, dtype)
