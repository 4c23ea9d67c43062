"""The optax contract, for every method in the registry.

The habits of optax's own shared optimizer tests (``optax/contrib/_common_test.py``):
unknown keyword arguments are ignored; the second call of a jitted ``update`` does not
trace or compile again; the method trains inside ``optax.chain`` with adam under
``lax.scan`` (or with the optimizer its registry entry names); ``optax.inject_hyperparams``
gives the same result as the plain factory;
``optax.MultiSteps`` accumulates; the state keeps its structure, dtypes and weak types
through ``lax.cond``; ``init`` takes ``jax.ShapeDtypeStruct`` params. And dtypes: bf16,
f16 and f32 gradients give output in the input dtype with statistics in f32; under
``JAX_ENABLE_X64`` everything is f64 (checked in a subprocess, where x64 is on from the
start as it would be for a user).

How a balancing method composes with optax's wrappers, which these tests pin down:

* ``optax.apply_if_finite`` goes *after* the method, around the optimizer:
  ``optax.chain(method, optax.apply_if_finite(optax.adam(lr), k))``. A NaN/Inf gradient
  then gives a non-finite combined gradient (the core's policy), which ``apply_if_finite``
  rejects, while the method's own state is kept by the core. Wrapping the method itself
  cannot work: ``apply_if_finite``'s reject branch returns zeros shaped like its *input*
  (the stacked gradients) while the method returns the unstacked combination, and
  ``lax.cond`` refuses branches of different shapes.
* ``optax.MultiSteps(method, k)`` accumulates the *stacked* gradients and balances their
  mean once every k steps; it must be initialised with a stacked-shaped tree, since
  ``MultiSteps.init`` builds its accumulator from the tree it is given.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_balance as ob
from tests import inputs as I
from tests.methods import METHODS

ALL = [pytest.param(m, id=m.name) for m in METHODS]
T = I.HOSTILE_T
J0, L0 = I.FINITE_CASES["generic"]
J1 = I.rand_j(99, T)


def _update_fn(tx, m, **extra):
    def step(g, s, losses):
        return tx.update(g, s, I.params(), task_losses=losses, **m.batch_kwargs(g), **extra)

    return step


# ----------------------------------------------------------------------------------------
# Tracing and compilation.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", ALL)
def test_jit_contract(m):
    """Unknown keywords ignored; traced and compiled once; state stable through lax.cond."""
    tx = m.make(T)
    traces = []
    inner = _update_fn(tx, m, value=jnp.float32(3.0), unknown_extra=1, other=None)

    @jax.jit
    def maybe_step(pred, g, s, losses):
        traces.append(None)  # runs once per trace
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), g)
        return jax.lax.cond(pred, lambda s: inner(g, s, losses), lambda s: (zeros, s), s)

    s0 = tx.init(I.params())
    out1, s1 = maybe_step(True, I.tree(J0), s0, L0)
    out2, s2 = maybe_step(True, I.tree(J1), s1, 2.0 * L0)
    out3, s3 = maybe_step(False, I.tree(J0), s2, L0)
    assert len(traces) == 1 and maybe_step._cache_size() == 1, "traced/compiled again"
    # The state keeps shapes, dtypes and weak types (else the second call would retrace).
    assert I.avals(s1) == I.avals(s0) and I.avals(s2) == I.avals(s0)
    assert I.trees_equal(s3, s2) and not np.any(I.flat(out3))
    # Unknown keywords change nothing: the same as the plain update.
    st = I.stepper(m.name, T)
    ref_out, ref_state = st.step(I.tree(J0), s0, L0)
    assert I.trees_equal(out1, ref_out) and I.trees_equal(s1, ref_state)


@pytest.mark.parametrize("m", ALL)
def test_init_accepts_shape_dtype_struct(m):
    tx = m.make(T)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), I.params())
    assert I.trees_equal(tx.init(abstract), tx.init(I.params()))
    assert I.avals(tx.init(abstract)) == I.avals(tx.init(I.params()))


# ----------------------------------------------------------------------------------------
# Training: optax.chain with adam, under lax.scan, with apply_if_finite after the method.
# ----------------------------------------------------------------------------------------

# T quadratic tasks sharing the minimiser X_STAR with different curvatures D: no conflict,
# so every method must drive every loss down.
_X_STAR = jnp.asarray(3.0 * I.rand_j(5, 1)[0])
_D = jnp.asarray(np.random.default_rng(6).uniform(0.5, 2.0, size=(T, I.N)), jnp.float32)
_BAD_STEPS = (30, 31)


def _quadratic_losses(p):
    x = jnp.concatenate([leaf.reshape(-1) for leaf in jax.tree.leaves(p)])
    return 0.5 * jnp.sum(_D * (x - _X_STAR) ** 2, axis=1)


@pytest.mark.parametrize("m", ALL)
def test_chain_adam_under_scan_with_apply_if_finite(m):
    opt = optax.adam(0.1) if m.train_optimizer is None else m.train_optimizer()
    tx = optax.chain(m.make(T), optax.apply_if_finite(opt, max_consecutive_errors=5))
    grad_fn = ob.value_and_task_grads(_quadratic_losses)

    def body(carry, i):
        p, s = carry
        losses, g = grad_fn(p)
        bad = (i == _BAD_STEPS[0]) | (i == _BAD_STEPS[1])
        # Steps 30 and 31: task 1's gradient is NaN.
        g = jax.tree.map(lambda x: x.at[1].multiply(jnp.where(bad, jnp.nan, 1.0)), g)
        u, s = tx.update(g, s, p, task_losses=losses, **m.batch_kwargs(g))
        return (optax.apply_updates(p, u), s), (losses, ob.task_weights(s))

    @jax.jit
    def run(p):
        return jax.lax.scan(body, (p, tx.init(p)), jnp.arange(100))

    (p, s), (losses, weights) = run(I.params())
    losses, weights = np.asarray(losses), np.asarray(weights)
    assert I.all_finite(p) and np.all(np.isfinite(weights))
    total = losses.sum(axis=1)
    assert total[-1] < 1e-2 * total[0], f"{m.name} did not train: {total[0]} -> {total[-1]}"
    # The NaN steps were rejected by apply_if_finite (params unchanged) ...
    assert int(s[1].total_notfinite) == 2
    np.testing.assert_array_equal(losses[30], losses[31])
    np.testing.assert_array_equal(losses[31], losses[32])
    # ... and left the method's state as it was.
    np.testing.assert_array_equal(weights[30], weights[29])
    np.testing.assert_array_equal(weights[31], weights[29])


# ----------------------------------------------------------------------------------------
# optax.inject_hyperparams and optax.MultiSteps.
# ----------------------------------------------------------------------------------------


def _float_hyperparameters(factory, static):
    sig = inspect.signature(factory)
    return {
        k: p.default
        for k, p in sig.parameters.items()
        if k not in static and isinstance(p.default, float)
    }


@pytest.mark.parametrize("m", ALL)
def test_inject_hyperparams(m):
    if m.factory is None or m.static is None:
        pytest.skip(f"{m.name}: the registry gives no `factory`/`static`")
    static = m.static(T)
    floats = _float_hyperparameters(m.factory, static)
    inj = optax.inject_hyperparams(m.factory, static_args=tuple(static))(**static)
    s_inj = inj.init(I.params())
    assert set(floats) <= set(s_inj.hyperparams), "float hyperparameters must be injectable"
    # Change every float hyperparameter through the state: the result must equal the
    # plain factory built with the new values (halved: inside every documented range).
    new = {k: 0.5 * v for k, v in floats.items()}
    s_inj = s_inj._replace(
        hyperparams={**s_inj.hyperparams, **{k: jnp.float32(v) for k, v in new.items()}}
    )
    plain = m.factory(**static, **new)

    @jax.jit
    def both(g, s_inj, s_plain, losses):
        o1, s_inj = _update_fn(inj, m)(g, s_inj, losses)
        o2, s_plain = _update_fn(plain, m)(g, s_plain, losses)
        return (o1, o2), s_inj, s_plain

    s_plain = plain.init(I.params())
    for j, losses in ((J0, L0), (J1, 2.0 * L0)):
        (o1, o2), s_inj, s_plain = both(I.tree(j), s_inj, s_plain, losses)
        np.testing.assert_allclose(I.flat(o1), I.flat(o2), rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(s_inj.inner_state), jax.tree.leaves(s_plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("m", ALL)
def test_inject_hyperparams_needs_static_num_tasks(m):
    if m.factory is None or m.static is None or "num_tasks" not in m.static(T):
        pytest.skip(f"{m.name}: no `num_tasks` argument in the registry's `static`")
    inj = optax.inject_hyperparams(m.factory)(**m.static(T))
    with pytest.raises(ValueError, match="list it in `static_args`"):
        inj.init(I.params())


@pytest.mark.parametrize("m", ALL)
def test_multisteps_balances_the_mean_gradient(m):
    k = 3
    ms = optax.MultiSteps(m.make(T), every_k_schedule=k)
    stacked_like = I.tree(np.zeros((T, I.N), np.float32))
    if m.tracks_gradients:
        # Gradient-sized state built from the stacked shapes MultiSteps passes to init:
        # a clear error, which names the alternative (accumulate after the method).
        with pytest.raises(ValueError, match=r"optax.chain\(.*optax.MultiSteps\(optimizer"):
            ms.update(I.tree(J0), ms.init(stacked_like), None, task_losses=L0)
        return
    if not m.stacked_init:  # state shaped like the stacked gradients, from init's params
        with pytest.raises(ValueError, match="MultiSteps"):
            jax.eval_shape(
                lambda g, s: ms.update(g, s, None, task_losses=L0),
                stacked_like,
                ms.init(stacked_like),
            )
        return
    js = [J0, J1, I.rand_j(3, T)]
    ls = [L0, 2.0 * L0, 0.5 * L0]

    # params tell stacked from ordinary gradients for the loss-based methods, whose update
    # takes both (here every leaf's leading axis is T, so without params both readings fit).
    update = jax.jit(
        lambda g, s, losses: ms.update(g, s, I.params(), task_losses=losses, **m.batch_kwargs(g))
    )
    s, outs = ms.init(stacked_like), []
    for j, losses in zip(js, ls):
        o, s = update(I.tree(j), s, losses)
        outs.append(o)
    for o in outs[:-1]:
        np.testing.assert_array_equal(I.flat(o), 0.0)
    st = I.stepper(m.name, T)
    mean_j = (np.mean(np.stack(js), axis=0)).astype(np.float32)
    # MultiSteps hands the inner update the mean gradient and the last step's keyword
    # arguments as they are: the losses, and a two-batch method's second batch.
    if m.two_batches:
        tx = m.make(T)
        want, want_state = tx.update(
            I.tree(mean_j),
            tx.init(I.params()),
            None,
            task_losses=ls[-1],
            task_grads2=I.tree(js[-1]),
        )
    else:
        want, want_state = st.step(I.tree(mean_j), st.init(), ls[-1])
    np.testing.assert_allclose(I.flat(outs[-1]), I.flat(want), rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s.inner_opt_state), jax.tree.leaves(want_state)):
        if jnp.issubdtype(a.dtype, jnp.inexact):  # not solver iteration counts: the mean
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Dtypes.
# ----------------------------------------------------------------------------------------

_DTYPES = {
    "bf16": ([jnp.bfloat16] * 2, "bf16_values"),
    "f16": ([jnp.float16] * 2, "f16_values"),
    "f32": ([jnp.float32] * 2, "generic"),
    "mixed": ([jnp.float32, jnp.bfloat16], "mixed_values"),
}


@pytest.mark.parametrize("dt", list(_DTYPES))
@pytest.mark.parametrize("m", ALL)
def test_dtype_in_dtype_out_statistics_in_f32(m, dt):
    dtypes, ref_case = _DTYPES[dt]
    st = I.stepper(m.name, T)
    j = I.FINITE_CASES[ref_case][0]
    g = I.tree(j, dtypes)
    low = jax.tree.leaves(g)[-1].dtype
    s0 = st.init(low)
    out, s1 = st.step(g, s0, L0)
    for leaf, want in zip(jax.tree.leaves(out), dtypes):
        assert leaf.dtype == want
    for x in jax.tree.leaves(s1):
        if jnp.issubdtype(x.dtype, jnp.floating):
            assert x.dtype == jnp.float32, "state (statistics) must be float32"
    assert I.avals(s1) == I.avals(s0)
    # The same values given in f32 (exact: they are representable) give the same weights
    # up to f32 rounding, which holds only if the statistics are computed in f32.
    ref_out, ref_state, _ = I.hostile_results(m.name, True)[ref_case]
    np.testing.assert_allclose(
        np.asarray(s1.weights), np.asarray(ref_state.weights), rtol=1e-4, atol=1e-6
    )
    for leaf, want in zip(jax.tree.leaves(out), jax.tree.leaves(ref_out)):
        want = np.asarray(want.astype(leaf.dtype), np.float64)
        scale = np.abs(want).max(initial=1e-30)
        np.testing.assert_allclose(np.asarray(leaf, np.float64), want, atol=1e-2 * scale)


# x64: one subprocess (JAX_ENABLE_X64=1 from the start) runs every method; each test
# below reads its method's report. One xdist group: the subprocess runs once per suite,
# not once per worker.


@pytest.fixture(scope="session")  # module scope re-ran it when xdist interleaved modules
def x64_report():
    env = {**os.environ, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"}
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "tests.x64_check"],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.xdist_group("x64")
@pytest.mark.parametrize("m", ALL)
def test_x64_end_to_end(m, x64_report):
    rep = x64_report[m.name]
    assert rep["error"] is None, rep["error"]
    assert set(rep["out_dtypes"]) == {"float64"}
    assert set(rep["state_float_dtypes"]) == {"float64"}
    assert rep["stable_avals"], "the x64 state changed avals from one step to the next"
    assert rep["finite"], "x64: non-finite output or state on a hostile input"
    # The f64 result agrees with the f32 one on the same input.
    ref_out, ref_state, _ = I.hostile_results(m.name, True)["generic"]
    np.testing.assert_allclose(rep["weights"], np.asarray(ref_state.weights), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(rep["out"], I.flat(ref_out), rtol=1e-4, atol=1e-6)
