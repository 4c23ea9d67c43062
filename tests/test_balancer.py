"""The EnCodec balancer against a plain NumPy transcription of audiocraft's formula."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_balance as ob


class NumpyBalancer:
    """audiocraft's Balancer, written out plainly (norms of whole-tree gradients)."""

    def __init__(self, weights, balance_grads=True, total_norm=1.0, ema_decay=0.999,
                 per_batch_item=False, epsilon=1e-12):  # fmt: skip
        self.w = np.asarray(weights, np.float64)
        self.balance, self.total_norm, self.decay = balance_grads, total_norm, ema_decay
        self.per_item, self.eps = per_batch_item, epsilon
        self.total = np.zeros(len(self.w))
        self.fix = 0.0

    def step(self, grads):  # grads: list over tasks of (B, ...) or flat arrays
        norms = []
        for g in grads:
            g = np.asarray(g, np.float64)
            if self.per_item:
                norms.append(np.mean(np.sqrt((g.reshape(g.shape[0], -1) ** 2).sum(1))))
            else:
                norms.append(np.sqrt((g**2).sum()))
        self.total = self.total * self.decay + np.array(norms)
        self.fix = self.fix * self.decay + 1.0
        avg = self.total / self.fix
        ratios = avg / avg.sum()
        if self.balance:
            scale = self.w / self.w.sum() * self.total_norm / (self.eps + avg)
        else:
            scale = self.w
        out = sum(s * np.asarray(g, np.float64) for s, g in zip(scale, grads))
        return out, scale, ratios


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"ema_decay": 0.9, "total_norm": 2.5},
        {"balance_grads": False},
        {"per_batch_item": True, "ema_decay": 0.8},
        {"ema_decay": 0.0},
    ],
)
def test_matches_numpy_reference_over_steps(kw):
    rng = np.random.default_rng(0)
    weights = [1.0, 3.0, 0.5]
    tx = ob.balancer(weights, **kw)
    ref = NumpyBalancer(weights, **kw)
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros((4, 5)))
    scales = np.array([1.0, 100.0, 0.01])[:, None, None]
    for step in range(8):
        g = rng.normal(size=(3, 4, 5)) * scales * (1 + step)
        out, state = update(jnp.asarray(g, jnp.float32), state)
        ref_out, ref_scale, ref_ratios = ref.step(list(g))
        np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(state.weights, ref_scale, rtol=1e-5)
        np.testing.assert_allclose(state.ratios, ref_ratios, rtol=1e-5)


def test_pytree_norm_is_the_norm_over_all_shared_leaves():
    rng = np.random.default_rng(1)
    grads = {"a": rng.normal(size=(2, 3)), "b": rng.normal(size=(2, 2, 2))}
    tx = ob.balancer([1.0, 1.0])
    out, state = tx.update(jax.tree.map(jnp.asarray, grads), tx.init({"a": 0, "b": 0}))
    flat = np.concatenate([grads["a"], grads["b"].reshape(2, -1)], 1)
    _, scale, _ = NumpyBalancer([1.0, 1.0]).step(list(flat))
    np.testing.assert_allclose(state.weights, scale, rtol=1e-5)
    np.testing.assert_allclose(out["b"], np.tensordot(scale, grads["b"], 1), rtol=1e-5)


def test_first_step_gives_each_task_its_share_of_the_norm():
    # Bias-corrected EMA starts at the first norm: the contributions have norms
    # total_norm * w_i / sum(w) exactly (up to epsilon).
    g = jnp.array([[30.0, 40.0, 0.0], [0.0, 0.0, 1e-3]])
    tx = ob.balancer([1.0, 3.0], total_norm=2.0)
    _, state = tx.update(g, tx.init(jnp.zeros(3)))
    contrib = np.asarray(state.weights)[:, None] * np.asarray(g)
    np.testing.assert_allclose(np.linalg.norm(contrib, axis=1), [0.5, 1.5], rtol=1e-5)


def test_output_is_invariant_to_each_tasks_scale():
    rng = np.random.default_rng(2)
    g = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
    c = jnp.array([1e-6, 1.0, 1e5])[:, None]
    tx = ob.balancer([1.0, 2.0, 3.0], ema_decay=0.5)
    s1 = s2 = tx.init(jnp.zeros(6))
    for k in range(3):
        o1, s1 = tx.update(g * (k + 1), s1)
        o2, s2 = tx.update(g * c * (k + 1), s2)
        np.testing.assert_allclose(o1, o2, rtol=1e-4)
    np.testing.assert_allclose(s1.ratios @ np.ones(3), 1.0, rtol=1e-6)


def test_mapping_weights_follow_insertion_order():
    g = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    tx = ob.balancer({"spectral": 3.0, "l1": 1.0})
    out, _ = tx.update(g, tx.init(jnp.zeros(2)))
    np.testing.assert_allclose(out, [0.75, 0.25], rtol=1e-6)


def test_zero_gradient_task_gives_finite_output():
    g = jnp.array([[0.0, 0.0], [1.0, 1.0]])
    for eps in (1e-12, 0.0):
        tx = ob.balancer([1.0, 1.0], epsilon=eps)
        out, state = tx.update(g, tx.init(jnp.zeros(2)))
        assert np.all(np.isfinite(out)) and np.all(np.isfinite(state.weights))
        np.testing.assert_allclose(out, [0.5 / np.sqrt(2), 0.5 / np.sqrt(2)], rtol=1e-5)


def test_non_finite_gradient_keeps_state_and_is_visible():
    tx = ob.balancer([1.0, 1.0], ema_decay=0.5)
    state = tx.init(jnp.zeros(2))
    _, state = tx.update(jnp.array([[1.0, 0.0], [0.0, 2.0]]), state)
    out, new = tx.update(jnp.array([[jnp.nan, 0.0], [0.0, 2.0]]), state)
    assert np.isnan(np.asarray(out)).any()
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)


def test_in_chain_with_adam_under_jit():
    tx = optax.chain(ob.balancer([1.0, 1.0]), optax.adam(0.1))
    c = jnp.array([[1.0, 0.0], [0.0, 100.0]])

    def losses(x):
        return jnp.sum((x[None] - c) ** 2, axis=1) * jnp.array([1.0, 1e-4])

    x = jnp.zeros(2)
    state = tx.init(x)

    @jax.jit
    def step(x, state):
        vals, grads = ob.value_and_task_grads(losses)(x)
        upd, state = tx.update(grads, state, x, task_losses=vals)
        return optax.apply_updates(x, upd), state

    for _ in range(200):
        x, state = step(x, state)
    assert np.all(np.isfinite(np.asarray(x)))
    assert ob.task_weights(state).shape == (2,)


@pytest.mark.parametrize(
    "args, kw, match",
    [
        ([[1.0, -1.0]], {}, "`weights` must be finite and >= 0"),
        ([[0.0, 0.0]], {}, "positive sum"),
        ([[]], {}, "at least one task weight"),
        (["ab"], {}, "sequence or a mapping"),
        ([[1.0]], {"total_norm": 0.0}, r"`total_norm` must be in \(0, inf\)"),
        ([[1.0]], {"ema_decay": 1.5}, r"`ema_decay` must be in \[0, 1\]"),
        ([[1.0]], {"epsilon": -1.0}, r"`epsilon` must be in \[0, inf\)"),
    ],
)
def test_bad_hyperparameters(args, kw, match):
    with pytest.raises(ValueError, match=match):
        ob.balancer(*args, **kw)
