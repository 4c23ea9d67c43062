"""Quickstart: three regression tasks of very different scales, a plain sum against balancing.

The tasks share a hidden layer; their targets differ 1x, 10x and 100x in scale, so task 2's
gradient is about 100 times task 0's. The same model is trained three ways, each with
``optax.chain(<method>, optax.adam(1e-2))`` under ``jax.jit``, per-task losses and stacked
gradients from one forward pass (``ob.value_and_task_grads``), and the task weights read
back with ``ob.task_weights``; ``ob.conflict_stats`` first shows the task gradients' norms
on the shared layer:

* the plain sum of the task gradients (the gradient of the summed loss): the baseline;
* MGDA with ``norm_type="l2"``: its weights are found on unit-normalised gradients but
  applied to the raw ones, so task 2's 100x larger gradient still sets the direction and
  it ends where the plain sum does;
* the EnCodec loss balancer: each task's raw gradient is rescaled to the same share of the
  update's norm, so the small tasks are no longer drowned.

It prints the task gradients' norms on the trunk at the start (about 1 : 9 : 88) and each
task's final loss relative to its first (lower is better). With the default 300 steps:
plain sum ``[0.800, 0.791, 0.018]``, MGDA (l2) ``[0.834, 0.792, 0.017]``,
balancer ``[0.001, 0.008, 0.030]``.

Run:  python examples/quickstart.py            (make demo runs this)
      python examples/quickstart.py --steps 20  (fast)
"""

import argparse

import jax
import jax.numpy as jnp
import optax

import optax_balance as ob

SCALES = (1.0, 10.0, 100.0)
T = len(SCALES)


def make_data(key, n=256, d=8):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, d))
    w_true = jax.random.normal(kw, (T, d))
    y = jnp.tanh(x @ w_true.T) * jnp.array(SCALES)  # task scales differ
    return x, y


def init_params(key, d=8, hidden=32):
    k1, k2 = jax.random.split(key)
    return {
        "trunk": jax.random.normal(k1, (d, hidden)) / jnp.sqrt(d),
        "heads": jax.random.normal(k2, (T, hidden)) / jnp.sqrt(hidden),
    }


def task_losses(params, x, y):
    h = jnp.tanh(x @ params["trunk"])  # shared representation
    pred = h @ params["heads"].T  # one output per task
    return jnp.mean((pred - y) ** 2, axis=0)  # (T,) = (3,)


def train(balance, x, y, steps):
    """Trains from the same start; returns (final / first losses, last task weights)."""
    params = init_params(jax.random.key(1))
    tx = optax.chain(balance, optax.adam(1e-2))
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state):
        losses, grads = ob.value_and_task_grads(task_losses)(params, x, y)  # leaves (T, ...)
        updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), opt_state, losses

    first = task_losses(params, x, y)
    for _ in range(steps + 1):
        params, opt_state, losses = train_step(params, opt_state)
    return losses / first, ob.task_weights(opt_state)


def main(steps: int = 300) -> None:
    x, y = make_data(jax.random.key(0))
    # The trunk is shared; each head row belongs to one task: heads are summed, not balanced.
    shared = {"trunk": True, "heads": False}
    methods = {
        # sum_i g_i: the gradient of the summed loss, as a "method" so the loop is the same.
        "plain sum": ob.balancer([1.0] * T, balance_grads=False, shared=shared),
        # num_tasks: the state has its full shape from `init` (one compile, checkpointable).
        "MGDA (l2)": ob.mgda(norm_type="l2", shared=shared, num_tasks=T),
        "balancer": ob.balancer([1.0] * T, shared=shared),  # T from the weights
    }
    # Why the plain sum struggles: the task gradients on the shared trunk, at the start.
    _, grads = ob.value_and_task_grads(task_losses)(init_params(jax.random.key(1)), x, y)
    stats = ob.conflict_stats(grads, shared=shared)
    print(
        "task gradient norms on the trunk at the start "
        + "[" + ", ".join(f"{float(v):.3g}" for v in stats.norms) + "]"
        + f", {int(stats.num_conflicts)} conflicting pairs of {T * (T - 1) // 2}"
    )  # fmt: skip
    print(f"{steps} steps; task scales {SCALES}; relative loss = final / first, lower is better")
    for name, balance in methods.items():
        rel, weights = train(balance, x, y, steps)
        print(
            f"{name:10s}  relative losses "
            + "[" + ", ".join(f"{float(v):.3f}" for v in rel) + "]"
            + "   task weights "
            + " ".join(f"{float(v):.3f}" for v in weights)
        )  # fmt: skip
    print(
        "MGDA (l2) finds its weights on unit-norm gradients but applies them to the raw ones,\n"
        "so task 2's 100x larger gradient still dominates; the balancer rescales each raw\n"
        "gradient to an equal share of the update."
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    main(parser.parse_args().steps)
