"""The EnCodec / audiocraft loss balancer: EMA-normalised gradient ratios."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_balance import _core


class BalancerState(NamedTuple):
    """State of :func:`balancer`.

    Attributes:
      weights: ``(T,)`` the scale each task's gradient received in the last update:
        ``total_norm * w_i / sum(w) / (epsilon + EMA_i)`` (or ``w_i`` without balancing).
      ratios: ``(T,)`` each task's EMA gradient norm over the sum of them: the share of
        the gradient each loss would have had without balancing.
      ema_total: ``(T,)`` the decayed sum of gradient norms, ``sum_k decay^k ||g_i(t-k)||``.
      ema_fix: the decayed count ``sum_k decay^k``; ``EMA = ema_total / ema_fix`` is the
        bias-corrected EMA (it starts at the first norm).
    """

    weights: jax.Array
    ratios: jax.Array
    ema_total: jax.Array
    ema_fix: jax.Array


def _weights_vector(weights: Sequence[float] | Mapping[Any, float]) -> np.ndarray:
    if isinstance(weights, Mapping):
        weights = list(weights.values())
    elif isinstance(weights, (str, bytes)) or not isinstance(
        weights, Sequence | np.ndarray | jax.Array
    ):
        raise ValueError(
            f"`weights` must be a sequence or a mapping of per-task weights (or a 1-D NumPy or "
            f"JAX array), got {weights!r}."
        )
    w, _ = _core.check_task_vector("weights", weights, nonnegative=True)
    return w


def balancer_weighting(
    weights: Sequence[float] | Mapping[Any, float],
    *,
    balance_grads: bool = True,
    total_norm: float = 1.0,
    ema_decay: float = 0.999,
    per_batch_item: bool = False,
    epsilon: float = 1e-12,
) -> _core.Weighting:
    r"""The EnCodec balancer's weighting: fixed shares of the norm, over EMA norms.

    :math:`w_i = \text{total\_norm}\; (u_i / \sum_j u_j) / (\epsilon + \bar n_i)` with
    :math:`\bar n_i` the bias-corrected EMA of task :math:`i`'s gradient norm (see
    :func:`optax_balance.balancer`). Reads the squared norms (per batch item with
    ``per_batch_item``).

    Args:
      weights: the per-task weights :math:`u_i \ge 0`, a sequence, a mapping or a 1-D
        (NumPy or JAX) array.
      balance_grads: normalise by the EMA norms (True) or just weight (False).
      total_norm: the norm of the balanced gradient when all tasks agree in direction.
      ema_decay: :math:`\beta \in [0, 1]`.
      per_batch_item: the norms are means of per-item norms (axis 1 is a batch axis).
      epsilon: added to the EMA norm before dividing.

    Returns:
      An :class:`optax_balance.Weighting` of the squared norms; its state is
      :class:`optax_balance.BalancerState`.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> w = ob.weightings.balancer([1.0, 3.0])
      >>> weights, state = w(ob.Stats(sq_norms=jnp.array([25.0, 0.25])))
      >>> weights                                       # [0.25 / 5, 0.75 / 0.5]
      Array([0.05, 1.5 ], dtype=float32)

    References:
      Défossez et al., `High Fidelity Neural Audio Compression
      <https://arxiv.org/abs/2210.13438>`_, 2022 (Sec. 3.4, the loss balancer).
    """
    w = _weights_vector(weights)
    _core.check_range("total_norm", total_norm, low=0.0, low_inclusive=False)
    _core.check_range("ema_decay", ema_decay, low=0.0, high=1.0)
    _core.check_range("epsilon", epsilon, low=0.0)

    def init(t: int) -> BalancerState:
        dt = _core.stat_dtype()
        start = w if not balance_grads else total_norm * w / w.sum()
        return BalancerState(
            weights=jnp.asarray(start, dt) if t else jnp.zeros((0,), dt),
            ratios=jnp.full((t,), 1.0 / t, dt),
            ema_total=jnp.zeros((t,), dt),
            ema_fix=jnp.zeros((), dt),
        )

    def weigh(stats: _core.Stats, state: BalancerState) -> tuple[jax.Array, BalancerState]:
        if per_batch_item:
            assert stats.item_sq_norms is not None
            norms = jnp.mean(jnp.sqrt(stats.item_sq_norms), axis=1)
        else:
            assert stats.sq_norms is not None
            norms = jnp.sqrt(stats.sq_norms)
        total = ema_decay * state.ema_total + norms
        fix = ema_decay * state.ema_fix + 1.0
        avg = total / fix
        ratios = avg / jnp.where(jnp.sum(avg) > 0, jnp.sum(avg), 1.0)
        wv = jnp.asarray(w, norms.dtype)
        if balance_grads:
            den = epsilon + avg  # 0 only when epsilon = 0 and the task's norms were all 0
            pos = den > 0
            scale = jnp.where(pos, total_norm * (wv / jnp.sum(wv)) / jnp.where(pos, den, 1.0), 0.0)
        else:
            scale = wv
        return scale, BalancerState(weights=scale, ratios=ratios, ema_total=total, ema_fix=fix)

    return _core.Weighting(
        init,
        weigh,
        needs=("item_sq_norms",) if per_batch_item else ("sq_norms",),
        name="balancer",
        num_tasks=len(w),
    )


def balancer(
    weights: Sequence[float] | Mapping[Any, float],
    *,
    balance_grads: bool = True,
    total_norm: float = 1.0,
    ema_decay: float = 0.999,
    per_batch_item: bool = False,
    epsilon: float = 1e-12,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
) -> optax.GradientTransformationExtraArgs:
    r"""EnCodec's loss balancer: each loss gets a fixed share of the gradient's norm.

    With per-task gradients :math:`g_i` and user weights :math:`w_i`,

    .. math::

      \bar n_i(t) = \frac{\sum_{k=0}^{t-1} \beta^k \|g_i(t-k)\|}{\sum_{k=0}^{t-1} \beta^k},
      \qquad
      G = \sum_i \frac{\text{total\_norm}\; w_i / \sum_j w_j}{\epsilon + \bar n_i} \, g_i ,

    a bias-corrected EMA (:math:`\beta` = ``ema_decay``; :math:`\bar n_i(1) = \|g_i(1)\|`),
    so in the long run task :math:`i` contributes a gradient of norm
    :math:`\text{total\_norm}\cdot w_i/\sum_j w_j` whatever the scale of its loss. With
    ``balance_grads=False`` the output is :math:`\sum_i w_i g_i` (the EMA still runs, for
    ``ratios``). With ``per_batch_item=True`` axis 1 of every leaf (after the task axis)
    is a batch axis: :math:`\|g_i\|` is the mean over items of the per-item norm, as
    EnCodec computes it on the gradient with respect to the model output; use it with
    :func:`optax_balance.value_and_balanced_grad`.

    Many devices. With ``axis_name`` set, ``update`` runs per device inside
    ``shard_map``/``pmap`` on local-batch gradients. ``sync="grads"`` (default, exact)
    averages the stacked shared gradients over the axis before the norms, so output and
    state equal the one-device result on the global batch (T*P numbers all-reduced).
    ``sync="stats"`` averages only the T squared norms, so every device gets the same
    weights and state, and returns the *local* combination, which the caller averages
    (P numbers), e.g. with ``optax.stateless(lambda u, _: jax.lax.pmean(u, axis))``
    next in the chain. This is how audiocraft syncs its balancer (it averages the
    EMA-ed norms over workers); the norm used is
    :math:`\sqrt{\tfrac1D\sum_d \|g_i^{(d)}\|^2} \ge \|\tfrac1D\sum_d g_i^{(d)}\|`,
    the global gradient's norm inflated by the spread of the local gradients
    (audiocraft's mean of local norms lies in between). With ``per_batch_item=True``
    the per-item norms of all devices are gathered (D*T*B numbers), so the norm is the
    global batch's mean in both modes, exactly; gradients are never averaged, since
    each device's items are its own.

    Args:
      weights: the per-task weights :math:`w_i \ge 0` (positive sum), a sequence, a
        mapping or a 1-D (NumPy or JAX) array; a mapping's values in insertion order give
        the task order.
      balance_grads: normalise by the EMA norms (True) or just weight (False).
      total_norm: the norm of the balanced gradient when all tasks agree in direction.
      ema_decay: :math:`\beta \in [0, 1]`; 0 uses the current norm only, 1 the plain mean.
      per_batch_item: treat axis 1 of each leaf as a batch axis for the norm.
      epsilon: added to the EMA norm before dividing.
      shared: which leaves are shared (``None``: all); task-specific leaves are summed.
      axis_name: device axis name inside ``shard_map``/``pmap`` (``None``: one device,
        or plain ``jit`` over sharded arrays).
      sync: ``"grads"`` (exact) or ``"stats"`` (norms only), see above.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state is :class:`BalancerState`.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> tx = ob.balancer({"l1": 1.0, "l2": 3.0})
      >>> grads = jnp.array([[3.0, 4.0], [0.0, 0.5]])    # norms 5 and 0.5
      >>> g, state = tx.update(grads, tx.init(jnp.zeros(2)))
      >>> g                                             # 0.25 * [0.6, 0.8] + 0.75 * [0, 1]
      Array([0.15, 0.95], dtype=float32)
      >>> state.ratios                                  # 5 / 5.5 and 0.5 / 5.5
      Array([0.90909094, 0.09090909], dtype=float32)

    References:
      Défossez et al., `High Fidelity Neural Audio Compression
      <https://arxiv.org/abs/2210.13438>`_, 2022 (Sec. 3.4, the loss balancer);
      ``audiocraft/losses/balancer.py``.
    """
    return _core.balance(
        balancer_weighting(
            weights,
            balance_grads=balance_grads,
            total_norm=total_norm,
            ema_decay=ema_decay,
            per_batch_item=per_batch_item,
            epsilon=epsilon,
        ),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
    )
