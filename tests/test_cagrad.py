"""CAGrad: golden values, a SciPy primal reference, KKT of the dual solver, properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_balance as ob
from optax_balance._gramian import _cagrad
from optax_balance._solvers import _qp
from tests import checks
from tests import qp_reference as ref

J_ISSUE = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
# One jitted solver for the KKT checks (compiled once per shape, not traced per case).
_SIMPLEX_QP = jax.jit(lambda g, q: _qp.simplex_qp(g, q, max_iters=200))


def make(t, **kw):
    return ob.cagrad(num_tasks=t, **kw)


def test_golden_values():
    # torchjd's documented CAGrad(c=0.5) output for this matrix (it does not rescale).
    d, _ = checks.run(ob.cagrad(c=0.5, rescale=False), J_ISSUE)
    np.testing.assert_allclose(np.asarray(d), [0.1835, 1.2041, 1.2041], atol=1e-4)
    d_r, _ = checks.run(ob.cagrad(c=0.5), J_ISSUE)
    np.testing.assert_allclose(np.asarray(d_r), np.asarray(d) / 1.25, rtol=1e-6)


def test_two_tasks_by_hand():
    # Orthogonal unit gradients: g0 = (1/2, 1/2), ||g0|| = 1/sqrt(2); by symmetry
    # d = g0 + r g0/||g0|| = (1 + c) g0, so the weights are (1 + c)/2 each.
    jac = np.eye(2)
    _, state = checks.run(ob.cagrad(c=0.4, rescale=False), jac)
    np.testing.assert_allclose(np.asarray(state.weights), [0.7, 0.7], atol=1e-6)


@pytest.mark.parametrize("t", [2, 5, 16])
def test_matches_scipy_primal_reference(t):
    rng = np.random.default_rng(t)
    update = checks.jitted(ob.cagrad(c=0.5, rescale=False), 24)
    for jac in ref.random_cases(rng, t):
        d, _ = update(jac)
        d_ref = ref.cagrad_direction(jac, 0.5)
        # float32: the max-min objective is flat near its optimum, so d is determined
        # to about sqrt(eps) of the scale (the dual KKT test below is tighter).
        assert np.max(np.abs(np.asarray(d) - d_ref)) <= 5e-4 * np.linalg.norm(jac)


def test_matches_scipy_primal_reference_in_float64():
    rng = np.random.default_rng(11)
    with jax.enable_x64(True):
        tx = ob.cagrad(c=0.5, rescale=False)
        update = jax.jit(tx.update)
        for jac in ref.random_cases(rng, 8):
            d, _ = update(jnp.asarray(jac), tx.init(jnp.zeros(24)))
            d_ref = ref.cagrad_direction(jac, 0.5)
            assert np.max(np.abs(np.asarray(d) - d_ref)) <= 1e-6 * np.linalg.norm(jac)


@pytest.mark.parametrize("t", [3, 16])
def test_dual_solver_meets_kkt_conditions(t):
    """min_{w in simplex} b.w + r ||J^T w||: reduced gradient >= 0, = 0 on the support."""
    rng = np.random.default_rng(20 + t)
    solve = jax.jit(_cagrad._solve_dual)
    for c in (0.2, 0.5, 0.9):
        for jac in ref.random_cases(rng, t):
            gram = jac @ jac.T / np.sum(jac**2)
            u = np.full(t, 1.0 / t)
            r = c * np.sqrt(u @ gram @ u)
            dual = solve(
                jnp.asarray(gram, jnp.float32), jnp.float32(r), jnp.asarray(u, jnp.float32)
            )
            w = np.asarray(dual.w, np.float64)
            assert w.min() >= 0 and abs(w.sum() - 1) < 1e-5
            most_negative, complementarity = ref.cagrad_dual_kkt(gram, w, c)
            assert most_negative >= -1e-4 and complementarity <= 1e-4
            assert int(dual.root_iterations) < _cagrad._MAX_ROOT_ITERS


@pytest.mark.parametrize("t", [2, 16])
def test_simplex_qp_meets_kkt_conditions(t):
    rng = np.random.default_rng(30 + t)
    for jac in ref.random_cases(rng, t):
        gram = jac @ jac.T / np.sum(jac**2)
        q = rng.normal(size=t) / t
        sol = _SIMPLEX_QP(jnp.asarray(gram, jnp.float32), jnp.asarray(q, jnp.float32))
        z = np.asarray(sol.z, np.float64)
        grad = gram @ z + q
        nu = grad[z > 0].mean()
        assert z.min() >= 0 and abs(z.sum() - 1) < 1e-5
        assert (grad - nu).min() >= -1e-4 and np.abs(z * (grad - nu)).max() <= 1e-4


def test_worst_task_improvement_beats_the_mean():
    # CAGrad's purpose: min_i g_i . d at least that of the mean gradient g0 (d = g0 is
    # feasible in its primal problem).
    rng = np.random.default_rng(4)
    update = checks.jitted(ob.cagrad(rescale=False), 24)
    for jac in ref.random_cases(rng, 6):
        d, _ = update(jac)
        assert np.min(jac @ np.asarray(d, np.float64)) >= np.min(jac @ jac.mean(0)) - 1e-5


def test_c_zero_is_the_mean():
    jac = ref.random_jacobian(np.random.default_rng(2), 4, 6)
    d, state = checks.run(ob.cagrad(c=0.0), jac)
    np.testing.assert_allclose(np.asarray(state.weights), [0.25] * 4, atol=1e-7)


def test_pareto_stationary_gives_zero():
    jac = np.array([[1.0, 2.0, -1.0], [-1.0, -2.0, 1.0]])  # g0 = 0: the mean, i.e. zero
    d, _ = checks.run(ob.cagrad(c=0.5), jac)
    np.testing.assert_allclose(np.asarray(d), 0.0, atol=1e-6)
    jac = np.array([[1.0, 0.0], [-1.0, 0.1], [-1.0, -0.1]])  # 0 in the hull, c >= 1
    d, state = checks.run(ob.cagrad(c=1.5), jac)
    assert np.all(np.isfinite(np.asarray(d)))


# Issue 13: torchjd's aggregation tests found d != 0 here in float32 (||d|| = 0.031 on
# this matrix for c = 1 and c = 2; the dual solve stopped on a rounding-level g_w).
J_WEAK_4x2 = np.array(
    [
        [0.5198884, -0.97416335],
        [-0.5076417, 0.9512155],
        [-0.11951534, 0.22394702],
        [-0.11093263, -0.05920218],
    ]
)


def strictly_weak_stationary(rng, m, n, rank):
    """A random m x n matrix with a non-negative v != 0, v^T J = 0, and no positive one.

    The construction of torchjd's ``StrictlyWeakSampler``
    (tests/unit/aggregation/_matrix_samplers.py at 862baed), in NumPy: two orthogonal
    non-negative unit vectors v, v' on complementary supports, J built from an orthonormal
    complement of v (so v^T J = 0) whose first column is v'.
    """
    a = np.abs(rng.standard_normal(m))
    perm = rng.permutation(m)
    split = rng.integers(1, m)
    v, v2 = np.zeros(m), np.zeros(m)
    v[perm[:split]] = a[perm[:split]] / np.linalg.norm(a[perm[:split]])
    v2[perm[split:]] = a[perm[split:]] / np.linalg.norm(a[perm[split:]])
    q, _ = np.linalg.qr(np.column_stack([v, v2, rng.standard_normal((m, m - 2))]))
    basis = np.column_stack([v2, q[:, 2:]])  # orthonormal, orthogonal to v
    vt = np.linalg.qr(rng.standard_normal((n, n)))[0].T
    j = basis[:, :rank] @ np.diag(np.abs(rng.standard_normal(rank))) @ vt[:rank]
    assert np.abs(v @ j).max() < 1e-12
    return j


@pytest.mark.parametrize("c", [1.0, 2.0])
def test_weakly_stationary_gives_exactly_zero_in_float32(c):
    # With 0 in the hull of the gradients and c >= 1, the dual's minimiser is g_w = 0 and
    # CAGrad's direction is exactly 0 (torchjd returns 0; before the fix, 0.031 here and
    # ||d|| / ||g0|| up to 1.5 (c=1) and 2.6 (c=2) on the 20 x 10 rank-10 matrices).
    rng = np.random.default_rng(13)
    jacs = [J_WEAK_4x2] + [strictly_weak_stationary(rng, 20, 10, 10) for _ in range(6)]
    weigh = jax.jit(ob.weightings.cagrad(c=c, rescale=False))
    for jac in jacs:
        j32 = np.asarray(jac, np.float32)
        w, _ = weigh(jnp.asarray(j32 @ j32.T))
        np.testing.assert_array_equal(np.asarray(w), 0.0)


def test_permutation_invariance():
    checks.assert_permutation_invariant(make, ref.random_jacobian(np.random.default_rng(5), 6, 8))


def test_finite_on_hostile_inputs():
    checks.assert_finite_on_hostile(make)


def test_jit_matches_eager():
    checks.assert_jit_matches_eager(make, ref.random_jacobian(np.random.default_rng(8), 5, 7))


def test_chain_with_adam_trains():
    first, last = checks.train_two_tasks_with_adam(ob.cagrad())
    assert np.isfinite(last) and last < 0.1 * first


def test_invalid_hyperparameters():
    with pytest.raises(ValueError, match="`c`"):
        ob.cagrad(c=-0.1)
    with pytest.raises(ValueError, match="rescale"):
        ob.cagrad(rescale=2)
