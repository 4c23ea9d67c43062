"""Parameter-level balancing at the memory of one gradient: the Gramian from VJP/JVP pairs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_balance import _core
from optax_balance._core import Array, PyTree

# The statistics a VJP/JVP pair gives without the stacked gradients.
_ELIGIBLE = ("gram", "sq_norms", "losses")
_STACKED_PATH = (
    "use the stacked path instead: `losses, grads = ob.value_and_task_grads(fn)(params, "
    "...)` then `tx.update(grads, state, params, task_losses=losses)`"
)


class _Method(NamedTuple):
    weighting: _core.Weighting
    shared: _core.SharedMask
    axis_name: Any
    sync: str
    num_tasks: int | None


def _method_parts(method: Any) -> _Method:
    if isinstance(method, _core.Weighting):
        return _Method(method, None, None, "grads", method.num_tasks)
    weighting = getattr(method, "weighting", None)
    if not isinstance(weighting, _core.Weighting):
        raise ValueError(
            "value_and_weighted_grad: `method` must be a method of this library (e.g. "
            "ob.upgrad(shared=...)) or a weighting (e.g. ob.weightings.upgrad()), got "
            f"{method!r}."
        )
    return _Method(weighting, method.shared, method.axis_name, method.sync, method.num_tasks)


def _varying_axes(x: Any) -> frozenset[Any]:
    """The manual mesh axes ``x`` varies over inside ``shard_map`` (empty elsewhere)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # JAX >= 0.9; ``.vma`` before
    return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", ()) or ())


def _varying_like(x: Array, like: Array) -> Array:
    """``x`` marked as varying over the mesh axes ``like`` varies over (inside shard_map, a
    tangent of a per-device point must vary as the point does)."""
    missing = _varying_axes(like) - _varying_axes(x)
    if not missing:
        return x
    return jax.lax.pcast(x, tuple(sorted(missing, key=str)), to="varying")


