"""``ob.weighted_loss``: the one loss to differentiate for a loss-based method."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_balance import _core
from optax_balance._grads import task_weights


def _is_variable(x: Any) -> bool:
    """A Flax NNX ``Variable`` (``nnx.Optimizer.opt_state`` wraps every array in one)."""
    return not isinstance(x, jax.Array) and hasattr(x, "get_value") and hasattr(x, "set_value")


def _unwrap(tree: Any) -> Any:
    """``tree`` with every NNX ``Variable`` replaced by the array it holds."""
    return jax.tree.map(
        lambda x: x.get_value() if _is_variable(x) else x, tree, is_leaf=_is_variable
    )


def _subtrees(tree: Any, match: Any) -> list[Any]:
    """The outermost subtrees of ``tree`` for which ``match`` holds."""
    nodes = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: x is not None and match(x))
    return [x for x in nodes if match(x)]


def _not_found(what: str, count: int) -> ValueError:
    if count == 0:
        return ValueError(
            f"weighted_loss: no {what} state in `opt_state`: pass the state of the optimizer "
            "built with this very method (e.g. the state of optax.chain(method, "
            "optax.adam(1e-3)), a TrainState's opt_state, or nnx.Optimizer.opt_state)."
        )
    return ValueError(
        f"weighted_loss: `opt_state` holds {count} {what} states, so which one this method "
        "owns is ambiguous: pass the method's own state (e.g. opt_state[0] of an "
        "optax.chain) instead."
    )


def _weights_of_weighting(
    weighting: _core.Weighting,
    axis_name: Any,
    losses: jax.Array,
    opt_state: Any,
    extra_args: dict[str, Any],
) -> jax.Array:
    if not weighting.losses_only:
        raise ValueError(
            f"weighted_loss: {weighting.name} reads gradient statistics {weighting.needs}, not "
            "the losses alone, so one backward pass of a weighted loss cannot give its "
            "update: pass it stacked gradients (ob.value_and_task_grads) instead."
        )
    cls = type(jax.eval_shape(lambda: weighting.init(0)))
    found = _subtrees(_unwrap(opt_state), lambda x: type(x) is cls)
    if len(found) != 1:
        raise _not_found(f"{weighting.name} ({cls.__name__})", len(found))
    state = found[0]
    # What ``update`` does with the same losses and state: the same statistics (losses
    # and extra vectors, averaged over ``axis_name``), the same placeholder rule, and the
    # same guarded weighting; so ``state.weights`` after ``update`` equals these weights.
    stats = _core.loss_stats(weighting, losses, extra_args, axis_name=axis_name)
    t = int(losses.shape[0])
    state_t = int(np.shape(state.weights)[0])
    if state_t == 0:
        if weighting.init_takes_params:
            raise ValueError(
                f"weighted_loss: the {weighting.name} state is a placeholder and its init "
                "needs the params: build the method with num_tasks=T."
            )
        state = weighting.init(t)
    elif state_t != t:
        raise ValueError(
            f"weighted_loss: the {weighting.name} state holds weights for {state_t} tasks but "
            f"`task_losses` has T={t}."
        )
    weights, _ = _core.guarded_weigh(weighting, stats, state)
    return weights


def _weights_of_transform(
    tx: Any, losses: jax.Array, opt_state: Any, extra_args: dict[str, Any]
) -> jax.Array:
    """Any other transformation holding one loss-based method (``inject_hyperparams``).

    Its state is found by structure and its ``update`` runs on a scalar placeholder
    gradient (an ordinary gradient: passed through), which leaves the weights it used in
    the new state.
    """
    dummy = jnp.zeros((), _core.stat_dtype())
    target = jax.tree.structure(jax.eval_shape(tx.init, dummy))
    found = _subtrees(_unwrap(opt_state), lambda x: jax.tree.structure(x) == target)
    if len(found) != 1:
        raise _not_found("matching", len(found))
    _, new_state = tx.update(dummy, found[0], dummy, task_losses=losses, **extra_args)
    return task_weights(new_state)


def weighted_loss(
    method: optax.GradientTransformation | _core.Weighting,
    task_losses: Any,
    opt_state: Any,
    **extra_args: Any,
) -> jax.Array:
    r"""The loss whose gradient is a loss-based method's update: :math:`\sum_i sg(w_i) L_i`.

    A loss-based method (``ob.uw``, ``ob.famo``, ``ob.dwa``, ...) weighs the T losses
    with weights :math:`w` computed from the losses and its state alone, so its update
    :math:`\sum_i w_i \nabla L_i` is the gradient of ONE scalar, and one backward pass
    gives it, whatever T (a gradient-based method needs the T gradients):

    .. math::

      \mathcal L_w(\theta) = \sum_{i=1}^T \mathrm{sg}(w_i)\, L_i(\theta), \qquad
      \nabla_\theta \mathcal L_w = \sum_i w_i\, \nabla_\theta L_i ,

    where :math:`\mathrm{sg}` stops gradients: the weights are constants of the step, as
    in every published implementation. For a method defined by a scalarisation
    :math:`S(L)` (GLS, FAMO, STCH, COSMOS, PBI), :math:`w = \partial S / \partial L` at
    this step's losses, so :math:`\nabla \mathcal L_w = \nabla S(L(\theta))`; the value
    is :math:`\sum_i w_i L_i`, not :math:`S`.

    The method's state is found inside ``opt_state``: any nesting of ``optax.chain``,
    ``optax.inject_hyperparams``, ``optax.MultiSteps``, a Flax Linen ``TrainState``, or
    ``nnx.Optimizer.opt_state`` (whose variables are unwrapped). The weights are computed
    from ``task_losses`` and that state exactly as the method's ``update`` computes them
    (losses averaged over the method's ``axis_name`` first, the same non-finite guard),
    and ``update`` is then called on the gradient of this loss (an ordinary, unstacked
    gradient) with the same ``task_losses``: it returns the gradient unchanged, without
    reading it, and advances the state, whose ``weights`` are the weights used here. A
    step with non-finite losses keeps the previous state, and weighs with the previous
    weights here too; a non-finite gradient is left to ``optax.apply_if_finite``
    downstream (the state never reads it).

    Under ``optax.MultiSteps`` the state advances once every k micro-steps (with the last
    micro-step's losses); the micro-steps in between weigh their losses with that state.

    Args:
      method: the loss-based transformation as its factory returned it (``ob.famo(3)``,
        whose ``axis_name`` is used), or its weighting (``ob.weightings.famo(3)``). Any
        other optax transformation holding exactly one loss-based method and whose state
        does not depend on the params' structure (``optax.inject_hyperparams(ob.famo,
        static_args=("num_tasks",))(num_tasks=3)``) works too: its ``update`` is run on a
        scalar placeholder to read the weights.
      task_losses: ``(T,)`` this step's losses, differentiable (the function of the
        parameters being trained).
      opt_state: the optimizer state holding the method's state.
      **extra_args: keywords the method reads besides the losses, passed to its
        ``update`` as well (FAMO's ``losses_after``); others are ignored.

    Returns:
      The scalar :math:`\sum_i \mathrm{sg}(w_i) L_i`, in the promoted dtype of the losses
      and the float32 weights.

    Raises:
      ValueError: if ``task_losses`` is not 1-D, if the method reads gradient statistics
        (no weighted loss gives its update), or if ``opt_state`` holds no (or several)
        states of this method.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, optax_balance as ob
      >>> uw = ob.uw(2, weight_optimizer=optax.sgd(0.1))
      >>> tx = optax.chain(uw, optax.sgd(0.5))
      >>> params = jnp.array([1.0, 2.0])
      >>> opt_state = tx.init(params)
      >>> def task_losses(p):
      ...     return jnp.stack([p[0] ** 2, 4.0 * p[1] ** 2])         # [1, 16]
      >>> def loss_fn(p):
      ...     losses = task_losses(p)
      ...     return ob.weighted_loss(uw, losses, opt_state), losses  # 0.5 L_1 + 0.5 L_2
      >>> (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      >>> loss, grads                                               # 0.5 [2 p_0, 8 p_1]
      (Array(8.5, dtype=float32), Array([1., 8.], dtype=float32))
      >>> updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)
      >>> updates                                                   # passed through, then sgd
      Array([-0.5, -4. ], dtype=float32)
      >>> ob.task_weights(opt_state)                                # the weights used
      Array([0.5, 0.5], dtype=float32)

    References:
      Liu, Liu, Ye & Liu, `FAMO: Fast Adaptive Multitask Optimization
      <https://arxiv.org/abs/2306.03792>`_, NeurIPS 2023 (Sec. 3: a loss-based update
      at the cost of one backward pass, O(1) in T).
    """
    losses = jnp.asarray(task_losses)
    if losses.ndim != 1 or losses.shape[0] == 0:
        raise ValueError(
            f"weighted_loss: `task_losses` must be a 1-D array of T >= 1 per-task losses, got "
            f"shape {losses.shape}."
        )
    constant = jax.lax.stop_gradient(losses)
    extra = {
        k: jax.lax.stop_gradient(v) if isinstance(v, jax.Array | np.ndarray) else v
        for k, v in extra_args.items()
        if v is not None
    }
    if isinstance(method, _core.Weighting):
        weights = _weights_of_weighting(method, None, constant, opt_state, extra)
    elif isinstance(method, _core.BalancedTransform) and hasattr(method, "weighting"):
        weights = _weights_of_weighting(
            method.weighting, method.axis_name, constant, opt_state, extra
        )
    elif hasattr(method, "init") and hasattr(method, "update"):
        weights = _weights_of_transform(method, constant, opt_state, extra)
    else:
        raise ValueError(
            "weighted_loss: `method` must be a loss-based method as its factory returned it "
            f"(e.g. ob.famo(3)) or its weighting (ob.weightings.famo(3)); got {method!r}."
        )
    return jnp.sum(jax.lax.stop_gradient(weights) * losses)
