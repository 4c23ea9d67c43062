"""Small checks shared by the test files of the solver-based weightings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_balance._solvers import _qp
from tests.qp_reference import HOSTILE, SCALES

# The dual-cone projection for the solver KKT checks, jitted once (compiled once per
# shape; called eagerly, its loop would be traced and compiled on every call).
project_to_dual_cone = jax.jit(lambda u, g: _qp.project_to_dual_cone(u, g, max_iters=200))


def run(tx: optax.GradientTransformationExtraArgs, jac: np.ndarray, *, jit: bool = True, **kw):
    """One update on a single-leaf stacked gradient ``jac`` (T, n); returns (d, state).

    Jitted unless ``jit=False`` (one compilation of the whole update; eagerly, the core
    compiles the transformation's weighting and Gramian and runs the rest op by op).
    """
    jac = jnp.asarray(jac, jnp.float32)
    state = tx.init(jnp.zeros(jac.shape[1:], jnp.float32))
    update = jax.jit(tx.update) if jit else tx.update
    return update(jac, state, **kw)


def assert_finite_on_hostile(make, ts=(1, 2, 5)) -> None:
    """Finite output and weights on zero / duplicate / opposite rows, T=1, 1e-10..1e10."""
    for t in ts:
        tx = make(t)
        update = jax.jit(tx.update)
        state0 = tx.init(jnp.zeros((5,), jnp.float32))
        for name, build in HOSTILE.items():
            for scale in SCALES:
                jac = jnp.asarray(scale * build(t), jnp.float32)
                d, state = update(jac, state0)
                assert np.all(np.isfinite(np.asarray(d))), (name, t, scale)
                assert np.all(np.isfinite(np.asarray(state.weights))), (name, t, scale)


def jitted(tx: optax.GradientTransformationExtraArgs, n: int):
    """``(jac, **kw) -> (d, state)``: one jitted update from a fresh state (shape (n,))."""
    state0 = tx.init(jnp.zeros((n,), jnp.float32))
    update = jax.jit(tx.update)
    return lambda jac, **kw: update(jnp.asarray(jac, jnp.float32), state0, **kw)


def assert_jit_matches_eager(make, jac: np.ndarray, atol: float = 1e-6) -> None:
    d_eager, s_eager = run(make(jac.shape[0]), jac, jit=False)
    d_jit, s_jit = run(make(jac.shape[0]), jac)
    np.testing.assert_allclose(np.asarray(d_jit), np.asarray(d_eager), atol=atol, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(s_jit.weights), np.asarray(s_eager.weights), atol=atol, rtol=1e-5
    )


def assert_permutation_invariant(make, jac: np.ndarray, seed: int = 0, atol=1e-5) -> None:
    perm = np.random.default_rng(seed).permutation(jac.shape[0])
    tx = make(jac.shape[0])  # one transformation: both runs share its compiled update
    d, s = run(tx, jac)
    d_p, s_p = run(tx, jac[perm])
    scale = np.linalg.norm(np.asarray(d)) + 1.0
    np.testing.assert_allclose(np.asarray(d_p), np.asarray(d), atol=atol * scale)
    w, w_p = np.asarray(s.weights), np.asarray(s_p.weights)
    np.testing.assert_allclose(w_p, w[perm], atol=atol * (np.abs(w).max() + 1.0))


def train_two_tasks_with_adam(tx_balance, steps: int = 60) -> tuple[float, float]:
    """Trains a tiny two-task regression through ``chain(tx_balance, adam)``.

    Returns the summed loss before and after; the caller asserts it went down.
    """
    x = jax.random.normal(jax.random.key(0), (64, 3))
    y = jnp.stack([x[:, 0] + x[:, 1], 3.0 * x[:, 1] - x[:, 2]], axis=1)
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}

    def losses(p):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2, axis=0)

    tx = optax.chain(tx_balance, optax.adam(0.05))
    opt_state = tx.init(params)

    @jax.jit
    def step(p, s):
        l_val = losses(p)
        g = jax.jacrev(losses)(p)
        upd, s = tx.update(g, s, p, task_losses=l_val)
        return optax.apply_updates(p, upd), s, jnp.sum(l_val)

    first = float(jnp.sum(losses(params)))
    loss = first
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
    return first, float(loss)
