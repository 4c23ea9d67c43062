"""Tests of ob.value_and_weighted_grad: the Gramian from VJP/JVP pairs, no stacked gradients.

The reference is the stacked path, computed independently of the VJP/JVP columns:
``ob.value_and_task_grads`` (reverse-mode Jacobian) and the same method's ``update`` on
the stacked gradients. Both are threaded through several steps, each with its own state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_balance as ob
from tests.methods import METHODS, Method

T = 3
STEPS = 3
LR = 0.05
RTOL = 1e-5
SHARED = {"trunk": True, "bias": True, "heads": False}
ELIGIBLE = {"gram", "sq_norms", "losses"}


def _eligible(tx) -> bool:
    w = tx.weighting
    return set(w.needs) <= ELIGIBLE and w.head_scales is None


def _data(dtype=np.float32):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    # Three tasks on different scales, partly conflicting.
    y = np.stack([x[:, 0] - x[:, 1], 10.0 * x[:, 1], -0.1 * x[:, 0] + x[:, 2]], axis=1)
    params = {
        "trunk": (0.5 * rng.normal(size=(4, 8))).astype(dtype),
        "bias": (0.1 * rng.normal(size=(8,))).astype(dtype),
        "heads": (0.5 * rng.normal(size=(T, 8))).astype(dtype),
    }
    return params, jnp.asarray(x, dtype), jnp.asarray(y, dtype)


def task_losses(params, x, y):
    """(T,) mean squared errors; head row i is task i's only."""
    h = jnp.tanh(x @ params["trunk"] + params["bias"])
    return jnp.mean((h @ params["heads"].T - y) ** 2, axis=0)


def _stacked(tx, params, state, x, y):
    losses, grads = ob.value_and_task_grads(task_losses)(params, x, y)
    upd, state = tx.update(grads, state, params, task_losses=losses)
    return losses, upd, state


def _close(actual, desired, what, rtol=RTOL):
    """Floats to ``rtol`` of each leaf's largest entry; integers and keys exactly, except
    solver iteration counts (a diagnostic a last-bit change of the Gramian may move)."""
    flat_a = jax.tree_util.tree_leaves_with_path(actual)
    flat_d = jax.tree.leaves(desired)
    assert len(flat_a) == len(flat_d), what
    for (path, a), d in zip(flat_a, flat_d):
        if "iter" in jax.tree_util.keystr(path):
            continue
        if jnp.issubdtype(jnp.result_type(d), jax.dtypes.prng_key):
            a, d = jax.random.key_data(a), jax.random.key_data(d)
        assert jnp.result_type(a) == jnp.result_type(d), (what, path)
        inexact = jnp.issubdtype(jnp.result_type(d), jnp.inexact)
        a, d = np.asarray(a, np.float64 if inexact else None), np.asarray(d)
        if inexact:
            d = d.astype(np.float64)
            scale = float(np.max(np.abs(d))) if d.size else 1.0
            np.testing.assert_allclose(a, d, rtol=rtol, atol=rtol * scale, err_msg=f"{what} {path}")
        else:
            np.testing.assert_array_equal(a, d, err_msg=f"{what} {path}")


def _run(tx, method_like, params, x, y, steps=STEPS, **kw):
    """Both paths side by side, one jit: per step (ours, reference) of (losses, upd, state).

    Both see the same parameters (advanced by the reference's update); each threads its
    own state, so any drift in the state shows up in later steps.
    """
    ours_fn = ob.value_and_weighted_grad(task_losses, method_like, **kw)

    @jax.jit
    def step(params, st_ours, st_ref):
        ours = ours_fn(params, st_ours, x, y)
        ref = _stacked(tx, params, st_ref, x, y)
        new_params = jax.tree.map(lambda p, u: p - LR * u, params, ref[1])
        return new_params, ours, ref

    st_ours = st_ref = tx.init(params)
    out = []
    for _ in range(steps):
        params, ours, ref = step(params, st_ours, st_ref)
        st_ours, st_ref = ours[2], ref[2]
        out.append(jax.device_get((ours, ref)))
    return out


def _assert_runs_equal(runs, name, rtol=RTOL):
    for k, (ours, ref) in enumerate(runs):
        _close(ours[0], ref[0], f"{name} losses, step {k}", rtol)
        _close(ours[1], ref[1], f"{name} update, step {k}", rtol)
        _close(ours[2], ref[2], f"{name} state, step {k}", rtol)


@pytest.mark.parametrize("method", [pytest.param(m, id=m.name) for m in METHODS])
def test_equals_stacked_path_with_task_heads(method: Method):
    tx = method.make(T, shared=SHARED)
    params, x, y = _data()
    if not _eligible(tx):
        with pytest.raises(ValueError, match="value_and_task_grads"):
            ob.value_and_weighted_grad(task_losses, tx)
        return
    _assert_runs_equal(_run(tx, tx, params, x, y), method.name)


