"""DB-MTL against a NumPy transcription of LibMTL's ``DB_MTL.backward``, over 12 steps.

Reference: median-research-group/LibMTL, ``LibMTL/weighting/DB_MTL.py`` at commit
4336804847eaa5e0b924b743d76beec7ac3fdc97 (defaults ``DB_beta=0.9``, ``DB_beta_sigma=0``
from ``LibMTL/config.py``). Its ``backward`` differentiates ``log(losses + 1e-8)`` task by
task: the shared parameters' gradients go into ``grad_buffer`` (an average started at
zero, no bias correction) and are rescaled to the largest norm; the task heads (outside
``get_share_params``) keep the summed gradients of the log-losses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_balance as ob

T = 3
SHARED = {"head": False, "trunk": True}


def libmtl_db_mtl(grads, losses, state, beta, beta_sigma):
    """One ``DB_MTL.backward`` on the shared gradients (T, P) of the losses, in float64.

    The gradient of ``log(L + 1e-8)`` is ``g / (L + 1e-8)`` (what the per-task backward
    passes of ``torch.log(losses + 1e-8)`` give).
    """
    step, grad_buffer = state
    step += 1
    batch_grads = grads / (losses + 1e-8)[:, None]
    grad_buffer = batch_grads + (beta / step**beta_sigma) * (grad_buffer - batch_grads)
    u_grad = np.linalg.norm(grad_buffer, axis=-1)
    alpha = u_grad.max() / (u_grad + 1e-8)
    new_grads = sum(alpha[i] * grad_buffer[i] for i in range(T))
    return new_grads, alpha, (step, grad_buffer)


@pytest.mark.parametrize(
    "hyper", [{}, {"beta": 0.5, "beta_sigma": 0.7}, {"beta": 0.0}], ids=["defaults", "decay", "b0"]
)
def test_matches_libmtl_over_twelve_steps(hyper):
    full = {"beta": 0.9, "beta_sigma": 0.0, **hyper}
    tx = ob.db_mtl(**hyper, shared=SHARED, num_tasks=T)
    params = {"head": jnp.zeros((T, 2)), "trunk": jnp.zeros((6, 5))}
    update = jax.jit(lambda g, s, losses: tx.update(g, s, params, task_losses=losses))
    state = tx.init(params)
    ref = (0, np.zeros((T, 30)))
    rng = np.random.default_rng(3)
    worst = 0.0
    for _ in range(12):
        j = rng.normal(size=(T, 30)) * np.array([[1.0], [30.0], [0.03]])
        head = rng.normal(size=(T, T, 2))
        # Losses on very different scales: what the log transform is for.
        losses = np.exp(rng.uniform(-4.0, 4.0, size=T))
        g = {"head": jnp.asarray(head, jnp.float32), "trunk": jnp.asarray(j.reshape(T, 6, 5))}
        d, state = update(g, state, jnp.asarray(losses, jnp.float32))
        l32 = losses.astype(np.float32).astype(np.float64)
        want, alpha, ref = libmtl_db_mtl(j.astype(np.float32).astype(np.float64), l32, ref, **full)
        got = np.asarray(d["trunk"], np.float64).ravel()
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
        np.testing.assert_allclose(np.asarray(state.weights), alpha, rtol=2e-5)
        est = np.asarray(state.estimates["trunk"]).reshape(T, -1)
        np.testing.assert_allclose(est, ref[1], rtol=0, atol=2e-6 * np.abs(ref[1]).max())
        # Heads: the summed log-loss gradients, g_i / (L_i + 1e-8).
        want_head = np.einsum("t,tij->ij", 1.0 / (l32 + 1e-8), head)
        np.testing.assert_allclose(np.asarray(d["head"]), want_head, rtol=2e-5, atol=1e-6)
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    assert worst < 2e-5


def test_loss_below_minus_eps_is_a_nonfinite_step():
    tx = ob.db_mtl(num_tasks=2)
    p = jnp.zeros(3)
    j = jnp.array([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
    d1, s1 = tx.update(j, tx.init(p), p, task_losses=jnp.array([1.0, 2.0]))
    d2, s2 = tx.update(j, s1, p, task_losses=jnp.array([1.0, -0.5]))  # log(-0.5) undefined
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(s1)))
    np.testing.assert_allclose(np.asarray(d2), np.asarray(s1.weights) @ np.asarray(j), rtol=1e-6)
    # A zero loss is fine: log(0 + 1e-8) is defined.
    d3, s3 = tx.update(j, s1, p, task_losses=jnp.array([0.0, 1.0]))
    assert np.all(np.isfinite(np.asarray(d3))) and int(s3.step) == 2


def test_donated_state_is_updated_in_place():
    t, params = 4, {"w": jnp.zeros((256, 512)), "b": jnp.zeros((512,))}
    tx = ob.db_mtl(num_tasks=t)
    grads = jax.tree.map(lambda p: jnp.zeros((t, *p.shape)), params)
    step = jax.jit(
        lambda g, s: tx.update(g, s, params, task_losses=jnp.ones(t)), donate_argnums=(1,)
    )
    mem = step.lower(grads, tx.init(params)).compile().memory_analysis()
    if mem is None:
        pytest.skip("no memory analysis on this backend")
    stacked = sum(4 * x.size for x in jax.tree.leaves(grads))
    assert mem.alias_size_in_bytes >= stacked
    assert mem.temp_size_in_bytes < 0.5 * stacked, mem.temp_size_in_bytes / stacked


def test_validation_and_mapping():
    for kw, frag in [
        ({"beta": 1.0}, "`beta` must be in [0, 1)"),
        ({"beta": -0.1}, "`beta` must be in [0, 1)"),
        ({"beta_sigma": -1.0}, "`beta_sigma` must be in [0, inf)"),
    ]:
        with pytest.raises(ValueError) as e:
            ob.db_mtl(**kw)
        assert frag in str(e.value)
    with pytest.raises(ValueError, match="use sync='grads'"):
        ob.db_mtl(axis_name="data", sync="stats")
    doc = ob.db_mtl.__doc__ or ""
    assert "``DB_beta``" in doc and "``DB_beta_sigma``" in doc
