"""Hyperparameter validation, at construction time.

Every check names the parameter and the allowed range in its ``ValueError``. Traced
values (hyperparameters injected by ``optax.inject_hyperparams``) are checked for their
shape only, since their value is not known while tracing.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.core import Tracer


def is_concrete(x: Any) -> bool:
    """True when ``x`` is a Python/NumPy number or a concrete (non-traced) array."""
    if isinstance(x, Tracer):
        return False
    return isinstance(x, (numbers.Number, np.ndarray, np.generic, jax.Array))


def is_traced(x: Any) -> bool:
    """True when ``x`` is a tracer (e.g. a hyperparameter under ``optax.inject_hyperparams``)."""
    return isinstance(x, Tracer)


def check_range(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raises ``ValueError`` naming ``name`` and the allowed range if ``value`` is outside.

    Traced values (under ``inject_hyperparams``) are not checked.
    """
    if not is_concrete(value):
        return
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar, got shape {arr.shape}.")
    v = float(arr)
    lo_ok = low is None or (v >= low if low_inclusive else v > low)
    hi_ok = high is None or (v <= high if high_inclusive else v < high)
    if not (lo_ok and hi_ok and np.isfinite(v)):
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        lb = "[" if (low_inclusive and low is not None) else "("
        hb = "]" if (high_inclusive and high is not None) else ")"
        raise ValueError(f"`{name}` must be in {lb}{lo}, {hi}{hb}, got {value!r}.")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}.")


def check_num_tasks(num_tasks: Any, *, required: bool = False) -> int | None:
    if num_tasks is None:
        if required:
            raise ValueError("`num_tasks` is required: pass the number of tasks T >= 1.")
        return None
    if not isinstance(num_tasks, (int, np.integer)) or isinstance(num_tasks, bool):
        raise ValueError(
            f"`num_tasks` must be a Python int >= 1, got {num_tasks!r}"
            " (under optax.inject_hyperparams, list it in `static_args`)."
        )
    if num_tasks < 1:
        raise ValueError(f"`num_tasks` must be >= 1, got {num_tasks}.")
    return int(num_tasks)


def check_task_vector(
    name: str, value: Any, num_tasks: int | None = None, *, nonnegative: bool = False
) -> tuple[Any, int | None]:
    """Validates a per-task vector hyperparameter (task weights, ``pref_vector``).

    It must be a non-empty 1-D sequence or array of finite numbers (and, with
    ``nonnegative``, >= 0 with a positive sum); its length fixes T, which must agree with
    ``num_tasks`` when both are given. A traced value (``optax.inject_hyperparams``) is
    checked for its shape only.

    Returns:
      ``(vector, T)``: a float64 NumPy array (the traced value as it is), or
      ``(None, num_tasks)`` when ``value`` is ``None``.
    """
    if value is None:
        return None, num_tasks
    if is_traced(value):
        shape = np.shape(value)
        if len(shape) != 1 or shape[0] == 0:
            raise ValueError(
                f"`{name}` must be a non-empty 1-D vector (one entry per task), got shape {shape}."
            )
        vec: Any = value
    else:
        if isinstance(value, (str, bytes)) or not isinstance(
            value, Sequence | np.ndarray | jax.Array
        ):
            raise ValueError(
                f"`{name}` must be a 1-D sequence or array of per-task numbers, got {value!r}."
            )
        try:
            vec = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"`{name}` must hold numbers, got {value!r}.") from None
        if vec.ndim != 1 or vec.size == 0:
            raise ValueError(
                f"`{name}` must hold at least one task weight, as a 1-D vector (one entry per "
                f"task); got shape {vec.shape}."
            )
        if nonnegative and (not np.all(np.isfinite(vec)) or np.any(vec < 0) or vec.sum() <= 0):
            raise ValueError(
                f"`{name}` must be finite and >= 0 with a positive sum, got {value!r}."
            )
        if not np.all(np.isfinite(vec)):
            raise ValueError(f"`{name}` must be finite, got {value!r}.")
    t = int(np.shape(vec)[0])
    if num_tasks is not None and num_tasks != t:
        raise ValueError(f"`{name}` has {t} entries but num_tasks={num_tasks}; give one per task.")
    return vec, t


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """A Python (or NumPy) integer in ``[low, high)``, else a ``ValueError`` naming ``name``.

    Integers that shape the computation (seeds, task indices, counts) are static: under
    ``optax.inject_hyperparams`` they go in ``static_args``.
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise ValueError(
            f"`{name}` must be a Python int, got {value!r} (under optax.inject_hyperparams, "
            "list it in `static_args`)."
        )
    v = int(value)
    if (low is not None and v < low) or (high is not None and v >= high):
        lo = "-inf" if low is None else str(low)
        hi = "inf" if high is None else str(high)
        raise ValueError(f"`{name}` must be an integer in [{lo}, {hi}), got {v}.")
    return v
