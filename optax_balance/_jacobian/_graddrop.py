"""GradDrop: per coordinate, keep the gradients of one sign, drawn by their sign purity."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_balance import _core


class GradDropState(NamedTuple):
    r"""State of :func:`graddrop`.

    Attributes:
      weights: ``(T,)`` the share of each task's gradient that went into the last update:
        :math:`w_i = \sum_k m_{ik} g_{ik}^2 / \sum_k g_{ik}^2` over the shared
        coordinates k, with :math:`m_{ik}` the mask (between ``leak[i]`` and 1). This is
        the coefficient of the projection of task i's masked gradient onto its raw one
        (1: nothing dropped; ``leak[i]``: everything dropped); ``leak[i]`` (0 without a
        leak) for a zero gradient, whose mask is that everywhere. The actual weights are
        per coordinate (the masks), which are not stored; a step with non-finite
        gradients combines every coordinate with these.
      key: ``uint32`` raw PRNG key data (``jax.random.key_data``); each update splits it
        into the next key and the key that draws this step's uniform variables.
    """

    weights: jax.Array
    key: jax.Array


def _is_none(x: Any) -> bool:
    return x is None


def graddrop_masks(g: jax.Array, u: jax.Array, leak: Any) -> jax.Array:
    r"""GradDrop's masks for one stacked leaf ``g`` ``(T, *shape)`` and uniforms ``u`` (``shape``).

    :math:`P = \frac12 (1 + \sum_i g_i / \sum_i |g_i|)` per coordinate (1/2 where every
    gradient is 0), :math:`M_i = [P > U][g_i > 0] + [P < U][g_i < 0]` and the mask
    :math:`\ell_i + (1 - \ell_i) M_i`, in ``g``'s dtype, of ``g``'s shape. The sums over
    the tasks are written row by row (T is static): XLA's CPU backend runs a reduction
    over a short leading axis many times slower.
    """
    t = g.shape[0]
    total, mass = g[0], jnp.abs(g[0])
    for i in range(1, t):
        total, mass = total + g[i], mass + jnp.abs(g[i])
    # Where every gradient is 0, total = 0 and the quotient is 0 (P = 1/2). The row sums
    # feed only the division, which XLA computes once per coordinate: an outer select on
    # ``mass > 0`` made it re-sum the T rows for every mask entry (T times the work).
    purity = 0.5 * (1.0 + total / jnp.where(mass > 0, mass, 1.0))
    # M_i = [s g_i > 0] with s the sign each coordinate keeps (+1: the positive gradients,
    # -1: the negative ones, 0: none, at P = U): one product and one comparison that XLA
    # fuses into each consumer (the kept norms, the combination), so the (T, P)
    # masks are never written out. Written out, they cost a fresh T x P buffer per call,
    # which XLA:CPU pays for in page faults (a plain ``2 * g`` of a (32, 5e5) leaf: 19 ms
    # on the 2-core EPYC).
    sign = jnp.where(purity > u, 1.0, jnp.where(purity < u, -1.0, 0.0)).astype(g.dtype)
    keep = sign * g > 0
    m = keep.astype(g.dtype)
    if leak is None:
        return m
    lk = jnp.reshape(jnp.asarray(leak, g.dtype), (-1,) + (1,) * (g.ndim - 1))
    return lk + (1.0 - lk) * m


def leaf_uniforms(step_key: jax.Array, index: int, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """The uniforms of leaf ``index`` (in the params' leaf order): ``U[0, 1)`` per coordinate.

    Drawn in float32 and cast to ``dtype``, so that x64 draws the same numbers.
    """
    u = jax.random.uniform(jax.random.fold_in(step_key, index), shape, jnp.float32)
    return u.astype(dtype)


def graddrop_weighting(
    *,
    leak: Any = None,
    seed: int = 0,
) -> _core.Weighting:
    r"""GradDrop's weighting: per-coordinate masks from the stacked gradients.

    See :func:`optax_balance.graddrop`. It reads the stacked gradients (``needs =
    ("grads",)``) and returns, per statistic leaf, masks of the leaf's stacked shape.

    Args:
      leak: ``None`` (no leak) or one value in ``[0, 1]`` per task: the share of task
        i's gradient that passes whatever its sign.
      seed: the integer seed of the PRNG key kept in the state.

    Returns:
      An :class:`optax_balance.Weighting` of the stacked gradients; its state is
      :class:`optax_balance.GradDropState`.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> w = ob.weightings.graddrop()
      >>> stats = ob.Stats(grads={"a": jnp.array([[1.0, -2.0], [3.0, 1.0]])})
      >>> masks, state = w(stats)          # column 0: both positive, P = 1: both kept
      >>> masks["a"][:, 0]
      Array([1., 1.], dtype=float32)

    References:
      Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, `Just Pick a Sign:
      Optimizing Deep Multitask Models with Gradient Sign Dropout
      <https://arxiv.org/abs/2010.06808>`_, NeurIPS 2020 (Algorithm 1, lines 10-15).
    """
    leak_vec, t_leak = _core.check_task_vector("leak", leak)
    if isinstance(leak_vec, np.ndarray) and np.any((leak_vec < 0) | (leak_vec > 1)):
        raise ValueError(f"`leak` must hold values in [0, 1] (one per task), got {leak!r}.")
    seed = _core.check_int("seed", seed, low=-(2**63), high=2**63)
    dt = _core.stat_dtype

    def init(t: int) -> GradDropState:
        if t_leak is not None and t not in (0, t_leak):
            raise ValueError(f"`leak` has {t_leak} entries but the gradients have T={t} tasks.")
        key = jax.random.key_data(jax.random.key(int(seed)))
        return GradDropState(weights=jnp.ones((t,), dt()), key=key)

    def weigh(stats: _core.Stats, state: GradDropState) -> tuple[Any, GradDropState]:
        t = stats.num_tasks
        key, step_key = jax.random.split(jax.random.wrap_key_data(state.key))
        leaves, treedef = jax.tree.flatten(stats.grads, is_leaf=_is_none)
        lk = None if leak_vec is None else jnp.asarray(leak_vec, dt())
        masks: list[Any] = []
        kept = jnp.zeros((t,), dt())
        sq = jnp.zeros((t,), dt())
        for index, g in enumerate(leaves):
            if g is None:
                masks.append(None)
                continue
            g = jnp.asarray(g).astype(dt())
            u = leaf_uniforms(step_key, index, g.shape[1:], dt())
            m = graddrop_masks(g, u, lk)
            masks.append(m)
            axes = tuple(range(1, g.ndim))
            # The masks are fused in, never written out (fused_sum). A non-finite mask
            # makes the summary non-finite, as the core requires of per-coordinate
            # weights (it does not scan them).
            kept = kept + _core.fused_sum(m * g * g, axes, m)
            sq = sq + _core.leaf_sq_norms(g)
        pos = sq > 0
        # A zero gradient's mask is leak[i] everywhere (M_i = 0): its share is that.
        fallback = jnp.zeros((t,), dt()) if lk is None else lk
        w = jnp.where(pos, kept / jnp.where(pos, sq, 1.0), fallback)
        # A non-finite gradient makes its task's norm non-finite: the summary is then
        # NaN, so that the core's guard keeps the state (the masks alone stay finite).
        w = jnp.where(jnp.isfinite(sq), w, jnp.nan).astype(dt())
        return jax.tree.unflatten(treedef, masks), GradDropState(
            weights=w, key=jax.random.key_data(key)
        )

    return _core.Weighting(init, weigh, needs=("grads",), name="graddrop", num_tasks=t_leak)


def graddrop(
    *,
    leak: Any = None,
    seed: int = 0,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""GradDrop: gradient sign dropout, per coordinate one sign kept with its purity's odds.

    Per coordinate k of the shared parameters (Chen et al., Algorithm 1, lines 10-15, as
    torchjd's ``GradDrop``), the positive sign purity of the task gradients and a mask
    per task:

    .. math::

      P_k = \tfrac12\Big(1 + \frac{\sum_i g_{ik}}{\sum_i |g_{ik}|}\Big), \qquad
      M_{ik} = [P_k > U_k]\,[g_{ik} > 0] + [P_k < U_k]\,[g_{ik} < 0], \qquad
      d_k = \sum_i \big(\ell_i + (1 - \ell_i) M_{ik}\big)\, g_{ik} ,

    with :math:`U_k \sim U[0, 1)` drawn fresh for every coordinate and step, and
    :math:`\ell` = ``leak`` (default 0). So at each coordinate, with probability
    :math:`P_k` only the positive gradients pass and otherwise only the negative ones;
    where all tasks agree on the sign nothing is dropped. The masks are per-coordinate
    weights (the core combines :math:`\sum_i m_{ik} g_{ik}` leaf by leaf); the method
    reads the stacked gradients, not a Gramian, so ``sync="stats"`` is not available.
    :math:`P_k` is 1/2 where every gradient is 0 (torchjd's 0/0 drops nothing there
    either: every gradient is 0). torchjd's ``f`` (a monotone map of the purity,
    identity by default) is not offered: this is the identity.

    Where it acts. In the paper, GradDrop is a layer at an activation :math:`A` (usually
    the last shared one, before the task heads): it masks the per-task gradients with
    respect to :math:`A`, per activation element, and the masked sum flows back through
    the shared trunk. Here, as in torchjd, it masks the per-task gradients with respect
    to the shared *parameters* (the leaves ``shared`` marks, each coordinate of each
    leaf, the gradients already summed over the batch); task-specific leaves (task heads,
    ``shared=False``) are summed unmasked, as every task gradient there is zero but
    one's. For the paper's form, run it on a representation with
    :func:`optax_balance.value_and_balanced_grad` (``tx = ob.graddrop()``): the masks
    are then drawn per element of the representation gradients ``(T, B, ...)``, one
    per batch item and feature (the paper's additional batch-separated variant, which
    sums over the batch after multiplying by :math:`\operatorname{sign}(A)`, is not
    implemented).

    State and randomness. ``state.weights`` is not a weighting's output: it is the
    share of each task's squared gradient norm that passed (see
    :class:`GradDropState`). The PRNG key lives in the state: each update splits it into
    the next key and a step key; leaf number ``k`` (in ``jax.tree.leaves`` order of the
    params) draws ``jax.random.uniform(jax.random.fold_in(step_key, k), leaf_shape)`` (in
    float32, also under x64).
    On devices every copy draws the same uniforms (the key is replicated; JAX's
    partitionable threefry gives the same numbers however a leaf is sharded). A step with
    non-finite gradients keeps the old key and combines every coordinate with the
    previous ``state.weights``.

    Args:
      leak: ``None`` (no leak) or one value in ``[0, 1]`` per task (fixes T): the
        fraction of task i's gradient that passes whatever its sign (1: never masked).
      seed: the integer seed of the PRNG key kept in the state.
      shared: which parameter leaves are shared (``None``: all); other leaves are summed.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` only (the stacked shared gradients are averaged over
        ``axis_name`` before the masks are drawn; ``"stats"`` raises).
      num_tasks: T, if known; gives ``init`` a full-shape state.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state is :class:`GradDropState`.

    Raises:
      ValueError: for ``leak`` not a vector of values in ``[0, 1]`` (or of the wrong
        length), a non-integer ``seed``, ``sync="stats"`` with an ``axis_name`` or
        ``num_tasks < 1``.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> tx = ob.graddrop()
      >>> d, state = tx.update(J, tx.init(jnp.zeros(3)))
      >>> d                  # column 0: P = 0.6, the positive 6 drawn (else -4); 1, 2: kept
      Array([6., 2., 2.], dtype=float32)
      >>> state.weights.round(4)            # task 0 kept 1^2 + 1^2 of its 18: 1/9
      Array([0.1111, 1.    ], dtype=float32)

    References:
      Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, `Just Pick a Sign:
      Optimizing Deep Multitask Models with Gradient Sign Dropout
      <https://arxiv.org/abs/2010.06808>`_, NeurIPS 2020.
    """
    weighting = graddrop_weighting(leak=leak, seed=seed)
    return _core.balance(
        weighting, shared=shared, axis_name=axis_name, sync=sync, num_tasks=num_tasks
    )
