"""Nash-MTL: the Nash bargaining solution of the tasks, kept in state between solves."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core

_TOL = 1e-5  # stop when every |beta_i (G beta)_i - 1| is below this


class NashMTLState(NamedTuple):
    """State of :func:`nash_mtl`.

    Attributes:
      weights: ``(T,)`` the weights applied in the last update: ``alpha`` times the
        ``max_norm`` clipping factor of that update.
      alpha: ``(T,)`` the Nash bargaining weights of the last solve, on the raw gradient
        scale (``alpha_i (G alpha)_i = 1``); reused until the next solve.
      beta: ``(T,)`` the same solution for the Gramian normalised to unit Frobenius norm
        (scale-free): the warm start of the next solve.
      step: number of updates so far (a solve happens when ``step %
        update_weights_every == 0``).
      iterations: Newton iterations of the last solve.
    """

    weights: jax.Array
    alpha: jax.Array
    beta: jax.Array
    step: jax.Array
    iterations: jax.Array


def nash_residual(gram: jax.Array, alpha: jax.Array) -> jax.Array:
    """``alpha * (G alpha) - 1``: zero at the Nash bargaining solution."""
    return alpha * (gram @ alpha) - 1.0


def solve_bargaining(
    gram: jax.Array, beta0: jax.Array, *, max_iters: int | jax.Array, tol: float
) -> tuple[jax.Array, jax.Array]:
    r"""``beta > 0`` with ``beta * (A beta) = 1`` by damped Newton, from ``beta0``.

    The solution is the unique minimiser of the strictly convex, self-concordant
    :math:`\Phi(\beta) = \frac12 \beta^\top A \beta - \sum_i \log \beta_i`
    (:math:`\nabla\Phi = A\beta - 1/\beta`). Newton steps with the damping
    :math:`1/(1+\delta)` (:math:`\delta` the Newton decrement) stay positive and converge
    globally, quadratically near the solution (Nesterov & Nemirovski). ``beta0`` is first
    rescaled to the best point on its ray. Stops when
    :math:`\max_i |\beta_i (A\beta)_i - 1| \le` ``tol`` or after ``max_iters`` steps.
    """

    def residual(b):
        return jnp.max(jnp.abs(b * (gram @ b) - 1.0))

    def cond(c):
        b, it = c
        return (it < max_iters) & (residual(b) > tol)

    def body(c):
        b, it = c
        grad = gram @ b - 1.0 / b
        hess = gram + jnp.diag(1.0 / b**2)
        chol = jax.scipy.linalg.cho_factor(hess, lower=True)
        step = -jax.scipy.linalg.cho_solve(chol, grad)
        decrement = jnp.sqrt(jnp.maximum(-grad @ step, 0.0))
        size = jnp.where(decrement < 0.25, 1.0, 1.0 / (1.0 + decrement))
        # Belt and braces against rounding: never step past 99% of the way to zero.
        shrink = jnp.where(step < 0, -0.99 * b / jnp.where(step < 0, step, -1.0), jnp.inf)
        size = jnp.minimum(size, jnp.min(shrink))
        new = b + size * step
        new = jnp.where(jnp.all(jnp.isfinite(new)) & jnp.all(new > 0), new, b)
        return new, it + 1

    b0 = jnp.where(jnp.isfinite(beta0) & (beta0 > 0), beta0, 1.0)
    # Best point on the ray through b0 (Phi(s b0) is minimal at s^2 = T / b0^T A b0): the
    # solution has beta^T A beta = T, and this removes the scale mismatch of a cold start
    # (or of a warm start after the gradients changed scale) in one go.
    quad = b0 @ gram @ b0
    b0 = b0 * jnp.where(quad > 0, jnp.sqrt(gram.shape[0] / jnp.where(quad > 0, quad, 1.0)), 1.0)
    return jax.lax.while_loop(cond, body, (b0, jnp.array(0, jnp.int32)))


def nash_mtl_weighting(
    num_tasks: int,
    *,
    max_norm: float = 1.0,
    update_weights_every: int = 1,
    optim_niter: int = 20,
) -> _core.Weighting:
    r"""Nash-MTL's weighting: the Nash bargaining solution of the Gramian, norm-clipped.

    :math:`\alpha \odot G\alpha = 1` (see :func:`optax_balance.nash_mtl`).

    Args:
      num_tasks: T (the warm start lives in the state).
      max_norm: the combined gradient's norm is clipped to this (0: no clipping).
      update_weights_every: solve every this many updates, reuse the weights between.
      optim_niter: maximum Newton steps per solve.

    Returns:
      An :class:`optax_balance.Weighting` of the Gramian; its state is
      :class:`optax_balance.NashMTLState`.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> weights, state = ob.weightings.nash_mtl(2, max_norm=0.0)(J @ J.T)
      >>> (weights * (J @ J.T @ weights)).round(4)   # the bargaining solution: a * G a = 1
      Array([1., 1.], dtype=float32)

    References:
      Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, `Multi-Task
      Learning as a Bargaining Game <https://arxiv.org/abs/2202.01017>`_, ICML 2022.
    """
    t_cfg = _core.check_num_tasks(num_tasks, required=True)
    _core.check_range("max_norm", max_norm, low=0.0)
    for name, value in (
        ("update_weights_every", update_weights_every),
        ("optim_niter", optim_niter),
    ):
        _core.check_range(name, value, low=1)
        if _core.is_concrete(value) and float(value) != int(value):
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")

    def init(t: int) -> NashMTLState:
        dtype = _core.stat_dtype()
        zero = jnp.zeros((), jnp.int32)
        return NashMTLState(
            weights=jnp.ones((t,), dtype),
            alpha=jnp.ones((t,), dtype),
            beta=jnp.ones((t,), dtype),
            step=zero,
            iterations=zero,
        )

    def weigh(stats: _core.Stats, state: NashMTLState) -> tuple[jax.Array, NashMTLState]:
        assert stats.gram is not None
        gram = stats.gram
        dtype = gram.dtype
        big = jnp.max(jnp.abs(gram))  # ||G||_F without overflow at gradient scale 1e10
        safe_big = jnp.where(big > 0, big, 1.0)
        fro = safe_big * jnp.sqrt(jnp.sum((gram / safe_big) ** 2))
        positive = fro > jnp.finfo(dtype).tiny

        def solve(_):
            g_n = gram / jnp.where(positive, fro, 1.0)
            beta, its = solve_bargaining(g_n, state.beta, max_iters=optim_niter, tol=_TOL)
            alpha = jnp.where(positive, beta / jnp.sqrt(jnp.where(positive, fro, 1.0)), 0.0)
            # Without a solution (see above) beta runs off; keep the old warm start then.
            solved = jnp.max(jnp.abs(beta * (g_n @ beta) - 1.0)) <= _TOL
            return alpha, jnp.where(solved, beta, state.beta), its

        def reuse(_):
            return state.alpha, state.beta, jnp.zeros((), jnp.int32)

        alpha, beta, its = jax.lax.cond(
            state.step % update_weights_every == 0, solve, reuse, operand=None
        )
        norm = jnp.sqrt(jnp.maximum(alpha @ gram @ alpha, 0.0))
        clip = (max_norm > 0) & (norm > max_norm)
        w = jnp.where(clip, alpha * (max_norm / jnp.where(clip, norm, 1.0)), alpha)
        new_state = NashMTLState(
            weights=w, alpha=alpha, beta=beta, step=state.step + 1, iterations=its
        )
        return w, new_state

    return _core.Weighting(
        init,
        weigh,
        needs=("gram",),
        name="nash_mtl",
        num_tasks=t_cfg,
    )


def nash_mtl(
    num_tasks: int,
    *,
    max_norm: float = 1.0,
    update_weights_every: int = 1,
    optim_niter: int = 20,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
) -> optax.GradientTransformationExtraArgs:
    r"""Nash-MTL: the tasks' Nash bargaining solution, with the combined norm clipped.

    Navon et al. (2022, Theorem 5.1) show that the Nash bargaining solution over
    update directions is :math:`d = \sum_i \alpha_i g_i` with :math:`\alpha > 0` solving

    .. math::

      G \alpha = 1 / \alpha \qquad\text{i.e.}\qquad \alpha_i\, (g_i \cdot d) = 1 \
      \text{ for every task},

    with :math:`G = J J^\top` the raw Gramian, so each task's directional improvement
    :math:`g_i \cdot d` is inversely proportional to its weight and
    :math:`\|d\|^2 = \alpha^\top G \alpha = T`. The combined gradient is then clipped as
    in torchjd's adaptation of the official code: if :math:`\|d\| >` ``max_norm`` (> 0),
    :math:`\alpha` is scaled by ``max_norm`` :math:`/ \|d\|` (the official code applies
    ``torch.nn.utils.clip_grad_norm_`` to the shared parameters, with a +1e-6 in the
    denominator). Since :math:`\|d\| = \sqrt T`, with the default ``max_norm=1`` the
    output of every update with T >= 2 has norm 1. ``state.weights`` holds the clipped
    weights, ``state.alpha`` the unclipped ones.

    Solver. The official code runs up to ``optim_niter`` steps of a concave-convex
    procedure, each a cvxpy program on the host, whose fixed point is the solution
    above. Here that fixed point is computed directly: :math:`\beta \odot \tilde G \beta =
    1` on the Gramian normalised to unit Frobenius norm (as the official code
    normalises), is the unique minimiser of the
    convex :math:`\frac12\beta^\top\tilde G\beta - \sum_i\log\beta_i`, found by damped
    Newton in ``jax.lax.while_loop`` (at most ``optim_niter`` steps, stopping when every
    :math:`|\beta_i(\tilde G\beta)_i - 1| \le 10^{-5}`), warm-started from the previous
    solution as the official code warm-starts its procedure; then
    :math:`\alpha = \beta / \sqrt{\|G\|_F}`. The weights are recomputed when the update
    count is a multiple of ``update_weights_every`` and reused in between (the clipping
    uses the current gradients). No host round-trip.

    No solution exists when a non-negative combination of the gradients vanishes (a zero
    gradient, two opposite gradients): the potential is then unbounded below and the
    weights of the tasks involved grow with each Newton step. The output stays finite
    (such tasks cancel or contribute nothing, and the result is clipped), the run stops
    at ``optim_niter``, and the previous warm start is kept.

    Args:
      num_tasks: T (needed up front: the state carries the weights between updates).
      max_norm: the norm the combined gradient is clipped to; 0 disables clipping.
      update_weights_every: solve for new weights every this many updates (>= 1).
      optim_niter: maximum Newton iterations per solve (>= 1).
      shared: which parameter leaves are shared (``None``: all); a pytree of bools, a
        prefix of one, or a callable ``params -> pytree``. Other leaves are summed.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` (exact: average the stacked gradients over ``axis_name``) or
        ``"stats"`` (average only the Gramian).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes stacked
      gradients (leading task axis) and returns the clipped :math:`d`; its state is
      :class:`NashMTLState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> tx = ob.nash_mtl(num_tasks=2)
      >>> d, state = tx.update(J, tx.init(jnp.zeros(3)))
      >>> print(np.asarray(d).round(4))
      [0.0542 0.7061 0.7061]
      >>> print(np.asarray(state.alpha * (J @ J.T @ state.alpha)).round(4))
      [1. 1.]

    References:
      Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, `Multi-Task
      Learning as a Bargaining Game <https://arxiv.org/abs/2202.01017>`_, ICML 2022.
      Nesterov & Nemirovski, *Interior-Point Polynomial Algorithms in Convex
      Programming*, SIAM 1994 (damped Newton on self-concordant functions).
    """
    return _core.balance(
        nash_mtl_weighting(
            num_tasks,
            max_norm=max_norm,
            update_weights_every=update_weights_every,
            optim_niter=optim_niter,
        ),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
