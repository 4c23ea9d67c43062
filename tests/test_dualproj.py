"""DualProj: golden values, a SciPy reference, KKT of the solver, properties."""

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
    return ob.dualproj(num_tasks=t, **kw)


def test_golden_value_by_hand():
    # G = [[18, -22], [-22, 38]]; the mean (1, 1, 1) conflicts with g_1 (g_1 . mean = -1),
    # so v_1 rises until (G v)_1 = 0: v = (22/36, 1/2) (reg_eps -> 0).
    d, state = checks.run(ob.dualproj(reg_eps=0.0), J_ISSUE)
    v = np.array([11 / 18, 1 / 2])
    np.testing.assert_allclose(np.asarray(state.weights), v, atol=1e-6)
    np.testing.assert_allclose(np.asarray(d), v @ J_ISSUE, atol=1e-5)
    d, _ = checks.run(ob.dualproj(), J_ISSUE)
    np.testing.assert_allclose(np.asarray(d), [0.5563, 1.1109, 1.1109], atol=1e-4)


def test_is_the_euclidean_projection_of_the_mean():
    rng = np.random.default_rng(1)
    jac = ref.random_jacobian(rng, 5, 7)
    d, _ = checks.run(ob.dualproj(reg_eps=0.0), jac)
    expected = ref.projection_onto_dual_cone(jac.mean(0), jac)
    np.testing.assert_allclose(np.asarray(d), expected, atol=1e-4)


@pytest.mark.parametrize("t", [1, 2, 5, 16])
def test_matches_scipy_reference_on_random_matrices(t):
    rng = np.random.default_rng(t)
    update = checks.jitted(ob.dualproj(), 24)
    for jac in ref.random_cases(rng, t):
        w_ref = ref.dualproj_weights(jac)
        d, state = update(jac)
        np.testing.assert_allclose(np.asarray(state.weights), w_ref, atol=2e-4, rtol=1e-3)
        scale = np.linalg.norm(jac.T @ w_ref) + 1e-3 * np.linalg.norm(jac)
        assert np.max(np.abs(np.asarray(d) - jac.T @ w_ref)) <= 2e-4 * scale
        w = np.asarray(state.weights, np.float64)
        tr = np.sum(jac**2)
        assert np.all(jac @ np.asarray(d, np.float64) >= -tr * (1e-4 * np.abs(w) + 1e-5))


def test_matches_scipy_reference_in_float64_rank_deficient():
    jac = ref.random_jacobian(np.random.default_rng(3), 12, 24, rank=3)
    with jax.enable_x64(True):
        tx = ob.dualproj()
        _, state = jax.jit(tx.update)(jnp.asarray(jac), tx.init(jnp.zeros(24)))
        w = np.asarray(state.weights)
    np.testing.assert_allclose(w, ref.dualproj_weights(jac), atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("t", [3, 16])
def test_solver_meets_kkt_conditions(t):
    rng = np.random.default_rng(9 + t)
    for jac in ref.random_cases(rng, t):
        gram = ref.torchjd_gram(jac)
        u = np.full(t, 1.0 / t)
        sol = checks.project_to_dual_cone(
            jnp.asarray(u, jnp.float32), jnp.asarray(gram, jnp.float32)
        )
        v = np.asarray(sol.z, np.float64)
        grad = gram @ v
        assert (v - u).min() >= -1e-6
        assert grad.min() >= -1e-4
        assert np.abs((v - u) * grad).max() <= 1e-4
        assert int(sol.iterations) < 200


def test_non_conflicting_input_is_returned_unchanged():
    jac = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.8, 0.8, 0.1]])
    d, state = checks.run(ob.dualproj(), jac)
    np.testing.assert_allclose(np.asarray(state.weights), [1 / 3] * 3, atol=1e-7)
    assert int(state.iterations) == 0


def test_pref_vector():
    jac = ref.random_jacobian(np.random.default_rng(6), 3, 5)
    pref = np.array([0.5, 0.2, 0.3])
    _, state = checks.run(ob.dualproj(pref_vector=pref), jac)
    np.testing.assert_allclose(
        np.asarray(state.weights), ref.dualproj_weights(jac, pref), atol=2e-4, rtol=1e-3
    )


def test_permutation_invariance():
    checks.assert_permutation_invariant(make, ref.random_jacobian(np.random.default_rng(5), 6, 8))


def test_finite_on_hostile_inputs():
    checks.assert_finite_on_hostile(make)


def test_jit_matches_eager():
    checks.assert_jit_matches_eager(make, ref.random_jacobian(np.random.default_rng(8), 5, 7))


def test_chain_with_adam_trains():
    first, last = checks.train_two_tasks_with_adam(ob.dualproj())
    assert np.isfinite(last) and last < 0.1 * first


def test_invalid_hyperparameters():
    with pytest.raises(ValueError, match="norm_eps"):
        ob.dualproj(norm_eps=float("nan"))
    with pytest.raises(ValueError, match="reg_eps"):
        ob.dualproj(reg_eps=-1e-3)
    with pytest.raises(ValueError, match="pref_vector"):
        ob.dualproj(pref_vector=[1.0, float("inf")])
