"""PCGrad: golden values, a plain NumPy reference on the raw gradients, properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_balance as ob
from optax_balance._gramian._pcgrad import pcgrad_coefficients, task_orders

J_GOLDEN = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


def reference_projected(J: np.ndarray, i: int, order: np.ndarray) -> np.ndarray:
    """g_i^PC: task i's gradient projected off the conflicting g_j, visited in ``order``."""
    J = np.asarray(J, np.float64)
    g = J[i].copy()
    for j in order:
        if j == i:
            continue
        dot = g @ J[j]
        nsq = J[j] @ J[j]
        if dot < 0 and nsq > 0:
            g = g - dot / nsq * J[j]
    return g


def reference_pcgrad(J: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """Yu et al., Algorithm 1, on the raw gradient vectors (float64), projections summed."""
    return sum(reference_projected(J, i, orders[i]) for i in range(len(J)))


def step_orders(state: ob.PCGradState, t: int) -> np.ndarray:
    """The orders the next update will draw: the documented key schedule."""
    _, step_key = jax.random.split(jax.random.wrap_key_data(state.key))
    return np.asarray(task_orders(step_key, t))


def test_golden_and_order_independent_for_two_tasks():
    expected = np.array([0.5848, 3.8012, 3.8012])
    # by hand: g1 + 22/38 g2 and g2 + 22/18 g1, summed
    np.testing.assert_allclose(
        reference_pcgrad(J_GOLDEN, np.array([[0, 1], [1, 0]])), expected, atol=1e-4
    )
    np.testing.assert_allclose(
        reference_pcgrad(J_GOLDEN, np.array([[1, 0], [0, 1]])), expected, atol=1e-4
    )
    for seed in (0, 1):
        tx = ob.pcgrad(seed=seed)
        state, update = tx.init(jnp.zeros(3)), jax.jit(tx.update)
        for _ in range(3):
            # no order is drawn with two tasks, but the key still advances as documented
            next_key, _ = jax.random.split(jax.random.wrap_key_data(state.key))
            d, state = update(jnp.asarray(J_GOLDEN, jnp.float32), state)
            np.testing.assert_array_equal(state.key, jax.random.key_data(next_key))
            np.testing.assert_allclose(d, expected, atol=1e-4)
            np.testing.assert_allclose(state.weights, [1 + 22 / 18, 1 + 22 / 38], atol=1e-5)


@pytest.mark.parametrize("t", [1, 2, 3, 5, 8, 16])
def test_matches_reference_on_random_matrices(t):
    rng = np.random.default_rng(t)
    tx = ob.pcgrad(seed=t)
    update = jax.jit(tx.update)
    state = tx.init({"a": jnp.zeros((3,)), "b": jnp.zeros((2, 2))})
    worst = 0.0
    for _ in range(3):
        J = rng.normal(size=(t, 7)) * rng.uniform(0.1, 10.0, size=(t, 1))
        grads = {
            "a": jnp.asarray(J[:, :3], jnp.float32),
            "b": jnp.asarray(J[:, 3:].reshape(t, 2, 2), jnp.float32),
        }
        orders = step_orders(state, t)
        ref = reference_pcgrad(J.astype(np.float32).astype(np.float64), orders)
        d, state = update(grads, state)
        got = np.concatenate([np.asarray(d["a"]), np.asarray(d["b"]).ravel()])
        worst = max(worst, np.max(np.abs(got - ref)) / max(1.0, np.max(np.abs(ref))))
    assert worst < 1e-4, worst


def test_coefficients_give_projected_gradients():
    rng = np.random.default_rng(0)
    t = 6
    J = rng.normal(size=(t, 4))
    orders = np.stack([rng.permutation(t) for _ in range(t)])
    C = np.asarray(pcgrad_coefficients(jnp.asarray(J @ J.T, jnp.float32), jnp.asarray(orders)))
    for i in range(t):
        np.testing.assert_allclose(C[i] @ J, reference_projected(J, i, orders[i]), atol=1e-4)


def test_fixed_seed_is_deterministic_and_steps_reshuffle():
    rng = np.random.default_rng(1)
    t = 8
    J = jnp.asarray(rng.normal(size=(t, 3)), jnp.float32)  # 8 tasks in 3-D: many conflicts

    def run(seed):
        tx = ob.pcgrad(seed=seed)
        state, update = tx.init(jnp.zeros(3)), jax.jit(tx.update)
        outs, orders = [], []
        for _ in range(4):
            orders.append(step_orders(state, t))
            d, state = update(J, state)
            outs.append(np.asarray(d))
        return np.stack(outs), np.stack(orders)

    a, oa = run(3)
    b, ob_ = run(3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(oa, ob_)
    # every step draws new orders, and here the orders change the result
    assert all(not np.array_equal(oa[k], oa[k + 1]) for k in range(3))
    assert len({tuple(np.round(x, 5)) for x in a}) > 1
    _, oc = run(4)
    assert not np.array_equal(oa[0], oc[0])
    # each row is a permutation
    assert np.all(np.sort(oa, axis=-1) == np.arange(t))


def test_no_conflict_is_the_plain_sum():
    J = jnp.array([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0], [0.0, 0.0, 3.0]])
    tx = ob.pcgrad()
    d, state = tx.update(J, tx.init(jnp.zeros(3)))
    np.testing.assert_allclose(d, J.sum(0), rtol=1e-6)
    np.testing.assert_allclose(state.weights, [1.0, 1.0, 1.0])


HOSTILE = {
    "zero": np.zeros((3, 4)),
    "one_zero_row": np.array([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 1.0, 0.0]]),
    "duplicate": np.array([[1.0, -2.0, 0.5, 0.0]] * 3),
    "opposite": np.array([[1.0, -2.0, 0.5, 0.0], [-1.0, 2.0, -0.5, 0.0]]),
    "single": np.array([[1.0, -2.0, 0.5, 3.0]]),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_finite_on_hostile_inputs(name):
    tx = ob.pcgrad()
    state0, update = tx.init(jnp.zeros(4)), jax.jit(tx.update)
    for scale in (1e-10, 1.0, 1e10):
        J = HOSTILE[name] * scale
        d, state = update(jnp.asarray(J, jnp.float32), state0)
        assert np.all(np.isfinite(d)) and np.all(np.isfinite(state.weights))
        ref = reference_pcgrad(J, step_orders(state0, J.shape[0]))
        np.testing.assert_allclose(d, ref, rtol=1e-5, atol=1e-6 * scale)


def test_mixed_scales_finite_and_match_reference():
    rng = np.random.default_rng(5)
    J = rng.normal(size=(4, 6)) * np.array([[1e-10], [1e10], [1.0], [1e5]])
    tx = ob.pcgrad(seed=2)
    state = tx.init(jnp.zeros(6))
    ref = reference_pcgrad(J.astype(np.float32).astype(np.float64), step_orders(state, 4))
    d, state = tx.update(jnp.asarray(J, jnp.float32), state)
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(state.weights))
    np.testing.assert_allclose(d, ref, rtol=1e-4, atol=1e-4 * np.max(np.abs(ref)))