def test_cr_mogm_and_norm_mask():
    """CR-MOGM of a Gramian weighting; GradNorm's norms over a subset of the shared leaves."""
    params, x, y = _data()
    for tx in (
        ob.cr_mogm(ob.weightings.upgrad(), alpha=0.5, shared=SHARED, num_tasks=T),
        ob.gradnorm(T, norm_mask={"trunk": False, "bias": True, "heads": False}, shared=SHARED),
    ):
        _assert_runs_equal(_run(tx, tx, params, x, y), tx.weighting.name)


def test_chunk_sizes_same_result():
    """Chunks of 2 (a remainder of 1), of T and of more than T, in one program."""
    tx = ob.imtl_g(num_tasks=T, shared=SHARED)
    params, x, y = _data()
    state = tx.init(params)
    fns = [ob.value_and_weighted_grad(task_losses, tx, chunk_size=c) for c in (2, 3, 5)]

    @jax.jit
    def run(params, state):
        return [fn(params, state, x, y) for fn in fns], _stacked(tx, params, state, x, y)

    ours, ref = run(params, state)
    for c, out in zip((2, 3, 5), ours):
        _close(out, ref, f"chunk_size={c}")


def test_weighting_and_placeholder_state():
    """A bare weighting (all leaves shared) and a method built without num_tasks."""
    params, x, y = _data()
    w = ob.weightings.imtl_g()
    _assert_runs_equal(_run(ob.balance(w, num_tasks=T), w, params, x, y, steps=2), "imtl_g")
    tx = ob.upgrad(shared=SHARED)  # init gives a placeholder state (no T yet)
    assert np.shape(tx.init(params).weights) == (0,)
    _assert_runs_equal(_run(tx, tx, params, x, y, steps=1), "upgrad")


def test_loss_only_weighting():
    """A weighting of the losses alone: no column, J^T w on shared leaves, sum on heads."""

    def init(t):
        return ob.MGDAState(weights=jnp.full((t,), 1.0 / t), iterations=jnp.zeros((), jnp.int32))

    def weigh(stats, state):
        w = jax.nn.softmax(stats.losses)
        return w, state._replace(weights=w)

    w = ob.Weighting(init, weigh, needs=("losses",), name="softmax_losses")
    tx = ob.balance(w, shared=SHARED, num_tasks=T)
    params, x, y = _data()
    _assert_runs_equal(_run(tx, tx, params, x, y, steps=2), "softmax_losses")


def test_bf16_parameters():
    """bf16 params, losses and gradients: the same method on the stacked bf16 gradients.

    Both paths run the model in bf16 (u = 2^-8) and differ in where they round: the
    stacked path rounds each task gradient to bf16 and accumulates in f32; here the JVP
    columns and the last VJP (with the weights rounded to bf16) pass through the model in
    bf16. Each output entry is a sum of a few bf16-rounded products, so they agree to a
    few bf16 roundings of the largest entry: 4u.
    """
    params, x, y = _data(jnp.bfloat16)
    for tx in (ob.upgrad(num_tasks=T, shared=SHARED), ob.gradnorm(T, shared=SHARED)):
        runs = _run(tx, tx, params, x, y, steps=2)
        for k, (ours, ref) in enumerate(runs):
            for leaf in jax.tree.leaves(ours[1]):
                assert leaf.dtype == jnp.bfloat16
            _close(ours[1], ref[1], f"{tx.weighting.name} bf16 update, step {k}", 2.0**-6)
            _close(ours[2].weights, ref[2].weights, f"{tx.weighting.name} weights", 2.0**-6)


def test_has_aux_and_kwargs():
    tx = ob.mgda(num_tasks=T, shared=SHARED)
    params, x, y = _data()

    def fn(p, x, *, y):
        losses = task_losses(p, x, y)
        return losses, {"total": jnp.sum(losses)}

    fn_ours = ob.value_and_weighted_grad(fn, tx, has_aux=True)

    @jax.jit
    def run(params, state):
        return fn_ours(params, state, x, y=y), _stacked(tx, params, state, x, y)

    ((losses, aux), upd, state), ref = run(params, tx.init(params))
    np.testing.assert_allclose(aux["total"], np.sum(ref[0]), rtol=1e-6)
    _close((losses, upd, state), ref, "has_aux")


def test_non_finite_step_keeps_state():
    """A NaN loss: previous state kept, previous weights applied (NaN gradient visible)."""
    tx = ob.upgrad(num_tasks=T, shared=SHARED)
    params, x, y = _data()
    step = jax.jit(ob.value_and_weighted_grad(task_losses, tx))
    _, _, state = step(params, tx.init(params), x, y)
    _, upd, state2 = step(params, state, x, y.at[0, 1].set(jnp.nan))
    _close(state2, state, "state after a NaN step", rtol=0.0)
    assert np.isnan(np.asarray(upd["heads"])[1]).any()
    assert np.all(np.isfinite(np.asarray(upd["heads"])[[0, 2]]))
    _, upd3, state3 = step(params, state2, x, y)  # and the next finite step is as before
    _close(state3, step(params, state, x, y)[2], "state after recovery", rtol=0.0)


