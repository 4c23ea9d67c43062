"""Learned per-task loss parameters (UW's log-variances, IMTL-L's log-scales)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def check_weight_optimizer(
    weight_optimizer: optax.GradientTransformation | None,
) -> optax.GradientTransformation:
    """The optimizer of the learned parameters: ``weight_optimizer``, or ``adam(1e-2)``."""
    wopt = optax.adam(1e-2) if weight_optimizer is None else weight_optimizer
    if not (hasattr(wopt, "init") and hasattr(wopt, "update")):
        raise ValueError(
            "`weight_optimizer` must be an optax GradientTransformation (with `init` and "
            f"`update`), e.g. optax.adam(1e-2); got {weight_optimizer!r}."
        )
    return wopt


def step(
    wopt: optax.GradientTransformation, s: jax.Array, grad: jax.Array, opt_state: Any
) -> tuple[jax.Array, Any]:
    """One step of ``wopt`` on the parameters ``s`` with gradient ``grad``."""
    updates, opt_state = wopt.update(grad, opt_state, s)
    return jnp.asarray(optax.apply_updates(s, updates), s.dtype), opt_state
