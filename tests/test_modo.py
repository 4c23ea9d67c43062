"""MoDo against a NumPy transcription of torchjd's ``MoDoWeighting``, over 12 steps of two
independent mini-batches.

Reference: SimplexLab/TorchJD at commit 862baeda7dc5beef3731f75a23382427ad5db3ef,
``src/torchjd/aggregation/_modo.py`` (``forward``: one projected step
``lambd - gamma * (G @ lambd + rho * lambd)``) and ``_utils/simplex.py`` (the loop
projection, transcribed in ``tests/test_sdmgrad.py``). torchjd's two-batch example
applies the weights to the mean of both batches' losses, as ``ob.modo`` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_balance as ob
from tests.test_sdmgrad import torchjd_projection


def torchjd_modo(matrix, lambd, *, gamma, rho):
    return torchjd_projection(lambd - gamma * (matrix @ lambd + rho * lambd))


@pytest.mark.parametrize(
    "hyper", [{}, {"gamma": 0.02, "rho": 0.0}, {"gamma": 1.0, "rho": 2.0}], ids=str
)
def test_matches_torchjd_over_twelve_steps(hyper):
    full = {"gamma": 0.1, "rho": 0.1, **hyper}
    t = 4
    shared = {"head": False, "trunk": True}
    tx = ob.modo(**hyper, shared=shared, num_tasks=t)
    params = {"head": jnp.zeros((t, 3)), "trunk": jnp.zeros((3, 5))}
    update = jax.jit(lambda g1, g2, s: tx.update(g1, s, params, task_grads2=g2))
    state = tx.init(params)
    lam = np.full(t, 1.0 / t)
    rng = np.random.default_rng(11)
    base = rng.normal(size=(t, 15)) * np.array([[1.0], [2.0], [0.5], [1.5]])
    worst = 0.0
    for _ in range(12):
        j1 = (base + rng.normal(size=base.shape)).astype(np.float32)
        j2 = (base + rng.normal(size=base.shape)).astype(np.float32)
        h1, h2 = rng.normal(size=(2, t, t, 3)).astype(np.float32)

        def tree(j, h):
            return {"head": jnp.asarray(h), "trunk": jnp.asarray(j.reshape(t, 3, 5))}

        d, state = update(tree(j1, h1), tree(j2, h2), state)
        a = j1.astype(np.float64) @ j2.astype(np.float64).T  # not symmetric
        lam = torchjd_modo(a, lam, **full)
        np.testing.assert_allclose(np.asarray(state.weights), lam, rtol=0, atol=2e-6)
        want = lam @ (j1.astype(np.float64) + j2) / 2
        got = np.asarray(d["trunk"], np.float64).ravel()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
        # Heads: the mean over the batches of the summed task gradients.
        np.testing.assert_allclose(np.asarray(d["head"]), (h1 + h2).sum(0) / 2, rtol=1e-5)
        worst = max(worst, float(np.abs(np.asarray(state.weights) - lam).max()))
    assert worst < 2e-6


def test_weighting_on_a_cross_gramian_and_bf16_batches():
    j1 = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.0]])
    j2 = np.array([[0.5, 1.0, 1.0], [1.0, 0.0, -1.0]])
    weights, state = ob.weightings.modo()(j1 @ j2.T)
    np.testing.assert_allclose(
        np.asarray(weights), torchjd_modo(j1 @ j2.T, np.full(2, 0.5), gamma=0.1, rho=0.1)
    )
    tx = ob.modo()
    g1, g2 = jnp.asarray(j1, jnp.bfloat16), jnp.asarray(j2, jnp.float32)  # exact in bf16
    d, s = tx.update(g1, tx.init(jnp.zeros(3, jnp.bfloat16)), task_grads2=g2)
    assert d.dtype == jnp.bfloat16 and s.weights.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(s.weights), np.asarray(weights), rtol=1e-6)


def test_validation():
    for kw, frag in [
        ({"gamma": 0.0}, "`gamma` must be in (0, inf)"),
        ({"rho": -0.1}, "`rho` must be in [0, inf)"),
    ]:
        with pytest.raises(ValueError) as e:
            ob.modo(**kw)
        assert frag in str(e.value)
