"""The machinery every balancing method shares.

A method in this library is two small functions: ``init_state(num_tasks, params)`` builds
its state, and ``weigh(stats, state)`` maps per-task statistics (Gramian, norms, losses)
to task weights and the next state. Everything else lives here, once:

* validation of the stacked gradient pytree (one leading task axis of the same size on
  every leaf) and of ``task_losses``;
* the ``shared`` mask: task-specific leaves are summed over the task axis and take no part
  in the statistics;
* the statistics, summed leaf by leaf in float32 (float64 under x64), never by ravelling
  all parameters into one vector;
* device averaging (``axis_name``/``sync``);
* the non-finite guard (a step whose statistics, losses or weights are not finite keeps
  the previous state and combines with the previous weights);
* the weighted combination ``sum_i w_i g_i`` leaf by leaf, cast back to each leaf's dtype.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, Protocol, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.core import Tracer

Array: TypeAlias = jax.Array
PyTree: TypeAlias = Any
SharedMask = PyTree | Callable[[PyTree], PyTree] | None
Sync = Literal["grads", "stats"]
StatKind = Literal["gram", "sq_norms", "item_sq_norms", "leaf_sq_norms", "none"]
LossUse = Literal["required", "optional", "unused"]

_HIGHEST = jax.lax.Precision.HIGHEST


def stat_dtype() -> jnp.dtype:
    """The dtype statistics are computed in: float32, or float64 when x64 is enabled."""
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


# --------------------------------------------------------------------------------------
# Hyperparameter validation (construction time; silent for traced values so that
# ``optax.inject_hyperparams`` can pass arrays).
# --------------------------------------------------------------------------------------


def is_concrete(x: Any) -> bool:
    """True when ``x`` is a Python/NumPy number or a concrete (non-traced) array."""
    if isinstance(x, Tracer):
        return False
    return isinstance(x, (numbers.Number, np.ndarray, np.generic, jax.Array))


def is_traced(x: Any) -> bool:
    """True when ``x`` is a tracer (e.g. a hyperparameter under ``optax.inject_hyperparams``)."""
    return isinstance(x, Tracer)


def check_range(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raises ``ValueError`` naming ``name`` and the allowed range if ``value`` is outside.

    Traced values (under ``inject_hyperparams``) are not checked.
    """
    if not is_concrete(value):
        return
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar, got shape {arr.shape}.")
    v = float(arr)
    lo_ok = low is None or (v >= low if low_inclusive else v > low)
    hi_ok = high is None or (v <= high if high_inclusive else v < high)
    if not (lo_ok and hi_ok and np.isfinite(v)):
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        lb = "[" if (low_inclusive and low is not None) else "("
        hb = "]" if (high_inclusive and high is not None) else ")"
        raise ValueError(f"`{name}` must be in {lb}{lo}, {hi}{hb}, got {value!r}.")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}.")


def check_num_tasks(num_tasks: Any, *, required: bool = False) -> int | None:
    if num_tasks is None:
        if required:
            raise ValueError("`num_tasks` is required: pass the number of tasks T >= 1.")
        return None
    if not isinstance(num_tasks, (int, np.integer)) or isinstance(num_tasks, bool):
        raise ValueError(
            f"`num_tasks` must be a Python int >= 1, got {num_tasks!r}"
            " (under optax.inject_hyperparams, list it in `static_args`)."
        )
    if num_tasks < 1:
        raise ValueError(f"`num_tasks` must be >= 1, got {num_tasks}.")
    return int(num_tasks)