def _strong(x: Any) -> Any:
    """``x`` without a weak type, so a loop carrying a state keeps its types."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return x
    return x.astype(x.dtype)


def _recompute_broadcasts(prim: Any, *_: Any, **__: Any) -> bool:
    """A ``jax.checkpoint`` policy: save every residual but broadcasts.

    Linearising stores as residuals the broadcasts a derivative rule builds from known
    values, e.g. the zeros of ``relu``'s ``select(x > 0, t, 0)``: one activation-sized
    buffer each, held through all 2T + 1 products. Recomputed, a broadcast is fused into
    its consumer for free; everything else is still computed once, in the one forward
    pass.
    """
    return getattr(prim, "name", None) != "broadcast_in_dim"


def _sq_sum(v: Array) -> Array:
    """Squared norm of each row of a stacked leaf, in the statistics dtype."""
    f = v.astype(_core.stat_dtype())
    return jnp.sum(f * f, axis=tuple(range(1, f.ndim)))


def value_and_weighted_grad(
    fn: Callable[..., Any], method: Any, *, has_aux: bool = False, chunk_size: int = 1
) -> Callable[..., tuple[Any, PyTree, Any]]:
    r"""A method's balanced gradient without stacked task gradients: O(P) memory, any T.

    For ``fn(params, *args) -> (T,)`` losses with Jacobian :math:`J` (rows :math:`g_i`),
    column :math:`i` of the Gramian :math:`G = J J^\top` is :math:`J (J^\top e_i)`: one
    vector-Jacobian product (VJP) and one Jacobian-vector product (JVP). The returned
    function linearises ``fn`` once (one forward pass, its residuals reused), builds
    :math:`G` column by column in a loop, lets the method weigh it, and takes one more VJP
    with the weights:

    .. math::

      d = J_s^\top w = \sum_i w_i\, g_i \quad \text{on shared leaves}, \qquad
      d = \sum_i g_i \quad \text{on task-specific leaves},

    which equals, to rounding, what ``method``'s ``update`` returns on the stacked
    gradients (with the same state). Peak memory is that of one gradient plus the forward
    residuals and one pass's intermediates, whatever T (the stacked path holds T
    gradients); the cost is T VJPs and T JVPs instead of one vectorised backward pass
    over T rows. Methods whose weights read only the norms (the balancer, GradNorm) take
    T VJPs and no JVP; loss-based weightings take no column at all.

    ``method`` is a method of this library whose statistics are the Gramian, the norms
    (its diagonal) or the losses: MGDA, UPGrad, DualProj, PCGrad, CAGrad, IMTL-G,
    Nash-MTL, Aligned-MTL, the balancer (not ``per_batch_item``), GradNorm (norms over
    its ``norm_mask``), CR-MOGM of any of those, or their ``ob.weightings`` (then all
    leaves are shared, one device). Its ``shared`` mask (task heads: out of the
    Gramian, their plain summed gradient), ``axis_name``/``sync`` and non-finite guard
    act as in ``update``. Methods that read the stacked gradients themselves (per-leaf
    norms, per-coordinate weights, gradient-sized state) raise a ``ValueError``.

    Devices, with ``axis_name`` inside ``shard_map``/``pmap`` (local-batch losses, params
    marked varying as for ``value_and_task_grads``): ``sync="grads"`` (exact) averages
    each VJP :math:`J^\top e_i` (P_s numbers) and each column :math:`J v_i` (T numbers)
    over the axis, so the Gramian is the global batch's
    :math:`\bar J \bar J^\top` (:math:`\bar J` the mean of the local Jacobians, not the
    mean of the local Gramians), and the output is averaged: output and state equal the
    one-device result on the global batch, with the stacked path's all-reduce volume
    (T·P_s + T² + P). ``sync="stats"`` averages only the local Gramians (or norms) and
    the losses: identical weights and state everywhere, the local combination out.

    Precision: the columns come out of a JVP at ``fn``'s own precision (the model's dtype
    and matmul precision), then are symmetrised and weighed in float32; the stacked path
    accumulates the Gramian in float32 from the stored gradients. The weights enter the
    last VJP in the losses' dtype.

    Args:
      fn: ``fn(params, *args, **kwargs)`` returning the ``(T,)`` losses, or
        ``(losses, aux)`` with ``has_aux``; ``params`` a pytree of float arrays (a dict,
        a Flax NNX ``nnx.split`` state, ...). Forward-mode differentiable: a
        ``jax.custom_vjp`` without a JVP rule raises a ``ValueError`` naming the stacked
        path (unless the method needs norms only).
      method: e.g. ``ob.upgrad(shared=...)`` or ``ob.weightings.mgda()``.
      has_aux: whether ``fn`` returns auxiliary data.
      chunk_size: columns computed at once (``jax.vmap``): memory ~ ``chunk_size``
        gradients (on CPU about two per column: XLA adds layout copies), for speed where
        one column leaves an accelerator idle. 1 (default) keeps one gradient, and was
        the fastest on CPU (``benchmarks/lowmem.py``'s MLP, T=8: 528 ms against 808-920
        ms for 2, 4, 8).

    Returns:
      A function ``(params, method_state, *args, **kwargs) -> (losses, grad,
      method_state)`` (``(losses, aux)`` in place of ``losses`` with ``has_aux``):
      ``grad`` has the params' structure and dtypes. ``method_state`` is
      ``method.init(params)`` (or ``weighting.init(T)``) and is threaded like an
      optimizer state; chain the gradient into any optimizer.

    Raises:
      ValueError: at construction for a method that needs the stacked gradients or an
        invalid ``chunk_size``; when called, for losses that are not 1-D, a T that the
        method or state rules out, or a function without forward-mode derivatives.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> def losses(p):                                 # gradients: the rows of J
      ...     return J @ p
      >>> tx = ob.upgrad(num_tasks=2)
      >>> step = ob.value_and_weighted_grad(losses, tx)
      >>> vals, d, state = step(jnp.zeros(3), tx.init(jnp.zeros(3)))
      >>> print(np.asarray(d).round(4), np.asarray(state.weights).round(4))  # as update
      [0.2929 1.9004 1.9004] [1.1109 0.7894]

    References:
      Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
      <https://arxiv.org/abs/2406.16232>`_, 2024 (Gramian-based weightings; torchjd's
      ``autogram`` builds the Gramian with per-layer hooks instead).
    """
    m = _method_parts(method)
    bad = [n for n in m.weighting.needs if n not in _ELIGIBLE]
    if bad:
        raise ValueError(
            f"value_and_weighted_grad: the {m.weighting.name} method reads {bad}, "
            f"statistics of the stacked gradients themselves that no Gramian gives; "
            f"{_STACKED_PATH}."
        )
    if m.weighting.head_scales is not None:
        raise ValueError(
            f"value_and_weighted_grad: the {m.weighting.name} method weighs the "
            f"task-specific leaves by per-task scales from its new state (after the "
            f"weights), which this one-pass path does not apply; {_STACKED_PATH}."
        )
    chunk = _core.check_int("chunk_size", chunk_size, low=1)

    def wrapped(params: PyTree, method_state: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return _weighted_grad(fn, m, has_aux, chunk, params, method_state, args, kwargs)
        except TypeError as e:
            if "custom_vjp" not in str(e):
                raise
            raise ValueError(
                "value_and_weighted_grad builds the Gramian with forward-mode products "
                f"(JVPs), and JAX cannot differentiate `fn` in forward mode ({e}): give the "
                f"jax.custom_vjp function a JVP rule (jax.custom_jvp), or {_STACKED_PATH}."
            ) from e

    return wrapped


def _weighted_grad(
    fn: Callable[..., Any],
    m: _Method,
    has_aux: bool,
    chunk: int,
    params: PyTree,
    state: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[Any, PyTree, Any]:
    weighting = m.weighting
    leaves, treedef = jax.tree.flatten(params)
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            raise ValueError(
                f"value_and_weighted_grad: parameter leaf {jax.tree_util.keystr(path)} has "
                f"dtype {jnp.result_type(x)}; pass only the float parameters (e.g. "
                f"nnx.split(model, nnx.Param, ...)) and close over the rest in `fn`."
            )
    shared_m, stat_m = _core.statistic_masks(weighting, m.shared, params)
    shared_f, stat_f = jax.tree.leaves(shared_m), jax.tree.leaves(stat_m)

    def call(p: PyTree) -> Any:
        return fn(p, *args, **kwargs)

    f = jax.checkpoint(call, policy=_recompute_broadcasts, prevent_cse=False)

    if has_aux:
        losses, f_jvp, aux = jax.linearize(f, params, has_aux=True)
    else:
        (losses, f_jvp), aux = jax.linearize(f, params), None
    if not hasattr(losses, "ndim") or losses.ndim != 1 or losses.shape[0] == 0:
        raise ValueError(
            "value_and_weighted_grad: `fn` must return a 1-D array of per-task losses of "
            f"shape (T,), got {getattr(losses, 'shape', type(losses))}."
        )
    t = int(losses.shape[0])
    if m.num_tasks is not None and t != m.num_tasks:
        raise ValueError(
            f"value_and_weighted_grad: `fn` returns {t} losses, but the {weighting.name} "
            f"method was built for num_tasks={m.num_tasks}."
        )
    f_vjp = jax.linear_transpose(f_jvp, params)

    def vjp(cot: Array) -> list[Array]:
        return jax.tree.leaves(f_vjp(cot)[0])

    def jvp(tangent: list[Array]) -> Array:
        return f_jvp(jax.tree.unflatten(treedef, tangent))

    state = jax.tree.map(_strong, _core.ready_state(weighting, state, t, params, m.shared))
    stat_losses = _core.check_losses(losses, t, weighting.needs_losses, weighting.name)
    axis = m.axis_name
    grads_mode = axis is not None and m.sync == "grads"
    stats_mode = axis is not None and m.sync == "stats"
    if axis is not None and stat_losses is not None:
        stat_losses = jax.lax.pmean(stat_losses, axis)
    # Cotangents carry the losses' device variance (inside shard_map, local losses vary).
    one = jnp.ones_like(losses)
    dt = _core.stat_dtype()
    shared_i = [i for i, s in enumerate(shared_f) if s]
    task_i = [i for i, s in enumerate(shared_f) if not s]
    stat_i = [i for i, s in enumerate(stat_f) if s]

    def pmean(x: Any) -> Any:
        return jax.lax.pmean(x, axis)

    def weigh(stats: _core.Stats, st: Any) -> tuple[Array, Any]:
        w, new_st = _core.guarded_weigh(weighting, stats, st)
        if not isinstance(w, jax.Array):
            raise ValueError(
                f"value_and_weighted_grad: the {weighting.name} weighting returns per-leaf "
                f"or per-coordinate weights, which one VJP cannot apply; {_STACKED_PATH}."
            )
        new_st = jax.tree.map(lambda n, o: _varying_like(_strong(n), o), new_st, st)
        return w, new_st

    def weighted(w: Array) -> list[Array]:
        """``J^T w`` on the shared leaves (one VJP), averaged over devices in "grads"."""
        v = vjp(w.astype(losses.dtype) * one)
        return [pmean(v[i]) if grads_mode else v[i] for i in shared_i]

    def assemble(shared_out: list[Array], task_out: list[Array]) -> PyTree:
        flat: list[Any] = [None] * len(leaves)
        for i, x in zip(shared_i, shared_out):
            flat[i] = x
        for i, x in zip(task_i, task_out):
            x = pmean(x) if grads_mode else x
            flat[i] = x.astype(leaves[i].dtype)
        return jax.tree.unflatten(treedef, flat)

    value = (losses, aux) if has_aux else losses
    if "gram" not in weighting.needs and "sq_norms" not in weighting.needs:
        # Loss-based weighting: no gradient statistic, so no column at all.
        w, new_state = weigh(_core.Stats(losses=stat_losses), state)
        task_out = []
        if task_i:
            v = vjp(one)
            task_out = [v[i] for i in task_i]
        return value, assemble(weighted(w), task_out), new_state

    want_gram = "gram" in weighting.needs
    chunk = min(chunk, t)
    n_full, rem = divmod(t, chunk)
    eye = jnp.eye(t, dtype=losses.dtype) * one

    def columns(start: Any, size: int, carry: tuple[Any, ...]) -> tuple[Any, ...]:
        """``size`` columns from ``start``: VJPs ``v_i = J^T e_i`` (and JVPs ``J v_i``)."""
        out, acc, cols, st = carry
        cot = jax.lax.dynamic_slice_in_dim(eye, start, size, 0)
        if size == 1:
            rows = [x[None] for x in vjp(cot[0])]
        else:
            rows = jax.tree.leaves(jax.vmap(lambda c: f_vjp(c)[0])(cot))
        if grads_mode:
            rows = [pmean(x) if stat_f[i] else x for i, x in enumerate(rows)]
        if want_gram:
            tangent = [
                _varying_like(x if stat_f[i] else jnp.zeros_like(x), leaves[i])
                for i, x in enumerate(rows)
            ]
            if size == 1:
                col = jvp([x[0] for x in tangent])[None]
            else:
                col = jax.vmap(jvp)(tangent)
            col = col.astype(dt)
            col = pmean(col) if grads_mode else col
        else:
            col = sum((_sq_sum(rows[i]) for i in stat_i), jnp.zeros((size,), dt))
        cols = jax.lax.dynamic_update_slice_in_dim(cols, col, start, 0)
        acc = [a + jnp.sum(rows[i].astype(dt), axis=0) for a, i in zip(acc, task_i)]
        if size == 1:
            # The VJP goes into the carried output: the last iteration overwrites it with
            # the result, so the loop holds one gradient, which is the output buffer.
            out = [rows[i][0] if stat_f[i] or not grads_mode else o for o, i in zip(out, shared_i)]
        return out, acc, cols, st

    def final(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        out, acc, cols, st = carry
        if want_gram:
            gram = 0.5 * (cols + cols.T)  # the JVP columns agree with each other to rounding
            gram = pmean(gram) if stats_mode else gram
            stats = _core.Stats(gram=gram, sq_norms=jnp.diagonal(gram), losses=stat_losses)
        else:
            stats = _core.Stats(sq_norms=pmean(cols) if stats_mode else cols, losses=stat_losses)
        w, new_st = weigh(stats, st)
        return weighted(w), acc, cols, new_st

    branches = [lambda k, c: columns(k * chunk, chunk, c)]
    if rem:
        branches.append(lambda k, c: columns(n_full * chunk, rem, c))
    branches.append(lambda k, c: final(c))
    n_iter = n_full + bool(rem) + 1

    def body(k: Array, carry: tuple[Any, ...]) -> tuple[Any, ...]:
        index = jnp.where(k == n_iter - 1, len(branches) - 1, jnp.where(k < n_full, 0, 1))
        return jax.lax.switch(index, branches, k, carry)

    def zeros(shape: tuple[int, ...], dtype: Any, like: Array, averaged: bool) -> Array:
        """A carry's start, typed as its values: averaged over devices, or local."""
        z = jnp.zeros(shape, dtype)
        return z if averaged else _varying_like(z, like)

    init = (
        [zeros(leaves[i].shape, leaves[i].dtype, leaves[i], grads_mode) for i in shared_i],
        [zeros(leaves[i].shape, dt, leaves[i], False) for i in task_i],
        zeros((t, t) if want_gram else (t,), dt, losses, grads_mode),
        state,
    )
    out, acc, _, new_state = jax.lax.fori_loop(0, n_iter, body, init)
    return value, assemble(out, acc), new_state
