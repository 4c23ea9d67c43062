"""The registry every shared suite runs over: one line per method.

``make(T, **kw)`` builds the method for T tasks; ``kw`` may hold ``shared``,
``axis_name`` and ``sync``. The other fields say which properties the method claims; the
defaults claim nothing beyond what the shared suites (``test_contract``, ``test_hostile``,
``test_properties``) demand of every method, so a new method joins by one line and then
switches on what it claims.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import optax

import optax_balance as ob

# (G, losses) -> the matrix M whose min-norm simplex point the weights are (numpy, f64).
KKTMatrix = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Method:
    """One registry entry.

    Attributes:
      name: test id.
      make: ``make(T, **kw)`` builds the transformation for T tasks.
      needs_losses: ``update`` raises without ``task_losses``.
      uses_losses: the weights depend on ``task_losses`` (default: ``needs_losses``); a
        wrongly shaped ``task_losses`` then raises, and a non-finite loss keeps the state.
      non_conflicting: ``g_i . d >= -tol`` for every task.
      permutation_invariant: permuting the tasks permutes the weights and leaves the
        output unchanged.
      stochastic: uses a PRNG key from its state.
      homogeneous: from a fresh state, ``A(c J) = c A(J)`` for every ``c > 0`` (the
        weights do not change when all gradients are scaled together).
      scale_invariant_weights: from a fresh state, the weights do not change when each
        task's gradient is scaled by its own ``c_i > 0`` (MGDA-l2).
      scale_invariant_output: from a fresh state, the output does not change when each
        task's gradient is scaled by its own ``c_i > 0`` (the EnCodec balancer).
      kkt: for MGDA-like methods, ``(G, losses) -> M``: the weights are
        ``argmin_{a in simplex} a^T M a`` and must meet its KKT conditions.
      factory: the public factory, for ``optax.inject_hyperparams``; ``None`` skips that
        test (with the reason shown).
      static: ``T -> kwargs`` with ``factory(**static(T))`` the same as ``make(T)``; these
        go in ``static_args``, every other numeric argument is injected (traced).
      invalid: ``(kwargs, message fragment)`` pairs: ``make(T, **kwargs)`` must raise a
        ``ValueError`` whose message holds the fragment.
      conflict_slack: ``(J, |w|) -> (T,)`` extra tolerance on ``g_i . d`` for methods whose
        non-conflict holds up to a documented bound (UPGrad's and DualProj's ridge).
      two_batches: ``update`` needs ``task_grads2=`` (a second mini-batch's stacked
        gradients: SDMGrad, MoDo). The shared suites feed the same gradients as the
        second batch (:meth:`batch_kwargs`), so every reference they write on one ``J``
        holds (the mean of two equal batches is ``J``, the cross-Gramian is the
        Gramian); the multi-device suite and the methods' own tests feed independent
        batches.
      train_optimizer: the optimizer the training test chains after the method (``None``:
        ``optax.adam(0.1)``), for methods whose direction needs another (say why in
        ``notes``).
      head_scales: ``losses -> (T,)``, the weights of the task-specific leaves from a
        fresh state (``None``: the plain sum); for methods whose heads train on rescaled
        losses (DB-MTL's log-losses).
      stacked_init: ``optax.MultiSteps`` can wrap it (its ``init`` hands the method the
        stacked tree). False for a state shaped like the stacked gradients, built from the
        params given to ``init``: ``update`` then raises a ``ValueError`` naming MultiSteps.
      notes: why a property is not claimed, or anything a reader of the suite should know.
      min_tasks: the smallest T the method accepts with the registry's hyperparameters
        (Krum, TrimmedMean: a ``ValueError`` below it); suites that run smaller T (the
        single-task test, the property draws of T in 2..4) skip them.
    """

    name: str
    make: Callable[..., optax.GradientTransformationExtraArgs]
    needs_losses: bool = False
    uses_losses: bool | None = None
    non_conflicting: bool = False
    permutation_invariant: bool = True
    stochastic: bool = False
    homogeneous: bool = False
    scale_invariant_weights: bool = False
    scale_invariant_output: bool = False
    kkt: KKTMatrix | None = None
    factory: Callable[..., optax.GradientTransformationExtraArgs] | None = None
    static: Callable[[int], dict[str, Any]] | None = None
    invalid: tuple[tuple[dict[str, Any], str], ...] = ()
    conflict_slack: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    two_batches: bool = False
    train_optimizer: Callable[[], optax.GradientTransformation] | None = None
    head_scales: Callable[[np.ndarray], np.ndarray] | None = None
    stacked_init: bool = True
    notes: str = ""
    min_tasks: int = 1

    @property
    def losses_used(self) -> bool:
        return self.needs_losses if self.uses_losses is None else self.uses_losses

    def batch_kwargs(self, grads: Any) -> dict[str, Any]:
        """The keyword arguments ``update`` needs beside ``task_losses``: the second
        batch (the same gradients) for a two-batch method, nothing otherwise."""
        return {"task_grads2": grads} if self.two_batches else {}

    @property
    def tracks_gradients(self) -> bool:
        """Whether the output combines tracked gradient estimates (``Weighting.tracked``,
        MoCo, DB-MTL): zero gradients then give a zero output only from a fresh state."""
        return self.make(max(3, self.min_tasks)).weighting.tracked is not None

    def head_weights(self, losses: np.ndarray) -> np.ndarray:
        """The weights of the task-specific leaves from a fresh state (ones: the sum)."""
        losses = np.asarray(losses, np.float64)
        return np.ones_like(losses) if self.head_scales is None else self.head_scales(losses)

    def __repr__(self) -> str:
        return self.name


def _inv(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, 1.0 / np.where(x > 0, x, 1.0), 0.0)


def _kkt_none(g: np.ndarray, losses: np.ndarray) -> np.ndarray:
    return g


def _kkt_l2(g: np.ndarray, losses: np.ndarray) -> np.ndarray:
    s = _inv(np.sqrt(np.diag(g)))
    return g * np.outer(s, s)


def _kkt_loss_plus(g: np.ndarray, losses: np.ndarray) -> np.ndarray:
    s = _inv(losses * np.sqrt(np.diag(g)))
    return g * np.outer(s, s)


def _ridge_slack(j: np.ndarray, w: np.ndarray) -> np.ndarray:
    """UPGrad/DualProj: with the ridge reg_eps = 1e-4 (relative to the trace-normalised
    Gramian), ``g_i . d >= -reg_eps * w_i * ||J||_F^2`` (the methods' documented bound).
    Below ``trace(G) = ||J||_F^2 < norm_eps = 1e-4`` they return the plain weighted mean
    (torchjd's convention), which claims nothing."""
    fro2 = np.sum(j**2)
    if fro2 < 1e-4:
        return np.full(j.shape[0], np.inf)
    return 1.01e-4 * w * fro2


_MGDA_BAD = (({"norm_type": "l3"}, "`norm_type` must be one of"), ({"epsilon": -1.0}, "`epsilon`"))
_BAL_BAD = (
    ({"ema_decay": 1.5}, "`ema_decay` must be in [0, 1]"),
    ({"total_norm": 0.0}, "`total_norm`"),
)

METHODS: list[Method] = [
    Method(
        "mgda",
        lambda t, **kw: ob.mgda(num_tasks=t, **kw),
        non_conflicting=True,
        homogeneous=True,
        kkt=_kkt_none,
        factory=ob.mgda,
        static=lambda t: {"num_tasks": t},
        invalid=_MGDA_BAD,
    ),
    Method(
        "mgda_l2",
        lambda t, **kw: ob.mgda(norm_type="l2", num_tasks=t, **kw),
        homogeneous=True,
        scale_invariant_weights=True,
        kkt=_kkt_l2,
        factory=ob.mgda,
        static=lambda t: {"norm_type": "l2", "num_tasks": t},
        invalid=_MGDA_BAD,
        notes="weights found on normalised gradients are applied to the raw ones, so the "
        "output can conflict (as in Sener & Koltun's code)",
    ),
    Method(
        "mgda_loss+",
        lambda t, **kw: ob.mgda(norm_type="loss+", num_tasks=t, **kw),
        needs_losses=True,
        homogeneous=True,
        scale_invariant_weights=True,
        kkt=_kkt_loss_plus,
        factory=ob.mgda,
        static=lambda t: {"norm_type": "loss+", "num_tasks": t},
        invalid=_MGDA_BAD,
        notes="as mgda_l2: weights from normalised gradients, applied to the raw ones",
    ),
    Method(
        "balancer",
        lambda t, **kw: ob.balancer([1.0] * t, **kw),
        scale_invariant_output=True,
        factory=ob.balancer,
        static=lambda t: {"weights": [1.0] * t},
        invalid=_BAL_BAD + (({"weights": [1.0, -1.0]}, "`weights` must be finite and >= 0"),),
        notes="weights are total_norm * w_i / sum(w) / EMA norm_i: they scale as 1/c, the "
        "output does not; a sum of unit directions conflicts for T >= 3",
    ),
    Method(
        "balancer_plain",
        lambda t, **kw: ob.balancer([1.0] * t, balance_grads=False, **kw),
        homogeneous=True,
        scale_invariant_weights=True,
        factory=ob.balancer,
        static=lambda t: {"weights": [1.0] * t, "balance_grads": False},
        invalid=_BAL_BAD,
        notes="a fixed weighted sum: conflicts whenever the tasks oppose",
    ),
    Method(
        "gradnorm",
        lambda t, **kw: ob.gradnorm(t, **kw),
        needs_losses=True,
        factory=ob.gradnorm,
        static=lambda t: {"num_tasks": t},
        invalid=(({"alpha": -1.0}, "`alpha` must be in [0, inf)"),),
        notes="the output is sum_i w_i(t) g_i, a weighted sum: conflicts whenever tasks oppose",
    ),
    Method(
        "metabalance",
        lambda t, **kw: ob.metabalance(num_tasks=t, **kw),
        permutation_invariant=False,
        factory=ob.metabalance,
        static=lambda t: {"num_tasks": t, "main_task": 0},
        invalid=(
            ({"relax_factor": 1.0}, "`relax_factor` must be in [0, 1)"),
            ({"beta": -0.1}, "`beta` must be in [0, 1)"),
            ({"strategy": "grow"}, "`strategy` must be one of"),
        ),
        notes="task 0 is the main task, so permuting the tasks changes the method",
    ),
    Method(
        "pcgrad",
        lambda t, **kw: ob.pcgrad(seed=0, num_tasks=t, **kw),
        permutation_invariant=False,
        stochastic=True,
        homogeneous=True,
        factory=ob.pcgrad,
        static=lambda t: {"num_tasks": t, "seed": 0},
        notes="random projection order per step; the summed projections can conflict for T >= 3",
    ),
    Method(
        "imtl_g",
        lambda t, **kw: ob.imtl_g(num_tasks=t, **kw),
        # equal positive projections on every unit gradient, or d = 0 when no non-zero
        # direction has them (rank-deficient J, issue 13)
        non_conflicting=True,
        homogeneous=True,
        factory=ob.imtl_g,
        static=lambda t: {"num_tasks": t},
    ),
    Method(
        "aligned_mtl",
        lambda t, **kw: ob.aligned_mtl(num_tasks=t, **kw),
        homogeneous=True,
        factory=ob.aligned_mtl,
        static=lambda t: {"num_tasks": t},
        invalid=(
            ({"scale_mode": "max"}, "`scale_mode` must be one of"),
            ({"pref_vector": [1.0, -1.0]}, "`pref_vector` must be finite and >= 0"),
        ),
    ),
    Method(
        "upgrad",
        lambda t, **kw: ob.upgrad(num_tasks=t, **kw),
        non_conflicting=True,
        conflict_slack=_ridge_slack,
        factory=ob.upgrad,
        static=lambda t: {"num_tasks": t},
        invalid=(({"reg_eps": -1.0}, "`reg_eps` must be in [0, inf)"),),
        notes="non-conflicting up to the ridge: g_j.d >= -reg_eps*w_j*||J||_F^2",
    ),
    Method(
        "dualproj",
        lambda t, **kw: ob.dualproj(num_tasks=t, **kw),
        non_conflicting=True,
        conflict_slack=_ridge_slack,
        factory=ob.dualproj,
        static=lambda t: {"num_tasks": t},
        invalid=(({"norm_eps": -1.0}, "`norm_eps` must be in [0, inf)"),),
        notes="non-conflicting up to the ridge: g_j.d >= -reg_eps*w_j*||J||_F^2",
    ),
    Method(
        "cagrad",
        lambda t, **kw: ob.cagrad(num_tasks=t, **kw),
        factory=ob.cagrad,
        static=lambda t: {"num_tasks": t},
        invalid=(({"c": -0.5}, "`c` must be in [0, inf)"),),
    ),
    Method(
        "nash_mtl",
        lambda t, **kw: ob.nash_mtl(t, **kw),
        factory=ob.nash_mtl,
        static=lambda t: {"num_tasks": t, "update_weights_every": 1, "optim_niter": 20},
        invalid=(({"max_norm": -1.0}, "`max_norm` must be in [0, inf)"),),
    ),
    Method(
        "gradvac",
        lambda t, **kw: ob.gradvac(seed=0, num_tasks=t, **kw),
        permutation_invariant=False,
        stochastic=True,
        factory=ob.gradvac,
        static=lambda t: {"num_tasks": t, "seed": 0},
        invalid=(
            ({"beta": 1.5}, "`beta` must be in [0, 1]"),
            ({"eps": -1.0}, "`eps` must be in [0, inf)"),
        ),
        notes="random order per step (as PCGrad, which its first step is); the absolute eps "
        "makes it not homogeneous for small gradients; the corrected sum can conflict",
    ),
    Method(
        "gradvac_per_leaf",
        lambda t, **kw: ob.gradvac(seed=0, per_leaf=True, num_tasks=t, **kw),
        permutation_invariant=False,
        stochastic=True,
        factory=ob.gradvac,
        static=lambda t: {"num_tasks": t, "seed": 0, "per_leaf": True},
        notes="as gradvac, leaf by leaf (per-leaf targets and weights)",
    ),
    Method(
        "graddrop",
        lambda t, **kw: ob.graddrop(seed=0, num_tasks=t, **kw),
        stochastic=True,
        homogeneous=True,
        factory=ob.graddrop,
        static=lambda t: {"num_tasks": t, "seed": 0},
        invalid=(({"leak": [0.5, 1.5, 0.0]}, "`leak` must hold values in [0, 1]"),),
        notes="per-coordinate masks from one uniform per coordinate (the same for every task "
        "order, so permutation invariant for a given key); a random sign choice conflicts",
    ),
    Method(
        "con_fig",
        lambda t, **kw: ob.con_fig(num_tasks=t, **kw),
        homogeneous=True,
        factory=ob.con_fig,
        static=lambda t: {"num_tasks": t},
        invalid=(({"pref_vector": [1.0, -1.0, 1.0]}, "`pref_vector` must be finite and >= 0"),),
        notes="conflict-free only when the unit gradients are independent; with T > rank the "
        "pseudo-inverse's least squares can conflict",
    ),
    Method(
        "krum",
        lambda t, **kw: ob.krum(0, num_tasks=t, **kw),
        permutation_invariant=False,
        homogeneous=True,
        factory=ob.krum,
        static=lambda t: {"n_byzantine": 0, "n_selected": 1, "num_tasks": t},
        invalid=(
            ({"n_byzantine": -1}, "`n_byzantine` must be an integer in [0, inf)"),
            ({"n_selected": 0}, "`n_selected` must be an integer in [1, inf)"),
            ({"n_byzantine": 1}, "needs at least 4 tasks"),
        ),
        min_tasks=3,
        notes="selects one task's gradient, which may conflict with the others'; at T = "
        "n_byzantine + 3 the two mutually nearest gradients always tie, and ties go to the "
        "lower index, so permuting the tasks can change the pick",
    ),
    Method(
        "trimmed_mean",
        lambda t, **kw: ob.trimmed_mean(1, num_tasks=t, **kw),
        homogeneous=True,
        factory=ob.trimmed_mean,
        static=lambda t: {"trim_number": 1, "num_tasks": t},
        invalid=(
            ({"trim_number": -1}, "`trim_number` must be an integer in [0, inf)"),
            ({"trim_number": 2}, "needs at least 5 tasks"),
        ),
        min_tasks=3,
        notes="a coordinate-wise median for T=3: conflicts whenever the majority opposes a task",
    ),
    Method(
        "fairgrad",
        lambda t, **kw: ob.fairgrad(num_tasks=t, **kw),
        non_conflicting=True,
        factory=ob.fairgrad,
        static=lambda t: {"num_tasks": t},
        invalid=(
            ({"alpha": -1.0}, "`alpha` must be in [0, inf)"),
            ({"max_iters": 0}, "`max_iters` must be an integer in [1, inf)"),
        ),
        notes="g_i.d = w_i^(-1/alpha) > 0 at the solution; where none exists (opposite "
        "gradients) the stopped solve leaves d orthogonal to them up to rounding",
    ),
    Method(
        "excess_mtl",
        lambda t, **kw: ob.excess_mtl(num_tasks=t, **kw),
        factory=ob.excess_mtl,
        static=lambda t: {"num_tasks": t, "n_warmup_steps": 0},
        invalid=(
            ({"robust_step_size": 0.0}, "`robust_step_size` must be in (0, inf)"),
            ({"n_warmup_steps": -1}, "`n_warmup_steps` must be an integer in [0, inf)"),
        ),
        stacked_init=False,
        notes="weights on the simplex: a weighted mean, conflicts whenever tasks oppose",
    ),
    Method(
        "pcd",
        lambda t, **kw: ob.pcd(num_tasks=t, **kw),
        permutation_invariant=False,
        factory=ob.pcd,
        static=lambda t: {"num_tasks": t},
        invalid=(
            ({"tau": 1.5}, "`tau` must be in [0, 1]"),
            ({"tau": [0.1, -0.1]}, "`tau` must be in [0, 1] (every entry)"),
            ({"tau": [0.1, 0.2, 0.3]}, "built for 4 tasks"),
            ({"beta": 1.0}, "`beta` must be in [0, 1)"),
            ({"eps": -1.0}, "`eps` must be in [0, inf)"),
        ),
        notes="task 0 is primary: a secondary task opposed to it can reverse d against it",
    ),
]

METHODS += [
    Method(
        "moco",
        lambda t, **kw: ob.moco(num_tasks=t, **kw),
        needs_losses=True,
        factory=ob.moco,
        static=lambda t: {"num_tasks": t},
        invalid=(
            ({"beta": 0.0}, "`beta` must be in (0, 1]"),
            ({"gamma_sigma": -1.0}, "`gamma_sigma` must be in [0, inf)"),
        ),
        train_optimizer=lambda: optax.sgd(0.3),
        notes="the output combines loss-scaled unit gradients: not homogeneous, and scale "
        "invariant only up to the 1e-8 added to each norm (not claimed). Trained with SGD, "
        "the paper's update: the direction's length is the losses', and under Adam at a "
        "constant rate the lagging estimates oscillate (adam(0.1): summed loss 9.2 -> 16.4 "
        "in 100 steps, the same in a NumPy transcription of LibMTL's code)",
    ),
    Method(
        "db_mtl",
        lambda t, **kw: ob.db_mtl(num_tasks=t, **kw),
        needs_losses=True,
        factory=ob.db_mtl,
        static=lambda t: {"num_tasks": t},
        invalid=(
            ({"beta": 1.0}, "`beta` must be in [0, 1)"),
            ({"beta_sigma": -0.5}, "`beta_sigma` must be in [0, inf)"),
        ),
        head_scales=lambda losses: 1.0 / (losses + 1e-8),
        train_optimizer=lambda: optax.adam(optax.exponential_decay(0.05, 1, 0.96)),
        notes="homogeneous only up to the 1e-8 added to each averaged norm (not claimed); "
        "heads train on the log-losses. Trained with a decaying Adam rate: the training "
        "test's losses are 0 at the optimum, where the log-loss gradient grows as "
        "1/distance, and a constant rate oscillates at its own scale (adam(0.1): 9.2 -> 3.5)",
    ),
    Method(
        "imtl",
        lambda t, **kw: ob.imtl(t, **kw),
        needs_losses=True,
        # IMTL-G on the scaled gradients (scales e^s > 0): as imtl_g
        non_conflicting=True,
        homogeneous=True,
        factory=ob.imtl,
        static=lambda t: {"num_tasks": t},
        invalid=(({"weight_optimizer": 0.1}, "`weight_optimizer` must be an optax"),),
        notes="from a fresh state the loss scales are 1: IMTL-G's properties",
    ),
    Method(
        "sdmgrad",
        lambda t, **kw: ob.sdmgrad(lr=1.0, num_tasks=t, **kw),
        two_batches=True,
        factory=ob.sdmgrad,
        static=lambda t: {"num_tasks": t, "n_iter": 20, "lr": 1.0},
        invalid=(
            ({"lr": 0.0}, "`lr` must be in (0, inf)"),
            ({"momentum": 1.0}, "`momentum` must be in [0, 1)"),
            ({"n_iter": 0}, "`n_iter` must be an integer in [1, inf)"),
        ),
        notes="run at lr=1: at torchjd's default lr=10 the inner heavy-ball steps do not "
        "converge and a 1e-7 relative change of A moves the weights by up to 0.33 (600 random "
        "draws), so no rounding-level comparison holds (the defaults are checked against "
        "torchjd's recurrence in test_sdmgrad.py); homogeneous only above the 1e-8 added to "
        "the matrix's scale (not claimed)",
    ),
    Method(
        "modo",
        lambda t, **kw: ob.modo(num_tasks=t, **kw),
        two_batches=True,
        factory=ob.modo,
        static=lambda t: {"num_tasks": t},
        invalid=(
            ({"gamma": 0.0}, "`gamma` must be in (0, inf)"),
            ({"rho": -1.0}, "`rho` must be in [0, inf)"),
        ),
        notes="one projected step on the raw cross-Gramian: not homogeneous",
    ),
]
# Loss-based methods (issue 14): weights from the losses alone, so they are unchanged by
# any scaling of the gradients (homogeneous, scale-invariant weights) and the output is a
# weighted sum of the gradients, which conflicts whenever tasks oppose.
_LOSS = dict(needs_losses=True, homogeneous=True, scale_invariant_weights=True)
_LOSS_NOTE = "weights from the losses alone: a weighted sum, conflicts whenever tasks oppose"


def _ramp(t: int) -> list[float]:
    return [1.0 + i / max(t - 1, 1) for i in range(t)]


_BAD_OPT = ({"weight_optimizer": "adam"}, "`weight_optimizer` must be an optax")
METHODS += [
    Method("mean", lambda t, **kw: ob.mean(num_tasks=t, **kw), **_LOSS, factory=ob.mean,
           static=lambda t: {"num_tasks": t}, notes=_LOSS_NOTE),
    Method("sum", lambda t, **kw: ob.sum(num_tasks=t, **kw), **_LOSS, factory=ob.sum,
           static=lambda t: {"num_tasks": t}, notes=_LOSS_NOTE),
    Method("constant", lambda t, **kw: ob.constant(_ramp(t), **kw), **_LOSS,
           permutation_invariant=False, factory=ob.constant,
           static=lambda t: {"weights": _ramp(t)},
           invalid=(({"weights": [1.0, -1.0]}, "`weights` must be finite and >= 0"),),
           notes="weights 1..2 by position, so permuting the tasks changes the method"),
    Method("rlw", lambda t, **kw: ob.rlw(num_tasks=t, **kw), **_LOSS, stochastic=True,
           permutation_invariant=False, factory=ob.rlw,
           static=lambda t: {"num_tasks": t, "seed": 0},
           notes="random weights per step (by position, from the key in the state)"),
    Method("uw", lambda t, **kw: ob.uw(t, **kw), **_LOSS, factory=ob.uw,
           static=lambda t: {"num_tasks": t},
           invalid=(({"init": float("nan")}, "`init` must be in"), _BAD_OPT),
           notes=_LOSS_NOTE),
    Method("imtl_l", lambda t, **kw: ob.imtl_l(t, **kw), **_LOSS, factory=ob.imtl_l,
           static=lambda t: {"num_tasks": t}, invalid=(_BAD_OPT,), notes=_LOSS_NOTE),
    Method("dwa", lambda t, **kw: ob.dwa(num_tasks=t, **kw), **_LOSS, factory=ob.dwa,
           static=lambda t: {"num_tasks": t, "every": 1},
           invalid=(({"temperature": 0.0}, "`temperature` must be in (0, inf)"),
                    ({"every": 0}, "`every` must be an integer in [1, inf)")),
           notes=_LOSS_NOTE),
    Method("gls", lambda t, **kw: ob.gls(num_tasks=t, **kw), **_LOSS, factory=ob.gls,
           static=lambda t: {"num_tasks": t}, notes=_LOSS_NOTE),
    Method("famo", lambda t, **kw: ob.famo(t, **kw), **_LOSS, factory=ob.famo,
           static=lambda t: {"num_tasks": t},
           invalid=(({"lr": -1.0}, "`lr` must be in [0, inf)"),
                    ({"min_losses": [0.0, 0.0]}, "`min_losses` has 2 entries")),
           notes=_LOSS_NOTE),
    Method("stch", lambda t, **kw: ob.stch(mu=0.5, num_tasks=t, **kw), **_LOSS,
           factory=ob.stch, static=lambda t: {"mu": 0.5, "num_tasks": t},
           invalid=(({"mu": 0.0}, "`mu` must be in (0, inf)"),), notes=_LOSS_NOTE),
    Method("cosmos", lambda t, **kw: ob.cosmos(lambda_=0.1, weights=[1.0] * t, **kw), **_LOSS,
           factory=ob.cosmos, static=lambda t: {"lambda_": 0.1, "weights": [1.0] * t},
           invalid=(({"lambda_": -1.0}, "`lambda_` must be in [0, inf)"),), notes=_LOSS_NOTE),
    Method("pbi", lambda t, **kw: ob.pbi(theta=1.0, weights=[1.0] * t, **kw), **_LOSS,
           factory=ob.pbi, static=lambda t: {"theta": 1.0, "weights": [1.0] * t},
           invalid=(({"theta": -1.0}, "`theta` must be in [0, inf)"),), notes=_LOSS_NOTE),
]  # fmt: skip

METHOD_IDS = [m.name for m in METHODS]
