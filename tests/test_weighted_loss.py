"""The one-backward contract of every loss-based method, and ``ob.weighted_loss``'s search.

For every loss-based method of the registry, in a jitted train step:

* the gradient of ``ob.weighted_loss`` (ONE backward pass) equals ``sum_i w_i grad L_i``
  from the stacked per-task gradients with the same state (within the float32 bound
  below);
* ``update`` returns that ordinary gradient unchanged and advances the state exactly as
  on the stacked gradients;
* the weights ``weighted_loss`` used (its gradient with respect to the losses, which is
  ``stop_gradient(w)``) equal ``ob.task_weights`` of the new state;
* the same holds in ``nnx.Optimizer``, which reproduces the plain optax run.

Then ``weighted_loss`` finds the state through ``optax.inject_hyperparams`` (around a
chain, and around the method itself), ``optax.MultiSteps``, a Linen ``TrainState``, and
on 4 devices under ``shard_map`` (a subprocess), and raises on misuse.

Gradient tolerance: both sides are float32 sums of the same per-example, per-task terms
``w_i d l_{b,i} / d theta`` in different orders (the backward pass of the weighted loss
against the weighted sum of the stacked gradients), so their difference is bounded by
``dot_bound`` of ``tests/tolerance.py`` over those B*T terms' absolute values, twice
(one such sum on each side); the per-example terms are computed here to get that bound.
"""

from __future__ import annotations

import functools
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
from tests import tolerance
from tests.methods import METHODS

T, B = 3, 16
LOSS_METHODS = [
    pytest.param(m, id=m.name)
    for m in METHODS
    if getattr(getattr(m.make(T), "weighting", None), "losses_only", False)
]
STEPS = 4  # DWA (every=1) uses its rates from the third step on

_rng = np.random.default_rng(0)
X = jnp.asarray(_rng.normal(size=(B, 4)), jnp.float32)
Y = jnp.asarray(_rng.normal(size=(B, T)) * np.array([1.0, 3.0, 0.3]), jnp.float32)
PARAMS = {
    "w": jnp.asarray(_rng.normal(size=(4, T)), jnp.float32),
    "b": jnp.zeros((T,), jnp.float32),
}


def example_losses(p, x, y):
    """(B, T) per-example, per-task squared errors."""
    return (x @ p["w"] + p["b"] - y) ** 2


def task_losses(p, x=X, y=Y):
    return jnp.mean(example_losses(p, x, y), axis=0)


def used_weights(method, losses, opt_state, **kw):
    """The weights ``weighted_loss`` uses: its gradient in the losses, ``stop_gradient(w)``."""
    return jax.grad(lambda ls: ob.weighted_loss(method, ls, opt_state, **kw))(losses)


def same_weights(got, want):
    """The same float32 ops on the same inputs, compiled at two places of one program:
    equal up to a few ulps (XLA may vectorise one copy and not the other)."""
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=0)


def _tree_equal(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)


