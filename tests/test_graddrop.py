"""GradDrop: a NumPy reference with the documented uniforms, statistics of the sign choice.

The reference transcribes torchjd's ``src/torchjd/aggregation/_graddrop.py`` (SimplexLab/
TorchJD at commit 862baeda7dc5beef3731f75a23382427ad5db3ef; Chen et al., Algorithm 1,
lines 10-15) on each leaf in float64. Its uniforms come from the documented key schedule,
written out here with ``jax.random``: each update splits the state's key into the next
key and a step key; leaf ``k`` draws ``uniform(fold_in(step_key, k), leaf_shape)`` in
float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_balance as ob

J_GOLDEN = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


@functools.partial(jax.jit, static_argnums=1)
def _documented_uniforms(key_data, shapes):
    key, step_key = jax.random.split(jax.random.wrap_key_data(key_data))
    us = [
        jax.random.uniform(jax.random.fold_in(step_key, k), s, jnp.float32)
        for k, s in enumerate(shapes)
    ]
    return jax.random.key_data(key), us


def documented_uniforms(key_data, shapes):
    """(next key data, [U per leaf]) for leaves of ``shapes`` in the params' leaf order."""
    key, us = _documented_uniforms(jnp.asarray(key_data), tuple(shapes))
    return np.asarray(key), [np.asarray(u, np.float64) for u in us]


