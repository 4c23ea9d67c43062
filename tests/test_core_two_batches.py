"""The core's two-batch input: the cross-Gramian kernels against float64, ``task_grads2``
validation, the combination of both batches, and the weighting layer on a cross-Gramian.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_balance as ob
from optax_balance import _core
from optax_balance._core import _gram
from tests.tolerance import dot_bound


def assert_cross_close(got, x, y) -> None:
    """``got`` equals ``x y^T`` (float64 reference) within the float32 dot bound."""
    f = np.asarray(x, np.float64).reshape(np.shape(x)[0], -1)
    h = np.asarray(y, np.float64).reshape(np.shape(y)[0], -1)
    err = np.abs(np.asarray(got, np.float64) - f @ h.T)
    bound = dot_bound(np.abs(f) @ np.abs(h).T, f.shape[1])
    assert np.all(err <= bound), (err.max(), bound.min())


_CHUNK = 4096
SIZES = [1, 17, 7919, 65536 + 7919, 3 * _CHUNK + 5]


@pytest.mark.parametrize("kernel", ["dot", "chunked dot", "cpu"])
@pytest.mark.parametrize("t", [1, 2, 5, 7])
def test_each_cross_kernel_matches_float64(kernel, t):
    fn = {
        "dot": _gram._cross_gram_dot,
        "chunked dot": lambda x, y, dt: _gram._cross_gram_chunked(
            _gram._cross_gram_dot, x, y, dt, _CHUNK
        ),
        "cpu": _gram._cross_gram_cpu,
    }[kernel]
    rng = np.random.default_rng(t)
    for n in SIZES:
        x = (rng.standard_normal((t, n)) * rng.uniform(0.1, 10.0, (t, 1))).astype(np.float32)
        y = rng.standard_normal((t, n)).astype(np.float32)
        got = jax.jit(fn, static_argnums=2)(jnp.asarray(x), jnp.asarray(y), jnp.float32)
        assert got.shape == (t, t) and got.dtype == jnp.float32
        assert_cross_close(got, x, y)


@pytest.mark.parametrize("t", [1, 3, 8])
def test_cross_gramian_over_leaves_and_dtypes(t):
    rng = np.random.default_rng(20 + t)
    shapes = [(40,), (30, 25), (2 * _CHUNK + 3,)]
    xs = [rng.standard_normal((t, *s)).astype(np.float32) for s in shapes]
    ys = [rng.standard_normal((t, *s)).astype(np.float32) for s in shapes]
    got = _core.cross_gramian([jnp.asarray(x) for x in xs], [jnp.asarray(y) for y in ys], t)
    flat = lambda a: np.concatenate([v.reshape(t, -1) for v in a], 1)  # noqa: E731
    assert_cross_close(got, flat(xs), flat(ys))
    # bf16 next to f32 (the values are exact in f32): accumulated in f32.
    xb = [jnp.asarray(x, jnp.bfloat16) for x in xs]
    got = _core.cross_gramian(xb, [jnp.asarray(y) for y in ys], t)
    assert got.dtype == jnp.float32
    assert_cross_close(got, flat([np.asarray(x, np.float32) for x in xb]), flat(ys))


class _State(NamedTuple):
    weights: jax.Array


def _diag_share() -> ob.Weighting:
    """Weights proportional to the cross-Gramian's diagonal (a test weighting)."""

    def weigh(stats, state):
        d = jnp.diagonal(stats.cross_gram)
        w = d / jnp.sum(d)
        return w, _State(w)

    return ob.Weighting(
        lambda t: _State(jnp.full((t,), 1.0 / max(t, 1))), weigh, ("cross_gram",), "diag"
    )


def test_update_combines_the_mean_of_both_batches():
    tx = ob.balance(_diag_share(), shared={"a": True, "h": False})
    p = {"a": jnp.zeros((2, 3)), "h": jnp.zeros(2)}
    rng = np.random.default_rng(0)
    g1 = {"a": rng.normal(size=(3, 2, 3)), "h": rng.normal(size=(3, 2))}
    g2 = {"a": rng.normal(size=(3, 2, 3)), "h": rng.normal(size=(3, 2))}
    g1 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g1)
    g2 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), g2)
    d, s = jax.jit(lambda a, b: tx.update(a, tx.init(p), p, task_grads2=b))(g1, g2)
    j1 = np.asarray(g1["a"], np.float64).reshape(3, -1)
    j2 = np.asarray(g2["a"].astype(jnp.float32), np.float64).reshape(3, -1)
    w = np.diag(j1 @ j2.T) / np.trace(j1 @ j2.T)
    np.testing.assert_allclose(np.asarray(s.weights), w, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(d["a"]).ravel(), w @ (j1 + j2) / 2, rtol=1e-5, atol=1e-6)
    h2 = np.asarray(g2["h"].astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(d["h"]), (np.asarray(g1["h"]) + h2).sum(0) / 2, 1e-5)
    assert d["a"].dtype == jnp.float32  # the first batch's dtype


def test_second_batch_errors_and_ignored_elsewhere():
    tx = ob.balance(_diag_share())
    g = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"task_grads2=grads2"):
        tx.update(g, tx.init(jnp.zeros(3)))
    with pytest.raises(ValueError, match=r"`task_grads2` leaf <root> has shape \(3, 3\)"):
        tx.update(g, tx.init(jnp.zeros(3)), task_grads2=jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="dtype int32"):
        tx.update(g, tx.init(jnp.zeros(3)), task_grads2=jnp.ones((2, 3), jnp.int32))
    # A weighting that does not need it ignores it, whatever it is.
    up = ob.upgrad()
    d1, _ = up.update(g, up.init(jnp.zeros(3)), task_grads2="anything")
    d2, _ = up.update(g, up.init(jnp.zeros(3)))
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(d2))


def test_weighting_called_on_a_cross_gramian():
    a = np.array([[2.0, -1.0], [0.5, 1.0]])  # not symmetric
    w, s = _diag_share()(a)
    np.testing.assert_allclose(np.asarray(w), [2 / 3, 1 / 3], rtol=1e-6)
    with pytest.raises(ValueError, match=r"\(T, T\) cross-Gramian"):
        _diag_share()(np.ones((2, 3)))
    stats = _core.stats_from_cross_gram(a, losses=[1.0, 2.0])
    assert stats.num_tasks == 2 and stats.gram is None and stats.losses is not None


def test_cross_gram_is_a_statistic():
    assert "cross_gram" in _core.STAT_NAMES
    stats = ob.Stats(cross_gram=jnp.ones((2, 2)))
    assert stats.num_tasks == 2