@functools.cache
def _contract_step(name):
    m = next(p.values[0] for p in LOSS_METHODS if p.id == name)
    tx = m.make(T)
    full = optax.chain(tx, optax.sgd(0.1))

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            losses = task_losses(p)
            return ob.weighted_loss(tx, losses, opt_state), losses

        (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        used = used_weights(tx, losses, opt_state)
        passed, _ = tx.update(grads, opt_state[0], params, task_losses=losses)
        updates, new_state = full.update(grads, opt_state, params, task_losses=losses)
        # The stacked path from the same state and losses.
        stacked = ob.value_and_task_grads(task_losses)(params)[1]
        combined, stacked_state = tx.update(stacked, opt_state[0], params, task_losses=losses)
        # Per-example terms, for the rounding bound.
        per_ex = jax.jacrev(lambda p: example_losses(p, X, Y) / B)(params)  # (B, T, ...)
        out = dict(grads=grads, used=used, passed=passed, combined=combined, per_ex=per_ex)
        out.update(stacked_state=stacked_state, new_state=new_state)
        return optax.apply_updates(params, updates), new_state, out

    return tx, full, step


@pytest.mark.parametrize("m", LOSS_METHODS)
def test_one_backward_contract(m):
    tx, full, step = _contract_step(m.name)
    params, opt_state = PARAMS, full.init(PARAMS)
    for k in range(STEPS):
        params, opt_state, o = step(params, opt_state)
        w = np.asarray(ob.task_weights(opt_state), np.float64)
        # The weights weighted_loss used are the state's weights after update.
        same_weights(o["used"], np.asarray(w, np.float32))
        # update passed the ordinary gradient through, bit for bit.
        assert _tree_equal(o["passed"], o["grads"]), f"step {k}: gradient changed"
        # The stacked path advanced the state to the same values.
        for a, b in zip(jax.tree.leaves(opt_state[0]), jax.tree.leaves(o["stacked_state"])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
        # One backward pass gives sum_i w_i grad L_i.
        for key in ("w", "b"):
            got = np.asarray(o["grads"][key], np.float64)
            want = np.asarray(o["combined"][key], np.float64)
            terms = np.abs(np.asarray(o["per_ex"][key], np.float64))  # (B, T, ...)
            abs_sum = np.einsum("bt...,t->...", terms, np.abs(w))
            bound = 2 * tolerance.dot_bound(abs_sum, B * T)
            assert np.all(np.abs(got - want) <= bound + 1e-30), (m.name, k, key)
        assert np.all(np.isfinite(w))
    if m.name == "dwa":
        assert not np.allclose(w, 1.0)  # the rates were in use


# ----------------------------------------------------------------------------------------
# Flax NNX and Linen.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", LOSS_METHODS)
def test_nnx_optimizer_reproduces_the_optax_run(m):
    nnx = pytest.importorskip("flax.nnx")

    class Linear(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(PARAMS["w"])
            self.b = nnx.Param(PARAMS["b"])

        def __call__(self, x):
            return x @ self.w[...] + self.b[...]

    tx = m.make(T)
    model = Linear()
    optimizer = nnx.Optimizer(model, optax.chain(tx, optax.sgd(0.1)), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            losses = jnp.mean((model(X) - Y) ** 2, axis=0)
            return ob.weighted_loss(tx, losses, optimizer.opt_state), losses

        (_, losses), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        used = used_weights(tx, losses, optimizer.opt_state)
        optimizer.update(model, grads, task_losses=losses)
        return used

    _, full, ref_step = _contract_step(m.name)
    params, opt_state = PARAMS, full.init(PARAMS)
    for _ in range(STEPS):
        used = step(model, optimizer)
        params, opt_state, _ = ref_step(params, opt_state)
        same_weights(ob.task_weights(optimizer.opt_state), used)
    np.testing.assert_allclose(np.asarray(ob.task_weights(opt_state)), np.asarray(used), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(model.w[...]), np.asarray(params["w"]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(model.b[...]), np.asarray(params["b"]), atol=1e-6)


def test_linen_train_state():
    flax = pytest.importorskip("flax")
    from flax.training import train_state

    del flax

    class State(train_state.TrainState):
        def apply_task_gradients(self, grads, task_losses):
            updates, opt_state = self.tx.update(
                grads, self.opt_state, self.params, task_losses=task_losses
            )
            params = optax.apply_updates(self.params, updates)
            return self.replace(step=self.step + 1, params=params, opt_state=opt_state)

    famo = ob.famo(T)
    state = State.create(apply_fn=None, params=PARAMS, tx=optax.chain(famo, optax.sgd(0.1)))

    @jax.jit
    def step(state):
        def loss_fn(p):
            losses = task_losses(p)
            return ob.weighted_loss(famo, losses, state), losses  # the whole TrainState

        (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        used = used_weights(famo, losses, state.opt_state)
        return state.apply_task_gradients(grads, losses), used

    for _ in range(3):
        state, used = step(state)
        same_weights(ob.task_weights(state.opt_state), used)
    assert bool(state.opt_state[0].has_prev) and np.any(state.opt_state[0].logits != 0)


# ----------------------------------------------------------------------------------------
# optax wrappers.
# ----------------------------------------------------------------------------------------


def _train(tx, method, steps=3, **kw):
    """Plain jitted one-backward steps; returns the weights used at each step and the state."""

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            return ob.weighted_loss(method, task_losses(p), opt_state, **kw)

        grads = jax.grad(loss_fn)(params)
        used = used_weights(method, task_losses(params), opt_state, **kw)
        updates, opt_state = tx.update(grads, opt_state, params, task_losses=task_losses(params))
        return optax.apply_updates(params, updates), opt_state, used

    params, opt_state, used_all = PARAMS, tx.init(PARAMS), []
    for _ in range(steps):
        params, opt_state, used = step(params, opt_state)
        used_all.append(np.asarray(used))
    return used_all, opt_state, params


def test_inject_hyperparams_around_a_chain_holding_the_method():
    famo = ob.famo(T, lr=0.1)
    tx = optax.inject_hyperparams(
        lambda learning_rate: optax.chain(famo, optax.sgd(learning_rate))
    )(learning_rate=0.1)
    used, state, params = _train(tx, famo)
    plain_used, plain_state, plain_params = _train(optax.chain(famo, optax.sgd(0.1)), famo)
    same_weights(used[-1], ob.task_weights(state))
    np.testing.assert_allclose(np.stack(used), np.stack(plain_used), rtol=1e-6)
    np.testing.assert_allclose(params["w"], plain_params["w"], rtol=1e-6)


def test_inject_hyperparams_of_the_method_itself():
    """The injected transformation is passed as `method`: its update runs on a placeholder."""
    inj = optax.inject_hyperparams(ob.famo, static_args=("num_tasks",))(num_tasks=T, lr=0.1)
    used, state, _ = _train(optax.chain(inj, optax.sgd(0.1)), inj)
    plain = ob.famo(T, lr=0.1)
    plain_used, _, _ = _train(optax.chain(plain, optax.sgd(0.1)), plain)
    np.testing.assert_allclose(np.stack(used), np.stack(plain_used), rtol=1e-6)
    same_weights(used[-1], ob.task_weights(state))
    # Changing the injected lr changes the weights the next step uses.
    hyper = {**state[0].hyperparams, "lr": jnp.float32(0.0)}
    state = (state[0]._replace(hyperparams=hyper), state[1])
    w = used_weights(inj, task_losses(PARAMS), state)
    ref_state = (state[0].inner_state, state[1])

    def plain_weights(lr):
        f = ob.famo(T, lr=lr)
        return used_weights(f, task_losses(PARAMS), ref_state)

    np.testing.assert_allclose(w, plain_weights(0.0), rtol=1e-6)
    assert not np.allclose(w, plain_weights(0.1), rtol=1e-4)


def test_multisteps_advances_every_k_with_the_last_losses():
    uw = ob.uw(T, weight_optimizer=optax.sgd(0.5))
    ms = optax.MultiSteps(optax.chain(uw, optax.sgd(0.1)), every_k_schedule=2)
    used, state, _ = _train(ms, uw, steps=4)
    assert int(state.gradient_step) == 2  # two real updates: micro-steps 2 and 4
    # UW's weights depend on the state only, which moves at the real updates alone ...
    np.testing.assert_array_equal(used[0], used[1])
    np.testing.assert_array_equal(used[2], used[3])
    assert not np.allclose(used[1], used[2])
    # ... and the state's weights are those the last micro-step used.
    same_weights(used[-1], ob.task_weights(state))


# ----------------------------------------------------------------------------------------
# Misuse.
# ----------------------------------------------------------------------------------------


def test_errors():
    famo = ob.famo(T)
    state = optax.chain(famo, optax.sgd(0.1)).init(PARAMS)
    losses = task_losses(PARAMS)
    with pytest.raises(ValueError, match="reads gradient statistics"):
        ob.weighted_loss(ob.mgda(), losses, optax.chain(ob.mgda(), optax.sgd(0.1)).init(PARAMS))
    with pytest.raises(ValueError, match="no famo .* state in `opt_state`"):
        ob.weighted_loss(famo, losses, optax.sgd(0.1).init(PARAMS))
    with pytest.raises(ValueError, match="holds 2 famo .* states"):
        ob.weighted_loss(famo, losses, (state, state))
    with pytest.raises(ValueError, match="must be a 1-D array"):
        ob.weighted_loss(famo, losses[None], state)
    with pytest.raises(ValueError, match="holds weights for 3 tasks but `task_losses` has T=2"):
        ob.weighted_loss(famo, losses[:2], state)
    with pytest.raises(ValueError, match="`losses_after` must have shape \\(3,\\)"):
        ob.weighted_loss(famo, losses, state, losses_after=jnp.ones(2))
    with pytest.raises(ValueError, match="`method` must be a loss-based method"):
        ob.weighted_loss("famo", losses, state)
    # Its weighting works as `method` too, and a placeholder state is filled in.
    w = ob.weightings.gls()
    value = ob.weighted_loss(w, losses, ob.gls().init(PARAMS))
    np.testing.assert_allclose(value, np.exp(np.mean(np.log(np.asarray(losses)))), rtol=1e-6)


# ----------------------------------------------------------------------------------------
# Devices: weighted_loss averages the losses over the method's axis_name, as update does.
# ----------------------------------------------------------------------------------------


def _device_check() -> None:
    """Run in a subprocess with 4 CPU devices: FAMO and UW under shard_map, sync="grads"."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == 4
    mesh = jax.make_mesh((4,), ("data",))
    for make in (lambda **kw: ob.famo(T, **kw), lambda **kw: ob.uw(T, **kw)):
        tx = make(axis_name="data")
        full = optax.chain(tx, optax.sgd(0.1))

        def body(params, opt_state, x, y, tx=tx, full=full):
            params_v = jax.lax.pcast(params, "data", to="varying")

            def loss_fn(p):
                losses = task_losses(p, x, y)
                return ob.weighted_loss(tx, losses, opt_state), losses

            (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params_v)
            used = used_weights(tx, losses, opt_state)
            updates, opt_state = full.update(grads, opt_state, params, task_losses=losses)
            return optax.apply_updates(params, updates), opt_state, used[None]

        specs = dict(in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P(), P("data")))
        step = jax.jit(jax.shard_map(body, mesh=mesh, **specs))
        ref_tx = make()
        ref_full = optax.chain(ref_tx, optax.sgd(0.1))

        @jax.jit
        def ref_step(params, opt_state, ref_tx=ref_tx, ref_full=ref_full):
            def loss_fn(p):
                losses = task_losses(p)
                return ob.weighted_loss(ref_tx, losses, opt_state), losses

            (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = ref_full.update(grads, opt_state, params, task_losses=losses)
            return optax.apply_updates(params, updates), opt_state

        xs = jax.device_put(X, NamedSharding(mesh, P("data")))
        ys = jax.device_put(Y, NamedSharding(mesh, P("data")))
        params, state = PARAMS, full.init(PARAMS)
        ref_params, ref_state = PARAMS, ref_full.init(PARAMS)
        for _ in range(3):
            params, state, used = step(params, state, xs, ys)
            ref_params, ref_state = ref_step(ref_params, ref_state)
            used = np.asarray(used)
            assert np.all(used == used[0]), "devices used different weights"
            same_weights(used[0], ob.task_weights(state))
            np.testing.assert_allclose(used[0], ob.task_weights(ref_state), rtol=1e-5)
            np.testing.assert_allclose(params["w"], ref_params["w"], rtol=1e-5, atol=1e-6)
    print("devices ok")


def test_weighted_loss_under_shard_map_matches_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    root = Path(__file__).resolve().parent.parent
    code = "from tests.test_weighted_loss import _device_check as c; c()"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "devices ok" in proc.stdout, proc.stderr[-4000:]
