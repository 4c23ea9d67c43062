"""TrimmedMean: golden value, a NumPy reference (sort per coordinate), ties, the T checks.

The reference transcribes torchjd's ``src/torchjd/aggregation/_trimmed_mean.py``
(SimplexLab/TorchJD at commit 862baeda7dc5beef3731f75a23382427ad5db3ef; Yin et al. 2018)
in float64: sort each column, keep rows ``b .. T-b-1``, average.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_balance as ob
from optax_balance._jacobian._trimmed_mean import trimmed_mean_coefficients
from tests.tolerance import dot_bound

J_TM = np.array([[1e11, 3.0], [1.0, -1e11], [-1e10, 1e10], [2.0, 2.0]])


def reference(J, b):
    J = np.asarray(J, np.float64)
    t = len(J)
    return np.sort(J, axis=0)[b : t - b].mean(axis=0)


def reference_weights(J, b):
    """Per-coordinate weights with tied values sharing their kept positions equally."""
    J = np.asarray(J, np.float64)
    t = len(J)
    w = np.zeros_like(J)
    for k in range(J.shape[1]):
        col = J[:, k]
        for i in range(t):
            below = np.sum(col < col[i])
            equal = np.sum(col == col[i])
            kept = len(set(range(below, below + equal)) & set(range(b, t - b)))
            w[i, k] = kept / equal / (t - 2 * b)
    return w


def test_golden_value_matches_torchjd():
    # torchjd 0.18 tests/unit/aggregation/test_values.py: TrimmedMean(trim_number=1).
    tx = ob.trimmed_mean(1)
    d, state = tx.update(jnp.asarray(J_TM, jnp.float32), tx.init(jnp.zeros(2)))
    np.testing.assert_allclose(d, [1.5, 2.5], rtol=1e-6)
    np.testing.assert_allclose(d, reference(J_TM, 1), rtol=1e-6)


# 20 and 33: past the unrolled comparisons (T <= 16), the fori_loop
@pytest.mark.parametrize("t", [1, 3, 4, 8, 16, 20, 33])
def test_matches_reference_on_random_gradients(t):
    rng = np.random.default_rng(t)
    for b in sorted({min(1, (t - 1) // 2), (t - 1) // 2}):  # b = 0: the mean, tested below
        tx = ob.trimmed_mean(b, num_tasks=t)
        update = jax.jit(tx.update)
        state = tx.init({"x": jnp.zeros((3, 4)), "y": jnp.zeros(5)})
        for _ in range(2):
            J = rng.normal(size=(t, 17)) * rng.uniform(0.1, 10.0, size=(t, 1))
            J[rng.integers(t)] *= 1e6  # an outlier task
            J = J.astype(np.float32).astype(np.float64)
            tree = {
                "x": jnp.asarray(J[:, :12].reshape(t, 3, 4), jnp.float32),
                "y": jnp.asarray(J[:, 12:], jnp.float32),
            }
            d, state = update(tree, state)
            got = np.concatenate([np.asarray(d["x"]).ravel(), np.asarray(d["y"])])
            ref = reference(J, b)
            w = reference_weights(J, b)
            # a float32 sum of T weighted terms (tests/tolerance.py), weights 1/(T-2b) rounded
            tol = dot_bound(np.sum(w * np.abs(J), axis=0), t + 1)
            assert np.all(np.abs(got - ref) <= tol), (b, np.abs(got - ref).max())
            want = np.sum(w * J**2, axis=1) / np.sum(J**2, axis=1)
            np.testing.assert_allclose(state.weights, want, rtol=1e-4)


# 20 and 33: past the unrolled comparisons, b <= 4 takes the extremes (O(b T)).
@pytest.mark.parametrize("t", [5, 20, 33])
def test_ties_share_their_kept_positions(t):
    rng = np.random.default_rng(3)
    J = rng.integers(-2, 3, size=(t, 40)).astype(np.float32)  # many ties
    J[:, 0] = 1.0  # one value: extreme both ways
    J[:, 1] = np.arange(t) >= 2  # two values, the smaller one twice
    J[:, 2] = np.arange(t) >= t - 1  # two values, the larger one once
    for b in [b for b in (1, 2, 4) if t >= 2 * b + 1]:
        m = np.asarray(trimmed_mean_coefficients(jnp.asarray(J), b))
        np.testing.assert_allclose(m, reference_weights(J, b), rtol=1e-6)
        np.testing.assert_allclose(m.sum(axis=0), 1.0, rtol=1e-6)
        np.testing.assert_allclose(np.sum(m * J, axis=0), reference(J, b), rtol=1e-6, atol=1e-6)
        # permuting the tasks permutes the weights (no index-based tie-break)
        perm = rng.permutation(t)
        m_p = np.asarray(trimmed_mean_coefficients(jnp.asarray(J[perm]), b))
        np.testing.assert_allclose(m_p, m[perm], rtol=1e-6)


def test_trim_zero_is_the_mean_and_outliers_are_trimmed():
    rng = np.random.default_rng(4)
    J = rng.normal(size=(5, 6)).astype(np.float32)
    tx = ob.trimmed_mean(0)
    d, state = tx.update(jnp.asarray(J), tx.init(jnp.zeros(6)))
    np.testing.assert_allclose(d, J.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.weights, 0.2, rtol=1e-6)
    J[2] = 1e15  # an adversarial task: trimmed from every coordinate
    tx = ob.trimmed_mean(1)
    d, state = tx.update(jnp.asarray(J), tx.init(jnp.zeros(6)))
    assert float(state.weights[2]) == 0.0 and np.all(np.abs(np.asarray(d)) < 10)


@pytest.mark.parametrize(
    "t, b, ok",
    [(1, 0, True), (1, 1, False), (10, 0, True), (10, 4, True), (10, 5, False)],
)
def test_task_count_checks(t, b, ok):
    # torchjd's test_matrix_shape_check cases, at construction, init and trace
    J = jnp.asarray(np.random.default_rng(t).normal(size=(t, 3)), jnp.float32)
    if ok:
        tx = ob.trimmed_mean(b, num_tasks=t)
        d, _ = tx.update(J, tx.init(jnp.zeros(3)))
        np.testing.assert_allclose(d, reference(np.asarray(J), b), rtol=1e-5, atol=1e-6)
        return
    fragment = f"needs at least {2 * b + 1} tasks (2 * trim_number + 1), got T={t}"
    with pytest.raises(ValueError, match=re.escape(fragment)):
        ob.trimmed_mean(b, num_tasks=t)
    with pytest.raises(ValueError, match=re.escape(fragment)):
        ob.weightings.trimmed_mean(b).init(t)
    tx = ob.trimmed_mean(b)
    with pytest.raises(ValueError, match=re.escape(fragment)):
        jax.eval_shape(tx.update, J, tx.init(jnp.zeros(3)))


def test_sync_stats_refused():
    with pytest.raises(ValueError, match="sync='stats' does not average"):
        ob.trimmed_mean(1, axis_name="data", sync="stats")


@pytest.mark.parametrize(
    "b, fragment",
    [(-1, "`trim_number` must be an integer in [0, inf)"), (1.0, "`trim_number` must be a")],
)
def test_invalid_hyperparameters(b, fragment):
    with pytest.raises(ValueError) as e:
        ob.trimmed_mean(b)
    assert fragment in str(e.value)
