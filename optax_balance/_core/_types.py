"""Type aliases and the statistics dtype, shared by every module of the core."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeAlias

import jax
import jax.numpy as jnp

Array: TypeAlias = jax.Array
PyTree: TypeAlias = Any
SharedMask: TypeAlias = "PyTree | Callable[[PyTree], PyTree] | None"
Sync = Literal["grads", "stats"]


def stat_dtype() -> jnp.dtype:
    """The dtype statistics are computed in: float32, or float64 when x64 is enabled."""
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))
