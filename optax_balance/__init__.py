"""optax_balance: multi-task gradient balancing as pure optax transformations.

Every method takes the stacked per-task gradients (a params pytree whose leaves carry a
leading task axis, as from :func:`value_and_task_grads`, ``jax.vmap(jax.grad)`` or
``jax.jacrev``) and returns one combined gradient, so it chains in front of any optimizer::

    tx = optax.chain(ob.mgda(num_tasks=3), optax.adam(1e-3))

Each method is a :class:`Weighting` (``ob.weightings.<name>``: statistics [+ state] ->
weights [+ state]) made into a transformation by :func:`balance`.
"""

from optax_balance import weightings
from optax_balance._core import Stats, Weighting, balance
from optax_balance._diagnostics import ConflictStats, conflict_stats
from optax_balance._grads import task_weights, value_and_task_grads
from optax_balance._gramian._aligned_mtl import AlignedMTLState, aligned_mtl
from optax_balance._gramian._cagrad import CAGradState, cagrad
from optax_balance._gramian._con_fig import ConFIGState, con_fig
from optax_balance._gramian._dualproj import DualProjState, dualproj
from optax_balance._gramian._fairgrad import FairGradState, fairgrad
from optax_balance._gramian._gradvac import GradVacState, gradvac
from optax_balance._gramian._imtl_g import IMTLGState, imtl_g
from optax_balance._gramian._krum import KrumState, krum
from optax_balance._gramian._mgda import MGDAState, mgda
from optax_balance._gramian._nash_mtl import NashMTLState, nash_mtl
from optax_balance._gramian._pcd import PCDState, pcd
from optax_balance._gramian._pcgrad import PCGradState, pcgrad
from optax_balance._gramian._upgrad import UPGradState, upgrad
from optax_balance._jacobian._excess_mtl import ExcessMTLState, excess_mtl
from optax_balance._jacobian._graddrop import GradDropState, graddrop
from optax_balance._jacobian._trimmed_mean import TrimmedMeanState, trimmed_mean
from optax_balance._norm._balancer import BalancerState, balancer
from optax_balance._norm._gradnorm import GradNormState, gradnorm
from optax_balance._norm._metabalance import MetaBalanceState, metabalance
from optax_balance._representation import value_and_balanced_grad
from optax_balance._weighted_grad import value_and_weighted_grad
from optax_balance._wrappers._accumulate import accumulate
from optax_balance._wrappers._cr_mogm import CRMOGMState, cr_mogm

__version__ = "0.1.0"

__all__ = [
    "AlignedMTLState",
    "BalancerState",
    "CAGradState",
    "CRMOGMState",
    "ConFIGState",
    "ConflictStats",
    "DualProjState",
    "ExcessMTLState",
    "FairGradState",
    "GradDropState",
    "GradNormState",
    "GradVacState",
    "IMTLGState",
    "KrumState",
    "MGDAState",
    "MetaBalanceState",
    "NashMTLState",
    "PCDState",
    "PCGradState",
    "Stats",
    "TrimmedMeanState",
    "UPGradState",
    "Weighting",
    "accumulate",
    "aligned_mtl",
    "balance",
    "balancer",
    "cagrad",
    "con_fig",
    "conflict_stats",
    "cr_mogm",
    "dualproj",
    "excess_mtl",
    "fairgrad",
    "graddrop",
    "gradnorm",
    "gradvac",
    "imtl_g",
    "krum",
    "metabalance",
    "mgda",
    "nash_mtl",
    "pcd",
    "pcgrad",
    "task_weights",
    "trimmed_mean",
    "upgrad",
    "value_and_balanced_grad",
    "value_and_task_grads",
    "value_and_weighted_grad",
    "weightings",
]
