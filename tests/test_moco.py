"""MoCo against a NumPy transcription of LibMTL's ``MoCo.backward``, over 12 steps.

Reference: median-research-group/LibMTL, ``LibMTL/weighting/MoCo.py`` at commit
4336804847eaa5e0b924b743d76beec7ac3fdc97 (defaults from ``LibMTL/config.py``). Its
``backward``, transcribed in float64 below, with its departures from the paper's
Algorithm 1 (followed by ``ob.moco``, see its docstring): each shared-parameter gradient
is normalised and scaled by its loss before tracking, ``lambd`` goes through a softmax
instead of a simplex projection, the step sizes are ``beta / step**beta_sigma`` and
``gamma / step**gamma_sigma``. Task heads are outside ``get_share_params`` and get the
plain sum of the task losses' gradients from LibMTL's per-task backward passes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_balance as ob

T = 3
SHARED = {"head": False, "trunk": {"b": True, "w": True}}
SHAPES = {"head": (T, 4), "trunk": {"b": (4,), "w": (5, 4)}}


def _params():
    return jax.tree.map(lambda s: jnp.zeros(s), SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def _split(j_shared: np.ndarray, j_head: np.ndarray) -> dict:
    """Stacked tree from the shared rows (T, 24: bias then kernel) and head (T, T, 4)."""
    return {
        "head": jnp.asarray(j_head, jnp.float32),
        "trunk": {
            "b": jnp.asarray(j_shared[:, :4], jnp.float32),
            "w": jnp.asarray(j_shared[:, 4:].reshape(T, 5, 4), jnp.float32),
        },
    }


def libmtl_moco(grads, losses, state, beta, beta_sigma, gamma, gamma_sigma, rho):
    """One ``MoCo.backward`` on the shared gradients ``grads`` (T, P), in float64."""
    step, y, lambd = state
    step += 1
    grads = grads.copy()
    for tn in range(T):
        grads[tn] = grads[tn] / (np.linalg.norm(grads[tn]) + 1e-8) * losses[tn]
    y = y - (beta / step**beta_sigma) * (y - grads)
    z = lambd - (gamma / step**gamma_sigma) * (y @ y.T + rho * np.eye(T)) @ lambd
    lambd = np.exp(z - z.max()) / np.sum(np.exp(z - z.max()))
    new_grads = y.T @ lambd
    return new_grads, (step, y, lambd)


HYPER = [
    {},  # LibMTL's defaults: beta 0.5, beta_sigma 0.5, gamma 0.1, gamma_sigma 0.5, rho 0
    {"beta": 0.9, "beta_sigma": 0.3, "gamma": 2.0, "gamma_sigma": 0.1, "rho": 0.5},
]


@pytest.mark.parametrize("hyper", HYPER, ids=["defaults", "others"])
def test_matches_libmtl_over_twelve_steps(hyper):
    full = {"beta": 0.5, "beta_sigma": 0.5, "gamma": 0.1, "gamma_sigma": 0.5, "rho": 0.0}
    full.update(hyper)
    tx = ob.moco(**hyper, shared=SHARED, num_tasks=T)
    update = jax.jit(lambda g, s, losses: tx.update(g, s, _params(), task_losses=losses))
    state = tx.init(_params())
    ref = (0, np.zeros((T, 24)), np.full(T, 1.0 / T))
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(12):
        # Conflicting tasks on different scales; losses on different scales too.
        j = rng.normal(size=(T, 24)) * np.array([[1.0], [10.0], [0.1]])
        j[2] -= 0.5 * j[0] / 10.0
        head = rng.normal(size=(T, T, 4))
        losses = rng.uniform(0.1, 3.0, size=T)
        d, state = update(_split(j, head), state, jnp.asarray(losses, jnp.float32))
        want, ref = libmtl_moco(j.astype(np.float32).astype(np.float64), losses, ref, **full)
        got = np.concatenate([np.asarray(d["trunk"]["b"]), np.asarray(d["trunk"]["w"]).ravel()])
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale)
        np.testing.assert_allclose(np.asarray(state.weights), ref[2], rtol=0, atol=2e-6)
        est = state.estimates["trunk"]
        y = np.concatenate([np.asarray(est["b"]), np.asarray(est["w"]).reshape(T, -1)], 1)
        np.testing.assert_allclose(y, ref[1], rtol=0, atol=2e-6 * np.abs(ref[1]).max())
        # Heads: the plain sum of the task gradients.
        np.testing.assert_allclose(np.asarray(d["head"]), head.sum(0), rtol=1e-5, atol=1e-6)
        assert int(state.step) == ref[0] and state.estimates["head"] is None
        worst = max(worst, float(np.abs(got - want).max() / scale))
    assert worst < 2e-5


def test_nonfinite_step_keeps_estimates_and_combines_incoming_gradients():
    tx = ob.moco(num_tasks=T)
    p = jnp.zeros(6)
    rng = np.random.default_rng(1)
    j0 = jnp.asarray(rng.normal(size=(T, 6)), jnp.float32)
    losses = jnp.array([1.0, 2.0, 0.5])
    _, s1 = tx.update(j0, tx.init(p), p, task_losses=losses)
    bad = j0.at[1, 2].set(jnp.inf)
    d, s2 = jax.jit(lambda g, s: tx.update(g, s, p, task_losses=losses))(bad, s1)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(s1)))
    want = np.asarray(s1.weights) @ np.asarray(bad, np.float64)
    np.testing.assert_allclose(np.asarray(d)[[0, 1, 3, 4, 5]], want[[0, 1, 3, 4, 5]], rtol=1e-5)
    assert not np.isfinite(np.asarray(d)[2])
    # A non-finite loss alone: finite output, the previous weights on the raw gradients.
    d, s3 = tx.update(j0, s1, p, task_losses=jnp.array([1.0, jnp.nan, 0.5]))
    np.testing.assert_allclose(np.asarray(d), np.asarray(s1.weights) @ np.asarray(j0), rtol=1e-5)
    assert int(s3.step) == int(s1.step)


def test_donated_state_is_updated_in_place():
    """The estimates are the one T x P buffer of the state: with the state donated, the
    step's temporaries stay below one stacked gradient (they are the P-sized output)."""
    t, params = 4, {"w": jnp.zeros((256, 512)), "b": jnp.zeros((512,))}
    tx = ob.moco(num_tasks=t)
    grads = jax.tree.map(lambda p: jnp.zeros((t, *p.shape)), params)
    state = tx.init(params)
    step = jax.jit(
        lambda g, s: tx.update(g, s, params, task_losses=jnp.ones(t)), donate_argnums=(1,)
    )
    mem = step.lower(grads, state).compile().memory_analysis()
    if mem is None:
        pytest.skip("no memory analysis on this backend")
    stacked = sum(4 * x.size for x in jax.tree.leaves(grads))
    assert mem.alias_size_in_bytes >= stacked  # the estimates are updated in place
    assert mem.temp_size_in_bytes < 0.5 * stacked, mem.temp_size_in_bytes / stacked


def test_validation_and_mapping():
    for kw, frag in [
        ({"beta": 0.0}, "`beta` must be in (0, 1]"),
        ({"beta": 1.5}, "`beta` must be in (0, 1]"),
        ({"beta_sigma": -1.0}, "`beta_sigma`"),
        ({"gamma": -0.1}, "`gamma` must be in [0, inf)"),
        ({"rho": -1.0}, "`rho`"),
    ]:
        with pytest.raises(ValueError) as e:
            ob.moco(**kw)
        assert frag in str(e.value)
    with pytest.raises(ValueError, match="use sync='grads'"):
        ob.moco(axis_name="data", sync="stats")
    with pytest.raises(ValueError, match="needs the per-task losses"):
        tx = ob.moco(num_tasks=2)
        tx.update(jnp.ones((2, 3)), tx.init(jnp.zeros(3)), jnp.zeros(3))
    # The docstring lists LibMTL's names; the defaults are config.py's.
    doc = ob.moco.__doc__ or ""
    for name in ("MoCo_beta", "MoCo_beta_sigma", "MoCo_gamma", "MoCo_gamma_sigma", "MoCo_rho"):
        assert f"``{name}``" in doc
