"""IMTL-G: the combination whose projection on every task's unit gradient is the same."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core


class IMTLGState(NamedTuple):
    """State of :func:`imtl_g`.

    Attributes:
      weights: ``(T,)`` the weights ``alpha`` applied in the last update (they sum to 1;
        -1 in the rare case described in :func:`imtl_g`; all 0 when no non-zero
        combination has equal positive projections, e.g. rank-deficient gradients).
      rank: the numerical rank of the gradients' cosine matrix in the last update.
    """

    weights: jax.Array
    rank: jax.Array


def imtl_g_weights(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""IMTL-G weights from the Gramian, via the cosine matrix of the gradients.

    With norms :math:`n_i = \sqrt{G_{ii}}`, :math:`N = \mathrm{diag}(n)` and the cosine
    matrix :math:`C = N^{-1} G N^{-1}` (rows of zero gradients set to 0),
    :math:`\beta = C^+ 1` and :math:`\alpha = N^{-1}\beta / |1^\top N^{-1}\beta|`. When
    :math:`G` is invertible :math:`N^{-1} C^{-1} 1 = G^{-1} n`, the paper's solution.
    Working on :math:`C` (unit diagonal) keeps the eigen-solve well conditioned when the
    gradients' norms differ by many orders of magnitude (1e-10 next to 1e10), which a
    pseudo-inverse of :math:`G` itself cannot resolve in float32. :math:`C^+` comes from
    ``eigh`` with eigenvalues below ``10 T eps`` times the largest treated as zero
    (NumPy's and JAX's default ``pinv`` cut-off). Since :math:`1^\top C^+ 1 \ge 0`, with
    equality exactly when no combination has a positive projection on any task (e.g. a
    pair of opposite gradients), the weights are 0 when it is below :math:`\sqrt{eps}`
    or when the normaliser cancels to rounding level, and also when :math:`1` is not in the
    range of :math:`C` (no non-zero combination has equal projections; see
    :func:`optax_balance.imtl_g`).

    Returns:
      ``(weights, rank)``: rank is the numerical rank of :math:`C`.
    """
    t = gram.shape[0]
    dt = gram.dtype
    eps = jnp.finfo(dt).eps
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    pos = norms > 0
    inv_n = jnp.where(pos, 1.0 / jnp.where(pos, norms, 1.0), 0.0)
    cos = (gram * inv_n[:, None]) * inv_n[None, :]
    lam, vecs = jnp.linalg.eigh(cos)
    keep = lam > 10.0 * t * eps * jnp.max(lam)
    inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
    coef = vecs.T @ pos.astype(dt)
    beta = vecs @ (inv * coef)
    v = beta * inv_n
    total = jnp.sum(v)
    # The conditions C beta = 1 have a solution exactly when 1 has no component along the
    # (numerically) null eigenvectors; otherwise the only equal projection is 0.
    consistent = jnp.sum(jnp.where(keep, 0.0, coef**2)) <= t * jnp.sqrt(eps)
    ok = consistent & (jnp.sum(beta) > jnp.sqrt(eps))
    ok = ok & (jnp.abs(total) > eps * jnp.sum(jnp.abs(v)))
    # |total|: the common projection d . u_i = 1/total must be positive (see imtl_g).
    w = jnp.where(ok, v / jnp.where(ok, jnp.abs(total), 1.0), 0.0)
    return w.astype(dt), jnp.sum(keep).astype(jnp.int32)


def imtl_g_weighting() -> _core.Weighting:
    r"""IMTL-G's weighting: equal projections on every task's unit gradient, from the Gramian.

    See :func:`optax_balance.imtl_g` for the closed form and its rank-deficient case.

    Returns:
      An :class:`optax_balance.Weighting` of the Gramian; its state is
      :class:`optax_balance.IMTLGState`.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> weights, state = ob.weightings.imtl_g()(J @ J.T)
      >>> weights.round(4)
      Array([0.5923, 0.4077], dtype=float32)

    References:
      Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, `Towards Impartial Multi-task
      Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021.
    """

    def init(t: int) -> IMTLGState:
        w = jnp.full((t,), 1.0 / max(t, 1), _core.stat_dtype())
        return IMTLGState(weights=w, rank=jnp.zeros((), jnp.int32))

    def weigh(stats: _core.Stats, state: IMTLGState) -> tuple[jax.Array, IMTLGState]:
        del state
        assert stats.gram is not None
        w, rank = imtl_g_weights(stats.gram)
        return w, IMTLGState(weights=w, rank=rank)

    return _core.Weighting(
        init,
        weigh,
        needs=("gram",),
        name="imtl_g",
    )


