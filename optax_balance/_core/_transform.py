"""``ob.balance``: a weighting made into an optax transformation, with device sync."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_balance._core import _checks, _tree
from optax_balance._core._combine import combine
from optax_balance._core._stats import Stats, all_finite, compute_stats, sync_stats
from optax_balance._core._types import PyTree, SharedMask, Sync, stat_dtype
from optax_balance._core._weighting import (
    Weighting,
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
    one update out) that also carries the ``weighting`` it applies and the arguments it was
    built with (read by :func:`optax_balance.weighted_loss` and
    :func:`optax_balance.value_and_weighted_grad`, which apply the same method to other
    inputs)."""

    weighting: Weighting
    shared: SharedMask
    axis_name: Any
    sync: Sync
    num_tasks: int | None


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


def resolve_num_tasks(weighting: Weighting, num_tasks: int | None) -> int | None:
    """T as ``num_tasks`` and the weighting's hyperparameters fix it (``None``: unknown)."""
    t_cfg = _checks.check_num_tasks(num_tasks)
    if weighting.num_tasks is not None:
        if t_cfg is not None and t_cfg != weighting.num_tasks:
            raise ValueError(
                f"num_tasks={t_cfg} but the {weighting.name} weighting was built for "
                f"{weighting.num_tasks} tasks by its hyperparameters (a per-task vector such "
                f"as `pref_vector` or `weights` with {weighting.num_tasks} entries)."
            )
        t_cfg = weighting.num_tasks
    return t_cfg


def statistic_masks(
    weighting: Weighting, shared: SharedMask, params: PyTree
) -> tuple[PyTree, PyTree]:
    """``(shared_mask, stat_mask)`` as Python bools: the shared leaves, and those of them the
    statistics read (further restricted by the weighting's own mask, GradNorm's
    ``norm_mask``)."""
    shared_m = _tree.resolve_mask(shared, params, name="shared")
    if weighting.stat_mask is None:
        return shared_m, shared_m
    stat_m = _tree.resolve_mask(weighting.stat_mask, params, name=weighting.stat_mask_name)
    return shared_m, jax.tree.map(lambda a, b: a and b, shared_m, stat_m)


def initial_state(weighting: Weighting, t: int, params: PyTree, shared: SharedMask) -> Any:
    """``weighting.init(t)``, or ``init(t, statistic leaves)`` for per-leaf state."""
    if weighting.init_takes_params:
        stat_m = statistic_masks(weighting, shared, params)[1]
        return weighting.init(t, tree_none_outside(stat_m, params))
    return weighting.init(t)


def ready_state(
    weighting: Weighting, state: Any, t: int, params: PyTree, shared: SharedMask
) -> Any:
    """The state for T tasks: a placeholder (``init(0)``, zero weights) is replaced by a
    full ``init(t)``; a state built for another T is a ``ValueError``."""
    state_t = np.shape(state.weights)[0]
    if state_t == 0:
        return initial_state(weighting, t, params, shared)
    if state_t != t:
        raise ValueError(
            f"{weighting.name}: the state holds weights for {state_t} tasks but the "
            f"gradients have T={t}; re-run `init` or pass num_tasks={t}."
        )
    return state


def _pmean(tree: PyTree, axis_name: Any) -> PyTree:
    return jax.tree.map(lambda x: jax.lax.pmean(x, axis_name), tree)


def loss_stats(
    weighting: Weighting,
    task_losses: Any,
    extra_args: dict[str, Any],
    *,
    num_tasks: int | None = None,
    axis_name: Any = None,
) -> Stats:
    """The losses (and the ``weighting.extra_args`` vectors given) as :class:`Stats`.

    Each is validated as a ``(T,)`` vector (a ``ValueError`` naming it otherwise), cast
    to the statistics dtype and, under ``axis_name``, averaged over devices (local-batch
    means, in every sync mode). ``update`` and :func:`optax_balance.weighted_loss` both
    build a loss-based weighting's statistics here, so both see the same numbers.
    """
    name = weighting.name
    nonneg = weighting.nonnegative_losses
    losses = _tree.check_losses(task_losses, num_tasks, weighting.needs_losses, name, nonneg)
    t = num_tasks if losses is None else int(losses.shape[0])
    extra: dict[str, Any] | None = None
    if weighting.extra_args:
        extra = {}
        for key in weighting.extra_args:
            value = extra_args.get(key)
            if value is None:
                continue
            shape = np.shape(value)
            if len(shape) != 1 or (t is not None and shape[0] != t):
                raise ValueError(
                    f"{name}: `{key}` must have shape ({t or 'T'},) (one value per task), "
                    f"got {shape}."
                )
            extra[key] = jnp.asarray(value).astype(stat_dtype())
    if axis_name is not None:  # local-batch means, in every mode
        losses = None if losses is None else jax.lax.pmean(losses, axis_name)
        extra = None if extra is None else _pmean(extra, axis_name)
    if nonneg and losses is not None:
        _tree.warn_if_negative(losses, name)
    return Stats(losses=losses, extra=extra)


