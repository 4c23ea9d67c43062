"""Multi-digit classification (a small MultiMNIST) from scikit-learn's bundled digits.

Each input overlays two 8x8 handwritten digits from ``sklearn.datasets.load_digits``
(shipped with scikit-learn, no download): the first shifted to the left, the second to
the right, on an 8x12 canvas (pixel-wise max, so they overlap in the middle 4 columns).
Task 0 names the left digit, task 1 the right digit; a shared MLP trunk feeds one softmax
head per task. Task 1's cross-entropy is multiplied by ``--scale`` (default 100), as
happens when two losses are reduced differently (a sum over the batch next to a mean) or
measured in different units: with equal weights the trunk then learns for task 1 only.

Every method trains the same model from the same initialisation on the same batches
(Adam); the pairs of the test set are made from images never seen in training. Two kinds
of method are compared side by side:

* gradient-based (MGDA, GradNorm, the balancer, MetaBalance, equal weights): the T
  per-task gradients (``ob.value_and_task_grads``, T backward passes) go to ``update``;
* loss-based (UW, IMTL-L, FAMO, GLS, DWA, RLW): their weights need only the T
  losses, so one backward pass of ``ob.weighted_loss(method, losses, opt_state)`` gives
  the update; ``update`` passes that gradient through and advances the method's state.

The printed table gives each task's test accuracy, what the method needs, and the time
per training step (the compiled loop's run time over its steps, compilation excluded).

Run:  python examples/multi_digits.py              (a minute or two on 2 CPU cores)
      python examples/multi_digits.py --steps 30   (fast)
      python examples/multi_digits.py --scale 1    (tasks on equal footing)
Needs scikit-learn (``pip install -e ".[examples]"``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_balance as ob

SHIFT = 4  # the right digit starts 4 columns to the right: canvas 8 x 12


def load_pairs(seed: int = 0) -> tuple[np.ndarray, ...]:
    """Train/test inputs (n, 96) and labels (n, 2), from disjoint halves of the images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    labels = digits.target
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    train_idx, test_idx = order[:1200], order[1200:]

    def pairs(idx: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = rng.choice(idx, n), rng.choice(idx, n)
        canvas = np.zeros((n, 8, 8 + SHIFT), np.float32)
        canvas[:, :, :8] = images[a]
        canvas[:, :, SHIFT:] = np.maximum(canvas[:, :, SHIFT:], images[b])
        return canvas.reshape(n, -1), np.stack([labels[a], labels[b]], axis=1)

    return (*pairs(train_idx, 8000), *pairs(test_idx, 2000))


def init_params(key: jax.Array, din: int, hidden: int = 64) -> dict[str, Any]:
    def dense(k, i, o):
        return {"w": jax.random.normal(k, (i, o)) * jnp.sqrt(2.0 / i), "b": jnp.zeros(o)}

    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "trunk": [dense(k1, din, hidden), dense(k2, hidden, hidden)],
        "heads": [dense(k3, hidden, 10), dense(k4, hidden, 10)],  # one per task
    }


def logits(params: dict[str, Any], x: jax.Array) -> list[jax.Array]:
    h = x
    for layer in params["trunk"]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return [h @ head["w"] + head["b"] for head in params["heads"]]


