"""Registered methods on 8 devices: shard_map, sharded jit, a 2x4 data x model mesh.

One method per path through the core's device sync (``PATHS``).

The model is a tiny two-layer network with a shared trunk and one head row per task;
per-device gradients come from the per-example loss on the device's slice of the batch,
so the mean of the per-device (local-mean) gradients is the global-batch gradient. The
reference is the same method on one device, on the concatenated batch. A two-batch method
(``Method.two_batches``) gets a second, different batch (``second_batch``), sliced over
the devices the same way.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_balance as ob
from tests.methods import METHOD_IDS, METHODS, Method

T = 3
N_DEV = 8
LOCAL_B = 2
B = N_DEV * LOCAL_B
STEPS = 3
LR = 0.05
SHARED = {"trunk": True, "bias": True, "heads": False}
RTOL = 1e-5


# All tests of one method in one xdist worker, so its reference is compiled once.
PARAMS = [pytest.param(m, id=m.name, marks=pytest.mark.xdist_group(m.name)) for m in METHODS]

# The device layouts exercise the core's sync, which depends on what a method reads and
# keeps, not on its weighting's arithmetic (computed from the synced statistics, the same
# on every device): they run on one method per path through the core. (8-device compiles
# are the suite's slowest: ~40 methods x 5 layouts took most of `make test`'s budget.)
PATHS = {
    "mgda_loss+": "Gramian and losses, an iterative solver",
    "balancer": "per-task squared norms, EMA state",
    "gradnorm": "norms and losses, an inner optimizer's state, norm_mask",
    "metabalance": "per-leaf squared norms, per-leaf weights",
    "gradvac_per_leaf": "per-leaf Gramians",
    "pcgrad": "a PRNG key in the state",
    "graddrop": "the stacked gradients, per-coordinate weights",
    "db_mtl": "gradient-sized tracked estimates in the state, head scales",
    "sdmgrad": "a second batch, the cross-Gramian",
    "famo": "losses only, extra per-task keywords",
}
PATH_PARAMS = [p for p in PARAMS if p.id in PATHS]
assert len(PATH_PARAMS) == len(PATHS), "tests/methods.py renamed a method PATHS lists"


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, 4)).astype(np.float32)
    # Three tasks on different scales and partly conflicting directions.
    y = np.stack([x[:, 0] - x[:, 1], 10.0 * x[:, 1], -0.1 * x[:, 0] + x[:, 2]], axis=1)
    params = {
        "trunk": (0.5 * rng.normal(size=(4, 8))).astype(np.float32),
        "bias": (0.1 * rng.normal(size=(8,))).astype(np.float32),
        "heads": (0.5 * rng.normal(size=(T, 8))).astype(np.float32),
    }
    return params, x, y.astype(np.float32)


def task_losses(params, x, y):
    """(T,) mean squared errors over the batch: each a mean of per-example losses."""
    h = jnp.tanh(x @ params["trunk"] + params["bias"])
    pred = h @ params["heads"].T
    return jnp.mean((pred - y) ** 2, axis=0)


def make_tx(method: Method, **kw) -> optax.GradientTransformationExtraArgs:
    return method.make(T, shared=SHARED, **kw)


def second_batch(x, y):
    """A second batch, elementwise from the first: each device's slice of it is the slice
    of the global second batch."""
    return 0.5 * x[..., ::-1] + 0.1, 0.9 * y - 0.2


def local_extra(method, params, x, y, losses):
    """``update``'s keyword arguments: the losses, and a two-batch method's second batch."""
    extra = {"task_losses": losses} if method.needs_losses else {}
    if method.two_batches:
        extra["task_grads2"] = jax.jacrev(task_losses)(params, *second_batch(x, y))
    return extra


def local_step(tx, method, params, state, x, y, axis_name=None):
    losses, grads = ob.value_and_task_grads(task_losses)(params, x, y)
    upd, state = tx.update(grads, state, params, **local_extra(method, params, x, y, losses))
    return upd, state


def _sgd(params, upd):
    return jax.tree.map(lambda p, u: p - LR * u, params, upd)


def _close(actual, desired, what):
    """Floats to RTOL; integers and keys exactly, except solver iteration counts (a
    diagnostic that a last-bit difference in the statistics may change)."""
    flat_a = jax.tree_util.tree_leaves_with_path(actual)
    flat_d = jax.tree.leaves(desired)
    assert len(flat_a) == len(flat_d), what
    for (path, a), d in zip(flat_a, flat_d):
        if "iter" in jax.tree_util.keystr(path):
            continue
        if jnp.issubdtype(jnp.result_type(d), jax.dtypes.prng_key):
            a, d = jax.random.key_data(a), jax.random.key_data(d)
        a, d = np.asarray(a), np.asarray(d)
        if np.issubdtype(d.dtype, np.inexact):
            scale = max(1.0, float(np.max(np.abs(d))) if d.size else 1.0)
            np.testing.assert_allclose(a, d, rtol=RTOL, atol=RTOL * scale, err_msg=what)
        else:
            np.testing.assert_array_equal(a, d, err_msg=what)


def _same_on_every_device(stacked, what):
    """Leaves with a leading device axis: every device's copy is bit-identical."""
    for leaf in jax.tree.leaves(stacked):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        leaf = np.asarray(leaf)
        for d in range(1, leaf.shape[0]):
            np.testing.assert_array_equal(leaf[d], leaf[0], err_msg=f"{what}: device {d}")


