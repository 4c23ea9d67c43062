"""Input builders and cached, jitted steps shared by the registry-wide suites.

Every suite works on one small parameter tree (``LEAVES``: a nested ``(3, 2)`` weight
and a ``(2,)`` bias, 8 numbers) so that a task-gradient matrix ``J`` of shape ``(T, 8)``
maps to a stacked gradient tree and back, and NumPy references are written on ``J``.
Each method is built, traced and compiled once per task count (``stepper``); the hostile
cases run as one ``vmap`` batch (one compile per method), which is what keeps the whole
registry inside the CI time budget. A two-batch method (``Method.two_batches``) gets the
same gradients as its second batch (``Method.batch_kwargs``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tests.methods import METHODS, Method

PyTree = Any

# Leaf order is jax.tree.leaves order (dict keys sorted): "bias" then "dense"/"w".
LEAVES: dict[str, Any] = {"bias": (2,), "dense": {"w": (3, 2)}}
SIZES = [int(np.prod(s)) for s in jax.tree.leaves(LEAVES, is_leaf=lambda x: isinstance(x, tuple))]
N = sum(SIZES)  # 8
LEAF_PATHS = ("['bias']", "['dense']['w']")

BY_NAME = {m.name: m for m in METHODS}


def _shapes() -> list[tuple[int, ...]]:
    return jax.tree.leaves(LEAVES, is_leaf=lambda x: isinstance(x, tuple))


def _treedef() -> Any:
    return jax.tree.structure(LEAVES, is_leaf=lambda x: isinstance(x, tuple))


def params(dtype: Any = jnp.float32) -> PyTree:
    """The (unstacked) zero parameters."""
    return jax.tree.unflatten(_treedef(), [jnp.zeros(s, dtype) for s in _shapes()])


def tree(j: Any, dtypes: Any = jnp.float32) -> PyTree:
    """Splits ``J`` of shape ``(..., T, N)`` into the stacked tree (leading axes kept).

    ``dtypes`` is one dtype or one per leaf (in leaf order).
    """
    j = jnp.asarray(j)
    if not isinstance(dtypes, Sequence):
        dtypes = [dtypes] * len(SIZES)
    out, start = [], 0
    for shape, size, dt in zip(_shapes(), SIZES, dtypes):
        part = j[..., start : start + size]
        out.append(part.reshape(*j.shape[:-1], *shape).astype(dt))
        start += size
    return jax.tree.unflatten(_treedef(), out)


def flat(t: PyTree) -> np.ndarray:
    """The inverse of :func:`tree` for an unstacked (``(N,)``) or stacked (``(T, N)``) tree."""
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]
    lead = leaves[0].shape[: leaves[0].ndim - len(_shapes()[0])]
    return np.concatenate([x.reshape(*lead, -1) for x in leaves], axis=-1)


def rand_j(seed: int, t: int, n: int = N) -> np.ndarray:
    """A generic ``(t, N)`` task-gradient matrix (rows of norm ~1), zero past column ``n``."""
    j = np.random.default_rng(seed).normal(size=(t, N)) / np.sqrt(N)
    j[:, n:] = 0.0
    return j.astype(np.float32)


def losses_for(t: int) -> np.ndarray:
    return np.linspace(0.5, 2.0, t).astype(np.float32)


def build(m: Method, t: int, **kw: Any) -> optax.GradientTransformationExtraArgs:
    """``m`` for ``t`` tasks, with extra keyword arguments (through ``factory`` if given)."""
    if m.factory is not None and m.static is not None:
        return m.factory(**{**m.static(t), **kw})
    return m.make(t, **kw)


def avals(t: PyTree) -> PyTree:
    """Shape, dtype and weak type of every leaf: what decides a jit cache hit."""
    return jax.tree.map(lambda x: (np.shape(x), jnp.result_type(x), _weak(x)), t)


def _weak(x: Any) -> bool:
    return bool(getattr(jax.typeof(x), "weak_type", False))


def all_finite(t: PyTree) -> bool:
    return all(
        bool(np.all(np.isfinite(np.asarray(x, np.float64))))
        for x in jax.tree.leaves(t)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    )


def trees_equal(a: PyTree, b: PyTree) -> bool:
    """Exact equality (NaN == NaN), leaf by leaf; PRNG keys compared by their data."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    for x, y in zip(la, lb):
        if jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        if not np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True):
            return False
    return True


class Stepper:
    """``m`` built for ``t`` tasks with a jitted ``update`` that counts its traces."""

    def __init__(self, m: Method, t: int):
        self.method, self.num_tasks = m, t
        self.tx = m.make(t)
        self.traces = 0
        self.step = jax.jit(self._step)
        self.batch = jax.jit(jax.vmap(self._step, in_axes=(0, None, 0)))

    def _step(self, g: PyTree, state: Any, losses: Any) -> tuple[PyTree, Any]:
        self.traces += 1
        p = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), g)
        return self.tx.update(g, state, p, task_losses=losses, **self.method.batch_kwargs(g))

    def init(self, dtype: Any = jnp.float32) -> Any:
        return self.tx.init(params(dtype))


@functools.cache
def stepper(name: str, t: int) -> Stepper:
    return Stepper(BY_NAME[name], t)


# ----------------------------------------------------------------------------------------
# Hostile cases: name -> (J builder, losses builder) on T=3. One vmap batch per method.
# ----------------------------------------------------------------------------------------

HOSTILE_T = 3
_J0 = rand_j(1234, HOSTILE_T)
_L0 = losses_for(HOSTILE_T)


