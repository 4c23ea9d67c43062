"""SDMGrad against torchjd's ``SDMGradWeighting``: its worked examples and a NumPy
transcription of its ``forward``, over 12 steps of two independent mini-batches.

Reference: SimplexLab/TorchJD at commit 862baeda7dc5beef3731f75a23382427ad5db3ef,
``src/torchjd/aggregation/_sdmgrad.py`` (with ``_utils/simplex.py``'s projection) and
``tests/unit/aggregation/test_sdmgrad.py`` (the hand-derived values). The transcription
keeps torchjd's loop projection (sort, running sum, first break), not the sort-based
one ``ob.sdmgrad`` uses through ``optax.projections``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_balance as ob


def torchjd_projection(y: np.ndarray) -> np.ndarray:
    """``torchjd.aggregation._utils.simplex._projection2simplex``."""
    m = len(y)
    sorted_y = np.sort(y)[::-1]
    tmpsum = 0.0
    tmax_f = (np.sum(y) - 1.0) / m
    for i in range(m - 1):
        tmpsum += sorted_y[i]
        tmax = (tmpsum - 1.0) / (i + 1.0)
        if tmax > sorted_y[i + 1]:
            tmax_f = tmax
            break
    return np.maximum(y - tmax_f, 0.0)


def torchjd_sdmgrad(matrix, w, *, lr, momentum, n_iter, lambda_, pref=None):
    """``SDMGradWeighting.forward`` with its state ``w``: (returned weights, new w)."""
    m = matrix.shape[0]
    w_tilde = np.full(m, 1.0 / m) if pref is None else pref
    diag = np.clip(np.diag(matrix), 0.0, None)
    scale = np.sqrt(diag).mean()
    a = matrix / (scale**2 + 1e-8)
    velocity = None
    for _ in range(n_iter):
        grad = a @ (w + lambda_ * w_tilde)
        velocity = grad if velocity is None else momentum * velocity + grad
        w = torchjd_projection(w - lr * velocity)
    return (w + lambda_ * w_tilde) / (1.0 + lambda_), w


def test_torchjd_worked_examples_with_defaults():
    """torchjd's test_update_recurrence, test_two_consecutive_steps, test_custom_pref_vector
    (lr=10, momentum=0.5, lambda_=0.3, n_iter=1)."""
    a1 = np.diag([1.0, 0.25, 0.0])
    w = ob.weightings.sdmgrad(n_iter=1)
    weights, state = w(a1)
    np.testing.assert_allclose(np.asarray(weights), [1 / 13, 1 / 13, 11 / 13], rtol=1e-6)
    weights, state = w(np.eye(3), state)
    np.testing.assert_allclose(np.asarray(weights), [6 / 13, 6 / 13, 1 / 13], rtol=1e-6)
    pref = ob.weightings.sdmgrad(n_iter=1, pref_vector=[0.0, 0.0, 1.0])
    np.testing.assert_allclose(np.asarray(pref(a1)[0]), [0.0, 0.0, 1.0], atol=1e-7)
    # The transformation from two batches whose cross-Gramian is diag(1, 1/4, 0).
    j1 = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    j2 = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 3.0]])
    tx = ob.sdmgrad(n_iter=1)
    d, s = tx.update(jnp.asarray(j1), tx.init(jnp.zeros(3)), task_grads2=jnp.asarray(j2))
    np.testing.assert_allclose(np.asarray(s.weights), [1 / 13, 1 / 13, 11 / 13], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(d), np.asarray(s.weights) @ (j1 + j2) / 2, rtol=1e-6)


@pytest.mark.parametrize(
    "hyper",
    [
        {"lr": 1.0},
        {"lr": 0.5, "momentum": 0.9, "n_iter": 7, "lambda_": 1.0},
        {"lr": 1.0, "lambda_": 0.0, "pref_vector": [0.5, 0.3, 0.2]},
    ],
    ids=["lr1", "others", "mgda_pref"],
)
def test_matches_torchjd_over_twelve_steps(hyper):
    """Independent batches each step; the state (inner w) carries over.

    At torchjd's default lr=10 the inner heavy-ball steps do not converge (lr times the
    normalised matrix's eigenvalues is far above 2), so a float32 and a float64 run part
    after a few steps; the state evolution is compared where the solve is contracting.
    """
    full = {"lr": 10.0, "momentum": 0.5, "n_iter": 20, "lambda_": 0.3, **hyper}
    pref = hyper.get("pref_vector")
    full["pref"] = None if pref is None else np.asarray(pref)
    full.pop("pref_vector", None)
    t = 3
    tx = ob.sdmgrad(**hyper, num_tasks=t)
    update = jax.jit(lambda g1, g2, s: tx.update(g1, s, task_grads2=g2))
    state = tx.init(jnp.zeros(10))
    w_ref = np.full(t, 1.0 / t)
    rng = np.random.default_rng(7)
    base = rng.normal(size=(t, 10)) * np.array([[1.0], [3.0], [0.3]])
    worst = 0.0
    for _ in range(12):
        # Two noisy draws around the same expected gradients.
        j1 = (base + 0.5 * rng.normal(size=base.shape)).astype(np.float32)
        j2 = (base + 0.5 * rng.normal(size=base.shape)).astype(np.float32)
        d, state = update(jnp.asarray(j1), jnp.asarray(j2), state)
        a = j1.astype(np.float64) @ j2.astype(np.float64).T
        weights, w_ref = torchjd_sdmgrad(a, w_ref, **full)
        np.testing.assert_allclose(np.asarray(state.weights), weights, rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(state.inner_weights), w_ref, rtol=0, atol=1e-5)
        want = weights @ (j1.astype(np.float64) + j2) / 2
        np.testing.assert_allclose(np.asarray(d), want, rtol=0, atol=1e-5 * np.abs(want).max())
        worst = max(worst, float(np.abs(np.asarray(state.weights) - weights).max()))
    assert worst < 1e-5


def test_cross_gramian_is_not_the_gramian():
    """The weights come from J1 J2^T: with batch 2's task 0 flipped, its estimate of
    ||g_0||^2 is negative and the weights differ from the one-batch Gramian's."""
    j1 = jnp.array([[1.0, 0.2], [0.1, 1.0]])
    j2 = jnp.array([[-1.0, -0.2], [0.1, 1.0]])
    tx = ob.sdmgrad(lr=1.0)
    _, s_cross = tx.update(j1, tx.init(jnp.zeros(2)), task_grads2=j2)
    _, s_same = tx.update(j1, tx.init(jnp.zeros(2)), task_grads2=j1)
    a = np.asarray(j1, np.float64) @ np.asarray(j2, np.float64).T
    np.testing.assert_allclose(
        np.asarray(s_cross.weights),
        torchjd_sdmgrad(a, np.full(2, 0.5), lr=1.0, momentum=0.5, n_iter=20, lambda_=0.3)[0],
        atol=1e-6,
    )
    assert not np.allclose(np.asarray(s_cross.weights), np.asarray(s_same.weights), atol=1e-2)


def test_validation():
    for kw, frag in [
        ({"lr": 0.0}, "`lr` must be in (0, inf)"),
        ({"momentum": 1.0}, "`momentum` must be in [0, 1)"),
        ({"n_iter": 0}, "`n_iter` must be an integer in [1, inf)"),
        ({"n_iter": 2.0}, "`n_iter` must be a Python int"),
        ({"lambda_": -0.1}, "`lambda_` must be in [0, inf)"),
        ({"pref_vector": [[1.0]]}, "`pref_vector`"),
        ({"pref_vector": [1.0, 2.0], "num_tasks": 3}, "built for 2 tasks"),
    ]:
        with pytest.raises(ValueError) as e:
            ob.sdmgrad(**kw)
        assert frag in str(e.value)
