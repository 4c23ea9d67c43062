"""Small dense quadratic programs in weight space: one active-set solver, in plain XLA ops.

``min 1/2 z^T Q z + q^T z`` over ``z >= 0`` (:func:`nonneg_qp`: UPGrad, DualProj) or over
the simplex (:func:`simplex_qp`: CAGrad, MGDA's polish in :func:`min_norm_simplex`), for
a symmetric positive semi-definite ``Q`` of a few to a few dozen rows. One primal
active-set method (Lawson & Hanson's NNLS scheme written for a quadratic; on the simplex
with ``q = 0`` it is Wolfe's minimum-norm-point method): each iteration takes the exact
minimiser on the current face (the free coordinates, the others at 0), accepts it or
steps to the boundary and fixes the blocking coordinate, and on a face optimum frees the
coordinate with the most negative reduced gradient; it ends when the KKT conditions hold
to the rounding level of the gradient.

No LAPACK call per iteration (a 32x32 ``solve`` or ``eigh`` costs 0.1-0.5 ms on CPU,
mostly BLAS threading, against a few microseconds for the update below). The solver keeps
the inverse ``H`` of the face matrix ``A_FF`` (``A = Q`` on ``z >= 0``; ``A = Q + e e^T``
on the simplex ``e^T z = 1``, positive definite on a face exactly when its points are
affinely independent), bordered with the identity off the face, and updates it when a
coordinate enters (bordering with the Schur complement ``s = A_jj - a_j^T H a_j``) or
leaves (deflation): one rank-one update of a ``T x T`` array. Every face solve is followed
by one step of iterative refinement against ``A`` itself, so the error of the updated
inverse does not accumulate into the solution. A coordinate whose Schur complement is at
the rounding level (it depends on the face: a duplicate gradient, or one in the affine
hull of the face) is not bordered in; it enters by a degenerate pivot instead (a step
along the null direction it makes with the face, until a face coordinate reaches 0 and
leaves), which replaces the eigenvalue cut-off of a pseudo-inverse: a singular ``Q`` is
fine. ``Q`` is first scaled to a unit diagonal (``z = D y``), so tasks
whose gradients differ by orders of magnitude are resolved to their own scale.

Up to four coordinates (:data:`_ENUM_T`) there is no loop: all ``2^T`` faces are
solved at once in closed form and the best feasible point is kept (:func:`_enumerated`),
exact by the same argument. On XLA:CPU a ``while_loop`` costs tens of microseconds per
call in thunk dispatch whatever its size: a T=2 projection took 66 us in the loop and
takes 7-9 us without it (AMD EPYC Zen 5; benchmarks/RESULTS.md has the method timings).
``max_iters`` does not apply there, and ``iterations`` reports the size of the final face
(the face solves the loop would need from ``z = 0`` without a drop).

Why one solver serves MGDA, UPGrad, DualProj and CAGrad: all four are this QP on a
Gramian; MGDA's Frank-Wolfe phase (the paper's algorithm) only provides the warm start.
Everything runs in ``jax.lax`` loops with fixed shapes; nothing leaves the device.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Optimality: a reduced gradient above -_KKT_TOL * eps * (its rounding scale) counts as 0.
_KKT_TOL = 8.0
# Independence: a Schur complement below _DEP_TOL * T * eps * (its rounding scale) is 0.
_DEP_TOL = 4.0


class QPSolution(NamedTuple):
    z: Array  # (..., T) the minimiser
    iterations: Array  # int32: active-set iterations (face solves)
    free: Array  # (T,) bool: the final face
    inverse: Array  # (T, T): the inverse of the (scaled) final face matrix


class _Scaled(NamedTuple):
    a: Array  # (T, T) face matrix D Q D (+ e e^T on the simplex)
    qs: Array  # (T, T) D Q D
    q: Array  # (T,) D q
    d: Array  # (T,) z = d * y
    e: Array  # (T,) constraint e^T y = rho (zeros on z >= 0)
    rho: Array  # ()


def _scale(q_mat: Array, q_vec: Array, simplex: bool) -> _Scaled:
    diag = jnp.diagonal(q_mat)
    d = jnp.where(diag > 0, jax.lax.rsqrt(jnp.where(diag > 0, diag, 1.0)), 1.0)
    qs = q_mat * d[:, None] * d[None, :]
    c = jnp.max(d)
    e = d / c if simplex else jnp.zeros_like(d)
    a = qs + e[:, None] * e[None, :]
    return _Scaled(a, qs, q_vec * d, d, e, (1.0 / c) if simplex else jnp.zeros((), d.dtype))


def _apply_a(p: _Scaled, free: Array, v: Array) -> Array:
    """The face matrix times ``v`` (``(T,)`` or ``(T, k)``): ``A_FF`` on the face, ``I`` off it."""
    f = free.astype(v.dtype)
    f = f if v.ndim == 1 else f[:, None]
    return (p.a @ (v * f)) * f + v * (1.0 - f)


def _refined(p: _Scaled, h: Array, free: Array, rhs: Array) -> Array:
    """``A_F^{-1} rhs`` from the kept inverse, with one step of iterative refinement."""
    x = h @ rhs
    return x + h @ (rhs - _apply_a(p, free, x))


def _outer(a: Array, b: Array) -> Array:
    """``a b^T`` as a one-term dot (exact: one product per entry). Under UPGrad's vmap the
    broadcast product was XLA:CPU's slowest op of an iteration at T=32 (four (T, T, T)
    updates, ~20 us each); as a dot, UPGrad's T=32 weighting took 4.0-4.1 ms against
    4.9-5.0 ms (min, two of three interleaved pairs; the third tied; T=8 within noise;
    Zen 3)."""
    return a[:, None] @ b[None, :]


def _rank_one(h: Array, j: Array, w: Array, beta: Array, gamma: Array) -> Array:
    """``H + w w^T / beta + gamma e_j e_j^T`` (``beta = inf``: no change)."""
    upd = h + _outer(w / beta, w)
    return upd.at[j, j].add(gamma)


def _schur(p: _Scaled, h: Array, free: Array, j: Array) -> tuple[Array, Array, Array]:
    """``(u, s, scale)`` for adding ``j``: ``u = A_F^{-1} a_j``, ``s = A_jj - a_j^T u``."""
    col = jnp.where(free, p.a[:, j], 0.0)
    u = _refined(p, h, free, col)
    # Rounding scale of s: a backward-stable solve is exact for A_F + E, |E| <= c eps |A_F|,
    # which moves s by u^T E u.
    au = jnp.abs(u)
    scale = p.a[j, j] + au @ (jnp.abs(p.a) @ au)
    return u, p.a[j, j] - col @ u, scale


def _add(p: _Scaled, h: Array, free: Array, j: Array, ok: Array) -> tuple[Array, Array, Array]:
    """Border ``H`` with coordinate ``j`` where ``ok`` and ``j`` is independent of the face
    (its Schur complement above rounding level); returns ``(H, free, added)``."""
    u, s, scale = _schur(p, h, free, j)
    ok = ok & (s > _DEP_TOL * p.a.shape[0] * jnp.finfo(s.dtype).eps * scale)
    w = u.at[j].set(-1.0)
    h_new = _rank_one(h, j, w, jnp.where(ok, s, jnp.inf), jnp.where(ok, -1.0, 0.0))
    return h_new, free.at[j].set(free[j] | ok), ok


def _drop(p: _Scaled, h: Array, free: Array, j: Array, ok: Array) -> tuple[Array, Array]:
    """Deflate coordinate ``j`` out of ``H`` where ``ok`` (else unchanged)."""
    w = h[:, j]
    h_new = h - _outer(w / jnp.where(ok, w[j], jnp.inf), w)
    # Row and column j are zero up to rounding; make them exactly the identity's.
    unit = jnp.zeros_like(w).at[j].set(1.0)
    h_new = h_new.at[j, :].set(jnp.where(ok, unit, h_new[j, :]))
    h_new = h_new.at[:, j].set(jnp.where(ok, unit, h_new[:, j]))
    return h_new, free.at[j].set(free[j] & ~ok)


def _face_solve(p: _Scaled, h: Array, free: Array, lin: Array) -> tuple[Array, Array]:
    """Minimiser ``y`` on the face of ``1/2 y^T Q y + lin^T y`` (and ``e^T y = rho``), and
    the multiplier ``nu`` (reduced gradient ``Q y + lin - nu e``)."""
    f = free.astype(h.dtype)
    # Two matrix-vector solves, not one with a (T, 2) right-hand side: XLA:CPU hands the
    # (batched) two-column product to YNNPACK, which takes 28 us for it at T=32 under
    # UPGrad's vmap against ~4 us per matrix-vector product (whole projection, 20
    # iterations: 6.2-6.8 -> 4.5-5.0 ms; T=5 0.45 -> 0.23 ms; T=8 unchanged; Zen 3).
    v1 = _refined(p, h, free, p.e * f)
    v2 = _refined(p, h, free, lin * f)
    den = jnp.sum(p.e * v1)
    mu = jnp.where(den > 0, (p.rho + jnp.sum(p.e * v2)) / jnp.where(den > 0, den, 1.0), 0.0)
    return (mu * v1 - v2) * f, mu - p.rho


def _objective(p: _Scaled, y: Array) -> Array:
    return 0.5 * y @ p.qs @ y + p.q @ y


def _objective_scale(p: _Scaled, y: Array) -> Array:
    """What the rounding errors of :func:`_objective` are proportional to."""
    ay = jnp.abs(y)
    return ay @ jnp.abs(p.qs) @ ay + jnp.abs(p.q) @ ay


class _Carry(NamedTuple):
    y: Array  # (T,) the iterate (scaled)
    h: Array  # (T, T) inverse of the face matrix
    free: Array  # (T,) bool: the face
    it: Array
    done: Array
    blocked: Array  # (T,) bool: may not enter until the iterate moves
    last: Array  # the coordinate added by the previous iteration, or -1
    ref: Array  # the objective at the last face optimum (inf before the first)


def _swap_in(
    p: _Scaled, simplex: bool, y: Array, h: Array, free: Array, j: Array, ok: Array
) -> tuple[Array, Array, Array, Array]:
    """A degenerate pivot: bring in ``j``, whose column depends on the face (where ``ok``).

    With ``u = A_F^{-1} a_j`` and a Schur complement at rounding level, ``delta = e_j -
    u`` is (to rounding) a null direction of ``Q`` with ``e^T delta = 0``: moving along it
    keeps the point ``J^T y`` and the constraint, and changes the objective at the rate
    of ``j``'s (negative) reduced gradient. Step until a face coordinate reaches 0 (ratio
    test), drop it, then add ``j`` to the smaller face. Without such a step (no ``u_i >
    0``) nothing changes. Returns ``(y, H, free, added)``.
    """
    u, _, _ = _schur(p, h, free, j)
    pos = free & (u > 0) & ok
    ratios = jnp.where(pos, y / jnp.where(pos, u, 1.0), jnp.inf)
    out = jnp.argmin(ratios)
    can = ok & jnp.isfinite(ratios[out])
    step = jnp.where(can, ratios[out], 0.0)
    moved = jnp.maximum(jnp.where(free, y - step * u, y).at[j].add(step), 0.0).at[out].set(0.0)
    if simplex:
        moved = moved * (p.rho / jnp.sum(p.e * moved))
    h, free = _drop(p, h, free, out, can)
    h, free, added = _add(p, h, free, j, can)
    return jnp.where(can, moved, y), h, free, added


def _iteration(p: _Scaled, simplex: bool, c: _Carry) -> _Carry:
    """One active-set iteration: a face solve, then a drop (ratio test) or an add."""
    eps = jnp.finfo(p.a.dtype).eps
    face, nu = _face_solve(p, c.h, c.free, p.q)
    feasible = jnp.all(jnp.where(c.free, face > 0.0, True))
    # Ratio test: the longest step towards the face optimum that keeps y >= 0.
    neg = c.free & (face <= 0.0)
    ratios = jnp.where(neg, c.y / jnp.where(c.y - face > 0, c.y - face, 1.0), jnp.inf)
    out = jnp.argmin(ratios)
    gamma = jnp.clip(ratios[out], 0.0, 1.0)
    stepped = jnp.maximum(c.y + gamma * (face - c.y), 0.0).at[out].set(0.0)
    if simplex:
        stepped = stepped * (p.rho / jnp.sum(p.e * stepped))
    y = jnp.where(feasible, face, stepped)
    h, free = _drop(p, c.h, c.free, out, ~feasible)
    # The coordinate added last leaves at once without a step: its addition failed
    # numerically (a nearly dependent face); it may not enter again until y moves.
    failed = ~feasible & (out == c.last) & (gamma <= 0.0)
    moved = jnp.where(feasible, c.last >= 0, gamma > 0.0)
    blocked = jnp.where(moved, False, c.blocked)
    blocked = blocked.at[out].set(blocked[out] | failed)
    # Each face optimum after an addition is strictly lower than the one before it
    # (exact arithmetic); within rounding of it, the addition was noise: stop. A step that
    # raises the objective beyond rounding comes from a face solve that lost its accuracy
    # (a face nearly singular in float32): stop at the previous iterate.
    obj = _objective(p, y)
    tol = _KKT_TOL * eps * _objective_scale(p, y)
    stalled = feasible & (obj >= c.ref - tol)
    worse = obj > _objective(p, c.y) + tol
    # On a face optimum: free the most negative reduced gradient, or stop.
    grad = p.qs @ y + p.q - nu * p.e
    thr = _KKT_TOL * eps * (jnp.abs(p.qs) @ jnp.abs(y) + jnp.abs(p.q) + jnp.abs(nu) * p.e)
    cand = jnp.where(free | blocked | (grad >= -thr), jnp.inf, grad)
    j = jnp.argmin(cand)
    optimal = feasible & (~jnp.isfinite(cand[j]) | stalled)
    enter = feasible & ~optimal
    h, free, added = _add(p, h, free, j, enter)
    y, h, free, added = _swap_in(p, simplex, y, h, free, j, enter & ~added)
    blocked = blocked.at[j].set(blocked[j] | (enter & ~added))  # could not enter: skip it
    last = jnp.where(added, j, -1).astype(c.last.dtype)
    ref = jnp.where(feasible, obj, c.ref)
    new = _Carry(y, h, free, c.it + 1, optimal, blocked, last, ref)
    old = c._replace(it=c.it + 1, done=jnp.array(True))
    return jax.tree.map(lambda a, b: jnp.where(worse, a, b), old, new)


def _solve(
    p: _Scaled,
    start: tuple[Array, Array, Array, Array],
    simplex: bool,
    max_iters: int | Array,
) -> tuple[Array, Array, Array, Array]:
    """The active-set loop from ``start = (y, H, free, done)``; returns ``(y, H, free, it)``."""
    y0, h0, free0, done0 = start
    t = p.a.shape[0]
    zero = jnp.array(0, jnp.int32)
    inf = jnp.array(jnp.inf, y0.dtype)
    init = _Carry(y0, h0, free0, zero, done0, jnp.zeros((t,), bool), zero - 1, inf)
    out = jax.lax.while_loop(
        lambda c: (c.it < max_iters) & ~c.done, lambda c: _iteration(p, simplex, c), init
    )
    return out.y, out.h, out.free, out.it


def _empty(p: _Scaled) -> tuple[Array, Array]:
    t = p.a.shape[0]
    return jnp.eye(t, dtype=p.a.dtype), jnp.zeros((t,), bool)


# Up to this many coordinates the QPs skip the active-set loop: every face is solved at
# once and the best feasible point is kept. A while loop costs XLA:CPU tens of
# microseconds per call in thunk dispatch whatever its size, more than all 2^T face
# solves of a tiny QP. Quiet EPYC, us per call, loop -> faces: T=2 projection 66 -> 7,
# simplex 75 -> 8; T=4 projection (4 vmapped) 104 -> 82, simplex 75 -> 33, MGDA 74 -> 34;
# at T=5 the projection gains 10% only (106 against 116 us).
_ENUM_T = 4


def _gauss_jordan(m: Array) -> tuple[Array, Array]:
    """``(M^-1 det(M), det(M))`` of symmetric positive semi-definite ``(F, T, T)``
    matrices by Gauss-Jordan elimination without pivoting (the pivots are the Schur
    complements, >= 0), unrolled over T, elementwise ops only."""
    t = m.shape[-1]
    a, inv = m, jnp.broadcast_to(jnp.eye(t, dtype=m.dtype), m.shape)
    det = jnp.ones(m.shape[:-2], m.dtype)
    rows = jnp.arange(t)
    for k in range(t):
        piv = a[..., k, k]
        det = det * piv
        safe = jnp.where(piv != 0, piv, 1.0)[..., None]
        ra, ri = a[..., k, :] / safe, inv[..., k, :] / safe
        col = a[..., :, k][..., None]
        at_k = (rows == k)[:, None]
        a = jnp.where(at_k, ra[..., None, :], a - col * ra[..., None, :])
        inv = jnp.where(at_k, ri[..., None, :], inv - col * ri[..., None, :])
    return inv * det[..., None, None], det


def _small_inverse(m: Array) -> tuple[Array, Array]:
    """``(adj(M), det(M))`` of symmetric ``(F, T, T)`` matrices in elementwise ops: the
    closed form at T=2 (7 us for a T=2 projection, against 12 us by elimination), else
    :func:`_gauss_jordan` (at T=3 2-3x faster than the cofactors via ``jnp.cross``)."""
    if m.shape[-1] != 2:
        return _gauss_jordan(m)
    a, b, d = m[..., 0, 0], m[..., 0, 1], m[..., 1, 1]
    adj = jnp.stack([jnp.stack([d, -b], -1), jnp.stack([-b, a], -1)], -2)
    return adj, a * d - b * b


def _enumerated(p: _Scaled, simplex: bool) -> tuple[Array, Array, Array, Array]:
    """The exact minimiser by enumeration of faces: ``(y, H, free, face size)``.

    The face matrix of each of the ``2^T`` faces (``A_FF``, the identity off the face) is
    inverted in elementwise ops (:func:`_small_inverse`); a face whose determinant is at
    the rounding level of its diagonal (dependent gradients) is skipped. Each face's
    minimiser (:func:`_face_solve`'s formulas, with one step of iterative refinement) is
    moved into the feasible set (negative entries set to 0; on the simplex, rescaled onto
    ``e^T y = rho``). Every
    candidate is then a feasible point, and the face of the optimum yields the optimum
    itself (a face with a non-singular matrix always holds one: along a null direction
    the objective is constant, so the support can shrink), so the candidate of least
    objective is the minimiser, to rounding.
    """
    t = p.a.shape[0]
    dt = p.a.dtype
    eps = jnp.finfo(dt).eps
    f = jnp.asarray(np.array([[(k >> i) & 1 for i in range(t)] for k in range(2**t)]), dt)
    eye = jnp.eye(t, dtype=dt)
    mat = p.a * f[:, :, None] * f[:, None, :] + eye * (1.0 - f)[:, :, None]
    adj, det = _small_inverse(mat)
    diag = jnp.prod(jnp.diagonal(mat, axis1=-2, axis2=-1), -1)
    ok = det > _DEP_TOL * t * eps * diag
    inv = adj / jnp.where(ok, det, 1.0)[:, None, None]

    # _face_solve's formulas written for all faces at once: vmapping _face_solve and
    # _objective instead measured 2-3x slower (T=2 projection 25 against 7 us, T=4
    # simplex QP 64 against 36 us; its stacked right-hand sides become dot thunks).
    def solve(rhs: Array) -> Array:  # (F, T): A_F^{-1} rhs, refined once
        x = jnp.einsum("fij,fj->fi", inv, rhs)
        return x + jnp.einsum("fij,fj->fi", inv, rhs - jnp.einsum("fij,fj->fi", mat, x))

    v2 = solve(p.q * f)
    if simplex:
        v1 = solve(p.e * f)
        den = jnp.sum(p.e * v1, -1)
        mu = jnp.where(den > 0, (p.rho + jnp.sum(p.e * v2, -1)) / jnp.where(den > 0, den, 1.0), 0.0)
        y = jnp.maximum((mu[:, None] * v1 - v2) * f, 0.0)
        s = jnp.sum(p.e * y, -1)
        ok = ok & (s > 0)
        y = y * (p.rho / jnp.where(s > 0, s, 1.0))[:, None]
    else:
        y = jnp.maximum(-v2 * f, 0.0)
    obj = 0.5 * jnp.einsum("fi,ij,fj->f", y, p.qs, y) + y @ p.q
    k = jnp.argmin(jnp.where(ok & ~jnp.isnan(obj), obj, jnp.inf))
    free = f[k] > 0
    return y[k], jnp.where(ok[k], inv[k], eye), free, jnp.sum(free).astype(jnp.int32)


def nonneg_qp(q_mat: Array, q_vec: Array, *, max_iters: int | Array) -> QPSolution:
    """``argmin_{z >= 0} 1/2 z^T Q z + q^T z`` for a symmetric PSD ``Q`` (primal active set).

    KKT conditions at the result: ``z >= 0``, ``grad = Q z + q >= -tol`` and
    ``z_i grad_i = 0``, ``tol`` the rounding level of each gradient entry. Starts from
    ``z = 0``; each iteration is one face solve. With ``Q`` positive definite the method
    ends finitely (Lawson & Hanson 1974, ch. 23); ``max_iters`` bounds it in any case.
    """
    p = _scale(q_mat, q_vec, False)
    if q_vec.shape[0] <= _ENUM_T:
        y, h, free, size = _enumerated(p, False)
        return QPSolution(p.d * y, size, free, h)
    h, free = _empty(p)
    y0 = jnp.zeros_like(q_vec)
    j0 = jnp.argmin(p.q)
    done0 = p.q[j0] >= -_KKT_TOL * jnp.finfo(p.q.dtype).eps * jnp.abs(p.q[j0])
    h, free, _ = _add(p, h, free, j0, ~done0)
    y, h, free, it = _solve(p, (y0, h, free, done0), False, max_iters)
    return QPSolution(p.d * y, it, free, h)


def simplex_qp(
    q_mat: Array, q_vec: Array, *, max_iters: int | Array, start: Array | None = None
) -> QPSolution:
    """``argmin_{z >= 0, sum(z) = 1} 1/2 z^T Q z + q^T z`` for a symmetric PSD ``Q``.

    The same active-set method, started at the best vertex, or at ``start`` (a point of
    the simplex: its support, largest weights first, is taken as the first face, less the
    coordinates that depend on those before them). KKT conditions at the result: ``z``
    on the simplex, ``grad_i - nu >= -tol`` for all ``i``, ``= 0`` on the support, ``nu``
    the multiplier.
    """
    p = _scale(q_mat, q_vec, True)
    if q_vec.shape[0] <= _ENUM_T:
        y, h, free, size = _enumerated(p, True)
        return QPSolution(p.d * y, size, free, h)
    h, free = _empty(p)
    if start is None:
        j0 = jnp.argmin(0.5 * jnp.diagonal(q_mat) + q_vec)
        h, free, _ = _add(p, h, free, j0, jnp.array(True))
        y0 = jnp.where(free, 1.0 / p.d, 0.0)
    else:
        y_start = start / p.d

        def add_next(k, hf):
            j = order[k]
            return _add(p, hf[0], hf[1], j, y_start[j] > 0)[:2]

        order = jnp.argsort(-y_start)
        h, free = jax.lax.fori_loop(0, q_vec.shape[0], add_next, (h, free))
        y0 = jnp.where(free, y_start, 0.0)
    y0 = y0 * (p.rho / jnp.sum(p.e * y0))
    y, h, free, it = _solve(p, (y0, h, free, jnp.array(False)), True, max_iters)
    return QPSolution(p.d * y, it, free, h)


def face_point(q_mat: Array, q_vec: Array, sol: QPSolution) -> Array:
    """The minimiser over ``sol``'s final face (``sum(z) = 1``) for another linear term.

    ``sol`` is a :func:`simplex_qp` solution on ``q_mat``; the point is affine in
    ``q_vec`` (CAGrad's closed-form root uses that).
    """
    p = _scale(q_mat, q_vec, True)
    y, _ = _face_solve(p, sol.inverse, sol.free, p.q)
    return p.d * y


def default_max_iters(num_tasks: int) -> int:
    """Cap on active-set iterations; the method usually needs at most about 2T."""
    return int(10 * num_tasks + 10)


# ----------------------------------------------------------------------------------------
# MGDA: the minimum-norm point of a convex hull (Frank-Wolfe, then the active set).
# ----------------------------------------------------------------------------------------


def two_task_min_norm(gram: Array) -> Array:
    """Closed form for T=2: ``a1 = clip((G22 - G12) / (G11 + G22 - 2 G12), 0, 1)``."""
    g11, g12, g22 = gram[0, 0], gram[0, 1], gram[1, 1]
    den = g11 + g22 - 2.0 * g12
    safe = jnp.where(den > 0, den, 1.0)
    # Duplicate gradients (den == 0): every point of the segment is optimal; 0.5 keeps
    # the permutation symmetry.
    a1 = jnp.where(den > 0, jnp.clip((g22 - g12) / safe, 0.0, 1.0), 0.5)
    return jnp.stack([a1, 1.0 - a1])


def _frank_wolfe(
    gram: Array, epsilon: float | Array, max_iters: int | Array
) -> tuple[Array, Array]:
    """Pairwise Frank-Wolfe with exact line search from the centre of the simplex.

    Stops when the L1 change of ``a`` is below ``epsilon``, the duality gap is at the
    rounding scale of ``G a`` (the optimum is a vertex or has been reached), or after
    ``max_iters`` iterations.
    """
    t = gram.shape[0]
    eps = jnp.finfo(gram.dtype).eps
    abs_gram = jnp.abs(gram)

    def cond(c):
        _, it, change, gap, noise = c
        return (it < max_iters) & (change >= epsilon) & (gap > 10.0 * noise)

    def body(c):
        a, it, _, _, _ = c
        ga = gram @ a
        s = jnp.argmin(ga)  # Frank-Wolfe vertex
        v = jnp.argmax(jnp.where(a > 0, ga, -jnp.inf))  # away vertex
        curv = gram[s, s] + gram[v, v] - 2.0 * gram[s, v]
        step = jnp.where(curv > 0, (ga[v] - ga[s]) / jnp.where(curv > 0, curv, 1.0), a[v])
        step = jnp.where(s == v, 0.0, jnp.clip(step, 0.0, a[v]))
        new = jnp.maximum(a.at[s].add(step).at[v].add(-step), 0.0)
        gap = a @ ga - ga[s]
        return new, it + 1, jnp.sum(jnp.abs(new - a)), gap, eps * jnp.max(abs_gram @ a)

    inf = jnp.array(jnp.inf, gram.dtype)
    init = (
        jnp.full((t,), 1.0 / t, gram.dtype),
        jnp.array(0, jnp.int32),
        inf,
        inf,
        jnp.zeros_like(inf),
    )
    a, it, _, _, _ = jax.lax.while_loop(cond, body, init)
    return a, it


def min_norm_simplex(
    gram: Array, *, epsilon: float | Array = 1e-5, max_iters: int | Array = 250
) -> QPSolution:
    """``argmin_{a >= 0, sum(a) = 1} a^T G a`` for a PSD Gramian ``G`` (MGDA).

    Frank-Wolfe (:func:`_frank_wolfe`) finds the support; :func:`simplex_qp` started
    there makes the result exact (KKT conditions to rounding level), and is kept unless
    it stopped at its cap with a larger objective. ``G`` is rescaled to unit maximum
    diagonal (the minimiser is scale-invariant). T=1 and T=2 are closed forms; a zero
    gradient puts 0 in the hull, and the weights are then spread on the zero rows.
    """
    t = gram.shape[0]
    zero_it = jnp.array(0, jnp.int32)
    if t == 1:
        return QPSolution(jnp.ones((1,), gram.dtype), zero_it, jnp.ones((1,), bool), gram * 0.0)
    scale = jnp.max(jnp.diagonal(gram))
    g = gram / jnp.where(scale > 0, scale, 1.0)
    g = 0.5 * (g + g.T)
    if t == 2:
        return QPSolution(two_task_min_norm(g), zero_it, jnp.ones((2,), bool), g * 0.0)
    cap = default_max_iters(t)
    if t <= _ENUM_T:  # every face at once: no Frank-Wolfe start needed
        sol = simplex_qp(g, jnp.zeros((t,), g.dtype), max_iters=cap)
        a, it = sol.z, sol.iterations
    else:
        a_fw, it_fw = _frank_wolfe(g, epsilon, max_iters)
        sol = simplex_qp(g, jnp.zeros((t,), g.dtype), max_iters=cap, start=a_fw)
        slack = 10.0 * jnp.finfo(g.dtype).eps * (a_fw @ jnp.abs(g) @ a_fw)
        better = (sol.iterations < cap) | (sol.z @ g @ sol.z <= a_fw @ g @ a_fw + slack)
        a = jnp.where(better & jnp.all(jnp.isfinite(sol.z)), sol.z, a_fw)
        it = it_fw + sol.iterations
    zero = jnp.diagonal(g) <= 0
    a = jnp.where(jnp.any(zero), zero.astype(g.dtype) / jnp.maximum(jnp.sum(zero), 1), a)
    return QPSolution(a, it, sol.free, sol.inverse)


# ----------------------------------------------------------------------------------------
# UPGrad and DualProj: projections onto the dual cone, and their Gramian conventions.
# ----------------------------------------------------------------------------------------


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


def project_to_dual_cone(u: Array, gram: Array, *, max_iters: int) -> QPSolution:
    """Weights ``v`` of the projection of ``J^T u`` onto the dual cone of ``J``'s rows.

    The projection of ``x = J^T u`` onto ``{y : J y >= 0}`` is ``J^T v`` with
    ``v = argmin_{v >= u} v^T G v`` (Quinton & Rey 2024, Proposition 1), solved as the
    non-negative QP ``min_{z >= 0} 1/2 z^T G z + (G u)^T z`` in ``z = v - u``. ``u`` may
    carry leading batch axes (the solves are vmapped and run in lockstep; ``iterations``
    is the largest count). Returns the solution with ``z`` holding ``v``.
    """
    flat = u.reshape(-1, u.shape[-1])
    sol = jax.vmap(lambda r: nonneg_qp(gram, gram @ r, max_iters=max_iters))(flat)
    v = (flat + sol.z).reshape(u.shape)
    return QPSolution(v, jnp.max(sol.iterations), sol.free, sol.inverse)


def pref_weights(pref: np.ndarray | None, num_tasks: int, dtype: jnp.dtype) -> Array:
    """The weights ``u`` of the combination to project: ``pref_vector``, or ``1/T``."""
    if pref is None:
        return jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
    return jnp.asarray(pref, dtype)
