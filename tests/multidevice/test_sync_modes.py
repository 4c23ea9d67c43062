"""What each ``sync`` mode computes and sends, checked on 8 devices.

References are written out in NumPy here, from the definitions: the statistics mode of
the balancer uses ``sqrt(mean_d ||g_d||^2)`` as each task's norm; per-item statistics
gather every device's items; the all-reduce volume is read from the compiled program.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_balance as ob

N_DEV = 8
T = 3


def _mesh():
    return jax.make_mesh((N_DEV,), ("data",), axis_types=(AxisType.Explicit,))


def _put(mesh, x):
    return jax.device_put(x, NamedSharding(mesh, P("data")))


def _stacked_state_map(tx, mesh, sync, user_pmean):
    """A shard_map update over per-device gradients (leading device axis on every input)."""

    def body(g, losses, state):
        g, losses, state = jax.tree.map(lambda a: a[0], (g, losses, state))
        upd, state = tx.update(g, state, None, task_losses=losses)
        if user_pmean:
            upd = jax.lax.pmean(upd, "data")
        return jax.tree.map(lambda a: a[None], (upd, state))

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data")))


def _per_device(tree):
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (N_DEV, *np.shape(a))), tree)


def _all_equal(stacked):
    for leaf in jax.tree.leaves(stacked):
        leaf = np.asarray(leaf)
        for d in range(1, N_DEV):
            np.testing.assert_array_equal(leaf[d], leaf[0])


def test_balancer_stats_mode_uses_rms_of_local_norms():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(N_DEV, T, 5)).astype(np.float32) * np.array([1.0, 10.0, 0.1])[:, None]
    g = g.astype(np.float32)
    weights = np.array([1.0, 2.0, 1.0])
    mesh = _mesh()
    tx = ob.balancer(list(weights), ema_decay=0.5, axis_name="data", sync="stats")
    state = _put(mesh, _per_device(tx.init(jnp.zeros(5))))
    step = _stacked_state_map(tx, mesh, "stats", user_pmean=True)
    losses = _put(mesh, np.ones((N_DEV, T), np.float32))
    total, fix = np.zeros(T), 0.0
    for k in range(3):
        gk = g * (1.0 + k)
        upd, state = step(_put(mesh, gk), losses, state)
        _all_equal((upd, state))
        norms = np.sqrt(np.mean(np.sum(gk.astype(np.float64) ** 2, axis=2), axis=0))
        total, fix = 0.5 * total + norms, 0.5 * fix + 1.0
        scale = (weights / weights.sum()) / (1e-12 + total / fix)
        want = np.einsum("t,dtp->p", scale, gk) / N_DEV
        np.testing.assert_allclose(np.asarray(state.weights)[0], scale, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(upd)[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sync", ["grads", "stats"])
def test_per_batch_item_is_exact_on_devices(sync):
    """Items are per device: the norm is the mean over the *global* batch's items."""
    rng = np.random.default_rng(2)
    local_b = 2
    g = rng.normal(size=(T, N_DEV * local_b, 4)).astype(np.float32)
    g *= np.array([1.0, 5.0, 0.2], np.float32)[:, None, None]
    weights = [1.0, 1.0, 2.0]
    one = ob.balancer(weights, per_batch_item=True, ema_decay=0.9)
    many = ob.balancer(weights, per_batch_item=True, ema_decay=0.9, axis_name="data", sync=sync)
    mesh = _mesh()
    # device d holds items d*local_b ... (d+1)*local_b - 1.
    per_dev = np.stack(np.split(g, N_DEV, axis=1))  # (D, T, local_b, 4)
    step = _stacked_state_map(many, mesh, sync, user_pmean=False)
    state_d = _put(mesh, _per_device(many.init(jnp.zeros((local_b, 4)))))
    state = one.init(jnp.zeros((N_DEV * local_b, 4)))
    losses = _put(mesh, np.ones((N_DEV, T), np.float32))
    for k in range(3):
        gk = g * (1.0 + k)
        upd_d, state_d = step(_put(mesh, per_dev * (1.0 + k)), losses, state_d)
        upd, state = one.update(jnp.asarray(gk), state)
        _all_equal(state_d)
        # The per-item outputs of all devices, concatenated, are the one-device output.
        np.testing.assert_allclose(np.concatenate(list(upd_d)), upd, rtol=1e-5, atol=1e-7)
        for a, b in zip(jax.tree.leaves(state_d), jax.tree.leaves(state)):
            np.testing.assert_allclose(np.asarray(a)[0], b, rtol=1e-5)
    # And by hand: the EMA (bias corrected) of the mean per-item norm, over all items.
    norms = [np.mean(np.linalg.norm(g * (1.0 + k), axis=2), axis=1) for k in range(3)]
    total = sum(0.9 ** (2 - k) * norms[k] for k in range(3))
    fix = sum(0.9**k for k in range(3))
    np.testing.assert_allclose(
        np.asarray(state.weights), (np.array(weights) / 4.0) / (1e-12 + total / fix), rtol=1e-5
    )


