"""SDMGrad: direction-oriented task weights from the cross-Gramian of two mini-batches."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import projections

from optax_balance import _core


class SDMGradState(NamedTuple):
    r"""State of :func:`sdmgrad`.

    Attributes:
      weights: ``(T,)`` the weights the last update applied,
        :math:`(w + \lambda \tilde w) / (1 + \lambda)`.
      inner_weights: ``(T,)`` the inner solver's iterate :math:`w` on the simplex, the
        warm start of the next update (:math:`1/T` at ``init``).
    """

    weights: jax.Array
    inner_weights: jax.Array


def sdmgrad_weights(
    cross_gram: jax.Array,
    w: jax.Array,
    pref: jax.Array,
    *,
    lr: Any,
    momentum: Any,
    n_iter: int,
    lambda_: Any,
) -> tuple[jax.Array, jax.Array]:
    r"""SDMGrad's inner solve, warm-started at ``w``: ``(applied weights, new w)``.

    :math:`A` is scaled by :math:`s^2 + 10^{-8}` with :math:`s` the mean of
    :math:`\sqrt{\max(A_{ii}, 0)}`, then ``n_iter`` steps of heavy-ball gradient descent
    (velocity restarted at 0) on :math:`\tfrac12 w^\top A w + \lambda w^\top A \tilde w`,
    each projected onto the simplex.
    """
    diag = jnp.maximum(jnp.diagonal(cross_gram), 0.0)
    scale = jnp.mean(jnp.sqrt(diag))
    a = cross_gram / (scale * scale + 1e-8)

    def body(_: Any, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        w, velocity = carry
        velocity = momentum * velocity + a @ (w + lambda_ * pref)
        return projections.projection_simplex(w - lr * velocity).astype(w.dtype), velocity

    w, _ = jax.lax.fori_loop(0, n_iter, body, (w, jnp.zeros_like(w)))
    return ((w + lambda_ * pref) / (1.0 + lambda_)).astype(w.dtype), w


def sdmgrad_weighting(
    *,
    lr: float = 10.0,
    momentum: float = 0.5,
    n_iter: int = 20,
    lambda_: float = 0.3,
    pref_vector: Any = None,
) -> _core.Weighting:
    r"""SDMGrad's weighting: a warm-started projected heavy-ball solve on the cross-Gramian.

    :math:`w \leftarrow \Pi_\Delta(w - \eta v)`, :math:`v \leftarrow \mu v + \hat A (w +
    \lambda \tilde w)` for ``n_iter`` steps on the scaled cross-Gramian :math:`\hat A` of
    two independent mini-batches; the weights are :math:`(w + \lambda \tilde w)/(1 +
    \lambda)` (see :func:`optax_balance.sdmgrad`). Called directly on a ``(T, T)`` array,
    it reads it as :math:`A = J_1 J_2^\top`.

    Args:
      lr: :math:`\eta > 0`, the inner step size.
      momentum: :math:`\mu \in [0, 1)`, the inner momentum.
      n_iter: inner iterations per update, >= 1.
      lambda_: :math:`\lambda \ge 0`, the pull toward the preference direction.
      pref_vector: :math:`\tilde w`, one entry per task (``None``: :math:`1/T`).

    Returns:
      An :class:`optax_balance.Weighting` of the cross-Gramian; its state is
      :class:`optax_balance.SDMGradState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> A = jnp.diag(jnp.array([1.0, 0.25, 0.0]))   # J1 @ J2.T; torchjd's test
      >>> weights, state = ob.weightings.sdmgrad(n_iter=1)(A)
      >>> print(np.asarray(weights * 13).round(4))  # [1, 1, 11] / 13
      [ 1.  1. 11.]

    References:
      Xiao, Ban & Ji, `Direction-oriented Multi-objective Learning: Simple and Provable
      Stochastic Algorithms <https://arxiv.org/abs/2305.18409>`_, NeurIPS 2023.
    """
    _core.check_range("lr", lr, low=0.0, low_inclusive=False)
    _core.check_range("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    iters = _core.check_int("n_iter", n_iter, low=1)
    _core.check_range("lambda_", lambda_, low=0.0)
    pref, t_pref = _core.check_task_vector("pref_vector", pref_vector)

    def init(t: int) -> SDMGradState:
        dt = _core.stat_dtype()
        w = jnp.full((t,), 1.0 / max(t, 1), dt)
        return SDMGradState(weights=w, inner_weights=w)

    def weigh(stats: _core.Stats, state: SDMGradState) -> tuple[jax.Array, SDMGradState]:
        assert stats.cross_gram is not None
        t = stats.num_tasks
        dt = stats.cross_gram.dtype
        w_tilde = jnp.full((t,), 1.0 / t, dt) if pref is None else jnp.asarray(pref, dt)
        weights, w = sdmgrad_weights(
            stats.cross_gram,
            state.inner_weights,
            w_tilde,
            lr=lr,
            momentum=momentum,
            n_iter=iters,
            lambda_=lambda_,
        )
        return weights, SDMGradState(weights=weights, inner_weights=w)

    return _core.Weighting(init, weigh, needs=("cross_gram",), name="sdmgrad", num_tasks=t_pref)


def sdmgrad(
    *,
    lr: float = 10.0,
    momentum: float = 0.5,
    n_iter: int = 20,
    lambda_: float = 0.3,
    pref_vector: Any = None,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SDMGrad: stochastic direction-oriented MGDA on two independent mini-batches.

    SDMGrad (Xiao, Ban & Ji, NeurIPS 2023) seeks the direction
    :math:`d = \nabla F (w + \lambda \tilde w)/(1 + \lambda)` whose weights :math:`w`
    minimise :math:`\tfrac12\|\nabla F w\|^2 + \lambda \langle \nabla F w, \nabla F \tilde
    w\rangle` on the simplex: MGDA pulled toward the preference direction
    :math:`\nabla F \tilde w` (the mean gradient by default). The matrix
    :math:`\nabla F^\top \nabla F` is estimated without bias by the cross-Gramian of two
    *independent* mini-batches, :math:`A = J_1 J_2^\top`, scaled by :math:`s^2 + 10^{-8}`
    with :math:`s = \mathrm{mean}_i \sqrt{\max(A_{ii}, 0)}` (so the step size does not
    depend on the gradients' scale). Each update runs ``n_iter`` steps of projected
    heavy-ball descent, warm-started at the previous :math:`w` (velocity from 0):

    .. math::

      v \leftarrow \mu v + \hat A (w + \lambda \tilde w), \qquad
      w \leftarrow \Pi_\Delta(w - \eta v), \qquad
      d = \sum_i \frac{w_i + \lambda \tilde w_i}{1 + \lambda}\,
          \tfrac12\big(g_i^{(1)} + g_i^{(2)}\big),

    with :math:`\Pi_\Delta` the Euclidean projection onto the probability simplex. As
    torchjd 0.18's ``SDMGradWeighting`` (names and defaults; LibMTL's ``SDMGrad_lamda``
    and ``SDMGrad_niter`` are ``lambda_`` and ``n_iter``, and LibMTL's inner step is 5,
    torchjd's 10). The direction here is the weighted mean of both batches, the
    gradient of the weighted loss on every sample drawn; the paper, LibMTL and torchjd's
    example apply the weights to a third batch :math:`\zeta`, which is the weighting
    (:func:`optax_balance.weightings.sdmgrad` on :math:`J_1 J_2^\top`) with the weights
    applied by the caller.

    The second batch's stacked gradients are the keyword ``task_grads2`` of ``update``
    (same structure and shapes as the first; a ``ValueError`` says so if missing).
    Task-specific leaves get the mean over batches of :math:`\sum_i g_i`. A step with a
    non-finite cross-Gramian keeps the state and combines with the previous weights.

    Args:
      lr: :math:`\eta > 0`, the inner step size.
      momentum: :math:`\mu \in [0, 1)`, the inner heavy-ball momentum.
      n_iter: inner iterations per update (an int >= 1; static under
        ``optax.inject_hyperparams``).
      lambda_: :math:`\lambda \ge 0`, how strongly the direction is pulled toward the
        preference direction (0: stochastic MGDA).
      pref_vector: :math:`\tilde w`, one entry per task (fixes T); ``None``: :math:`1/T`,
        the mean gradient.
      shared: which parameter leaves are shared (``None``: all); other leaves are summed
        over the task axis, unweighted.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` (exact: average both batches' stacked gradients over
        ``axis_name``) or ``"stats"`` (average only the cross-Gramian, still unbiased).
      num_tasks: T, if known; gives ``init`` a full-shape state.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``task_grads2=``; its state is :class:`SDMGradState`.

    Raises:
      ValueError: for ``lr <= 0``, ``momentum`` outside ``[0, 1)``, ``n_iter < 1``,
        ``lambda_ < 0`` or a ``pref_vector`` that is not a finite 1-D vector; at
        ``update`` when ``task_grads2`` is missing or does not match the first batch.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> tx = ob.sdmgrad(n_iter=1)
      >>> j1 = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
      >>> j2 = j1                                   # A = diag(1, 1/4, 0), as torchjd's test
      >>> d, state = tx.update(j1, tx.init(jnp.zeros(3)), task_grads2=j2)
      >>> print(np.asarray(state.weights * 13).round(4))
      [ 1.  1. 11.]
      >>> print(np.asarray(state.inner_weights))
      [0. 0. 1.]

    References:
      Xiao, Ban & Ji, `Direction-oriented Multi-objective Learning: Simple and Provable
      Stochastic Algorithms <https://arxiv.org/abs/2305.18409>`_, NeurIPS 2023;
      torchjd ``SDMGradWeighting``; LibMTL ``SDMGrad``.
    """
    return _core.balance(
        sdmgrad_weighting(
            lr=lr, momentum=momentum, n_iter=n_iter, lambda_=lambda_, pref_vector=pref_vector
        ),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
