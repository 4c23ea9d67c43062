"""optax_balance: multi-task gradient balancing as pure optax transformations.

Every method takes the stacked per-task gradients (a params pytree whose leaves carry a
leading task axis, as from :func:`value_and_task_grads`, ``jax.vmap(jax.grad)`` or
``jax.jacrev``) and returns one combined gradient, so it chains in front of any optimizer::

    tx = optax.chain(ob.mgda(), optax.adam(1e-3))

Each method is a :class:`Weighting` (``ob.weightings.<name>``: statistics [+ state] ->
weights [+ state]) made into a transformation by :func:`balance`.
"""

from optax_balance import weightings
from optax_balance._core import Stats, Weighting, balance
from optax_balance._grads import task_weights, value_and_task_grads
from optax_balance._gramian._aligned_mtl import AlignedMTLState, aligned_mtl
from optax_balance._gramian._cagrad import CAGradState, cagrad
from optax_balance._gramian._dualproj import DualProjState, dualproj
from optax_balance._gramian._imtl import IMTLState, imtl
from optax_balance._gramian._imtl_g import IMTLGState, imtl_g
from optax_balance._gramian._mgda import MGDAState, mgda
from optax_balance._gramian._modo import MoDoState, modo
from optax_balance._gramian._nash_mtl import NashMTLState, nash_mtl
from optax_balance._gramian._pcgrad import PCGradState, pcgrad
from optax_balance._gramian._sdmgrad import SDMGradState, sdmgrad
from optax_balance._gramian._upgrad import UPGradState, upgrad
from optax_balance._jacobian._db_mtl import DBMTLState, db_mtl
from optax_balance._jacobian._moco import MoCoState, moco
from optax_balance._norm._balancer import BalancerState, balancer
from optax_balance._norm._gradnorm import GradNormState, gradnorm
from optax_balance._norm._metabalance import MetaBalanceState, metabalance
from optax_balance._representation import value_and_balanced_grad
from optax_balance._wrappers._cr_mogm import CRMOGMState, cr_mogm

__version__ = "0.1.0"

__all__ = [
    "AlignedMTLState",
    "BalancerState",
    "CAGradState",
    "CRMOGMState",
    "DBMTLState",
    "DualProjState",
    "GradNormState",
    "IMTLGState",
    "IMTLState",
    "MGDAState",
    "MetaBalanceState",
    "MoCoState",
    "MoDoState",
    "NashMTLState",
    "PCGradState",
    "SDMGradState",
    "Stats",
    "UPGradState",
    "Weighting",
    "aligned_mtl",
    "balance",
    "balancer",
    "cagrad",
    "cr_mogm",
    "db_mtl",
    "dualproj",
    "gradnorm",
    "imtl",
    "imtl_g",
    "metabalance",
    "mgda",
    "moco",
    "modo",
    "nash_mtl",
    "pcgrad",
    "sdmgrad",
    "task_weights",
    "upgrad",
    "value_and_balanced_grad",
    "value_and_task_grads",
    "weightings",
]
