"""optax_balance: multi-task gradient balancing as pure optax transformations.

Every method takes the stacked per-task gradients (a params pytree whose leaves carry a
leading task axis, as from :func:`value_and_task_grads`, ``jax.vmap(jax.grad)`` or
``jax.jacrev``) and returns one combined gradient, so it chains in front of any optimizer::

    tx = optax.chain(ob.mgda(), optax.adam(1e-3))
"""

from optax_balance._aligned_mtl import AlignedMTLState, aligned_mtl
from optax_balance._balancer import BalancerState, balancer
from optax_balance._cagrad import CAGradState, cagrad
from optax_balance._dualproj import DualProjState, dualproj
from optax_balance._gradnorm import GradNormState, gradnorm
from optax_balance._grads import task_weights, value_and_task_grads
from optax_balance._imtl_g import IMTLGState, imtl_g
from optax_balance._metabalance import MetaBalanceState, metabalance
from optax_balance._mgda import MGDAState, mgda
from optax_balance._nash_mtl import NashMTLState, nash_mtl
from optax_balance._pcgrad import PCGradState, pcgrad
from optax_balance._representation import value_and_balanced_grad
from optax_balance._upgrad import UPGradState, upgrad

__version__ = "0.1.0"

__all__ = [
    "AlignedMTLState",
    "BalancerState",
    "CAGradState",
    "DualProjState",
    "GradNormState",
    "IMTLGState",
    "MGDAState",
    "MetaBalanceState",
    "NashMTLState",
    "PCGradState",
    "UPGradState",
    "aligned_mtl",
    "balancer",
    "cagrad",
    "dualproj",
    "gradnorm",
    "imtl_g",
    "metabalance",
    "mgda",
    "nash_mtl",
    "pcgrad",
    "task_weights",
    "upgrad",
    "value_and_balanced_grad",
    "value_and_task_grads",
]