def imtl_g(
    *,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""IMTL-G: impartial gradient combination, equal projection on every task direction.

    With task gradients :math:`g_i`, unit directions :math:`u_i = g_i/\|g_i\|` and the
    combination :math:`d = \sum_i \alpha_i g_i`, IMTL-G (Liu et al., Sec. 3.1) asks that
    :math:`d` have the same projection on every :math:`u_i` and that
    :math:`\sum_i \alpha_i = 1`. The paper solves it with the differences
    :math:`D = [g_1 - g_t]_t`, :math:`U = [u_1 - u_t]_t`:
    :math:`\alpha_{2:T} = g_1 U^\top (D U^\top)^{-1}`, :math:`\alpha_1 = 1 - \sum_{t\ge2}
    \alpha_t`. In terms of the Gramian :math:`G = J J^\top` and the norms
    :math:`n_i = \|g_i\|` the same conditions read :math:`G\alpha = c\, n`, solved by
    :math:`\alpha \propto G^{-1} n`. We compute it through the cosine matrix
    :math:`C = N^{-1} G N^{-1}` of the gradients (:math:`N = \mathrm{diag}(n)`):

    .. math::

      \beta = C^{+} 1, \qquad
      \alpha = \frac{N^{-1}\beta}{|1^\top N^{-1}\beta|}, \qquad
      d = \sum_i \alpha_i g_i = \frac{\sum_i \beta_i u_i}{|1^\top N^{-1}\beta|} ,

    which is the paper's solution when the gradients are linearly independent
    (:math:`N^{-1} C^{-1} 1 = G^{-1} n`) and stays accurate in float32 when norms differ
    by 1e20 (:math:`C` has a unit diagonal). Nothing is iterative: one ``eigh`` of a
    :math:`T \times T` matrix.

    Rank-deficient gradients. The paper defines IMTL-G by its conditions (equal
    projections on the unit gradients :math:`u_i`, :math:`\sum_i \alpha_i = 1`); we keep
    them. When some :math:`d \ne 0` meets them (:math:`1` in the range of :math:`C`:
    duplicate or collinear gradients), :math:`\beta = C^{+}1` gives it, the least-norm
    :math:`\beta` (duplicates share their weight equally, a zero gradient gets weight 0).
    When none does (three gradients in a plane, an opposite pair), the only equal
    projection is 0: the paper's closed form, where :math:`D U^\top` is invertible,
    returns weights summing to 1 whose combination is :math:`d = 0`, and this is also the
    limit of the full-rank solution as :math:`J` becomes singular. We return
    :math:`\alpha = 0` (so :math:`d` is exactly 0, not the rounding left by a cancelling
    combination). torchjd instead takes :math:`\alpha \propto G^{+} n`, the
    least-squares solution of :math:`J d = n`, i.e. of :math:`u_i \cdot d = 1` with each
    task's equation weighted by :math:`\|g_i\|^2`: a direction that favours the larger
    gradients. Worked example, :math:`J = [[2, 0], [0, 1], [1, 1]]`: equal projections
    on :math:`(1, 0)`, :math:`(0, 1)`, :math:`(1, 1)/\sqrt2` force :math:`d_1 = d_2 = c`
    and :math:`\sqrt2 c = c`, so :math:`c = 0`; the paper's formula gives
    :math:`\alpha = (1, 2, -2)`, :math:`d = 0`; we give :math:`\alpha = 0`, :math:`d =
    0`; torchjd gives :math:`\alpha = (0.2535, 0.3099, 0.4366)`, :math:`d = (0.9436,
    0.7465)` with projections :math:`(0.944, 0.746, 1.195)`. On consistent rank-deficient
    :math:`J` the two directions agree, but for collinear gradients of different norms
    the scale differs (:math:`J = [[1, 0], [2, 0], [0, 1]]`: :math:`d = (0.5714, 0.5714)`
    here, :math:`(0.625, 0.625)` in torchjd; the sum-to-one normalisation depends on how
    the weight is split in the null space of :math:`G`). Numerically, :math:`1` counts as
    outside the range of :math:`C` when its component along the eigenvectors dropped by
    the pseudo-inverse has a mean square above :math:`\sqrt{eps}` (rounding leaves about
    :math:`T \cdot eps`).

    Scaling and sign. The weights sum to 1, as in the paper, LibMTL and torchjd, so
    :math:`d` is on the scale of the *mean* gradient, not the sum (multiply the learning
    rate by T to compare with summed-loss training). One departure: the common
    projection is :math:`d \cdot u_i = 1/(1^\top N^{-1}\beta)`, and for some
    configurations of three or more tasks (about 1% of random Gaussian gradients)
    :math:`1^\top N^{-1}\beta < 0`, where the paper's normalisation would return a
    direction that *increases* every loss to first order. We divide by the absolute
    value instead, so the
    common projection is always positive and the weights then sum to -1; everywhere
    else the result is the paper's. The paper also learns loss scales (IMTL-L); that
    part is not included here.

    Args:
      shared: which parameter leaves are shared (``None``: all); a pytree of bools, a
        prefix of one, or a callable ``params -> pytree``. Other leaves are summed.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` (exact: average the stacked gradients over ``axis_name``) or
        ``"stats"`` (average only the Gramian).
      num_tasks: T, if known; gives ``init`` a full-shape state.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state is :class:`IMTLGState`.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> tx = ob.imtl_g()
      >>> d, state = tx.update(J, tx.init(jnp.zeros(3)))
      >>> d.round(4)
      Array([0.0767, 1.    , 1.    ], dtype=float32)
      >>> state.weights.round(4)
      Array([0.5923, 0.4077], dtype=float32)

      Three gradients in a plane: no non-zero direction has equal projections.

      >>> J = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
      >>> d, state = tx.update(J, tx.init(jnp.zeros(2)))
      >>> d
      Array([0., 0.], dtype=float32)

    References:
      Liu et al., `Towards Impartial Multi-task Learning
      <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021.
      Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
      <https://arxiv.org/abs/2406.16232>`_, 2024 (the pseudo-inverse form).
    """
    return _core.balance(
        imtl_g_weighting(),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
