"""FAMO: task weights learned from how fast each log-loss falls, at O(1) cost in T."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core

EPSILON = 1e-8  # added to L - b before the logarithm, as the official code


class FAMOState(NamedTuple):
    r"""State of :func:`famo`.

    Attributes:
      weights: ``(T,)`` the weights of the last update,
        :math:`c\, z_i / (L_i - b_i + \epsilon)` (they sum to 1).
      logits: ``(T,)`` the task logits :math:`\xi`, :math:`z = \mathrm{softmax}(\xi)`, as
        used by the last update.
      prev_losses: ``(T,)`` the losses of the last update, from which the next update
        measures the change of each log-loss.
      has_prev: ``bool`` whether ``prev_losses`` holds an update's losses.
      logit_opt_state: the state of FAMO's Adam over the logits.
    """

    weights: jax.Array
    logits: jax.Array
    prev_losses: jax.Array
    has_prev: jax.Array
    logit_opt_state: optax.OptState


def famo_logit_gradient(logits: jax.Array, delta: jax.Array) -> jax.Array:
    r"""The logits' gradient :math:`J_{\mathrm{softmax}}(\xi)^\top \delta`.

    It is :math:`z \odot (\delta - z^\top \delta)` with :math:`z = \mathrm{softmax}(\xi)`.
    """
    z = jax.nn.softmax(logits)
    return z * (delta - jnp.dot(z, delta))


def famo_weighting(
    num_tasks: int,
    *,
    min_losses: Any = None,
    lr: float = 0.025,
    weight_decay: float = 1e-3,
) -> _core.Weighting:
    r"""FAMO's weighting: an Adam step of the logits, then :math:`w_i = c\, z_i / (L_i - b_i)`.

    The step uses the change of each log-loss since the last update (or, given the
    keyword ``losses_after``, over the last update's own batch); see
    :func:`optax_balance.famo`.

    Args:
      num_tasks: T.
      min_losses: ``(T,)`` lower bounds :math:`b` of the losses (default 0).
      lr: the learning rate of the logits' Adam.
      weight_decay: the L2 coefficient of the logits' Adam (added to the gradient).

    Returns:
      An :class:`optax_balance.Weighting` of the losses (and of ``losses_after``); its
      state is :class:`optax_balance.FAMOState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> weights, state = ob.weightings.famo(2)(jnp.array([1.0, 2.0]))
      >>> print(np.asarray(weights).round(4))         # z = [.5, .5]: c [1/1, 1/2] / 2
      [0.6667 0.3333]

    References:
      Liu, Liu, Ye & Liu, `FAMO: Fast Adaptive Multitask Optimization
      <https://arxiv.org/abs/2306.03792>`_, NeurIPS 2023 (Algorithm 1).
    """
    t_cfg = _core.check_num_tasks(num_tasks, required=True)
    assert t_cfg is not None
    bounds, _ = _core.check_task_vector("min_losses", min_losses, t_cfg)
    _core.check_range("lr", lr, low=0.0)
    _core.check_range("weight_decay", weight_decay, low=0.0)
    # torch.optim.Adam(lr, weight_decay): the decay is added to the gradient (L2, coupled).
    adam = optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr))

    def init(t: int) -> FAMOState:
        dt = _core.stat_dtype()
        logits = jnp.zeros((t,), dt)
        return FAMOState(
            weights=jnp.full((t,), 1.0 / max(t, 1), dt),
            logits=logits,
            prev_losses=jnp.zeros((t,), dt),
            has_prev=jnp.asarray(False),
            logit_opt_state=adam.init(logits),
        )

    def weigh(stats: _core.Stats, state: FAMOState) -> tuple[jax.Array, FAMOState]:
        assert stats.losses is not None
        dt = state.logits.dtype
        b = jnp.zeros((), dt) if bounds is None else jnp.asarray(bounds, dt)
        losses = stats.losses
        after = (stats.extra or {}).get("losses_after", losses)
        shifted = losses - b + EPSILON
        shifted_after = after - b + EPSILON
        valid = jnp.all(shifted > 0) & jnp.all(shifted_after > 0)
        # The logit step from the change of every log-loss: from the last update's
        # losses to this update's (default), or to ``losses_after`` (the exact form).
        log_prev = jnp.log(jnp.maximum(state.prev_losses - b + EPSILON, EPSILON))
        delta = log_prev - jnp.log(jnp.where(shifted_after > 0, shifted_after, 1.0))
        grad = famo_logit_gradient(state.logits, delta)
        upd, opt_state = adam.update(grad, state.logit_opt_state, state.logits)
        stepped = jnp.asarray(optax.apply_updates(state.logits, upd), dt)
        logits = jnp.where(state.has_prev, stepped, state.logits)
        opt_state = jax.tree.map(
            lambda new, old: jnp.where(state.has_prev, new, old),
            opt_state,
            state.logit_opt_state,
        )
        # This step's weights: the gradient of c sum_i z_i log(L_i - b_i + eps), c fixed.
        inv = jax.nn.softmax(logits) / jnp.where(shifted > 0, shifted, 1.0)
        w = jnp.where(valid, inv / jnp.sum(inv), jnp.nan)
        return w, FAMOState(
            weights=w,
            logits=logits,
            prev_losses=losses,
            has_prev=jnp.asarray(True),
            logit_opt_state=opt_state,
        )

    return _core.Weighting(
        init,
        weigh,
        needs=("losses",),
        name="famo",
        num_tasks=t_cfg,
        extra_args=("losses_after",),
    )


def famo(
    num_tasks: int,
    *,
    min_losses: Any = None,
    lr: float = 0.025,
    weight_decay: float = 1e-3,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
) -> optax.GradientTransformationExtraArgs:
    r"""FAMO: balance the rates at which the log-losses fall, from the losses alone.

    FAMO (Fast Adaptive Multitask Optimization) descends the weighted log-losses with
    weights :math:`z = \mathrm{softmax}(\xi)` on the simplex, normalised so that the
    update is a convex combination of the task gradients:

    .. math::

      \mathcal L = c \sum_{i=1}^T z_i \log(L_i - b_i + \epsilon), \qquad
      c = \Big(\sum_i \frac{z_i}{L_i - b_i + \epsilon}\Big)^{-1} \text{(a constant)},
      \qquad w_i = \frac{c\, z_i}{L_i - b_i + \epsilon} ,

    and learns the logits :math:`\xi` so that every task's log-loss falls at the same
    rate: with :math:`\delta_i` the decrease of :math:`\log(L_i - b_i + \epsilon)`
    across a model step, :math:`\xi` takes an Adam step (``lr``, L2 ``weight_decay``
    added to the gradient, as ``torch.optim.Adam``) along
    :math:`J_{\mathrm{softmax}}(\xi)^\top \delta`, which moves weight towards the tasks
    that improved least. It needs only the T losses: O(1) extra time and memory in T,
    the paper's point. :math:`\epsilon = 10^{-8}`, :math:`\xi = 0` at the start.

    **The logit step, and what it approximates.** The official code, LibMTL and torchjd
    re-evaluate the losses on the same batch after the model step (an extra forward
    pass) and take :math:`\delta = \log L(\theta_t; x_t) - \log L(\theta_{t+1}; x_t)`.
    By default this implementation needs no extra pass: each update measures
    :math:`\delta = \log L(\theta_{t-1}; x_{t-1}) - \log L(\theta_t; x_t)`, the change
    from the previous update's losses to this one's, and steps :math:`\xi` *before*
    forming this step's weights (so ``ob.weighted_loss`` at step t already includes the
    step from :math:`L(t-1)` to :math:`L(t)`). The two differ by the change of batch,
    :math:`\log L(\theta_t; x_{t-1}) - \log L(\theta_t; x_t)`, noise of mean zero when
    batches are drawn alike, and the weights lag by one logit step. For the exact form,
    re-evaluate the losses on a step's batch after its model update and pass them to the
    *next* step's ``update`` and ``weighted_loss`` as the keyword ``losses_after=``
    (shape ``(T,)``): :math:`\delta` is then taken over that one batch, as in the paper.
    The weight decay follows the paper's Algorithm 2 and LibMTL (``1e-3``; the official
    code uses ``1e-5``).

    ``state.weights`` is :math:`w`, the weights used; ``state.logits`` the logits they
    came from; ``state.prev_losses`` this update's losses (the next step's baseline).

    A loss-based method: train with :func:`optax_balance.weighted_loss` and ONE backward
    pass, or give ``update`` stacked per-task gradients (it returns
    :math:`\sum_i w_i g_i`).

    Losses it cannot take: the logarithm needs :math:`L_i > b_i - \epsilon` (the paper
    assumes non-negative losses, :math:`b = 0`). A step with a loss at or below that, or
    a non-finite one (``losses_after`` included), is a non-finite step: its weights are
    the previous ones (``state.weights``), in ``update`` and ``weighted_loss`` alike, and
    the whole state (logits, Adam, baseline losses) is kept.

    Args:
      num_tasks: T (required: the logits and their Adam state are created by ``init``).
      min_losses: ``(T,)`` lower bounds :math:`b` of the losses (default 0; under
        ``optax.inject_hyperparams``, list it in ``static_args``).
      lr: the learning rate of the logits' Adam :math:`\ge 0` (the paper: 0.025).
      weight_decay: the L2 coefficient of the logits' Adam :math:`\ge 0`.
      shared: which parameter leaves are shared (``None``: all). For stacked gradients
        only: other leaves are summed unweighted.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``
        (the losses, and ``losses_after``, are averaged over it).
      sync: ``"grads"`` (the output is averaged over ``axis_name``) or ``"stats"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``task_losses=`` of shape ``(T,)`` (and takes ``losses_after=``); its state is
      :class:`FAMOState`.

    Raises:
      ValueError: at construction for ``num_tasks < 1``, ``min_losses`` not of length T,
        or a negative ``lr`` or ``weight_decay``.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> tx = ob.famo(2)
      >>> state, p = tx.init(jnp.zeros(3)), jnp.zeros(3)
      >>> loss = ob.weighted_loss(tx, jnp.array([1.0, 2.0]), state)
      >>> print(np.asarray(loss).round(4))               # (2/3) 1 + (1/3) 2
      1.3333
      >>> _, state = tx.update(p, state, p, task_losses=jnp.array([1.0, 2.0]))
      >>> _, state = tx.update(p, state, p, task_losses=jnp.array([0.5, 2.0]))
      >>> print(np.asarray(state.logits).round(4))       # task 0 improved: weight moves to 1
      [-0.025  0.025]

    References:
      Liu, Liu, Ye & Liu, `FAMO: Fast Adaptive Multitask Optimization
      <https://arxiv.org/abs/2306.03792>`_, NeurIPS 2023 (Algorithms 1 and 2; the
      official code is `Cranial-XIX/FAMO <https://github.com/Cranial-XIX/FAMO>`_).
    """
    return _core.balance(
        famo_weighting(num_tasks, min_losses=min_losses, lr=lr, weight_decay=weight_decay),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
