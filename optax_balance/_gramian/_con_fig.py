"""ConFIG: the direction with prescribed cosines to every task gradient, scaled to their sum."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core


class ConFIGState(NamedTuple):
    """State of :func:`con_fig`.

    Attributes:
      weights: ``(T,)`` the weights of the raw gradients in the last update (the output
        is ``sum_i weights[i] * g_i``; 0 for a zero gradient, all 0 when the output is 0).
      rank: the numerical rank of the unit gradients in the last update.
    """

    weights: jax.Array
    rank: jax.Array


def con_fig_weights(gram: jax.Array, pref: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""ConFIG's weights from the Gramian, through the cosine matrix of the gradients.

    With norms :math:`n_i = \sqrt{G_{ii}}`, :math:`N = \mathrm{diag}(n)`, the unit rows
    :math:`U = N^{-1} J` (zero rows stay zero) and their Gramian, the cosine matrix
    :math:`C = U U^\top = N^{-1} G N^{-1}`:
    :math:`U^+ p = U^\top C^+ p = \sum_i a_i u_i` with :math:`a = C^+ p`, of squared norm
    :math:`a^\top C a`. Its unit vector :math:`\hat x` is scaled by
    :math:`\sum_j g_j \cdot \hat x = n^\top C a / \sqrt{a^\top C a}`, so

    .. math::

      d = \frac{n^\top C a}{a^\top C a} \sum_i a_i u_i, \qquad
      w_i = \frac{n^\top C a}{a^\top C a}\, \frac{a_i}{n_i} .

    :math:`C^+` comes from ``eigh`` with eigenvalues below ``10 T eps`` times the largest
    treated as zero (as :func:`optax_balance.imtl_g`); ``d = 0`` (all weights 0) when
    :math:`a^\top C a` is 0.

    Returns:
      ``(weights, rank)``: rank is the numerical rank of :math:`C`.
    """
    t = gram.shape[0]
    dt = gram.dtype
    eps = jnp.finfo(dt).eps
    norms = _core.safe_sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    inv_n = _core.safe_inverse(norms)
    cos = (gram * inv_n[:, None]) * inv_n[None, :]
    lam, vecs = jnp.linalg.eigh(cos)
    keep = lam > 10.0 * t * eps * jnp.max(lam)
    inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
    a = vecs @ (inv * (vecs.T @ pref.astype(dt)))
    ca = cos @ a
    sq = a @ ca  # ||U^+ p||^2
    length = norms @ ca  # sum_j g_j . U^+ p
    ok = sq > 0
    scale = jnp.where(ok, length / jnp.where(ok, sq, 1.0), 0.0)
    return (scale * a * inv_n).astype(dt), jnp.sum(keep).astype(jnp.int32)


def con_fig_weighting(*, pref_vector: Any = None) -> _core.Weighting:
    r"""ConFIG's weighting: the pseudo-inverse of the unit gradients, from the Gramian.

    See :func:`optax_balance.con_fig`; the closed form is in :func:`con_fig_weights`.

    Args:
      pref_vector: ``None`` (ones) or one value >= 0 per task (positive sum): the target
        cosines, up to scale.

    Returns:
      An :class:`optax_balance.Weighting` of the Gramian; its state is
      :class:`optax_balance.ConFIGState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> weights, state = ob.weightings.con_fig()(J @ J.T)
      >>> print(np.asarray(weights @ J).round(4))      # torchjd's ConFIG()(J)
      [0.1588 2.0706 2.0706]

    References:
      Liu, Chu & Thuerey, `ConFIG: Towards Conflict-free Training of Physics Informed
      Neural Networks <https://arxiv.org/abs/2408.11104>`_, ICLR 2025 (Eq. 2).
    """
    pref, t_pref = _core.check_task_vector("pref_vector", pref_vector, nonnegative=True)
    dt = _core.stat_dtype

    def init(t: int) -> ConFIGState:
        if t_pref is not None and t not in (0, t_pref):
            raise ValueError(
                f"`pref_vector` has {t_pref} entries but the gradients have T={t} tasks."
            )
        return ConFIGState(weights=jnp.ones((t,), dt()), rank=jnp.zeros((), jnp.int32))

    def weigh(stats: _core.Stats, state: ConFIGState) -> tuple[jax.Array, ConFIGState]:
        del state
        assert stats.gram is not None
        t = stats.num_tasks
        p = jnp.ones((t,), dt()) if pref is None else jnp.asarray(pref, dt())
        w, rank = con_fig_weights(stats.gram, p)
        return w, ConFIGState(weights=w, rank=rank)

    return _core.Weighting(init, weigh, needs=("gram",), name="con_fig", num_tasks=t_pref)