def _with(j: np.ndarray, **rows: Any) -> np.ndarray:
    j = j.copy()
    for k, v in rows.items():
        j[int(k[1:])] = v
    return j


def _round(j: np.ndarray, dtypes: Sequence[Any]) -> np.ndarray:
    """``J`` rounded through the per-leaf dtypes (the values a low-precision input holds)."""
    return flat(tree(j, dtypes)).astype(np.float32)


FINITE_CASES: dict[str, tuple[np.ndarray, np.ndarray]] = {
    "generic": (_J0, _L0),
    "all_zero": (np.zeros_like(_J0), _L0),
    "one_task_zero": (_with(_J0, r1=0.0), _L0),
    "duplicate_rows": (_with(_J0, r1=_J0[0]), _L0),
    "all_rows_equal": (np.tile(_J0[:1], (HOSTILE_T, 1)), _L0),
    "opposite_rows": (_with(_J0, r1=-_J0[0]), _L0),
    "one_task_1e10_larger": (_with(_J0, r0=1e10 * _J0[0]), _L0),
    "one_task_1e10_smaller": (_with(_J0, r0=1e-10 * _J0[0]), _L0),
    "rank_one": (np.outer([1.0, -2.0, 0.5], _J0[0]).astype(np.float32), _L0),
    "zero_loss": (_J0, np.array([0.0, 1.0, 2.0], np.float32)),
    "bf16_values": (_round(_J0, [jnp.bfloat16] * 2), _L0),
    "f16_values": (_round(_J0, [jnp.float16] * 2), _L0),
    "mixed_values": (_round(_J0, [jnp.float32, jnp.bfloat16]), _L0),
    **{f"scale_{s:g}": ((s * _J0).astype(np.float32), _L0) for s in (0.0, 1e-10, 1e3, 1e5, 1e10)},
}

_NAN_J = _J0.copy()
_NAN_J[1, 5] = np.nan  # one element of task 1's gradient, in leaf ['dense']['w']
_INF_J = _J0.copy()
_INF_J[1, 5] = np.inf
NONFINITE_CASES: dict[str, tuple[np.ndarray, np.ndarray]] = {
    "nan_grad": (_NAN_J, _L0),
    "inf_grad": (_INF_J, _L0),
    "nan_loss": (_J0, np.array([0.5, np.nan, 2.0], np.float32)),
    "inf_loss": (_J0, np.array([0.5, np.inf, 2.0], np.float32)),
}
ALL_CASES = {**FINITE_CASES, **NONFINITE_CASES}
CASE_NAMES = list(ALL_CASES)


def _unbatch(t: PyTree, i: int) -> PyTree:
    return jax.tree.map(lambda x: x[i], t)


@functools.cache
def hostile_results(name: str, fresh: bool) -> dict[str, tuple[PyTree, Any, Any]]:
    """``case -> (output, new_state, state_in)`` for every hostile case, in one vmap call.

    ``fresh``: from ``init``; otherwise from the state after one step on ``generic``.
    """
    st = stepper(name, HOSTILE_T)
    state = st.init()
    if not fresh:
        _, state = st.step(tree(_J0), state, _L0)
    js = np.stack([ALL_CASES[c][0] for c in CASE_NAMES])
    ls = np.stack([ALL_CASES[c][1] for c in CASE_NAMES])
    outs, states = st.batch(tree(js), state, ls)
    return {c: (_unbatch(outs, i), _unbatch(states, i), state) for i, c in enumerate(CASE_NAMES)}


def trees_close(a: PyTree, b: PyTree) -> bool:
    """Integers, booleans and keys exactly equal, floats to a few ulps (``rtol=1e-6``).

    For the same float32 ops on the same inputs at two rows of one vmapped program: XLA
    may vectorise one row's elements and compute the other's in a scalar tail.
    """
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    for x, y in zip(la, lb):
        if jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            if not np.array_equal(x, y):
                return False
        elif x.shape != y.shape or not np.allclose(x, y, rtol=1e-6, atol=0, equal_nan=True):
            return False
    return True


def combination(weights: Any, j: np.ndarray) -> np.ndarray:
    """``sum_i w_i J_i`` in float64."""
    return np.asarray(weights, np.float64) @ np.asarray(j, np.float64)


def conflict_tolerance(j: np.ndarray, weights: Any, method: Any = None) -> np.ndarray:
    """Per-task tolerance for ``g_i . d`` with ``d = sum_j w_j g_j`` computed in float32.

    Cauchy-Schwarz bounds on the rounding: ``1e-4 ||g_i|| sum_j |w_j| ||g_j||`` (relative
    error of the combination) plus ``1e-5 ||g_i|| max_j ||g_j||`` (weights resolved to
    the solver's epsilon, 1e-5, on the simplex). Per task, so a task 1e3 smaller than another is
    held to its own scale.
    """
    norms = np.sqrt(np.sum(np.asarray(j, np.float64) ** 2, axis=1))
    w = np.abs(np.asarray(weights, np.float64))
    tol = 1e-4 * norms * (w @ norms) + 1e-5 * norms * norms.max(initial=0.0)
    slack = getattr(method, "conflict_slack", None)
    return tol if slack is None else tol + slack(np.asarray(j, np.float64), w)


def method_params(methods: Sequence[Method], pred: Callable[[Method], bool]) -> list[Any]:
    """pytest params for the methods where ``pred`` holds (ids: method names)."""
    import pytest

    return [pytest.param(m, id=m.name) for m in methods if pred(m)]
