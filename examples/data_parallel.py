"""Data-parallel multi-task training over every device, with ``shard_map`` and a balancer.

A shared MLP trunk feeds three task heads: two regressions whose targets differ 20x in
scale and a binary classification. The global batch is split over a 1-D ``"data"`` mesh
of all devices; each device computes its local per-task losses and stacked gradients, and
the EnCodec loss balancer (``ob.balancer``) combines them with ``axis_name="data"``:

* ``--sync grads`` (default, exact): the balancer averages the stacked gradients over the
  devices, so every device gets the update one device would compute on the whole batch;
* ``--sync stats``: only the per-task norms are averaged (how audiocraft syncs its
  balancer); each device combines its own gradients with the shared weights and the
  combined gradient is averaged before Adam (one all-reduce of P numbers, not T*P).

On a CPU-only machine the script asks XLA for 8 host devices (the flag only affects the
CPU backend, so the same script runs unchanged on a GPU/TPU host, using its devices).
For several hosts, call ``jax.distributed.initialize()`` first and feed each host its own
slice of the batch; the rest is the same.

Run: ``python examples/data_parallel.py [--steps 300] [--sync grads|stats]``.
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_balance as ob  # noqa: E402

TASKS = ("small regression", "large regression (x20)", "classification")
LOCAL_BATCH = 16


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = np.stack(
        [
            np.sin(x[:, 0] + x[:, 1]),
            20.0 * np.tanh(x[:, 2] - x[:, 3]),
            (x[:, 0] * x[:, 4] > 0).astype(np.float64),
        ],
        axis=1,
    )
    return x, y.astype(np.float32)


def init_params(key: jax.Array) -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(key)
    return {
        "trunk": {"w": jax.random.normal(k1, (8, 64)) / np.sqrt(8.0), "b": jnp.zeros(64)},
        "heads": {"w": jax.random.normal(k2, (3, 64)) / 8.0, "b": jnp.zeros(3)},
    }


def task_losses(params, x, y):
    """(3,) losses: the local-batch means of per-example losses."""
    h = jnp.tanh(x @ params["trunk"]["w"] + params["trunk"]["b"])
    out = h @ params["heads"]["w"].T + params["heads"]["b"]  # (B, 3)
    mse = jnp.mean((out[:, :2] - y[:, :2]) ** 2, axis=0)
    bce = jnp.mean(optax.sigmoid_binary_cross_entropy(out[:, 2], y[:, 2]))
    return jnp.concatenate([mse, bce[None]])


def main(argv: list[str] | None = None) -> dict[str, np.ndarray]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sync", choices=("grads", "stats"), default="grads")
    args = parser.parse_args(argv)

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    batch = LOCAL_BATCH * jax.device_count()
    print(f"{jax.device_count()} {jax.devices()[0].platform} devices, global batch {batch}")

    balance = ob.balancer(
        [1.0, 1.0, 1.0],
        ema_decay=0.99,
        shared={"trunk": True, "heads": False},  # each head row is one task's own
        axis_name="data",
        sync=args.sync,
    )
    if args.sync == "stats":  # each device holds its local combination: average it
        average = optax.stateless(lambda u, _: jax.lax.pmean(u, "data"))
        tx = optax.chain(balance, average, optax.adam(1e-2))
    else:
        tx = optax.chain(balance, optax.adam(1e-2))

    def train_step(params, opt_state, x, y):
        # Inside shard_map, gradients of replicated parameters are summed over the axis by
        # the backward pass itself; marking the parameters per-device keeps the gradients
        # local, and the balancer does the (cheaper, or exact) sync.
        local = jax.lax.pcast(params, "data", to="varying")
        losses, grads = ob.value_and_task_grads(task_losses)(local, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), opt_state, jax.lax.pmean(losses, "data")

    step = jax.jit(
        jax.shard_map(
            train_step,
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data")),
            out_specs=(P(), P(), P()),
        )
    )

    x_all, y_all = make_data(64 * batch)
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(init_params(jax.random.key(0)), replicated)
    opt_state = jax.device_put(tx.init(params), replicated)
    data = NamedSharding(mesh, P("data"))
    history = []
    for i in range(args.steps):
        lo = (i * batch) % len(x_all)
        x = jax.device_put(x_all[lo : lo + batch], data)
        y = jax.device_put(y_all[lo : lo + batch], data)
        params, opt_state, losses = step(params, opt_state, x, y)
        history.append(np.asarray(losses))
        if i % max(1, args.steps // 6) == 0 or i == args.steps - 1:
            weights = np.asarray(ob.task_weights(opt_state))
            print(
                f"step {i:4d}  losses "
                + "  ".join(f"{v:9.4f}" for v in history[-1])
                + "  weights "
                + "  ".join(f"{v:8.4f}" for v in weights)
            )
    first, last = history[0], np.mean(history[-max(1, args.steps // 10) :], axis=0)
    for name, a, b in zip(TASKS, first, last):
        print(f"{name:>24}: {a:9.4f} -> {b:9.4f}")
    return {"first": first, "last": last, "weights": np.asarray(ob.task_weights(opt_state))}


if __name__ == "__main__":
    main()
