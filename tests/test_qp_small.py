"""The QP solver's closed-form path for T <= 4 (every face at once, no loop).

Checked against SciPy's SLSQP in float64 (an independent general-purpose solver) on
well-conditioned and degenerate Gramians (duplicate, opposite, zero and 1e3-scaled rows,
rank one), through the KKT conditions and the objective, and through the methods that
use it (UPGrad, DualProj, MGDA, CAGrad) at T = 2 to 4. T = 5 takes the active-set loop;
the same checks run there, so both sides of the boundary are covered.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from optax_balance._solvers import _qp

from . import qp_reference as ref

EPS32 = float(np.finfo(np.float32).eps)


def _gram_cases(t: int) -> list[np.ndarray]:
    """Float32-representable Gramians ``J J^T`` of (t, 6) Jacobians, hostile ones included."""
    rng = np.random.default_rng(40 + t)
    out = []
    for kind in ("random", "duplicate", "opposite", "zero", "scaled", "rank1", "near_dup"):
        j = rng.standard_normal((t, 6))
        if kind == "duplicate" and t > 1:
            j[1] = j[0]
        elif kind == "opposite" and t > 1:
            j[1] = -j[0]
        elif kind == "zero":
            j[-1] = 0.0
        elif kind == "scaled":
            j[0] *= 1e3
        elif kind == "rank1":
            j = rng.standard_normal((t, 1)) @ rng.standard_normal((1, 6))
        elif kind == "near_dup" and t > 1:
            j[1] = j[0] + 1e-3 * rng.standard_normal(6)
        j = j.astype(np.float32).astype(np.float64)
        out.append(j @ j.T)
    return out


def _scipy_min(q_mat: np.ndarray, q_vec: np.ndarray, simplex: bool) -> float:
    """The optimal value by SLSQP in float64 from several starts (the least is kept)."""
    t = len(q_vec)
    cons = [{"type": "eq", "fun": lambda z: np.sum(z) - 1.0}] if simplex else []
    best = np.inf
    for z0 in [np.full(t, 1.0 / t), *np.eye(t), np.zeros(t)]:
        if simplex and z0.sum() == 0:
            continue
        res = optimize.minimize(
            lambda z: 0.5 * z @ q_mat @ z + q_vec @ z,
            z0,
            jac=lambda z: q_mat @ z + q_vec,
            bounds=[(0.0, None)] * t,
            constraints=cons,
            method="SLSQP",
            options={"ftol": 1e-16, "maxiter": 1000},
        )
        z = np.maximum(res.x, 0.0)
        if simplex:
            z = z / z.sum()
        best = min(best, 0.5 * z @ q_mat @ z + q_vec @ z)
    return best


# Jitted once per module (and compiled once per shape), not once per case.
_SOLVE = {
    simplex: jax.jit(lambda a, b, f=f: f(a, b, max_iters=100))
    for simplex, f in ((True, _qp.simplex_qp), (False, _qp.nonneg_qp))
}
_UPGRAD_Z = jax.jit(lambda u, g: _qp.project_to_dual_cone(u, g, max_iters=50).z)
_MIN_NORM_Z = jax.jit(lambda g: _qp.min_norm_simplex(g).z)


def _check(q_mat: np.ndarray, q_vec: np.ndarray, simplex: bool) -> None:
    sol = _SOLVE[simplex](jnp.asarray(q_mat, jnp.float32), jnp.asarray(q_vec, jnp.float32))
    z = np.asarray(sol.z, np.float64)
    assert np.all(np.isfinite(z)) and z.min() >= 0.0
    if simplex:
        assert abs(z.sum() - 1.0) <= 8 * len(z) * EPS32
    # The rounding scale of the objective and of each reduced-gradient entry: the inputs
    # are float32, the solve runs in float32 on a unit-diagonal rescaling.
    az = np.abs(z)
    obj_scale = az @ np.abs(q_mat) @ az + np.abs(q_vec) @ az + 1e-30
    obj = 0.5 * z @ q_mat @ z + q_vec @ z
    want = _scipy_min(q_mat, q_vec, simplex)
    assert obj <= want + 1e3 * EPS32 * obj_scale, (obj, want, obj_scale)
    # KKT: reduced gradient >= 0 (up to its rounding scale), = 0 on the support.
    grad = q_mat @ z + q_vec
    g_scale = np.abs(q_mat) @ az + np.abs(q_vec) + 1e-30
    nu = 0.0
    if simplex:
        on = z > 1e-6
        nu = np.sum(grad[on] * z[on]) / np.sum(z[on])
    assert np.all(grad - nu >= -1e3 * EPS32 * g_scale), (grad - nu, g_scale)


@pytest.mark.parametrize("t", [1, 2, 3, 4, 5])
def test_nonneg_qp_is_optimal_on_hostile_gramians(t):
    rng = np.random.default_rng(t)
    for gram in _gram_cases(t):
        # As UPGrad and DualProj pose it: normalised and regularised, so positive definite
        # (with a singular Q, a q rounded off its range makes the problem unbounded).
        tr = np.trace(gram)
        gram = (gram / tr if tr > 0 else gram) + 1e-4 * np.eye(t)
        gram = gram.astype(np.float32).astype(np.float64)
        for _ in range(3):
            q = gram @ rng.standard_normal(t)
            _check(gram, q.astype(np.float32).astype(np.float64), simplex=False)


@pytest.mark.parametrize("t", [1, 2, 3, 4, 5])
def test_simplex_qp_is_optimal_on_hostile_gramians(t):
    rng = np.random.default_rng(10 + t)
    for gram in _gram_cases(t):
        for scale in (0.0, 0.3):
            q = scale * np.sqrt(np.trace(gram) + 1) * rng.standard_normal(t)
            _check(gram, q.astype(np.float32).astype(np.float64), simplex=True)


@pytest.mark.parametrize("t", [2, 3, 4])
def test_closed_form_path_has_no_loop(t):
    """The point of the path: no while loop (each costs XLA:CPU tens of microseconds)."""
    a = jnp.eye(t) + 0.5
    for fn in (
        lambda g: _qp.nonneg_qp(g, -jnp.ones(t), max_iters=50).z,
        lambda g: _qp.simplex_qp(g, jnp.zeros(t), max_iters=50).z,
        lambda g: _qp.min_norm_simplex(g).z,
        lambda g: _qp.project_to_dual_cone(jnp.eye(t) / t, g, max_iters=50).z,
    ):
        hlo = jax.jit(fn).lower(a).as_text()
        assert "while" not in hlo


@pytest.mark.parametrize("t", [2, 3, 4])
def test_methods_match_references_at_small_t(t):
    """UPGrad and DualProj against SciPy's BVLS, MGDA's weights against SLSQP."""
    rng = np.random.default_rng(60 + t)
    for jac in [*ref.random_cases(rng, t, 8), *(h(t) for h in ref.HOSTILE.values())]:
        jac = jac.astype(np.float32).astype(np.float64)
        gram = ref.torchjd_gram(jac)
        u = np.full(t, 1.0 / t)
        got = _UPGRAD_Z(jnp.asarray(np.diag(u), jnp.float32), jnp.asarray(gram, jnp.float32))
        np.testing.assert_allclose(
            np.asarray(got).sum(0), ref.upgrad_weights(jac), atol=1e-5, rtol=1e-4
        )
        got = _UPGRAD_Z(jnp.asarray(u, jnp.float32), jnp.asarray(gram, jnp.float32))
        np.testing.assert_allclose(np.asarray(got), ref.dualproj_weights(jac), atol=1e-5, rtol=1e-4)
        g = jac @ jac.T
        if np.trace(g) > 0:
            a = np.asarray(_MIN_NORM_Z(jnp.asarray(g, jnp.float32)), np.float64)
            want = _scipy_min(g, np.zeros(t), simplex=True)
            assert a @ g @ a / 2 <= want + 1e3 * EPS32 * np.max(np.diag(g))
