"""IMTL (hybrid) against a NumPy transcription of LibMTL's ``IMTL.backward``, over 12 steps.

Reference: median-research-group/LibMTL, ``LibMTL/weighting/IMTL.py`` at commit
4336804847eaa5e0b924b743d76beec7ac3fdc97. Its ``backward`` scales the losses by
``loss_scale.exp()`` and subtracts ``loss_scale`` (IMTL-L), takes the per-task gradients of
the scaled losses, and solves IMTL-G by ``alpha = g_1 U^T (D U^T)^{-1}`` on them. The
per-task backward passes also leave ``exp(s_i) L_i - 1`` in ``loss_scale.grad``, and the
trainer's optimizer (``LibMTL/trainer.py``: ``self.model.parameters()``, which hold
``loss_scale``; ``LibMTL/config.py``: Adam, lr 1e-4, weight_decay 1e-5) steps it. Both
optimizers below are transcribed: plain SGD, and torch's Adam with L2 weight decay (the
default ``weight_optimizer``). Task heads get ``sum_i exp(s_i) g_i``.

One documented departure (``ob.imtl_g``): where LibMTL's normalisation makes the common
projection ``d . u_i`` negative (every loss increases to first order), the weights are
negated; the reference applies it where it occurs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_balance as ob

T = 3
SHARED = {"head": False, "trunk": True}


def libmtl_imtl_g(grads: np.ndarray) -> np.ndarray:
    """LibMTL's IMTL-G on the (scaled) gradients ``grads`` (T, P), in float64."""
    grads_unit = grads / np.linalg.norm(grads, axis=-1, keepdims=True)
    d = grads[0:1].repeat(T - 1, 0) - grads[1:]
    u = grads_unit[0:1].repeat(T - 1, 0) - grads_unit[1:]
    alpha = grads[0] @ u.T @ np.linalg.inv(d @ u.T)
    alpha = np.concatenate([[1.0 - alpha.sum()], alpha])
    if (alpha @ grads) @ grads_unit[0] < 0:  # the documented sign departure
        alpha = -alpha
    return alpha


class TorchAdam:
    """``torch.optim.Adam(lr, weight_decay)``'s step on one tensor (L2 decay in the grad)."""

    def __init__(self, lr, weight_decay, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.wd, self.b1, self.b2, self.eps = lr, weight_decay, b1, b2, eps
        self.m = self.v = 0.0
        self.t = 0

    def step(self, p, grad):
        self.t += 1
        grad = grad + self.wd * p
        self.m = self.b1 * self.m + (1 - self.b1) * grad
        self.v = self.b2 * self.v + (1 - self.b2) * grad * grad
        m_hat = self.m / (1 - self.b1**self.t)
        v_hat = self.v / (1 - self.b2**self.t)
        return p - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


class TorchSGD:
    def __init__(self, lr):
        self.lr = lr

    def step(self, p, grad):
        return p - self.lr * grad


@pytest.mark.parametrize(
    "wopt, torch_opt",
    [(None, lambda: TorchAdam(1e-4, 1e-5)), (optax.sgd(0.3), lambda: TorchSGD(0.3))],
    ids=["libmtl_default_adam", "sgd"],
)
def test_matches_libmtl_over_twelve_steps(wopt, torch_opt):
    tx = ob.imtl(T, weight_optimizer=wopt, shared=SHARED)
    params = {"head": jnp.zeros((T, 2)), "trunk": jnp.zeros((4, 6))}
    update = jax.jit(lambda g, s, losses: tx.update(g, s, params, task_losses=losses))
    state = tx.init(params)
    opt = torch_opt()
    loss_scale = np.zeros(T)
    rng = np.random.default_rng(5)
    worst = 0.0
    for _ in range(12):
        j = rng.normal(size=(T, 24)) * np.array([[1.0], [5.0], [0.2]])
        head = rng.normal(size=(T, T, 2))
        losses = rng.uniform(0.2, 4.0, size=T)
        g = {"head": jnp.asarray(head, jnp.float32), "trunk": jnp.asarray(j.reshape(T, 4, 6))}
        d, state = update(g, state, jnp.asarray(losses, jnp.float32))
        # LibMTL: gradients of exp(s) L - s, IMTL-G on them, then the optimizer step on s.
        j32 = j.astype(np.float32).astype(np.float64)
        l32 = losses.astype(np.float32).astype(np.float64)
        scaled = np.exp(loss_scale)[:, None] * j32
        alpha = libmtl_imtl_g(scaled)
        want = alpha @ scaled
        want_head = np.einsum("t,tij->ij", np.exp(loss_scale), head)
        got = np.asarray(d["trunk"], np.float64).ravel()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
        np.testing.assert_allclose(np.asarray(d["head"]), want_head, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            np.asarray(state.weights), alpha * np.exp(loss_scale), rtol=1e-4, atol=1e-6
        )
        np.testing.assert_allclose(np.asarray(state.loss_scales), np.exp(loss_scale), rtol=1e-6)
        loss_scale = opt.step(loss_scale, np.exp(loss_scale) * l32 - 1.0)
        np.testing.assert_allclose(np.asarray(state.log_scales), loss_scale, rtol=1e-5, atol=1e-7)
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    assert worst < 1e-4


def test_scales_drive_scaled_losses_to_one():
    """IMTL-L's fixed point: e^{s_i} L_i = 1, so s_i -> -log L_i under constant losses."""
    tx = ob.imtl(2, weight_optimizer=optax.sgd(0.2))
    p = jnp.zeros(3)
    j = jnp.array([[1.0, 0.0, 1.0], [0.0, 2.0, 1.0]])
    losses = jnp.array([0.1, 5.0])
    s = tx.init(p)
    update = jax.jit(lambda s: tx.update(j, s, p, task_losses=losses))
    for _ in range(400):
        _, s = update(s)
    np.testing.assert_allclose(np.asarray(s.log_scales), -np.log([0.1, 5.0]), rtol=1e-3)


def test_nonfinite_loss_keeps_scales():
    tx = ob.imtl(2, weight_optimizer=optax.sgd(0.2))
    p = jnp.zeros(3)
    j = jnp.array([[1.0, 0.0, 1.0], [0.0, 2.0, 1.0]])
    _, s1 = tx.update(j, tx.init(p), p, task_losses=jnp.array([1.0, 2.0]))
    d, s2 = tx.update(j, s1, p, task_losses=jnp.array([jnp.nan, 2.0]))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(s1)))
    np.testing.assert_allclose(np.asarray(d), np.asarray(s1.weights) @ np.asarray(j), rtol=1e-6)


def test_validation():
    with pytest.raises(ValueError, match="`num_tasks` is required"):
        ob.imtl(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`weight_optimizer` must be an optax"):
        ob.imtl(2, weight_optimizer="adam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs the per-task losses"):
        tx = ob.imtl(2)
        tx.update(jnp.ones((2, 3)), tx.init(jnp.zeros(3)), jnp.zeros(3))
