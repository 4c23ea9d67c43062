"""Benchmark: balancing at the shared representation vs the plain sum and parameter-level MGDA.

An MLP encoder of about 2.9M parameters (256 -> 1024 -> 1024 -> 1024 -> 512) feeds T
linear heads (512 -> 16, mean squared error each), batch 64. For T in {2, 8, 32} it times
one jitted training step (gradient + Adam update) of

* (a) ``sum``: the plain sum of the T losses, ``jax.value_and_grad``;
* (b) ``rep-MGDA``: MGDA-UB, ``ob.value_and_balanced_grad(encoder, heads, ob.mgda())``
  with ``heads`` giving the (T,) losses from the stacked heads in one einsum (its T
  gradients w.r.t. z cost T times the heads' backward pass); ``rep-MGDA-pt``: the same
  with per-task heads (``heads_in_axes``: task i's gradient through head i only);
  ``rep-bal-pt``: per-task heads with ``ob.balancer([1]*T, per_batch_item=True)``;
* (c) ``param-MGDA``: ``ob.value_and_task_grads`` (T backward passes through the
  encoder) and ``ob.mgda(shared=...)`` on the stacked parameter gradients.

Each time is the median of ``--repeats`` runs after one warm-up (compilation) run, each
run ending with ``jax.block_until_ready``; the variants are timed round-robin. Prints a
markdown table and the load average (timings on a shared machine are noisy). The target
is (b)/(a) <= 1.3 at every T, while (c)/(a) grows with T.

Run:  python benchmarks/representation.py                 (about a minute on a CPU)
      python benchmarks/representation.py --tasks 2 8 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

import optax_balance as ob

SIZES = (256, 1024, 1024, 1024, 512)
HEAD_OUT = 16
BATCH = 64


def init_params(key: jax.Array, num_tasks: int) -> dict:
    keys = jax.random.split(key, len(SIZES))
    enc = [
        {"w": jax.random.normal(k, (m, n)) / jnp.sqrt(m), "b": jnp.zeros(n)}
        for k, m, n in zip(keys[:-1], SIZES[:-1], SIZES[1:])
    ]
    heads = jax.random.normal(keys[-1], (num_tasks, SIZES[-1], HEAD_OUT)) / jnp.sqrt(SIZES[-1])
    return {"enc": enc, "heads": heads}


def encoder(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    del y
    h = x
    for layer in params["enc"]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return h  # (BATCH, 512)


def heads(params: dict, z: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    del x
    pred = jnp.einsum("bd,tdo->tbo", z, params["heads"])  # (T, BATCH, HEAD_OUT)
    return jnp.mean((pred - y) ** 2, axis=(1, 2))  # (T,)


def one_head(params: dict, z: jax.Array, x: jax.Array, y_t: jax.Array) -> jax.Array:
    """Task t's loss from its own head ``params["heads"]`` (512, 16): for heads_in_axes."""
    del x
    return jnp.mean((z @ params["heads"] - y_t) ** 2)


PER_TASK_AXES = ({"enc": None, "heads": 0}, None, 0)  # (params, x, y)


def task_losses(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return heads(params, encoder(params, x, y), x, y)


def make_steps(num_tasks: int) -> dict[str, tuple[Callable, Callable]]:
    """name -> (init(params, x, y) -> state, jitted step(params, state, x, y))."""
    opt = optax.adam(1e-3)

    def plain_init(params, x, y):
        return opt.init(params)

    @jax.jit
    def plain_step(params, state, x, y):
        loss, g = jax.value_and_grad(lambda p: jnp.sum(task_losses(p, x, y)))(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    def rep(tx, per_task=False):
        if per_task:
            grad_fn = ob.value_and_balanced_grad(encoder, one_head, tx, heads_in_axes=PER_TASK_AXES)
        else:
            grad_fn = ob.value_and_balanced_grad(encoder, heads, tx)

        def init(params, x, y):
            return opt.init(params), tx.init(jax.eval_shape(encoder, params, x, y))

        @jax.jit
        def step(params, state, x, y):
            opt_state, tx_state = state
            losses, g, tx_state = grad_fn(params, tx_state, x, y)
            updates, opt_state = opt.update(g, opt_state, params)
            return optax.apply_updates(params, updates), (opt_state, tx_state), losses

        return init, step

    param_tx = optax.chain(ob.mgda(shared={"enc": True, "heads": False}), opt)

    def param_init(params, x, y):
        return param_tx.init(params)

    @jax.jit
    def param_step(params, state, x, y):
        losses, g = ob.value_and_task_grads(task_losses)(params, x, y)
        updates, state = param_tx.update(g, state, params, task_losses=losses)
        return optax.apply_updates(params, updates), state, losses

    return {
        "sum": (plain_init, plain_step),
        "rep-MGDA": rep(ob.mgda()),
        "rep-MGDA-pt": rep(ob.mgda(), per_task=True),
        "rep-bal-pt": rep(ob.balancer([1.0] * num_tasks, per_batch_item=True), per_task=True),
        "param-MGDA": (param_init, param_step),
    }


def time_steps(
    steps: dict[str, tuple[Callable, Callable]], params, x, y, repeats: int
) -> dict[str, float]:
    """Median seconds per step of each variant, after one warm-up (compiling) step.

    The variants are timed round-robin (one step of each per repeat), so that a change in
    the machine's load hits all of them alike.
    """
    carry = {}
    for name, (init, step) in steps.items():
        out = step(params, init(params, x, y), x, y)
        jax.block_until_ready(out)
        carry[name] = out[:2]
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, (_, step) in steps.items():
            p, state = carry[name]
            t0 = time.perf_counter()
            out = step(p, state, x, y)
            jax.block_until_ready(out)
            times[name].append(time.perf_counter() - t0)
            carry[name] = out[:2]
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Runs the benchmark, prints the markdown table, returns its rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    rows = []
    for t in args.tasks:
        kp, kx, ky = jax.random.split(jax.random.key(t), 3)
        params = init_params(kp, t)
        x = jax.random.normal(kx, (BATCH, SIZES[0]))
        y = jax.random.normal(ky, (t, BATCH, HEAD_OUT))
        times = time_steps(make_steps(t), params, x, y, args.repeats)
        n_enc = sum(v.size for v in jax.tree.leaves(params["enc"]))
        rows.append({"T": t, "encoder_params": n_enc, **times})

    load = os.getloadavg()
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform} ({os.cpu_count()} cpus), "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"encoder {rows[0]['encoder_params'] / 1e6:.2f}M params, batch {BATCH}; "
        f"median of {args.repeats} steps, ms"
    )
    print()
    names = [n for n in rows[0] if n not in ("T", "encoder_params")]
    print("| T | " + " | ".join(f"{n} ms | /sum" if n != "sum" else "sum ms" for n in names) + " |")
    print("|---:" * (2 * len(names)) + "|")
    for r in rows:
        cells = [
            f"{1e3 * r[n]:.1f}" + ("" if n == "sum" else f" | {r[n] / r['sum']:.2f}") for n in names
        ]
        print(f"| {r['T']} | " + " | ".join(cells) + " |")
    return rows


if __name__ == "__main__":
    main()