def check_task_vector(
    name: str, value: Any, num_tasks: int | None = None, *, nonnegative: bool = False
) -> tuple[Any, int | None]:
    """Validates a per-task vector hyperparameter (task weights, ``pref_vector``).

    It must be a non-empty 1-D sequence or array of finite numbers (and, with
    ``nonnegative``, >= 0 with a positive sum); its length fixes T, which must agree with
    ``num_tasks`` when both are given. A traced value (``optax.inject_hyperparams``) is
    checked for its shape only.

    Returns:
      ``(vector, T)``: a float64 NumPy array (the traced value as it is), or
      ``(None, num_tasks)`` when ``value`` is ``None``.
    """
    if value is None:
        return None, num_tasks
    if is_traced(value):
        shape = np.shape(value)
        if len(shape) != 1 or shape[0] == 0:
            raise ValueError(
                f"`{name}` must be a non-empty 1-D vector (one entry per task), got shape {shape}."
            )
        vec: Any = value
    else:
        if isinstance(value, (str, bytes)) or not isinstance(
            value, Sequence | np.ndarray | jax.Array
        ):
            raise ValueError(
                f"`{name}` must be a 1-D sequence or array of per-task numbers, got {value!r}."
            )
        try:
            vec = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"`{name}` must hold numbers, got {value!r}.") from None
        if vec.ndim != 1 or vec.size == 0:
            raise ValueError(
                f"`{name}` must hold at least one task weight, as a 1-D vector (one entry per "
                f"task); got shape {vec.shape}."
            )
        if nonnegative and (not np.all(np.isfinite(vec)) or np.any(vec < 0) or vec.sum() <= 0):
            raise ValueError(
                f"`{name}` must be finite and >= 0 with a positive sum, got {value!r}."
            )
        if not np.all(np.isfinite(vec)):
            raise ValueError(f"`{name}` must be finite, got {value!r}.")
    t = int(np.shape(vec)[0])
    if num_tasks is not None and num_tasks != t:
        raise ValueError(f"`{name}` has {t} entries but num_tasks={num_tasks}; give one per task.")
    return vec, t


def check_sync(axis_name: Any, sync: Any) -> None:
    check_choice("sync", sync, ("grads", "stats"))
    del axis_name


# --------------------------------------------------------------------------------------
# The stacked tree: validation and the shared mask.
# --------------------------------------------------------------------------------------


def _leaf_paths(tree: PyTree) -> tuple[list[str], list[Any], Any]:
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [jax.tree_util.keystr(p) or "<root>" for p, _ in path_leaves]
    leaves = [x for _, x in path_leaves]
    return paths, leaves, treedef


def num_tasks_of(updates: PyTree, expected: int | None = None) -> int:
    """The task count T of a stacked gradient pytree, validated on every leaf.

    Raises:
      ValueError: at trace time, naming the leaf path, when a leaf has no leading axis,
        when leaves disagree on T, or when T differs from ``expected``.
    """
    paths, leaves, _ = _leaf_paths(updates)
    if not leaves:
        raise ValueError("the stacked gradient pytree has no leaves.")
    first_path, first_t = None, None
    for path, leaf in zip(paths, leaves):
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"gradient leaf {path} is a scalar: stacked gradients need a leading task axis "
                "(leaf shape (T, *param.shape)), e.g. from ob.value_and_task_grads or "
                "jax.jacrev of a (T,)-valued loss."
            )
        t = shape[0]
        if expected is not None and t != expected:
            raise ValueError(
                f"gradient leaf {path} has leading (task) axis of size {t}, but this "
                f"transformation was built for num_tasks={expected}."
            )
        if first_t is None:
            first_path, first_t = path, t
        elif t != first_t:
            raise ValueError(
                f"gradient leaves disagree on the task count: leaf {first_path} has T={first_t} "
                f"but leaf {path} has T={t}; every leaf needs the same leading task axis."
            )
    assert first_t is not None
    if first_t < 1:
        raise ValueError(f"gradient leaf {first_path} has an empty task axis (T=0).")
    return int(first_t)


def unstacked_like(updates: PyTree) -> PyTree:
    """Abstract (ShapeDtypeStruct) params tree: ``updates`` with the task axis removed."""
    return jax.tree.map(lambda g: jax.ShapeDtypeStruct(np.shape(g)[1:], g.dtype), updates)


def resolve_mask(mask: SharedMask, params: PyTree, *, name: str = "shared") -> PyTree:
    """Resolves a ``shared``-style mask to a pytree of Python bools with ``params``' structure.

    ``mask`` is ``None`` (everything True), a pytree of bools with the params' structure or
    a prefix of it (a bool then covers the whole subtree), or a callable
    ``params -> such a pytree``.
    """
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    if callable(mask):
        mask = mask(params)
    try:
        full = jax.tree.map(
            lambda m, sub: jax.tree.map(lambda _: m, sub),
            mask,
            params,
            is_leaf=lambda x: isinstance(x, (bool, np.bool_)),
        )
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"`{name}` mask does not match the parameters' structure: it must be a pytree of "
            f"bools with the params' structure (or a prefix of it), or a callable "
            f"params -> such a pytree. Mask: {jax.tree.structure(mask)}; "
            f"params: {jax.tree.structure(params)}. ({e})"
        ) from None
    paths, leaves, _ = _leaf_paths(full)
    for path, m in zip(paths, leaves):
        if not isinstance(m, (bool, np.bool_)):
            raise ValueError(
                f"`{name}` mask leaf {path} must be a Python bool (True: shared), got "
                f"{type(m).__name__}; masks are static, not arrays."
            )
    return jax.tree.map(bool, full)


