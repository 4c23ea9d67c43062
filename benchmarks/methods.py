"""The one list of methods the benchmark measures: one line per method.

A line names the ``optax_balance`` factory (looked up with ``getattr``, so a method that is
not in this build of the library is skipped with a printed note), the keyword arguments
it is built with, the target class (``"gram"``: needs the Gramian, about two passes over
the gradients, target 3x the one-pass floor at T <= 8 and 4x at T = 32, and a train step
within 1.15x of the equal-weight step at T = 8; ``"norm"``: needs only norms, target 2x;
``"coord"``: works coordinate by coordinate on the stacked gradients, as GradDrop's masks
and TrimmedMean's ranks, target 4x; ``"two_batch"``: the cross-Gramian and the
combination of two batches, four passes, target 5x; ``"state"``: gradient-sized state
read and written besides the gradients, about eight passes, target 9x), the torchjd
aggregator it is compared with (``None``: torchjd has no counterpart), and the smallest T
it accepts (``min_tasks``: Krum, TrimmedMean; smaller T are skipped). A ``two_batches``
method is given the same stacked gradients as its second batch (``update_kwargs``): its
timings are the method's, not the second backward pass a user pays for. Both libraries
run with their default hyperparameters unless the line says otherwise.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, Literal

import optax

import optax_balance as ob


@dataclasses.dataclass(frozen=True)
class BenchMethod:
    name: str
    factory: str  # attribute of optax_balance
    kind: Literal["gram", "norm", "coord", "two_batch", "state"]
    kwargs: Callable[[int], dict[str, Any]] = lambda t: {}
    torchjd: str | None = None  # class name in torchjd.aggregation
    torchjd_kwargs: Callable[[int], dict[str, Any]] = lambda t: {}
    needs_losses: bool = False
    two_batches: bool = False
    min_tasks: int = 1

    def update_kwargs(self, grads: Any) -> dict[str, Any]:
        """``update``'s keyword for a second batch (the same gradients), if the method needs one."""
        return {"task_grads2": grads} if self.two_batches else {}

    def available(self) -> bool:
        return callable(getattr(ob, self.factory, None))

    def make(self, num_tasks: int, **extra: Any) -> optax.GradientTransformationExtraArgs:
        """Builds the method for ``num_tasks`` tasks (``num_tasks=`` is passed if accepted)."""
        factory = getattr(ob, self.factory)
        kw = dict(self.kwargs(num_tasks))
        params = inspect.signature(factory).parameters
        if "num_tasks" in params and "num_tasks" not in kw:
            kw["num_tasks"] = num_tasks
        return factory(**kw, **extra)


M = BenchMethod


def _krum(t: int) -> dict[str, Any]:  # Krum and TrimmedMean: the same in both libraries
    return {"n_byzantine": 1}


def _tm(t: int) -> dict[str, Any]:
    return {"trim_number": 1}


METHODS: list[BenchMethod] = [
    M("mgda", "mgda", "gram", torchjd="MGDA"),
    M("upgrad", "upgrad", "gram", torchjd="UPGrad"),
    M("dualproj", "dualproj", "gram", torchjd="DualProj"),
    M("pcgrad", "pcgrad", "gram", torchjd="PCGrad"),
    M("cagrad", "cagrad", "gram", torchjd="CAGrad", torchjd_kwargs=lambda t: {"c": 0.5}),
    M("imtl_g", "imtl_g", "gram", torchjd="IMTLG"),
    M("nash_mtl", "nash_mtl", "gram", torchjd="NashMTL", torchjd_kwargs=lambda t: {"n_tasks": t}),
    M("aligned_mtl", "aligned_mtl", "gram", torchjd="AlignedMTL"),
    M("balancer", "balancer", "norm", kwargs=lambda t: {"weights": [1.0] * t}),
    M("gradnorm", "gradnorm", "norm", needs_losses=True),
    M("metabalance", "metabalance", "norm"),
    M("gradvac", "gradvac", "gram", torchjd="GradVac"),
    M("graddrop", "graddrop", "coord", torchjd="GradDrop"),
    M("con_fig", "con_fig", "gram", torchjd="ConFIG"),
    M("krum", "krum", "gram", kwargs=_krum, torchjd="Krum", torchjd_kwargs=_krum, min_tasks=4),
    M(
        "trimmed_mean",
        "trimmed_mean",
        "coord",
        kwargs=_tm,
        torchjd="TrimmedMean",
        torchjd_kwargs=_tm,
        min_tasks=3,
    ),
    M("fairgrad", "fairgrad", "gram", torchjd="FairGrad", torchjd_kwargs=lambda t: {"alpha": 1.0}),
    # Not a Gramian method: it reads the stacked gradients and reads and writes its
    # per-task AdaGrad accumulators (T x P) every step, as torchjd's does.
    M("excess_mtl", "excess_mtl", "state", torchjd="ExcessMTL"),
    M("pcd", "pcd", "gram", torchjd="PCD"),
    M("moco", "moco", "state", needs_losses=True),  # not in torchjd
    M("db_mtl", "db_mtl", "state", needs_losses=True),  # not in torchjd
    M("imtl", "imtl", "gram", needs_losses=True),  # the hybrid; torchjd has IMTL-G alone
    # torchjd's SDMGradWeighting / MoDoWeighting take the cross-Gramian J1 J2^T, not J: no
    # aggregator to time on the same matrix.
    M("sdmgrad", "sdmgrad", "two_batch", two_batches=True),
    M("modo", "modo", "two_batch", two_batches=True),
]
# The loss-based methods (ob.famo, ob.uw, ob.dwa, ...) are not listed: on stacked
# gradients their `update` is the floor itself (one pass, weights from T losses), their
# point is the one-backward train step, which benchmarks/loss_cost.py times against the
# plain summed loss, and torchjd's counterparts are scalarizers of the losses, not
# aggregators of a Jacobian.


def select(names: str | None) -> tuple[list[BenchMethod], list[str]]:
    """The methods to run (all, or the comma-separated ``names``) and notes on skipped ones."""
    wanted = None if not names else {n.strip() for n in names.split(",") if n.strip()}
    chosen, notes = [], []
    for m in METHODS:
        if wanted is not None and m.name not in wanted:
            continue
        if not m.available():
            notes.append(
                f"`ob.{m.factory}` is not in this build of optax_balance: {m.name} skipped."
            )
            continue
        try:
            m.make(max(2, m.min_tasks))
        except (TypeError, ValueError) as e:
            notes.append(f"`ob.{m.factory}` could not be built as listed ({e}): {m.name} skipped.")
            continue
        chosen.append(m)
    if wanted is not None:
        unknown = wanted - {m.name for m in METHODS}
        notes += [f"unknown method {n!r} (not in benchmarks/methods.py)" for n in sorted(unknown)]
    return chosen, notes
