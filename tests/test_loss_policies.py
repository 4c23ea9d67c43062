"""What the loss-based methods do with losses they cannot take, and with ambiguous input.

The documented policies: GLS needs every loss > 0 and FAMO every loss > its bound b
(minus FAMO's 1e-8); a step that breaks that, or has a non-finite loss or
``losses_after``, keeps the whole state and its weights are the previous ones, in
``update`` and ``weighted_loss`` alike. A non-finite gradient keeps the state on the
stacked path (which combines it) and is passed through unread on the one-backward path.
UW/IMTL-L assume positive losses: a negative one drives the learned parameter without
bound, until the guard freezes it, finite. DWA gives
a task whose previous period averaged exactly 0 the rate 1; COSMOS takes the cosine's
gradient as 0 at L = 0. Without ``params``, ``update`` tells stacked from ordinary
gradients only where one reading is impossible, else it asks for ``params``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_balance as ob

P = jnp.zeros(2)
NAN, INF = float("nan"), float("inf")


def _step(tx, state, losses, grad=P, **kw):
    return jax.jit(lambda s, g, l_: tx.update(g, s, P, task_losses=l_, **kw))(
        state, grad, jnp.asarray(losses, jnp.float32)
    )


def _same(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # fmt: skip


def _used(tx, losses, state, **kw):
    losses = jnp.asarray(losses, jnp.float32)
    return np.asarray(jax.grad(lambda ls: ob.weighted_loss(tx, ls, state, **kw))(losses))


@pytest.mark.parametrize(
    "bad", [[1.0, 0.0, 4.0], [1.0, -1.0, 4.0], [1.0, NAN, 4.0], [1.0, INF, 4.0]],
    ids=["zero", "negative", "nan", "inf"],
)  # fmt: skip
def test_gls_keeps_the_previous_weights_without_positive_losses(bad):
    tx = ob.gls(num_tasks=3)
    _, state = _step(tx, tx.init(P), [1.0, 2.0, 4.0])
    w1 = np.asarray(state.weights)
    np.testing.assert_allclose(w1, 2.0 / (3.0 * np.array([1.0, 2.0, 4.0])), rtol=1e-6)
    out, new = _step(tx, state, bad)
    assert _same(new, state)
    np.testing.assert_array_equal(out, P)  # the (ordinary) gradient still passes through
    if np.all(np.isfinite(bad)):  # weighted_loss weighs with the previous weights too
        np.testing.assert_array_equal(_used(tx, bad, state), w1)
        np.testing.assert_allclose(ob.weighted_loss(tx, jnp.asarray(bad), state), w1 @ bad)


@pytest.mark.parametrize(
    "losses, after",
    [([0.4, 1.0, 1.0], None), ([0.6, 1.0, NAN], None), ([0.6, 1.0, 1.0], [0.3, 1.0, 1.0]),
     ([0.6, 1.0, 1.0], [0.7, INF, 1.0])],
    ids=["below_bound", "nan_loss", "after_below_bound", "after_inf"],
)  # fmt: skip
def test_famo_keeps_its_state_below_the_bound(losses, after):
    tx = ob.famo(3, min_losses=[0.5, 0.0, 0.0], lr=0.1)
    _, state = _step(tx, tx.init(P), [1.0, 2.0, 3.0])
    _, state = _step(tx, state, [0.8, 1.5, 3.0])  # logits moved, a baseline is stored
    assert np.any(np.asarray(state.logits) != 0)
    kw = {} if after is None else {"losses_after": jnp.asarray(after, jnp.float32)}
    _, new = _step(tx, state, losses, **kw)
    assert _same(new, state)
    if np.all(np.isfinite(losses)):
        np.testing.assert_array_equal(_used(tx, losses, state, **kw), state.weights)


def test_famo_at_its_bound_is_finite_and_weighs_that_task_most():
    tx = ob.famo(3, min_losses=[0.5, 0.0, 0.0])
    _, state = _step(tx, tx.init(P), [0.5, 1.0, 2.0])  # L_0 = b_0: log(1e-8), finite
    w = np.asarray(state.weights)
    assert np.all(np.isfinite(w)) and w[0] > 0.999 and abs(w.sum() - 1.0) < 1e-6


@pytest.mark.parametrize(
    "make",
    [lambda: ob.uw(2, weight_optimizer=optax.sgd(0.1)),
     lambda: ob.imtl_l(2, weight_optimizer=optax.sgd(0.1))],
    ids=["uw", "imtl_l"],
)  # fmt: skip
def test_learned_scales_survive_bad_losses(make):
    tx = make()
    _, state = _step(tx, tx.init(P), [1.0, 2.0])
    for bad in ([NAN, 1.0], [1.0, INF]):
        _, new = _step(tx, state, bad)
        assert _same(new, state)
    # A loss that stays negative: the parameter runs away until the weight overflows;
    # the guard then rejects every step, and the state stays finite and frozen.

    def body(s, _):
        return tx.update(P, s, P, task_losses=jnp.array([-1.0, 1.0]))[1], None

    run = jax.jit(lambda s, n: jax.lax.scan(body, s, None, length=n)[0], static_argnums=1)
    final = run(state, 300)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(final))
    assert _same(run(final, 20), final)
    assert float(final.weights[0]) > 100 * float(state.weights[0])


def test_dwa_rate_of_a_zero_average_is_one():
    tx = ob.dwa(num_tasks=3, temperature=2.0)
    state = tx.init(P)
    for losses in ([0.0, 1.0, 2.0], [1.0, 0.5, 2.0], [1.0, 1.0, 1.0]):
        _, state = _step(tx, state, losses)
    # Third update: rates [1 (0 before), 0.5, 1].
    want = 3 * np.exp(np.array([1.0, 0.5, 1.0]) / 2) / np.exp(np.array([1.0, 0.5, 1.0]) / 2).sum()
    np.testing.assert_allclose(state.weights, want, rtol=1e-6)


def test_cosmos_at_zero_losses_weighs_by_the_preference():
    tx = ob.cosmos(lambda_=3.0, weights=[0.2, 0.8])
    _, state = _step(tx, tx.init(P), [0.0, 0.0])
    np.testing.assert_allclose(state.weights, [0.2, 0.8], rtol=1e-6)


def test_nonfinite_gradients_ordinary_passed_unread_stacked_keep_the_state():
    tx = ob.famo(2)
    _, state = _step(tx, tx.init(P), [1.0, 2.0])
    # The one-backward path does not read the gradient: the state advances from the
    # (finite) losses exactly as with a finite gradient; the NaN stays visible downstream.
    out, new = _step(tx, state, [0.5, 2.0], grad=jnp.array([1.0, NAN]))
    _, clean = _step(tx, state, [0.5, 2.0])
    assert _same(new, clean) and not _same(new, state) and np.isnan(np.asarray(out)[1])
    # Stacked gradients are combined: a NaN in a shared leaf keeps the state (as every
    # method does), a NaN in a task-specific leaf does not.
    tx = ob.famo(2, shared={"trunk": True, "head": False})
    p = {"trunk": jnp.zeros(2), "head": jnp.zeros(2)}
    s0 = tx.init(p)
    losses = jnp.array([1.0, 2.0])
    _, s1 = tx.update({"trunk": jnp.ones((2, 2)), "head": jnp.full((2, 2), NAN)}, s0, p,
                      task_losses=losses)  # fmt: skip
    assert bool(s1.has_prev)
    _, s2 = tx.update({"trunk": jnp.full((2, 2), NAN), "head": jnp.ones((2, 2))}, s0, p,
                      task_losses=losses)  # fmt: skip
    assert _same(s2, s0)


def test_update_tells_stacked_from_ordinary_without_params():
    tx = ob.uw(3)
    state = tx.init({"a": jnp.zeros(3), "b": jnp.zeros(())})
    losses = jnp.array([1.0, 2.0, 3.0])
    # A scalar leaf cannot be stacked: the gradient is ordinary, passed through.
    g = {"a": jnp.ones(3), "b": jnp.ones(())}
    out, _ = tx.update(g, state, task_losses=losses)
    assert _same(out, g)
    # A leaf whose leading axis is not T cannot be stacked either.
    g = {"a": jnp.ones(5), "b": jnp.ones(2)}
    out, _ = tx.update(g, ob.uw(3).init(g), task_losses=losses)
    assert _same(out, g)
    # Every leaf starting with T: both readings fit, so update asks for params.
    g = {"a": jnp.ones((3, 4)), "b": jnp.ones(3)}
    with pytest.raises(ValueError, match="pass `params` to `update`"):
        tx.update(g, state, task_losses=losses)
    out, _ = tx.update(g, state, {"a": jnp.zeros(4), "b": jnp.zeros(())}, task_losses=losses)
    np.testing.assert_allclose(out["b"], 0.5 * 3)  # stacked: sum_i 0.5 g_i
    # The losses are required on both paths, and checked.
    with pytest.raises(ValueError, match="needs the per-task losses"):
        tx.update(g, state, {"a": jnp.zeros(4), "b": jnp.zeros(())})
    with pytest.raises(ValueError, match=r"`task_losses` must have shape \(3,\)"):
        tx.update({"a": jnp.ones(5)}, ob.uw(3).init({"a": 0}), task_losses=jnp.ones(2))