def test_jit_matches_no_jit_and_bf16():
    rng = np.random.default_rng(2)
    J = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
    tx = ob.pcgrad(seed=7, num_tasks=5)
    s0 = tx.init(jnp.zeros(6))
    d1, s1 = tx.update(J, s0)
    d2, s2 = jax.jit(tx.update)(J, s0)
    np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(s1.key, s2.key)
    d3, _ = jax.jit(tx.update)(J.astype(jnp.bfloat16), s0)
    assert d3.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(d3, np.float32)))


def test_chain_with_adam_decreases_losses():
    # two conflicting quadratic tasks on a shared vector
    a = jnp.array([1.0, 2.0, -1.0])
    b = jnp.array([-1.0, 0.5, 2.0])

    def losses(w):
        return jnp.stack([jnp.sum((w - a) ** 2), jnp.sum((w - b) ** 2)])

    tx = optax.chain(ob.pcgrad(seed=1), optax.adam(0.05))
    w = jnp.zeros(3)
    state = tx.init(w)

    @jax.jit
    def step(w, state):
        vals, grads = ob.value_and_task_grads(losses)(w)
        upd, state = tx.update(grads, state, w, task_losses=vals)
        return optax.apply_updates(w, upd), state, vals

    first = None
    for _ in range(150):
        w, state, vals = step(w, state)
        first = vals if first is None else first
    # two quadratics: the Pareto set is the segment [a, b]; PCGrad reaches it
    u = jnp.clip(jnp.dot(w - a, b - a) / jnp.dot(b - a, b - a), 0.0, 1.0)
    assert float(jnp.linalg.norm(w - (a + u * (b - a)))) < 0.05
    assert float(vals.sum()) < float(first.sum())
    assert ob.task_weights(state).shape == (2,)


def test_non_finite_step_keeps_key_and_weights():
    tx = ob.pcgrad(seed=5)
    update = jax.jit(tx.update)
    J = jnp.asarray(J_GOLDEN, jnp.float32)
    _, s1 = update(J, tx.init(jnp.zeros(3)))
    _, s2 = update(J.at[0, 0].set(jnp.nan), s1)
    np.testing.assert_array_equal(s2.key, s1.key)
    np.testing.assert_array_equal(s2.weights, s1.weights)
    _, s3 = update(J, s2)
    assert not np.array_equal(s3.key, s2.key)


@pytest.mark.parametrize("seed", [1.5, "0", True, None, 2**63])
def test_bad_seed_raises(seed):
    with pytest.raises(ValueError, match="seed"):
        ob.pcgrad(seed=seed)


def test_bad_num_tasks_and_sync_raise():
    with pytest.raises(ValueError, match="num_tasks"):
        ob.pcgrad(num_tasks=0)
    with pytest.raises(ValueError, match="sync"):
        ob.pcgrad(sync="nope")
