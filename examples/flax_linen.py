"""Flax Linen: a shared trunk with one head per task, trained with a ``TrainState``.

The same problem as ``flax_nnx.py`` (three regression tasks whose targets differ 1x, 10x
and 100x in scale), written with ``flax.linen`` and ``flax.training.train_state``. It
shows:

* a ``linen`` module whose parameter tree has a ``trunk`` subtree and one ``head_<i>``
  subtree per task;
* the ``shared`` mask as a callable over the parameter paths (everything whose name
  starts with ``head_`` is task-specific: summed, left out of the balancing);
* per-task losses and stacked per-task gradients with ``ob.value_and_task_grads`` (one
  forward pass);
* the update. ``TrainState.apply_gradients(grads=..., **kwargs)`` does NOT forward extra
  keywords to ``tx.update`` (its kwargs replace dataclass fields), so methods that need
  ``task_losses`` (GradNorm, MGDA with ``norm_type="loss"``) cannot get them through it.
  The idiom: a ``TrainState`` subclass with an ``apply_task_gradients`` method that calls
  ``tx.update(grads, opt_state, params, task_losses=...)`` itself. (For methods that
  ignore the losses, plain ``apply_gradients(grads=stacked_grads)`` also works.)
* the task weights logged with ``ob.task_weights(state.opt_state)``.

Here the method is GradNorm, which needs the losses: it learns task weights (summing to
T) that equalise the tasks' training rates, so the 100x task's weight falls towards 0.

Run:  python examples/flax_linen.py             (about 10 s on a laptop CPU)
      python examples/flax_linen.py --steps 20  (fast)
Needs flax (``pip install -e ".[examples]"``).
"""

import argparse
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

import optax_balance as ob

SCALES = (1.0, 10.0, 100.0)  # one target scale per task


class MultiTaskMLP(nn.Module):
    """A shared two-layer trunk and one linear head per task."""

    hidden: int
    num_tasks: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Trunk(self.hidden, name="trunk")(x)
        outs = [nn.Dense(1, name=f"head_{i}")(h) for i in range(self.num_tasks)]
        return jnp.concatenate(outs, axis=-1)  # (B, T)


class Trunk(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.gelu(nn.Dense(self.hidden)(x))
        return nn.gelu(nn.Dense(self.hidden)(x))


def shared_mask(params: Any) -> Any:
    """True (shared) for the trunk, False for every ``head_<i>`` subtree.

    Linen parameters are nested dicts, e.g. ``{"params": {"trunk": ..., "head_0": ...}}``;
    the mask is the same tree of bools, computed from each leaf's key path.
    """

    def is_shared(path: tuple, _: Any) -> bool:
        names = [getattr(k, "key", "") for k in path]
        return not any(str(n).startswith("head_") for n in names)

    return jax.tree_util.tree_map_with_path(is_shared, params)


class BalancedTrainState(train_state.TrainState):
    """A ``TrainState`` whose update passes the per-task losses on to ``tx.update``."""

    def apply_task_gradients(self, *, grads: Any, task_losses: jax.Array) -> "BalancedTrainState":
        updates, opt_state = self.tx.update(
            grads, self.opt_state, self.params, task_losses=task_losses
        )
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            opt_state=opt_state,
        )


def make_data(key: jax.Array, n: int = 512, d: int = 8) -> tuple[jax.Array, jax.Array]:
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, d))
    w = jax.random.normal(kw, (len(SCALES), d)) / jnp.sqrt(d)
    y = jnp.sin(2.0 * x @ w.T) * jnp.array(SCALES)  # (n, T)
    return x, y


def main(steps: int = 600) -> None:
    x, y = make_data(jax.random.key(0))
    model = MultiTaskMLP(hidden=64, num_tasks=len(SCALES))
    params = model.init(jax.random.key(1), x[:1])
    tx = optax.chain(
        ob.gradnorm(len(SCALES), alpha=1.5, shared=shared_mask),  # needs task_losses
        optax.adam(3e-3),
    )
    state = BalancedTrainState.create(apply_fn=model.apply, params=params, tx=tx)

    def per_task_losses(params: Any) -> jax.Array:
        return jnp.mean((state.apply_fn(params, x) - y) ** 2, axis=0)  # (T,)

    @jax.jit
    def train_step(state: BalancedTrainState) -> tuple[BalancedTrainState, jax.Array]:
        losses, grads = ob.value_and_task_grads(per_task_losses)(state.params)
        return state.apply_task_gradients(grads=grads, task_losses=losses), losses

    first = per_task_losses(state.params)
    for step in range(1, steps + 1):
        state, losses = train_step(state)
        if step % max(steps // 6, 1) == 0 or step == steps:
            w = ob.task_weights(state.opt_state)
            print(
                f"step {step:4d}  loss / initial "
                + " ".join(f"{v:7.4f}" for v in losses / first)
                + "   task weights "
                + " ".join(f"{v:.3g}" for v in w)
            )
    final = per_task_losses(state.params)
    print("final relative losses:", [round(float(v), 4) for v in final / first])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps")
    main(parser.parse_args().steps)