def con_fig(
    *,
    pref_vector: Any = None,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""ConFIG: a conflict-free direction with prescribed cosines to every task gradient.

    ConFIG (Liu et al., Eq. 2, as torchjd's ``ConFIG``) looks for the direction whose
    inner product with every unit gradient :math:`u_i = g_i/\|g_i\|` is the preference
    :math:`p_i` (ones by default: equal cosines, so no task conflicts with it), and
    gives it the length of the gradients' total projection on it:

    .. math::

      x = U^{+} p, \qquad \hat x = x / \|x\|, \qquad
      d = \Big(\sum_{i=1}^T g_i \cdot \hat x\Big)\, \hat x ,

    with :math:`U` the matrix of unit rows :math:`u_i` and :math:`U^+` its Moore-Penrose
    pseudo-inverse. :math:`x` is a combination of the unit gradients, so everything runs
    on the :math:`T \times T` Gramian (see :func:`con_fig_weights`): the output is
    :math:`d = \sum_i w_i g_i` and ``state.weights`` holds :math:`w`.

    Rank-deficient gradients (T larger than the dimension, duplicate or opposite
    gradients) get the pseudo-inverse's least-squares direction, as with torchjd's
    ``torch.linalg.pinv``: duplicates share their part equally, an exactly opposite pair
    cancels out of :math:`x`, and the output can then conflict with a task. A zero
    gradient's unit row is zero (torchjd's ``nan_to_num``) and it gets weight 0; all zero
    gradients give :math:`d = 0`. The pseudo-inverse is that of the cosine matrix
    :math:`UU^\top` with eigenvalues below ``10 T eps`` of the largest cut (a relative
    cut-off on :math:`U`'s singular values of :math:`\sqrt{10 T eps}`, about 3e-3 at
    T=8 in float32, where torchjd cuts at ``max(T, P) eps``, which grows with the number
    of parameters P): near-dependent gradients are resolved to about that precision.

    Args:
      pref_vector: ``None`` (ones, torchjd's default) or one value >= 0 per task (with a
        positive sum; fixes T): the target inner products with the unit gradients, up
        to scale.
      shared: which parameter leaves are shared (``None``: all); other leaves are summed.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` (exact: average the stacked gradients over ``axis_name``) or
        ``"stats"`` (average only the Gramian).
      num_tasks: T, if known; gives ``init`` a full-shape state.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state is :class:`ConFIGState`.

    Raises:
      ValueError: for a ``pref_vector`` that is not a non-negative vector with a positive
        sum (or disagrees with ``num_tasks``), or ``num_tasks < 1``.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> tx = ob.con_fig()
      >>> d, state = tx.update(J, tx.init(jnp.zeros(3)))
      >>> print(np.asarray(d).round(4))                         # torchjd's ConFIG()(J)
      [0.1588 2.0706 2.0706]
      >>> print(np.asarray(J @ d / jnp.linalg.norm(J, axis=1)).round(4))  # equal projections
      [0.8264 0.8264]

    References:
      Liu, Chu & Thuerey, `ConFIG: Towards Conflict-free Training of Physics Informed
      Neural Networks <https://arxiv.org/abs/2408.11104>`_, ICLR 2025.
    """
    return _core.balance(
        con_fig_weighting(pref_vector=pref_vector),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
