"""Independent NumPy/SciPy references for the solver-based weightings (test-only).

Written from the papers' definitions, in float64, with SciPy's solvers; they share no
code with the library.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize


def torchjd_gram(jac: np.ndarray, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> np.ndarray:
    """``J J^T / ||J||_F^2 + reg_eps I`` (zeros instead of the first term if tiny)."""
    g = jac @ jac.T
    tr = np.trace(g)
    g = np.zeros_like(g) if tr < norm_eps else g / tr
    return g + reg_eps * np.eye(len(g))


def dual_cone_weights(a: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """``argmin_{v >= a} v^T G v`` as a bounded least-squares problem (SciPy's BVLS).

    With ``G = L L^T``, ``v^T G v = ||L^T v||^2``; BVLS is an exact active-set method.
    """
    lower = np.linalg.cholesky(gram)
    res = optimize.lsq_linear(
        lower.T, np.zeros(len(a)), bounds=(a, np.inf), method="bvls", tol=1e-14
    )
    return res.x


def upgrad_weights(jac: np.ndarray, pref=None, norm_eps=1e-4, reg_eps=1e-4) -> np.ndarray:
    t = jac.shape[0]
    u = np.full(t, 1.0 / t) if pref is None else np.asarray(pref, float)
    gram = torchjd_gram(jac, norm_eps, reg_eps)
    return sum(dual_cone_weights(u[i] * np.eye(t)[i], gram) for i in range(t))


def dualproj_weights(jac: np.ndarray, pref=None, norm_eps=1e-4, reg_eps=1e-4) -> np.ndarray:
    t = jac.shape[0]
    u = np.full(t, 1.0 / t) if pref is None else np.asarray(pref, float)
    return dual_cone_weights(u, torchjd_gram(jac, norm_eps, reg_eps))


def projection_onto_dual_cone(x: np.ndarray, jac: np.ndarray) -> np.ndarray:
    """``argmin_{J y >= 0} ||y - x||`` in the primal (parameter) space, by SLSQP.

    A check of Proposition 1 itself (the weight-space QP gives the same point).
    """
    res = optimize.minimize(
        lambda y: 0.5 * np.sum((y - x) ** 2),
        x,
        jac=lambda y: y - x,
        constraints=[{"type": "ineq", "fun": lambda y: jac @ y, "jac": lambda y: jac}],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    return res.x


def random_jacobian(
    rng: np.random.Generator, t: int, n: int, rank: int | None = None
) -> np.ndarray:
    """Random rows with a shared component and varied norms (some conflict, some not).

    ``rank`` (< min(t, n)) confines the rows to a random subspace of that dimension.
    """
    base = rng.normal(size=(1, n))
    if rank is None:
        jac = rng.normal(size=(t, n)) + 0.5 * base
    else:
        jac = rng.normal(size=(t, rank)) @ rng.normal(size=(rank, n)) / np.sqrt(rank)
        jac = jac + 0.5 * rng.normal(size=(1, rank)) @ rng.normal(size=(rank, n)) / np.sqrt(rank)
    return jac * np.exp(rng.uniform(-1.0, 1.0, size=(t, 1)))


def random_cases(rng: np.random.Generator, t: int, n: int = 24):
    """Jacobians of one shape (one compilation): full row rank, rank 3, rank 1."""
    return [
        random_jacobian(rng, t, n),
        random_jacobian(rng, t, n, rank=min(3, t)),
        random_jacobian(rng, t, n, rank=1),
    ]


HOSTILE = {
    "zero": lambda t: np.zeros((t, 5)),
    "duplicate": lambda t: np.tile(np.array([[1.0, -2.0, 0.5, 0.0, 3.0]]), (t, 1)),
    "opposite": lambda t: np.array(
        [[1.0, 2.0, -1.0, 0.0, 0.5] if i % 2 else [-1.0, -2.0, 1.0, 0.0, -0.5] for i in range(t)]
    ),
}
SCALES = [1e-10, 1e-5, 1.0, 1e5, 1e10]


def cagrad_direction(jac: np.ndarray, c: float) -> np.ndarray:
    """CAGrad's primal (Liu et al. 2021, Eq. 2), without rescaling, by SLSQP:

    ``max_{d, s} s  s.t.  J d >= s,  ||d - g0||^2 <= (c ||g0||)^2``.
    """
    g0 = jac.mean(0)
    r2 = c**2 * (g0 @ g0)
    n = jac.shape[1]
    x0 = np.concatenate([g0, [np.min(jac @ g0)]])
    res = optimize.minimize(
        lambda x: -x[-1],
        x0,
        jac=lambda x: np.concatenate([np.zeros(n), [-1.0]]),
        constraints=[
            {
                "type": "ineq",
                "fun": lambda x: jac @ x[:n] - x[-1],
                "jac": lambda x: np.hstack([jac, -np.ones((len(jac), 1))]),
            },
            {
                "type": "ineq",
                "fun": lambda x: r2 - np.sum((x[:n] - g0) ** 2),
                "jac": lambda x: np.concatenate([-2.0 * (x[:n] - g0), [0.0]]),
            },
        ],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    return res.x[:n]


def cagrad_dual_kkt(gram: np.ndarray, w: np.ndarray, c: float) -> tuple[float, float]:
    """KKT residuals of ``min_{w in simplex} b^T w + r sqrt(w^T G w)`` (b = G 1/T).

    Returns (most negative reduced gradient, largest complementarity product).
    """
    t = len(w)
    u = np.full(t, 1.0 / t)
    r = c * np.sqrt(u @ gram @ u)
    grad = gram @ u + r * gram @ w / np.sqrt(w @ gram @ w)
    nu = w @ grad
    reduced = grad - nu
    return float(reduced.min()), float(np.max(np.abs(w * reduced)))


def nash_weights(jac: np.ndarray) -> np.ndarray:
    """``alpha > 0`` with ``alpha * (G alpha) = 1`` (Navon et al. 2022, Theorem 5.1).

    On ``G / ||G||_F`` (the solution for ``G`` is that one over ``sqrt(||G||_F)``):
    L-BFGS-B on the convex ``1/2 b^T G b - sum(log b)`` (stationary exactly there), then
    MINPACK's Levenberg-Marquardt on the equation in log coordinates to polish, float64.
    """
    gram = jac @ jac.T
    fro = np.linalg.norm(gram)
    gn = gram / fro
    t = len(gram)
    res = optimize.minimize(
        lambda b: 0.5 * b @ gn @ b - np.sum(np.log(b)),
        np.ones(t),
        jac=lambda b: gn @ b - 1.0 / b,
        bounds=[(1e-12, None)] * t,
        method="L-BFGS-B",
        options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10000},
    )
    polish = optimize.root(
        lambda x: np.exp(x) * (gn @ np.exp(x)) - 1.0, np.log(res.x), method="lm", tol=1e-15
    )
    beta = np.exp(polish.x)
    assert np.max(np.abs(beta * (gn @ beta) - 1.0)) < 1e-9, "reference did not converge"
    return beta / np.sqrt(fro)
