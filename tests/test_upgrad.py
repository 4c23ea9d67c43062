"""UPGrad: golden values, a SciPy reference, KKT of the solver, properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_balance as ob
from tests import checks
from tests import qp_reference as ref

J_ISSUE = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


def make(t, **kw):
    return ob.upgrad(num_tasks=t, **kw)


def test_golden_value_from_the_issue():
    d, state = checks.run(ob.upgrad(), J_ISSUE)
    np.testing.assert_allclose(np.asarray(d), [0.2929, 1.9004, 1.9004], atol=1e-4)
    # By hand (reg_eps -> 0): v1 = (1/2, 22/76), v2 = (22/36, 1/2).
    np.testing.assert_allclose(
        np.asarray(state.weights), [1 / 2 + 11 / 18, 11 / 38 + 1 / 2], atol=2e-4
    )


def test_proposition_1_weight_space_equals_primal_projection():
    """J^T v^(i) is the Euclidean projection of g_i / T onto the dual cone (SLSQP)."""
    rng = np.random.default_rng(1)
    jac = ref.random_jacobian(rng, 4, 6)
    _, state = checks.run(ob.upgrad(reg_eps=0.0), jac)
    expected = sum(ref.projection_onto_dual_cone(jac[i] / 4, jac) for i in range(4))
    np.testing.assert_allclose(jac.T @ np.asarray(state.weights), expected, atol=1e-4)


@pytest.mark.parametrize("t", [1, 2, 5, 16])
def test_matches_scipy_reference_on_random_matrices(t):
    rng = np.random.default_rng(t)
    update = checks.jitted(ob.upgrad(), 24)
    for jac in ref.random_cases(rng, t):
        w_ref = ref.upgrad_weights(jac)
        d, state = update(jac)
        # The combination is accurate in float32 whatever the rank of J ...
        scale = np.linalg.norm(jac.T @ w_ref) + 1e-3 * np.linalg.norm(jac)
        assert np.max(np.abs(np.asarray(d) - jac.T @ w_ref)) <= 2e-4 * scale
        # ... and so are the weights (the solver stops at the rounding level).
        np.testing.assert_allclose(np.asarray(state.weights), w_ref, atol=2e-4, rtol=1e-3)
        # Non-conflicting: g_j . d = tr(G) (G~ w)_j - tr(G) reg_eps w_j >= -tr(G) reg_eps w_j.
        w = np.asarray(state.weights, np.float64)
        tr = np.sum(jac**2)
        assert np.all(jac @ np.asarray(d, np.float64) >= -tr * (1e-4 * np.abs(w) + 1e-5))


@pytest.mark.parametrize("t", [5, 16])
def test_matches_scipy_reference_in_float64_rank_deficient(t):
    rng = np.random.default_rng(100 + t)
    jac = ref.random_jacobian(rng, t, 3)
    with jax.enable_x64(True):
        tx = ob.upgrad()
        _, state = jax.jit(tx.update)(jnp.asarray(jac), tx.init(jnp.zeros(3)))
        w = np.asarray(state.weights)
    np.testing.assert_allclose(w, ref.upgrad_weights(jac), atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("t", [2, 16])
def test_solver_meets_kkt_conditions(t):
    """For each projection: z = v - u_i e_i >= 0, G v >= 0, z_j (G v)_j = 0, to 1e-4."""
    rng = np.random.default_rng(7 + t)
    for jac in ref.random_cases(rng, t):
        gram = ref.torchjd_gram(jac)
        u = np.eye(t) / t
        sol = checks.project_to_dual_cone(
            jnp.asarray(u, jnp.float32), jnp.asarray(gram, jnp.float32)
        )
        v = np.asarray(sol.z, np.float64)
        z = v - u
        grad = v @ gram  # rows: G v^(i)
        assert z.min() >= -1e-6
        assert grad.min() >= -1e-4
        assert np.abs(z * grad).max() <= 1e-4
        assert int(sol.iterations) < 200


def test_non_conflicting_exactly_without_regularisation():
    rng = np.random.default_rng(4)
    jac = ref.random_jacobian(rng, 6, 10)
    d, _ = checks.run(ob.upgrad(reg_eps=0.0), jac)
    assert np.all(jac @ np.asarray(d, np.float64) >= -1e-5 * np.sum(jac**2))


def test_permutation_invariance():
    rng = np.random.default_rng(5)
    checks.assert_permutation_invariant(make, ref.random_jacobian(rng, 6, 8))


def test_pref_vector():
    jac = ref.random_jacobian(np.random.default_rng(6), 3, 5)
    pref = np.array([0.5, 0.2, 0.3])
    _, state = checks.run(ob.upgrad(pref_vector=pref), jac)
    np.testing.assert_allclose(
        np.asarray(state.weights), ref.upgrad_weights(jac, pref), atol=2e-4, rtol=1e-3
    )
    # Non-conflicting rows: the projections are the identity, the weights are pref.
    same = np.tile(np.array([[1.0, 2.0, 0.0]]), (3, 1)) * np.array([[1.0], [2.0], [3.0]])
    _, state = checks.run(ob.upgrad(pref_vector=pref), same)
    np.testing.assert_allclose(np.asarray(state.weights), pref, atol=1e-6)


def test_zero_gramian_below_norm_eps_gives_the_weighted_mean():
    jac = 1e-4 * np.array([[1.0, -1.0], [-1.0, 0.5]])  # trace 3.25e-8 < norm_eps
    d, state = checks.run(ob.upgrad(), jac)
    np.testing.assert_allclose(np.asarray(state.weights), [0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(np.asarray(d), jac.mean(0), atol=1e-10)


def test_finite_on_hostile_inputs():
    checks.assert_finite_on_hostile(make)


def test_opposite_rows_give_zero():
    jac = np.array([[1.0, 2.0, -1.0], [-1.0, -2.0, 1.0]])
    d, _ = checks.run(ob.upgrad(reg_eps=0.0), jac)
    np.testing.assert_allclose(np.asarray(d), 0.0, atol=1e-6)


def test_jit_matches_eager():
    checks.assert_jit_matches_eager(make, ref.random_jacobian(np.random.default_rng(8), 5, 7))


def test_chain_with_adam_trains():
    first, last = checks.train_two_tasks_with_adam(ob.upgrad())
    assert np.isfinite(last) and last < 0.1 * first


def test_invalid_hyperparameters():
    with pytest.raises(ValueError, match="norm_eps"):
        ob.upgrad(norm_eps=-1.0)
    with pytest.raises(ValueError, match="reg_eps"):
        ob.upgrad(reg_eps=-1.0)
    with pytest.raises(ValueError, match="pref_vector"):
        ob.upgrad(pref_vector=[[1.0, 2.0]])
    with pytest.raises(ValueError, match="pref_vector"):
        ob.upgrad(pref_vector=[1.0, 2.0], num_tasks=3)
    with pytest.raises(ValueError, match="num_tasks"):
        checks.run(ob.upgrad(pref_vector=[1.0, 2.0]), np.ones((3, 2)))