def grads_finite(updates: PyTree, stat_mask: PyTree, axis_name: Any = None) -> Any:
    """Whether every gradient leaf where ``stat_mask`` is True is finite, on every device.

    A loss-based weighting never reads the gradients, so its guard would not see a NaN
    in the stacked gradients it combines; the transformation passes this flag to the
    guard instead, so that such a step keeps the state as it does for every other method.
    """
    leaves = [g for g, m in zip(jax.tree.leaves(updates), jax.tree.leaves(stat_mask)) if m]
    ok = all_finite(leaves)
    if axis_name is not None:  # the same decision on every device
        ok = jax.lax.pmin(ok.astype(jnp.int32), axis_name) > 0
    return ok


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
    from ``params``' shapes (without ``params``, from the losses' length where only one
    reading fits, else a ``ValueError`` asks for ``params``). On stacked gradients, which
    such a weighting combines but never reads, its guard also checks that the shared
    leaves are finite; an ordinary gradient is passed through unread (a non-finite one is
    left to ``optax.apply_if_finite`` downstream: the state, advanced from the losses
    alone, cannot be poisoned by it), so the one-backward step costs no extra pass.

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
    _tree.check_mask_arg("shared", shared)
    if weighting.stat_mask is not None:
        _tree.check_mask_arg(weighting.stat_mask_name, weighting.stat_mask)
    t_cfg = resolve_num_tasks(weighting, num_tasks)
    needs = weighting.needs
    name = weighting.name
    if axis_name is not None and sync == "stats" and "grads" in needs:
        raise ValueError(
            f"{name} reads the stacked gradients themselves, which sync='stats' does not "
            f"average: use sync='grads' with axis_name={axis_name!r}."
        )
    # Per-item statistics carry each device's own batch: they are gathered (exact in both
    # modes) and the gradients, whose items differ per device, are never averaged.
    per_device_items = "item_sq_norms" in needs
    grad_stats = [n for n in needs if n != "losses"]
    two_batches = "cross_gram" in needs

    # The weighting (solvers: while loops) under one jit per transformation, so that an
    # eager ``update`` compiles it once, not on every call; inside a jitted step it is
    # inlined.
    weigh_ok = jax.jit(functools.partial(guarded_weigh_ok, weighting))

    def init_fn(params: PyTree) -> Any:
        state = initial_state(weighting, 0 if t_cfg is None else t_cfg, params, shared)
        # One buffer per leaf, even where a method's init reuses an array for two fields:
        # a train step that donates its optimizer state must not see a buffer twice.
        return jax.tree.map(lambda x: jnp.array(x, copy=True), state)

    def update_ordinary(updates: PyTree, state: Any, params: PyTree, extra_args: dict):
        # A loss-based weighting given the gradient of ``ob.weighted_loss``: it already
        # carries the weights; advance the state and pass the gradient through.
        losses: Any = extra_args.get("task_losses")
        stats = loss_stats(weighting, losses, extra_args, num_tasks=t_cfg, axis_name=axis_name)
        state = ready_state(weighting, state, int(np.shape(losses)[0]), params, shared)
        # The gradient is not read: the weights come from the losses, which the guard checks.
        _, new_state, _ = weigh_ok(stats, state, True)
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
        task_losses: Any = extra_args.get("task_losses")
        _tree.check_float_leaves(updates, name)
        updates = jax.tree.map(jnp.asarray, updates)
        if weighting.losses_only:
            if task_losses is None:
                _tree.check_losses(None, t_cfg, True, name)  # raises: the losses are needed
            shape = () if task_losses is None else np.shape(task_losses)
            t_hint = t_cfg
            if t_hint is None and len(shape) == 1:
                t_hint = int(shape[0])
            # With params, the shapes decide (a stacked tree with the wrong T then gets
            # the error naming the leaf, below); the losses are checked on either path.
            if not _tree.is_stacked(updates, params, t_hint, method=name):
                return update_ordinary(updates, state, params, extra_args)
        elif not _tree.is_stacked(updates, params, None, method=name):
            raise ValueError(
                f"{name} needs stacked per-task gradients (every leaf shaped "
                f"(T, *param.shape)), but every gradient leaf has its parameter's shape: "
                f"get them with ob.value_and_task_grads(loss_fn) or jax.jacrev of a "
                f"(T,)-valued loss. (Under optax.MultiSteps, whose accumulator has the "
                f"params' shape, use ob.accumulate(optax.chain(method, optimizer), k).)"
            )
        t = _tree.num_tasks_of(updates, t_cfg)
        like = _tree.unstacked_like(updates)
        shared_m, stat_m = statistic_masks(
            weighting, shared, params if params is not None else like
        )
        if jax.tree.structure(shared_m) != jax.tree.structure(updates):
            raise ValueError(
                f"`shared` mask structure {jax.tree.structure(shared_m)} does not match the "
                f"gradients' structure {jax.tree.structure(updates)}."
            )
        _tree.check_selects(shared_m, stat_m, weighting.stat_mask_name, name)
        updates2 = second_batch(extra_args, updates)
        state = ready_state(weighting, state, t, like, shared)
        if weighting.tracked is not None:
            _check_estimates(getattr(state, weighting.tracked), updates, stat_m, name)
        stats_in = loss_stats(weighting, task_losses, extra_args, num_tasks=t, axis_name=axis_name)

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
        stats = compute_stats(needs, updates, stat_m, t, stats_in.losses, updates2)
        if axis_name is not None and not grads_mode:
            stats = sync_stats(stats, axis_name)
        stats = stats._replace(extra=stats_in.extra)
        # Weights of the losses alone: the guard cannot see the gradients, so check them.
        ok = grads_finite(updates, stat_m, axis_name) if weighting.losses_only else True

        weights, new_state, ok = weigh_ok(stats, state, ok)
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
    tx.shared = shared
    tx.axis_name = axis_name
    tx.sync = sync
    tx.num_tasks = t_cfg
    return tx
