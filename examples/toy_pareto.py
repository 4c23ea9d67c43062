"""Gallery: each method's trajectories on the two-objective toy problem of CAGrad.

The toy problem of Liu et al. (CAGrad, NeurIPS 2021, Figure 1), reused by Nash-MTL
(Navon et al., ICML 2022) and FAMO (Liu et al., NeurIPS 2023): two objectives of
x = (x1, x2) in R^2 (see :func:`toy_losses`). Above x2 = 0 both are flat, log-shaped
valleys; below, both are wide quadratic bowls, centred at x1 = +7 and x1 = -7, so the
Pareto set is a nearly flat curve over x1 in [-7, 7] at x2 between -8.43 and -8.36
(:func:`pareto_set`), and the average objective is lowest in its middle, at
(0, -8.355). Each method in :data:`METHODS` drives six starts with
``optax.chain(method, optax.adam(1e-3))``, exactly as a user would: stacked task
gradients from ``ob.value_and_task_grads``, the update under ``jax.jit``, all starts at
once (``jax.vmap``) and every step in one ``lax.scan``.

Settings, from the papers' code (read at the commits named, re-written here in JAX):

* functions: ``Toy`` in Cranial-XIX/CAGrad ``toy.py`` (dc3d481), identical in
  AvivNavon/nash-mtl and Cranial-XIX/FAMO ``experiments/toy/problem.py`` (cce1840, 0a6ad06);
  Nash-MTL and FAMO multiply the first objective by ``scale = 0.1`` (``--scale``);
* starts: CAGrad's three, (-8.5, 7.5), (-8.5, -5), (9, 9), and the three more of
  Nash-MTL's and FAMO's five, (0, 0), (-7.5, -0.5), (9, -1);
* optimiser: Adam, learning rate 1e-3 (all three); steps: 100000 (CAGrad; Nash-MTL runs
  35000, FAMO 50000); CAGrad with c = 0.5 (CAGrad's toy); the other methods with the
  library's defaults.

Loss-based methods (those whose weighting reads ``task_losses``) get the losses shifted
by FAMO's toy floor, ``L_i + 21`` (FAMO's ``set_min_losses([-21 * scale, -21])``), so
that they are positive; the gradients are those of the unshifted objectives.

It prints a table (per method: how many starts end on or near the Pareto set, the final
average objective over the starts, the worst start's, and the time) and saves a figure
with one panel per method: contours of the average objective, the Pareto set (grey),
the minimiser of the average objective (star), the starts (black dots), the
trajectories (one colour per start) and their end points (white-edged dots).
:data:`METHODS` are the figure's twelve; ``--methods`` also takes those in :data:`MORE`.

Run:  python examples/toy_pareto.py                     (writes docs/_static/toy_pareto.png;
                                                         ~4 min on 2 CPU cores, 3 of them CAGrad)
      python examples/toy_pareto.py --steps 500 --out /tmp/toy.png   (fast)
      python examples/toy_pareto.py --methods mgda,cagrad --scale 0.1
Needs matplotlib (``pip install -e ".[examples]"``).

References:
  Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
  NeurIPS 2021, https://arxiv.org/abs/2110.14048 (Figure 1; code:
  https://github.com/Cranial-XIX/CAGrad/blob/main/toy.py).
  Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022,
  https://arxiv.org/abs/2202.01017 (Figure 2; code: https://github.com/AvivNavon/nash-mtl).
  Liu, Feng, Stone, Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023,
  https://arxiv.org/abs/2306.03792 (code: https://github.com/Cranial-XIX/FAMO).
"""

from __future__ import annotations

import argparse
import io
import pathlib
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_balance as ob

T = 2  # two objectives

