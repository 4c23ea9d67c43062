"""A method's math as a value: :class:`Weighting`, and the guarded step that applies it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_balance._core._combine import is_task_vector
from optax_balance._core._stats import (
    STAT_NAMES,
    Stats,
    all_finite,
    stats_from_cross_gram,
    stats_from_gram,
)
from optax_balance._core._types import Array, PyTree, SharedMask, stat_dtype

WeighFn = Callable[[Stats, Any], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True, eq=False)
class Weighting:
    r"""A balancing method's math: per-task statistics [+ state] to task weights [+ state].

    A weighting is two pure functions and a list of the statistics they read. The core
    (:func:`optax_balance.balance`) does the rest once for every method: validation, the
    ``shared`` mask, the statistics in float32, device sync, the non-finite guard and the
    combination :math:`d = \sum_i w_i g_i`. Every ``ob.weightings.<name>(...)`` returns
    one, and ``ob.<name>(...)`` is ``ob.balance(ob.weightings.<name>(...), ...)``.

    A weighting whose ``needs`` is ``("gram",)`` can be called on a Gramian computed
    elsewhere (per layer, at a representation, on a sharded mesh)::

        weights, state = weighting(gram)            # a fresh state
        weights, state = weighting(gram, state)     # the next step

    and any weighting on a :class:`optax_balance.Stats`; a 1-D array is read as the
    losses (for loss-based weightings). A weighting that needs ``"cross_gram"`` (SDMGrad,
    MoDo) reads a 2-D array as the cross-Gramian :math:`J_1 J_2^\top` of two independent
    mini-batches::

        weights, state = ob.weightings.modo()(j1 @ j2.T)

    Attributes:
      init: ``init(num_tasks) -> state``, a NamedTuple of arrays with a ``(T,)`` field
        ``weights`` (what ``ob.task_weights`` reports). ``init(0)`` must work: it is the
        placeholder state of a transformation built without ``num_tasks``. With
        ``init_takes_params``, ``init(num_tasks, params)`` where ``params`` is the params
        tree with ``None`` at the leaves the statistics do not read (per-leaf state).
      weigh: ``weigh(stats, state) -> (weights, new_state)``. ``weights`` is ``(T,)``, or a
        pytree with the params' structure holding per statistic leaf a ``(T,)`` array or
        an array of the leaf's stacked shape (per-coordinate weights), ``None`` elsewhere.
        It must be jittable: no Python control flow on array values. The non-finite guard
        does not scan per-coordinate weights (they need not exist in memory: XLA fuses
        them into the combination): ``weigh`` must make ``state.weights`` or another state
        field non-finite whenever one is, as a summary computed from them is.
      needs: the statistics ``weigh`` reads, from ``"gram"``, ``"sq_norms"``,
        ``"item_sq_norms"``, ``"leaf_sq_norms"``, ``"leaf_gram"``, ``"grads"``,
        ``"cross_gram"`` (makes ``task_grads2`` required) and ``"losses"`` (makes
        ``task_losses`` required); see
        :class:`optax_balance.Stats`. A weighting that needs only ``"losses"`` also
        accepts an ordinary (unstacked) gradient (see :func:`optax_balance.weighted_loss`).
      name: the method's name, for error messages.
      num_tasks: T when the hyperparameters fix it (a ``pref_vector``), else ``None``.
      stat_mask: leaves the statistics are computed on (intersected with ``shared``), as
        GradNorm's ``norm_mask``; ``None``: every shared leaf.
      stat_mask_name: the public name of ``stat_mask``, for error messages.
      init_takes_params: ``init`` takes the statistic leaves as a second argument.
      tracked: the name of a state field holding *tracked estimates* of the task gradients
        (MoCo's :math:`y`, DB-MTL's moving average): a stacked tree with the params'
        structure, ``(T, *leaf.shape)`` in the statistics dtype on each statistic leaf
        and ``None`` elsewhere, built by ``init(num_tasks, params)`` (so
        ``init_takes_params`` is required). The transformation then combines, on the
        statistic leaves, those estimates as the new state holds them,
        :math:`d = \sum_i w_i y_i`, instead of the incoming gradients (which ``weigh``
        reads through ``"grads"`` to update the estimates). The state is the one copy of
        the estimates. On a non-finite step the estimates are kept and the incoming
        gradients are combined with the previous weights, as for every method (a NaN/Inf
        gradient stays visible in the output, for ``optax.apply_if_finite``). The guard
        does not scan the new estimates (a T x P reduction over them would keep them
        alive next to the old ones): ``weigh`` must make its weights or another state
        field non-finite whenever an estimate is, as weights computed from the new
        estimates' norms or Gramian are; and to let a donated state be updated in place,
        it should compute those statistics without writing the new estimates out
        (MoCo and DB-MTL form each chunk of :math:`a_i y_i + b_i g_i` inside the
        reduction that reads it), not from a materialised copy.
      unscanned: names of state fields the non-finite guard does not scan: large
        accumulators of the size of the stacked gradients (ExcessMTL's squared-gradient
        sums), whose scan would be one more pass over T x P numbers per step. ``weigh``
        must make its weights or another (scanned) state field non-finite whenever one of
        them is, as weights computed from them are. On a non-finite step they are kept,
        like every state field. The ``tracked`` field is never scanned either.
      head_scales: the name of a ``(T,)`` state field :math:`c`: the task-specific leaves
        (``shared=False``) are combined as :math:`\sum_i c_i g_i` instead of summed. For
        methods that rescale the losses themselves (DB-MTL's log-losses, IMTL's learned
        scales), whose task heads train on the rescaled losses. Read from the new state
        (on a non-finite step, the previous scales).
      nonnegative_losses: the weights read the losses as non-negative quantities (MGDA's
        normalisation by the loss): a negative ``task_losses`` entry is a ``ValueError``
        when the losses are concrete and a run-time ``UserWarning`` when traced.
      extra_args: keyword arguments of ``update`` (and of
        :func:`optax_balance.weighted_loss`) that ``weigh`` reads, each an optional
        per-task ``(T,)`` vector validated, cast and averaged over devices like
        ``task_losses``, handed over in ``stats.extra`` (FAMO's ``losses_after``).

    Examples:
      Weights proportional to the inverse gradient norms, from the Gramian's diagonal:

      >>> import jax.numpy as jnp, optax_balance as ob
      >>> from typing import NamedTuple
      >>> class InvNormState(NamedTuple):
      ...     weights: jnp.ndarray
      >>> def weigh(stats, state):
      ...     w = 1.0 / jnp.sqrt(jnp.diagonal(stats.gram))
      ...     return w, InvNormState(w)
      >>> inv_norm = ob.Weighting(lambda t: InvNormState(jnp.zeros(t)), weigh, name="inv_norm")
      >>> weights, _ = inv_norm(jnp.array([[4.0, 0.0], [0.0, 16.0]]))  # norms 2 and 4
      >>> weights
      Array([0.5 , 0.25], dtype=float32)
      >>> tx = ob.balance(inv_norm, num_tasks=2)            # the optax transformation
      >>> d, state = tx.update(jnp.array([[2.0, 0.0], [0.0, 4.0]]), tx.init(jnp.zeros(2)))
      >>> d
      Array([1., 1.], dtype=float32)
    """

    init: Callable[..., Any]
    weigh: WeighFn
    needs: tuple[str, ...] = ("gram",)
    name: str = "weighting"
    num_tasks: int | None = None
    stat_mask: SharedMask = None
    stat_mask_name: str = "norm_mask"
    init_takes_params: bool = False
    tracked: str | None = None
    unscanned: tuple[str, ...] = ()
    head_scales: str | None = None
    nonnegative_losses: bool = False
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        needs = (self.needs,) if isinstance(self.needs, str) else tuple(self.needs)
        unknown = [n for n in needs if n not in STAT_NAMES]
        if unknown or not needs:
            raise ValueError(
                f"Weighting `needs` must name statistics from {STAT_NAMES}, got {self.needs!r}."
            )
        object.__setattr__(self, "needs", needs)
        extra = (self.extra_args,) if isinstance(self.extra_args, str) else tuple(self.extra_args)
        object.__setattr__(self, "extra_args", extra)
        unscanned = (self.unscanned,) if isinstance(self.unscanned, str) else tuple(self.unscanned)
        object.__setattr__(self, "unscanned", unscanned)
        if not (callable(self.init) and callable(self.weigh)):
            raise ValueError("Weighting `init` and `weigh` must be callables.")
        if self.tracked is not None and not self.init_takes_params:
            raise ValueError(
                "a Weighting with `tracked` estimates builds them from the params: set "
                "`init_takes_params=True` (init(num_tasks, params))."
            )

    @property
    def needs_losses(self) -> bool:
        """Whether ``task_losses`` are required."""
        return "losses" in self.needs

    @property
    def losses_only(self) -> bool:
        """Whether the weights depend on the losses alone (no gradient statistic)."""
        return self.needs == ("losses",)

    def __call__(self, stats: Any, state: Any = None, *, losses: Any = None) -> tuple[Any, Any]:
        """Weights (and the next state) from statistics computed by the caller.

        Args:
          stats: a :class:`optax_balance.Stats`, a ``(T, T)`` Gramian (for weightings
            that need only ``"gram"``, and ``"losses"`` given as ``losses``), a ``(T, T)``
            cross-Gramian (for weightings that need ``"cross_gram"``), or a ``(T,)`` array
            of losses (for loss-based weightings).
          state: the weighting's state; ``None`` starts from ``init(T)``.
          losses: ``(T,)`` losses to go with a Gramian.

        Returns:
          ``(weights, new_state)``, exactly as the transformation would compute them
          from the same statistics (without its non-finite guard).
        """
        if not isinstance(stats, Stats):
            arr = jnp.asarray(stats)
            if arr.ndim == 1:
                if losses is not None:
                    raise ValueError("pass the losses once: as `stats` or as `losses`.")
                arr = arr.astype(stat_dtype())
                stats = Stats(losses=arr)
            elif "cross_gram" in self.needs and "gram" not in self.needs:
                stats = stats_from_cross_gram(arr, losses)
            else:
                stats = stats_from_gram(arr, losses)
        if stats.gram is not None and stats.sq_norms is None:
            stats = stats._replace(sq_norms=jnp.diagonal(jnp.asarray(stats.gram)))
        missing = [n for n in self.needs if getattr(stats, n) is None]
        if missing:
            raise ValueError(
                f"the {self.name} weighting needs {missing} but the statistics given do not "
                f"hold them; build an ob.Stats with those fields."
            )
        if state is None:
            if self.init_takes_params:
                raise ValueError(
                    f"the {self.name} weighting keeps per-leaf state: pass `state`, from "
                    f"`weighting.init(num_tasks, params)`."
                )
            state = self.init(stats.num_tasks)
        return self.weigh(stats, state)


def broadcast_like(prev: Array, w: Array) -> Array:
    """``prev`` ``(T,)`` shaped to broadcast against ``w`` ``(T, ...)``."""
    return jnp.reshape(prev, prev.shape + (1,) * (np.ndim(w) - 1))


def guarded_weigh(
    weighting: Weighting, stats: Stats, state: Any, ok: Any = True
) -> tuple[Any, Any]:
    """``weighting.weigh`` with the non-finite guard.

    A step whose statistics (the stacked gradients aside, which the weights read), weights
    or new state hold a NaN or Inf, or where ``ok`` (a scalar bool: the caller's own
    check, e.g. that the gradients a loss-based weighting never reads are finite) is
    False, keeps the previous state and returns the previous ``state.weights``
    (broadcast to per-leaf or per-coordinate weights as needed).
    """
    weights, new_state, _ = guarded_weigh_ok(weighting, stats, state, ok)
    return weights, new_state


def guarded_weigh_ok(
    weighting: Weighting, stats: Stats, state: Any, ok: Any = True
) -> tuple[Any, Any, Array]:
    """:func:`guarded_weigh`, and whether the step was finite (a scalar bool)."""
    weights, new_state = weighting.weigh(stats, state)
    # Not scanned: the tracked estimates (a reduction over them would make XLA materialise
    # them next to the state they replace, a T x P temporary, where a donated state is
    # otherwise updated in place) and the `unscanned` accumulators (one more T x P pass).
    # Their finiteness is the weights' (see `tracked`, `unscanned`).
    skip = weighting.unscanned + (() if weighting.tracked is None else (weighting.tracked,))
    checked = new_state._replace(**dict.fromkeys(skip)) if skip else new_state
    # Per-coordinate weights are not scanned (see ``Weighting.weigh``): a T x P reduction
    # over them would make XLA write them out, a fresh T x P buffer per call, where they
    # can otherwise be fused into the combination.
    per_leaf = jax.tree.map(
        lambda w: w if np.ndim(w) <= 1 else None, weights, is_leaf=lambda x: x is None
    )
    ok = jnp.logical_and(ok, all_finite((stats._replace(grads=None), per_leaf, checked)))
    new_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, state)
    prev = state.weights
    if is_task_vector(weights):
        weights = jnp.where(ok, weights, prev)
    else:
        weights = jax.tree.map(
            lambda w: None if w is None else jnp.where(ok, w, broadcast_like(prev, w)),
            weights,
            is_leaf=lambda x: x is None,
        )
    return weights, new_state, ok


def tree_none_outside(mask: PyTree, tree: PyTree) -> PyTree:
    """``tree`` with ``None`` at the leaves where ``mask`` is False."""
    return jax.tree.map(lambda m, x: x if m else None, mask, tree)
