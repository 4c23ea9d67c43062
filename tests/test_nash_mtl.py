"""Nash-MTL: golden values, a SciPy reference, the bargaining condition, state, properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_balance as ob
from optax_balance._gramian import _nash_mtl
from tests import checks
from tests import qp_reference as ref

J_ISSUE = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


def make(t, **kw):
    return ob.nash_mtl(t, **kw)


def test_golden_values():
    d, state = checks.run(ob.nash_mtl(2), J_ISSUE)
    # torchjd's documented NashMTL(n_tasks=2) output for this matrix.
    np.testing.assert_allclose(np.asarray(d), [0.0542, 0.7061, 0.7061], atol=1e-4)
    # By hand: G = [[18, -22], [-22, 38]]; alpha_1 (G alpha)_1 = alpha_2 (G alpha)_2 = 1
    # gives (alpha_2 / alpha_1)^2 = 18 / 38 and alpha_1^2 (18 - 22 sqrt(18/38)) = 1.
    a1 = 1.0 / np.sqrt(18.0 - 22.0 * np.sqrt(18.0 / 38.0))
    np.testing.assert_allclose(np.asarray(state.alpha), [a1, a1 * np.sqrt(18 / 38)], rtol=1e-5)
    # ||d|| = sqrt(T) before clipping, 1 after.
    np.testing.assert_allclose(np.linalg.norm(np.asarray(d)), 1.0, rtol=1e-5)


@pytest.mark.parametrize("t", [1, 2, 5, 16])
def test_matches_scipy_reference(t):
    rng = np.random.default_rng(t)
    update = checks.jitted(ob.nash_mtl(t, max_norm=0.0), 24)
    for scale in (1e-3, 1.0, 1e3):
        jac = scale * ref.random_jacobian(rng, t, 24)
        d, state = update(jac)
        alpha_ref = ref.nash_weights(jac)
        np.testing.assert_allclose(np.asarray(state.alpha), alpha_ref, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(state.weights), alpha_ref, rtol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(d)), np.sqrt(t), rtol=1e-4)


@pytest.mark.parametrize("t", [3, 16])
def test_solution_meets_the_bargaining_condition(t):
    """alpha > 0 and alpha_i (G alpha)_i = 1 for every task, to 1e-4."""
    rng = np.random.default_rng(40 + t)
    update = checks.jitted(ob.nash_mtl(t), 24)
    for _ in range(3):
        jac = ref.random_jacobian(rng, t, 24)
        _, state = update(jac)
        alpha = np.asarray(state.alpha, np.float64)
        assert alpha.min() > 0
        assert np.max(np.abs(alpha * (jac @ jac.T @ alpha) - 1.0)) <= 1e-4
        assert int(state.iterations) < 20


def test_newton_solver_directly():
    rng = np.random.default_rng(3)
    jac = ref.random_jacobian(rng, 8, 12)
    gram = jac @ jac.T / np.linalg.norm(jac @ jac.T)
    beta, its = _nash_mtl.solve_bargaining(
        jnp.asarray(gram, jnp.float32), jnp.ones(8), max_iters=50, tol=1e-6
    )
    beta = np.asarray(beta, np.float64)
    assert np.max(np.abs(beta * (gram @ beta) - 1.0)) <= 1e-5
    # Warm start from the solution: nothing left to do.
    _, its2 = _nash_mtl.solve_bargaining(
        jnp.asarray(gram, jnp.float32), jnp.asarray(beta, jnp.float32), max_iters=50, tol=1e-5
    )
    assert int(its2) == 0 < int(its)


def test_max_norm_clipping():
    jac = ref.random_jacobian(np.random.default_rng(4), 4, 6)
    d_free, s_free = checks.run(ob.nash_mtl(4, max_norm=0.0), jac)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(d_free)), 2.0, rtol=1e-4)
    d, s = checks.run(ob.nash_mtl(4, max_norm=0.5), jac)
    np.testing.assert_allclose(np.asarray(d), 0.25 * np.asarray(d_free), rtol=1e-4, atol=1e-7)
    coef = 0.5 / np.sqrt(s.alpha @ (jac @ jac.T) @ s.alpha)
    np.testing.assert_allclose(np.asarray(s.weights), coef * np.asarray(s.alpha), rtol=1e-5)
    d, _ = checks.run(ob.nash_mtl(4, max_norm=10.0), jac)  # below the limit: unchanged
    np.testing.assert_allclose(np.asarray(d), np.asarray(d_free), rtol=1e-5, atol=1e-7)


def test_update_weights_every_reuses_alpha_between_solves():
    rng = np.random.default_rng(5)
    tx = ob.nash_mtl(3, update_weights_every=3, max_norm=0.0)
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(6))
    jacs = [ref.random_jacobian(rng, 3, 6) for _ in range(4)]
    alphas, its = [], []
    for jac in jacs:
        _, state = update(jnp.asarray(jac, jnp.float32), state)
        alphas.append(np.asarray(state.alpha))
        its.append(int(state.iterations))
    np.testing.assert_array_equal(alphas[1], alphas[0])
    np.testing.assert_array_equal(alphas[2], alphas[0])
    np.testing.assert_allclose(alphas[0], ref.nash_weights(jacs[0]), rtol=1e-4)
    np.testing.assert_allclose(alphas[3], ref.nash_weights(jacs[3]), rtol=1e-4)
    assert its[1] == its[2] == 0 and its[0] > 0 and its[3] > 0
    assert int(state.step) == 4


def test_permutation_invariance():
    checks.assert_permutation_invariant(make, ref.random_jacobian(np.random.default_rng(6), 5, 8))


def test_finite_on_hostile_inputs():
    checks.assert_finite_on_hostile(make)


def test_jit_matches_eager():
    checks.assert_jit_matches_eager(make, ref.random_jacobian(np.random.default_rng(8), 5, 7))


def test_chain_with_adam_trains():
    first, last = checks.train_two_tasks_with_adam(ob.nash_mtl(2), steps=100)
    assert np.isfinite(last) and last < 0.1 * first


def test_invalid_hyperparameters():
    with pytest.raises(ValueError, match="num_tasks"):
        ob.nash_mtl(0)
    with pytest.raises(ValueError, match="max_norm"):
        ob.nash_mtl(2, max_norm=-1.0)
    with pytest.raises(ValueError, match="update_weights_every"):
        ob.nash_mtl(2, update_weights_every=0)
    with pytest.raises(ValueError, match="optim_niter"):
        ob.nash_mtl(2, optim_niter=0)
    with pytest.raises(ValueError, match="num_tasks"):
        checks.run(ob.nash_mtl(3), np.ones((2, 4)))
