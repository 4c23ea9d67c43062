"""Quickstart: three regression tasks through a shared layer, balanced by MGDA.

Shows the whole loop in its shortest form: per-task losses and stacked gradients from one
forward pass (``ob.value_and_task_grads``), ``optax.chain(ob.mgda(), optax.adam(...))``,
the train step under ``jax.jit``, and the task weights read back with
``ob.task_weights``. The tasks' targets differ 10x and 100x in scale, so a plain sum of
the losses would let task 2 drown the others; MGDA with ``norm_type="l2"`` looks only at
the gradients' directions.

Run:  python examples/quickstart.py            (make demo runs this)
      python examples/quickstart.py --steps 20  (fast)
"""

import argparse

import jax
import jax.numpy as jnp
import optax

import optax_balance as ob


def make_data(key, n=256, d=8):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, d))
    w_true = jax.random.normal(kw, (3, d))
    y = jnp.tanh(x @ w_true.T) * jnp.array([1.0, 10.0, 100.0])  # task scales differ
    return x, y


def init_params(key, d=8, hidden=32):
    k1, k2 = jax.random.split(key)
    return {
        "trunk": jax.random.normal(k1, (d, hidden)) / jnp.sqrt(d),
        "heads": jax.random.normal(k2, (3, hidden)) / jnp.sqrt(hidden),
    }


def task_losses(params, x, y):
    h = jnp.tanh(x @ params["trunk"])  # shared representation
    pred = h @ params["heads"].T  # one output per task
    return jnp.mean((pred - y) ** 2, axis=0)  # (T,) = (3,)


def main(steps: int = 300) -> None:
    x, y = make_data(jax.random.key(0))
    params = init_params(jax.random.key(1))
    # The trunk is shared; each head row belongs to one task, so heads are summed as usual.
    shared = {"trunk": True, "heads": False}
    tx = optax.chain(ob.mgda(norm_type="l2", shared=shared), optax.adam(1e-2))
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state):
        losses, grads = ob.value_and_task_grads(task_losses)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), opt_state, losses

    first = None
    for step in range(steps + 1):
        params, opt_state, losses = train_step(params, opt_state)
        first = losses if first is None else first
        if step % max(steps // 6, 1) == 0:
            w = ob.task_weights(opt_state)
            print(
                f"step {step:4d}  losses "
                + " ".join(f"{v:10.4f}" for v in losses)
                + "   task weights "
                + " ".join(f"{v:.3f}" for v in w)
            )
    print("relative loss (final / first):", [round(float(v), 3) for v in losses / first])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    main(parser.parse_args().steps)