def check_losses(task_losses: Any, num_tasks: int, use: LossUse, method: str) -> Array | None:
    """Validates ``task_losses`` (shape ``(T,)``) and casts it to the statistics dtype."""
    if use == "unused":
        return None
    if task_losses is None:
        if use == "required":
            raise ValueError(
                f"{method} needs the per-task losses: call "
                f"`tx.update(grads, state, params, task_losses=losses)` with `losses` of "
                f"shape ({num_tasks},) (ob.value_and_task_grads returns them)."
            )
        return None
    shape = np.shape(task_losses)
    if shape != (num_tasks,):
        raise ValueError(
            f"`task_losses` must have shape ({num_tasks},) (one loss per task), got {shape}."
        )
    return jnp.asarray(task_losses).astype(stat_dtype())


# --------------------------------------------------------------------------------------
# Statistics: computed leaf by leaf, in f32 (f64 under x64).
# --------------------------------------------------------------------------------------


def safe_sqrt(x: Array) -> Array:
    """``sqrt(x)`` for ``x >= 0`` with a zero (not infinite) derivative at 0: a double ``where``."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def safe_inverse(x: Array) -> Array:
    """``1/x`` where ``x > 0``, 0 elsewhere (a zero norm or non-positive loss gives 0)."""
    pos = x > 0
    return jnp.where(pos, 1.0 / jnp.where(pos, x, 1.0), 0.0)


def _rest(g: Array, start: int = 1) -> tuple[int, ...]:
    return tuple(range(start, g.ndim))


# The statistics contract or sum over the parameter axes directly, never through a
# ``reshape(T, -1)``: under sharding-in-types (``AxisType.Explicit``) a reshape that
# merges a sharded axis is an error, and elsewhere it can force a relayout.


def _replicated_if_explicit(g: Array) -> Any:
    """``out_sharding`` for a contraction of ``g``'s sharded axes, or ``None``.

    Under sharding-in-types, a ``dot_general`` contracting axes sharded over an
    ``Explicit`` mesh axis must name its output sharding; the small statistics are
    replicated. Everywhere else (no mesh, ``Auto`` axes, inside ``shard_map``) the
    compiler decides and ``None`` is passed.
    """
    axis_type = getattr(jax.sharding, "AxisType", None)
    typeof = getattr(jax, "typeof", None)
    if axis_type is None or typeof is None:  # JAX without sharding in types
        return None
    sharding = getattr(typeof(g), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if sharding is None or mesh is None or not mesh.axis_names:
        return None
    explicit = {n for n, k in zip(mesh.axis_names, mesh.axis_types) if k == axis_type.Explicit}
    used = set()
    for entry in sharding.spec:
        used.update(entry if isinstance(entry, tuple) else (entry,))
    if not explicit & used:
        return None
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


# How one leaf's Gramian is contracted. On GPU/TPU it is one ``dot_general`` (the
# vendor GEMM splits the long contraction). On CPU, XLA sends a (T, n) x (n, T) dot with
# a tiny output and a long contraction to YNNPACK, which packs the transposed operand and
# runs on one thread: 6-17x one pass over the gradients at n = 1e6, growing faster than
# n. The CPU form (benchmarks/gram_kernels.py times the alternatives, RESULTS.md
# section 5) walks the leaf in column chunks in a fori_loop and contracts each chunk:
#   * by "pairs": all T(T+1)/2 row products in one variadic reduce over (c / blk, blk)
#     blocks, one fused multi-threaded pass whose (scalar) work grows as T^2. It wins for
#     T <= 2 at any size and up to T = _PAIR_MAX_T on leaves of at least _PAIR_MIN_N
#     entries per task; below that its fixed cost loses to the dot, above T ~ 12 its
#     accumulators spill.
#   * by the dot otherwise: per chunk, YNNPACK's packing stays in cache (linear in n,
#     2x faster than one dot at n = 1e6, T >= 16).
# The chunks matter beyond cache: inside a train step the stacked gradients often come
# out of the backward pass in a transposed physical layout (a Dense kernel's gradient is
# computed as (T * out, in)). XLA then fuses that relayout into the Gramian's reads; the
# chunk's dynamic_slice pays it once per element, where a whole-leaf reduce pays it in
# each of its T(T+1)/2 products (benchmarks/run.py's train step at T=8: 1.7x the
# equal-weight step with the whole-leaf reduce, 1.1-1.2x with chunks).
# Both accumulate in the statistics dtype and agree with a float64 Gramian to ~1e-7.
_PAIR_MAX_T = 12
_PAIR_MIN_N = 65536
_PAIR_CHUNK = 65536
_CHUNK = 16384


def _block_size(n: int) -> int:
    """The largest divisor of ``n`` in 16..1024, or 256 (the remainder is then a tail).

    Longer rows amortise the reduce's per-row work (T=8, 65536 columns: 4.6 ms per 1e6
    entries at 64, 3.7 at 1024); each row is summed in order, so rows much longer than
    1024 lose float32 accuracy (4e-6 relative at 3750 on bf16 inputs).
    """
    for b in range(min(n, 1024), 15, -1):
        if n % b == 0:
            return b
    return 256


def _pair_index(t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    iu, ju = np.triu_indices(t)
    index = np.zeros((t, t), np.int32)
    index[iu, ju] = index[ju, iu] = np.arange(iu.size)
    return iu, ju, index


def _pair_sums(x: Array, dt: Any) -> Array:
    """``sum(x[i] * x[j])`` for every pair ``i <= j`` of rows of ``x`` (T, m, blk)."""
    iu, ju, _ = _pair_index(x.shape[0])
    rows = [x[i].astype(dt) for i in range(x.shape[0])]
    products = tuple(rows[i] * rows[j] for i, j in zip(iu, ju))
    zeros = tuple(jnp.zeros((), dt) for _ in products)
    sums = jax.lax.reduce(
        products, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)), (products[0].ndim - 1,)
    )
    return jnp.sum(jnp.stack(sums), axis=1)  # one small reduction, not T(T+1)/2 of them


def _gram_pairs(x: Array, dt: Any) -> Array:
    """The Gramian of ``x`` (T, n) from one variadic reduction over its row products."""
    t, n = x.shape
    blk = _block_size(n)
    m = n // blk
    sums = jnp.zeros((t * (t + 1) // 2,), dt)
    if m:
        sums = sums + _pair_sums(x[:, : m * blk].reshape(t, m, blk), dt)
    if n > m * blk:
        sums = sums + _pair_sums(x[:, m * blk :].reshape(t, 1, n - m * blk), dt)
    return sums[_pair_index(t)[2]]


def _gram_dot(x: Array, dt: Any) -> Array:
    """The Gramian of ``x`` (T, n) as one ``dot_general``."""
    return jax.lax.dot_general(
        x, x, (((1,), (1,)), ((), ())), precision=_HIGHEST, preferred_element_type=dt
    ).astype(dt)


def _gram_chunked(kernel: Callable[[Array, Any], Array], x: Array, dt: Any, chunk: int) -> Array:
    """``kernel``'s Gramian summed over column chunks of ``x`` (T, n) in a loop."""
    t, n = x.shape
    m = n // chunk
    if m < 2:
        return kernel(x, dt)

    def body(i: Array, acc: Array) -> Array:
        return acc + kernel(jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1), dt)

    acc = jax.lax.fori_loop(0, m, body, jnp.zeros((t, t), dt))
    if n > m * chunk:
        acc = acc + kernel(x[:, m * chunk :], dt)
    return acc


