"""Balancing at a shared representation: T cheap gradients, one backward pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def value_and_balanced_grad(
    encoder_fn: Callable[..., PyTree],
    heads_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    heads_in_axes: tuple[Any, ...] | None = None,
) -> Callable[..., tuple[Any, PyTree, optax.OptState]]:
    r"""Task losses and a parameter gradient balanced at the shared representation.

    The model is split at a representation :math:`z = E(\theta, x)` (an encoder's
    features, or the model's output itself) from which the T task losses
    :math:`L_i = H_i(\theta, z)` are computed. Instead of T backward passes through the
    encoder, this balances the T gradients with respect to :math:`z`, which are cheap
    when the heads are small, and runs one backward pass through the encoder:

    .. math::

      (d, s') = \mathrm{tx.update}\big([\partial L_i/\partial z]_{i=1}^T,\, s\big),
      \qquad
      \nabla = J_E(\theta)^\top d \;+\; \sum_i \partial H_i/\partial\theta ,

    where the first term is the encoder's VJP of the combined representation gradient
    :math:`d` (for a weighting method, :math:`d = \sum_i c_i\, \partial L_i/\partial z`)
    and the second the heads' direct parameter gradients, summed over tasks as usual (a
    parameter of head :math:`i` only gets task :math:`i`'s gradient). This is how the
    EnCodec loss balancer works (:math:`z` is the model output, the losses have no
    parameters) and what Sener & Koltun call MGDA-UB (MGDA on the gradients with respect
    to the encoder's output, which minimises an upper bound of the parameter-level MGDA
    objective, since :math:`\|\sum_i \alpha_i \nabla_\theta L_i\| \le \|\partial z/\partial
    \theta\|\, \|\sum_i \alpha_i \nabla_z L_i\|`).

    Cost: one forward pass, ``tx.update`` on arrays of the size of :math:`T \times z`,
    ONE backward pass through the encoder whatever T, and the T gradients with respect
    to :math:`z`. In general these are the heads' backward pass vectorised over the T
    rows of the identity (as :func:`optax_balance.value_and_task_grads`), i.e. T times
    the cost of all heads' backward pass: negligible for losses that are small functions
    of :math:`z`, but for T heads stacked in one tensor it grows as :math:`T^2`. When
    every task has its own head, pass ``heads_in_axes`` and write ``heads_fn`` for ONE
    task: task :math:`i`'s gradient then goes through head :math:`i` only
    (``jax.vmap(jax.grad(heads_fn))``), which is the per-task backward pass of the
    original MGDA-UB and costs one backward pass through all heads in total.

    ``tx`` is any balancing method of this library, used on its own (not chained with an
    optimizer: it acts on representation gradients, the optimizer on parameter gradients).
    It is called as ``tx.update(rep_grads, tx_state, z, task_losses=losses)`` where
    ``rep_grads`` has :math:`z`'s structure with leaves of shape ``(T, *z_leaf.shape)``.
    A representation's leading axis is usually the batch, so the leaves are
    ``(T, B, ...)``: exactly what ``ob.balancer(..., per_batch_item=True)`` expects, the
    EnCodec default in this mode (the norm of each loss's gradient is the mean over
    batch items of the per-item norm). Initialise its state with ``tx.init(z_like)``,
    ``z_like`` anything with :math:`z`'s structure, e.g.
    ``jax.eval_shape(encoder_fn, params, batch)``; ``shared`` masks, if any, refer to
    :math:`z`'s structure.

    Parameters are one pytree handed to both functions, so any split works: a dict
    ``{"encoder": ..., "heads": ...}`` with each function reading its part, a tuple
    ``(encoder_params, head_params)``, or a Flax module's parameters; the returned
    gradient has that structure, ready for the optimizer. A leaf read only by the
    encoder gets only the balanced term, a leaf read only by the heads only the summed
    term.

    Args:
      encoder_fn: ``encoder_fn(params, *args, **kwargs) -> z``, a pytree of arrays.
      heads_fn: ``heads_fn(params, z, *args, **kwargs) -> losses`` of shape ``(T,)``, or
        ``(losses, aux)`` when ``has_aux``. It receives the same ``*args`` and ``**kwargs``
        as ``encoder_fn`` (e.g. the whole batch, inputs and targets).
      tx: the balancing transformation, e.g. ``ob.balancer(weights,
        per_batch_item=True)`` or ``ob.mgda()``.
      has_aux: whether ``heads_fn`` returns auxiliary data.
      heads_in_axes: ``None`` (default), or per-task heads: ``heads_fn(params, z, *args,
        **kwargs)`` then returns ONE task's scalar loss and is vmapped over the tasks
        with ``heads_in_axes`` as the ``in_axes`` of ``(params, *args)`` (``z`` and the
        keyword arguments are shared by all tasks), e.g. ``({"encoder": None, "heads":
        0}, 0)`` for stacked heads ``params["heads"]`` of shape ``(T, ...)`` and
        per-task targets of shape ``(T, ...)``. ``aux`` then carries a leading task axis.

    Returns:
      A function ``(params, tx_state, *args, **kwargs) -> (losses, grads, tx_state)``
      (``((losses, aux), grads, tx_state)`` with ``has_aux``): the ``(T,)`` losses, the
      parameter gradient with ``params``' structure and dtypes, and the next state of
      ``tx``. It is pure and can be jitted; thread ``tx_state`` through the train loop
      like any optimizer state.

    Raises:
      ValueError: (when called) if ``heads_fn`` does not return a 1-D array of losses.

    Examples:
      A linear encoder, two tasks; MGDA on the representation gradients (MGDA-UB):

      >>> import jax, jax.numpy as jnp, optax_balance as ob
      >>> params = {"enc": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "head": jnp.array(3.0)}
      >>> x = jnp.array([[1.0, 1.0]])                      # batch of one item
      >>> def encoder(p, x):
      ...     return x @ p["enc"]                          # z = [[1, 2]]
      >>> def heads(p, z, x):                              # dL/dz: [[1, 0]], [[0, 3]]
      ...     return jnp.stack([z[:, 0].sum(), p["head"] * z[:, 1].sum()])
      >>> tx = ob.mgda()
      >>> step = jax.jit(ob.value_and_balanced_grad(encoder, heads, tx))
      >>> state = tx.init(jax.eval_shape(encoder, params, x))
      >>> losses, grads, state = step(params, state, x)
      >>> losses
      Array([1., 6.], dtype=float32)
      >>> state.weights.round(4).tolist()                  # min-norm point: 9/10, 1/10
      [0.9, 0.1]
      >>> grads["enc"].round(4).tolist()                   # x^T [[0.9, 0.3]]
      [[0.9, 0.3], [0.9, 0.3]]
      >>> grads["head"]                                    # dL_2/dhead = z_2
      Array(2., dtype=float32)

      Per-task heads: one head per task, stacked, and ``heads_fn`` for one task.

      >>> def encoder2(p, x, targets):
      ...     return x @ p["enc"]                          # z = [[1, 1]]
      >>> def one_head(p, z, x, target):                   # p["heads"]: task i's row
      ...     return jnp.mean((z @ p["heads"] - target) ** 2)
      >>> params = {"enc": jnp.eye(2), "heads": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
      >>> targets = jnp.array([[0.0], [4.0]])              # (T, B): one target per task
      >>> axes = ({"enc": None, "heads": 0}, None, 0)      # for (params, x, targets)
      >>> fn = ob.value_and_balanced_grad(encoder2, one_head, tx, heads_in_axes=axes)
      >>> losses, grads, state = fn(params, tx.init(None), x, targets)
      >>> losses                                           # (1 - 0)^2 and (1 - 4)^2
      Array([1., 9.], dtype=float32)
      >>> state.weights.round(4).tolist()                  # dL/dz: [[2, 0]], [[0, -6]]
      [0.9, 0.1]
      >>> grads["heads"]                                   # each head: its own task only
      Array([[ 2.,  2.],
             [-6., -6.]], dtype=float32)

    References:
      Sener & Koltun, `Multi-Task Learning as Multi-Objective Optimization
      <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018 (Sec. 3.3, MGDA-UB);
      Défossez et al., `High Fidelity Neural Audio Compression
      <https://arxiv.org/abs/2210.13438>`_, 2022 (Sec. 3.4, the loss balancer).
    """
    weighting = getattr(tx, "weighting", None)
    if weighting is not None and "cross_gram" in weighting.needs:
        raise ValueError(
            f"value_and_balanced_grad: {weighting.name} needs a second, independent "
            f"mini-batch's gradients (`task_grads2=`), which one call on one batch does not "
            f"have; use the stacked path with two batches (README: 'Two mini-batches')."
        )
    tx = optax.with_extra_args_support(tx)

    def wrapped(
        params: PyTree, tx_state: optax.OptState, *args: Any, **kwargs: Any
    ) -> tuple[Any, PyTree, optax.OptState]:
        z, encoder_vjp = jax.vjp(lambda p: encoder_fn(p, *args, **kwargs), params)

        if heads_in_axes is None:
            out = _general_heads(heads_fn, params, z, args, kwargs, has_aux)
        else:
            out = _per_task_heads(heads_fn, heads_in_axes, params, z, args, kwargs, has_aux)
        losses, aux, head_grads, rep_grads = out
        # ``z`` as the params: it tells a loss-based method stacked gradients from ordinary.
        combined, tx_state = tx.update(rep_grads, tx_state, z, task_losses=losses)
        (encoder_grads,) = encoder_vjp(combined)
        grads = jax.tree.map(_add, encoder_grads, head_grads)
        return ((losses, aux) if has_aux else losses), grads, tx_state

    return wrapped


def _check_losses(losses: Any, what: str) -> None:
    if not hasattr(losses, "ndim") or losses.ndim != 1:
        raise ValueError(
            f"value_and_balanced_grad: {what} must give a 1-D array of per-task losses of "
            f"shape (T,), got {getattr(losses, 'shape', type(losses))}."
        )


def _general_heads(
    heads_fn: Callable[..., Any],
    params: PyTree,
    z: PyTree,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    has_aux: bool,
) -> tuple[jax.Array, Any, PyTree, PyTree]:
    """Losses, aux, summed head gradients and the stacked dL_i/dz of a (T,)-valued head."""

    def heads(p: PyTree, rep: PyTree) -> Any:
        return heads_fn(p, rep, *args, **kwargs)

    if has_aux:
        losses, heads_vjp, aux = jax.vjp(heads, params, z, has_aux=True)
    else:
        losses, heads_vjp = jax.vjp(heads, params, z)
        aux = None
    _check_losses(losses, "`heads_fn`")
    num_tasks = losses.shape[0]
    # Heads' own parameters: the ordinary gradient of the sum of the losses.
    head_grads, _ = heads_vjp(jnp.ones((num_tasks,), losses.dtype))
    # dL_i/dz for every task: the heads' backward pass vectorised over the identity.
    # (The per-task parameter cotangents computed alongside are unused; under jit they
    # are dead code and removed.)
    basis = jnp.eye(num_tasks, dtype=losses.dtype)
    rep_grads = jax.vmap(lambda c: heads_vjp(c)[1])(basis)
    return losses, aux, head_grads, rep_grads


def _per_task_heads(
    heads_fn: Callable[..., Any],
    heads_in_axes: tuple[Any, ...],
    params: PyTree,
    z: PyTree,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    has_aux: bool,
) -> tuple[jax.Array, Any, PyTree, PyTree]:
    """The same for a one-task ``heads_fn`` vmapped over tasks: dL_i/dz through head i only."""
    if not isinstance(heads_in_axes, tuple) or len(heads_in_axes) != 1 + len(args):
        raise ValueError(
            "value_and_balanced_grad: `heads_in_axes` must be a tuple with one entry for "
            f"`params` and one per positional argument ({1 + len(args)} in all, for params "
            f"and {len(args)} argument(s)), got {heads_in_axes!r}."
        )
    in_axes = (heads_in_axes[0], None, *heads_in_axes[1:])

    def one(p: PyTree, rep: PyTree, *a: Any) -> Any:
        return heads_fn(p, rep, *a, **kwargs)

    def heads(p: PyTree, rep: PyTree) -> Any:
        return jax.vmap(one, in_axes=in_axes)(p, rep, *args)

    if has_aux:
        losses, heads_vjp, aux = jax.vjp(heads, params, z, has_aux=True)
    else:
        losses, heads_vjp = jax.vjp(heads, params, z)
        aux = None
    _check_losses(losses, "`heads_fn` vmapped over `heads_in_axes`")
    # Heads' own parameters: one backward pass of the summed losses; for stacked heads
    # this is each head's own task gradient.
    head_grads, _ = heads_vjp(jnp.ones(losses.shape, losses.dtype))
    grad_z = jax.grad(one, argnums=1, has_aux=has_aux)
    rep_grads = jax.vmap(grad_z, in_axes=in_axes)(params, z, *args)
    if has_aux:
        rep_grads = rep_grads[0]
    return losses, aux, head_grads, rep_grads


def _add(a: jax.Array, b: jax.Array) -> jax.Array:
    if jnp.result_type(a) == jax.dtypes.float0:  # integer leaves: no gradient
        return a
    return (a + b).astype(jnp.result_type(a))
