"""The stacked gradient tree: its task count, the ``shared`` mask, and the losses."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from optax_balance._core._checks import is_concrete
from optax_balance._core._types import Array, PyTree, SharedMask, stat_dtype

LossUse = Literal["required", "unused"]


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
                f"transformation was built for num_tasks={expected}. (If these are ordinary, "
                f"unstacked gradients, get per-task ones with ob.value_and_task_grads; pass "
                f"`params` to `update` so that every leaf is checked against its parameter.)"
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
    except (ValueError, TypeError):
        raise ValueError(
            f"`{name}` mask does not match the parameters' structure: it must be a pytree of "
            f"bools with the params' structure (or a prefix of it), or a callable "
            f"params -> such a pytree. Mask: {_short(mask)}; params: {_short(params)}."
            + _nnx_hint(params, name)
        ) from None
    paths, leaves, _ = _leaf_paths(full)
    for path, m in zip(paths, leaves):
        if not isinstance(m, (bool, np.bool_)):
            raise ValueError(
                f"`{name}` mask leaf {path} must be a Python bool (True: shared), got "
                f"{type(m).__name__}; masks are static, not arrays."
            )
    return jax.tree.map(bool, full)


def _short(tree: Any, limit: int = 160) -> str:
    """A pytree's structure, cut to ``limit`` characters (an NNX State's is thousands)."""
    text = str(jax.tree.structure(tree))
    return text if len(text) <= limit else text[: limit - 5] + " ...)"


def _nnx_hint(params: Any, name: str) -> str:
    if not type(params).__module__.startswith("flax.nnx"):
        return ""
    return (
        f" The params are a Flax NNX State: build the mask from them with a callable, e.g. "
        f"{name}=lambda params: nnx.map_state(lambda path, _: path[0] != 'heads', params)."
    )


def check_mask_arg(name: str, mask: Any) -> None:
    """Construction-time check of a ``shared``-style argument.

    A bare bool or array is refused: ``None`` already means "every leaf", ``False`` would
    leave nothing to balance, and a bool is what a params-callable returns when
    ``optax.inject_hyperparams`` mistakes it for a schedule and calls it with the step
    count.
    """
    if isinstance(mask, (bool, np.bool_, np.ndarray, jax.Array)):
        raise ValueError(
            f"`{name}` must be None (every leaf), a pytree of bools with the params' "
            f"structure (or a prefix of it), or a callable params -> such a pytree; got "
            f"{mask!r}. Under optax.inject_hyperparams, a callable `{name}` is taken for a "
            f"schedule and called with the step count: list it in `static_args`, e.g. "
            f"optax.inject_hyperparams(ob.upgrad, static_args=('{name}', 'num_tasks'))."
        )


def check_selects(shared_m: PyTree, stat_m: PyTree, stat_mask_name: str, method: str) -> None:
    """Refuses masks that leave no leaf to balance: the weights would mean nothing.

    ``shared_m`` is the resolved ``shared`` mask, ``stat_m`` its intersection with the
    weighting's own mask (GradNorm's ``norm_mask``).
    """
    if not any(jax.tree.leaves(shared_m)):
        raise ValueError(
            f"{method}: the `shared` mask selects no parameter leaf, so every leaf is summed "
            f"as task-specific and nothing is balanced (the output would be the plain sum). "
            f"Mark the parameters the tasks share True, e.g. shared={{'trunk': True, "
            f"'heads': False}}, or pass shared=None if every leaf is shared."
        )
    if not any(jax.tree.leaves(stat_m)):
        raise ValueError(
            f"{method}: `{stat_mask_name}` and `shared` have no leaf in common, so the "
            f"method has no gradient to measure and its weights would never move. "
            f"`{stat_mask_name}` must select shared leaves (e.g. the last shared layer)."
        )


def check_float_leaves(updates: PyTree, method: str) -> None:
    """Gradients must be floating point: ``float0`` is the gradient of an integer param."""
    paths, leaves, _ = _leaf_paths(updates)
    for path, leaf in zip(paths, leaves):
        dtype = jnp.result_type(leaf) if hasattr(leaf, "dtype") else None
        if dtype is None or jnp.issubdtype(dtype, jnp.inexact):
            continue
        what = (
            "float0, the gradient of an integer parameter"
            if dtype == jax.dtypes.float0
            else str(dtype)
        )
        raise ValueError(
            f"{method}: gradient leaf {path} has dtype {what}. Differentiate only the "
            f"floating-point parameters: keep integer state (step counters, indices) out of "
            f"the params you differentiate and pass to the optimizer (with Flax NNX, "
            f"nnx.split(model, nnx.Param, ...) and nnx.Optimizer(..., wrt=nnx.Param))."
        )


def _warn_negative_losses(losses: Any, *, method: str) -> None:
    """Host side of the run-time check: warn if any loss is negative."""
    bad = np.flatnonzero(np.asarray(losses).reshape(-1, np.shape(losses)[-1]).min(0) < 0)
    if bad.size:
        warnings.warn(_negative_message(method, bad), UserWarning, stacklevel=2)


def _negative_message(method: str, tasks: Any) -> str:
    return (
        f"{method}: task_losses of tasks {list(map(int, tasks))} are negative, but this "
        f"method normalises by the loss, which needs losses > 0 (a negative loss gets "
        f"scale 0). Use a non-negative loss (e.g. shift a negative log-likelihood by a "
        f"lower bound) or a normalisation that does not read the losses (norm_type='l2')."
    )


def check_losses(
    task_losses: Any,
    num_tasks: int | None,
    required: bool,
    method: str,
    nonnegative: bool = False,
) -> Array | None:
    """Validates ``task_losses`` (shape ``(T,)``) and casts it to the statistics dtype.

    Returns ``None`` when the method does not use the losses (whatever was passed: optax
    forwards every keyword to every member of a chain). With ``nonnegative`` (a method that
    normalises by the loss), a negative loss is a ``ValueError`` when the losses are
    concrete; traced, see :func:`warn_if_negative`.
    """
    if not required:
        return None
    if task_losses is None:
        raise ValueError(
            f"{method} needs the per-task losses: call "
            f"`tx.update(grads, state, params, task_losses=losses)` with `losses` of "
            f"shape ({num_tasks or 'T'},) (ob.value_and_task_grads returns them)."
        )
    shape = np.shape(task_losses)
    if shape != (num_tasks,) and not (num_tasks is None and len(shape) == 1 and shape[0]):
        raise ValueError(
            f"`task_losses` must have shape ({num_tasks},) (one loss per task), got {shape}."
        )
    if nonnegative and is_concrete(task_losses):
        bad = np.flatnonzero(np.asarray(task_losses) < 0)
        if bad.size:
            raise ValueError(_negative_message(method, bad))
    return jnp.asarray(task_losses).astype(stat_dtype())


def warn_if_negative(losses: Array, method: str) -> None:
    """Warns at run time (a ``UserWarning``) when a traced loss is negative.

    Under ``jit`` the values are unknown while tracing, so the check runs on the device
    and calls back to the host only when a loss is negative (``lax.cond``; under ``vmap``
    the host re-checks the values). It is added only for methods that normalise by the
    loss, which a negative loss (an NLL) silently breaks.
    """
    if is_concrete(losses):
        return
    jax.lax.cond(
        jnp.any(losses < 0),
        lambda x: jax.debug.callback(functools.partial(_warn_negative_losses, method=method), x),
        lambda x: None,
        losses,
    )


def is_stacked(
    updates: PyTree, params: PyTree | None, num_tasks: int | None, *, method: str
) -> bool:
    """Whether ``updates`` are stacked per-task gradients or one ordinary gradient.

    With ``params``, every leaf must be ``(T, *param.shape)`` (stacked) or every leaf
    ``param.shape`` (ordinary); anything else is a ``ValueError`` naming the leaf. Without
    ``params`` the leaves are read as stacked unless ``num_tasks`` (from the losses) rules
    it out: a leaf that is a scalar or whose leading axis is not T is ordinary. When both
    readings fit, a ``ValueError`` asks for ``params``.
    """
    g_paths, g_leaves, g_def = _leaf_paths(updates)
    if params is not None and jax.tree.structure(params) == g_def:
        p_leaves = jax.tree.leaves(params)
        shapes = [(tuple(np.shape(g)), tuple(np.shape(p))) for g, p in zip(g_leaves, p_leaves)]
        if all(g == p for g, p in shapes):
            return False
        t = shapes[0][0][:1]
        for path, (g, p) in zip(g_paths, shapes):
            if len(g) != len(p) + 1 or g[1:] != p or g[:1] != t:
                raise ValueError(
                    f"{method}: gradient leaf {path} has shape {g} where the parameter has "
                    f"shape {p}: stacked per-task gradients need a leading task axis of the "
                    f"same size T on every leaf, shape (T, *param.shape) (as from "
                    f"ob.value_and_task_grads); an ordinary gradient has every leaf shaped "
                    f"like its parameter."
                )
        return True
    if num_tasks is None:
        return True
    if any(np.ndim(g) == 0 or np.shape(g)[0] != num_tasks for g in g_leaves):
        return False
    raise ValueError(
        f"{method}: cannot tell whether these gradients are stacked per task (leading axis "
        f"T={num_tasks}) or one ordinary gradient whose leaves happen to start with "
        f"{num_tasks}: pass `params` to `update` (tx.update(grads, state, params, ...))."
    )


def check_second_batch(updates2: PyTree, updates: PyTree, method: str) -> PyTree:
    """Validates ``task_grads2`` (a second mini-batch's stacked gradients) against the first.

    The two trees must have the same structure and every leaf the same shape (so the same
    T); dtypes may differ.

    Raises:
      ValueError: naming the leaf path and both shapes, or both structures.
    """
    if jax.tree.structure(updates2) != jax.tree.structure(updates):
        raise ValueError(
            f"{method}: `task_grads2` must have the structure of the first batch's stacked "
            f"gradients, {jax.tree.structure(updates)}; got {jax.tree.structure(updates2)}."
        )
    paths, leaves2, _ = _leaf_paths(updates2)
    for path, g2, g1 in zip(paths, leaves2, jax.tree.leaves(updates)):
        if np.shape(g2) != np.shape(g1):
            raise ValueError(
                f"{method}: `task_grads2` leaf {path} has shape {np.shape(g2)} but the first "
                f"batch's has shape {np.shape(g1)}: both batches' stacked gradients need the "
                f"same leaves, shape (T, *param.shape) with the same T."
            )
        if not jnp.issubdtype(jnp.result_type(g2), jnp.inexact):
            raise ValueError(
                f"{method}: `task_grads2` leaf {path} has dtype {jnp.result_type(g2)}; "
                f"gradients are floating point."
            )
    return updates2


def stacked_zeros_like(params: PyTree, num_tasks: int) -> PyTree:
    """Zeros of shape ``(T, *leaf.shape)`` in the statistics dtype, ``None`` stays ``None``.

    The gradient-sized state of a weighting with tracked estimates
    (``Weighting.tracked``). Built from ``zeros_like`` of each leaf, so concrete params
    placed on a mesh, and params typed with ``Explicit`` sharding, give estimates sharded
    like them with the task axis unsharded (under ``jit`` with ``Auto`` axes the compiler
    places them, as for any optax state: pass ``out_shardings`` to a jitted ``init``).
    """

    def zeros(p: Any) -> Any:
        if p is None:
            return None
        z = jnp.zeros_like(p, dtype=stat_dtype())
        return jnp.broadcast_to(z[None], (num_tasks, *np.shape(p)))

    return jax.tree.map(zeros, params, is_leaf=lambda x: x is None)
