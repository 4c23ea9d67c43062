"""TrimmedMean: per coordinate, the mean of the task gradients without the extreme values."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core


class TrimmedMeanState(NamedTuple):
    r"""State of :func:`trimmed_mean`.

    Attributes:
      weights: ``(T,)`` the effective weight of each task in the last update,
        :math:`w_i = \sum_k m_{ik} g_{ik}^2 / \sum_k g_{ik}^2` over the shared
        coordinates k, with :math:`m_{ik}` the per-coordinate weight (``1/(T - 2b)`` where
        :math:`g_{ik}` was kept, 0 where it was trimmed): the coefficient of the
        projection of task i's contribution onto its gradient (``1/(T - 2b)``, the weight
        of a kept value, for a zero gradient; ``1/T`` before the first update). The
        per-coordinate weights themselves are not stored; a step with non-finite
        gradients combines every coordinate with these.
    """

    weights: jax.Array


def _is_none(x: Any) -> bool:
    return x is None


def check_task_count(num_tasks: int, trim_number: int) -> None:
    """``ValueError`` unless T >= 2 trim_number + 1."""
    if num_tasks < 2 * trim_number + 1:
        raise ValueError(
            f"trimmed_mean with `trim_number`={trim_number} needs at least "
            f"{2 * trim_number + 1} tasks (2 * trim_number + 1), got T={num_tasks}."
        )


# Up to this many tasks the T(T-1)/2 pairwise comparisons per coordinate are written out:
# one fused elementwise pass (P=1e6 on a loaded 2-core EPYC: 13-24 ms at T=8 and 48-65 ms
# at T=16, against 84 ms for a row-by-row count at T=8 and a one-pass floor of 1-7 ms).
# Beyond, with trim_number <= _EXTREME_MAX_B, the b smallest and largest distinct values
# of each coordinate with their counts, one reduce over the task axis each
# (_extreme_coefficients; quiet EPYC, P=1e6: T=20 88 ms, T=32 162 ms, against 271 and
# 564 ms for the loop below). Otherwise a fori_loop over the tasks, one pass over the
# stacked leaf per task; a fully unrolled T=32 compiles for 22 s and is no faster, and a
# per-coordinate sort measured slower still.
_UNROLL_MAX_T = 16


def _kept(
    below: jax.Array, equal: jax.Array, t: int, trim_number: int, inv: Any = None
) -> jax.Array:
    """Weight of an entry with ``below`` smaller and ``equal`` equal entries (itself too).

    ``inv``: ``1 / (equal (T - 2 trim_number))`` when the caller has it without a division
    per entry (:func:`_extreme_coefficients`).
    """
    lo = jnp.maximum(below, trim_number)
    hi = jnp.minimum(below + equal, t - trim_number)
    if inv is None:
        return jnp.maximum(hi - lo, 0.0) / (equal * (t - 2 * trim_number))
    return jnp.maximum(hi - lo, 0.0) * inv


# Beyond _UNROLL_MAX_T tasks, a trim_number up to this takes the extremes instead
# (:func:`_extreme_coefficients`): O(b T) per coordinate, not O(T^2).
_EXTREME_MAX_B = 4


def _by_extremes(t: int, trim_number: int) -> bool:
    return t > _UNROLL_MAX_T and trim_number <= _EXTREME_MAX_B


def _min_count(a: tuple[Any, Any], b: tuple[Any, Any]) -> tuple[Any, Any]:
    """Reducer of ``(value, count)`` pairs: the smaller value, with the counts of ties."""
    v = jnp.minimum(a[0], b[0])
    return v, jnp.where(a[0] == v, a[1], 0.0) + jnp.where(b[0] == v, b[1], 0.0)


def _smallest(x: jax.Array, b: int) -> list[tuple[jax.Array, jax.Array]]:
    """The ``b`` smallest distinct values per coordinate over the task axis, with counts.

    Each is one reduce over the task axis of ``(value, 1)`` pairs (:func:`_min_count`)
    on the entries above the previous value; past the last distinct value, ``(inf, 0)``.
    A reduce is computed once per coordinate: the coefficients that compare with its
    result do not repeat it.
    """
    out = []
    prev = None
    for _ in range(b):
        masked = x if prev is None else jnp.where(x > prev, x, jnp.inf)
        v, n = jax.lax.reduce(
            (masked, jnp.ones_like(masked)),
            (jnp.array(jnp.inf, x.dtype), jnp.array(0.0, x.dtype)),
            _min_count,
            (0,),
        )
        out.append((v, jnp.where(v < jnp.inf, n, 0.0)))
        prev = v
    return out


def _extreme_coefficients(g: jax.Array, trim_number: int) -> jax.Array:
    """:func:`trimmed_mean_coefficients` from the ``b`` smallest and largest distinct
    values of each coordinate with their counts, in O(b T) per coordinate.

    An entry equal to the k-th smallest distinct value ``v_k`` has ``below`` = the count
    of the values before it and ``equal`` = its own count, exactly; likewise from the
    top. Only such entries can reach a trimmed position (the others have at least ``b``
    entries below and above them), and get the tie-sharing weight; every other entry is
    kept whole, ``1 / (T - 2b)``.
    """
    t, b = g.shape[0], trim_number
    dt = g.dtype
    below = jnp.full(g.shape, float(b), dt)
    equal = jnp.ones(g.shape, dt)
    # 1 / (equal (T - 2b)), from per-coordinate arrays: no division per entry, which would
    # make XLA write the coefficients out rather than fuse them into their consumers.
    inv = jnp.full(g.shape, 1.0 / (t - 2 * b), dt)
    # From the top first: where a value is extreme both ways, the bottom's counts (also
    # exact) overwrite them.
    for side in (-1.0, 1.0):
        before = jnp.zeros(g.shape[1:], dt)
        for v, n in _smallest(side * g, b):
            hit = (side * g == v) & (before < b)
            below = jnp.where(hit, before if side > 0 else t - before - n, below)
            equal = jnp.where(hit, n, equal)
            inv = jnp.where(hit, 1.0 / (jnp.maximum(n, 1.0) * (t - 2 * b)), inv)
            before = before + n
    return _kept(below, equal, t, b, inv)


def trimmed_mean_coefficients(g: jax.Array, trim_number: int) -> jax.Array:
    r"""Per-coordinate weights of one stacked leaf ``g`` ``(T, *shape)``.

    Sorting column k, the entries at sorted positions ``trim_number`` to
    ``T - trim_number - 1`` are kept with weight ``1 / (T - 2 trim_number)``. An entry
    whose value is tied with others shares their kept positions equally: a group of
    :math:`e` equal entries at sorted positions :math:`[b, b + e)` gives each
    :math:`|[b, b + e) \cap [t, T - t)| / (e (T - 2t))`, so the weights do not depend
    on the order of the tasks and their sum is always 1. The positions come from pairwise
    comparisons (how many entries are smaller, how many equal), not a sort.
    """
    t = g.shape[0]
    dt = _core.stat_dtype()
    if t <= _UNROLL_MAX_T:
        below = [jnp.zeros(g.shape[1:], dt) for _ in range(t)]
        equal = [jnp.ones(g.shape[1:], dt) for _ in range(t)]
        for i in range(t):
            for j in range(i + 1, t):
                j_below = (g[j] < g[i]).astype(dt)
                i_below = (g[i] < g[j]).astype(dt)
                same = 1.0 - j_below - i_below  # (a NaN counts as equal: the guard rejects it)
                below[i], below[j] = below[i] + j_below, below[j] + i_below
                equal[i], equal[j] = equal[i] + same, equal[j] + same
        return jnp.stack([_kept(below[i], equal[i], t, trim_number) for i in range(t)])

    if _by_extremes(t, trim_number):
        return _extreme_coefficients(g.astype(dt), trim_number)

    def body(j: Any, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        below, equal = carry
        gj = g[j]
        return below + (gj < g).astype(dt), equal + (gj == g).astype(dt)

    zeros = jnp.zeros(g.shape, dt)
    below, equal = jax.lax.fori_loop(0, t, body, (zeros, zeros))
    # An entry always equals itself; a NaN does not, so it is counted once by hand.
    equal = jnp.where(jnp.isnan(g), equal + 1.0, equal)
    return _kept(below, equal, t, trim_number)


def trimmed_mean_weighting(trim_number: int) -> _core.Weighting:
    r"""TrimmedMean's weighting: per-coordinate weights from the stacked gradients.

    See :func:`optax_balance.trimmed_mean`. It reads the stacked gradients (``needs =
    ("grads",)``) and returns per statistic leaf weights of the leaf's stacked shape
    (:func:`trimmed_mean_coefficients`).

    Args:
      trim_number: :math:`b \ge 0`, the number of largest and of smallest values dropped
        per coordinate (T must be at least :math:`2b + 1`).

    Returns:
      An :class:`optax_balance.Weighting` of the stacked gradients; its state is
      :class:`optax_balance.TrimmedMeanState`.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> J = jnp.array([[1e11, 3.0], [1.0, -1e11], [-1e10, 1e10], [2.0, 2.0]])
      >>> weights, state = ob.weightings.trimmed_mean(1)(ob.Stats(grads={"a": J}))
      >>> weights["a"]                          # the two middle values of each column
      Array([[0. , 0.5],
             [0.5, 0. ],
             [0. , 0. ],
             [0.5, 0.5]], dtype=float32)

    References:
      Yin, Chen, Ramchandran & Bartlett, `Byzantine-Robust Distributed Learning: Towards
      Optimal Statistical Rates <https://proceedings.mlr.press/v80/yin18a.html>`_, ICML
      2018.
    """
    b = _core.check_int("trim_number", trim_number, low=0)
    dt = _core.stat_dtype

    def init(t: int) -> TrimmedMeanState:
        if t:
            check_task_count(t, b)
        return TrimmedMeanState(weights=jnp.full((t,), 1.0 / max(t, 1), dt()))

    def weigh(stats: _core.Stats, state: TrimmedMeanState) -> tuple[Any, TrimmedMeanState]:
        del state
        t = stats.num_tasks
        check_task_count(t, b)
        leaves, treedef = jax.tree.flatten(stats.grads, is_leaf=_is_none)
        coefs: list[Any] = []
        kept = jnp.zeros((t,), dt())
        sq = jnp.zeros((t,), dt())
        for g in leaves:
            if g is None:
                coefs.append(None)
                continue
            g = jnp.asarray(g).astype(dt())
            m = trimmed_mean_coefficients(g, b)
            axes = tuple(range(1, g.ndim))
            # Non-finite whenever a coefficient is (then so is the summary, as the core
            # requires of per-coordinate weights: it does not scan them).
            if _by_extremes(g.shape[0], b):
                # A few comparisons with reduced extremes per entry: fused into the kept
                # norms and the combination, never written out (_core.fused_sum).
                kept = kept + _core.fused_sum(m * g * g, axes, m)
            else:
                # Pairwise counts: written out once, then read by the summary and the
                # combination (fused, they would be recounted in each).
                m = jax.lax.optimization_barrier(m)
                kept = kept + jnp.sum(m * g * g, axis=axes)
            coefs.append(m)
            sq = sq + _core.leaf_sq_norms(g)
        pos = sq > 0
        # A zero gradient: the weight of a kept value (0/0 otherwise).
        w = jnp.where(pos, kept / jnp.where(pos, sq, 1.0), 1.0 / (t - 2 * b))
        # A non-finite gradient makes its task's norm non-finite: the summary is then
        # NaN, so that the core's guard keeps the state (the masks alone stay finite).
        w = jnp.where(jnp.isfinite(sq), w, jnp.nan).astype(dt())
        return jax.tree.unflatten(treedef, coefs), TrimmedMeanState(weights=w)

    return _core.Weighting(init, weigh, needs=("grads",), name="trimmed_mean")


def trimmed_mean(
    trim_number: int,
    *,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""TrimmedMean: per coordinate, the mean of the task gradients without the extremes.

    The coordinate-wise trimmed mean (Yin et al., 2018), as torchjd's ``TrimmedMean``:
    for every coordinate k of the shared parameters, sort the T values
    :math:`g_{1k}, \dots, g_{Tk}`, drop the :math:`b` = ``trim_number`` largest and the
    :math:`b` smallest, and average the rest:

    .. math::

      d_k = \frac{1}{T - 2b} \sum_{r = b}^{T - b - 1} g_{(r)k} ,

    with :math:`g_{(r)k}` the r-th smallest value. ``trim_number=0`` is the mean. This is
    a robust aggregator: up to :math:`b` arbitrary (adversarial, outlying) task
    gradients cannot pull any coordinate beyond the others' range.

    It reads the stacked gradients (not a Gramian): its weights are per coordinate,
    ``1/(T - 2b)`` on kept values and 0 on trimmed ones (tied values share the kept
    positions equally; see :func:`trimmed_mean_coefficients`), combined leaf by leaf
    by the core. The ranks come from the :math:`T^2` pairwise comparisons per
    coordinate, no sort (XLA's CPU sort over a short axis is many times slower).
    ``state.weights`` is a per-task summary of them (see :class:`TrimmedMeanState`).
    Task-specific leaves (``shared=False``) are summed, not averaged.

    T must be at least :math:`2b + 1`: a ``ValueError`` at construction when
    ``num_tasks`` is given, else when the first update is traced.

    Args:
      trim_number: :math:`b \ge 0`, the number of largest and of smallest values dropped
        per coordinate.
      shared: which parameter leaves are shared (``None``: all); other leaves are summed.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` only (the stacked shared gradients are averaged over
        ``axis_name`` first; ``"stats"`` raises).
      num_tasks: T, if known; gives ``init`` a full-shape state.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state is
      :class:`TrimmedMeanState`.

    Raises:
      ValueError: for ``trim_number`` not an integer >= 0, ``num_tasks < 1``, T below
        ``2 trim_number + 1``, or ``sync="stats"`` with an ``axis_name``.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> J = jnp.array([[1e11, 3.0], [1.0, -1e11], [-1e10, 1e10], [2.0, 2.0]])
      >>> tx = ob.trimmed_mean(1)
      >>> d, state = tx.update(J, tx.init(jnp.zeros(2)))
      >>> d                                            # torchjd's TrimmedMean(1)(J)
      Array([1.5, 2.5], dtype=float32)

    References:
      Yin, Chen, Ramchandran & Bartlett, `Byzantine-Robust Distributed Learning: Towards
      Optimal Statistical Rates <https://proceedings.mlr.press/v80/yin18a.html>`_, ICML
      2018.
    """
    weighting = trimmed_mean_weighting(trim_number)
    t_cfg = _core.check_num_tasks(num_tasks)
    if t_cfg is not None:
        check_task_count(t_cfg, int(trim_number))
    return _core.balance(
        weighting, shared=shared, axis_name=axis_name, sync=sync, num_tasks=num_tasks
    )