# The methods in the figure, one panel each, in this order: display name -> factory. A
# factory builds the transformation for two tasks (``num_tasks=2`` where the factory takes
# it, so the state has its full shape from ``init`` and fits the ``lax.scan`` carry).
# Loss-based methods need no special case: their ``update`` combines the stacked gradients
# with their weights, reading ``task_losses`` (here shifted positive, see the docstring).
METHODS: dict[str, Callable[[], optax.GradientTransformationExtraArgs]] = {
    "mean": lambda: ob.mean(num_tasks=T),  # plain Adam on the average objective
    "MGDA": lambda: ob.mgda(num_tasks=T),
    "PCGrad": lambda: ob.pcgrad(num_tasks=T),
    "CAGrad": lambda: ob.cagrad(c=0.5, num_tasks=T),
    "IMTL-G": lambda: ob.imtl_g(num_tasks=T),
    "Nash-MTL": lambda: ob.nash_mtl(T),
    "UPGrad": lambda: ob.upgrad(num_tasks=T),
    "Aligned-MTL": lambda: ob.aligned_mtl(num_tasks=T),
    "ConFIG": lambda: ob.con_fig(num_tasks=T),
    "FairGrad": lambda: ob.fairgrad(num_tasks=T),
    "FAMO": lambda: ob.famo(T),
    "balancer": lambda: ob.balancer([1.0, 1.0]),
}
# More methods that ``--methods`` can name (not in the default figure).
MORE: dict[str, Callable[[], optax.GradientTransformationExtraArgs]] = {
    "DualProj": lambda: ob.dualproj(num_tasks=T),
    "GradVac": lambda: ob.gradvac(num_tasks=T),
    "UW": lambda: ob.uw(T),
    "STCH": lambda: ob.stch(mu=1.0, num_tasks=T),
    "MGDA-l2": lambda: ob.mgda(norm_type="l2", num_tasks=T),
    "IMTL": lambda: ob.imtl(T),
    "DB-MTL": lambda: ob.db_mtl(num_tasks=T),
    "MoCo": lambda: ob.moco(num_tasks=T),
    # Two-batch methods: the toy is deterministic, so the second batch is the first
    # (their cross-Gramian is then the Gramian).
    "MoDo": lambda: ob.modo(num_tasks=T),
    "SDMGrad": lambda: ob.sdmgrad(num_tasks=T),
}

# Starts: CAGrad's toy.py (first three), then the three more of Nash-MTL's / FAMO's five.
STARTS = np.array([[-8.5, 7.5], [-8.5, -5.0], [9.0, 9.0], [0.0, 0.0], [-7.5, -0.5], [9.0, -1.0]])
LR = 1e-3
LOSS_FLOOR = -21.0  # FAMO's toy: losses shifted by -min_losses = 21 (times `scale` for L1)
LOWER = 5e-6  # the clamp inside the log, as in the papers' code
NEAR = 0.01  # "on/near the Pareto set": within 1% of the front's range (see pareto_gap)
XLIM = (-11.0, 11.0)


def toy_losses(x: jax.Array, scale: float = 1.0) -> jax.Array:
    r"""The two objectives of CAGrad's toy problem at ``x`` of shape (2,); returns (2,).

    With :math:`c_1 = \max(\tanh(x_2/2), 0)` and :math:`c_2 = \max(\tanh(-x_2/2), 0)`:

    .. math::

      L_1 = s\,[c_1 (\log\max(|-\tfrac12(x_1+7) + \tanh x_2|, \epsilon) + 6)
            + c_2 ((x_1-7)^2/10 + (x_2+8)^2/100 - 20)],

      L_2 = c_1 (\log\max(|\tfrac12(3-x_1) - \tanh x_2 + 2|, \epsilon) + 6)
            + c_2 ((x_1+7)^2/10 + (x_2+8)^2/100 - 20),

    :math:`\epsilon = 5\cdot10^{-6}`, :math:`s` = ``scale`` (1 in CAGrad; 0.1 in Nash-MTL
    and FAMO). Transcribed from ``Toy.forward`` in Cranial-XIX/CAGrad ``toy.py`` (commit
    dc3d481; identical in AvivNavon/nash-mtl and Cranial-XIX/FAMO
    ``experiments/toy/problem.py``, which add ``scale``).
    """
    x1, x2 = x[0], x[1]
    c1 = jnp.maximum(jnp.tanh(0.5 * x2), 0.0)
    c2 = jnp.maximum(jnp.tanh(-0.5 * x2), 0.0)
    log1 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 - 7.0) - jnp.tanh(-x2)), LOWER)) + 6.0
    log2 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 + 3.0) + jnp.tanh(-x2) + 2.0), LOWER)) + 6.0
    bowl1 = ((x1 - 7.0) ** 2 + 0.1 * (x2 + 8.0) ** 2) / 10.0 - 20.0
    bowl2 = ((x1 + 7.0) ** 2 + 0.1 * (x2 + 8.0) ** 2) / 10.0 - 20.0
    return jnp.stack([scale * (c1 * log1 + c2 * bowl1), c1 * log2 + c2 * bowl2])