def _gram_cpu(x: Array, dt: Any) -> Array:
    t, n = x.shape
    if t <= 2 or (t <= _PAIR_MAX_T and n >= _PAIR_MIN_N):
        return _gram_chunked(_gram_pairs, x, dt, _PAIR_CHUNK)
    return _gram_chunked(_gram_dot, x, dt, _CHUNK)


def leaf_gram(g: Array) -> Array:
    """``g.reshape(T, -1) @ g.reshape(T, -1).T`` accumulated in the statistics dtype."""
    t = g.shape[0]
    dt = stat_dtype()
    axes = _rest(g)
    out_sharding = _replicated_if_explicit(g)
    if t == 1:
        return leaf_sq_norms(g).reshape(1, 1)
    if out_sharding is not None:
        # A reshape that merges an Explicit-sharded axis is an error: contract the axes
        # as they are, naming the (replicated) output sharding.
        return jax.lax.dot_general(
            g,
            g,
            ((axes, axes), ((), ())),
            precision=_HIGHEST,
            preferred_element_type=dt,
            out_sharding=out_sharding,
        ).astype(dt)
    x = g.reshape(t, -1)
    if x.shape[1] == 0:
        return jnp.zeros((t, t), dt)
    return jax.lax.platform_dependent(
        x, cpu=lambda x: _gram_cpu(x, dt), default=lambda x: _gram_dot(x, dt)
    )