@functools.cache
def reference(name: str):
    """One device, global batch: (updates, state) after each of STEPS sgd steps."""
    method = METHODS[METHOD_IDS.index(name)]
    tx = make_tx(method)
    params, x, y = _data()
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        upd, state = local_step(tx, method, params, state, x, y)
        return _sgd(params, upd), upd, state

    out = []
    for _ in range(STEPS):
        params, upd, state = step(params, state)
        out.append(jax.device_get((upd, state)))
    return out


def _mesh(shape, names, kind=AxisType.Explicit):
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(names))


def _per_device(tree):
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (N_DEV, *np.shape(a))), tree)


def _run_shard_map(method: Method, sync: str):
    """8 devices; params and state carried per device (so any divergence shows)."""
    mesh = _mesh((N_DEV,), ("data",))
    tx = make_tx(method, axis_name="data", sync=sync)
    params, x, y = _data()
    dev = NamedSharding(mesh, P("data"))
    xs, ys = jax.device_put(x, dev), jax.device_put(y, dev)
    params_d = jax.device_put(_per_device(params), dev)
    state_d = jax.device_put(_per_device(tx.init(params)), dev)

    def body(params, state, x, y):
        params, state = jax.tree.map(lambda a: a[0], (params, state))
        upd, state = local_step(tx, method, params, state, x, y)
        if sync == "stats":  # the user averages the combined gradient
            upd = jax.lax.pmean(upd, "data")
        return jax.tree.map(lambda a: a[None], (_sgd(params, upd), upd, state))

    spec = P("data")
    step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=True))
    out = []
    for _ in range(STEPS):
        params_d, upd_d, state_d = step(params_d, state_d, xs, ys)
        out.append(jax.device_get((params_d, upd_d, state_d)))
    return out


@pytest.mark.parametrize("method", PATH_PARAMS)
def test_shard_map_exact_equals_one_device(method):
    ref = reference(method.name)
    for k, (params_d, upd_d, state_d) in enumerate(_run_shard_map(method, "grads")):
        _same_on_every_device((params_d, upd_d, state_d), f"step {k}")
        upd0, state0 = jax.tree.map(lambda a: a[0], (upd_d, state_d))
        _close(upd0, ref[k][0], f"{method.name} update, step {k}")
        _close(state0, ref[k][1], f"{method.name} state, step {k}")


@pytest.mark.parametrize("method", PATH_PARAMS)
def test_shard_map_stats_identical_on_every_device(method):
    if "grads" in make_tx(method).weighting.needs:
        # GradDrop, TrimmedMean, ExcessMTL, and the methods with tracked estimates: the
        # stacked gradients are what they read, which a statistics-only sync does not
        # average; the core refuses it at construction.
        with pytest.raises(ValueError, match="sync='stats'|use sync='grads'"):
            make_tx(method, axis_name="data", sync="stats")
        return
    runs = _run_shard_map(method, "stats")
    for k, (params_d, upd_d, state_d) in enumerate(runs):
        _same_on_every_device(state_d, f"{method.name} state, step {k}")
        _same_on_every_device((params_d, upd_d), f"{method.name} params, step {k}")
        assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(upd_d))
    w = np.asarray(ob.task_weights(jax.tree.map(lambda a: a[0], runs[-1][2])))
    assert w.shape == (T,) and np.all(np.isfinite(w))


def _assert_same_shardings(actual, expected, what):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.sharding.is_equivalent_to(e.sharding, a.ndim), (
            f"{what}: {a.sharding} is not {e.sharding}"
        )