def make_losses(scale: float) -> Callable[..., jax.Array]:
    def task_losses(params: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
        ce = [
            optax.softmax_cross_entropy_with_integer_labels(lg, y[:, t]).mean()
            for t, lg in enumerate(logits(params, x))
        ]
        return jnp.stack([ce[0], scale * ce[1]])  # (T,) = (2,)

    return task_losses


def accuracy(params: dict[str, Any], x: jax.Array, y: jax.Array) -> np.ndarray:
    return np.array(
        [float(jnp.mean(lg.argmax(-1) == y[:, t])) for t, lg in enumerate(logits(params, x))]
    )


SHARED = {"trunk": True, "heads": False}  # heads are task-specific


def methods() -> dict[str, tuple[str, Callable[[], Any]]]:
    """The methods compared, by display name: (what they need, factory); missing ones skipped.

    "grads": the T per-task gradients; "losses": the T losses only (one backward pass).
    """
    epoch = 8000 // 128  # DWA's period: one epoch of batches, as in the paper
    candidates: dict[str, tuple[str, str, Callable[[], Any]]] = {
        "equal weights": (
            "grads",
            "balancer",
            lambda: ob.balancer([1.0, 1.0], balance_grads=False, shared=SHARED),
        ),
        "MGDA": ("grads", "mgda", lambda: ob.mgda(shared=SHARED, num_tasks=2)),
        "GradNorm": ("grads", "gradnorm", lambda: ob.gradnorm(2, shared=SHARED)),
        "balancer": ("grads", "balancer", lambda: ob.balancer([1.0, 1.0], shared=SHARED)),
        "MetaBalance": (
            "grads",
            "metabalance",
            lambda: ob.metabalance(main_task=0, shared=SHARED, num_tasks=2),
        ),
        "UW": ("losses", "uw", lambda: ob.uw(2)),
        "IMTL-L": ("losses", "imtl_l", lambda: ob.imtl_l(2)),
        "FAMO": ("losses", "famo", lambda: ob.famo(2)),
        "GLS": ("losses", "gls", lambda: ob.gls(num_tasks=2)),
        "DWA": ("losses", "dwa", lambda: ob.dwa(every=epoch, num_tasks=2)),
        "RLW": ("losses", "rlw", lambda: ob.rlw(num_tasks=2)),
    }
    out = {}
    for name, (kind, attr, make) in candidates.items():
        if hasattr(ob, attr):
            out[name] = (kind, make)
        else:
            print(f"note: ob.{attr} is not in this version of optax_balance; skipping {name}")
    return out


def train(
    balance: optax.GradientTransformationExtraArgs,
    kind: str,
    params: dict[str, Any],
    task_losses: Callable[..., jax.Array],
    x: jax.Array,
    y: jax.Array,
    steps: int,
    batch: int = 128,
    lr: float = 1e-3,
) -> tuple[dict[str, Any], jax.Array, float]:
    """Trains with ``balance``; returns the params, the final weights and seconds per step."""
    tx = optax.chain(balance, optax.adam(lr))

    def step(carry, key):
        params, opt_state = carry
        idx = jax.random.randint(key, (batch,), 0, x.shape[0])
        if kind == "grads":  # T backward passes: the stacked per-task gradients
            losses, grads = ob.value_and_task_grads(task_losses)(params, x[idx], y[idx])
        else:  # one backward pass of the weighted loss

            def loss_fn(p):
                losses = task_losses(p, x[idx], y[idx])
                return ob.weighted_loss(balance, losses, opt_state), losses

            (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
        return (optax.apply_updates(params, updates), opt_state), None

    keys = jax.random.split(jax.random.key(2), steps)
    # Every method is built with its task count, so its state has its final shape from
    # `init` and the whole training is one compiled lax.scan, timed apart from compiling.
    carry = (params, tx.init(params))
    loop = jax.jit(lambda c, ks: jax.lax.scan(step, c, ks)).lower(carry, keys).compile()
    t0 = time.perf_counter()
    (params, opt_state), _ = jax.block_until_ready(loop(carry, keys))
    per_step = (time.perf_counter() - t0) / steps
    return params, ob.task_weights(opt_state), per_step


def main(steps: int = 3000, scale: float = 100.0) -> None:
    x_tr, y_tr, x_te, y_te = (jnp.asarray(a) for a in load_pairs())
    params0 = init_params(jax.random.key(1), x_tr.shape[1])
    task_losses = make_losses(scale)
    print(
        f"{x_tr.shape[0]} training pairs, {x_te.shape[0]} test pairs, {steps} steps; "
        f"task 1's loss is scaled by {scale:g}"
    )
    print(
        f"{'method':<15}{'left acc':>10}{'right acc':>11}{'mean':>8}   {'needs':<8}"
        f"{'ms/step':>8}   final weights"
    )
    for name, (kind, make) in methods().items():
        params, weights, per_step = train(make(), kind, params0, task_losses, x_tr, y_tr, steps)
        acc = accuracy(params, x_te, y_te)
        w = " ".join(f"{v:.3g}" for v in np.asarray(weights))
        print(
            f"{name:<15}{acc[0]:>10.3f}{acc[1]:>11.3f}{acc.mean():>8.3f}   {kind:<8}"
            f"{per_step * 1e3:>8.3f}   {w}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="training steps per method")
    parser.add_argument("--scale", type=float, default=100.0, help="factor on task 1's loss")
    args = parser.parse_args()
    main(args.steps, args.scale)
