"""GradVac: each task gradient corrected toward an EMA target cosine with every other task."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_balance import _core
from optax_balance._gramian._pcgrad import step_orders


class GradVacState(NamedTuple):
    r"""State of :func:`gradvac`.

    Attributes:
      weights: ``(T,)`` the effective weight of each raw gradient in the last update. In
        the whole-model form the output is ``sum_j weights[j] * g_j`` (the column sums of
        the correction coefficients, >= 1; 1 for every task when no pair was corrected).
        With ``per_leaf=True`` each leaf has its own weights; this is their summary
        :math:`w_j = \sum_l w_{l,j} \|g_{l,j}\|^2 / \sum_l \|g_{l,j}\|^2`, the coefficient
        of the projection of task j's contribution onto its gradient (the mean over
        leaves for a zero gradient).
      targets: the EMA target cosines :math:`\hat\phi_{ij}` (row i: task i's corrected
        gradient against task j's raw one; the diagonal stays 0): a ``(T, T)`` array, or
        with ``per_leaf=True`` a pytree with the params' structure holding a ``(T, T)``
        array on each statistic leaf and ``None`` elsewhere.
      key: ``uint32`` raw PRNG key data (``jax.random.key_data``); each update splits it
        into the next key and the key that draws this step's task orders.
    """

    weights: jax.Array
    targets: Any
    key: jax.Array


def _is_none(x: Any) -> bool:
    return x is None


def gradvac_coefficients(
    gram: jax.Array, targets: jax.Array, orders: jax.Array, beta: Any, eps: Any
) -> tuple[jax.Array, jax.Array]:
    r"""Correction coefficients ``C`` (``g_i^PC = sum_j C[i, j] g_j``) and the new targets.

    Every corrected gradient stays in the span of the raw ones, so GradVac runs on
    coefficient vectors, as PCGrad does: with :math:`c_i` row i of ``C``,
    :math:`\|g_i^{PC}\|^2 = c_i G c_i^\top` and :math:`g_i^{PC} \cdot g_j = (c_i G)_j`.
    Task i only ever changes row i, so all T tasks advance together through a
    ``lax.fori_loop`` over the T positions of their orders (``O(T^3)`` in all), each
    keeping the running products ``C G``.

    At each position, task i meets task j (itself is skipped):
    :math:`\phi = g_i^{PC} \cdot g_j / (\|g_i^{PC}\| \|g_j\| + \epsilon)`; when
    :math:`\phi < \hat\phi_{ij}` and :math:`g_j \ne 0`,
    :math:`c_{ij} \mathrel{+}= \|g_i^{PC}\| (\hat\phi_{ij}\sqrt{1-\phi^2} -
    \phi\sqrt{1-\hat\phi_{ij}^2}) / (\|g_j\| \sqrt{1-\hat\phi_{ij}^2} + \epsilon)`; then
    :math:`\hat\phi_{ij} \leftarrow (1-\beta)\hat\phi_{ij} + \beta\phi`.

    Args:
      gram: ``(T, T)`` Gramian ``G_ij = g_i . g_j``.
      targets: ``(T, T)`` EMA targets before this step.
      orders: ``(T, T)`` integer array, row i a permutation of ``range(T)``: the order in
        which task i meets the others.
      beta: the EMA rate :math:`\beta`.
      eps: :math:`\epsilon`, added to the denominators.

    Returns:
      ``(C, new_targets)``, both ``(T, T)``.
    """
    t = gram.shape[0]
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    rows = jnp.arange(t)

    def body(k: Any, carry: tuple[jax.Array, jax.Array, jax.Array]) -> Any:
        coef, cg, phi_hat = carry
        j = orders[:, k]  # the task each row meets at this position
        norm_i = jnp.sqrt(jnp.maximum(jnp.sum(cg * coef, axis=1), 0.0))
        norm_j = norms[j]
        phi = cg[rows, j] / (norm_i * norm_j + eps)
        target = phi_hat[rows, j]
        meets = j != rows
        # A zero g_j is never corrected against: its coefficient would multiply a zero
        # vector (torchjd adds norm_i * target / eps to it, which changes no output).
        correct = meets & (phi < target) & (norm_j > 0)
        sin_phi = jnp.sqrt(jnp.maximum(1.0 - phi * phi, 0.0))
        sin_target = jnp.sqrt(jnp.maximum(1.0 - target * target, 0.0))
        w = norm_i * (target * sin_phi - phi * sin_target) / (norm_j * sin_target + eps)
        w = jnp.where(correct, w, 0.0)
        coef = coef.at[rows, j].add(w)
        cg = cg + w[:, None] * gram[j]
        new = jnp.where(meets, (1.0 - beta) * target + beta * phi, target)
        phi_hat = phi_hat.at[rows, j].set(new.astype(phi_hat.dtype))
        return coef, cg, phi_hat

    # The three carries get the same device-variance (inside shard_map the targets come
    # from a per-device state and the Gramian from a pmean): adding zeros is exact.
    zero = jnp.zeros_like(gram) + jnp.zeros_like(targets)
    init = (jnp.eye(t, dtype=gram.dtype) + zero, gram + zero, targets + zero)
    coef, _, targets = jax.lax.fori_loop(0, t, body, init)
    return coef, targets


def _summary(leaf_w: list[jax.Array], leaf_sq: list[jax.Array], t: int) -> jax.Array:
    """``(T,)``: per-leaf weights averaged with the squared norms (plain mean where zero)."""
    dt = _core.stat_dtype()
    if not leaf_w:
        return jnp.ones((t,), dt)
    num = sum((w * s for w, s in zip(leaf_w[1:], leaf_sq[1:])), leaf_w[0] * leaf_sq[0])
    den = sum(leaf_sq[1:], leaf_sq[0])
    mean = sum(leaf_w[1:], leaf_w[0]) / len(leaf_w)
    pos = den > 0
    return jnp.where(pos, num / jnp.where(pos, den, 1.0), mean).astype(dt)


def gradvac_weighting(
    *,
    beta: float = 0.5,
    eps: float = 1e-8,
    seed: int = 0,
    per_leaf: bool = False,
) -> _core.Weighting:
    r"""GradVac's weighting: column sums of the vaccine correction coefficients, from the Gramian.

    See :func:`optax_balance.gradvac`. Whole-model (default): a weighting of the Gramian.
    ``per_leaf=True``: one GradVac per parameter leaf on the leaf's Gramian, per-leaf
    weights and targets (``init(num_tasks, params)`` then takes the statistic leaves).

    Args:
      beta: :math:`\beta \in [0, 1]`, the weight of the new cosine in the targets' EMA.
      eps: :math:`\epsilon \ge 0`, added to the denominators.
      seed: the integer seed of the PRNG key kept in the state.
      per_leaf: one GradVac per parameter leaf (the paper's per-layer form).

    Returns:
      An :class:`optax_balance.Weighting`; its state is :class:`optax_balance.GradVacState`.

    Examples:
      >>> import jax.numpy as jnp, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> weights, state = ob.weightings.gradvac()(J @ J.T)
      >>> weights.round(4)                  # first step, targets 0: PCGrad's 1 + 22/18, 1 + 22/38
      Array([2.2222, 1.5789], dtype=float32)

    References:
      Wang, Tsvetkov, Firat & Cao, `Gradient Vaccine: Investigating and Improving
      Multi-task Optimization in Massively Multilingual Models
      <https://arxiv.org/abs/2010.05874>`_, ICLR 2021.
    """
    _core.check_range("beta", beta, low=0.0, high=1.0)
    _core.check_range("eps", eps, low=0.0)
    seed = _core.check_int("seed", seed, low=-(2**63), high=2**63)
    if not isinstance(per_leaf, bool):
        raise ValueError(f"`per_leaf` must be a bool, got {per_leaf!r}.")
    dt = _core.stat_dtype

    def key0() -> jax.Array:
        return jax.random.key_data(jax.random.key(int(seed)))

    def split(state: GradVacState, t: int) -> tuple[jax.Array, jax.Array]:
        key, step_key = jax.random.split(jax.random.wrap_key_data(state.key))
        return jax.random.key_data(key), step_orders(step_key, t)

    if not per_leaf:

        def init(t: int) -> GradVacState:
            return GradVacState(
                weights=jnp.ones((t,), dt()), targets=jnp.zeros((t, t), dt()), key=key0()
            )

        def weigh(stats: _core.Stats, state: GradVacState) -> tuple[jax.Array, GradVacState]:
            assert stats.gram is not None
            key, orders = split(state, stats.num_tasks)
            coef, targets = gradvac_coefficients(stats.gram, state.targets, orders, beta, eps)
            w = jnp.sum(coef, axis=0)
            return w, GradVacState(weights=w, targets=targets, key=key)

        return _core.Weighting(init, weigh, needs=("gram",), name="gradvac")

    def init_leaves(t: int, params: Any) -> GradVacState:
        targets = jax.tree.map(lambda p: jnp.zeros((t, t), dt()), params)  # None stays None
        return GradVacState(weights=jnp.ones((t,), dt()), targets=targets, key=key0())

    def weigh_leaves(stats: _core.Stats, state: GradVacState) -> tuple[Any, GradVacState]:
        t = stats.num_tasks
        grams, treedef = jax.tree.flatten(stats.leaf_gram, is_leaf=_is_none)
        targets = jax.tree.leaves(state.targets, is_leaf=_is_none)
        idx = [k for k, g in enumerate(grams) if g is not None]
        key, orders = split(state, t)
        per_leaf_w: list[Any] = [None] * len(grams)
        new_targets: list[Any] = [None] * len(grams)
        if idx:
            # One draw of orders per step, shared by every leaf (as LibMTL's per-layer
            # GradVac); each leaf keeps its own targets.
            g_stack = jnp.stack([grams[k] for k in idx])
            phi_stack = jnp.stack([targets[k] for k in idx])
            coef, phi = jax.vmap(lambda g, p: gradvac_coefficients(g, p, orders, beta, eps))(
                g_stack, phi_stack
            )
            w_stack = jnp.sum(coef, axis=1)
            for n, k in enumerate(idx):
                per_leaf_w[k], new_targets[k] = w_stack[n], phi[n]
        summary = _summary([per_leaf_w[k] for k in idx], [jnp.diagonal(grams[k]) for k in idx], t)
        weights = jax.tree.unflatten(treedef, per_leaf_w)
        state = GradVacState(
            weights=summary, targets=jax.tree.unflatten(treedef, new_targets), key=key
        )
        return weights, state

    return _core.Weighting(
        init_leaves,
        weigh_leaves,
        needs=("leaf_gram",),
        name="gradvac",
        init_takes_params=True,
    )


def gradvac(
    *,
    beta: float = 0.5,
    eps: float = 1e-8,
    seed: int = 0,
    per_leaf: bool = False,
    shared: _core.SharedMask = None,
    axis_name: Any = None,
    sync: _core.Sync = "grads",
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Gradient Vaccine: raise each pairwise gradient cosine toward its moving-average target.

    For each task :math:`i` (Wang et al., Algorithm 1, as torchjd's ``GradVac``), start
    from :math:`g_i^{PC} = g_i` and visit the other tasks :math:`j` in a random order.
    With the cosine :math:`\phi_{ij} = g_i^{PC} \cdot g_j / (\|g_i^{PC}\|\|g_j\| +
    \epsilon)` and its target :math:`\hat\phi_{ij}` (a moving average kept in the state,
    started at 0): whenever :math:`\phi_{ij} < \hat\phi_{ij}`, add the multiple of
    :math:`g_j` that brings the cosine up to the target,

    .. math::

      g_i^{PC} \leftarrow g_i^{PC} + \frac{\|g_i^{PC}\| \left(\hat\phi_{ij}
      \sqrt{1-\phi_{ij}^2} - \phi_{ij} \sqrt{1-\hat\phi_{ij}^2}\right)}
      {\|g_j\| \sqrt{1-\hat\phi_{ij}^2} + \epsilon}\, g_j ,
      \qquad
      \hat\phi_{ij} \leftarrow (1-\beta)\,\hat\phi_{ij} + \beta\,\phi_{ij} ,

    and return :math:`d = \sum_i g_i^{PC}` (summed, as torchjd and LibMTL). With targets
    at 0 (the first step) this is PCGrad's projection. Every :math:`g_i^{PC}` is a
    combination of the raw gradients, so the method runs on the :math:`T \times T`
    Gramian (see :func:`gradvac_coefficients`) and the output is
    :math:`d = \sum_j w_j g_j`. The targets are updated for every visited pair, also
    when no correction was needed. A zero :math:`g_j` is never corrected against (the
    output is torchjd's; its reported weight is not inflated by :math:`1/\epsilon`).

    ``per_leaf=True`` is the paper's per-layer form (LibMTL's ``all_matrix`` grouping):
    the procedure runs on each shared parameter leaf separately, with the leaf's
    Gramian and its own targets; one draw of task orders per step serves every leaf.
    The default is the whole model at once (torchjd's ``GradVac``; the paper's
    ``whole_model``). :math:`\epsilon` is absolute (as torchjd), so gradients with norms
    near :math:`\sqrt{\epsilon}` or below are treated differently from larger ones.

    Randomness. Each task draws its own order every step (torchjd shuffles each task's
    order independently with the global torch RNG). The PRNG key lives in the state:
    each update splits it into the next key and a step key, and task :math:`i`'s order
    is that of PCGrad (``jax.random.permutation(jax.random.split(step_key, T)[i], T)``,
    itself skipped; with T=2 none is drawn, as the order cannot matter). A step with
    non-finite gradients keeps the old key and targets.

    Args:
      beta: :math:`\beta \in [0, 1]`, the weight of the newest cosine in the targets'
        moving average (torchjd's and LibMTL's convention; 0 keeps the targets at 0:
        PCGrad).
      eps: :math:`\epsilon \ge 0`, added to the denominators.
      seed: the integer seed of the PRNG key kept in the state.
      per_leaf: run GradVac on each shared parameter leaf separately.
      shared: which parameter leaves are shared (``None``: all); other leaves are summed.
      axis_name: device axis name when ``update`` runs inside ``shard_map``/``pmap``.
      sync: ``"grads"`` (exact: average the stacked gradients over ``axis_name``) or
        ``"stats"`` (average only the Gramian(s)). Every device draws the same orders.
      num_tasks: T, if known; gives ``init`` a full-shape state.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state is :class:`GradVacState`.

    Raises:
      ValueError: for ``beta`` outside ``[0, 1]``, ``eps < 0``, a non-integer ``seed``
        or ``num_tasks < 1``.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax_balance as ob
      >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
      >>> tx = ob.gradvac()
      >>> d, state = tx.update(J, tx.init(jnp.zeros(3)))
      >>> d.round(4)                              # torchjd's GradVac()(J)
      Array([0.5848, 3.8012, 3.8012], dtype=float32)
      >>> print(np.asarray(state.targets).round(4))   # 0.5 * cos(g_1, g_2) = 0.5 * -22/sqrt(18*38)
      [[ 0.     -0.4206]
       [-0.4206  0.    ]]

    References:
      Wang, Tsvetkov, Firat & Cao, `Gradient Vaccine: Investigating and Improving
      Multi-task Optimization in Massively Multilingual Models
      <https://arxiv.org/abs/2010.05874>`_, ICLR 2021.
    """
    return _core.balance(
        gradvac_weighting(beta=beta, eps=eps, seed=seed, per_leaf=per_leaf),
        shared=shared,
        axis_name=axis_name,
        sync=sync,
        num_tasks=num_tasks,
    )