def leaf_sq_norms(g: Array) -> Array:
    """Per-task squared norms ``(T,)`` of one stacked leaf, in the statistics dtype."""
    f = g.astype(stat_dtype())
    return jnp.sum(f * f, axis=_rest(g))


def leaf_item_sq_norms(g: Array) -> Array:
    """Per-task, per-batch-item squared norms ``(T, B)``: axis 1 is a batch axis."""
    if g.ndim < 2:
        raise ValueError(
            f"per_batch_item=True needs leaves of shape (T, B, ...), got shape {g.shape}."
        )
    f = g.astype(stat_dtype())
    return jnp.sum(f * f, axis=_rest(g, 2))


def gramian(leaves: Sequence[Array], num_tasks: int) -> Array:
    """The ``(T, T)`` Gramian ``J J^T`` summed over ``leaves``."""
    out = jnp.zeros((num_tasks, num_tasks), stat_dtype())
    for g in leaves:
        out = out + leaf_gram(g)
    return out


def sq_norms(leaves: Sequence[Array], num_tasks: int) -> Array:
    """Per-task squared norms ``(T,)`` summed over ``leaves``."""
    out = jnp.zeros((num_tasks,), stat_dtype())
    for g in leaves:
        out = out + leaf_sq_norms(g)
    return out


class Stats(NamedTuple):
    """Per-task statistics handed to a method's ``weigh`` function.

    Only the fields the method asked for are set; the others are ``None``.

    Attributes:
      num_tasks: T (a Python int).
      gram: ``(T, T)`` Gramian of the statistic leaves.
      sq_norms: ``(T,)`` squared norms (the Gramian's diagonal when it is computed).
      item_sq_norms: ``(T, B)`` per-batch-item squared norms (axis 1 is a batch axis);
        under ``axis_name``, every device's items, ``(T, D*B)``, device-major.
      leaf_sq_norms: a pytree with the params' structure: ``(T,)`` squared norms per
        statistic leaf, ``None`` for the other leaves.
      losses: ``(T,)`` task losses, when given.
    """

    num_tasks: int
    gram: Array | None = None
    sq_norms: Array | None = None
    item_sq_norms: Array | None = None
    leaf_sq_norms: PyTree = None
    losses: Array | None = None


def compute_stats(
    kind: StatKind, updates: PyTree, stat_mask: PyTree, num_tasks: int, losses: Array | None
) -> Stats:
    leaves = [g for g, m in zip(jax.tree.leaves(updates), jax.tree.leaves(stat_mask)) if m]
    if kind == "gram":
        g = gramian(leaves, num_tasks)
        return Stats(num_tasks, gram=g, sq_norms=jnp.diagonal(g), losses=losses)
    if kind == "sq_norms":
        return Stats(num_tasks, sq_norms=sq_norms(leaves, num_tasks), losses=losses)
    if kind == "item_sq_norms":
        items = [leaf_item_sq_norms(g) for g in leaves]
        if items:
            sizes = {int(i.shape[1]) for i in items}
            if len(sizes) != 1:
                raise ValueError(
                    f"per_batch_item=True needs the same batch size on axis 1 of every shared "
                    f"leaf, got sizes {sorted(sizes)}."
                )
            total = sum(items[1:], items[0])
        else:
            total = jnp.zeros((num_tasks, 1), stat_dtype())
        return Stats(num_tasks, item_sq_norms=total, losses=losses)
    if kind == "leaf_sq_norms":
        per_leaf = jax.tree.map(lambda g, m: leaf_sq_norms(g) if m else None, updates, stat_mask)
        return Stats(num_tasks, leaf_sq_norms=per_leaf, losses=losses)
    return Stats(num_tasks, losses=losses)


def _all_finite(tree: PyTree) -> Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    ok = jnp.array(True)
    for x in leaves:
        ok = ok & jnp.all(jnp.isfinite(x))
    return ok


