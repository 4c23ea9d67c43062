"""Two mini-batches and gradient-sized state on 8 devices.

* ``sync="stats"`` for a cross-Gramian method: the statistic is the mean over devices of
  each device's ``J1_d J2_d^T`` (still unbiased, each device's batches being
  independent), checked against NumPy; weights and state identical on every device.
* MoCo's and DB-MTL's estimates are placed like the params (task axis unsharded) at
  ``init`` and stay so through sharded ``jit`` steps: each device holds its slice only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_balance as ob
from tests.test_modo import torchjd_modo

N_DEV = 8
T = 3


def test_cross_gramian_stats_mode_is_the_mean_of_local_cross_gramians():
    mesh = jax.make_mesh((N_DEV,), ("data",), axis_types=(AxisType.Explicit,))
    rng = np.random.default_rng(4)
    g1 = rng.normal(size=(N_DEV, T, 6)).astype(np.float32)
    g2 = rng.normal(size=(N_DEV, T, 6)).astype(np.float32)
    tx = ob.modo(gamma=0.3, axis_name="data", sync="stats", num_tasks=T)

    def body(a, b, state):
        a, b, state = jax.tree.map(lambda x: x[0], (a, b, state))
        upd, state = tx.update(a, state, None, task_grads2=b)
        return jax.tree.map(lambda x: x[None], (upd, state))

    step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))  # noqa: E731
    state = put(jax.tree.map(lambda a: jnp.broadcast_to(a, (N_DEV, *a.shape)), tx.init(0.0)))
    lam = np.full(T, 1.0 / T)
    for k in range(3):
        upd, state = step(put(g1 * (1 + k)), put(g2), state)
        for leaf in jax.tree.leaves((state,)):
            leaf = np.asarray(leaf)
            assert all(np.array_equal(leaf[d], leaf[0]) for d in range(N_DEV))
        a = np.mean(np.einsum("dtp,dsp->dts", g1 * (1.0 + k), g2), axis=0)
        lam = torchjd_modo(a, lam, gamma=0.3, rho=0.1)
        np.testing.assert_allclose(np.asarray(state.weights)[0], lam, rtol=1e-5, atol=1e-6)
        # The output is each device's local combination of its two batches.
        local = np.einsum("t,dtp->dp", lam, (g1 * (1.0 + k) + g2) / 2)
        np.testing.assert_allclose(np.asarray(upd), local, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["moco", "db_mtl"])
def test_estimates_sharded_like_the_params(name):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    specs = {"w": P(None, "model"), "b": P("model")}
    params = {
        "w": jax.device_put(jnp.ones((6, 8)), NamedSharding(mesh, specs["w"])),
        "b": jax.device_put(jnp.ones((8,)), NamedSharding(mesh, specs["b"])),
    }
    tx = getattr(ob, name)(num_tasks=T)
    state = tx.init(params)

    def check(state):
        for k, spec in specs.items():
            est = state.estimates[k]
            want = NamedSharding(mesh, P(None, *spec))
            assert est.sharding.is_equivalent_to(want, est.ndim), (k, est.sharding)
            # Each device holds its model slice of every task's estimate, nothing more.
            shard = est.addressable_shards[0].data
            assert shard.shape == (T, *params[k].shape[:-1], params[k].shape[-1] // 4)

    check(state)

    @jax.jit
    def step(params, state, x):
        def losses(p):
            h = jnp.tanh(x @ p["w"] + p["b"])
            return jnp.stack([jnp.mean(h**2), jnp.mean((h - 1.0) ** 2), jnp.mean(h[:, :3])]) + 1

        l_val, g = ob.value_and_task_grads(losses)(params)
        return tx.update(g, state, params, task_losses=l_val)

    x = jax.device_put(
        np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32),
        NamedSharding(mesh, P("data")),
    )
    for _ in range(3):
        upd, state = step(params, state, x)
        check(state)
        for k, spec in specs.items():
            assert upd[k].sharding.is_equivalent_to(NamedSharding(mesh, spec), upd[k].ndim)
