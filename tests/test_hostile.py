"""Hostile inputs and bad usage, for every method in the registry.

Hostile inputs (T=3 unless said): all-zero gradients, one task zero, duplicate and
opposite rows, all rows equal, rank one, one task 1e10 larger or smaller than the others,
the whole input scaled by {0, 1e-10, 1e3, 1e5, 1e10}, a zero loss, T=1, and NaN/Inf in
one task's gradient or loss. Each runs from a fresh state and from the state after one
ordinary step (so "the state keeps its previous values" is not the initial state by
accident).

The documented non-finite policy (``optax_balance/_core``): a step whose statistics,
losses or weights are not finite keeps the previous state and combines the gradients
with the previous weights (``state.weights``). So a NaN/Inf gradient gives a non-finite
output where it sits (what ``optax.apply_if_finite`` after the method looks for) and the
ordinary combination elsewhere; a NaN/Inf loss alone gives a finite output, and leaves
the state as it was if the method uses the losses (if it does not, the loss is ignored).

Bad usage must raise ``ValueError`` at trace time with a message that says what to do;
the tests check the text (traced with ``jax.eval_shape``: nothing is compiled).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import inputs as I
from tests.methods import METHODS

ALL = [pytest.param(m, id=m.name) for m in METHODS]
T = I.HOSTILE_T
J0 = I.FINITE_CASES["generic"][0]


def _check_output_shape(out, dtype=jnp.float32):
    assert jax.tree.structure(out) == jax.tree.structure(I.params())
    for leaf, ref in zip(jax.tree.leaves(out), jax.tree.leaves(I.params())):
        assert leaf.shape == ref.shape and leaf.dtype == dtype


def _same_avals_ignoring_weak(a, b):
    sa = jax.tree.map(lambda x: (np.shape(x), jnp.result_type(x)), a)
    sb = jax.tree.map(lambda x: (np.shape(x), jnp.result_type(x)), b)
    return sa == sb


# ----------------------------------------------------------------------------------------
# Finite hostile inputs: finite output of the right shape, unpoisoned state.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "after_step"])
@pytest.mark.parametrize("case", list(I.FINITE_CASES))
@pytest.mark.parametrize("m", ALL)
def test_finite_output_and_state(m, case, fresh):
    out, new_state, state_in = I.hostile_results(m.name, fresh)[case]
    j, _ = I.FINITE_CASES[case]
    _check_output_shape(out)
    assert I.all_finite(out), f"{m.name}: non-finite output on {case}"
    assert I.all_finite(new_state), f"{m.name}: state poisoned by {case}"
    assert _same_avals_ignoring_weak(new_state, state_in)
    assert new_state.weights.shape == (T,)
    d = I.flat(out)
    if not np.any(j) and (fresh or not m.tracks_gradients):  # tracked estimates persist
        np.testing.assert_array_equal(d, 0.0)
    if m.non_conflicting:
        # g_i . d >= -tol for every task (tolerance: f32 inner products of these rows).
        tol = I.conflict_tolerance(j, new_state.weights, m)
        assert np.all(j.astype(np.float64) @ d >= -tol), (case, j.astype(np.float64) @ d, tol)


@pytest.mark.parametrize("m", ALL)
def test_single_task(m):
    """T=1: the output is a non-negative multiple of the only gradient, leaf by leaf."""
    if m.min_tasks > 1:
        pytest.skip(f"{m.name} needs T >= {m.min_tasks} (tested in its own file)")
    st = I.stepper(m.name, 1)
    g0 = I.rand_j(7, 1)
    js = np.stack([g0, 0 * g0, 1e-10 * g0, 1e10 * g0, -g0]).astype(np.float32)
    ls = np.ones((len(js), 1), np.float32)
    outs, states = st.batch(I.tree(js), st.init(), ls)
    assert I.all_finite(outs) and I.all_finite(states)
    for k in range(len(js)):
        out = jax.tree.map(lambda x, k=k: np.asarray(x[k], np.float64), outs)
        g = I.tree(js[k])
        for o, gl in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
            gl = np.asarray(gl[0], np.float64)
            c = np.vdot(o, gl) / max(np.vdot(gl, gl), 1e-300)
            assert c >= 0.0
            np.testing.assert_allclose(o, c * gl, rtol=1e-5, atol=1e-6 * np.abs(gl).max(initial=0))


# ----------------------------------------------------------------------------------------
# Non-finite gradients and losses: the documented policy.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "after_step"])
@pytest.mark.parametrize("case", ["nan_grad", "inf_grad"])
@pytest.mark.parametrize("m", ALL)
def test_nonfinite_gradient_keeps_state(m, case, fresh):
    out, new_state, state_in = I.hostile_results(m.name, fresh)[case]
    j, _ = I.NONFINITE_CASES[case]
    assert I.trees_equal(new_state, state_in), "the state must keep its previous values"
    # The NaN/Inf sits in leaf ['dense']['w']: that leaf's output is not finite (so that
    # optax.apply_if_finite after the method sees it) ...
    assert not np.all(np.isfinite(np.asarray(out["dense"]["w"])))
    # ... and the clean leaf is combined with the previous weights.
    want = I.combination(state_in.weights, j[:, :2])  # the bias columns (0 * inf is NaN)
    np.testing.assert_allclose(np.asarray(out["bias"], np.float64), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "after_step"])
@pytest.mark.parametrize("case", ["nan_loss", "inf_loss"])
@pytest.mark.parametrize("m", ALL)
def test_nonfinite_loss(m, case, fresh):
    res = I.hostile_results(m.name, fresh)
    out, new_state, state_in = res[case]
    j, _ = I.NONFINITE_CASES[case]
    assert I.all_finite(out), "a non-finite loss alone must give a finite output"
    if m.losses_used:
        assert I.trees_equal(new_state, state_in), "the state must keep its previous values"
        want = I.combination(state_in.weights, j)
        np.testing.assert_allclose(I.flat(out), want, rtol=1e-5, atol=1e-7)
    else:  # the losses are ignored: the step is the ordinary one (two rows of one vmap)
        clean_out, clean_state, _ = res["generic"]
        assert I.trees_close(new_state, clean_state)
        assert I.trees_close(out, clean_out)


# ----------------------------------------------------------------------------------------
# Bad usage: ValueError at trace time, with a message that says what to do.
# ----------------------------------------------------------------------------------------


def _trace(tx, g, losses="default", **kw):
    if isinstance(losses, str):
        losses = jnp.asarray(I.losses_for(T))
    extra = {} if losses is None else {"task_losses": losses}
    if "task_grads2" not in kw and "cross_gram" in tx.weighting.needs:
        kw["task_grads2"] = g  # a two-batch method: the same gradients (Method.batch_kwargs)
    state = tx.init(I.params())
    return jax.eval_shape(lambda g, s: tx.update(g, s, I.params(), **extra, **kw), g, state)


@pytest.mark.parametrize("m", ALL)
def test_wrong_task_count_names_leaf(m):
    tx = m.make(T)
    g = I.tree(I.rand_j(0, T + 1))
    with pytest.raises(ValueError) as e:
        _trace(tx, g, losses=jnp.ones(T + 1))
    msg = str(e.value)
    assert str(T + 1) in msg and str(T) in msg, msg
    assert any(p in msg for p in I.LEAF_PATHS) or "re-run `init`" in msg, msg


@pytest.mark.parametrize("m", ALL)
def test_leaves_disagree_on_task_count(m):
    tx = m.make(T)
    g = I.tree(I.rand_j(0, T))
    g["dense"]["w"] = jnp.zeros((T + 1, 3, 2))
    with pytest.raises(ValueError, match=r"\['dense'\]\['w'\]") as e:
        _trace(tx, g)
    assert f"{T + 1}" in str(e.value)


@pytest.mark.parametrize("m", ALL)
def test_scalar_leaf(m):
    tx = m.make(T)
    g = I.tree(I.rand_j(0, T))
    g["bias"] = jnp.zeros(())
    with pytest.raises(ValueError, match=r"\['bias'\].*leading task axis"):
        _trace(tx, g)


@pytest.mark.parametrize("m", ALL)
def test_task_losses_wrong_shape(m):
    tx = m.make(T)
    g = I.tree(I.rand_j(0, T))
    if m.losses_used:
        with pytest.raises(ValueError, match=rf"`task_losses` must have shape \({T},\)"):
            _trace(tx, g, losses=jnp.ones((T, 1)))
    else:  # a method that does not use the losses ignores them (DESIGN.md)
        _trace(tx, g, losses=jnp.ones((T, 1)))


@pytest.mark.parametrize("m", ALL)
def test_missing_task_losses(m):
    tx = m.make(T)
    g = I.tree(I.rand_j(0, T))
    if m.needs_losses:
        with pytest.raises(ValueError, match="needs the per-task losses.*task_losses="):
            _trace(tx, g, losses=None)
    else:
        _trace(tx, g, losses=None)


TWO_BATCHES = [pytest.param(m, id=m.name) for m in METHODS if m.two_batches]


@pytest.mark.parametrize("m", TWO_BATCHES)
def test_missing_second_batch(m):
    tx = m.make(T)
    g = I.tree(I.rand_j(0, T))
    with pytest.raises(ValueError, match=r"second, independent mini-batch.*task_grads2=grads2"):
        jax.eval_shape(lambda g, s: tx.update(g, s, I.params()), g, tx.init(I.params()))


@pytest.mark.parametrize("m", TWO_BATCHES)
def test_second_batch_must_match_the_first(m):
    tx = m.make(T)
    g = I.tree(I.rand_j(0, T))
    other_t = I.tree(I.rand_j(1, T + 1))
    with pytest.raises(ValueError, match=r"`task_grads2` leaf \['bias'\] has shape \(4, 2\)"):
        _trace(tx, g, task_grads2=other_t)
    with pytest.raises(ValueError, match="`task_grads2` must have the structure"):
        _trace(tx, g, task_grads2={"bias": g["bias"]})


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "after_step"])
@pytest.mark.parametrize("m", TWO_BATCHES)
def test_nonfinite_second_batch_keeps_state(m, fresh):
    """A NaN in the second batch only: state kept, the output NaN where it sits (the
    mean of both batches) and the clean leaf combined with the previous weights."""
    st = I.stepper(m.name, T)
    state = st.init()
    if not fresh:
        state = st.step(I.tree(J0), state, I.losses_for(T))[1]
    j2 = I.rand_j(5, T)
    bad = j2.copy()
    bad[1, 5] = np.nan
    tx = st.tx
    out, new_state = jax.jit(lambda g, g2, s: tx.update(g, s, I.params(), task_grads2=g2))(
        I.tree(J0), I.tree(bad), state
    )
    assert I.trees_equal(new_state, state)
    assert not np.all(np.isfinite(np.asarray(out["dense"]["w"])))
    want = I.combination(state.weights, 0.5 * (J0 + j2))[:2]
    np.testing.assert_allclose(np.asarray(out["bias"], np.float64), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "shared, fragment",
    [
        ({"trunk": True}, "`shared` mask does not match the parameters' structure"),
        ({"bias": True, "dense": {"w": True, "b": False}}, "`shared` mask does not match"),
        (lambda p: {"bias": False}, "`shared` mask does not match"),
        ({"bias": jnp.array(True), "dense": True}, r"`shared` mask leaf \['bias'\] must be a"),
    ],
    ids=["wrong_keys", "extra_leaf", "callable_wrong", "array_leaf"],
)
@pytest.mark.parametrize("m", ALL)
def test_shared_mask_mismatch(m, shared, fragment):
    tx = m.make(T, shared=shared)
    with pytest.raises(ValueError, match=fragment):
        _trace(tx, I.tree(I.rand_j(0, T)))


def _invalid_cases():
    out = []
    for m in METHODS:
        out.append(pytest.param(m, {"sync": "bogus"}, "`sync` must be one of", id=f"{m}-sync"))
        for k, (kw, frag) in enumerate(m.invalid):
            out.append(pytest.param(m, kw, frag, id=f"{m}-{k}-{'-'.join(kw)}"))
    return out


@pytest.mark.parametrize("m, kwargs, fragment", _invalid_cases())
def test_invalid_hyperparameters(m, kwargs, fragment):
    with pytest.raises(ValueError) as e:
        I.build(m, T, **kwargs)
    assert fragment in str(e.value), str(e.value)


@pytest.mark.parametrize("m", ALL)
def test_task_specific_leaf_summed_and_nan_there(m):
    """``shared`` marks ``bias`` task-specific: it is summed (weighted by the registry's
    ``head_scales`` where the heads train on rescaled losses) and takes no part in the
    weights.

    A NaN there is outside the statistics, so the step is an ordinary one for the method
    (its weights do not depend on that leaf: the state is the clean step's) and the
    summed leaf is NaN, which ``optax.apply_if_finite`` after the method sees.
    """
    tx = m.make(T, shared={"bias": False, "dense": True})
    p = I.params()  # tells the loss-based methods these are stacked gradients
    step = jax.jit(
        jax.vmap(
            lambda g, s, losses: tx.update(g, s, p, task_losses=losses, **m.batch_kwargs(g)),
            (0, None, 0),
        )
    )
    nan_in_bias = J0.copy()
    nan_in_bias[1, 0] = np.nan
    js = np.stack([J0, nan_in_bias])
    ls = np.stack([I.losses_for(T)] * 2)
    outs, states = step(I.tree(js), tx.init(I.params()), ls)
    clean = jax.tree.map(lambda x: x[0], outs)
    heads = m.head_weights(I.losses_for(T))  # ones (the sum) unless the heads are rescaled
    np.testing.assert_allclose(np.asarray(clean["bias"]), heads @ J0[:, :2], rtol=1e-6)
    # The weights are those of the shared leaf alone: the full-tree method on J with the
    # bias columns zeroed gives the same state.
    zeroed = J0.copy()
    zeroed[:, :2] = 0.0
    st = I.stepper(m.name, T)
    _, want_state = st.step(I.tree(zeroed), st.init(), I.losses_for(T))
    got_state = jax.tree.map(lambda x: x[0], states)
    if jax.tree.structure(got_state) != jax.tree.structure(want_state):
        # Per-leaf state (MetaBalance's EMA norms) exists only on the shared leaves.
        got_state, want_state = got_state.weights, want_state.weights
    for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
        if jnp.issubdtype(jnp.result_type(a), jnp.inexact):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    nan_out = jax.tree.map(lambda x: x[1], outs)
    assert not np.all(np.isfinite(np.asarray(nan_out["bias"])))
    np.testing.assert_array_equal(
        np.asarray(nan_out["dense"]["w"]), np.asarray(clean["dense"]["w"])
    )
    assert I.trees_equal(jax.tree.map(lambda x: x[1], states), jax.tree.map(lambda x: x[0], states))