# --------------------------------------------------------------------------------------
# The combination.
# --------------------------------------------------------------------------------------


def combine_leaf(w: Array | np.ndarray, g: Array) -> Array:
    """``sum_i w_i g_i`` for one stacked leaf, accumulated in f32, returned in g's dtype."""
    g = jnp.asarray(g)
    out = jax.lax.dot_general(
        w.astype(stat_dtype()),
        g,
        (((0,), (0,)), ((), ())),
        precision=_HIGHEST,
        preferred_element_type=stat_dtype(),
    )
    return out.astype(g.dtype)


def combine(updates: PyTree, weights: Array | PyTree, shared_mask: PyTree) -> PyTree:
    """Weighted sum over the task axis on shared leaves; plain sum on task-specific ones.

    ``weights`` is a ``(T,)`` array, or a pytree with the params' structure holding a
    ``(T,)`` array per shared leaf (per-leaf weights, as in MetaBalance).
    """
    if isinstance(weights, jax.Array | np.ndarray):
        return jax.tree.map(
            lambda g, m: combine_leaf(weights, g) if m else _sum_leaf(g), updates, shared_mask
        )
    return jax.tree.map(
        lambda g, m, w: combine_leaf(w, g) if m else _sum_leaf(g),
        updates,
        shared_mask,
        weights,
        is_leaf=lambda x: x is None,
    )


def _sum_leaf(g: Array) -> Array:
    g = jnp.asarray(g)
    return jnp.sum(g, axis=0, dtype=stat_dtype()).astype(g.dtype)


# --------------------------------------------------------------------------------------
# The transformation builder.
# --------------------------------------------------------------------------------------


class WeighFn(Protocol):
    def __call__(self, stats: Stats, state: Any) -> tuple[Array | PyTree, Any]: ...


def _pmean(tree: PyTree, axis_name: Any) -> PyTree:
    return jax.tree.map(lambda x: jax.lax.pmean(x, axis_name), tree)


def _gather_items(x: Array, axis_name: Any) -> Array:
    """``(T, B)`` per device -> ``(T, D*B)``, the same on every device (device-major).

    A ``psum`` of zero buffers each holding one device's block, not ``all_gather``: the
    result is then replicated (invariant) over the axis, as ``shard_map``'s replication
    check needs for a state computed from it, and adding zeros is exact.
    """
    n = jax.lax.psum(1, axis_name)  # the axis size, a static int
    buf = jnp.zeros((n, *x.shape), x.dtype)
    buf = jax.lax.dynamic_update_index_in_dim(buf, x, jax.lax.axis_index(axis_name), 0)
    buf = jax.lax.psum(buf, axis_name)
    return jnp.moveaxis(buf, 0, 1).reshape(x.shape[0], n * x.shape[1])


def _sync_stats(stats: Stats, axis_name: Any) -> Stats:
    """Averages the statistics over the axis; per-item statistics are gathered instead."""
    out = {}
    for k, v in stats._asdict().items():
        if k in ("num_tasks", "losses") or v is None:
            continue
        if k == "sq_norms" and stats.gram is not None:
            continue  # the averaged Gramian's diagonal, below: T fewer numbers to send
        out[k] = _gather_items(v, axis_name) if k == "item_sq_norms" else _pmean(v, axis_name)
    if stats.gram is not None:
        out["sq_norms"] = jnp.diagonal(out["gram"])
    return stats._replace(**out)


