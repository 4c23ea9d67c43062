"""The core's Gramian against a NumPy float64 Gramian, for every code path of leaf_gram."""

from __future__ import annotations

import jax
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


# Each CPU kernel, called directly, on shapes that reach every branch: exact block
# divisors, a tail after the blocks (n with no divisor in 16..1024), several loop chunks
# plus a remainder, and leaves of one or two chunks (a single dot).
KERNEL_SIZES = [1, 17, 7919, 65536 + 7919, 3 * _core._CHUNK + 5, 2 * _core._CHUNK]


def _chunked(kernel, chunk):
    return lambda x, dt: _core._gram_chunked(kernel, x, dt, chunk)


@pytest.mark.parametrize("kernel", ["pairs", "dot", "chunked pairs", "chunked dot"])
@pytest.mark.parametrize("t", [2, 3, 12, 13])
def test_each_kernel_matches_float64(kernel: str, t: int) -> None:
    fn = {
        "pairs": _core._gram_pairs,
        "dot": _core._gram_dot,
        "chunked pairs": _chunked(_core._gram_pairs, _core._CHUNK),
        "chunked dot": _chunked(_core._gram_dot, _core._CHUNK),
    }
    rng = np.random.default_rng(100 + t)
    for n in KERNEL_SIZES:
        x = (rng.standard_normal((t, n)) * rng.uniform(0.1, 10.0, (t, 1))).astype(np.float32)
        got = np.asarray(jax.jit(fn[kernel], static_argnums=1)(jnp.asarray(x), jnp.float32))
        f = x.astype(np.float64)
        want = f @ f.T
        assert got.shape == (t, t) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6 * np.abs(want).max())
        np.testing.assert_array_equal(got, got.T)


@pytest.mark.parametrize("t", [3, 8, 12, 13, 20])
def test_core_picks_a_kernel_for_every_size(t: int) -> None:
    """leaf_gram on leaves below and above the size thresholds, bf16 and float32."""
    rng = np.random.default_rng(t)
    for shape in [(40,), (300, 250), (_core._PAIR_MIN_N + 3,)]:
        for dtype in (jnp.float32, jnp.bfloat16):
            x = jnp.asarray(rng.standard_normal((t, *shape)), dtype)
            got = np.asarray(jax.jit(_core.leaf_gram)(x), np.float64)
            f = np.asarray(x.astype(jnp.float32), np.float64).reshape(t, -1)
            want = f @ f.T
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6 * np.abs(want).max())


def test_bf16_pairs_accumulate_in_float32() -> None:
    # 2^16 copies of 1 + 2^-7 (exact in bf16): a bf16 accumulator would stall at 256.
    x = jnp.full((2, 1 << 16), 1 + 2.0**-7, jnp.bfloat16)
    got = np.asarray(_core._gram_pairs(x, jnp.float32))
    np.testing.assert_allclose(got, np.full((2, 2), (1 << 16) * (1 + 2.0**-7) ** 2), rtol=1e-6)


@pytest.mark.parametrize("t", [2, 8, 16])
def test_gramian_of_gradients_made_in_the_same_jit(t: int) -> None:
    """Stacked Dense-kernel gradients from vmap(grad) in the same jit as the Gramian.

    XLA computes them as ``(T * out, in)`` and may hand the Gramian a transposed
    physical layout; the result must not depend on it.
    """
    rng = np.random.default_rng(t)
    w = jnp.asarray(rng.standard_normal((96, 700)) / 10, jnp.float32)
    xs = jnp.asarray(rng.standard_normal((32, 96)), jnp.float32)
    ys = jnp.asarray(rng.standard_normal((t, 32, 700)), jnp.float32)

    def loss(w, y):
        return jnp.mean((jnp.tanh(xs @ w) - y) ** 2)

    @jax.jit
    def gram(w, ys):
        g = jax.vmap(jax.grad(loss), in_axes=(None, 0))(w, ys)
        return _core.gramian([g], t), g

    got, g = gram(w, ys)
    f = np.asarray(g, np.float64).reshape(t, -1)
    want = f @ f.T
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=1e-6 * np.abs(want).max())