@pytest.mark.parametrize("sync", ["grads", "stats"])
def test_non_finite_on_one_device_keeps_every_state(sync):
    mesh = _mesh()
    tx = ob.mgda(num_tasks=T, axis_name="data", sync=sync)
    rng = np.random.default_rng(3)
    g = rng.normal(size=(N_DEV, T, 6)).astype(np.float32)
    step = _stacked_state_map(tx, mesh, sync, user_pmean=False)
    losses = _put(mesh, np.ones((N_DEV, T), np.float32))
    _, state = step(_put(mesh, g), losses, _put(mesh, _per_device(tx.init(jnp.zeros(6)))))
    bad = g.copy()
    bad[5, 1, 2] = np.nan
    _, state2 = step(_put(mesh, bad), losses, state)
    _all_equal(state2)
    np.testing.assert_array_equal(np.asarray(state2.weights), np.asarray(state.weights))


def _all_reduce_floats(hlo: str) -> int:
    """Total elements all-reduced by a compiled (optimised) HLO module."""
    total = 0
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s+all-reduce(?:-start)?\(", line)
        if not m:
            continue
        for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", m.group(1)):
            total += int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


@pytest.mark.parametrize("sync", ["grads", "stats"])
def test_all_reduce_volume(sync):
    """grads: T*P_s + P_o + T numbers; stats: P + T*T + T (the user averages P)."""
    mesh = jax.make_mesh((N_DEV,), ("data",), axis_types=(AxisType.Auto,))
    params = {"trunk": jnp.zeros((10, 20)), "heads": jnp.zeros((T, 20))}
    p_s, p_o = 200, 3 * 20
    tx = ob.mgda(
        num_tasks=T,
        norm_type="loss",
        axis_name="data",
        sync=sync,
        shared={"trunk": True, "heads": False},
    )
    step = _stacked_state_map(tx, mesh, sync, user_pmean=sync == "stats")
    grads = jax.tree.map(lambda p: jnp.ones((N_DEV, T, *p.shape)), params)
    args = (grads, jnp.ones((N_DEV, T)), _per_device(tx.init(params)))
    volume = _all_reduce_floats(step.lower(*args).compile().as_text())
    want = T * p_s + p_o + T if sync == "grads" else (p_s + p_o) + T * T + T
    assert volume == want


@pytest.mark.parametrize("sync", ["grads", "stats"])
def test_pmap(sync):
    """pmap: the same axis_name; exact mode equals one device on the mean gradient."""
    rng = np.random.default_rng(4)
    g = rng.normal(size=(N_DEV, T, 6)).astype(np.float32)
    losses = rng.uniform(0.5, 2.0, size=(N_DEV, T)).astype(np.float32)
    tx = ob.mgda(num_tasks=T, norm_type="loss+", axis_name="d", sync=sync)
    state = tx.init(jnp.zeros(6))
    step = jax.pmap(
        lambda g, loss, s: tx.update(g, s, task_losses=loss), axis_name="d", in_axes=(0, 0, None)
    )
    upd, new_state = step(g, losses, state)
    _all_equal(new_state)
    one = ob.mgda(num_tasks=T, norm_type="loss+")
    if sync == "grads":
        want, want_state = jax.jit(one.update)(
            g.mean(0), one.init(jnp.zeros(6)), task_losses=losses.mean(0)
        )
        _all_equal(upd)
        np.testing.assert_allclose(np.asarray(upd)[0], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(new_state.weights)[0], want_state.weights, rtol=1e-5)


def test_shard_map_unchecked_replicated_params():
    """check_vma=False, params in replicated: gradients are local, the balancer syncs."""
    from tests.multidevice.test_methods_devices import LR, STEPS, _close, _data, task_losses

    params, x, y = _data()
    mesh = _mesh()
    many = ob.balancer([1.0, 2.0, 1.0], ema_decay=0.9, axis_name="data")
    one = ob.balancer([1.0, 2.0, 1.0], ema_decay=0.9)

    def body(tx, params, state, x, y):
        _, grads = ob.value_and_task_grads(task_losses)(params, x, y)
        upd, state = tx.update(grads, state, params)
        return jax.tree.map(lambda p, u: p - LR * u, params, upd), state

    step_many = jax.jit(
        jax.shard_map(
            functools.partial(body, many),
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data")),
            out_specs=P(),
            check_vma=False,
        )
    )
    step_one = jax.jit(functools.partial(body, one))
    p1, s1 = params, one.init(params)
    pm, sm = params, many.init(params)
    xs, ys = _put(mesh, x), _put(mesh, y)
    for k in range(STEPS):
        p1, s1 = step_one(p1, s1, x, y)
        pm, sm = step_many(pm, sm, xs, ys)
        _close((pm, sm), (p1, s1), f"step {k}")