def run(
    method: optax.GradientTransformationExtraArgs, starts: np.ndarray, steps: int, scale: float
) -> np.ndarray:
    """Positions of every start after each step, ``(steps + 1, num_starts, 2)``."""
    tx = optax.chain(method, optax.adam(LR))
    # SDMGrad, MoDo read the cross-Gramian of two batches: they need task_grads2=.
    two_batches = "cross_gram" in getattr(getattr(method, "weighting", None), "needs", ())
    floor = jnp.array([LOSS_FLOOR * scale, LOSS_FLOOR])

    def step(carry, _):
        x, opt_state = carry
        losses, grads = ob.value_and_task_grads(toy_losses)(x, scale)  # (2,), (2, 2)
        extra = {"task_grads2": grads} if two_batches else {}
        updates, opt_state = tx.update(grads, opt_state, x, task_losses=losses - floor, **extra)
        x = jnp.asarray(optax.apply_updates(x, updates))
        return (x, opt_state), x

    def one_start(x0: jax.Array) -> jax.Array:
        _, xs = jax.lax.scan(step, (x0, tx.init(x0)), length=steps)
        return jnp.concatenate([x0[None], xs])

    xs = jax.jit(jax.vmap(one_start, out_axes=1))(jnp.asarray(starts, jnp.float32))
    return np.asarray(xs)


def evaluate(xs: np.ndarray, scale: float) -> np.ndarray:
    """The two objectives at points ``(..., 2)``, in float64."""
    with jax.enable_x64(True):
        flat = jnp.asarray(np.asarray(xs, np.float64).reshape(-1, 2))
        f = jax.jit(jax.vmap(lambda x: toy_losses(x, scale)))(flat)
        return np.asarray(f).reshape(*np.shape(xs)[:-1], T)


def pareto_set(scale: float, n1: int = 561, n2: int = 3501) -> tuple[np.ndarray, np.ndarray]:
    r"""The Pareto set (``(n1, 2)`` points, x1 from -7 to 7) and its front (objectives).

    Above :math:`x_2 = 0` both objectives exceed -6.2; below, both are
    :math:`s_i c_2(x_2) (q_i(x_1) + r(x_2))` with :math:`q_{1,2} = (x_1 \mp 7)^2 / 10`
    (:math:`s_1` = ``scale``, :math:`s_2 = 1`) and reach -20 together, so the Pareto set is
    a curve over :math:`x_1 \in [-7, 7]`. At each :math:`x_1` the weight
    :math:`\lambda = s_2 q_2' / (s_2 q_2' - s_1 q_1')` cancels the :math:`x_1`-derivative
    of :math:`\lambda L_1 + (1 - \lambda) L_2`, and the Pareto point is that
    scalarisation's minimiser over :math:`x_2` (taken on a fine grid of [-10, -6.5]).
    The papers draw the segment at :math:`x_2 = -8.3552` (exact at the two ends).
    """
    x1 = np.linspace(-7.0, 7.0, n1)
    x2 = np.linspace(-10.0, -6.5, n2)
    lam = (x1 + 7.0) / ((x1 + 7.0) - scale * (x1 - 7.0))
    f = evaluate(np.stack(np.meshgrid(x1, x2, indexing="ij"), axis=-1), scale)  # (n1, n2, 2)
    j = np.argmin(lam[:, None] * f[..., 0] + (1.0 - lam[:, None]) * f[..., 1], axis=1)
    rows = np.arange(n1)
    return np.stack([x1, x2[j]], axis=1), f[rows, j]


def pareto_gap(f: np.ndarray, front: np.ndarray) -> np.ndarray:
    r"""How far points ``(n, 2)`` of objective space are from the front, in its range.

    The additive epsilon indicator on objectives normalised by the front's range
    :math:`r_i`: :math:`\min_{p} \max_i (f_i - p_i) / r_i`, the least amount (as a
    fraction of the range) by which the point must improve in both objectives to be as
    good as some Pareto-optimal point; 0 on the front, up to grid resolution.
    """
    span = front.max(axis=0) - front.min(axis=0)
    diff = (f[:, None, :] - front[None, :, :]) / span
    return diff.max(axis=-1).min(axis=-1)


