"""IMTL: learned loss scales (IMTL-L) with IMTL-G's closed form on the scaled gradients."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core
from optax_balance._gramian._imtl_g import imtl_g_weights


class IMTLState(NamedTuple):
    r"""State of :func:`imtl`.

    Attributes:
      weights: ``(T,)`` the effective weight of each task's (unscaled) gradient in the
        last update on the shared leaves, :math:`\alpha_i e^{s_i(t)}` (IMTL-G's
        :math:`\alpha` on the scaled gradients times the loss scale).
      loss_scales: ``(T,)`` :math:`e^{s_i(t)}`, the loss scales the last update applied
        (the task-specific leaves are combined with them; 1 at ``init``).
      log_scales: ``(T,)`` the learned :math:`s(t+1)`, which the *next* update applies
        (0 at ``init``).
      rank: the numerical rank of the scaled gradients' cosine matrix in the last update.
      weight_opt_state: the state of ``weight_optimizer`` over :math:`s`.
    """

    weights: jax.Array
    loss_scales: jax.Array
    log_scales: jax.Array
    rank: jax.Array
    weight_opt_state: optax.OptState


def _default_weight_optimizer() -> optax.GradientTransformation:
    # LibMTL trains the loss scales with the model's optimizer: torch Adam with its
    # config defaults lr=1e-4, weight_decay=1e-5 (L2 added to the gradient).
    return optax.chain(optax.add_decayed_weights(1e-5), optax.adam(1e-4))


def imtl_weighting(
    num_tasks: int, *, weight_optimizer: optax.GradientTransformation | None = None
) -> _core.Weighting:
    r"""IMTL's weighting: IMTL-G on the gradients scaled by learned loss scales :math:`e^s`.

    The weights are :math:`\alpha_i e^{s_i}` with :math:`\alpha` IMTL-G's on the
    Gramian of the scaled gradients :math:`e^{s_i} g_i`; each call steps :math:`s` on
    IMTL-L's loss :math:`\sum_i (e^{s_i} L_i - s_i)` with ``weight_optimizer`` (see
    :func:`optax_balance.imtl`). Reads the Gramian and the losses.

    Args:
      num_tasks: T.
      weight_optimizer: an optax transformation for :math:`s` (default: LibMTL's, Adam
        with learning rate 1e-4 and L2 weight decay 1e-5).

    Returns:
      An :class:`optax_balance.Weighting` of the Gramian and the losses, with
      ``head_scales="loss_scales"``; its state is :class:`optax_balance.IMTLState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> w = ob.weightings.imtl(2, weight_optimizer=optax.sgd(0.1))
      >>> weights, state = w(J @ J.T, losses=jnp.array([2.0, 0.5]))
      >>> print(np.asarray(weights).round(4))        # s = 0: IMTL-G's weights
      [0.5923 0.4077]
      >>> print(np.asarray(state.log_scales).round(4))  # -0.1 * (e^0 L - 1)
      [-0.1   0.05]

    References:
      Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, `Towards Impartial Multi-task
      Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021.
    """
    t_cfg = _core.check_num_tasks(num_tasks, required=True)
    wopt = _default_weight_optimizer() if weight_optimizer is None else weight_optimizer
    if not (hasattr(wopt, "init") and hasattr(wopt, "update")):
        raise ValueError(
            "`weight_optimizer` must be an optax GradientTransformation (with `init` and "
            f"`update`), e.g. optax.adam(1e-4); got {weight_optimizer!r}."
        )

    def init(t: int) -> IMTLState:
        dt = _core.stat_dtype()
        s = jnp.zeros((t,), dt)
        return IMTLState(
            weights=jnp.full((t,), 1.0 / max(t, 1), dt),
            loss_scales=jnp.ones((t,), dt),
            log_scales=s,
            rank=jnp.zeros((), jnp.int32),
            weight_opt_state=wopt.init(s),
        )

    def weigh(stats: _core.Stats, state: IMTLState) -> tuple[jax.Array, IMTLState]:
        assert stats.gram is not None and stats.losses is not None
        s = state.log_scales
        scales = jnp.exp(s)
        alpha, rank = imtl_g_weights(stats.gram * scales[:, None] * scales[None, :])
        weights = alpha * scales
        # IMTL-L: d/ds_i of sum_i (e^{s_i} L_i - s_i) is e^{s_i} L_i - 1.
        grad_s = scales * stats.losses - 1.0
        upd, opt_state = wopt.update(grad_s, state.weight_opt_state, s)
        s_next = jnp.asarray(optax.apply_updates(s, upd), s.dtype)
        return weights, IMTLState(
            weights=weights,
            loss_scales=scales,
            log_scales=s_next,
            rank=rank,
            weight_opt_state=opt_state,
        )

    return _core.Weighting(
        init,
        weigh,
        needs=("gram", "losses"),
        name="imtl",
        num_tasks=t_cfg,
        head_scales="loss_scales",
    )


def imtl(
    num_tasks: int,
    *,
    weight_optimizer: optax.GradientTransformation | None = None,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
) -> optax.GradientTransformationExtraArgs:
    r"""IMTL: impartial multi-task learning, learned loss scales and impartial gradients.

    The hybrid of Liu et al. (ICLR 2021), as LibMTL's ``IMTL``. *IMTL-L*: each task's
    loss is scaled by a learned :math:`e^{s_i}` and regularised,
    :math:`\tilde L_i = e^{s_i} L_i - s_i` (:math:`s = 0` at the start), which drives
    :math:`e^{s_i} L_i` toward 1: the scaled losses are comparable. *IMTL-G*: on the
    shared leaves the scaled gradients :math:`\tilde g_i = e^{s_i} g_i` are combined with
    the weights :math:`\alpha` (summing to 1) that give :math:`d` the same projection on
    every :math:`\tilde g_i / \|\tilde g_i\|` (:func:`optax_balance.imtl_g`, on the
    Gramian :math:`\mathrm{diag}(e^s)\, G\, \mathrm{diag}(e^s)`); the task-specific leaves
    get :math:`\sum_i e^{s_i} g_i`, the gradients of the scaled losses:

    .. math::

      d_\text{shared} = \sum_i \alpha_i e^{s_i(t)} g_i, \qquad
      d_\text{heads} = \sum_i e^{s_i(t)} g_i, \qquad
      s(t+1) = \mathrm{opt}\big(s(t),\ \nabla_s = e^{s(t)} \odot L - 1\big).

    IMTL-G's direction depends only on the gradients' directions, so on the shared
    leaves the scales set its length alone; on the heads they are IMTL-L's loss
    balancing. :math:`s` is stepped by ``weight_optimizer`` (any optax transformation,
    given :math:`\nabla_s` and :math:`s` as params), as LibMTL steps its ``loss_scale``
    parameter with the model's optimizer; the default is LibMTL's default optimizer
    (Adam, learning rate 1e-4, L2 weight decay 1e-5). Timing: the update applies
    :math:`s(t)`; ``state.log_scales`` then holds :math:`s(t+1)`.

    LibMTL's IMTL has no other hyperparameters. Where it departs from IMTL-G as
    :func:`optax_balance.imtl_g` computes it: LibMTL inverts :math:`D U^\top` directly
    (singular for rank-deficient gradients); here the pseudo-inverse convention of
    :func:`optax_balance.imtl_g` applies, which equals LibMTL's for independent
    gradients up to one documented sign case (:math:`1^\top N^{-1}\beta < 0`, where the
    weights sum to -1 so the common projection stays positive). The losses are expected
    to be positive (IMTL-L drives :math:`e^{s_i} L_i` to 1).

    A step with a non-finite loss or Gramian keeps the whole state (:math:`s`, the
    optimizer's state) and combines with the previous weights and loss scales.

    Args:
      num_tasks: T (required: :math:`s` and its optimizer state are created by ``init``).
      weight_optimizer: an optax transformation for the log-scales :math:`s` (default
        ``optax.chain(optax.add_decayed_weights(1e-5), optax.adam(1e-4))``, LibMTL's).
      shared: which parameter leaves are shared (``None``: all); the others are the task
        heads, combined as :math:`\sum_i e^{s_i} g_i`.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``
        (the losses are averaged over it).
      sync: ``"grads"`` (exact) or ``"stats"`` (average only the Gramian and losses).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``task_losses=``; its state is :class:`IMTLState`.

    Raises:
      ValueError: for ``num_tasks < 1`` or a ``weight_optimizer`` that is not an optax
        transformation; at ``update`` when ``task_losses`` is missing.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> tx = ob.imtl(2, weight_optimizer=optax.sgd(0.1))
      >>> state = tx.init(jnp.zeros(3))
      >>> d, state = tx.update(J, state, task_losses=jnp.array([2.0, 0.5]))
      >>> print(np.asarray(d).round(4))                  # s = 0: IMTL-G
      [0.0767 1.     1.    ]
      >>> print(np.asarray(state.log_scales).round(4))   # -0.1 * (L - 1)
      [-0.1   0.05]
      >>> d, state = tx.update(J, state, task_losses=jnp.array([2.0, 0.5]))
      >>> print(np.asarray(state.loss_scales).round(4))  # e^s, applied
      [0.9048 1.0513]

    References:
      Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, `Towards Impartial Multi-task
      Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021; LibMTL
      ``IMTL``.
    """
    return _core.balance(
        imtl_weighting(num_tasks, weight_optimizer=weight_optimizer),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
