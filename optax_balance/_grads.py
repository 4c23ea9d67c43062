"""Getting stacked per-task gradients, and reading task weights back out of a state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def value_and_task_grads(
    fn: Callable[..., Any], has_aux: bool = False
) -> Callable[..., tuple[Any, PyTree]]:
    r"""Per-task losses and their stacked gradients, from one forward pass.

    For ``fn(params, *args) -> losses`` with ``losses`` of shape ``(T,)``, the returned
    function gives ``(losses, grads)`` where each leaf of ``grads`` has shape
    ``(T, *param_leaf.shape)``: row :math:`i` is :math:`\nabla_\theta L_i(\theta)`. This
    is the reverse-mode Jacobian, computed as one forward pass (``jax.vjp``) and T
    vectorised backward passes (``jax.vmap`` over the rows of the identity), exactly what
    every method of this library takes as ``updates``.

    Args:
      fn: ``fn(params, *args, **kwargs)`` returning a ``(T,)`` array of losses, or
        ``(losses, aux)`` when ``has_aux``.
      has_aux: whether ``fn`` returns auxiliary data.

    Returns:
      A function with ``fn``'s signature returning ``(losses, grads)`` or
      ``((losses, aux), grads)``.

    Raises:
      ValueError: (when called) if ``fn`` does not return a 1-D array of losses.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> def losses(w, x):
      ...     return jnp.stack([jnp.sum(w * x), jnp.sum(w ** 2)])
      >>> vals, grads = ob.value_and_task_grads(losses)(jnp.array([1.0, 2.0]), 3.0)
      >>> vals
      Array([9., 5.], dtype=float32)
      >>> grads
      Array([[3., 3.],
             [2., 4.]], dtype=float32)
    """

    def wrapped(params: PyTree, *args: Any, **kwargs: Any) -> tuple[Any, PyTree]:
        def f(p: PyTree) -> Any:
            return fn(p, *args, **kwargs)

        if has_aux:
            losses, vjp_fn, aux = jax.vjp(f, params, has_aux=True)
        else:
            losses, vjp_fn = jax.vjp(f, params)
            aux = None
        if not hasattr(losses, "ndim") or losses.ndim != 1:
            raise ValueError(
                "value_and_task_grads: `fn` must return a 1-D array of per-task losses of "
                f"shape (T,), got {getattr(losses, 'shape', type(losses))}."
            )
        basis = jnp.eye(losses.shape[0], dtype=losses.dtype)
        (grads,) = jax.vmap(vjp_fn)(basis)
        return ((losses, aux), grads) if has_aux else (losses, grads)

    return wrapped


def _is_balancing_state(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields") and "weights" in x._fields


def task_weights(opt_state: Any) -> jax.Array:
    """The ``(T,)`` task weights of the balancing state inside any optax state.

    Searches a (chained, nested, wrapped) optimizer state for the first NamedTuple with a
    ``weights`` field, the field every balancing method's state has: the weight each
    task's gradient received in the last update (for GradNorm: the learned weights the
    next update applies). Flax NNX ``Variable`` wrappers are unwrapped.

    Args:
      opt_state: an optax state, e.g. of ``optax.chain(ob.mgda(), optax.adam(1e-3))``,
        or ``nnx.Optimizer.opt_state``.

    Returns:
      The ``(T,)`` weights array.

    Raises:
      ValueError: if the state holds no balancing state.

    Examples:
      >>> import jax.numpy as jnp, optax, optax_balance as ob
      >>> tx = optax.chain(ob.mgda(), optax.sgd(0.1))
      >>> params = jnp.zeros(3)
      >>> grads = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> _, state = tx.update(grads, tx.init(params), params)
      >>> ob.task_weights(state)
      Array([0.6, 0.4], dtype=float32)
    """
    found = [
        x
        for x in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_balancing_state)
        if _is_balancing_state(x)
    ]
    if not found:
        raise ValueError(
            "task_weights: no balancing state (a NamedTuple with a `weights` field) was found "
            "in this optimizer state; build the optimizer with an optax_balance method, e.g. "
            "optax.chain(ob.mgda(), optax.adam(1e-3))."
        )
    w = found[0].weights
    if not isinstance(w, jax.Array):  # flax.nnx Variable (`.value` is deprecated in 0.12)
        if hasattr(w, "get_value"):
            w = w.get_value()
        elif hasattr(w, "value"):
            w = w.value
    return w
