"""The core's statistic kernels: the Gramian against NumPy float64 for every code path of
leaf_gram, and the non-finite test of the guard."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_balance import _core
from optax_balance._core import _gram
from tests.tolerance import U32, assert_gram_close, dot_bound

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
    assert got.shape == (t, t)
    assert_gram_close(got, np.concatenate([x.reshape(t, -1) for x in leaves], axis=1))
    np.testing.assert_array_equal(got, got.T)


@pytest.mark.parametrize("t", [1, 2, 4])
def test_gramian_bf16_and_extreme_scales(t: int) -> None:
    rng = np.random.default_rng(10 + t)
    scale = np.logspace(-10, 10, t)[:, None]
    for dtype in (jnp.bfloat16, jnp.float32):
        for shape in [(t, 640), (t, 33)]:
            x = jnp.asarray(rng.standard_normal(shape) * scale[:, :1] ** 0.5, dtype)
            got = np.asarray(_gram.leaf_gram(x), np.float64)
            assert np.all(np.isfinite(got))
            assert _gram.leaf_gram(x).dtype == jnp.float32
            assert_gram_close(got, x.astype(jnp.float32))


def test_gramian_zero_gradients() -> None:
    for t in (1, 2, 3):
        for n in (64, 10):
            g = _gram.leaf_gram(jnp.zeros((t, n)))
            np.testing.assert_array_equal(np.asarray(g), np.zeros((t, t)))


# Each CPU kernel, called directly, on shapes that reach every branch: leaves shorter than
# two chunks (one dot), several loop chunks plus an odd tail, an exact number of chunks.
KERNEL_SIZES = [1, 17, 7919, 2 * _gram._MAX_CHUNK, 3 * _gram._MAX_CHUNK + 5]


def _chunked(kernel, chunk):
    return lambda x, dt: _gram._gram_chunked(kernel, x, dt, chunk)


@pytest.mark.parametrize("kernel", ["dot", "split dot", "chunked dot", "chunked split dot"])
@pytest.mark.parametrize("t", [2, 3, 13])
def test_each_kernel_matches_float64(kernel: str, t: int) -> None:
    fn = {
        "dot": _gram._gram_dot,
        "split dot": _gram._gram_split_dot,
        "chunked dot": _chunked(_gram._gram_dot, _gram._MIN_CHUNK),
        "chunked split dot": _chunked(_gram._gram_split_dot, _gram._MIN_CHUNK),
    }
    rng = np.random.default_rng(100 + t)
    for n in KERNEL_SIZES:
        if "split" in kernel and n % 2 and (kernel == "split dot" or n < 2 * _gram._MIN_CHUNK):
            continue  # the split kernel takes even lengths (the core sends it only those)
        x = (rng.standard_normal((t, n)) * rng.uniform(0.1, 10.0, (t, 1))).astype(np.float32)
        got = np.asarray(jax.jit(fn[kernel], static_argnums=1)(jnp.asarray(x), jnp.float32))
        assert got.shape == (t, t) and got.dtype == np.float32
        assert_gram_close(got, x)
        np.testing.assert_array_equal(got, got.T)


def test_chunk_columns() -> None:
    """About _CHUNK_BYTES of float32 per chunk up to T=12, a power of two within the clip."""
    got = {t: _gram._chunk_columns(t) for t in (1, 2, 3, 4, 5, 8, 12, 13, 32, 1000)}
    want = {1: 16384, 2: 16384, 3: 8192, 4: 8192, 5: 4096, 8: 4096, 12: 4096}
    assert got == want | {13: 16384, 32: 16384, 1000: 16384}


@pytest.mark.parametrize("t", [2, 3, 8, 20])
def test_core_picks_a_kernel_for_every_size(t: int) -> None:
    """leaf_gram on leaves below and above the chunk and split thresholds, bf16 and f32.

    At T=2 the even lengths take the split dot and the odd one the plain dot.
    """
    rng = np.random.default_rng(t)
    for shape in [(40,), (300, 250), (2 * _gram._MAX_CHUNK + 3,), (3000,)]:
        for dtype in (jnp.float32, jnp.bfloat16):
            x = jnp.asarray(rng.standard_normal((t, *shape)), dtype)
            got = np.asarray(jax.jit(_gram.leaf_gram)(x), np.float64)
            assert_gram_close(got, x.astype(jnp.float32))


@pytest.mark.parametrize("t", [2, 8])
def test_bf16_dots_accumulate_in_float32(t: int) -> None:
    # 2^16 copies of 1 + 2^-7 (exact in bf16): a bf16 accumulator would stall at 256.
    x = jnp.full((t, 1 << 16), 1 + 2.0**-7, jnp.bfloat16)
    got = np.asarray(jax.jit(_gram.leaf_gram)(x))
    assert_gram_close(got, x.astype(jnp.float32))


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
    assert_gram_close(got, g)


def test_all_finite_on_large_arrays() -> None:
    """The non-finite guard's test: any Inf or NaN anywhere, never an overflow of a sum."""
    fin = jax.jit(_core.all_finite)
    n = 3 * _gram._MAX_CHUNK + 5
    big = np.full((4, n), 3e38, np.float32)  # sums of these overflow; the values are finite
    assert bool(fin(jnp.asarray(big)))
    assert bool(fin({"a": jnp.asarray(-big).astype(jnp.bfloat16), "i": jnp.arange(3)}))
    for bad in (np.inf, -np.inf, np.nan):
        for pos in [(0, 0), (3, n - 1), (2, n // 2)]:
            x = big.copy()
            x[pos] = bad
            assert not bool(fin({"ok": jnp.ones(3), "x": jnp.asarray(x)})), (bad, pos)
            assert not bool(fin(jnp.asarray(x).astype(jnp.bfloat16))), (bad, pos)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sq_norms_of_long_leaves(dtype) -> None:
    """leaf_sq_norms on (T, n) views of 3-D leaves (the barrier path) and on 2-D leaves."""
    rng = np.random.default_rng(7)
    n_long = 70_000
    for shape in [(n_long // 40, 40), (n_long,), (300, 7)]:
        scale = np.asarray([10.0, 1.0, 1e-3]).reshape((3,) + (1,) * len(shape))
        x = jnp.asarray(rng.standard_normal((3, *shape)) * scale, dtype)
        got = np.asarray(jax.jit(_gram.leaf_sq_norms)(x), np.float64)
        f = np.asarray(x.astype(jnp.float32), np.float64).reshape(3, -1)
        want = np.sum(f * f, axis=1)
        bound = dot_bound(want, f.shape[1])
        assert np.all(np.abs(got - want) <= bound), (shape, got, want)


# The statistics of a mix Z = diag(a) Y + diag(b) G (tracked estimates: MoCo, DB-MTL),
# computed without writing Z. Forming each entry of Z in float32 costs at most
# fl(fl(a y) + fl(b g)) - (a y + b g) <= 2u (|a y| + |b g|) + O(u^2) =: 2u w, so an entry of
# Z Z^T differs from the exact one by at most dot_bound(W) (the dot's own rounding, on
# |Z| <= (1 + 2u) w) plus (4u + 4u^2) W, with W = w w^T summed over the columns.
MIX_SHAPES = [(5,), (37, 11), (2 * _gram._MAX_CHUNK + 3,), (3000,), (300, 250)]


def _mix_inputs(t: int, seed: int, g_dtype):
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1.0, 1.0, t).astype(np.float32)
    b = (rng.uniform(0.1, 10.0, t) * rng.choice([-1.0, 1.0], t)).astype(np.float32)
    if t > 1:
        a[0], b[-1] = 0.0, 0.0  # a task on G alone, one on Y alone
    ys = [rng.standard_normal((t, *s)).astype(np.float32) for s in MIX_SHAPES]
    gs = [jnp.asarray(rng.standard_normal((t, *s)), g_dtype) for s in MIX_SHAPES]
    return a, b, ys, gs


def _mix_reference(a, b, ys, gs):
    """Z in float64 from the float32 inputs, and w = |a y| + |b g| (both (T, n))."""
    t = a.shape[0]
    y = np.concatenate([np.asarray(x, np.float64).reshape(t, -1) for x in ys], axis=1)
    g = np.concatenate(
        [np.asarray(x.astype(jnp.float32), np.float64).reshape(t, -1) for x in gs], axis=1
    )
    a64, b64 = np.asarray(a, np.float64)[:, None], np.asarray(b, np.float64)[:, None]
    return a64 * y + b64 * g, np.abs(a64 * y) + np.abs(b64 * g)


@pytest.mark.parametrize("t", [1, 2, 3, 8, 13])
@pytest.mark.parametrize("g_dtype", [jnp.float32, jnp.bfloat16])
def test_mix_gramian_matches_float64(t: int, g_dtype) -> None:
    a, b, ys, gs = _mix_inputs(t, 200 + t, g_dtype)
    got = jax.jit(lambda a, b, ys, gs: _core.mix_gramian(a, ys, b, gs, t))(a, b, ys, gs)
    assert got.shape == (t, t) and got.dtype == jnp.float32
    z, w = _mix_reference(a, b, ys, gs)
    ww = w @ w.T
    bound = dot_bound(ww * (1 + 2 * U32) ** 2, z.shape[1]) + (4 * U32 + 4 * U32**2) * ww
    err = np.abs(np.asarray(got, np.float64) - z @ z.T)
    assert np.all(err <= bound), (err / bound).max()


@pytest.mark.parametrize("t", [1, 2, 8])
@pytest.mark.parametrize("g_dtype", [jnp.float32, jnp.bfloat16])
def test_mix_sq_norms_and_mix_leaf_match_float64(t: int, g_dtype) -> None:
    a, b, ys, gs = _mix_inputs(t, 300 + t, g_dtype)
    got = jax.jit(lambda a, b, ys, gs: _core.mix_sq_norms(a, ys, b, gs, t))(a, b, ys, gs)
    assert got.shape == (t,) and got.dtype == jnp.float32
    z, w = _mix_reference(a, b, ys, gs)
    ww = np.sum(w * w, axis=1)
    bound = dot_bound(ww * (1 + 2 * U32) ** 2, z.shape[1]) + (4 * U32 + 4 * U32**2) * ww
    err = np.abs(np.asarray(got, np.float64) - np.sum(z * z, axis=1))
    assert np.all(err <= bound), (err / bound).max()
    # The leaf itself (what the new state holds): each entry within 2u w of the exact mix.
    leaves = [
        _core.mix_leaf(jnp.asarray(a), jnp.asarray(y), jnp.asarray(b), g) for y, g in zip(ys, gs)
    ]
    assert all(x.dtype == jnp.float32 and x.shape == y.shape for x, y in zip(leaves, ys))
    flat = np.concatenate([np.asarray(x, np.float64).reshape(t, -1) for x in leaves], axis=1)
    assert np.all(np.abs(flat - z) <= (2 * U32 + 2 * U32**2) * w)


def test_mix_statistics_of_opposite_and_zero_parts() -> None:
    """A mix that cancels exactly (a y = -b g) has a zero Gramian and zero norms, where an
    expansion over Y Y^T, Y G^T and G G^T would leave rounding noise (or a negative
    squared norm) of the size of |y|^2."""
    t, n = 3, 2 * _gram._MAX_CHUNK + 3
    y = jnp.asarray(np.random.default_rng(0).standard_normal((t, n)), jnp.float32)
    a, b = jnp.asarray([1.0, 0.5, 0.0]), jnp.asarray([1.0, 0.25, 0.0])
    g = jnp.stack([-y[0], -2.0 * y[1], y[2]])
    np.testing.assert_array_equal(np.asarray(_core.mix_gramian(a, [y], b, [g], t)), 0.0)
    np.testing.assert_array_equal(np.asarray(_core.mix_sq_norms(a, [y], b, [g], t)), 0.0)
