"""The core's Gramian against a NumPy float64 Gramian, for every code path of leaf_gram."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from optax_balance import _core


def _np_gram(leaves: list[np.ndarray]) -> np.ndarray:
    t = leaves[0].shape[0]
    out = np.zeros((t, t))
    for g in leaves:
        f = np.asarray(g, np.float64).reshape(t, -1)
        out += f @ f.T
    return out


# Shapes hit the blocked path (a divisor in 16..1024), the flat path (primes), tiny leaves.
SHAPES = [(128, 64), (37, 11), (5,), (1,), (64,), (3, 1000), (101, 13), (7919,)]


@pytest.mark.parametrize("t", [1, 2, 3, 8])
def test_gramian_matches_float64(t: int) -> None:
    rng = np.random.default_rng(t)
    leaves = [
        (rng.standard_normal((t, *s)) * rng.uniform(0.1, 10.0, (t,) + (1,) * len(s))).astype(
            np.float32
        )
        for s in SHAPES
    ]
    got = np.asarray(_core.gramian([jnp.asarray(x) for x in leaves], t), np.float64)
    want = _np_gram(leaves)
    assert got.shape == (t, t)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(got, got.T)


@pytest.mark.parametrize("t", [1, 2, 4])
def test_gramian_bf16_and_extreme_scales(t: int) -> None:
    rng = np.random.default_rng(10 + t)
    scale = np.logspace(-10, 10, t)[:, None]
    for dtype in (jnp.bfloat16, jnp.float32):
        for shape in [(t, 640), (t, 33)]:
            x = jnp.asarray(rng.standard_normal(shape) * scale[:, :1] ** 0.5, dtype)
            got = np.asarray(_core.leaf_gram(x), np.float64)
            f = np.asarray(x.astype(jnp.float32), np.float64)
            want = f @ f.T
            assert np.all(np.isfinite(got))
            assert got.dtype == np.float64 and _core.leaf_gram(x).dtype == jnp.float32
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_gramian_zero_gradients() -> None:
    for t in (1, 2, 3):
        for n in (64, 10):
            g = _core.leaf_gram(jnp.zeros((t, n)))
            np.testing.assert_array_equal(np.asarray(g), np.zeros((t, t)))
