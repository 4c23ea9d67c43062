"""Flax NNX: a shared trunk with one head per task, balanced inside ``nnx.Optimizer``.

Shows the pieces a Flax NNX project needs, in a form you can copy:

* an ``nnx.Module`` with a shared trunk and T task heads (``nnx.List``);
* the ``shared`` mask built from the module's structure: ``nnx.map_state`` over the
  parameter paths marks everything under ``heads`` as task-specific (summed, left out of
  the balancing) and the trunk as shared;
* ``nnx.Optimizer(model, optax.chain(ob.balancer(...), optax.adam(...)), wrt=nnx.Param)``;
* per-task losses and stacked per-task gradients from the model's ``nnx.Param`` state,
  with one forward pass: ``nnx.split`` the model, ``nnx.merge`` it inside a function of
  the parameters, and ``ob.value_and_task_grads`` of that function;
* ``optimizer.update(model, grads, task_losses=losses)`` (``nnx.Optimizer`` forwards
  extra keywords to ``tx.update``), the whole step under ``nnx.jit``;
* the task weights logged with ``ob.task_weights(optimizer.opt_state)`` (it unwraps the
  ``nnx`` variables the optimizer keeps its state in).

The three regression tasks share inputs but their targets differ 1x, 10x and 100x in
scale. Summed, the 100x task would own the trunk; the EnCodec balancer gives each task an
equal share of the trunk's gradient norm instead, so all three relative losses fall.

Run:  python examples/flax_nnx.py             (about 10 s on a laptop CPU)
      python examples/flax_nnx.py --steps 20  (fast)
Needs flax (``pip install -e ".[examples]"``).
"""

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optax_balance as ob

SCALES = (1.0, 10.0, 100.0)  # one target scale per task


class MultiTaskMLP(nnx.Module):
    """A shared two-layer trunk and one linear head per task."""

    def __init__(self, din: int, hidden: int, num_tasks: int, *, rngs: nnx.Rngs):
        self.trunk = nnx.Sequential(
            nnx.Linear(din, hidden, rngs=rngs),
            jax.nn.gelu,
            nnx.Linear(hidden, hidden, rngs=rngs),
            jax.nn.gelu,
        )
        self.heads = nnx.List([nnx.Linear(hidden, 1, rngs=rngs) for _ in range(num_tasks)])

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.trunk(x)
        return jnp.concatenate([head(h) for head in self.heads], axis=-1)  # (B, T)


def shared_mask(params: nnx.State) -> nnx.State:
    """True (shared) for the trunk's parameters, False for every task head's.

    ``nnx.map_state`` hands each leaf's path, e.g. ``('trunk', 'layers', 0, 'kernel')`` or
    ``('heads', 2, 'bias')``, so the mask follows the module's attribute names.
    """
    return nnx.map_state(lambda path, _: path[0] != "heads", params)


def make_data(key: jax.Array, n: int = 512, d: int = 8) -> tuple[jax.Array, jax.Array]:
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, d))
    w = jax.random.normal(kw, (len(SCALES), d)) / jnp.sqrt(d)
    y = jnp.sin(2.0 * x @ w.T) * jnp.array(SCALES)  # (n, T)
    return x, y


def per_task_losses(model: MultiTaskMLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((model(x) - y) ** 2, axis=0)  # (T,)


@nnx.jit
def train_step(model: MultiTaskMLP, optimizer: nnx.Optimizer, x, y) -> jax.Array:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def losses_of(params: nnx.State) -> jax.Array:
        return per_task_losses(nnx.merge(graphdef, params, rest), x, y)

    # losses: (T,); grads: the Param state with a leading task axis on every leaf.
    losses, grads = ob.value_and_task_grads(losses_of)(params)
    optimizer.update(model, grads, task_losses=losses)
    return losses


def main(steps: int = 600) -> None:
    x, y = make_data(jax.random.key(0))
    model = MultiTaskMLP(x.shape[1], 64, len(SCALES), rngs=nnx.Rngs(1))
    tx = optax.chain(
        ob.balancer([1.0] * len(SCALES), shared=shared_mask),  # equal share of the trunk
        optax.adam(3e-3),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    first = per_task_losses(model, x, y)
    for step in range(1, steps + 1):
        losses = train_step(model, optimizer, x, y)
        if step % max(steps // 6, 1) == 0 or step == steps:
            w = ob.task_weights(optimizer.opt_state)
            print(
                f"step {step:4d}  loss / initial "
                + " ".join(f"{v:7.4f}" for v in losses / first)
                + "   task weights "
                + " ".join(f"{v:.3g}" for v in w)
            )
    final = per_task_losses(model, x, y)
    print("final relative losses:", [round(float(v), 4) for v in final / first])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps")
    main(parser.parse_args().steps)
