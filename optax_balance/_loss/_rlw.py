"""Random loss weighting: a fresh softmax of Gaussian draws at every step."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core


class RLWState(NamedTuple):
    """State of :func:`rlw`.

    Attributes:
      weights: ``(T,)`` the random weights of the last update (positive, summing to 1).
      key: ``uint32`` raw PRNG key data (``jax.random.key_data``); each update splits it
        into the next key and the key of this step's draws.
    """

    weights: jax.Array
    key: jax.Array


def rlw_weights(step_key: jax.Array, num_tasks: int) -> jax.Array:
    """One step's weights: ``softmax(jax.random.normal(step_key, (T,)))``.

    The draws are float32 whatever the statistics dtype, so that the weights under x64
    are the float32 ones up to rounding (float64 draws are other numbers).
    """
    z = jax.random.normal(step_key, (num_tasks,), jnp.float32)
    return jax.nn.softmax(z.astype(_core.stat_dtype()))


def rlw_weighting(*, seed: int = 0) -> _core.Weighting:
    r"""RLW's weighting: :math:`w = \mathrm{softmax}(z)`, :math:`z \sim N(0, I_T)` each step.

    Args:
      seed: the integer seed of the PRNG key kept in the state.

    Returns:
      An :class:`optax_balance.Weighting` of the losses (which it ignores, apart from
      their count); its state is :class:`optax_balance.RLWState`.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> weights, state = ob.weightings.rlw(seed=0)(jnp.array([1.0, 2.0, 3.0]))
      >>> print(np.asarray(weights).round(4))
      [0.0601 0.0903 0.8495]
      >>> _, step_key = jax.random.split(jax.random.key(0))      # the documented draw
      >>> print(np.asarray(jax.nn.softmax(jax.random.normal(step_key, (3,)))).round(4))
      [0.0601 0.0903 0.8495]

    References:
      Lin, Ye, Xu, Shi & Zhang, `Reasonable Effectiveness of Random Weighting: A Litmus
      Test for Multi-Task Learning <https://arxiv.org/abs/2111.10603>`_, TMLR 2022.
    """
    seed = _core.check_int("seed", seed, low=-(2**63), high=2**63)

    def init(t: int) -> RLWState:
        key = jax.random.key_data(jax.random.key(int(seed)))
        return RLWState(weights=jnp.full((t,), 1.0 / max(t, 1), _core.stat_dtype()), key=key)

    def weigh(stats: _core.Stats, state: RLWState) -> tuple[jax.Array, RLWState]:
        key, step_key = jax.random.split(jax.random.wrap_key_data(state.key))
        w = rlw_weights(step_key, stats.num_tasks)
        return w, RLWState(weights=w, key=jax.random.key_data(key))

    return _core.Weighting(init, weigh, needs=("losses",), name="rlw")


def rlw(
    *,
    seed: int = 0,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Random loss weighting (RLW): random weights on the simplex, drawn anew every step.

    .. math::

      \mathcal L = \sum_{i=1}^T w_i L_i, \qquad w = \mathrm{softmax}(z), \quad
      z \sim \mathcal N(0, I_T) \text{ at every step},

    Algorithm 2 of the paper (the softmax of standard normal draws, as LibMTL's and
    torchjd's ``Random``). The paper's point: in expectation this is a stochastic
    version of equal weighting that escapes the sharp minima fixed weights settle in,
    and it matches many elaborate methods.

    A loss-based method: train with :func:`optax_balance.weighted_loss` and ONE backward
    pass (the weights used are in ``state.weights`` after ``update``), or give ``update``
    stacked per-task gradients (it returns :math:`\sum_i w_i g_i`). The PRNG key lives in
    the state: each update (and each ``weighted_loss`` call, on the same state) splits it
    into the next key and a step key, and draws ``jax.random.normal(step_key, (T,))``.
    Under ``axis_name`` the key is replicated, so every device draws the same weights.
    A non-finite step keeps the old key (and the previous weights).

    Args:
      seed: the integer seed of the PRNG key kept in the state (under
        ``optax.inject_hyperparams``, list it in ``static_args``).
      shared: which parameter leaves are shared (``None``: all). For stacked gradients
        only: other leaves are summed unweighted.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` (the output is averaged over ``axis_name``) or ``"stats"``.
      num_tasks: T, if known; gives ``init`` a full-shape state.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``task_losses=`` of shape ``(T,)``; its state is :class:`RLWState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> tx = ob.rlw(seed=0, num_tasks=3)
      >>> state = tx.init(jnp.zeros(2))
      >>> losses = jnp.array([1.0, 2.0, 3.0])
      >>> loss = ob.weighted_loss(tx, losses, state)
      >>> _, state = tx.update(jnp.zeros(2), state, jnp.zeros(2), task_losses=losses)
      >>> w = ob.task_weights(state)                    # the weights `loss` used
      >>> print(np.asarray(w).round(4), np.asarray(loss).round(3))    # loss = w . losses
      [0.0601 0.0903 0.8495] 2.789

    References:
      Lin, Ye, Xu, Shi & Zhang, `Reasonable Effectiveness of Random Weighting: A Litmus
      Test for Multi-Task Learning <https://arxiv.org/abs/2111.10603>`_, TMLR 2022.
    """
    return _core.balance(
        rlw_weighting(seed=seed),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