@pytest.mark.parametrize("method", PATH_PARAMS)
def test_sharded_jit_2x4_equals_unsharded(method):
    """Plain jit, no axis name: batch over "data", trunk and head columns over "model"."""
    mesh = _mesh((2, 4), ("data", "model"), AxisType.Auto)
    tx = make_tx(method)
    params, x, y = _data()
    specs = {"trunk": P(None, "model"), "bias": P("model"), "heads": P(None, "model")}
    params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ys = jax.device_put(y, NamedSharding(mesh, P("data")))
    replicated = NamedSharding(mesh, P())
    # Eager init: gradient-sized state (MoCo's estimates) is placed like the params; under
    # jit with Auto axes any optax state comes out on one device (as adam's moments do).
    state = jax.tree.map(
        lambda a: a if isinstance(a.sharding, NamedSharding) else jax.device_put(a, replicated),
        tx.init(params),
    )
    state_in = state

    traces = []

    @jax.jit
    def step(params, state, x, y):
        traces.append(1)
        upd, state = local_step(tx, method, params, state, x, y)
        return _sgd(params, upd), upd, state

    ref = reference(method.name)
    for k in range(STEPS):
        new_params, upd, state = step(params, state, xs, ys)
        _assert_same_shardings(upd, params, f"{method.name} update, step {k}")
        _assert_same_shardings(new_params, params, f"{method.name} params, step {k}")
        _assert_same_shardings(state, state_in, f"{method.name} state, step {k}")
        _close(upd, ref[k][0], f"{method.name} update, step {k}")
        _close(state, ref[k][1], f"{method.name} state, step {k}")
        params = new_params
    assert len(traces) == 1  # same types and shardings in and out: traced once


@pytest.mark.parametrize("method", PATH_PARAMS)
def test_shard_map_2x4_model_sharded_params(method):
    """shard_map manual over "data" only; params stay sharded over the "model" axis."""
    mesh = _mesh((2, 4), ("data", "model"), AxisType.Auto)
    tx = make_tx(method, axis_name="data")
    params, x, y = _data()
    specs = {"trunk": P(None, "model"), "bias": P("model"), "heads": P(None, "model")}
    params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ys = jax.device_put(y, NamedSharding(mesh, P("data")))
    state = tx.init(params)

    def body(params, state, x, y):
        # Replicated (invariant) params would make jax.grad psum the per-device
        # gradients inside the backward pass; marked varying, they stay local.
        local = jax.lax.pcast(params, "data", to="varying")
        upd, state = local_step(tx, method, local, state, x, y)
        return _sgd(params, upd), upd, state

    step = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data")),
            out_specs=P(),
            axis_names={"data"},
            check_vma=True,
        )
    )
    ref = reference(method.name)
    for k in range(STEPS):
        new_params, upd, state = step(params, state, xs, ys)
        _assert_same_shardings(new_params, params, f"{method.name} params, step {k}")
        _close(upd, ref[k][0], f"{method.name} update, step {k}")
        _close(state, ref[k][1], f"{method.name} state, step {k}")
        params = new_params


@pytest.mark.parametrize("method", PATH_PARAMS)
def test_explicit_sharding_update(method):
    """Sharding in types (``AxisType.Explicit``): types and values kept by update."""
    mesh = _mesh((N_DEV,), ("x",))
    tx = make_tx(method)
    params, x, y = _data()
    losses, grads = jax.jit(ob.value_and_task_grads(task_losses))(params, x, y)
    extra = local_extra(method, params, x, y, losses)
    specs = {"trunk": P(None, "x"), "bias": P("x"), "heads": P(None, "x")}
    with jax.set_mesh(mesh):
        params_s = {k: jax.device_put(v, specs[k]) for k, v in params.items()}
        grads_s = {k: jax.device_put(v, P(None, *specs[k])) for k, v in grads.items()}
        if "task_grads2" in extra:
            extra["task_grads2"] = {
                k: jax.device_put(v, P(None, *specs[k])) for k, v in extra["task_grads2"].items()
            }
        state0 = tx.init(params_s)
        upd, state1 = jax.jit(functools.partial(tx.update, **extra))(grads_s, state0, params_s)
        assert jax.tree.map(jax.typeof, upd) == jax.tree.map(jax.typeof, params_s)
        assert jax.tree.map(jax.typeof, state1) == jax.tree.map(jax.typeof, state0)
        _assert_same_shardings(upd, params_s, method.name)
    _close(upd, reference(method.name)[0][0], f"{method.name} update")
    _close(state1, reference(method.name)[0][1], f"{method.name} state")
