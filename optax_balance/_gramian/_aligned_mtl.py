"""Aligned-MTL: align the principal components of the gradient system, then weight."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_balance import _core

ScaleMode = Literal["min", "median", "rmse"]
_SCALE_MODES = ("min", "median", "rmse")


class AlignedMTLState(NamedTuple):
    """State of :func:`aligned_mtl`.

    Attributes:
      weights: ``(T,)`` the weights ``alpha = B w`` applied in the last update.
      rank: the numerical rank of the Gramian in the last update (the number of aligned
        components).
    """

    weights: jax.Array
    rank: jax.Array


def balance_matrix(gram: jax.Array, scale_mode: str = "min") -> tuple[jax.Array, jax.Array]:
    r"""The balance transformation :math:`B = \sqrt{\lambda_s}\, V \Lambda^{-1/2} V^\top`.

    :math:`G = V \Lambda V^\top` is the Gramian's eigendecomposition (``eigh``);
    eigenvalues at or below ``T * eps * max(lambda)`` (the published implementations'
    cut-off) count as zero and their directions are dropped from :math:`B` (so a zero,
    duplicate or dependent gradient never divides by zero). :math:`\lambda_s` is the
    smallest kept eigenvalue (``"min"``), the lower median of the kept ones
    (``"median"``, as ``torch.median``) or their mean (``"rmse"``: the squared RMS of
    the kept singular values). The Gramian is divided by its largest diagonal entry
    first; :math:`B` does not depend on a common scale. All-zero gradients give
    :math:`B = 0`.

    Returns:
      ``(B, rank)``.
    """
    t = gram.shape[0]
    dt = gram.dtype
    top = jnp.max(jnp.diagonal(gram))
    g = gram / jnp.where(top > 0, top, 1.0)
    lam, vecs = jnp.linalg.eigh(g)  # ascending
    keep = lam > jnp.max(lam) * t * jnp.finfo(dt).eps
    rank = jnp.sum(keep)
    first = jnp.clip(t - rank, 0, t - 1)  # the kept eigenvalues are lam[t - rank:]
    if scale_mode == "min":
        lam_s = lam[first]
    elif scale_mode == "median":
        lam_s = lam[jnp.clip(first + (rank - 1) // 2, 0, t - 1)]
    else:
        lam_s = jnp.sum(jnp.where(keep, lam, 0.0)) / jnp.maximum(rank, 1)
    safe = jnp.where(keep, lam, 1.0)
    scale = jnp.where(keep, jnp.sqrt(jnp.maximum(lam_s, 0.0) / safe), 0.0)
    b = (vecs * scale[None, :]) @ vecs.T
    return b.astype(dt), rank.astype(jnp.int32)


def aligned_mtl_weighting(
    *,
    pref_vector: Sequence[float] | np.ndarray | jax.Array | None = None,
    scale_mode: ScaleMode = "min",
) -> _core.Weighting:
    r"""Aligned-MTL's weighting: the Gramian's spectrum equalised, times ``pref_vector``.

    See :func:`optax_balance.aligned_mtl`.

    Args:
      pref_vector: ``(T,)`` non-negative task preferences (default ones). Giving it
        fixes T.
      scale_mode: the singular value all are set to: ``"min"``, ``"median"`` or
        ``"rmse"``.

    Returns:
      An :class:`optax_balance.Weighting` of the Gramian; its state is
      :class:`optax_balance.AlignedMTLState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> weights, state = ob.weightings.aligned_mtl()(J @ J.T)
      >>> print(np.asarray(weights).round(4))
      [1.1181 0.8165]

    References:
      Senushkin, Patakin, Kuznetsov & Konushin, `Independent Component Alignment for
      Multi-Task Learning <https://arxiv.org/abs/2305.19000>`_, CVPR 2023.
    """
    _core.check_choice("scale_mode", scale_mode, _SCALE_MODES)
    pref, t_cfg = _core.check_task_vector("pref_vector", pref_vector, nonnegative=True)

    def init(t: int) -> AlignedMTLState:
        dt = _core.stat_dtype()
        w = jnp.asarray(pref, dt) if (pref is not None and t) else jnp.ones((t,), dt)
        return AlignedMTLState(weights=w, rank=jnp.zeros((), jnp.int32))

    def weigh(stats: _core.Stats, state: AlignedMTLState) -> tuple[jax.Array, AlignedMTLState]:
        del state
        assert stats.gram is not None
        b, rank = balance_matrix(stats.gram, scale_mode)
        w_pref = (
            jnp.ones((stats.num_tasks,), b.dtype) if pref is None else jnp.asarray(pref, b.dtype)
        )
        alpha = b @ w_pref
        return alpha, AlignedMTLState(weights=alpha, rank=rank)

    return _core.Weighting(
        init,
        weigh,
        needs=("gram",),
        name="aligned_mtl",
        num_tasks=t_cfg,
    )


def aligned_mtl(
    *,
    pref_vector: Sequence[float] | np.ndarray | jax.Array | None = None,
    scale_mode: ScaleMode = "min",
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Aligned-MTL: make the gradient system well conditioned, then weight the tasks.

    With the task gradients as rows of :math:`J` and the Gramian
    :math:`G = J J^\top = V \Lambda V^\top` (rank :math:`R`), Aligned-MTL (Senushkin et
    al., Algorithm 1) replaces :math:`J = U \Sigma V_J^\top` by the aligned system
    :math:`\hat J = \sigma_s\, U V_J^\top`, whose non-zero singular values all equal
    :math:`\sigma_s = \sqrt{\lambda_s}` (condition number 1). In weight space this is the
    balance matrix and the update

    .. math::

      B = \sqrt{\lambda_s}\; V \Lambda_R^{-1/2} V^\top, \qquad
      \alpha = B w, \qquad d = J^\top \alpha = \sum_i \alpha_i g_i ,

    with :math:`\lambda_s` the smallest non-zero eigenvalue (``scale_mode="min"``, the
    paper's choice), the lower median (``"median"``) or the mean (``"rmse"``) of the
    non-zero eigenvalues (see :func:`balance_matrix`). Directions with zero eigenvalue
    (duplicate, dependent or zero gradients) are dropped, so rank-deficient Gramians
    give finite weights. One ``eigh`` of the :math:`T \times T` Gramian, nothing
    iterative.

    Convention for :math:`w`. The paper applies :math:`B` to the task weights :math:`w`
    of the scalarised objective :math:`\sum_i w_i L_i`; ``pref_vector`` is that
    :math:`w`. The default is :math:`w = 1` (the unweighted sum of losses), which is what
    the authors' code computes (it sums the aligned gradients) and what LibMTL does.
    torchjd's ``AlignedMTL`` defaults to :math:`w = 1/T`: its output is ours divided by
    T (pass ``pref_vector=[1/T] * T`` to match it).

    Args:
      pref_vector: the task weights :math:`w` (``None``: all ones), finite, >= 0, with a
        positive sum; its length fixes T.
      scale_mode: ``"min"``, ``"median"`` or ``"rmse"``: the eigenvalue :math:`\lambda_s`
        the aligned singular values are set to.
      shared: which parameter leaves are shared (``None``: all); a pytree of bools, a
        prefix of one, or a callable ``params -> pytree``. Other leaves are summed.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` (exact: average the stacked gradients over ``axis_name``) or
        ``"stats"`` (average only the Gramian).
      num_tasks: T, if known (must equal ``len(pref_vector)`` when both are given).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state is
      :class:`AlignedMTLState`.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> tx = ob.aligned_mtl()
      >>> d, state = tx.update(J, tx.init(jnp.zeros(3)))
      >>> d.round(4)
      Array([0.4266, 1.9347 , 1.9347 ], dtype=float32)
      >>> state.weights.round(4)
      Array([1.1181, 0.8165 ], dtype=float32)

    References:
      Senushkin et al., `Independent Component Alignment for Multi-Task Learning
      <https://arxiv.org/abs/2305.19000>`_, CVPR 2023.
    """
    return _core.balance(
        aligned_mtl_weighting(pref_vector=pref_vector, scale_mode=scale_mode),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