def test_custom_vjp_without_jvp_rule_names_the_stacked_path():
    @jax.custom_vjp
    def act(z):
        return jnp.tanh(z)

    act.defvjp(lambda z: (jnp.tanh(z), z), lambda z, c: (c * (1.0 - jnp.tanh(z) ** 2),))

    def fn(p, x, y):
        return jnp.mean((act(x @ p["trunk"] + p["bias"]) @ p["heads"].T - y) ** 2, axis=0)

    params, x, y = _data()
    tx = ob.upgrad(num_tasks=T, shared=SHARED)
    step = ob.value_and_weighted_grad(fn, tx)
    with pytest.raises(ValueError, match=r"forward mode.*value_and_task_grads"):
        step(params, tx.init(params), x, y)
    # A method reading only the norms needs VJPs alone, so it still works.
    bal = ob.balancer([1.0] * T, shared=SHARED)
    fn_ours = ob.value_and_weighted_grad(fn, bal)

    @jax.jit
    def run(params, state):
        grads = ob.value_and_task_grads(fn)(params, x, y)[1]
        return fn_ours(params, state, x, y)[1], bal.update(grads, state, params)[0]

    upd, ref = run(params, bal.init(params))
    _close(upd, ref, "balancer through a custom_vjp")


def test_errors():
    params, x, y = _data()
    with pytest.raises(ValueError, match="must be a method of this library"):
        ob.value_and_weighted_grad(task_losses, optax.adam(1e-3))
    with pytest.raises(ValueError, match="`chunk_size`"):
        ob.value_and_weighted_grad(task_losses, ob.mgda(), chunk_size=0)
    with pytest.raises(ValueError, match="per_batch_item|item_sq_norms"):
        ob.value_and_weighted_grad(task_losses, ob.balancer([1.0] * T, per_batch_item=True))
    tx = ob.mgda(num_tasks=2)
    with pytest.raises(ValueError, match="num_tasks=2"):
        ob.value_and_weighted_grad(task_losses, tx)(params, tx.init(params), x, y)
    tx = ob.mgda()
    scalar = ob.value_and_weighted_grad(lambda p, x, y: jnp.sum(task_losses(p, x, y)), tx)
    with pytest.raises(ValueError, match=r"1-D array of per-task losses"):
        scalar(params, tx.init(params), x, y)
    with pytest.raises(ValueError, match=r"\['step'\].*int32"):
        ob.value_and_weighted_grad(lambda p, x, y: task_losses(p["p"], x, y), tx)(
            {"p": params, "step": jnp.zeros((), jnp.int32)}, tx.init(params), x, y
        )
    with pytest.raises(ValueError, match="`shared` mask"):
        bad = ob.mgda(shared={"trunk": True})
        ob.value_and_weighted_grad(task_losses, bad)(params, bad.init(params), x, y)


def test_no_retrace_on_second_step():
    tx = ob.gradnorm(T, shared=SHARED)
    params, x, y = _data()
    traces = []
    fn = ob.value_and_weighted_grad(task_losses, tx)

    @jax.jit
    def step(params, state):
        traces.append(1)
        return fn(params, state, x, y)

    state = tx.init(params)
    for _ in range(3):
        _, _, state = step(params, state)
    assert len(traces) == 1


@functools.cache
def _nnx():
    return pytest.importorskip("flax.nnx")


def test_flax_nnx_state():
    nnx = _nnx()

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.trunk = nnx.Linear(4, 8, rngs=rngs)
            self.heads = nnx.Linear(8, T, rngs=rngs)

        def __call__(self, x):
            return self.heads(jnp.tanh(self.trunk(x)))

    model = Model(nnx.Rngs(0))
    _, x, y = _data()
    shared = lambda params: nnx.map_state(lambda path, _: path[0] != "heads", params)  # noqa: E731
    tx = ob.upgrad(num_tasks=T, shared=shared)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def losses_of(params, x, y):
        return jnp.mean((nnx.merge(graphdef, params, rest)(x) - y) ** 2, axis=0)

    fn = ob.value_and_weighted_grad(losses_of, tx)

    @jax.jit
    def run(params, state):
        ref_losses, grads = ob.value_and_task_grads(losses_of)(params, x, y)
        ref, ref_state = tx.update(grads, state, params, task_losses=ref_losses)
        return fn(params, state, x, y), (ref_losses, ref, ref_state)

    ours, ref = run(params, tx.init(params))
    assert jax.tree.structure(ours[1]) == jax.tree.structure(params)
    _close(ours, ref, "nnx")
