"""Checkpoints: an orbax round trip of the optimizer state resumes training bit for bit.

For every method in the registry, built with its task count (so ``init`` gives the state
its full shape): train two steps, save ``{params, opt_state}`` with orbax, train two more
(the uninterrupted run); restore into the shapes of a fresh ``init`` and train the same
two steps again. The resumed run must equal the uninterrupted one exactly, with ONE
compile of the jitted step for the three segments (the restored state has the avals the
step was compiled for). The same with ``nnx.Optimizer`` (``nnx.state`` of the model and
the optimizer) for methods covering every kind of state: a solver's, an inner optimizer's
(GradNorm), a PRNG key (PCGrad), per-leaf EMAs (MetaBalance), EMA norms (the balancer).

Also the failure the README warns about: a state built without ``num_tasks`` is a ``(0,)``
placeholder, and a trained state's checkpoint does not restore into it.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_balance as ob
from tests import inputs as I
from tests.methods import METHODS

ocp = pytest.importorskip("orbax.checkpoint", reason="orbax-checkpoint comes with the dev extra")

T = 3
STEPS = 2  # before the checkpoint, and again after it

# One small multi-task regression on the suite's parameter tree (a (3, 2) weight and a
# (2,) bias): task t fits its own targets, so the losses are positive and the gradients
# depend on the parameters.
_X = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
_Y = np.random.default_rng(1).normal(size=(T, 16, 2)).astype(np.float32)


def _task_losses(params):
    pred = _X @ params["dense"]["w"] + params["bias"]  # (16, 2)
    return jnp.mean((pred[None] - _Y) ** 2, axis=(1, 2))  # (T,)


def _params():
    return jax.tree.map(lambda p: p + 0.1, I.params())


def _target(tree):
    """The restore target: shapes, dtypes and shardings of ``tree``."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _save(path: pathlib.Path, tree) -> None:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, tree)
    ckptr.wait_until_finished()


def _restore(path: pathlib.Path, target):
    return ocp.StandardCheckpointer().restore(path, target)


@pytest.mark.parametrize("m", [pytest.param(m, id=m.name) for m in METHODS])
def test_orbax_resume_equals_uninterrupted_run(m, tmp_path):
    tx = optax.chain(m.make(T), optax.adam(1e-2))
    traces = []

    @jax.jit
    def train_step(params, opt_state):
        traces.append(None)
        losses, grads = ob.value_and_task_grads(_task_losses)(params)
        # A two-batch method gets the same batch as its second (Method.batch_kwargs).
        kw = m.batch_kwargs(grads)
        updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses, **kw)
        return optax.apply_updates(params, updates), opt_state

    def run(state):
        for _ in range(STEPS):
            state = train_step(*state)
        return state

    # Committed to the device from the start, as restored arrays are: jit compiles once
    # for both (an uncommitted first input would be a second cache entry, whatever the
    # library does).
    params = _params()
    state = jax.device_put((params, tx.init(params)), jax.devices()[0])
    state = run(state)
    _save(tmp_path / "ckpt", {"params": state[0], "opt_state": state[1]})
    want = run(state)

    # A fresh process would rebuild tx and params, and restore into what `init` gives.
    fresh = {"params": _params(), "opt_state": tx.init(_params())}
    restored = _restore(tmp_path / "ckpt", _target(fresh))
    assert I.trees_equal(restored, {"params": state[0], "opt_state": state[1]})
    got = run((restored["params"], restored["opt_state"]))
    assert I.trees_equal(got, want), f"{m.name}: resumed run differs from the uninterrupted one"
    assert I.avals(got) == I.avals(want)
    assert len(traces) == 1, f"{m.name}: the step was traced {len(traces)} times, not once"
    assert train_step._cache_size() == 1, f"{m.name}: the step compiled more than once"


# ----------------------------------------------------------------------------------------
# nnx.Optimizer
# ----------------------------------------------------------------------------------------

_NNX_METHODS = {
    "mgda": lambda: ob.mgda(num_tasks=T),
    "gradnorm": lambda: ob.gradnorm(T),
    "pcgrad": lambda: ob.pcgrad(num_tasks=T),
    "metabalance": lambda: ob.metabalance(num_tasks=T),
    "balancer": lambda: ob.balancer([1.0] * T),
}


@pytest.mark.parametrize("name", list(_NNX_METHODS))
def test_orbax_resume_with_nnx_optimizer(name, tmp_path):
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, x):
            return self.dense(x)

    # One tx for both runs: nnx.Optimizer keeps it in its graph definition, so a new tx
    # object would be a new graph to nnx.jit (as it would be, once, in a fresh process).
    tx = optax.chain(_NNX_METHODS[name](), optax.adam(1e-2))

    def build():
        model = Model(nnx.Rngs(0))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    traces = []

    @nnx.jit
    def train_step(model, optimizer):
        traces.append(None)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def losses_of(params):  # (T,)
            pred = nnx.merge(graphdef, params, rest)(_X)
            return jnp.mean((pred[None] - _Y) ** 2, axis=(1, 2))

        losses, grads = ob.value_and_task_grads(losses_of)(params)
        optimizer.update(model, grads, task_losses=losses)

    model, optimizer = build()
    for _ in range(STEPS):
        train_step(model, optimizer)
    _save(tmp_path / "ckpt", nnx.state((model, optimizer)))
    for _ in range(STEPS):
        train_step(model, optimizer)
    want = nnx.state((model, optimizer))

    model2, optimizer2 = build()  # a fresh start, then the checkpoint restored into it
    _, abstract = nnx.split(nnx.eval_shape(build))
    nnx.update((model2, optimizer2), _restore(tmp_path / "ckpt", abstract))
    for _ in range(STEPS):
        train_step(model2, optimizer2)
    got = nnx.state((model2, optimizer2))
    assert I.trees_equal(got, want), f"{name}: resumed nnx run differs"
    assert len(traces) == 1, f"{name}: the nnx step compiled {len(traces)} times, not once"
    np.testing.assert_array_equal(
        np.asarray(ob.task_weights(optimizer2.opt_state)),
        np.asarray(ob.task_weights(optimizer.opt_state)),
    )


def test_only_a_full_shape_init_fits_a_trained_state():
    """Why the README passes ``num_tasks``: without it ``init`` returns a ``(0,)`` weights
    placeholder (replaced at the first update), so a fresh ``init`` is no restore target
    for a trained state (orbax: "Requested shape: (0,) is not compatible with the stored
    shape: (3,)") and a jitted step sees two state shapes (two compiles). Shapes only
    (``jax.eval_shape``): nothing is compiled."""
    params = _params()
    grads = jax.jacrev(_task_losses)(params)
    losses = _task_losses(params)

    def avals(tree):
        return jax.tree.map(lambda x: (x.shape, x.dtype, x.weak_type), tree)

    def trained(tx):
        return jax.eval_shape(lambda s: tx.update(grads, s, params, task_losses=losses)[1],
                              tx.init(params))  # fmt: skip

    for name, make in _NNX_METHODS.items():
        tx = make()
        assert avals(jax.eval_shape(tx.init, params)) == avals(trained(tx)), name
    lazy = ob.mgda()
    assert lazy.init(params).weights.shape == (0,)
    assert trained(lazy).weights.shape == (T,)
