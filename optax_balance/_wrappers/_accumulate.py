"""Gradient accumulation for balancing methods: stacked gradients and losses, k micro-batches."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_balance import _core
from optax_balance._grads import task_weights

try:  # optax >= 0.2.8: an Aggregator can sit in the middle of `aggregating.process`
    from optax.experimental import aggregating as _aggregating

    _Base = _aggregating.Aggregator
except (ImportError, AttributeError):  # pragma: no cover - older optax
    _Base = optax.GradientTransformationExtraArgs


class AccumulateState(NamedTuple):
    """State of :func:`accumulate`.

    Attributes:
      micro_step: micro-batches accumulated since the last update (int32, ``0..every_k-1``).
      ready: whether the last call ran the wrapped transformation (its output is then the
        update; otherwise zeros). ``optax.experimental.aggregating.process`` reads this
        field to run its postprocessor only on those steps.
      grads: the running mean of the micro-batches' gradients: stacked, leaf shape
        ``(T, *param.shape)`` (or the params' shapes with ``stacked=False``).
      losses: ``(T,)`` the running mean of the micro-batches' ``task_losses``.
      inner: the wrapped transformation's state (``ob.task_weights`` finds the weights in
        it).
    """

    micro_step: jax.Array
    ready: jax.Array
    grads: Any
    losses: jax.Array
    inner: Any


def _num_tasks(inner_state: Any) -> int:
    try:
        weights = task_weights(inner_state)
    except ValueError:
        raise ValueError(
            "accumulate: the wrapped transformation holds no balancing state (a state with "
            "a `weights` field); wrap an optax_balance method, alone or in optax.chain."
        ) from None
    t = int(np.shape(weights)[0])
    if t == 0:
        raise ValueError(
            "accumulate: the accumulator needs the task count at `init`, but the wrapped "
            "method was built without it: pass num_tasks=T to the method (e.g. "
            "ob.mgda(num_tasks=3))."
        )
    return t


def accumulate(
    tx: optax.GradientTransformation, every_k: int, *, stacked: bool = True
) -> optax.GradientTransformationExtraArgs:
    r"""Accumulates stacked task gradients and losses over micro-batches, then balances once.

    For micro-batches :math:`b = 1..k` with stacked gradients :math:`J^{(b)}` and losses
    :math:`L^{(b)}`, the ``k``-th call runs ``tx`` on their means,

    .. math::

      \bar J = \frac1k \sum_{b=1}^k J^{(b)}, \qquad
      \bar L = \frac1k \sum_{b=1}^k L^{(b)},

    (``tx.update(J_bar, state, params, task_losses=L_bar)``) and returns its update; the
    other calls return zeros and leave ``tx``'s state as it is. With micro-batches of
    equal size, :math:`\bar J` and :math:`\bar L` are the gradients and losses of the
    whole batch, so every method, loss-based ones included (GradNorm, MGDA with
    ``norm_type="loss"``), takes the step it would take on the whole batch (up to the
    rounding of the mean). The exception is a method reading per-item statistics (the
    balancer's ``per_batch_item=True``, whose leaves carry a batch axis): item ``b`` of
    every micro-batch would be averaged together.

    ``optax.MultiSteps(method, k)`` does not do this: its accumulator has the shape of the
    tree its ``init`` gets (the params, not the stacked gradients), and it hands the
    wrapped method the last micro-batch's ``task_losses``. Wrap the method *with* its
    optimizer, ``accumulate(optax.chain(method, optimizer), k)``, so that the optimizer
    also steps once per ``k`` micro-batches (as under ``MultiSteps``). The result is an
    ``optax.experimental.aggregating.Aggregator`` whose state has a ``ready`` field, so it
    also fits ``aggregating.process(preprocessor, accumulate(method, k), optimizer)``.
    Other keyword arguments of ``update`` reach ``tx`` from the last micro-batch.

    Args:
      tx: the transformation to run every ``every_k`` micro-batches: an optax_balance
        method built with ``num_tasks`` (or with per-task weights that fix T), alone or in
        ``optax.chain`` with an optimizer. ``init`` reads T from its state.
      every_k: the number of micro-batches per update, an int >= 1.
      stacked: ``True``: the gradients are stacked, leaves ``(T, *param.shape)``;
        ``False``: ordinary gradients shaped like the params (a loss-based method given
        the gradient of ``ob.weighted_loss``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (an optax ``Aggregator`` where the
      installed optax has one). Its state is a NamedTuple with fields ``micro_step``
      (micro-batches accumulated since the last update), ``ready`` (whether the last
      call ran ``tx``), ``grads`` and ``losses`` (the running means) and ``inner``
      (``tx``'s state, where ``ob.task_weights`` finds the weights).

    Raises:
      ValueError: at ``init``, when ``tx`` holds no balancing state or was built without
        the task count; at ``update``, when a gradient leaf or ``task_losses`` does not
        have the accumulator's shape.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> tx = ob.accumulate(ob.mgda(num_tasks=2), every_k=2)
      >>> state = tx.init(jnp.zeros(3))
      >>> d1, state = tx.update(jnp.array([[-8.0, 1.0, 1.0], [6.0, 1.0, 1.0]]), state)
      >>> d2, state = tx.update(jnp.array([[0.0, 1.0, 1.0], [6.0, 1.0, 1.0]]), state)
      >>> print(np.asarray(d1), np.asarray(d2).round(4))  # MGDA of the mean [[-4,1,1],[6,1,1]]
      [0. 0. 0.] [0. 1. 1.]
      >>> print(np.asarray(ob.task_weights(state)).round(4), bool(state.ready))
      [0.6 0.4] True

    References:
      optax's ``MultiSteps`` (gradient accumulation of one gradient) and
      ``optax.experimental.aggregating`` (per-element gradients in, one update out):
      `optax documentation <https://optax.readthedocs.io/en/latest/api/optimizer_wrappers.html>`_.
    """
    k = _core.check_int("every_k", every_k, low=1)

    def init_fn(params: Any) -> AccumulateState:
        inner = tx.init(params)
        t = _num_tasks(inner)
        lead = (t,) if stacked else ()
        grads = jax.tree.map(lambda p: jnp.zeros((*lead, *np.shape(p)), p.dtype), params)
        return AccumulateState(
            micro_step=jnp.zeros([], jnp.int32),
            ready=jnp.zeros([], bool),
            grads=grads,
            losses=jnp.zeros((t,), _core.stat_dtype()),
            inner=inner,
        )

    def update_fn(
        updates: Any, state: Any, params: Any = None, **extra_args: Any
    ) -> tuple[Any, AccumulateState]:
        _check_like(updates, state.grads, stacked)
        task_losses = extra_args.pop("task_losses", None)
        n = state.micro_step + 1
        mean = jax.tree.map(
            lambda a, u: a + (jnp.asarray(u).astype(a.dtype) - a) / n.astype(a.dtype),
            state.grads,
            updates,
        )
        losses = state.losses
        if task_losses is not None:
            if np.shape(task_losses) != losses.shape:
                raise ValueError(
                    f"accumulate: `task_losses` must have shape {losses.shape} (one loss per "
                    f"task), got {np.shape(task_losses)}."
                )
            new = jnp.asarray(task_losses).astype(losses.dtype)
            losses = losses + (new - losses) / n.astype(losses.dtype)
            extra_args["task_losses"] = losses
        ready = n >= k

        def run() -> tuple[Any, Any]:
            return tx.update(mean, state.inner, params, **extra_args)

        out_shape, _ = jax.eval_shape(run)

        def skip() -> tuple[Any, Any]:
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape), state.inner

        out, inner = jax.lax.cond(ready, run, skip)
        new_state = AccumulateState(
            micro_step=jnp.where(ready, jnp.zeros_like(n), n),
            ready=ready,
            grads=jax.tree.map(lambda m: jnp.where(ready, jnp.zeros_like(m), m), mean),
            losses=jnp.where(ready, jnp.zeros_like(losses), losses),
            inner=inner,
        )
        return out, new_state

    return _Base(init_fn, update_fn)


def _check_like(updates: Any, acc: Any, stacked: bool) -> None:
    if jax.tree.structure(updates) != jax.tree.structure(acc):
        raise ValueError(
            f"accumulate: the gradients' structure {jax.tree.structure(updates)} differs from "
            f"the params' {jax.tree.structure(acc)} given to `init`."
        )
    path_leaves = jax.tree_util.tree_flatten_with_path(updates)[0]
    for (path, u), a in zip(path_leaves, jax.tree.leaves(acc)):
        if np.shape(u) != np.shape(a):
            what = "stacked (T, *param.shape)" if stacked else "the parameter's shape"
            raise ValueError(
                f"accumulate: gradient leaf {jax.tree_util.keystr(path)} has shape "
                f"{np.shape(u)}, but the accumulator is {what}: {np.shape(a)}"
                + (
                    " (for the ordinary gradient of ob.weighted_loss, pass stacked=False)."
                    if stacked
                    else "."
                )
            )
