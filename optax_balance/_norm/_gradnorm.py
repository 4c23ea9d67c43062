"""GradNorm: task weights learned so that the tasks train at similar rates."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core


class GradNormState(NamedTuple):
    r"""State of :func:`gradnorm`.

    Attributes:
      weights: ``(T,)`` the learned weights :math:`w(t+1)`, which the *next* update
        applies (the update that produced them applied :math:`w(t)`). They are
        :math:`\ge 0` and sum to T.
      initial_losses: ``(T,)`` :math:`L_i(0)`, the loss of each task at the first update
        at which it was positive (0 until then).
      has_initial_loss: ``(T,)`` bool, whether :math:`L_i(0)` has been recorded.
      weight_opt_state: the state of ``weight_optimizer`` over the weights.
    """

    weights: jax.Array
    initial_losses: jax.Array
    has_initial_loss: jax.Array
    weight_opt_state: optax.OptState


def inverse_training_rates(
    losses: jax.Array, initial_losses: jax.Array, has_initial_loss: jax.Array
) -> jax.Array:
    r"""GradNorm's relative inverse training rates :math:`r_i = \tilde L_i / \bar{\tilde L}`.

    :math:`\tilde L_i = \max(L_i, 0) / L_i(0)` where :math:`L_i(0)` is recorded, and 1 (no
    information: the task counts as training at the average rate) where it is not. When
    every :math:`\tilde L_i` is 0, all :math:`r_i` are 1.
    """
    den = jnp.where(has_initial_loss, initial_losses, 1.0)
    ratio = jnp.where(has_initial_loss, jnp.maximum(losses, 0.0) / den, 1.0)
    mean = jnp.mean(ratio)
    pos = mean > 0
    return jnp.where(pos, ratio / jnp.where(pos, mean, 1.0), 1.0)


def gradnorm_loss(weights: jax.Array, norms: jax.Array, rates: jax.Array, alpha: Any) -> jax.Array:
    r"""The GradNorm loss :math:`\sum_i |w_i \|g_i\| - \mathrm{sg}(\bar G\, r_i^\alpha)|`.

    :math:`G_i = \|w_i g_i\| = w_i \|g_i\|` for :math:`w_i \ge 0` (the weights are kept
    non-negative); written as a product it is differentiable at :math:`w_i = 0`, with the
    one-sided derivative :math:`\|g_i\|` of the norm there, so a weight clipped to 0 can
    grow again. :math:`\bar G = \mathrm{mean}_j G_j` and the targets are constants
    (``stop_gradient``), as in the paper.
    """
    g = weights * norms
    target = jax.lax.stop_gradient(jnp.mean(g) * rates**alpha)
    return jnp.sum(jnp.abs(g - target))


def _renormalise(w: jax.Array) -> jax.Array:
    """Clips at 0 and rescales to sum T; all-zero weights restart from 1."""
    t = w.shape[0]
    w = jnp.maximum(w, 0.0)
    s = jnp.sum(w)
    pos = s > 0
    return jnp.where(pos, t * w / jnp.where(pos, s, 1.0), jnp.ones_like(w))


def gradnorm_weighting(
    num_tasks: int,
    *,
    alpha: float = 1.5,
    weight_optimizer: optax.GradientTransformation | None = None,
    norm_mask: _core.SharedMask = None,
) -> _core.Weighting:
    r"""GradNorm's weighting: learned weights, stepped to balance the tasks' training rates.

    The weights applied are :math:`w(t)`; each call steps them on the GradNorm loss
    :math:`\sum_i |w_i\|g_i\| - \mathrm{sg}(\bar G r_i^\alpha)|` with
    ``weight_optimizer`` (see :func:`optax_balance.gradnorm`). Reads the squared norms
    over the ``norm_mask`` leaves and the losses.

    Args:
      num_tasks: T.
      alpha: :math:`\alpha \ge 0`, the asymmetry.
      weight_optimizer: an optax transformation for the weights (default
        ``optax.adam(1e-2)``).
      norm_mask: which shared leaves the norms are taken over (``None``: all).

    Returns:
      An :class:`optax_balance.Weighting` of the squared norms and losses; its state is
      :class:`optax_balance.GradNormState`.

    Examples:
      >>> import jax.numpy as jnp, optax, optax_balance as ob
      >>> w = ob.weightings.gradnorm(2, weight_optimizer=optax.sgd(0.1))
      >>> stats = ob.Stats(sq_norms=jnp.array([25.0, 1.0]), losses=jnp.array([1.0, 1.0]))
      >>> weights, state = w(stats)
      >>> weights, state.weights                   # w(0), then [1 - 0.5, 1 + 0.1] * 2 / 1.6
      (Array([1., 1.], dtype=float32), Array([0.625, 1.375], dtype=float32))

    References:
      Chen, Badrinarayanan, Lee & Rabinovich, `GradNorm: Gradient Normalization for
      Adaptive Loss Balancing in Deep Multitask Networks
      <https://arxiv.org/abs/1711.02257>`_, ICML 2018 (Algorithm 1).
    """
    t_cfg = _core.check_num_tasks(num_tasks, required=True)
    assert t_cfg is not None
    _core.check_range("alpha", alpha, low=0.0)
    wopt = optax.adam(1e-2) if weight_optimizer is None else weight_optimizer
    if not (hasattr(wopt, "init") and hasattr(wopt, "update")):
        raise ValueError(
            "`weight_optimizer` must be an optax GradientTransformation (with `init` and "
            f"`update`), e.g. optax.adam(1e-2); got {weight_optimizer!r}."
        )

    def init(t: int) -> GradNormState:
        dt = _core.stat_dtype()
        w = jnp.ones((t,), dt)
        return GradNormState(
            weights=w,
            initial_losses=jnp.zeros((t,), dt),
            has_initial_loss=jnp.zeros((t,), bool),
            weight_opt_state=wopt.init(w),
        )

    def weigh(stats: _core.Stats, state: GradNormState) -> tuple[jax.Array, GradNormState]:
        assert stats.sq_norms is not None and stats.losses is not None
        losses = stats.losses
        norms = _core.safe_sqrt(stats.sq_norms)
        record = jnp.logical_not(state.has_initial_loss) & (losses > 0)
        initial = jnp.where(record, losses, state.initial_losses)
        has_initial = state.has_initial_loss | record
        rates = inverse_training_rates(losses, initial, has_initial)
        w = state.weights
        grad_w = jax.grad(gradnorm_loss)(w, norms, rates, alpha)
        upd, opt_state = wopt.update(grad_w, state.weight_opt_state, w)
        w_next = _renormalise(jnp.asarray(optax.apply_updates(w, upd), w.dtype))
        return w, GradNormState(
            weights=w_next,
            initial_losses=initial,
            has_initial_loss=has_initial,
            weight_opt_state=opt_state,
        )

    return _core.Weighting(
        init,
        weigh,
        needs=("sq_norms", "losses"),
        name="gradnorm",
        num_tasks=t_cfg,
        stat_mask=norm_mask,
        stat_mask_name="norm_mask",
    )


def gradnorm(
    num_tasks: int,
    *,
    alpha: float = 1.5,
    weight_optimizer: optax.GradientTransformation | None = None,
    norm_mask: _core.SharedMask = None,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
) -> optax.GradientTransformationExtraArgs:
    r"""GradNorm: learn task weights that balance the tasks' training rates.

    The combined gradient is :math:`\sum_i w_i(t)\, g_i` with learned weights
    :math:`w(0) = 1`. Each update also moves the weights, following Algorithm 1 of the
    paper. With :math:`L_i(0)` the loss of task :math:`i` at the first update,

    .. math::

      G_i = \|w_i\, g_i\|_2, \quad \bar G = \tfrac1T \textstyle\sum_j G_j, \quad
      \tilde L_i = \frac{L_i(t)}{L_i(0)}, \quad
      r_i = \frac{\tilde L_i}{\tfrac1T \sum_j \tilde L_j},

      \mathcal L_\text{grad}(w) = \sum_i \big| G_i - \mathrm{sg}\big(\bar G\, r_i^{\alpha}\big)
      \big|_1 ,

    where :math:`\mathrm{sg}` stops gradients (the targets are constants) and the norms are
    taken over the ``norm_mask`` leaves (the paper uses the last shared layer). The
    gradient :math:`\nabla_w \mathcal L_\text{grad}` goes through ``weight_optimizer``;
    the result is clipped at 0 and rescaled to :math:`\sum_i w_i(t+1) = T`. A task that
    trains slower than average (:math:`r_i > 1`) is given a larger gradient norm target,
    so its weight grows. Note the L2 norm itself is compared, and :math:`\alpha` is the
    exponent on :math:`r_i` only.
    :math:`G_i` is computed as :math:`w_i \|g_i\|` (equal, since :math:`w_i \ge 0`), whose
    derivative at :math:`w_i = 0` is :math:`\|g_i\|`, so a weight clipped to 0 can grow
    again. Leaves marked task-specific in ``shared`` are summed unweighted; with
    ``shared=None`` every leaf, task heads included, is weighted, which is the paper's
    :math:`\sum_i w_i L_i`.

    Timing: the network moves with :math:`w(t)`, the weights held at the *start* of the
    step (as in the paper, the weighted loss and the GradNorm loss are formed with the
    same :math:`w(t)`); ``state.weights`` then holds :math:`w(t+1)`, the weights the next
    update applies.

    Losses. :math:`L_i(0)` is recorded per task at the first update at which
    :math:`L_i > 0` (a flag in the state; no sentinel values). Until a task has one, its
    :math:`\tilde L_i` is 1 (it counts as training at the average rate). A loss that
    later becomes :math:`\le 0` gives :math:`\tilde L_i = 0` (the task counts as fully
    trained: its target norm is 0). If every :math:`\tilde L_i` is 0, all
    :math:`r_i = 1`. A step with any non-finite loss or gradient statistic keeps the
    whole previous state (weights, :math:`L(0)`, optimizer state) and combines with
    :math:`w(t)`. If the clip leaves every weight at 0, the weights restart from 1.

    Args:
      num_tasks: T, the number of tasks (required: the weights and the weight
        optimizer's state are created by ``init``).
      alpha: :math:`\alpha \ge 0`, the asymmetry: 0 pulls every task to the same
        gradient norm; larger values favour tasks that train slowly (paper: 0.12 to 3).
      weight_optimizer: an optax transformation for the weights (default
        ``optax.adam(1e-2)``); it gets :math:`\nabla_w \mathcal L_\text{grad}` and the
        weights as ``params``.
      norm_mask: which leaves the norms :math:`G_i` are taken over, as a pytree of bools
        (or prefix), or a callable ``params -> such a pytree``; ``None``: every shared
        leaf. Intersected with ``shared``.
      shared: which parameter leaves are shared (``None``: all); other leaves are summed
        over the task axis, unweighted.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``
        (losses are averaged over it too).
      sync: ``"grads"`` (average the stacked gradients over ``axis_name``) or
        ``"stats"`` (average only the norms and losses).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``task_losses=`` of shape ``(T,)``; its state is :class:`GradNormState`.

    Raises:
      ValueError: at construction for ``num_tasks < 1``, ``alpha < 0`` or a
        ``weight_optimizer`` that is not an optax transformation; at ``update`` when
        ``task_losses`` is missing.

    Examples:
      >>> import jax.numpy as jnp, optax, optax_balance as ob
      >>> tx = ob.gradnorm(2, weight_optimizer=optax.sgd(0.1))
      >>> grads = jnp.array([[3.0, 4.0], [0.0, 1.0]])     # norms 5 and 1
      >>> state = tx.init(jnp.zeros(2))
      >>> g, state = tx.update(grads, state, task_losses=jnp.array([1.0, 1.0]))
      >>> g                                               # w(0) = [1, 1]
      Array([3., 5.], dtype=float32)
      >>> state.weights                                   # [1 - 0.5, 1 + 0.1] * 2 / 1.6
      Array([0.625, 1.375], dtype=float32)
      >>> g, state = tx.update(grads, state, task_losses=jnp.array([0.5, 1.0]))
      >>> g                                               # 0.625 g_1 + 1.375 g_2
      Array([1.875, 3.875], dtype=float32)
      >>> state.weights                                   # [0.125, 1.475] * 2 / 1.6
      Array([0.15625, 1.84375], dtype=float32)

    References:
      Chen, Badrinarayanan, Lee & Rabinovich, `GradNorm: Gradient Normalization for
      Adaptive Loss Balancing in Deep Multitask Networks
      <https://arxiv.org/abs/1711.02257>`_, ICML 2018 (Algorithm 1).
    """
    return _core.balance(
        gradnorm_weighting(
            num_tasks, alpha=alpha, weight_optimizer=weight_optimizer, norm_mask=norm_mask
        ),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
