"""The core's tracked gradient estimates (``Weighting.tracked``), head scales
(``Weighting.head_scales``) and unscanned state fields (``Weighting.unscanned``), on small
weightings written here: an exponential moving average of the task gradients, weighted
by fixed weights.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_balance as ob
from optax_balance import _core

W = np.array([1.0, 2.0, 0.5])


class EMAState(NamedTuple):
    weights: jax.Array
    ema: Any
    scales: jax.Array


def ema_weighting(decay: float = 0.5) -> ob.Weighting:
    def init(t, params):
        return EMAState(jnp.ones((t,)), _core.stacked_zeros_like(params, t), jnp.ones((t,)))

    def weigh(stats, state):
        ema = jax.tree.map(
            lambda m, g: None if g is None else decay * m + (1 - decay) * g,
            state.ema,
            stats.grads,
            is_leaf=lambda x: x is None,
        )
        # Non-finite whenever an estimate is (the contract of `tracked`).
        w = jnp.asarray(W, jnp.float32) + 0.0 * stats.sq_norms
        return w, EMAState(w, ema, 1.0 / stats.losses)

    return ob.Weighting(
        init,
        weigh,
        needs=("grads", "sq_norms", "losses"),
        name="ema",
        init_takes_params=True,
        tracked="ema",
        head_scales="scales",
    )


SHARED = {"a": True, "h": False}
PARAMS = {"a": jnp.zeros((2, 2)), "h": jnp.zeros(3)}


def test_estimates_are_combined_and_heads_scaled():
    tx = ob.balance(ema_weighting(), shared=SHARED, num_tasks=3)
    state = tx.init(PARAMS)
    assert state.ema["h"] is None and state.ema["a"].shape == (3, 2, 2)
    update = jax.jit(lambda g, s, losses: tx.update(g, s, PARAMS, task_losses=losses))
    rng = np.random.default_rng(0)
    ema = np.zeros((3, 4))
    for _ in range(4):
        g = {"a": rng.normal(size=(3, 2, 2)), "h": rng.normal(size=(3, 3))}
        losses = rng.uniform(0.5, 2.0, size=3)
        d, state = update(jax.tree.map(jnp.asarray, g), state, jnp.asarray(losses))
        ema = 0.5 * ema + 0.5 * g["a"].reshape(3, -1)
        np.testing.assert_allclose(np.asarray(d["a"]).ravel(), W @ ema, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(d["h"]), (1 / losses) @ g["h"], rtol=1e-5)


@pytest.mark.parametrize("vmapped", [False, True])
def test_nonfinite_step_keeps_estimates_and_combines_incoming(vmapped):
    tx = ob.balance(ema_weighting(), shared=SHARED, num_tasks=3)
    rng = np.random.default_rng(1)
    g = {"a": jnp.asarray(rng.normal(size=(3, 2, 2))), "h": jnp.asarray(rng.normal(size=(3, 3)))}
    losses = jnp.array([1.0, 2.0, 4.0])
    _, s1 = tx.update(g, tx.init(PARAMS), PARAMS, task_losses=losses)
    bad = {"a": g["a"].at[1, 0, 0].set(jnp.nan), "h": g["h"]}

    def step(g, s):
        return tx.update(g, s, PARAMS, task_losses=losses * 2.0)

    if vmapped:  # lax.cond becomes a select under vmap
        d, s2 = jax.vmap(step, (0, None))(jax.tree.map(lambda x: x[None], bad), s1)
        d, s2 = jax.tree.map(lambda x: x[0], (d, s2))
    else:
        d, s2 = jax.jit(step)(bad, s1)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(s1)))
    # The previous weights on the incoming gradients; the previous head scales.
    want = np.asarray(s1.weights) @ np.asarray(bad["a"]).reshape(3, -1)
    got = np.asarray(d["a"]).ravel()
    np.testing.assert_allclose(got[1:], want[1:], rtol=1e-5)
    assert np.isnan(got[0])
    np.testing.assert_allclose(np.asarray(d["h"]), np.asarray(s1.scales) @ g["h"], rtol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="init_takes_params=True"):
        ob.Weighting(lambda t: None, lambda s, st: (None, st), ("grads",), tracked="x")
    tx = ob.balance(ema_weighting(), num_tasks=3)
    g = {"a": jnp.ones((3, 2, 2)), "h": jnp.ones((3, 3))}
    # Built from the stacked shapes (as optax.MultiSteps does): a clear error.
    stacked_state = tx.init(g)
    with pytest.raises(ValueError, match=r"leaf \['a'\]: \(3, 3, 2, 2\) in the state"):
        tx.update(g, stacked_state, None, task_losses=jnp.ones(3))


def test_stacked_zeros_like():
    z = _core.stacked_zeros_like({"a": jax.ShapeDtypeStruct((2, 3), jnp.bfloat16), "b": None}, 4)
    assert z["b"] is None and z["a"].shape == (4, 2, 3) and z["a"].dtype == jnp.float32
    assert not np.any(np.asarray(z["a"]))


class SumState(NamedTuple):
    weights: jax.Array
    acc: jax.Array
    count: jax.Array


def _sum_weighting(unscanned):
    """Fixed weights; ``acc`` accumulates 1e38 times the Gramian's diagonal, ``count`` the
    steps. The weights do not read ``acc``: it breaks the contract of ``unscanned`` on
    purpose, so the test can see whether the guard scanned it."""

    def weigh(stats, state):
        d = 1e38 * jnp.diagonal(stats.gram)
        return jnp.asarray(W, jnp.float32), SumState(state.weights, state.acc + d, state.count + 1)

    def init(t):
        return SumState(jnp.ones((t,)), jnp.zeros((t,)), jnp.zeros((), jnp.int32))

    return ob.Weighting(init, weigh, name="sum", unscanned=unscanned)


def test_unscanned_fields_are_not_scanned_by_the_guard():
    j = jnp.array([[3.0, 0.0], [0.0, 0.0], [0.0, 0.1]])  # acc overflows in row 0 only
    results = {}
    for unscanned in ((), "acc", ("acc",)):
        w = _sum_weighting(unscanned)
        assert w.unscanned in ((), ("acc",))  # a single name becomes a tuple
        tx = ob.balance(w, num_tasks=3)
        _, results[unscanned] = jax.jit(tx.update)(j, tx.init(jnp.zeros(2)))
    # Scanned: the Inf in acc rejects the step, the state is kept (count stays 0).
    assert int(results[()].count) == 0 and not np.any(np.asarray(results[()].acc))
    # Unscanned: the guard does not see it; the step is taken.
    for key in ("acc", ("acc",)):
        assert int(results[key].count) == 1
        np.testing.assert_array_equal(np.isinf(np.asarray(results[key].acc)), [1, 0, 0])
