"""IMTL-G: golden values, the paper's closed form on the raw gradients, properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_balance as ob

J_GOLDEN = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


def reference_imtl_g(J: np.ndarray) -> np.ndarray:
    """Liu et al. (2021), Sec. 3.1, on linearly independent raw gradients (float64).

    alpha_{2:T} = g_1 U^T (D U^T)^{-1} with D = [g_1 - g_t], U = [u_1 - u_t]; alpha_1 = 1 -
    sum. The library flips the sign when the common projection d . u_i is negative.
    """
    J = np.asarray(J, np.float64)
    if len(J) == 1:
        return np.ones(1)
    u = J / np.linalg.norm(J, axis=1, keepdims=True)
    D = J[0] - J[1:]
    U = u[0] - u[1:]
    rest = np.linalg.solve((D @ U.T).T, (J[0] @ U.T))  # row vector times inverse
    alpha = np.concatenate([[1.0 - rest.sum()], rest])
    if (alpha @ J) @ u[0] < 0:
        alpha = -alpha
    return alpha


def run(J, **kw):
    tx = ob.imtl_g(**kw)
    d, state = jax.jit(tx.update)(jnp.asarray(J, jnp.float32), tx.init(jnp.zeros(J.shape[1])))
    return np.asarray(d, np.float64), np.asarray(state.weights, np.float64)


def test_golden():
    d, w = run(J_GOLDEN)
    np.testing.assert_allclose(d, [0.0767, 1.0, 1.0], atol=1e-4)  # torchjd's documented value
    np.testing.assert_allclose(w, reference_imtl_g(J_GOLDEN), atol=1e-5)
    # by hand: G = [[18, -22], [-22, 38]], alpha ~ G^{-1} [sqrt 18, sqrt 38]
    v = np.array([[38.0, 22.0], [22.0, 18.0]]) @ np.sqrt([18.0, 38.0])
    np.testing.assert_allclose(w, v / v.sum(), atol=1e-5)


@pytest.mark.parametrize("t", [1, 2, 3, 5, 8, 16])
def test_matches_paper_formula_on_random_matrices(t):
    rng = np.random.default_rng(t)
    tx = ob.imtl_g()
    update = jax.jit(tx.update)
    state = tx.init({"a": jnp.zeros((4,)), "b": jnp.zeros((t + 1, 2))})
    for _ in range(3):
        J = (rng.normal(size=(t, 2 * t + 6)) * rng.uniform(0.1, 10.0, size=(t, 1))).astype(
            np.float32
        )
        grads = {"a": jnp.asarray(J[:, :4]), "b": jnp.asarray(J[:, 4:].reshape(t, t + 1, 2))}
        d, state = update(grads, state)
        alpha = reference_imtl_g(J)
        np.testing.assert_allclose(state.weights, alpha, atol=2e-4 * np.max(np.abs(alpha)))
        got = np.concatenate([np.asarray(d["a"]), np.asarray(d["b"]).ravel()])
        ref = alpha @ J.astype(np.float64)
        np.testing.assert_allclose(got, ref, atol=2e-4 * np.max(np.abs(ref)))
        # impartial: the same positive projection on every task's unit gradient
        u = J / np.linalg.norm(J, axis=1, keepdims=True)
        proj = u @ got
        assert proj.min() > 0
        np.testing.assert_allclose(proj, proj.mean(), rtol=1e-3)


def test_sign_flip_case_matches_flipped_paper_formula():
    # a configuration where the paper's normalisation gives a negative common projection
    rng = np.random.default_rng(0)
    for _ in range(500):
        t = 4
        J = rng.normal(size=(t, 8)) * rng.uniform(0.01, 10, size=(t, 1))
        G = J @ J.T
        v = np.linalg.solve(G, np.sqrt(np.diag(G)))
        if v.sum() < 0:
            break
    else:
        pytest.fail("no negative-sum configuration found")
    J = J.astype(np.float32)
    d, w = run(J)
    alpha = reference_imtl_g(J)
    np.testing.assert_allclose(w.sum(), -1.0, atol=1e-3)
    np.testing.assert_allclose(w, alpha, atol=1e-3 * np.max(np.abs(alpha)))
    assert np.all(J @ d > 0)  # every task's loss decreases to first order


def test_duplicate_and_zero_rows_use_the_pseudo_inverse():
    a = np.array([1.0, 2.0, 0.0, -1.0])
    b = np.array([-2.0, 0.5, 1.0, 0.0])
    d2, w2 = run(np.stack([a, b]))
    d, w = run(np.stack([a, a, b]))
    np.testing.assert_allclose(w[0], w[1], atol=1e-5)
    np.testing.assert_allclose([w[0] + w[1], w[2]], w2, atol=1e-5)
    np.testing.assert_allclose(d, d2, atol=1e-5)
    dz, wz = run(np.stack([a, np.zeros(4), b]))
    np.testing.assert_allclose(wz, [w2[0], 0.0, w2[1]], atol=1e-5)
    np.testing.assert_allclose(dz, d2, atol=1e-5)


def test_opposite_gradients():
    a = np.array([1.0, 2.0, 0.0, -1.0])
    d, w = run(np.stack([a, -a]))  # the only equal-projection combination is 0
    np.testing.assert_allclose(d, 0.0, atol=1e-5)
    np.testing.assert_allclose(w, 0.0, atol=1e-5)
    # with a third task no non-zero combination has equal projections (they would have
    # to be 0 on a and on -a): the paper's closed form gives weights summing to 1 whose
    # combination is 0; ours are 0
    c = np.array([0.0, 1.0, 1.0, 3.0])
    J = np.stack([a, -a, c])
    np.testing.assert_allclose(reference_imtl_g(J) @ J, 0.0, atol=1e-12)
    d, w = run(J)
    np.testing.assert_array_equal(d, 0.0)
    np.testing.assert_array_equal(w, 0.0)


def reference_consistent(J: np.ndarray) -> np.ndarray | None:
    """NumPy reference for rank-deficient J (float64): ``None`` when no non-zero d has
    equal projections on the unit gradients (1 not in the range of the cosine matrix C),
    else ``alpha = N^-1 C^+ 1 / sum``, the least-norm solution in ``beta = N alpha``."""
    n = np.linalg.norm(J, axis=1)
    u = J / n[:, None]
    c = u @ u.T
    beta = np.linalg.pinv(c, hermitian=True) @ np.ones(len(J))
    if np.linalg.norm(c @ beta - 1.0) > 1e-8:
        return None
    v = beta / n
    return v / v.sum()


RANK_DEFICIENT = {
    # three gradients in a plane: c = 0 (worked example of the imtl_g docstring)
    "plane": np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
    # four in R^3 (issue 13: torchjd's G^+ n points the other way on such a matrix)
    "four_in_3d": np.random.default_rng(317).normal(size=(4, 3)),
    # consistent: collinear gradients of different norms, and duplicates
    "collinear": np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]),
    "duplicates": np.array([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [-2.0, 0.5, 1.0], [0.0, 0.0, 3.0]]),
}


@pytest.mark.parametrize("name", list(RANK_DEFICIENT))
def test_rank_deficient_follows_the_papers_conditions(name):
    J = RANK_DEFICIENT[name]
    d, w = run(J)
    want = reference_consistent(J)
    if want is None:
        # The paper's closed form exists here (D U^T invertible) and combines to d = 0.
        np.testing.assert_allclose(reference_imtl_g(J) @ J, 0.0, atol=1e-12)
        np.testing.assert_array_equal(d, 0.0)
        np.testing.assert_array_equal(w, 0.0)
        # torchjd (src/torchjd/aggregation/_imtl_g.py at 862baed): G^+ n / sum, a
        # least-squares direction that is not 0
        g = J @ J.T
        v = np.linalg.pinv(g, hermitian=True) @ np.sqrt(np.diag(g))
        assert np.linalg.norm((v / v.sum()) @ J) > 0.1
        return
    np.testing.assert_allclose(w, want, atol=1e-5)
    u = J / np.linalg.norm(J, axis=1, keepdims=True)
    np.testing.assert_allclose(u @ d, np.mean(u @ d), rtol=1e-5)  # equal projections
    assert np.mean(u @ d) > 0


HOSTILE = {
    "zero": np.zeros((3, 4)),
    "duplicate": np.array([[1.0, -2.0, 0.5, 0.0]] * 3),
    "opposite": np.array([[1.0, -2.0, 0.5, 0.0], [-1.0, 2.0, -0.5, 0.0]]),
    "single": np.array([[1.0, -2.0, 0.5, 3.0]]),
    "rank_one": np.outer([1.0, -2.0, 3.0], [1.0, 0.5, -1.0, 2.0]),
    "random": np.random.default_rng(3).normal(size=(5, 4)),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_finite_and_scale_invariant_on_hostile_inputs(name):
    tx = ob.imtl_g()
    update = jax.jit(tx.update)
    weights = []
    for scale in (1e-10, 1.0, 1e10):
        J = HOSTILE[name] * scale
        d, state = update(jnp.asarray(J, jnp.float32), tx.init(jnp.zeros(4)))
        assert np.all(np.isfinite(d)) and np.all(np.isfinite(state.weights))
        weights.append(np.asarray(state.weights))
    np.testing.assert_allclose(weights[0], weights[1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(weights[2], weights[1], rtol=1e-4, atol=1e-6)


def test_single_task_and_mixed_scales():
    _, w = run(np.array([[3.0, 4.0]]))
    np.testing.assert_allclose(w, [1.0])
    rng = np.random.default_rng(4)
    J = (rng.normal(size=(3, 6)) * np.array([[1e-10], [1.0], [1e10]])).astype(np.float32)
    d, w = run(J)
    alpha = reference_imtl_g(J)
    np.testing.assert_allclose(w, alpha, rtol=1e-3)
    assert np.all(np.isfinite(d))


def test_permutation_invariant():
    rng = np.random.default_rng(6)
    J = rng.normal(size=(6, 9)).astype(np.float32)
    perm = rng.permutation(6)
    d, w = run(J)
    dp, wp = run(J[perm])
    np.testing.assert_allclose(wp, w[perm], atol=1e-5)
    np.testing.assert_allclose(dp, d, atol=1e-5)


def test_jit_matches_no_jit_and_bf16():
    rng = np.random.default_rng(2)
    J = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
    tx = ob.imtl_g(num_tasks=5)
    s0 = tx.init(jnp.zeros(6))
    d1, s1 = tx.update(J, s0)
    d2, s2 = jax.jit(tx.update)(J, s0)
    np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s1.weights, s2.weights, rtol=1e-5, atol=1e-6)
    assert int(s1.rank) == 5
    d3, _ = jax.jit(tx.update)(J.astype(jnp.bfloat16), s0)
    assert d3.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(d3, np.float32)))


def test_chain_with_adam_reaches_pareto_set():
    a = jnp.array([1.0, 2.0, -1.0])
    b = jnp.array([-1.0, 0.5, 2.0])

    def losses(w):
        return jnp.stack([jnp.sum((w - a) ** 2), 3.0 * jnp.sum((w - b) ** 2)])

    tx = optax.chain(ob.imtl_g(), optax.adam(0.05))
    w = jnp.zeros(3)
    state = tx.init(w)

    @jax.jit
    def step(w, state):
        vals, grads = ob.value_and_task_grads(losses)(w)
        upd, state = tx.update(grads, state, w, task_losses=vals)
        return optax.apply_updates(w, upd), state, vals

    for _ in range(150):
        w, state, _ = step(w, state)
    u = jnp.clip(jnp.dot(w - a, b - a) / jnp.dot(b - a, b - a), 0.0, 1.0)
    assert float(jnp.linalg.norm(w - (a + u * (b - a)))) < 0.05
    np.testing.assert_allclose(jnp.sum(ob.task_weights(state)), 1.0, atol=1e-4)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_tasks"):
        ob.imtl_g(num_tasks=0)
    with pytest.raises(ValueError, match="sync"):
        ob.imtl_g(sync="all")
