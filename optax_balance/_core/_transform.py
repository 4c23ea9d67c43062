"""``ob.balance``: a weighting made into an optax transformation, with device sync."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_balance._core import _checks, _tree
from optax_balance._core._combine import combine
from optax_balance._core._stats import Stats, compute_stats, sync_stats
from optax_balance._core._types import PyTree, SharedMask, Sync
from optax_balance._core._weighting import (
    Weighting,
    guarded_weigh,
    guarded_weigh_ok,
    tree_none_outside,
)

try:  # optax >= 0.2.8: the aggregation API this library's methods belong to
    from optax.experimental import aggregating as _aggregating

    _Base = _aggregating.Aggregator
except (ImportError, AttributeError):  # pragma: no cover - older optax
    _Base = optax.GradientTransformationExtraArgs


class BalancedTransform(_Base):  # type: ignore[misc,valid-type]
    """What :func:`balance` returns: an optax ``Aggregator`` (stacked per-task gradients in,
    one update out) that also carries the ``weighting`` it applies, and its ``axis_name``
    (read by :func:`optax_balance.weighted_loss`)."""

    weighting: Weighting
    axis_name: Any


def _pmean(tree: PyTree, axis_name: Any) -> PyTree:
    return jax.tree.map(lambda x: jax.lax.pmean(x, axis_name), tree)


def _check_estimates(estimates: PyTree, updates: PyTree, stat_mask: PyTree, name: str) -> None:
    """The tracked estimates must be the statistic leaves' stacked shapes (else: a clear
    error, not a broadcast): ``init`` saw params of other shapes."""
    est = jax.tree.leaves(estimates, is_leaf=lambda x: x is None)
    path_leaves = jax.tree_util.tree_flatten_with_path(updates)[0]
    masks = jax.tree.leaves(stat_mask)
    if len(est) == len(path_leaves):
        bad = [
            (jax.tree_util.keystr(p), np.shape(e), np.shape(g))
            for (p, g), e, m in zip(path_leaves, est, masks)
            if (e is None) == m or (m and np.shape(e) != np.shape(g))
        ]
    else:
        bad = [("<tree>", jax.tree.structure(estimates), jax.tree.structure(updates))]
    if bad:
        path, e, g = bad[0]
        raise ValueError(
            f"{name}: the tracked gradient estimates in the state do not match the stacked "
            f"gradients (leaf {path}: {e} in the state, {g} in the gradients); `init` was "
            f"given params of another shape or `shared` mask. optax.MultiSteps initialises "
            f"the method with the stacked gradients' shapes, which gradient-sized state "
            f"cannot take: accumulate after the method instead, "
            f"optax.chain({name}, optax.MultiSteps(optimizer, k))."
        )


def _with_estimates(updates: PyTree, estimates: PyTree) -> PyTree:
    """``updates`` with its statistic leaves replaced by the tracked ``estimates``."""
    return jax.tree.map(
        lambda e, g: g if e is None else e, estimates, updates, is_leaf=lambda x: x is None
    )


def balance(
    weighting: Weighting,
    *,
    shared: SharedMask = None,
    axis_name: Any = None,
    sync: Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Builds the transformation that balances stacked task gradients with ``weighting``.

    The weighting maps per-task statistics (and its state) to weights :math:`w`; the
    transformation computes those statistics from the stacked gradients :math:`J` (leaf
    shape ``(T, *param.shape)``) and returns

    .. math::

      d = \sum_i w_i\, g_i \quad \text{on shared leaves}, \qquad
      d = \sum_i g_i \quad \text{on task-specific leaves},

    each leaf in its input dtype (statistics and weights in float32). Its state is the
    weighting's state. ``ob.upgrad(...)`` is ``ob.balance(ob.weightings.upgrad(...))``;
    use this to run a weighting you wrote (:class:`optax_balance.Weighting`) or wrapped
    (:func:`optax_balance.cr_mogm`).

    Non-finite steps: a step whose statistics, losses, weights or new state are not finite
    keeps the previous state and combines with the previous weights, so the state is never
    poisoned and the non-finite gradient stays visible downstream (to
    ``optax.apply_if_finite``).

    Weightings with gradient-sized state (``Weighting.tracked``: MoCo, DB-MTL) combine
    their tracked estimates of the task gradients instead of the incoming ones on the
    statistic leaves, and a weighting with ``Weighting.head_scales`` (DB-MTL, IMTL) weighs
    the task-specific leaves by per-task scales instead of summing them.

    Two mini-batches: a weighting that needs ``"cross_gram"`` (SDMGrad, MoDo) reads
    :math:`J_1 J_2^\top` of two independent mini-batches' stacked gradients, the second
    given as ``update(grads, state, params, task_grads2=grads2)`` (same structure and
    shapes as ``grads``; a ``ValueError`` says so when it is missing). Its output combines
    the mean of the two batches, :math:`d = \sum_i w_i (g_i^{(1)} + g_i^{(2)})/2` (the
    gradient of the weighted loss on both batches: every sample drawn is used), and
    task-specific leaves get :math:`\sum_i (g_i^{(1)} + g_i^{(2)})/2`. Weightings that do not
    need it ignore ``task_grads2``.

    Loss-based weightings (``needs == ("losses",)``) also take an ordinary gradient:
    ``update`` then returns it unchanged and advances the state (see
    :func:`optax_balance.weighted_loss`); stacked and ordinary gradients are told apart
    from ``params``' shapes.

    Args:
      weighting: the :class:`optax_balance.Weighting` to apply.
      shared: which parameter leaves are shared (``None``: all); a pytree of bools with the
        params' structure or a prefix of it, or a callable ``params -> such a pytree``.
        Other leaves (task heads) are summed over the task axis and take no part in the
        statistics.
      axis_name: the device axis name when ``update`` runs per device inside
        ``shard_map``/``pmap`` on local-batch gradients and losses.
      sync: ``"grads"`` (exact: the stacked gradients the statistics read and the losses
        are averaged over ``axis_name`` first; output and state equal the one-device
        result on the global batch) or ``"stats"`` (only the statistics and losses are
        averaged: identical weights and state on every device, the output is the local
        combination, which the caller averages).
      num_tasks: T, if known: ``init`` then builds a full-shape state (otherwise a
        placeholder that the first update replaces, which costs a second compile of a
        jitted step and cannot be restored from a checkpoint of a full state).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (an optax ``Aggregator`` where the
      installed optax has one) whose state is the weighting's.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> tx = ob.balance(ob.weightings.upgrad(), num_tasks=2)
      >>> d, state = tx.update(J, tx.init(jnp.zeros(3)))
      >>> print(np.asarray(d).round(4), np.asarray(state.weights).round(4))
      [0.2929 1.9004 1.9004] [1.1109 0.7894]

    References:
      Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
      <https://arxiv.org/abs/2406.16232>`_, 2024 (weightings of the Gramian, torchjd's
      ``GramianWeightedAggregator``).
    """
    if not isinstance(weighting, Weighting):
        raise ValueError(
            f"`weighting` must be an ob.Weighting (e.g. ob.weightings.upgrad()), got {weighting!r}."
        )
    _checks.check_choice("sync", sync, ("grads", "stats"))
    t_cfg = _checks.check_num_tasks(num_tasks)
    if weighting.num_tasks is not None:
        if t_cfg is not None and t_cfg != weighting.num_tasks:
            raise ValueError(
                f"num_tasks={t_cfg} but the {weighting.name} weighting was built for "
                f"{weighting.num_tasks} tasks by its hyperparameters (a per-task vector such "
                f"as `pref_vector` or `weights` with {weighting.num_tasks} entries)."
            )
        t_cfg = weighting.num_tasks
    needs = weighting.needs
    name = weighting.name
    two_batches = "cross_gram" in needs
    if axis_name is not None and sync == "stats" and "grads" in needs:
        raise ValueError(
            f"{name} reads the stacked gradients themselves, which sync='stats' does not "
            f"average: use sync='grads' with axis_name={axis_name!r}."
        )
    # Per-item statistics carry each device's own batch: they are gathered (exact in both
    # modes) and the gradients, whose items differ per device, are never averaged.
    per_device_items = "item_sq_norms" in needs
    grad_stats = [n for n in needs if n != "losses"]

    def masks(params: PyTree) -> tuple[PyTree, PyTree]:
        shared_m = _tree.resolve_mask(shared, params, name="shared")
        if weighting.stat_mask is None:
            return shared_m, shared_m
        stat_m = _tree.resolve_mask(weighting.stat_mask, params, name=weighting.stat_mask_name)
        return shared_m, jax.tree.map(lambda a, b: a and b, shared_m, stat_m)

    def init_state(t: int, params: PyTree) -> Any:
        if weighting.init_takes_params:
            return weighting.init(t, tree_none_outside(masks(params)[1], params))
        return weighting.init(t)

    def init_fn(params: PyTree) -> Any:
        state = init_state(0 if t_cfg is None else t_cfg, params)
        # One buffer per leaf, even where a method's init reuses an array for two fields:
        # a train step that donates its optimizer state must not see a buffer twice.
        return jax.tree.map(lambda x: jnp.array(x, copy=True), state)

    def ready_state(state: Any, t: int, params: PyTree) -> Any:
        state_t = np.shape(state.weights)[0]
        if state_t == 0:
            return init_state(t, params)
        if state_t != t:
            raise ValueError(
                f"{name}: the state holds weights for {state_t} tasks but the gradients "
                f"have T={t}; re-run `init` or pass num_tasks={t}."
            )
        return state

    def synced_losses(task_losses: Any, t: int) -> Any:
        losses = _tree.check_losses(task_losses, t, weighting.needs_losses, name)
        if axis_name is not None and losses is not None:
            losses = jax.lax.pmean(losses, axis_name)  # local-batch means, in every mode
        return losses

    def update_ordinary(updates: PyTree, state: Any, params: PyTree, task_losses: Any):
        # A loss-based weighting given the gradient of ``ob.weighted_loss``: it already
        # carries the weights; advance the state and pass the gradient through.
        t = int(np.shape(task_losses)[0])
        state = ready_state(state, t, params)
        stats = Stats(losses=synced_losses(task_losses, t))
        _, new_state = guarded_weigh(weighting, stats, state)
        if axis_name is not None and sync == "grads":
            updates = _pmean(updates, axis_name)
        return updates, new_state

    def second_batch(extra_args: dict[str, Any], updates: PyTree) -> PyTree:
        if not two_batches:
            return None  # ignored, as any keyword a method does not use
        grads2 = extra_args.get("task_grads2")
        if grads2 is None:
            raise ValueError(
                f"{name} needs the stacked gradients of a second, independent mini-batch: "
                f"call `tx.update(grads, state, params, task_grads2=grads2)` with `grads2` "
                f"from another batch (ob.value_and_task_grads on it); its weights come from "
                f"the cross-Gramian J1 J2^T, which one batch's Gramian would bias."
            )
        return _tree.check_second_batch(jax.tree.map(jnp.asarray, grads2), updates, name)

    def update_fn(
        updates: PyTree, state: Any, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, Any]:
        task_losses = extra_args.get("task_losses")
        updates = jax.tree.map(jnp.asarray, updates)
        if weighting.losses_only:
            t_hint = t_cfg
            if t_hint is None and task_losses is not None and np.ndim(task_losses) == 1:
                t_hint = int(np.shape(task_losses)[0])
            _tree.check_losses(task_losses, t_hint, True, name)
            if not _tree.is_stacked(updates, params, t_hint, method=name):
                return update_ordinary(updates, state, params, task_losses)
        elif not _tree.is_stacked(updates, params, None, method=name):
            raise ValueError(
                f"{name} needs stacked per-task gradients (every leaf shaped "
                f"(T, *param.shape)), but every gradient leaf has its parameter's shape: "
                f"get them with ob.value_and_task_grads(loss_fn) or jax.jacrev of a "
                f"(T,)-valued loss."
            )
        t = _tree.num_tasks_of(updates, t_cfg)
        updates2 = second_batch(extra_args, updates)
        like = _tree.unstacked_like(updates)
        shared_m, stat_m = masks(params if params is not None else like)
        if jax.tree.structure(shared_m) != jax.tree.structure(updates):
            raise ValueError(
                f"`shared` mask structure {jax.tree.structure(shared_m)} does not match the "
                f"gradients' structure {jax.tree.structure(updates)}."
            )
        state = ready_state(state, t, like)
        if weighting.tracked is not None:
            _check_estimates(getattr(state, weighting.tracked), updates, stat_m, name)
        losses = synced_losses(task_losses, t)

        # Devices. "grads": the leaves the statistics read are averaged before them, every
        # other leaf is combined locally and averaged after (the combination is linear and
        # the weights are the same on every device), so leaves outside the statistics cost
        # P numbers instead of T*P. "stats" (and per-item statistics, whose items are per
        # device): only the statistics travel; the output stays local.
        grads_mode = axis_name is not None and sync == "grads" and not per_device_items
        read_m = stat_m if grad_stats else jax.tree.map(lambda _: False, stat_m)
        if grads_mode:
            updates, updates2 = (
                None
                if u is None
                else jax.tree.map(lambda g, m: jax.lax.pmean(g, axis_name) if m else g, u, read_m)
                for u in (updates, updates2)
            )
        stats = compute_stats(needs, updates, stat_m, t, losses, updates2)
        if axis_name is not None and not grads_mode:
            stats = sync_stats(stats, axis_name)

        weights, new_state, ok = guarded_weigh_ok(weighting, stats, state)
        heads = None
        if weighting.head_scales is not None:
            heads = getattr(new_state, weighting.head_scales)
        sources = [updates] if updates2 is None else [updates, updates2]

        def combined(trees: list[PyTree]) -> PyTree:
            """The mean of the trees' combinations (two batches), in f32."""
            outs = [combine(u, weights, shared_m, keep_f32=True, head_scales=heads) for u in trees]
            return outs[0] if len(outs) == 1 else jax.tree.map(lambda a, b: 0.5 * (a + b), *outs)

        if weighting.tracked is None:
            out = combined(sources)
        else:
            # The tracked estimates (as the guarded new state holds them) on the statistic
            # leaves; a non-finite step combines the incoming gradients with the previous
            # weights instead. One branch runs under lax.cond; under a device axis the
            # estimates and the averaged gradients may differ in device variance, which
            # cond's branches may not, so both are computed and selected.
            est = getattr(new_state, weighting.tracked)
            tracked_sources = [_with_estimates(u, est) for u in sources]
            if axis_name is None:
                out = jax.lax.cond(ok, combined, lambda _: combined(sources), tracked_sources)
            else:
                out = jax.tree.map(
                    lambda a, b: jnp.where(ok, a, b), combined(tracked_sources), combined(sources)
                )
        out = jax.tree.map(lambda o, g: o.astype(g.dtype), out, updates)
        if grads_mode:
            out = jax.tree.map(lambda o, m: o if m else jax.lax.pmean(o, axis_name), out, read_m)
        return out, new_state

    tx = BalancedTransform(init_fn, update_fn)
    tx.weighting = weighting
    tx.axis_name = axis_name
    return tx
