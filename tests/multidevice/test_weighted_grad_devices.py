"""ob.value_and_weighted_grad on 8 devices: every eligible method, both sync modes.

The model, data and one-device reference (the stacked path on the global batch) are
those of ``test_methods_devices``. In the exact mode each device averages every VJP and
every Gramian column over the data axis, so the Gramian is that of the mean Jacobian:
output and state must equal the reference. In the statistics mode the local Gramians
(norms) are averaged: the weights and state must be identical on every device and equal
to the stacked path's statistics mode (``update`` with ``sync="stats"``).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_balance as ob
from tests.methods import METHODS
from tests.multidevice.test_methods_devices import (
    N_DEV,
    STEPS,
    _close,
    _data,
    _mesh,
    _per_device,
    _run_shard_map,
    _same_on_every_device,
    _sgd,
    make_tx,
    reference,
    task_losses,
)


def _eligible(m) -> bool:
    w = make_tx(m).weighting
    return set(w.needs) <= {"gram", "sq_norms", "losses"} and w.head_scales is None


# One method per statistic the one-pass path builds on devices (the Gramian from JVPs with
# and without losses, squared norms with and without losses, the losses alone): the device
# sync of ``value_and_weighted_grad`` depends on those, not on a weighting's arithmetic.
_PATHS = ("mgda_loss+", "pcgrad", "balancer", "gradnorm", "famo")
ELIGIBLE = [m for m in METHODS if _eligible(m) and m.name in _PATHS]
assert len(ELIGIBLE) == len(_PATHS), "tests/methods.py renamed a method _PATHS lists"
# The same xdist groups as test_methods_devices, so each method's reference is built once.
PARAMS = [pytest.param(m, id=m.name, marks=pytest.mark.xdist_group(m.name)) for m in ELIGIBLE]


def _run_ours(tx, sync):
    """8 devices, params and state per device, our path inside shard_map."""
    mesh = _mesh((N_DEV,), ("data",))
    fn = ob.value_and_weighted_grad(task_losses, tx)
    params, x, y = _data()
    dev = NamedSharding(mesh, P("data"))
    xs, ys = jax.device_put(x, dev), jax.device_put(y, dev)
    params_d = jax.device_put(_per_device(params), dev)
    state_d = jax.device_put(_per_device(tx.init(params)), dev)

    def body(params, state, x, y):
        params, state = jax.tree.map(lambda a: a[0], (params, state))
        _, upd, state = fn(params, state, x, y)
        if sync == "stats":  # the user averages the local combination
            upd = jax.lax.pmean(upd, "data")
        return jax.tree.map(lambda a: a[None], (_sgd(params, upd), upd, state))

    spec = P("data")
    step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=True))
    out = []
    for _ in range(STEPS):
        params_d, upd_d, state_d = step(params_d, state_d, xs, ys)
        out.append(jax.device_get((params_d, upd_d, state_d)))
    return out


@pytest.mark.parametrize("method", PARAMS)
def test_exact_mode_equals_one_device_global_batch(method):
    ref = reference(method.name)
    runs = _run_ours(make_tx(method, axis_name="data", sync="grads"), "grads")
    for k, (params_d, upd_d, state_d) in enumerate(runs):
        _same_on_every_device((params_d, upd_d, state_d), f"{method.name} step {k}")
        upd0, state0 = jax.tree.map(lambda a: a[0], (upd_d, state_d))
        _close(upd0, ref[k][0], f"{method.name} update, step {k}")
        _close(state0, ref[k][1], f"{method.name} state, step {k}")


@pytest.mark.parametrize("method", [p for p in PARAMS if p.id in ("mgda_loss+", "gradnorm")])
def test_stats_mode_equals_stacked_stats_mode(method):
    """Mean of local Gramians (norms): identical everywhere, as ``update(sync="stats")``."""
    ours = _run_ours(make_tx(method, axis_name="data", sync="stats"), "stats")
    stacked = _run_shard_map(method, "stats")
    for k, ((p_o, u_o, s_o), (_, u_s, s_s)) in enumerate(zip(ours, stacked)):
        _same_on_every_device((p_o, u_o, s_o), f"{method.name} stats mode, step {k}")
        _close(u_o, u_s, f"{method.name} stats-mode update, step {k}")
        _close(s_o, s_s, f"{method.name} stats-mode state, step {k}")


@pytest.mark.xdist_group("mgda_loss+")
def test_replicated_params_model_axis_and_sharded_jit():
    """shard_map manual over "data" with replicated params (pcast inside) sharded over
    "model"; and plain jit over a 2x4 mesh with no axis name."""
    method = next(m for m in ELIGIBLE if m.name == "mgda_loss+")
    ref = reference("mgda_loss+")
    mesh = _mesh((2, 4), ("data", "model"), AxisType.Auto)
    params, x, y = _data()
    specs = {"trunk": P(None, "model"), "bias": P("model"), "heads": P(None, "model")}
    params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ys = jax.device_put(y, NamedSharding(mesh, P("data")))

    tx = make_tx(method, axis_name="data")
    fn = ob.value_and_weighted_grad(task_losses, tx)

    def body(params, state, x, y):
        local = jax.lax.pcast(params, "data", to="varying")
        _, upd, state = fn(local, state, x, y)
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
    tx_plain = make_tx(method)
    fn_plain = ob.value_and_weighted_grad(task_losses, tx_plain)
    jit_step = jax.jit(lambda p, s: fn_plain(p, s, xs, ys))
    state, state_plain = tx.init(params), tx_plain.init(params)
    p_plain = params
    for k in range(STEPS):
        new_params, upd, state = step(params, state, xs, ys)
        _, upd_plain, state_plain = jit_step(p_plain, state_plain)
        for a, e in zip(jax.tree.leaves(upd_plain), jax.tree.leaves(p_plain)):
            assert a.sharding.is_equivalent_to(e.sharding, a.ndim)
        _close(upd, ref[k][0], f"mgda_loss+ update (replicated params), step {k}")
        _close(state, ref[k][1], f"mgda_loss+ state (replicated params), step {k}")
        _close(upd_plain, ref[k][0], f"mgda_loss+ update (sharded jit), step {k}")
        _close(state_plain, ref[k][1], f"mgda_loss+ state (sharded jit), step {k}")
        params, p_plain = new_params, _sgd(p_plain, upd_plain)
    assert np.isfinite(np.asarray(state.weights)).all()
