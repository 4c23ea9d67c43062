"""MetaBalance: auxiliary gradients rescaled toward the main task's, per parameter leaf."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core

Strategy = Literal["reduce", "enlarge", "both"]
_STRATEGIES = ("reduce", "enlarge", "both")


class MetaBalanceState(NamedTuple):
    r"""State of :func:`metabalance`.

    Attributes:
      weights: ``(T,)`` the effective weight each task received in the last update: the
        factor by which its (shared) gradient norm was scaled,
        :math:`\sqrt{\sum_l w_{l,i}^2 \|g_{l,i}\|^2 / \sum_l \|g_{l,i}\|^2}` over the
        shared leaves :math:`l` (the plain mean of :math:`w_{l,i}` over the leaves when
        task :math:`i`'s gradient is zero). The main task's is 1.
      ema_norms: a pytree with the params' structure: on each shared leaf a ``(T,)``
        array, the moving average :math:`m_{l,i}` of task :math:`i`'s gradient norm on
        that leaf (started at 0, not bias-corrected: the correction would cancel in the
        ratios); ``None`` on task-specific leaves.
    """

    weights: jax.Array
    ema_norms: Any


def _is_none(x: Any) -> bool:
    return x is None


def leaf_weights(
    ema: jax.Array,
    *,
    main_task: int,
    relax_factor: Any,
    strategy: str,
    epsilon: Any,
) -> jax.Array:
    r"""Per-task weights on one leaf from its EMA norms ``ema`` (shape ``(T,)``).

    :math:`w_i = r\, m_\text{main} / (m_i + \epsilon) + 1 - r` where the strategy applies
    (``reduce``: :math:`m_i > m_\text{main}`; ``enlarge``: :math:`m_i < m_\text{main}`;
    ``both``: always), else 1; :math:`w_\text{main} = 1`; :math:`w_i = 1` while
    :math:`m_i = 0` (the task has had no gradient on this leaf, so nothing to scale).
    """
    m_main = ema[main_task]
    pos = ema > 0
    ratio = jnp.where(pos, m_main / jnp.where(pos, ema + epsilon, 1.0), 1.0)
    scaled = relax_factor * ratio + (1.0 - relax_factor)
    if strategy == "reduce":
        apply = ema > m_main
    elif strategy == "enlarge":
        apply = ema < m_main
    else:
        apply = jnp.ones(ema.shape, bool)
    apply = apply & pos & (jnp.arange(ema.shape[0]) != main_task)
    return jnp.where(apply, scaled, 1.0).astype(ema.dtype)


def effective_weights(leaf_w: Any, leaf_sq: Any, num_tasks: int) -> jax.Array:
    r"""``(T,)`` summary of per-leaf weights: the factor by which each task's norm was scaled.

    :math:`\sqrt{\sum_l w_{l,i}^2 n_{l,i}^2 / \sum_l n_{l,i}^2}`; the mean of
    :math:`w_{l,i}` over leaves where :math:`\sum_l n_{l,i}^2 = 0`; 1 without leaves.
    """
    ws = [w for w in jax.tree.leaves(leaf_w) if w is not None]
    sqs = [s for s in jax.tree.leaves(leaf_sq) if s is not None]
    dt = _core.stat_dtype()
    if not ws:
        return jnp.ones((num_tasks,), dt)
    num = sum((w * w * s for w, s in zip(ws[1:], sqs[1:])), ws[0] * ws[0] * sqs[0])
    den = sum(sqs[1:], sqs[0])
    mean_w = sum(ws[1:], ws[0]) / len(ws)
    pos = den > 0
    return jnp.where(pos, _core.safe_sqrt(num / jnp.where(pos, den, 1.0)), mean_w).astype(dt)


def metabalance_weighting(
    *,
    relax_factor: float = 0.7,
    beta: float = 0.9,
    main_task: int = 0,
    strategy: Strategy = "both",
    epsilon: float = 1e-12,
) -> _core.Weighting:
    r"""MetaBalance's weighting: per-leaf weights from EMA gradient norms.

    On each statistic leaf :math:`l`, :math:`w_{l,i} = r\, m_{l,\text{main}} /
    (m_{l,i} + \epsilon) + 1 - r` where ``strategy`` applies (see
    :func:`optax_balance.metabalance`). Its state holds the EMA norms per leaf, so
    ``init`` takes the statistic leaves: ``init(num_tasks, params)`` with ``None`` at
    the leaves it does not read.

    Args:
      relax_factor: :math:`r \in [0, 1)`.
      beta: :math:`\beta \in [0, 1)`, the moving-average decay.
      main_task: the index of the main task.
      strategy: ``"reduce"``, ``"enlarge"`` or ``"both"``.
      epsilon: added to the auxiliary moving average before dividing.

    Returns:
      An :class:`optax_balance.Weighting` of the per-leaf squared norms; its state is
      :class:`optax_balance.MetaBalanceState`.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> w = ob.weightings.metabalance()
      >>> state = w.init(2, {"a": jnp.zeros(2)})
      >>> stats = ob.Stats(leaf_sq_norms={"a": jnp.array([25.0, 100.0])})
      >>> weights, state = w(stats, state)
      >>> weights["a"].round(4)                     # aux: 0.7 * 0.5 / 1 + 0.3
      Array([1.  , 0.65], dtype=float32)

    References:
      He, Feng, Cheng, Ji, Guo & Caverlee, `MetaBalance: Improving Multi-Task
      Recommendations via Adapting Gradient Magnitudes of Auxiliary Tasks
      <https://arxiv.org/abs/2203.06801>`_, WWW 2022 (Algorithm 1).
    """
    _core.check_range("relax_factor", relax_factor, low=0.0, high=1.0, high_inclusive=False)
    _core.check_range("beta", beta, low=0.0, high=1.0, high_inclusive=False)
    _core.check_range("epsilon", epsilon, low=0.0)
    _core.check_choice("strategy", strategy, _STRATEGIES)
    main = _core.check_int("main_task", main_task, low=0)

    def init(t: int, params: Any) -> MetaBalanceState:
        if t and main >= t:
            raise ValueError(
                f"`main_task` must be in [0, T) = [0, {t}) for gradients with T={t} tasks, "
                f"got {main}."
            )
        dt = _core.stat_dtype()
        ema = jax.tree.map(lambda p: jnp.zeros((t,), dt), params)  # None stays None
        return MetaBalanceState(weights=jnp.ones((t,), dt), ema_norms=ema)

    def weigh(stats: _core.Stats, state: MetaBalanceState) -> tuple[Any, MetaBalanceState]:
        sq = stats.leaf_sq_norms
        ema = jax.tree.map(
            lambda m, s: None if s is None else beta * m + (1.0 - beta) * _core.safe_sqrt(s),
            state.ema_norms,
            sq,
            is_leaf=_is_none,
        )
        per_leaf = jax.tree.map(
            lambda m: (
                None
                if m is None
                else leaf_weights(
                    m, main_task=main, relax_factor=relax_factor, strategy=strategy, epsilon=epsilon
                )
            ),
            ema,
            is_leaf=_is_none,
        )
        summary = effective_weights(per_leaf, sq, stats.num_tasks)
        return per_leaf, MetaBalanceState(weights=summary, ema_norms=ema)

    return _core.Weighting(
        init,
        weigh,
        needs=("leaf_sq_norms",),
        name="metabalance",
        init_takes_params=True,
    )


def metabalance(
    *,
    relax_factor: float = 0.7,
    beta: float = 0.9,
    main_task: int = 0,
    strategy: Strategy = "both",
    epsilon: float = 1e-12,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""MetaBalance: bring each auxiliary task's gradient norm toward the main task's.

    For every shared parameter leaf :math:`l` and task :math:`i`, a moving average of the
    gradient norm (started at 0, as in the paper and its reference code)

    .. math::

      m_{l,i}(t) = \beta\, m_{l,i}(t-1) + (1-\beta)\, \|g_{l,i}(t)\|_2 ,

    and each auxiliary task's gradient on that leaf becomes

    .. math::

      \hat g_{l,i} = r\, \frac{m_{l,\text{main}}}{m_{l,i} + \epsilon}\, g_{l,i}
        + (1-r)\, g_{l,i}, \qquad
      G_l = g_{l,\text{main}} + \sum_{i \ne \text{main}} \hat g_{l,i} ,

    with :math:`r` = ``relax_factor`` (0: plain sum; towards 1: every auxiliary norm equal
    to the main task's). The main task's gradient is unchanged. ``strategy`` picks which
    auxiliaries are rescaled (the paper's strategies A, B and C): ``"reduce"`` only those
    with :math:`m_{l,i} > m_{l,\text{main}}`, ``"enlarge"`` only those with
    :math:`m_{l,i} < m_{l,\text{main}}`, ``"both"`` all (the reference code's behaviour).
    A task whose moving average on a leaf is still 0 (it never had a gradient there) keeps
    weight 1; a zero main-task gradient scales the auxiliaries down to :math:`(1-r)g`.
    The EMA is not bias-corrected: every task's average carries the same factor
    :math:`1-\beta^t`, which cancels in the ratio. Task-specific leaves
    (``shared=False``) are summed unchanged.

    A step with non-finite gradients keeps the previous moving averages; its output
    combines every leaf with the previous ``state.weights`` (the ``(T,)`` summary, since
    per-leaf weights are not stored).

    Args:
      relax_factor: :math:`r \in [0, 1)`, how far auxiliary norms move toward the main
        task's.
      beta: :math:`\beta \in [0, 1)`, the moving-average decay (0: current norms only).
      main_task: the index of the main (target) task, in ``[0, T)``.
      strategy: ``"reduce"``, ``"enlarge"`` or ``"both"``.
      epsilon: :math:`\epsilon \ge 0` added to the auxiliary moving average before
        dividing.
      shared: which parameter leaves are shared (``None``: all); other leaves are summed
        over the task axis, unweighted.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` (average the stacked gradients over ``axis_name``) or
        ``"stats"`` (average only the per-leaf squared norms).
      num_tasks: T, if known; gives ``init`` a full-shape state (needed to run the first
        update inside ``lax.scan``/``lax.cond``/``optax.MultiSteps``); otherwise T is
        taken from the first update.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state is
      :class:`MetaBalanceState`.

    Raises:
      ValueError: for ``relax_factor`` or ``beta`` outside ``[0, 1)``, ``main_task``
        outside ``[0, T)``, an unknown ``strategy``, ``epsilon < 0`` or
        ``num_tasks < 1``.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> tx = ob.metabalance()                         # r = 0.7, beta = 0.9
      >>> grads = jnp.array([[3.0, 4.0], [0.0, 10.0]])    # norms 5 (main) and 10
      >>> g, state = tx.update(grads, tx.init(jnp.zeros(2)))
      >>> state.ema_norms                               # 0.1 * [5, 10]
      Array([0.5, 1. ], dtype=float32)
      >>> state.weights.round(4)                        # aux: 0.7 * 0.5 / 1 + 0.3
      Array([1.  , 0.65], dtype=float32)
      >>> g.round(4)                                    # g_main + 0.65 g_aux
      Array([ 3. , 10.5], dtype=float32)

    References:
      He, Feng, Cheng, Ji, Guo & Caverlee, `MetaBalance: Improving Multi-Task
      Recommendations via Adapting Gradient Magnitudes of Auxiliary Tasks
      <https://arxiv.org/abs/2203.06801>`_, WWW 2022 (Algorithm 1);
      reference code ``facebookresearch/MetaBalance``.
    """
    t_cfg = _core.check_num_tasks(num_tasks)
    if t_cfg is not None and _core.check_int("main_task", main_task, low=0) >= t_cfg:
        raise ValueError(
            f"`main_task` must be in [0, {t_cfg}) for num_tasks={t_cfg}, got {main_task}."
        )
    return _core.balance(
        metabalance_weighting(
            relax_factor=relax_factor,
            beta=beta,
            main_task=main_task,
            strategy=strategy,
            epsilon=epsilon,
        ),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