def balancing_transform(
    *,
    method: str,
    init_state: Callable[[int, PyTree], Any],
    weigh: WeighFn,
    stat: StatKind,
    losses: LossUse,
    num_tasks: int | None,
    shared: SharedMask,
    axis_name: Any,
    sync: Sync = "grads",
    stat_mask: SharedMask = None,
    stat_mask_name: str = "norm_mask",
    stats_sync_only: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Builds a balancing ``GradientTransformationExtraArgs`` from a method's two functions.

    Args:
      method: the method's public name (for error messages).
      init_state: ``(num_tasks, params) -> state``; the state is a NamedTuple of arrays
        with a ``weights`` field of shape ``(T,)``. When the method was built without a
        task count, ``init`` calls it with ``num_tasks=0`` and the first ``update``
        replaces that empty state with ``init_state(T, params)``.
      weigh: ``(stats, state) -> (weights, new_state)``; ``weights`` is ``(T,)`` or a
        per-leaf pytree (see :func:`combine`).
      stat: which statistics ``weigh`` needs.
      losses: whether ``task_losses`` are required, optional or unused.
      num_tasks: the configured T, or ``None`` to take it from the first update.
      shared: the shared mask (see the package docs).
      axis_name: the device axis name when run inside ``shard_map``/``pmap``.
      sync: ``"grads"`` (exact): the output and state equal the single-device result
        on the global batch; the stacked leaves the statistics read are averaged over
        ``axis_name`` before them, the other leaves are combined locally and their
        combination averaged. ``"stats"``: only the statistics and losses are averaged,
        the output is the local combination (the caller averages it). Losses are
        averaged in both modes.
      stat_mask: leaves the statistics are computed on (default: the shared leaves); it
        is intersected with ``shared``.
      stat_mask_name: the public name of ``stat_mask`` (for error messages).
      stats_sync_only: the leaves carry a per-device batch axis (per batch item): in
        both modes gradients are never averaged and the per-item statistics of all
        devices are gathered (exact: every device sees the global batch's items).
    """
    check_sync(axis_name, sync)

    def masks(params: PyTree) -> tuple[PyTree, PyTree]:
        shared_m = resolve_mask(shared, params, name="shared")
        if stat_mask is None:
            return shared_m, shared_m
        stat_m = resolve_mask(stat_mask, params, name=stat_mask_name)
        return shared_m, jax.tree.map(lambda a, b: a and b, shared_m, stat_m)

    def init_fn(params: PyTree) -> Any:
        t = 0 if num_tasks is None else num_tasks
        state = init_state(t, params)
        # One buffer per leaf, even where a method's init reuses an array for two fields:
        # a train step that donates its optimizer state must not see a buffer twice.
        return jax.tree.map(lambda x: jnp.array(x, copy=True), state)

    def update_fn(
        updates: PyTree, state: Any, params: PyTree | None = None, **extra_args: Any
    ) -> tuple[PyTree, Any]:
        t = num_tasks_of(updates, num_tasks)
        updates = jax.tree.map(jnp.asarray, updates)
        like = unstacked_like(updates)
        shared_m, stat_m = masks(params if params is not None else like)
        if jax.tree.structure(shared_m) != jax.tree.structure(updates):
            raise ValueError(
                f"`shared` mask structure {jax.tree.structure(shared_m)} does not match the "
                f"gradients' structure {jax.tree.structure(updates)}."
            )
        state_t = np.shape(state.weights)[0]
        if state_t == 0:
            state = init_state(t, like)
        elif state_t != t:
            raise ValueError(
                f"{method}: the state holds weights for {state_t} tasks but the gradients "
                f"have T={t}; re-run `init` or pass num_tasks={t}."
            )
        task_losses = check_losses(extra_args.get("task_losses"), t, losses, method)

        # Devices. The losses (local-batch means) are averaged in both modes. "grads":
        # the leaves the statistics read are averaged before them, every other leaf is
        # combined locally and averaged after (the combination is linear and the weights
        # are the same on every device), so leaves outside the statistics cost P numbers
        # instead of T*P. "stats" (and per-item statistics, whose items are per device):
        # only the statistics travel; the output stays local.
        grads_mode = axis_name is not None and sync == "grads" and not stats_sync_only
        if axis_name is not None and task_losses is not None:
            task_losses = jax.lax.pmean(task_losses, axis_name)
        read_m = stat_m if stat != "none" else jax.tree.map(lambda _: False, stat_m)
        if grads_mode:
            updates = jax.tree.map(
                lambda g, m: jax.lax.pmean(g, axis_name) if m else g, updates, read_m
            )

        stats = compute_stats(stat, updates, stat_m, t, task_losses)
        if axis_name is not None and not grads_mode:
            stats = _sync_stats(stats, axis_name)

        weights, new_state = weigh(stats, state)
        ok = _all_finite((stats, weights, new_state))
        new_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, state)
        prev = state.weights
        if isinstance(weights, jax.Array | np.ndarray):
            weights = jnp.where(ok, weights, prev)
        else:
            weights = jax.tree.map(
                lambda w: None if w is None else jnp.where(ok, w, prev),
                weights,
                is_leaf=lambda x: x is None,
            )
        out = combine(updates, weights, shared_m)
        if grads_mode:
            out = jax.tree.map(lambda o, m: o if m else jax.lax.pmean(o, axis_name), out, read_m)
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