def reference_leaf(g, u, leak=None):
    """torchjd's GradDrop.forward on one stacked leaf g (T, ...), with uniforms u (...)."""
    g = np.asarray(g, np.float64)
    t = g.shape[0]
    leak = np.zeros(t) if leak is None else np.asarray(leak, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        purity = 0.5 * (1.0 + g.sum(0) / np.abs(g).sum(0))  # NaN where every g is 0
    out = np.zeros(g.shape[1:])
    masks = []
    for i in range(t):
        m_i = (purity > u) * (g[i] > 0) + (purity < u) * (g[i] < 0)
        mask = leak[i] + (1 - leak[i]) * m_i
        masks.append(mask)
        out += mask * g[i]
    return out, np.stack(masks)


def reference_weights(leaves, masks, leak):
    """The documented (T,) summary: kept share of each task's squared norm (the leak for a
    zero gradient)."""
    kept = sum(np.sum((m * g**2).reshape(len(g), -1), axis=1) for g, m in zip(leaves, masks))
    sq = sum(np.sum((g**2).reshape(len(g), -1), axis=1) for g in leaves)
    return np.where(sq > 0, kept / np.where(sq > 0, sq, 1.0), leak)


SHAPES = {"a": (3,), "b": (4, 5), "c": (2,)}


def _tree(J_leaves):
    return {k: jnp.asarray(v, jnp.float32) for k, v in zip(sorted(SHAPES), J_leaves)}


@pytest.mark.parametrize("t", [1, 2, 3, 8, 16])
def test_matches_reference_over_steps(t):
    """12 steps, three leaves (the last task-specific: summed, but its index still counts
    in the key schedule), a leak vector; output, masks' summary and key exactly."""
    rng = np.random.default_rng(t)
    leak = rng.uniform(0.0, 0.5, size=t)
    shared = {"a": True, "b": True, "c": False}
    tx = ob.graddrop(leak=list(leak), seed=t, shared=shared)
    update = jax.jit(tx.update)
    state = tx.init({k: jnp.zeros(s) for k, s in SHAPES.items()})
    key = np.asarray(state.key)
    shapes = [SHAPES[k] for k in sorted(SHAPES)]
    for _ in range(12):
        gs = [
            (rng.normal(size=(t, *s)) * rng.uniform(0.1, 10.0, size=(t,) + (1,) * len(s)))
            .astype(np.float32)
            .astype(np.float64)
            for s in shapes
        ]
        key, us = documented_uniforms(key, shapes)
        ref_a, m_a = reference_leaf(gs[0], us[0], leak)
        ref_b, m_b = reference_leaf(gs[1], us[1], leak)
        d, state = update(_tree(gs), state)
        np.testing.assert_array_equal(np.asarray(state.key), key)
        np.testing.assert_allclose(d["a"], ref_a, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(d["b"], ref_b, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(d["c"], gs[2].sum(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(
            state.weights, reference_weights(gs[:2], [m_a, m_b], leak), rtol=1e-5, atol=1e-7
        )


def test_weighting_returns_the_masks():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(4, 6)).astype(np.float32)
    w = ob.weightings.graddrop(seed=3)
    state = w.init(4)
    key, (u,) = documented_uniforms(np.asarray(state.key), [(6,)])
    masks, state = w(ob.Stats(grads={"x": jnp.asarray(g)}), state)
    np.testing.assert_array_equal(masks["x"], reference_leaf(g, u)[1])
    np.testing.assert_array_equal(state.key, key)


def test_golden_value_and_weights():
    # torchjd 0.18 test_values: GradDrop()(J) = [6, 2, 2] (one draw of its global RNG);
    # seed 0's draw keeps the positive 6 too. Coordinates 1, 2 agree in sign: kept.
    tx = ob.graddrop()
    d, state = tx.update(jnp.asarray(J_GOLDEN, jnp.float32), tx.init(jnp.zeros(3)))
    np.testing.assert_array_equal(d, [6.0, 2.0, 2.0])
    np.testing.assert_allclose(state.weights, [2 / 18, 1.0], rtol=1e-6)


def test_sign_choice_frequency_is_the_purity():
    """Statistically: a coordinate with purity P keeps its positive gradients with
    probability P. 3 x 20000 draws of the golden column (P = 0.6) over three steps."""
    n = 20000
    J = np.tile(J_GOLDEN[:, :1], (1, n)).astype(np.float32)  # (2, n): every column -4, 6
    tx = ob.graddrop(seed=11)
    state, update = tx.init(jnp.zeros(n)), jax.jit(tx.update)
    freqs = []
    for _ in range(3):
        d, state = update(jnp.asarray(J), state)
        d = np.asarray(d)
        assert set(np.unique(d)) <= {6.0, -4.0}
        freqs.append(np.mean(d == 6.0))
    sigma = np.sqrt(0.6 * 0.4 / n)
    assert all(abs(f - 0.6) < 5 * sigma for f in freqs), freqs
    assert len(set(freqs)) == 3  # fresh uniforms every step


def test_zero_gradient_share_is_its_leak():
    J = np.array([[1.0, -2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 1.0, 0.5]], np.float32)
    for leak in (None, [0.1, 0.3, 0.0]):
        tx = ob.graddrop(leak=leak)
        _, state = tx.update(jnp.asarray(J), tx.init(jnp.zeros(3)))
        assert float(state.weights[1]) == (0.0 if leak is None else np.float32(0.3))


def test_agreeing_signs_never_dropped_and_zero_columns():
    J = np.array([[1.0, -2.0, 0.0, 3.0], [0.5, -1.0, 0.0, 0.0], [2.0, -0.1, 0.0, 1.0]])
    tx = ob.graddrop(seed=4)
    state, update = tx.init(jnp.zeros(4)), jax.jit(tx.update)
    for _ in range(5):
        d, state = update(jnp.asarray(J, jnp.float32), state)
        np.testing.assert_allclose(d, J.sum(0), rtol=1e-6)
        np.testing.assert_allclose(state.weights, 1.0)


def test_leak_one_is_the_plain_sum_and_leak_bounds_the_weights():
    rng = np.random.default_rng(5)
    J = jnp.asarray(rng.normal(size=(3, 50)), jnp.float32)
    tx = ob.graddrop(leak=[1.0, 1.0, 1.0])
    d, state = tx.update(J, tx.init(jnp.zeros(50)))
    np.testing.assert_allclose(d, np.asarray(J).sum(0), rtol=1e-5, atol=1e-6)
    tx = ob.graddrop(leak=[0.25, 0.0, 0.5])
    _, state = tx.update(J, tx.init(jnp.zeros(50)))
    w = np.asarray(state.weights)
    assert np.all(w >= [0.25, 0.0, 0.5]) and np.all(w <= 1.0) and np.all(w < 1.0)


def test_at_a_representation_is_the_papers_activation_form():
    """Through ob.value_and_balanced_grad the masks act on the per-task gradients with
    respect to the representation, one per batch item and feature (the paper's layer)."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    params = {"enc": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
    heads = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)

    def encoder(p, x):
        return jnp.tanh(x @ p["enc"])

    def heads_fn(p, z, x):
        return jnp.sum((z @ heads.T) ** 2, axis=0)  # (2,): one loss per task

    tx = ob.graddrop(seed=2)
    z_like = jax.eval_shape(encoder, params, x)
    state = tx.init(z_like)
    _, grads, state2 = jax.jit(ob.value_and_balanced_grad(encoder, heads_fn, tx))(params, state, x)
    # Reference: dL_i/dz in NumPy, GradDrop on it (z is leaf 0), the encoder's VJP by jax.
    z = np.asarray(encoder(params, x), np.float64)
    h = np.asarray(heads, np.float64)
    rep = np.stack([2 * (z @ h[i])[:, None] * h[i][None, :] for i in range(2)])  # (2, 5, 4)
    _, (u,) = documented_uniforms(np.asarray(state.key), [(5, 4)])
    combined, _ = reference_leaf(rep, u)
    _, vjp = jax.vjp(lambda p: encoder(p, x), params)
    (want,) = vjp(jnp.asarray(combined, jnp.float32))
    np.testing.assert_allclose(grads["enc"], want["enc"], rtol=1e-4, atol=1e-5)
    assert not np.array_equal(state2.key, state.key)


def test_non_finite_step_keeps_key_and_uses_previous_weights():
    tx = ob.graddrop(seed=5)
    update = jax.jit(tx.update)
    J = jnp.asarray(J_GOLDEN, jnp.float32)
    _, s1 = update(J, tx.init(jnp.zeros(3)))
    d2, s2 = update(J.at[0, 0].set(jnp.inf), s1)
    np.testing.assert_array_equal(s2.key, s1.key)
    np.testing.assert_array_equal(s2.weights, s1.weights)
    np.testing.assert_allclose(d2[1:], (np.asarray(s1.weights) @ J_GOLDEN)[1:], rtol=1e-6)


def test_sync_stats_refused():
    with pytest.raises(ValueError, match="sync='stats' does not average"):
        ob.graddrop(axis_name="data", sync="stats")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"leak": [0.5, -0.1]}, "`leak` must hold values in [0, 1]"),
        ({"leak": [1.5]}, "`leak` must hold values in [0, 1]"),
        ({"leak": [[0.5]]}, "`leak` must hold at least one task weight, as a 1-D vector"),
        ({"leak": 0.5}, "`leak` must be a 1-D sequence"),
        ({"leak": [0.5, 0.5], "num_tasks": 3}, "weighting was built for 2 tasks"),
        ({"seed": 0.5}, "`seed` must be a Python int"),
    ],
)
def test_invalid_hyperparameters(kwargs, fragment):
    with pytest.raises(ValueError) as e:
        ob.graddrop(**kwargs)
    assert fragment in str(e.value)


def test_leak_length_checked_against_the_gradients():
    tx = ob.graddrop(leak=[0.1, 0.2])
    with pytest.raises(ValueError, match="built for num_tasks=2"):
        jax.eval_shape(tx.update, jnp.zeros((3, 4)), tx.init(jnp.zeros(4)))


def test_masks_are_never_written_out():
    """The (T, P) masks are fused into their consumers (the kept norms, the combination;
    the guard does not scan them): the compiled update's temporaries are a few
    coordinate-sized arrays (the purity, the random bits), well below one stacked gradient
    at T=16. Written out, the masks alone are T x P (a fresh buffer per call)."""
    t, params = 16, {"w": jnp.zeros((256, 512)), "b": jnp.zeros((512,))}
    tx = ob.graddrop(leak=[0.1] * t)
    grads = jax.tree.map(lambda p: jnp.zeros((t, *p.shape)), params)
    mem = jax.jit(tx.update).lower(grads, tx.init(params)).compile().memory_analysis()
    if mem is None:
        pytest.skip("no memory analysis on this backend")
    stacked = sum(4 * x.size for x in jax.tree.leaves(grads))
    assert mem.temp_size_in_bytes < 0.5 * stacked, mem.temp_size_in_bytes / stacked
