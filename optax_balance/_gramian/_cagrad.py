"""CAGrad: the update that maximises the worst task's improvement near the mean gradient."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core
from optax_balance._solvers import _qp

# The dual point counts as stationary (weights 0, as torchjd does below its norm_eps of
# 1e-4) when ||g_w|| is below _STATIONARY_EPS or below _NOISE times the rounding level
# of a norm computed from the Gramian, sqrt(T eps max_i G_ii) (unit trace): a float32
# Gramian resolves ||g_w||^2 only to about T eps, and hulls that contain 0 give a
# computed ||g_w|| up to 1.8 times that level (torchjd's stationary samplers, T <= 64).
_STATIONARY_EPS = 1e-4
_NOISE = 4.0
_MAX_ROOT_ITERS = 60


class CAGradState(NamedTuple):
    """State of :func:`cagrad`.

    Attributes:
      weights: ``(T,)`` the weights applied in the last update (after rescaling).
      iterations: simplex-QP solver iterations of the last update, summed over the
        root-finding steps.
      root_iterations: root-finding steps on the multiplier :math:`\\lambda` (each is one
        simplex QP).
    """

    weights: jax.Array
    iterations: jax.Array
    root_iterations: jax.Array


class _Dual(NamedTuple):
    w: jax.Array  # (T,) the dual minimiser on the simplex
    gw_norm: jax.Array  # ||J^T w|| (normalised Gramian)
    stationary: jax.Array  # bool: ||J^T w|| is zero to working precision
    iterations: jax.Array
    root_iterations: jax.Array


def stationarity_floor(gram: jax.Array) -> jax.Array:
    """The norm of ``g_w`` below which it counts as zero (``gram``: unit trace)."""
    noise = jnp.finfo(gram.dtype).eps * gram.shape[0] * jnp.max(jnp.diagonal(gram))
    return jnp.maximum(_STATIONARY_EPS, _NOISE * jnp.sqrt(jnp.maximum(noise, 0.0)))


def _solve_dual(gram: jax.Array, r: jax.Array, u: jax.Array) -> _Dual:
    r"""``argmin_{w in simplex} b^T w + r ||J^T w||`` with ``b = G u`` (``G``: unit trace).

    In :math:`x = g_w` this is :math:`\min_{x \in H} g_0 \cdot x + r\|x\|` over the convex
    hull :math:`H` of the gradients. For a multiplier :math:`\lambda > 0`, let
    :math:`w(\lambda)` minimise :math:`\|J^\top w + \lambda g_0\|^2` over the simplex, the
    QP :math:`\min_w \frac12 w^\top G w + \lambda b^\top w` (:func:`_qp.simplex_qp`). Its
    KKT conditions are those of the CAGrad dual exactly when
    :math:`\|J^\top w(\lambda)\| = r \lambda`, and :math:`\|J^\top w(\lambda)\| / \lambda` is
    non-increasing, so the root is found on a bracket: each step jumps to the root of the
    quadratic :math:`\|J^\top (w_0 + \lambda v)\|^2 = r^2 \lambda^2` on the current face
    (exact once the face is right) or, if that leaves the bracket, bisects in
    :math:`\log\lambda`.

    Stationary points. If :math:`0 \in H` and :math:`c \ge 1`, then
    :math:`g_0 \cdot x + r\|x\| \ge (r - \|g_0\|)\|x\| \ge 0` on :math:`H`: the minimiser is
    :math:`x = 0` (at :math:`c = 1` also :math:`x = -t g_0`, with the same :math:`d = 0`).
    The first QP (:math:`\lambda = 0`: the minimum-norm point of :math:`H`) decides it, a
    norm below :func:`stationarity_floor` counting as 0. Otherwise the bracket starts at
    :math:`\lambda_0 = \mathrm{floor} / r`: a root below it has :math:`\|g_w\|` under the
    floor, a stationary point for any :math:`c`. (Bisecting towards 0 instead compares
    norms below float32's resolution, and stopped on a rounding-level :math:`g_w` whose
    direction is noise: the bug of issue 13.)
    """
    b = gram @ u
    dtype = gram.dtype
    max_iters = _qp.default_max_iters(gram.shape[0])
    floor = stationarity_floor(gram)
    hi0 = 1.0 / r  # ||J^T w|| <= 1 on a unit-trace Gramian, so psi(hi0) <= 0
    lo0 = floor / r
    tol = 1e-5 if dtype == jnp.float32 else 1e-10

    def evaluate(lam):
        sol = _qp.simplex_qp(gram, lam * b, max_iters=max_iters)
        return sol, jnp.sqrt(jnp.maximum(sol.z @ gram @ sol.z, 0.0))

    def next_lambda(sol, lam, lo, hi):
        # On the face of sol, w(lam) = w0 + lam v; solve ||J^T w(lam)||^2 = r^2 lam^2.
        w0 = _qp.face_point(gram, jnp.zeros_like(b), sol)
        v = _qp.face_point(gram, b, sol) - w0
        a = w0 @ gram @ w0
        bb = w0 @ gram @ v
        a2 = v @ gram @ v - r**2
        disc = jnp.maximum(bb**2 - a * a2, 0.0)
        # The positive root of a + 2 bb lam + a2 lam^2 (a2 < 0 near the solution).
        safe_a2 = jnp.where(jnp.abs(a2) > 0, a2, 1.0)
        root = jnp.where(a2 < 0, (-bb - jnp.sqrt(disc)) / safe_a2, (-bb + jnp.sqrt(disc)) / safe_a2)
        root = jnp.where(jnp.abs(a2) > 0, root, -a / jnp.where(bb != 0, 2.0 * bb, 1.0))
        inside = jnp.isfinite(root) & (root > lo) & (root < hi) & (root != lam)
        return jnp.where(inside, root, jnp.sqrt(lo * hi))

    sol0, n0 = evaluate(jnp.zeros((), dtype))  # the minimum-norm point of H
    in_hull = n0 <= floor
    # 0 in H and c >= 1 (r^2 = c^2 u^T G u, up to the rounding of the square root).
    stationary0 = in_hull & (r * r >= (1.0 - 8.0 * jnp.finfo(dtype).eps) * (u @ b))

    def cond(c):
        return (c["k"] < _MAX_ROOT_ITERS) & ~c["done"]

    def body(c):
        sol, n = evaluate(c["lam"])
        psi = n - r * c["lam"]
        done = jnp.abs(psi) <= tol * (n + r * c["lam"])
        lo = jnp.where(psi > 0, c["lam"], c["lo"])
        hi = jnp.where(psi > 0, c["hi"], c["lam"])
        stationary = hi <= lo0  # the root is below the floor
        done = done | stationary
        lam = next_lambda(sol, c["lam"], lo, hi)
        return dict(
            lam=jnp.where(done, c["lam"], lam),
            lo=lo,
            hi=hi,
            w=sol.z,
            n=n,
            k=c["k"] + 1,
            its=c["its"] + sol.iterations,
            done=done,
            stationary=stationary,
        )

    # With 0 in the hull, start at the floor: one step tells a root below it.
    init = dict(
        lam=jnp.where(in_hull, lo0, 0.5 * hi0).astype(dtype),
        lo=jnp.asarray(lo0, dtype),
        hi=jnp.asarray(hi0, dtype),
        w=sol0.z,
        n=n0,
        k=jnp.array(0, jnp.int32),
        its=sol0.iterations,
        done=stationary0,
        stationary=stationary0,
    )
    out = jax.lax.while_loop(cond, body, init)
    stationary = out["stationary"] | (out["n"] < floor)
    return _Dual(out["w"], out["n"], stationary, out["its"], out["k"])


def cagrad_weighting(
    *,
    c: float = 0.5,
    rescale: bool = True,
) -> _core.Weighting:
    r"""CAGrad's weighting: the mean plus the worst-task correction, from the Gramian.

    :math:`w = u + \frac{c\|g_0\|}{\|J^\top \lambda^\star\|}\lambda^\star` (divided by
    :math:`1 + c^2` when ``rescale``), :math:`\lambda^\star` the dual solution on the
    simplex (see :func:`optax_balance.cagrad`).

    Args:
      c: :math:`c \ge 0`, the radius of the ball around the mean gradient, relative to
        its norm.
      rescale: divide the weights by :math:`1 + c^2`.

    Returns:
      An :class:`optax_balance.Weighting` of the Gramian; its state is
      :class:`optax_balance.CAGradState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> weights, state = ob.weightings.cagrad(c=0.5)(J @ J.T)
      >>> print(np.asarray(weights).round(4))
      [0.5633 0.4   ]

    References:
      Liu, Liu, Jin, Stone & Liu, `Conflict-Averse Gradient Descent for Multi-task
      Learning <https://arxiv.org/abs/2110.14048>`_, NeurIPS 2021.
    """
    _core.check_range("c", c, low=0.0)
    if not isinstance(rescale, bool):
        raise ValueError(f"`rescale` must be a bool, got {rescale!r}.")

    def init(t: int) -> CAGradState:
        w = jnp.full((t,), 1.0 / max(t, 1), _core.stat_dtype())
        zero = jnp.zeros((), jnp.int32)
        return CAGradState(weights=w, iterations=zero, root_iterations=zero)

    def weigh(stats: _core.Stats, state: CAGradState) -> tuple[jax.Array, CAGradState]:
        assert stats.gram is not None
        t = stats.num_tasks
        dtype = stats.gram.dtype
        gram = _qp.normalize(stats.gram, float(jnp.finfo(dtype).tiny))
        u = jnp.full((t,), 1.0 / t, dtype)
        r = c * jnp.sqrt(jnp.maximum(u @ gram @ u, 0.0))
        active = r > 1e-6  # otherwise d = g0 (also the zero Jacobian)
        dual = _solve_dual(gram, jnp.where(active, r, 1.0), u)
        stationary = dual.stationary
        scale = r / jnp.where(stationary, 1.0, dual.gw_norm)
        w = jnp.where(stationary, jnp.zeros_like(u), u + scale * dual.w)
        w = jnp.where(active, w, u)
        if rescale:
            w = w / (1.0 + c**2)
        zero = jnp.zeros((), jnp.int32)
        new_state = CAGradState(
            weights=w,
            iterations=jnp.where(active, dual.iterations, zero),
            root_iterations=jnp.where(active, dual.root_iterations, zero),
        )
        return w, new_state

    return _core.Weighting(
        init,
        weigh,
        needs=("gram",),
        name="cagrad",
    )


def cagrad(
    *,
    c: float = 0.5,
    rescale: bool = True,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""CAGrad: the best worst-case update within a ball around the mean gradient.

    With task gradients :math:`g_i` (rows of :math:`J`), the mean
    :math:`g_0 = \frac1T \sum_i g_i` and :math:`r = c \|g_0\|`, CAGrad (Liu et al. 2021,
    Eq. 2) picks

    .. math::

      d = \arg\max_{\|d - g_0\| \le r} \ \min_i \ g_i \cdot d .

    Its dual (Algorithm 1) is a problem on the simplex,

    .. math::

      w^\star = \arg\min_{w \in \Delta^T} \ g_w \cdot g_0 + r \|g_w\|, \qquad
      g_w = J^\top w, \qquad d = g_0 + \frac{r}{\|g_w^\star\|} g_w^\star ,

    so the weights are :math:`\frac1T + \frac{r}{\|g_w^\star\|} w^\star`, divided by
    :math:`1 + c^2` when ``rescale`` (the official code's ``rescale=1``; torchjd does not
    rescale). Everything is computed from the Gramian normalised to unit trace (the
    weights are invariant to the scale of :math:`J`). When :math:`\|g_w^\star\|` is below
    1e-4 on that scale (a Pareto-stationary point, e.g. opposite gradients with
    :math:`c \ge 1`) the weights are zero, as in torchjd; when :math:`g_0 = 0` (or
    :math:`c = 0`) they are :math:`1/T`.

    Solver. For a multiplier :math:`\lambda`, the minimiser of
    :math:`\|g_w + \lambda g_0\|^2` over the simplex is the QP
    :math:`\min_{w \in \Delta} \frac12 w^\top G w + \lambda (G u)^\top w`, solved
    exactly by a primal active-set method; it solves the dual exactly when
    :math:`\|g_w\| = r\lambda`. That scalar equation is solved in
    ``jax.lax.while_loop`` by jumping to the closed-form root on the current support
    (where :math:`w` is affine in :math:`\lambda`), safeguarded by bisection in
    :math:`\log\lambda`; it usually takes 2-5 steps. (The QP is not posed as a min-norm
    point of the shifted gradients :math:`g_i + \lambda g_0`: their Gramian carries the
    large constant :math:`\lambda^2\|g_0\|^2`, which costs float32 its accuracy.) No
    host round-trip (the official code uses ``scipy.optimize.minimize``, torchjd cvxpy).

    Args:
      c: radius of the ball relative to :math:`\|g_0\|` (>= 0; the paper uses < 1).
      rescale: divide the result by :math:`1 + c^2`.
      shared: which parameter leaves are shared (``None``: all); a pytree of bools, a
        prefix of one, or a callable ``params -> pytree``. Other leaves are summed.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` (exact: average the stacked gradients over ``axis_name``) or
        ``"stats"`` (average only the Gramian).
      num_tasks: T, if known; gives ``init`` a full-shape state.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes stacked
      gradients (leading task axis) and returns :math:`d`; its state is
      :class:`CAGradState`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> tx = ob.cagrad(c=0.5, rescale=False)
      >>> d, state = tx.update(J, tx.init(jnp.zeros(3)))
      >>> print(np.asarray(d).round(4))
      [0.1835 1.2041 1.2041]
      >>> tx = ob.cagrad(c=0.5)
      >>> d, state = tx.update(J, tx.init(jnp.zeros(3)))
      >>> print(np.asarray(d).round(4))
      [0.1468 0.9633 0.9633]

    References:
      Liu, Liu, Jin, Stone & Liu, `Conflict-Averse Gradient Descent for Multi-task
      Learning <https://arxiv.org/abs/2110.14048>`_, NeurIPS 2021.
    """
    return _core.balance(
        cagrad_weighting(c=c, rescale=rescale),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
