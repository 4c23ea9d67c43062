"""PCGrad: project each task gradient off the gradients it conflicts with, then sum."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core


class PCGradState(NamedTuple):
    """State of :func:`pcgrad`.

    Attributes:
      weights: ``(T,)`` the effective weight of each raw gradient in the last update:
        the output is ``sum_j weights[j] * g_j`` (the column sums of the projection
        coefficients; 1 for every task when no pair conflicts).
      key: ``uint32`` raw PRNG key data (``jax.random.key_data``); each update splits it
        into the next key and the key that draws this step's task orders.
    """

    weights: jax.Array
    key: jax.Array


def task_orders(step_key: jax.Array, num_tasks: int) -> jax.Array:
    """The ``(T, T)`` random orders of one step: row ``i`` is task ``i``'s order.

    Row ``i`` is ``jax.random.permutation(jax.random.split(step_key, T)[i], T)``; task
    ``i`` is skipped when it meets itself.
    """
    keys = jax.random.split(step_key, num_tasks)
    return jax.vmap(lambda k: jax.random.permutation(k, num_tasks))(keys)


def step_orders(step_key: jax.Array, num_tasks: int) -> jax.Array:
    """This step's task orders: :func:`task_orders`, drawn only beyond two tasks.

    With one or two tasks, each task meets the one other task (if any) whatever its
    order, so the coefficients do not depend on the orders and none is drawn (a random
    permutation per task is a sort and a few hash rounds, work with no effect there).
    The caller splits its key every step all the same.
    """
    if num_tasks <= 2:
        return jnp.tile(jnp.arange(num_tasks, dtype=jnp.int32), (num_tasks, 1))
    return task_orders(step_key, num_tasks)


def pcgrad_coefficients(gram: jax.Array, orders: jax.Array) -> jax.Array:
    """Projection coefficients ``C`` with ``g_i^PC = sum_j C[i, j] g_j``, from the Gramian.

    Every projected gradient stays in the span of the raw ones, so PCGrad can run on
    coefficient vectors: ``g_i^PC . g_j = (C G)[i, j]``. All T tasks advance together
    through a ``lax.fori_loop`` over the T positions of their orders (``O(T^3)`` in all).

    Args:
      gram: ``(T, T)`` Gramian ``G_ij = g_i . g_j``.
      orders: ``(T, T)`` integer array, row ``i`` a permutation of ``range(T)``: the order
        in which task ``i`` meets the others (itself is skipped).

    Returns:
      ``C``, a ``(T, T)`` matrix.
    """
    t = gram.shape[0]
    diag = jnp.diagonal(gram)
    rows = jnp.arange(t)

    def body(k: Any, coef: jax.Array) -> jax.Array:
        j = orders[:, k]  # the task each row is projected against at this position
        inner = jnp.sum(coef * gram[j], axis=1)  # g_i^PC . g_j for every i at once
        gjj = diag[j]
        conflict = (inner < 0) & (gjj > 0) & (j != rows)
        step = jnp.where(conflict, inner / jnp.where(conflict, gjj, 1.0), 0.0)
        return coef.at[rows, j].add(-step)

    return jax.lax.fori_loop(0, t, body, jnp.eye(t, dtype=gram.dtype))


def pcgrad_weighting(
    *,
    seed: int = 0,
) -> _core.Weighting:
    r"""PCGrad's weighting: the column sums of the projection coefficients, from the Gramian.

    See :func:`optax_balance.pcgrad`; the PRNG key of the projection orders is in the
    state.

    Args:
      seed: the integer seed of the PRNG key kept in the state.

    Returns:
      An :class:`optax_balance.Weighting` of the Gramian; its state is
      :class:`optax_balance.PCGradState`.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> weights, state = ob.weightings.pcgrad()(J @ J.T)
      >>> weights.round(4)                  # 1 + 22/18 and 1 + 22/38
      Array([2.2222, 1.5789], dtype=float32)

    References:
      Yu et al., `Gradient Surgery for Multi-Task Learning
      <https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020.
    """
    seed = _core.check_int("seed", seed, low=-(2**63), high=2**63)

    def init(t: int) -> PCGradState:
        key = jax.random.key_data(jax.random.key(int(seed)))
        return PCGradState(weights=jnp.ones((t,), _core.stat_dtype()), key=key)

    def weigh(stats: _core.Stats, state: PCGradState) -> tuple[jax.Array, PCGradState]:
        assert stats.gram is not None
        key, step_key = jax.random.split(jax.random.wrap_key_data(state.key))
        orders = step_orders(step_key, stats.num_tasks)
        # The coefficients are invariant to a common scale of the gradients: normalise so
        # that gradients near 1e15 or 1e-15 neither overflow nor underflow the products.
        top = jnp.max(jnp.diagonal(stats.gram))
        gram = stats.gram / jnp.where(top > 0, top, 1.0)
        w = jnp.sum(pcgrad_coefficients(gram, orders), axis=0)
        return w, PCGradState(weights=w, key=jax.random.key_data(key))

    return _core.Weighting(
        init,
        weigh,
        needs=("gram",),
        name="pcgrad",
    )


def pcgrad(
    *,
    seed: int = 0,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""PCGrad: gradient surgery, the sum of the gradients projected off their conflicts.

    For each task :math:`i` (Yu et al., Algorithm 1), start from
    :math:`g_i^{PC} = g_i` and visit the other tasks :math:`j` in a random order; whenever
    :math:`g_i^{PC} \cdot g_j < 0`, remove the conflicting component:

    .. math::

      g_i^{PC} \leftarrow g_i^{PC} - \frac{g_i^{PC} \cdot g_j}{\|g_j\|^2}\, g_j ,
      \qquad d = \sum_{i=1}^T g_i^{PC} .

    The projected gradients are **summed**, as in the paper (some re-implementations
    average them, which is :math:`d/T`). Each :math:`g_i^{PC}` is a linear combination
    :math:`\sum_j C_{ij} g_j` of the raw gradients, so the whole procedure runs on the
    :math:`T \times T` Gramian and the output is :math:`d = \sum_j w_j g_j` with
    :math:`w_j = \sum_i C_{ij}` (the ``weights`` in the state). A task with a zero
    gradient is never projected against.

    Randomness. Each task draws its own order every step, as in the paper's algorithm
    (the authors' TensorFlow code shuffles once per step for all tasks). The PRNG key
    lives in the state: each update splits it into the next key and a step key, and
    task :math:`i`'s order is ``jax.random.permutation(jax.random.split(step_key,
    T)[i], T)`` (see :func:`task_orders`). A fixed ``seed`` makes a run reproducible;
    a step with non-finite gradients keeps the old key. With T=2 the order does not
    matter, and none is drawn (the key is split all the same).

    Args:
      seed: the integer seed of the PRNG key kept in the state.
      shared: which parameter leaves are shared (``None``: all); a pytree of bools, a
        prefix of one, or a callable ``params -> pytree``. Other leaves are summed.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` (exact: average the stacked gradients over ``axis_name``) or
        ``"stats"`` (average only the Gramian). Every device draws the same orders (the
        key is in the replicated state).
      num_tasks: T, if known; gives ``init`` a full-shape state.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state is :class:`PCGradState`.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> tx = ob.pcgrad()
      >>> d, state = tx.update(J, tx.init(jnp.zeros(3)))
      >>> d.round(4)
      Array([0.5848, 3.8012, 3.8012], dtype=float32)
      >>> state.weights.round(4)                  # 1 + 22/18 and 1 + 22/38
      Array([2.2222, 1.5789], dtype=float32)

    References:
      Yu et al., `Gradient Surgery for Multi-Task Learning
      <https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020.
    """
    return _core.balance(
        pcgrad_weighting(seed=seed),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
