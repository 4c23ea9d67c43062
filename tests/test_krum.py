"""Krum: golden values, a NumPy reference from the raw gradients, the task-count checks.

The reference transcribes torchjd's ``src/torchjd/aggregation/_krum.py`` (SimplexLab/
TorchJD at commit 862baeda7dc5beef3731f75a23382427ad5db3ef; Blanchard et al. 2017) in
float64, with distances taken between the gradient vectors directly (not through the
Gramian): scores are the sums of the ``T - f - 2`` smallest distances to the others, the
``m`` lowest scores are averaged (a stable sort: ties go to the lower index).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_balance as ob

J_KRUM = np.array(
    [
        [1.0, 1.0, 1.0],
        [1.0, 0.0, 1.0],
        [75.0, -666.0, 23],  # adversarial row
        [1.0, 2.0, 3.0],
        [2.0, 0.0, 1.0],
    ]
)


def reference(J, f, m):
    """(weights, scores) of Multi-Krum on the rows of J."""
    J = np.asarray(J, np.float64)
    t = len(J)
    dist = np.linalg.norm(J[:, None, :] - J[None, :, :], axis=-1)
    scores = np.array([np.sort(np.delete(dist[i], i))[: t - f - 2].sum() for i in range(t)])
    chosen = np.argsort(scores, kind="stable")[:m]
    w = np.zeros(t)
    w[chosen] = 1.0 / m
    return w, scores


def test_golden_values_match_torchjd():
    # torchjd 0.18 tests/unit/aggregation/test_values.py: Krum(1, 4) and KrumWeighting(1, 4).
    tx = ob.krum(1, n_selected=4)
    d, state = tx.update(jnp.asarray(J_KRUM, jnp.float32), tx.init(jnp.zeros(3)))
    np.testing.assert_allclose(d, [1.25, 0.75, 1.5], atol=1e-6)
    np.testing.assert_array_equal(state.weights, [0.25, 0.25, 0.0, 0.25, 0.25])
    w, _ = ob.weightings.krum(1, n_selected=4)(J_KRUM @ J_KRUM.T)
    np.testing.assert_array_equal(w, reference(J_KRUM, 1, 4)[0])


@pytest.mark.parametrize("t", [3, 4, 5, 8, 16])
def test_matches_reference_on_random_gradients(t):
    rng = np.random.default_rng(t)
    combos = sorted({(f, m) for f in (0, 1, t - 3) for m in (1, 2, t) if f + 3 <= t and m <= t})
    for f, m in combos:
        tx = ob.krum(f, n_selected=m, num_tasks=t)
        update = jax.jit(tx.update)
        state = tx.init(jnp.zeros(6))
        for _ in range(3):
            J = rng.normal(size=(t, 6)) * rng.uniform(0.5, 2.0, size=(t, 1))
            J[rng.integers(t)] *= 50.0  # an outlier
            J = J.astype(np.float32).astype(np.float64)
            w_ref, scores = reference(J, f, m)
            # At T = f + 3 the mutually nearest pair ties exactly (both: lower index);
            # any other near-tie could be decided by rounding.
            gaps = np.diff(np.sort(scores))
            # (f32 distances through the Gramian: ~u ||g||^2 / d, far below 1e-5 here)
            assert np.all((gaps == 0) | (gaps > 1e-5 * np.median(scores))), "another seed"
            d, state = update(jnp.asarray(J, jnp.float32), state)
            np.testing.assert_array_equal(state.weights, w_ref.astype(np.float32))
            np.testing.assert_allclose(d, w_ref @ J, rtol=1e-6, atol=1e-6)


def test_outlier_is_never_selected():
    rng = np.random.default_rng(1)
    J = rng.normal(size=(7, 5))
    J[3] = 1e6  # one adversarial task
    tx = ob.krum(2, n_selected=4)
    _, state = tx.update(jnp.asarray(J, jnp.float32), tx.init(jnp.zeros(5)))
    assert float(state.weights[3]) == 0.0 and np.isclose(float(state.weights.sum()), 1.0)


def test_ties_go_to_the_lower_index():
    # T = f + 3 = 3: the two mutually nearest gradients always tie (score = their distance)
    J = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]], np.float32)
    tx = ob.krum(0)
    _, state = tx.update(jnp.asarray(J), tx.init(jnp.zeros(2)))
    np.testing.assert_array_equal(state.weights, [1.0, 0.0, 0.0])
    _, state = tx.update(jnp.asarray(J[[1, 0, 2]]), tx.init(jnp.zeros(2)))
    np.testing.assert_array_equal(state.weights, [1.0, 0.0, 0.0])  # now the other one


@pytest.mark.parametrize(
    "f, m, t, fragment",
    [
        (1, 1, 3, "needs at least 4 tasks (n_byzantine + 3), got T=3"),
        (12, 4, 14, "needs at least 15 tasks (n_byzantine + 3), got T=14"),
        (12, 16, 15, "`n_selected`=16 needs at least 16 tasks, got T=15"),
    ],
)
def test_too_few_tasks_raise_at_construction_init_and_trace(f, m, t, fragment):
    # torchjd's test_matrix_shape_check cases, at each place T becomes known
    with pytest.raises(ValueError, match=re.escape(fragment)):
        ob.krum(f, n_selected=m, num_tasks=t)
    with pytest.raises(ValueError, match="needs at least"):
        ob.weightings.krum(f, n_selected=m).init(t)
    tx = ob.krum(f, n_selected=m)  # T unknown: the first update's trace raises
    with pytest.raises(ValueError, match="needs at least"):
        jax.eval_shape(tx.update, jnp.zeros((t, 2)), tx.init(jnp.zeros(2)))


@pytest.mark.parametrize("f, m, t", [(1, 1, 4), (1, 4, 4), (12, 4, 15), (12, 15, 15)])
def test_enough_tasks_accepted(f, m, t):
    tx = ob.krum(f, n_selected=m, num_tasks=t)
    J = jnp.asarray(np.random.default_rng(t).normal(size=(t, 3)), jnp.float32)
    d, state = tx.update(J, tx.init(jnp.zeros(3)))
    assert np.isclose(float(state.weights.sum()), 1.0) and np.all(np.isfinite(np.asarray(d)))


@pytest.mark.parametrize(
    "args, kwargs, fragment",
    [
        ((-1,), {}, "`n_byzantine` must be an integer in [0, inf)"),
        ((1.0,), {}, "`n_byzantine` must be a Python int"),
        ((1,), {"n_selected": 0}, "`n_selected` must be an integer in [1, inf)"),
        ((1,), {"n_selected": -5}, "`n_selected` must be an integer in [1, inf)"),
        ((0,), {"num_tasks": 0}, "`num_tasks` must be >= 1"),
    ],
)
def test_invalid_hyperparameters(args, kwargs, fragment):
    with pytest.raises(ValueError) as e:
        ob.krum(*args, **kwargs)
    assert fragment in str(e.value)
