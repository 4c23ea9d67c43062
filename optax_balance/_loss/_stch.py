"""STCH: the smooth Tchebycheff scalarisation of the losses."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core


class STCHState(NamedTuple):
    r"""State of :func:`stch`.

    Attributes:
      weights: ``(T,)`` the weights of the last update,
        :math:`\lambda_i\, \mathrm{softmax}(\lambda \odot (L - z^*) / \mu)_i`.
    """

    weights: jax.Array


def _preference(weights: Any, reference: Any) -> tuple[Any, Any, int | None]:
    pref, t = _core.check_task_vector("weights", weights, nonnegative=True)
    ref, t = _core.check_task_vector("reference", reference, t)
    return pref, ref, t


def stch_weighting(*, mu: float, weights: Any = None, reference: Any = None) -> _core.Weighting:
    r"""STCH's weighting: :math:`w = \lambda \odot \mathrm{softmax}(\lambda \odot (L - z^*) / \mu)`.

    The gradient of :math:`\mu \log \sum_i \exp(\lambda_i (L_i - z^*_i) / \mu)` with
    respect to the losses (see :func:`optax_balance.stch`).

    Args:
      mu: the smoothing :math:`\mu > 0`.
      weights: ``(T,)`` the preference :math:`\lambda \ge 0` (default :math:`1/T` each).
      reference: ``(T,)`` the ideal point :math:`z^*` (default 0).

    Returns:
      An :class:`optax_balance.Weighting` of the losses; its state is
      :class:`optax_balance.STCHState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> weights, state = ob.weightings.stch(mu=1.0)(jnp.array([1.0, 2.0]))
      >>> print(np.asarray(weights).round(4))          # 0.5 softmax([0.5, 1])
      [0.1888 0.3112]

    References:
      Lin, Zhang, Zhang, Liu & Zhang, `Smooth Tchebycheff Scalarization for
      Multi-Objective Optimization <https://arxiv.org/abs/2402.19078>`_, ICML 2024.
    """
    _core.check_range("mu", mu, low=0.0, low_inclusive=False)
    pref, ref, t_cfg = _preference(weights, reference)

    def init(t: int) -> STCHState:
        # The weights at L = z*: lambda / T.
        lam = jnp.full((t,), 1.0 / max(t, 1)) if pref is None else jnp.asarray(pref)
        return STCHState(weights=(lam / max(t, 1)).astype(_core.stat_dtype()))

    def weigh(stats: _core.Stats, state: STCHState) -> tuple[jax.Array, STCHState]:
        assert stats.losses is not None
        dt = state.weights.dtype
        t = stats.num_tasks
        lam = jnp.full((t,), 1.0 / t, dt) if pref is None else jnp.asarray(pref, dt)
        shifted = stats.losses if ref is None else stats.losses - jnp.asarray(ref, dt)
        # softmax subtracts the largest exponent: no overflow for small mu or large losses.
        w = lam * jax.nn.softmax(lam * shifted / mu)
        return w, STCHState(weights=w)

    return _core.Weighting(init, weigh, needs=("losses",), name="stch", num_tasks=t_cfg)


def stch(
    *,
    mu: float,
    weights: Any = None,
    reference: Any = None,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Smooth Tchebycheff scalarisation (STCH): a smooth maximum of the weighted losses.

    .. math::

      \mathcal L = \mu \log \sum_{i=1}^T \exp\Big(\frac{\lambda_i (L_i - z^*_i)}{\mu}\Big),
      \qquad
      w_i = \frac{\partial \mathcal L}{\partial L_i}
          = \lambda_i\, \mathrm{softmax}\Big(\frac{\lambda \odot (L - z^*)}{\mu}\Big)_i ,

    a smooth approximation of the Tchebycheff scalarisation
    :math:`\max_i \lambda_i (L_i - z^*_i)`, tighter as :math:`\mu \to 0`: the step goes
    mostly to the worst weighted task. As torchjd's ``STCH``: the preference
    :math:`\lambda` (``weights``, default :math:`1/T` each) and the ideal point
    :math:`z^*` (``reference``, default 0) are given by the user.

    LibMTL's ``STCH`` differs in three ways: it applies the scalarisation to the
    normalised log-losses :math:`\log(L_i / \mathrm{nadir}_i)` with :math:`\lambda = 1`,
    multiplies it by T, and takes the nadir point as the mean loss over a warm-up epoch
    (trained on :math:`\sum_i \log L_i` before it). To reproduce it after the warm-up:
    average the losses over your own warm-up epoch into ``nadir``, build
    ``ob.stch(mu=mu, weights=[1.0] * T, reference=jnp.log(nadir))`` and pass
    ``jnp.log(losses)`` as the losses, to ``ob.weighted_loss`` and to ``update`` alike
    (the factor T is a learning-rate scale).

    A loss-based method: train with :func:`optax_balance.weighted_loss` and ONE backward
    pass, or give ``update`` stacked per-task gradients (it returns
    :math:`\sum_i w_i g_i`). Any finite losses work (the softmax subtracts its largest
    exponent); a step with a non-finite loss keeps the previous weights.

    Args:
      mu: the smoothing :math:`\mu > 0` (the paper tries 0.01 to 1; smaller is closer to
        the maximum).
      weights: ``(T,)`` the preference :math:`\lambda`, finite and :math:`\ge 0` with a
        positive sum (default :math:`1/T` each); fixes T.
      reference: ``(T,)`` the ideal point :math:`z^*` (default 0); fixes T.
      shared: which parameter leaves are shared (``None``: all). For stacked gradients
        only: other leaves are summed unweighted.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``
        (the losses are averaged over it).
      sync: ``"grads"`` (the output is averaged over ``axis_name``) or ``"stats"``.
      num_tasks: T, if known; gives ``init`` a full-shape state.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``task_losses=`` of shape ``(T,)``; its state is :class:`STCHState`.

    Raises:
      ValueError: at construction for ``mu <= 0``, or ``weights``/``reference`` that are
        not finite vectors of one length (``weights`` also :math:`\ge 0`).

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> tx = ob.stch(mu=0.1, weights=[1.0, 1.0])
      >>> loss = ob.weighted_loss(tx, jnp.array([1.0, 2.0]), tx.init(jnp.zeros(3)))
      >>> print(np.asarray(loss).round(4))       # 1 / (1 + e^10) + 2 / (1 + e^-10): ~ the max
      2.0

    References:
      Lin, Zhang, Zhang, Liu & Zhang, `Smooth Tchebycheff Scalarization for
      Multi-Objective Optimization <https://arxiv.org/abs/2402.19078>`_, ICML 2024.
    """
    return _core.balance(
        stch_weighting(mu=mu, weights=weights, reference=reference),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
