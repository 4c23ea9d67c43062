"""The registry every shared suite runs over: one line per method.

``make(T, **kw)`` builds the method for T tasks; ``kw`` may hold ``shared``,
``axis_name`` and ``sync``. Flags say which properties the method claims.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import optax

import optax_balance as ob


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    make: Callable[..., optax.GradientTransformationExtraArgs]
    needs_losses: bool = False
    non_conflicting: bool = False  # g_i . d >= -tol for every task
    permutation_invariant: bool = True  # permuting tasks permutes weights, output unchanged
    stochastic: bool = False  # uses a PRNG key from its state
    notes: str = ""

    def __repr__(self) -> str:
        return self.name


METHODS: list[Method] = [
    Method("mgda", lambda t, **kw: ob.mgda(num_tasks=t, **kw), non_conflicting=True),
    Method("mgda_l2", lambda t, **kw: ob.mgda(norm_type="l2", num_tasks=t, **kw)),
    Method(
        "mgda_loss+",
        lambda t, **kw: ob.mgda(norm_type="loss+", num_tasks=t, **kw),
        needs_losses=True,
    ),
    Method(
        "upgrad",
        lambda t, **kw: ob.upgrad(num_tasks=t, **kw),
        non_conflicting=True,
        notes="non-conflicting up to the ridge: g_j.d >= -reg_eps*w_j*||J||_F^2",
    ),
    Method(
        "dualproj",
        lambda t, **kw: ob.dualproj(num_tasks=t, **kw),
        non_conflicting=True,
        notes="non-conflicting up to the ridge: g_j.d >= -reg_eps*w_j*||J||_F^2",
    ),
    Method("cagrad", lambda t, **kw: ob.cagrad(num_tasks=t, **kw)),
    Method("nash_mtl", lambda t, **kw: ob.nash_mtl(t, **kw)),
    Method("balancer", lambda t, **kw: ob.balancer([1.0] * t, **kw)),
    Method("balancer_plain", lambda t, **kw: ob.balancer([1.0] * t, balance_grads=False, **kw)),
]

METHOD_IDS = [m.name for m in METHODS]
