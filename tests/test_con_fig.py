"""ConFIG: golden values, a NumPy reference on the raw gradients (pinv of the unit rows).

The reference transcribes torchjd's ``src/torchjd/aggregation/_config.py`` (SimplexLab/
TorchJD at commit 862baeda7dc5beef3731f75a23382427ad5db3ef; Liu et al., Eq. 2) in float64:
``units = nan_to_num(J / ||J_i||)``, ``x = pinv(units) @ pref``, ``u = x / max(||x||,
1e-12)``, ``d = (sum_i J_i . u) u``. It never forms a Gramian.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_balance as ob

J_GOLDEN = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


def reference(J, pref=None):
    J = np.asarray(J, np.float64)
    pref = np.ones(len(J)) if pref is None else np.asarray(pref, np.float64)
    norms = np.linalg.norm(J, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        units = np.nan_to_num(J / norms[:, None], nan=0.0)
    x = np.linalg.pinv(units) @ pref
    u = x / max(np.linalg.norm(x), 1e-12)
    return np.sum(J @ u) * u


def _run(J, **kw):
    tx = ob.con_fig(**kw)
    return jax.jit(tx.update)(jnp.asarray(J, jnp.float32), tx.init(jnp.zeros(J.shape[1])))


def _check(d, ref, J):
    # float32: the eigen-solve of the cosine matrix (cond. ~ 1/lambda_min) and the sums
    scale = np.abs(J).sum(axis=0).max()
    np.testing.assert_allclose(np.asarray(d, np.float64), ref, rtol=0, atol=1e-4 * scale)


def test_golden_value_matches_torchjd():
    # torchjd 0.18 tests/unit/aggregation/test_values.py: ConFIG()(J_base).
    d, state = _run(J_GOLDEN)
    np.testing.assert_allclose(d, [0.1588, 2.0706, 2.0706], atol=1e-4)
    np.testing.assert_allclose(d, reference(J_GOLDEN), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state.weights) @ J_GOLDEN, d, rtol=1e-5)
    assert int(state.rank) == 2


@pytest.mark.parametrize("t", [1, 2, 3, 5, 8, 16])
def test_matches_reference_full_rank(t):
    rng = np.random.default_rng(t)
    for _ in range(3):
        J = rng.normal(size=(t, 2 * t + 3)) * rng.uniform(0.1, 10.0, size=(t, 1))
        J = J.astype(np.float32).astype(np.float64)
        d, state = _run(J)
        _check(d, reference(J), J)
        # conflict-free: every task sees the same positive projection on its unit gradient
        proj = J @ np.asarray(d, np.float64) / np.linalg.norm(J, axis=1)
        np.testing.assert_allclose(proj, proj.mean(), rtol=1e-3)
        assert proj.min() > 0 and int(state.rank) == t


@pytest.mark.parametrize("t, n", [(3, 2), (8, 4), (16, 5)])
def test_matches_reference_rank_deficient(t, n):
    """More tasks than dimensions: the pseudo-inverse's least-squares direction."""
    rng = np.random.default_rng(10 * t + n)
    J = rng.normal(size=(t, n)).astype(np.float32).astype(np.float64)
    d, state = _run(J)
    _check(d, reference(J), J)
    assert int(state.rank) == n


@pytest.mark.parametrize(
    "name, J",
    [
        ("duplicate", np.array([[1.0, -2.0, 0.5], [1.0, -2.0, 0.5], [0.0, 1.0, 3.0]])),
        ("duplicate_scaled", np.array([[1.0, -2.0, 0.5], [3.0, -6.0, 1.5], [0.0, 1.0, 3.0]])),
        ("zero_row", np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [0.0, 1.0, 3.0]])),
        ("opposite", np.array([[1.0, -2.0, 0.5], [-1.0, 2.0, -0.5], [0.0, 1.0, 3.0]])),
        ("opposite_pair", np.array([[1.0, -2.0, 0.5], [-1.0, 2.0, -0.5]])),
        ("all_zero", np.zeros((3, 3))),
        ("single", np.array([[1.0, -2.0, 0.5]])),
    ],
)
def test_matches_reference_on_degenerate_inputs(name, J):
    d, state = _run(J)
    ref = reference(J)
    np.testing.assert_allclose(d, ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(state.weights)))
    if name == "zero_row":
        assert float(state.weights[1]) == 0.0
    if name == "single":  # T=1: the gradient itself
        np.testing.assert_allclose(d, J[0], rtol=1e-6)


@pytest.mark.parametrize("pref", [[1.0, 2.0, 3.0], [0.0, 1.0, 1.0], [5.0, 0.5, 1.0]])
def test_pref_vector_matches_reference(pref):
    rng = np.random.default_rng(1)
    J = rng.normal(size=(3, 6)).astype(np.float32).astype(np.float64)
    d, _ = _run(J, pref_vector=pref)
    _check(d, reference(J, pref), J)
    # the projections on the unit gradients are proportional to the preferences
    proj = J @ np.asarray(d, np.float64) / np.linalg.norm(J, axis=1)
    np.testing.assert_allclose(proj, proj.sum() * np.asarray(pref) / np.sum(pref), atol=1e-5)


def test_mixed_scales_match_reference():
    rng = np.random.default_rng(2)
    J = rng.normal(size=(4, 6)) * np.array([[1e-10], [1e10], [1.0], [1e5]])
    J = J.astype(np.float32).astype(np.float64)
    d, state = _run(J)
    ref = reference(J)
    assert np.all(np.isfinite(np.asarray(d))) and np.all(np.isfinite(state.weights))
    np.testing.assert_allclose(d, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_weighting_on_a_gramian():
    w, state = ob.weightings.con_fig()(J_GOLDEN @ J_GOLDEN.T)
    np.testing.assert_allclose(np.asarray(w) @ J_GOLDEN, reference(J_GOLDEN), rtol=1e-5)
    assert isinstance(state, ob.ConFIGState)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"pref_vector": [1.0, -1.0]}, "`pref_vector` must be finite and >= 0"),
        ({"pref_vector": [0.0, 0.0]}, "with a positive sum"),
        ({"pref_vector": [[1.0]]}, "1-D vector"),
        ({"pref_vector": [1.0, 1.0], "num_tasks": 3}, "weighting was built for 2 tasks"),
        ({"num_tasks": 0}, "`num_tasks` must be >= 1"),
    ],
)
def test_invalid_hyperparameters(kwargs, fragment):
    with pytest.raises(ValueError) as e:
        ob.con_fig(**kwargs)
    assert fragment in str(e.value)
