"""Aligned-MTL: golden values, an SVD reference on the raw gradients, properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_balance as ob
from optax_balance._gramian._aligned_mtl import balance_matrix

J_GOLDEN = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
EPS32 = float(np.finfo(np.float32).eps)


def reference_aligned(J: np.ndarray, w: np.ndarray, scale_mode: str = "min") -> np.ndarray:
    """The aligned system sigma_s U V^T (from the SVD of the raw J, float64), times w.

    Singular values with sigma^2 <= T * eps32 * sigma_max^2 count as zero (the published
    cut-off on the Gramian's eigenvalues). Returns d = (sigma_s U_R V_R^T)^T w.
    """
    J = np.asarray(J, np.float64)
    t = J.shape[0]
    U, S, Vt = np.linalg.svd(J, full_matrices=False)
    lam = S**2
    keep = lam > lam.max() * t * EPS32 if lam.max() > 0 else np.zeros_like(lam, bool)
    if not keep.any():
        return np.zeros(J.shape[1])
    kept = np.sort(lam[keep])  # ascending
    lam_s = {
        "min": kept[0],
        "median": kept[(len(kept) - 1) // 2],  # the lower median, as torch.median
        "rmse": kept.mean(),
    }[scale_mode]
    aligned = np.sqrt(lam_s) * U[:, keep] @ Vt[keep]  # (T, D): every singular value sigma_s
    return aligned.T @ w


def run(J, **kw):
    tx = ob.aligned_mtl(**kw)
    d, state = jax.jit(tx.update)(jnp.asarray(J, jnp.float32), tx.init(jnp.zeros(J.shape[1])))
    return np.asarray(d, np.float64), state


def test_golden():
    d, state = run(J_GOLDEN)
    np.testing.assert_allclose(d, [0.4266, 1.9347, 1.9347], atol=1e-4)
    np.testing.assert_allclose(d, reference_aligned(J_GOLDEN, np.ones(2)), atol=1e-5)
    # by hand: G = [[18, -22], [-22, 38]], l_min = 28 - sqrt(584), B^2 = l_min G^{-1} and
    # G^{-1} = [[38, 22], [22, 18]] / 200, so |alpha|^2 = 1^T B^2 1 = l_min / 2
    assert int(state.rank) == 2
    np.testing.assert_allclose(np.sum(state.weights**2), (28 - np.sqrt(584)) / 2, rtol=1e-5)
    # torchjd's default w = 1/T gives half of it
    d_half, _ = run(J_GOLDEN, pref_vector=[0.5, 0.5])
    np.testing.assert_allclose(d_half, [0.2133, 0.9673, 0.9673], atol=1e-4)


@pytest.mark.parametrize(
    "t, scale_mode",
    [(t, "min") for t in (1, 2, 3, 6, 11, 16)]
    + [(4, "median"), (16, "median"), (5, "rmse"), (16, "rmse")],
)
def test_matches_svd_reference_on_random_matrices(t, scale_mode):
    rng = np.random.default_rng(t)
    w = rng.uniform(0.2, 2.0, size=t)
    tx = ob.aligned_mtl(pref_vector=w, scale_mode=scale_mode)
    update = jax.jit(tx.update)
    state = tx.init({"a": jnp.zeros((4,)), "b": jnp.zeros((t + 1, 2))})
    for _ in range(2):
        J = (rng.normal(size=(t, 2 * t + 6)) * rng.uniform(0.2, 5.0, size=(t, 1))).astype(
            np.float32
        )
        grads = {"a": jnp.asarray(J[:, :4]), "b": jnp.asarray(J[:, 4:].reshape(t, t + 1, 2))}
        d, state = update(grads, state)
        got = np.concatenate([np.asarray(d["a"]), np.asarray(d["b"]).ravel()])
        ref = reference_aligned(J, w, scale_mode)
        np.testing.assert_allclose(got, ref, atol=1e-4 * np.max(np.abs(ref)))
        assert int(state.rank) == t


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_rank_deficient_matches_reference(scale_mode):
    rng = np.random.default_rng(11)
    t, r = 8, 3
    J = (rng.normal(size=(t, r)) @ rng.normal(size=(r, 12))).astype(np.float32)
    d, state = run(J, scale_mode=scale_mode)
    assert int(state.rank) == r
    ref = reference_aligned(J, np.ones(t), scale_mode)
    np.testing.assert_allclose(d, ref, atol=1e-4 * np.max(np.abs(ref)))


def test_balance_matrix_equalises_singular_values():
    rng = np.random.default_rng(2)
    J = rng.normal(size=(6, 9)) * np.array([[0.1], [1.0], [3.0], [10.0], [0.5], [2.0]])
    G = J @ J.T
    B, rank = balance_matrix(jnp.asarray(G, jnp.float32), "min")
    B = np.asarray(B, np.float64)
    assert int(rank) == 6
    # the aligned Gramian B G B = lambda_min I: every aligned component has the same norm
    np.testing.assert_allclose(B @ G @ B, np.linalg.eigvalsh(G)[0] * np.eye(6), atol=1e-4 * G.max())


def test_weights_are_linear_in_the_preferences():
    rng = np.random.default_rng(3)
    J = rng.normal(size=(4, 7)).astype(np.float32)
    w = np.array([1.0, 2.0, 0.0, 0.5])
    cols = [run(J, pref_vector=np.eye(4)[i])[1].weights for i in range(4)]
    _, state = run(J, pref_vector=w)
    np.testing.assert_allclose(state.weights, np.stack(cols, 1) @ w, atol=1e-5)


HOSTILE = {
    "zero": np.zeros((3, 4)),
    "one_zero_row": np.array([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 1.0, 0.0]]),
    "duplicate": np.array([[1.0, -2.0, 0.5, 0.0]] * 3),
    "opposite": np.array([[1.0, -2.0, 0.5, 0.0], [-1.0, 2.0, -0.5, 0.0]]),
    "single": np.array([[1.0, -2.0, 0.5, 3.0]]),
    "random": np.random.default_rng(4).normal(size=(5, 4)),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_finite_on_hostile_inputs_and_scale_equivariant(name):
    J0 = HOSTILE[name]
    tx = ob.aligned_mtl()
    update = jax.jit(tx.update)
    ref = reference_aligned(J0, np.ones(len(J0)))
    for scale in (1e-10, 1.0, 1e10):
        d, state = update(jnp.asarray(J0 * scale, jnp.float32), tx.init(jnp.zeros(4)))
        assert np.all(np.isfinite(d)) and np.all(np.isfinite(state.weights))
        np.testing.assert_allclose(
            np.asarray(d) / scale, ref, atol=1e-4 * max(1.0, np.max(np.abs(ref)))
        )


def test_mixed_scales_finite():
    rng = np.random.default_rng(5)
    J = rng.normal(size=(4, 6)) * np.array([[1e-10], [1e10], [1.0], [1e5]])
    for mode in ("min", "median", "rmse"):
        d, state = run(J.astype(np.float32), scale_mode=mode)
        assert np.all(np.isfinite(d)) and np.all(np.isfinite(state.weights))


def test_permutation_invariant():
    rng = np.random.default_rng(6)
    J = rng.normal(size=(6, 9)).astype(np.float32)
    perm = rng.permutation(6)
    d, s = run(J)
    dp, sp = run(J[perm])
    np.testing.assert_allclose(sp.weights, np.asarray(s.weights)[perm], atol=1e-5)
    np.testing.assert_allclose(dp, d, atol=1e-5)


def test_jit_matches_no_jit_and_bf16():
    rng = np.random.default_rng(2)
    J = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
    tx = ob.aligned_mtl(num_tasks=5, scale_mode="median")
    s0 = tx.init(jnp.zeros(6))
    d1, s1 = tx.update(J, s0)
    d2, s2 = jax.jit(tx.update)(J, s0)
    np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s1.weights, s2.weights, rtol=1e-5, atol=1e-6)
    d3, _ = jax.jit(tx.update)(J.astype(jnp.bfloat16), s0)
    assert d3.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(d3, np.float32)))


def test_chain_with_adam_reaches_pareto_set():
    a = jnp.array([1.0, 2.0, -1.0])
    b = jnp.array([-1.0, 0.5, 2.0])

    def losses(w):
        return jnp.stack([jnp.sum((w - a) ** 2), 3.0 * jnp.sum((w - b) ** 2)])

    tx = optax.chain(ob.aligned_mtl(), optax.adam(0.05))
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
    assert ob.task_weights(state).shape == (2,)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"scale_mode": "max"}, "scale_mode"),
        ({"pref_vector": []}, "pref_vector"),
        ({"pref_vector": [[1.0, 2.0]]}, "pref_vector"),
        ({"pref_vector": [1.0, -1.0]}, "pref_vector"),
        ({"pref_vector": [1.0, float("nan")]}, "pref_vector"),
        ({"pref_vector": [0.0, 0.0]}, "pref_vector"),
        ({"pref_vector": "ab"}, "pref_vector"),
        ({"pref_vector": 1.0}, "pref_vector"),
        ({"pref_vector": [1.0, 2.0], "num_tasks": 3}, "pref_vector"),
        ({"num_tasks": 0}, "num_tasks"),
        ({"sync": "x"}, "sync"),
    ],
)
def test_bad_hyperparameters_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        ob.aligned_mtl(**kw)


def test_pref_vector_fixes_the_task_count():
    tx = ob.aligned_mtl(pref_vector=[1.0, 2.0, 3.0])
    assert tx.init(jnp.zeros(2)).weights.shape == (3,)
    with pytest.raises(ValueError, match="num_tasks=3"):
        tx.update(jnp.ones((2, 2)), tx.init(jnp.zeros(2)))


def test_inject_hyperparams_pref_vector():
    J = jnp.asarray(J_GOLDEN, jnp.float32)
    tx = optax.inject_hyperparams(ob.aligned_mtl, static_args=("scale_mode", "num_tasks"))(
        pref_vector=jnp.array([0.5, 0.5]), num_tasks=2
    )
    d, _ = jax.jit(tx.update)(J, tx.init(jnp.zeros(3)))
    np.testing.assert_allclose(d, [0.2133, 0.9673, 0.9673], atol=1e-4)
