"""ExcessMTL: task weights driven by each task's estimated excess risk (AdaGrad-style)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_balance import _core

_H_EPS = 1e-7  # added to the accumulated squares before the square root (torchjd, LibMTL)
_BASE_EPS = 1e-7  # added to the baseline excess risk before dividing by it (torchjd)


class ExcessMTLState(NamedTuple):
    """State of :func:`excess_mtl`.

    Attributes:
      weights: ``(T,)`` the task weights on the simplex, applied in the last update
        (``1/T`` each until the warmup ends).
      log_weights: ``(T,)`` their logarithms, which the update steps: a weight below
        float32's range (a task the exponentiated step pushed down by more than ~100
        nats) stays representable there and can come back, as in exact arithmetic.
      sq_grad_sum: the accumulated squared task gradients :math:`S`: a pytree with the
        params' structure, ``(T, *param.shape)`` on each statistic leaf and ``None``
        elsewhere (memory: one copy of the stacked gradients).
      baseline: ``(T,)`` the baseline excess risks :math:`\\hat E^0` (set when the warmup
        ends; 0 before).
      warmup_sum: ``(T,)`` the sum of the excess risks seen during the warmup.
      step: the number of updates so far.
    """

    weights: jax.Array
    log_weights: jax.Array
    sq_grad_sum: Any
    baseline: jax.Array
    warmup_sum: jax.Array
    step: jax.Array


def excess_mtl_weighting(
    *, robust_step_size: float = 1.0, n_warmup_steps: int = 0
) -> _core.Weighting:
    r"""ExcessMTL's weighting: exponentiated-gradient weights from estimated excess risks.

    :math:`\hat E_i = \sum_k g_{ik}^2 / \sqrt{S_{ik} + 10^{-7}}` with :math:`S` the
    accumulated squared gradients, then
    :math:`w \propto w \odot \exp(\eta\, \hat E / \hat E^0)` (see
    :func:`optax_balance.excess_mtl`). It reads the stacked gradients (``needs=
    ("grads",)``) and keeps :math:`S` per statistic leaf, so its ``init`` takes the params.

    Args:
      robust_step_size: the step size :math:`\eta > 0` of the exponentiated update.
      n_warmup_steps: updates that only collect statistics (weights stay :math:`1/T`);
        their mean excess risk becomes the baseline. 0: the first update's excess risk
        is the baseline (and drives the first update unscaled, as torchjd).

    Returns:
      An :class:`optax_balance.Weighting` of the stacked gradients; its state is
      :class:`optax_balance.ExcessMTLState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> J = jnp.array([[2.0, 0.0], [1.0, 0.0]])
      >>> w = ob.weightings.excess_mtl()
      >>> state = w.init(2, jnp.zeros(2))
      >>> weights, state = w(ob.Stats(grads=J), state)   # [e^2, e] / (e^2 + e)
      >>> print(np.asarray(weights).round(4))
      [0.7311 0.2689]

    References:
      He, Zhou, Zhao & Lin, `Robust Multi-Task Learning with Excess Risks
      <https://proceedings.mlr.press/v235/he24n.html>`_, ICML 2024.
    """
    _core.check_range("robust_step_size", robust_step_size, low=0.0, low_inclusive=False)
    warmup = _core.check_int("n_warmup_steps", n_warmup_steps, low=0)

    def init(t: int, params: Any) -> ExcessMTLState:
        dt = _core.stat_dtype()

        def zeros(p: Any) -> jax.Array:
            # Zeros that depend on the parameter's values, so that under jit the sharding
            # propagates from the parameter (a constant would come out replicated); the
            # task axis goes in front. A ShapeDtypeStruct has no values: plain zeros.
            if isinstance(p, jax.ShapeDtypeStruct):
                z = jnp.zeros(p.shape, dt)
            else:
                p = jnp.asarray(p)
                z = jnp.where(jnp.isfinite(p), p * 0, 0).astype(dt)
            return jnp.broadcast_to(z[None], (t, *np.shape(p)))

        zero = jnp.zeros((t,), dt)
        return ExcessMTLState(
            weights=jnp.full((t,), 1.0 / max(t, 1), dt),
            log_weights=jnp.full((t,), -np.log(max(t, 1)), dt),
            sq_grad_sum=jax.tree.map(zeros, params),
            baseline=zero,
            warmup_sum=zero,
            step=jnp.zeros((), jnp.int32),
        )

    def weigh(stats: _core.Stats, state: ExcessMTLState) -> tuple[jax.Array, ExcessMTLState]:
        dt = _core.stat_dtype()
        t = stats.num_tasks
        paths = jax.tree_util.tree_leaves_with_path(stats.grads)
        sums = jax.tree.leaves(state.sq_grad_sum)
        if len(sums) != len(paths):
            raise ValueError(
                f"excess_mtl: the state holds {len(sums)} accumulators but the gradients have "
                f"{len(paths)} statistic leaves; build the state with init(params) on the "
                f"params this transformation updates."
            )
        new_sums, excess = [], jnp.zeros((t,), dt)
        for (path, g), s in zip(paths, sums):
            if np.shape(s) != np.shape(g):
                raise ValueError(
                    f"excess_mtl: the accumulator of leaf {jax.tree_util.keystr(path)} has "
                    f"shape {np.shape(s)} but its stacked gradient has shape {np.shape(g)}: "
                    f"init must get the ordinary (unstacked) params (optax.MultiSteps, whose "
                    f"init needs the stacked tree, cannot wrap excess_mtl)."
                )
            # E_i = g_i^T H_i^-1 g_i with the diagonal H_i = sqrt(S_i + 1e-7) (Eqs. 6-7).
            # Read through task_rows: the reduction recomputes g^2 and S + g^2 from g and S
            # rather than reading S_new written out (the guard writes the new S once).
            gr, sr = _core.task_rows(g, s)
            sq = jnp.square(gr.astype(dt))
            axes = tuple(range(1, sq.ndim))
            excess = excess + jnp.sum(sq / jnp.sqrt(sr + sq + _H_EPS), axis=axes)
            f = g.astype(dt)
            new_sums.append(s + f * f)
        new_sum_tree = jax.tree.unflatten(jax.tree.structure(state.sq_grad_sum), new_sums)
        step = state.step
        in_warmup = step < warmup
        first = step == warmup  # the first update after the warmup
        if warmup > 0:
            base_now = state.warmup_sum / warmup
            scaled = excess / (jnp.where(first, base_now, state.baseline) + _BASE_EPS)
        else:
            base_now = excess
            scaled = jnp.where(first, excess, excess / (state.baseline + _BASE_EPS))
        baseline = jnp.where(first, base_now, state.baseline)
        # w exp(eta E) / sum(.), in log space: finite for any finite E, and no weight is
        # lost to float32 underflow.
        log_w = jax.nn.log_softmax(state.log_weights + robust_step_size * scaled)
        log_w = jnp.where(in_warmup, state.log_weights, log_w)
        weights = jnp.where(in_warmup, state.weights, jnp.exp(log_w))
        new_state = ExcessMTLState(
            weights=weights,
            log_weights=log_w,
            sq_grad_sum=new_sum_tree,
            baseline=baseline,
            warmup_sum=jnp.where(in_warmup, state.warmup_sum + excess, state.warmup_sum),
            step=step + 1,
        )
        return weights, new_state

    # S is not scanned by the non-finite guard (a T x P pass): a non-finite S_new makes
    # the excess risk E non-finite, hence the weights (or, in the warmup, warmup_sum).
    return _core.Weighting(
        init,
        weigh,
        needs=("grads",),
        name="excess_mtl",
        init_takes_params=True,
        unscanned=("sq_grad_sum",),
    )


def excess_mtl(
    *,
    robust_step_size: float = 1.0,
    n_warmup_steps: int = 0,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""ExcessMTL: up-weight the tasks farthest from their best achievable loss.

    He et al. (2024) weight the tasks by their *excess risk* (loss minus the best
    achievable loss), estimated without knowing that minimum by a second-order Taylor
    expansion around the optimum with an AdaGrad-style diagonal Hessian (Eqs. 6-7):

    .. math::

      S_i \leftarrow S_i + g_i \odot g_i, \qquad
      \hat E_i = \sum_k \frac{g_{ik}^2}{\sqrt{S_{ik} + 10^{-7}}} ,

    normalised by a baseline :math:`\hat E^0` for scale (Section 3.2), then an
    exponentiated-gradient step on the simplex (Eq. 9) and the weighted sum:

    .. math::

      w \leftarrow \frac{w \odot \exp(\eta\, \hat E / (\hat E^0 + 10^{-7}))}
      {\sum_i w_i \exp(\eta\, \hat E_i / (\hat E^0_i + 10^{-7}))}, \qquad
      d = \sum_i w_i g_i .

    As torchjd 0.18: the weights start at :math:`1/T` (the paper's simplex; LibMTL and the
    official code start at 1 and keep the sum at T, and skip the update of the first
    step); during the first ``n_warmup_steps`` updates the weights stay :math:`1/T` and
    :math:`\hat E` is only collected, their mean becoming :math:`\hat E^0` (Appendix C.1
    recommends three epochs); with ``n_warmup_steps=0`` the first update's :math:`\hat E`
    is the baseline and drives that update unnormalised. The update is computed on the
    log-weights (``state.log_weights``, a log-softmax): the same numbers, finite for any
    finite :math:`\hat E`, and a weight pushed below float32's range can still recover
    (torchjd 0.18 takes the softmax of the log of its stored weights, in the gradients'
    dtype, where such a weight stays 0 for good). ``state.weights`` are the weights
    applied (on the simplex).

    State. :math:`S` is as large as the stacked gradients of the shared leaves
    (``(T, *param.shape)`` per leaf, float32, sharded like the params), so ``init``
    needs the ordinary params (not a stacked tree: ``optax.MultiSteps``, whose ``init``
    gets the stacked tree, cannot wrap it). The weights read the gradients themselves,
    not a Gramian: under ``axis_name`` only ``sync="grads"`` is possible (the stacked
    gradients of the shared leaves are averaged, then everything is exact).

    Args:
      robust_step_size: the step size :math:`\eta > 0` of the exponentiated update.
      n_warmup_steps: the number of updates (>= 0) that only collect statistics.
      shared: which parameter leaves are shared (``None``: all); a pytree of bools, a
        prefix of one, or a callable ``params -> pytree``. Other leaves are summed and
        keep no accumulator.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` (the only mode: the weights read the stacked gradients).
      num_tasks: T, if known; gives ``init`` a full-shape state.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes stacked
      gradients (leading task axis) and returns :math:`d`; its state is
      :class:`ExcessMTLState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> tx = ob.excess_mtl(num_tasks=2)
      >>> state = tx.init(jnp.zeros(2))
      >>> d, state = tx.update(jnp.array([[2.0, 0.0], [1.0, 0.0]]), state)
      >>> d, state = tx.update(jnp.array([[1.0, 0.0], [2.0, 0.0]]), state)
      >>> print(np.asarray(state.weights).round(4))   # torchjd's two-step test
      [0.3623 0.6377]

    References:
      He, Zhou, Zhao & Lin, `Robust Multi-Task Learning with Excess Risks
      <https://proceedings.mlr.press/v235/he24n.html>`_, ICML 2024.
    """
    return _core.balance(
        excess_mtl_weighting(robust_step_size=robust_step_size, n_warmup_steps=n_warmup_steps),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
