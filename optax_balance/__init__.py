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
from optax_balance._gramian._imtl import IMTLState, imtl
from optax_balance._gramian._imtl_g import IMTLGState, imtl_g
from optax_balance._gramian._krum import KrumState, krum
from optax_balance._gramian._mgda import MGDAState, mgda
from optax_balance._gramian._modo import MoDoState, modo
from optax_balance._gramian._nash_mtl import NashMTLState, nash_mtl
from optax_balance._gramian._pcd import PCDState, pcd
from optax_balance._gramian._pcgrad import PCGradState, pcgrad
from optax_balance._gramian._sdmgrad import SDMGradState, sdmgrad
from optax_balance._gramian._upgrad import UPGradState, upgrad
from optax_balance._jacobian._db_mtl import DBMTLState, db_mtl
from optax_balance._jacobian._excess_mtl import ExcessMTLState, excess_mtl
from optax_balance._jacobian._graddrop import GradDropState, graddrop
from optax_balance._jacobian._moco import MoCoState, moco
from optax_balance._jacobian._trimmed_mean import TrimmedMeanState, trimmed_mean
from optax_balance._loss._cosmos import COSMOSState, cosmos
from optax_balance._loss._dwa import DWAState, dwa
from optax_balance._loss._famo import FAMOState, famo
from optax_balance._loss._gls import GLSState, gls
from optax_balance._loss._imtl_l import IMTLLState, imtl_l
from optax_balance._loss._linear import ConstantState, constant, mean
from optax_balance._loss._linear import sum_ as sum  # ob.sum (the builtin is shadowed here only)
from optax_balance._loss._pbi import PBIState, pbi
from optax_balance._loss._rlw import RLWState, rlw
from optax_balance._loss._stch import STCHState, stch
from optax_balance._loss._uw import UWState, uw
from optax_balance._norm._balancer import BalancerState, balancer
from optax_balance._norm._gradnorm import GradNormState, gradnorm
from optax_balance._norm._metabalance import MetaBalanceState, metabalance
from optax_balance._representation import value_and_balanced_grad
from optax_balance._weighted_grad import value_and_weighted_grad
from optax_balance._weighted_loss import weighted_loss
from optax_balance._wrappers._accumulate import accumulate
from optax_balance._wrappers._cr_mogm import CRMOGMState, cr_mogm

__version__ = "0.1.0"

__all__ = [
    "AlignedMTLState",
    "BalancerState",
    "CAGradState",
    "COSMOSState",
    "CRMOGMState",
    "ConFIGState",
    "ConflictStats",
    "ConstantState",
    "DBMTLState",
    "DWAState",
    "DualProjState",
    "ExcessMTLState",
    "FAMOState",
    "FairGradState",
    "GLSState",
    "GradDropState",
    "GradNormState",
    "GradVacState",
    "IMTLGState",
    "IMTLLState",
    "IMTLState",
    "KrumState",
    "MGDAState",
    "MetaBalanceState",
    "MoCoState",
    "MoDoState",
    "NashMTLState",
    "PBIState",
    "PCDState",
    "PCGradState",
    "RLWState",
    "SDMGradState",
    "STCHState",
    "Stats",
    "TrimmedMeanState",
    "UPGradState",
    "UWState",
    "Weighting",
    "accumulate",
    "aligned_mtl",
    "balance",
    "balancer",
    "cagrad",
    "con_fig",
    "conflict_stats",
    "constant",
    "cosmos",
    "cr_mogm",
    "db_mtl",
    "dualproj",
    "dwa",
    "excess_mtl",
    "fairgrad",
    "famo",
    "gls",
    "graddrop",
    "gradnorm",
    "gradvac",
    "imtl",
    "imtl_g",
    "imtl_l",
    "krum",
    "mean",
    "metabalance",
    "mgda",
    "moco",
    "modo",
    "nash_mtl",
    "pbi",
    "pcd",
    "pcgrad",
    "rlw",
    "sdmgrad",
    "stch",
    "sum",
    "task_weights",
    "trimmed_mean",
    "upgrad",
    "uw",
    "value_and_balanced_grad",
    "value_and_task_grads",
    "value_and_weighted_grad",
    "weighted_loss",
    "weightings",
]