def plot(
    results: dict[str, np.ndarray],
    scale: float,
    pset: np.ndarray,
    front: np.ndarray,
    path: str,
    dpi: int,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.6 * cols, 2.75 * rows + 0.5), sharex=True, sharey=True, squeeze=False
    )
    grid = np.linspace(*XLIM, 220)
    gx, gy = np.meshgrid(grid, grid)
    mean_obj = evaluate(np.stack([gx, gy], axis=-1), scale).mean(axis=-1)
    star = pset[np.argmin(front.mean(axis=1))]  # the minimiser of the average objective
    colors = plt.get_cmap("tab10")(np.arange(len(STARTS)))
    for ax, (name, xs) in zip(axes.ravel(), results.items(), strict=False):
        ax.contour(gx, gy, mean_obj, levels=14, cmap="viridis", linewidths=0.6, alpha=0.7)
        ax.plot(pset[:, 0], pset[:, 1], color="0.55", linewidth=4.0, solid_capstyle="butt")
        ax.plot(*star, "*", color="k", markeredgecolor="w", markersize=10, zorder=7)
        for s in range(xs.shape[1]):
            ax.plot(xs[:, s, 0], xs[:, s, 1], color=colors[s], linewidth=1.3, zorder=3)
            ax.plot(*xs[0, s], "o", color="k", markersize=4.5, zorder=4)
            ax.plot(*xs[-1, s], "o", color=colors[s], markeredgecolor="w", markersize=6, zorder=6)
        ax.set_title(name, fontsize=10)
        ax.set_xlim(XLIM)
        ax.set_ylim(XLIM)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    steps = next(iter(results.values())).shape[0] - 1
    title = (
        f"CAGrad's toy problem (Liu et al. 2021): {steps} Adam steps (lr {LR:g}) from six starts"
        + ("" if scale == 1.0 else f", L1 scaled by {scale:g}")
        + "\ncontours and star: the average (L1 + L2) / 2 and its minimiser; grey: the Pareto set;"
        + " black dots: starts; white-edged dots: where each trajectory ends"
    )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    plt.close(fig)
    # A palette of 128 colours (the figure has few) keeps the PNG small: under 300 KB.
    from PIL import Image

    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(colors=128).save(path, optimize=True)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def select(names: str | None) -> dict[str, Callable[[], optax.GradientTransformationExtraArgs]]:
    """The methods named in a comma-separated list (case, '-' and '_' ignored), or METHODS."""
    if not names:
        return dict(METHODS)
    known = {**METHODS, **MORE}
    by_key = {_key(k): k for k in known}
    chosen = {}
    for raw in names.split(","):
        if _key(raw) not in by_key:
            raise SystemExit(f"unknown method {raw!r}; choose from: {', '.join(known)}")
        chosen[by_key[_key(raw)]] = known[by_key[_key(raw)]]
    return chosen


def main(steps: int, out: str, methods: str | None, scale: float, dpi: int) -> None:
    pset, front = pareto_set(scale)
    best = front.mean(axis=1).min()
    results, rows = {}, []
    for name, make in select(methods).items():
        t0 = time.perf_counter()
        xs = run(make(), STARTS, steps, scale)
        secs = time.perf_counter() - t0
        f_end = evaluate(xs[-1], scale)
        gap = pareto_gap(f_end, front)
        results[name] = xs
        rows.append((name, int(np.sum(gap <= NEAR)), f_end.mean(axis=1), gap, secs))

    print(f"{steps} Adam steps (lr {LR:g}) from {len(STARTS)} starts, L1 scale {scale:g}")
    star = pset[np.argmin(front.mean(axis=1))]
    print(
        f"min of the average objective (L1 + L2) / 2 on the Pareto set: {best:.4f} "
        f"at x = ({star[0]:.3f}, {star[1]:.3f})"
    )
    print(f"average objective at the starts: {evaluate(STARTS, scale).mean():.4f}")
    print(
        f"{'method':<13}{'on/near Pareto':>15}{'final avg obj':>15}{'worst start':>13}{'time':>8}"
    )
    for name, near, avg, _, secs in rows:
        print(
            f"{name:<13}{f'{near}/{len(STARTS)}':>15}{avg.mean():>15.3f}{avg.max():>13.3f}"
            f"{secs:>7.1f}s"
        )
    print(f"(on/near: within {NEAR:.0%} of the front's range of dominating a Pareto point)")
    plot(results, scale, pset, front, out, dpi)
    print(f"figure saved to {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000, help="Adam steps per start")
    parser.add_argument("--out", default="docs/_static/toy_pareto.png", help="the PNG to write")
    parser.add_argument(
        "--methods", default=None, help=f"comma-separated, from: {', '.join({**METHODS, **MORE})}"
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="factor on L1 (1: CAGrad; 0.1: Nash-MTL, FAMO)"
    )
    parser.add_argument("--dpi", type=int, default=150, help="resolution of the PNG")
    args = parser.parse_args()
    main(args.steps, args.out, args.methods, args.scale, args.dpi)
