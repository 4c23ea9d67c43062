"""GradNorm's synthetic multi-task regression: tasks that differ only in target scale.

The toy problem of Chen et al. (2018), Sec. 5.1: every task regresses the same kind of
function of the same inputs,

    y_i = sigma_i * tanh((B + eps_i) x),   B_jk ~ N(0, 10),  (eps_i)_jk ~ N(0, 3.5),

with x of dimension 250 and y_i of dimension 100, so the tasks differ mainly in the scale
sigma_i (here log-spaced from 1 to 100) and their losses by up to 10^4. The model is the
paper's: a 4-layer ReLU trunk of width 100 shared by all tasks, and one affine head per
task. Trained side by side, with the same optimizer (Adam) and data:

* equal weights (the plain sum of the losses; ``ob.balancer(..., balance_grads=False)``),
* GradNorm (``ob.gradnorm``, alpha = 1.5, gradient norms on the last shared layer as in
  the paper),
* MGDA (``ob.mgda``),
* the EnCodec balancer (``ob.balancer``, equal shares),
* MetaBalance (``ob.metabalance``, task 0 as the main task).

It prints a table of the final per-task test losses, relative to their initial values
(a scale-free measure; in absolute terms the sigma = 100 task's loss is ~10^4 times the
sigma = 1 task's), and saves a plot with one column per method: the task weights (each
divided by the mean weight, log scale) and the loss ratios L_i(t) / L_i(0) over training.

Run:  python examples/gradnorm_toy.py [--out plot.png]   (about a minute on 2 CPU cores)
      python examples/gradnorm_toy.py --steps 30          (fast)
Needs matplotlib (``pip install -e ".[examples]"``).

Reference: Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm: Gradient Normalization for
Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018, https://arxiv.org/abs/1711.02257
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_balance as ob

D_IN, D_OUT, WIDTH, DEPTH = 250, 100, 100, 4


def make_data(key: jax.Array, sigmas: np.ndarray, n: int) -> tuple[jax.Array, jax.Array]:
    """Inputs (n, 250) and targets (n, T, 100) of the GradNorm toy problem."""
    kb, keps, kx = jax.random.split(key, 3)
    b = jnp.sqrt(10.0) * jax.random.normal(kb, (D_OUT, D_IN))
    eps = jnp.sqrt(3.5) * jax.random.normal(keps, (len(sigmas), D_OUT, D_IN))
    x = jax.random.normal(kx, (n, D_IN))
    # Scaled so the tanh argument has unit variance: neither linear nor saturated.
    z = jnp.einsum("tok,nk->nto", b + eps, x) / jnp.sqrt(D_IN * (10.0 + 3.5))
    y = jnp.tanh(z) * jnp.asarray(sigmas)[:, None]
    return x, y


def init_params(key: jax.Array, num_tasks: int) -> dict[str, Any]:
    def dense(k, din, dout):
        return {"w": jax.random.normal(k, (din, dout)) * jnp.sqrt(2.0 / din), "b": jnp.zeros(dout)}

    keys = jax.random.split(key, DEPTH + 1)
    trunk = [dense(keys[i], D_IN if i == 0 else WIDTH, WIDTH) for i in range(DEPTH)]
    hk = jax.random.split(keys[-1], num_tasks)
    heads = jax.vmap(lambda k: dense(k, WIDTH, D_OUT))(hk)  # leaves (T, ...): one per task
    return {"trunk": trunk, "heads": heads}


def task_losses(params: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
    h = x
    for layer in params["trunk"]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    pred = jnp.einsum("nk,tko->nto", h, params["heads"]["w"]) + params["heads"]["b"]
    return jnp.mean((pred - y) ** 2, axis=(0, 2))  # (T,)


# Trunk shared, heads task-specific; GradNorm measures norms on the last shared layer only.
SHARED = {"trunk": True, "heads": False}
LAST_LAYER = {"trunk": [False] * (DEPTH - 1) + [True], "heads": False}


def methods(num_tasks: int) -> dict[str, Callable[[], optax.GradientTransformationExtraArgs]]:
    """The balancing transformations compared, by display name (missing ones skipped)."""
    candidates: dict[str, tuple[str, Callable[[], Any]]] = {
        "equal weights": (
            "balancer",
            lambda: ob.balancer([1.0] * num_tasks, balance_grads=False, shared=SHARED),
        ),
        "GradNorm": (
            "gradnorm",
            lambda: ob.gradnorm(num_tasks, alpha=1.5, norm_mask=LAST_LAYER, shared=SHARED),
        ),
        "MGDA": ("mgda", lambda: ob.mgda(shared=SHARED, num_tasks=num_tasks)),
        "balancer": ("balancer", lambda: ob.balancer([1.0] * num_tasks, shared=SHARED)),
        "MetaBalance": (
            "metabalance",
            lambda: ob.metabalance(main_task=0, shared=SHARED, num_tasks=num_tasks),
        ),
    }
    out = {}
    for name, (attr, make) in candidates.items():
        if hasattr(ob, attr):
            out[name] = make
        else:
            print(f"note: ob.{attr} is not in this version of optax_balance; skipping {name}")
    return out


def train(
    balance: optax.GradientTransformationExtraArgs,
    params: dict[str, Any],
    data: tuple[jax.Array, ...],
    steps: int,
    batch: int,
    lr: float,
    every: int,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Trains; returns the final params, and every `every` steps the weights and test losses.

    The step count is rounded down to a multiple of `every`.
    """
    x, y, x_eval, y_eval = data
    tx = optax.chain(balance, optax.adam(lr))

    def step(carry, key):
        params, opt_state = carry
        idx = jax.random.randint(key, (batch,), 0, x.shape[0])
        losses, grads = ob.value_and_task_grads(task_losses)(params, x[idx], y[idx])
        updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), ob.task_weights(opt_state)

    def chunk(carry, keys):  # `every` steps, then one evaluation on the test set
        carry, weights = jax.lax.scan(lambda c, k: step(c, k), carry, keys)
        return carry, (weights[-1], task_losses(carry[0], x_eval, y_eval))

    keys = jax.random.split(jax.random.key(2), (steps // every, every))
    # Every method is built with its task count, so `init` gives the state its final shape,
    # as the scan carry needs: all of training is one compiled loop.
    opt_state = tx.init(params)
    run = jax.jit(lambda carry, ks: jax.lax.scan(chunk, carry, ks))
    (params, _), (weights, losses) = run((params, opt_state), keys)
    weights, losses = np.asarray(weights), np.asarray(losses)
    return params, weights, losses


def plot(
    results: dict[str, tuple], sigmas: np.ndarray, initial: np.ndarray, every: int, path: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(2, n, figsize=(3.4 * n, 6.4), sharex=True, sharey="row", squeeze=False)
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, len(sigmas)))
    floor = 1e-3  # zero weights (MGDA drops tasks entirely) are drawn at the floor
    for col, (name, (_, weights, losses, _)) in enumerate(results.items()):
        steps = every * np.arange(1, len(weights) + 1)
        rel_w = weights / np.maximum(weights.mean(axis=1, keepdims=True), 1e-30)
        top, bottom = axes[0, col], axes[1, col]
        for i, s in enumerate(sigmas):
            label = f"task {i} (sigma = {s:.3g})"
            top.plot(steps, np.maximum(rel_w[:, i], floor), color=colors[i], label=label)
            ratio = np.concatenate([[1.0], losses[:, i] / initial[i]])  # step 0: ratio 1
            bottom.plot(np.concatenate([[0], steps]), ratio, color=colors[i], label=label)
        top.set_title(name)
        top.set_yscale("log")
        bottom.set_yscale("log")
        bottom.set_xlabel("training step")
        top.grid(alpha=0.3, which="both")
        bottom.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel("task weight / mean weight")
    axes[1, 0].set_ylabel("test loss ratio L_i(t) / L_i(0)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(sigmas), frameon=False)
    fig.suptitle("GradNorm toy problem (Chen et al. 2018, Sec. 5.1): tasks differ in target scale")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(steps: int, out: str, num_tasks: int = 4, batch: int = 100, lr: float = 1e-3) -> None:
    every = min(10, steps)
    sigmas = np.geomspace(1.0, 100.0, num_tasks)
    x, y = make_data(jax.random.key(0), sigmas, 11000)
    data = (x[:10000], y[:10000], x[10000:], y[10000:])  # 10000 train (as in the paper), 1000 test
    params0 = init_params(jax.random.key(1), num_tasks)
    initial = np.asarray(task_losses(params0, data[2], data[3]))

    results = {}
    for name, make in methods(num_tasks).items():
        t0 = time.perf_counter()
        _, weights, losses = train(make(), params0, data, steps, batch, lr, every)
        results[name] = (None, weights, losses, time.perf_counter() - t0)

    header = f"{'method':<14}" + "".join(f"  task {i} (s={s:>5.1f})" for i, s in enumerate(sigmas))
    print(f"final test loss / initial test loss after {steps} steps (lower is better)")
    print(header + "     worst   time")
    for name, (_, _, losses, secs) in results.items():
        rel = losses[-1] / initial
        row = "".join(f"  {v:>17.4f}" for v in rel)
        print(f"{name:<14}{row}  {rel.max():8.4f}  {secs:4.1f}s")
    print("final task weights (each / mean weight):")
    for name, (_, weights, _, _) in results.items():
        w = weights[-1] / weights[-1].mean()
        print(f"{name:<14}" + "".join(f"  {v:>17.3g}" for v in w))

    plot(results, sigmas, initial, every, out)
    print(f"plot saved to {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps per method")
    parser.add_argument(
        "--out",
        default=os.path.join(tempfile.gettempdir(), "optax_balance_gradnorm_toy.png"),
        help="where to save the PNG plot",
    )
    args = parser.parse_args()
    main(args.steps, args.out)
