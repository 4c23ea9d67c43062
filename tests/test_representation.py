"""Tests of ob.value_and_balanced_grad: balancing at the shared representation.

References are independent of the helper: hand-written VJPs with a Python loop over tasks,
closed-form gradients and the EnCodec formula in NumPy, and SciPy's SLSQP for MGDA.
"""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import optimize

import optax_balance as ob
from tests.methods import METHOD_IDS, METHODS

T, B, D_IN, D_Z = 3, 4, 6, 5


# A small two-layer encoder with one linear head per task (heads have parameters).
def _mlp_params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "enc": {
            "w1": jax.random.normal(k1, (D_IN, 8)) / 2.0,
            "w2": jax.random.normal(k2, (8, D_Z)) / 2.0,
        },
        "heads": jax.random.normal(k3, (T, D_Z)),
    }


def _encoder(p, x, y):
    del y
    return jnp.tanh(x @ p["enc"]["w1"]) @ p["enc"]["w2"]  # (B, D_Z)


def _heads(p, z, x, y):
    del x
    pred = z @ p["heads"].T  # (B, T)
    scales = jnp.array([1e-2, 1.0, 1e2])  # very different loss scales
    return scales * jnp.mean((pred - y) ** 2, axis=0)


def _data(key):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (B, D_IN)), jax.random.normal(ky, (B, T))


def _by_hand(params, x, y, coeffs):
    """VJP_encoder(sum_i c_i dL_i/dz) + d(sum_i L_i)/d(heads), with a loop over tasks."""
    z, enc_vjp = jax.vjp(
        lambda e: _encoder({"enc": e, "heads": params["heads"]}, x, y), params["enc"]
    )
    d = jnp.zeros_like(z)
    for i in range(T):
        dz_i = jax.grad(lambda zz, i=i: _heads(params, zz, x, y)[i])(z)
        d = d + coeffs[i] * dz_i
    (enc_grad,) = enc_vjp(d)
    head_grad = jax.grad(lambda h: jnp.sum(_heads({"heads": h}, z, x, y)))(params["heads"])
    return {"enc": enc_grad, "heads": head_grad}


def _assert_tree_close(a, b, rtol=1e-5):
    """Leaf by leaf, to ``rtol`` of the leaf's largest entry (f32 sums of mixed scales)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        np.testing.assert_allclose(u, v, rtol=rtol, atol=rtol * max(np.max(np.abs(v)), 1e-30))


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: ob.balancer([0.5, 2.0, 3.0], balance_grads=False),
        lambda: ob.balancer([1.0, 2.0, 3.0], per_batch_item=True),
        lambda: ob.mgda(),
    ],
    ids=["fixed_weights", "balancer_per_item", "mgda"],
)
def test_grad_equals_encoder_vjp_of_weighted_rep_grads(make_tx):
    tx = make_tx()
    params = _mlp_params(jax.random.key(0))
    x, y = _data(jax.random.key(1))
    fn = jax.jit(ob.value_and_balanced_grad(_encoder, _heads, tx))
    state = tx.init(jax.eval_shape(_encoder, params, x, y))
    for _ in range(3):  # several steps: the EMA state is threaded through
        losses, grads, state = fn(params, state, x, y)
        # Every method here combines as sum_i w_i g_i with w = state.weights.
        expected = _by_hand(params, x, y, np.asarray(state.weights))
        _assert_tree_close(grads, expected)
        np.testing.assert_allclose(losses, _heads(params, _encoder(params, x, y), x, y), rtol=1e-6)
        params = jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)


def test_fixed_weights_are_the_given_coefficients():
    coeffs = np.array([0.5, 2.0, 3.0])
    tx = ob.balancer(coeffs.tolist(), balance_grads=False)
    params = _mlp_params(jax.random.key(2))
    x, y = _data(jax.random.key(3))
    _, grads, _ = ob.value_and_balanced_grad(_encoder, _heads, tx)(params, tx.init(None), x, y)
    _assert_tree_close(grads, _by_hand(params, x, y, coeffs))


# ----------------------------------------------------------------------------------------
# The EnCodec balancer in this mode against a NumPy reference, over several steps.
# Linear encoder z = x @ W, losses L_i = a_i * mean_b ||z_b - Y_i[b]||^2, so
# dL_i/dz_b = 2 a_i (z_b - Y_i[b]) / B and dW = x^T d: all in closed form.
# ----------------------------------------------------------------------------------------


def _lin_encoder(w, x, targets):
    del targets
    return x @ w


def _lin_heads(w, z, x, targets, scales):
    del w, x
    return scales * jnp.mean(jnp.sum((z[None] - targets) ** 2, axis=-1), axis=1)


def test_balancer_per_batch_item_matches_numpy_encodec_formula():
    rng = np.random.default_rng(0)
    scales = np.array([1e-3, 1.0, 1e3])
    weights = np.array([1.0, 2.0, 5.0])
    decay, total_norm, eps, lr = 0.8, 2.0, 1e-12, 1e-3
    w0 = rng.normal(size=(D_IN, D_Z))
    xs = rng.normal(size=(5, B, D_IN))
    ys = rng.normal(size=(5, T, B, D_Z))

    tx = ob.balancer(
        weights.tolist(), per_batch_item=True, ema_decay=decay, total_norm=total_norm, epsilon=eps
    )
    heads = lambda w, z, x, t: _lin_heads(w, z, x, t, jnp.asarray(scales, jnp.float32))
    fn = jax.jit(ob.value_and_balanced_grad(_lin_encoder, heads, tx))
    state = tx.init(None)
    w_jax = jnp.asarray(w0, jnp.float32)

    w_np, ema_total, ema_fix = w0.copy(), np.zeros(T), 0.0
    for step in range(5):
        x, tgt = xs[step], ys[step]
        losses, grad, state = fn(
            w_jax, state, jnp.asarray(x, jnp.float32), jnp.asarray(tgt, jnp.float32)
        )

        z = x @ w_np
        dz = 2.0 * scales[:, None, None] * (z[None] - tgt) / B  # (T, B, D_Z)
        norm = np.mean(np.sqrt(np.sum(dz**2, axis=2)), axis=1)  # mean of per-item norms
        ema_total = decay * ema_total + norm
        ema_fix = decay * ema_fix + 1.0
        avg = ema_total / ema_fix
        scale = total_norm * weights / weights.sum() / (eps + avg)
        d = np.tensordot(scale, dz, axes=1)
        grad_np = x.T @ d

        np.testing.assert_allclose(
            losses, scales * np.mean(np.sum((z - tgt) ** 2, -1), 1), rtol=1e-4
        )
        np.testing.assert_allclose(state.weights, scale, rtol=1e-4)
        np.testing.assert_allclose(state.ratios, avg / avg.sum(), rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(grad, grad_np, rtol=1e-4, atol=1e-6)
        w_jax = w_jax - lr * grad
        w_np = w_np - lr * grad_np


# ----------------------------------------------------------------------------------------
# MGDA-UB: the weights are MGDA's on the Gramian of the stacked dL_i/dz.
# ----------------------------------------------------------------------------------------


def _slsqp_min_norm(gram):
    t = gram.shape[0]
    res = optimize.minimize(
        lambda a: a @ gram @ a,
        np.full(t, 1.0 / t),
        jac=lambda a: 2.0 * gram @ a,
        bounds=[(0.0, 1.0)] * t,
        constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1.0}],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert res.success
    return res.x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mgda_ub_weights_are_min_norm_on_representation_gramian(seed):
    rng = np.random.default_rng(seed)
    scales = np.array([1.0, 3.0, 0.5])
    w = rng.normal(size=(D_IN, D_Z))
    x = rng.normal(size=(B, D_IN))
    tgt = rng.normal(size=(T, B, D_Z))
    if seed == 2:  # task 2's target close to task 1's: a weight should hit zero
        tgt[2] = tgt[1] + 0.05 * rng.normal(size=(B, D_Z))

    tx = ob.mgda()
    heads = lambda w_, z, x_, t_: _lin_heads(w_, z, x_, t_, jnp.asarray(scales, jnp.float32))
    fn = jax.jit(ob.value_and_balanced_grad(_lin_encoder, heads, tx))
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    _, grad, state = fn(f32(w), tx.init(None), f32(x), f32(tgt))

    dz = 2.0 * scales[:, None, None] * ((x @ w)[None] - tgt) / B
    flat = dz.reshape(T, -1)
    gram = flat @ flat.T
    alpha = _slsqp_min_norm(gram)
    np.testing.assert_allclose(state.weights, alpha, atol=2e-3)
    # Same objective value (the min-norm point is unique even where weights are not).
    a = np.asarray(state.weights, np.float64)
    np.testing.assert_allclose(a @ gram @ a, alpha @ gram @ alpha, rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(grad, x.T @ np.tensordot(a, dz, axes=1), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Every method of the library: the helper equals the pipeline written out by hand
# (rep grads from jax.jacrev, tx.update on them, encoder VJP, heads' summed gradient).
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS, ids=METHOD_IDS)
def test_every_method_matches_hand_pipeline(method):
    tx = method.make(T)
    if method.two_batches:  # one batch has no second one to give
        with pytest.raises(ValueError, match="second, independent mini-batch"):
            ob.value_and_balanced_grad(_encoder, _heads, tx)
        return
    params = _mlp_params(jax.random.key(4))
    x, y = _data(jax.random.key(5))
    state0 = tx.init(jax.eval_shape(_encoder, params, x, y))
    losses, grads, state = jax.jit(ob.value_and_balanced_grad(_encoder, _heads, tx))(
        params, state0, x, y
    )

    z, enc_vjp = jax.vjp(lambda p: _encoder(p, x, y), params)
    rep = jax.jacrev(lambda zz: _heads(params, zz, x, y))(z)  # (T, B, D_Z)
    combined, state_ref = tx.update(rep, state0, z, task_losses=_heads(params, z, x, y))
    (expected,) = enc_vjp(combined)
    head_grad = jax.grad(lambda p: jnp.sum(_heads(p, z, x, y)))(params)
    expected = jax.tree.map(jnp.add, expected, head_grad)

    _assert_tree_close(grads, expected, rtol=1e-4)
    _assert_tree_close(state, state_ref, rtol=1e-4)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert losses.shape == (T,)


# ----------------------------------------------------------------------------------------
# Per-task heads (heads_in_axes): task i's gradient through head i only.
# ----------------------------------------------------------------------------------------

_SCALES = jnp.array([1e-2, 1.0, 1e2])
_AXES = ({"enc": None, "heads": 0}, None, 1, 0)  # for (params, x, y, scales)


def _one_head(p, z, x, y_t, s_t):
    del x
    return s_t * jnp.mean((z @ p["heads"] - y_t) ** 2)  # p["heads"]: this task's (D_Z,) row


def _one_head_aux(p, z, x, y_t, s_t):
    return _one_head(p, z, x, y_t, s_t), jnp.mean(z @ p["heads"])


def _encoder4(p, x, y, s):
    del s
    return _encoder(p, x, y)


@pytest.mark.parametrize(
    "make_tx",
    [lambda: ob.balancer([1.0, 2.0, 3.0], per_batch_item=True), lambda: ob.mgda()],
    ids=["balancer_per_item", "mgda"],
)
def test_per_task_heads_match_hand_reference(make_tx):
    tx = make_tx()
    params = _mlp_params(jax.random.key(8))
    x, y = _data(jax.random.key(9))
    fn = jax.jit(ob.value_and_balanced_grad(_encoder4, _one_head, tx, heads_in_axes=_AXES))
    state = tx.init(None)
    for _ in range(3):
        losses, grads, state = fn(params, state, x, y, _SCALES)
        _assert_tree_close(grads, _by_hand(params, x, y, np.asarray(state.weights)))
        np.testing.assert_allclose(losses, _heads(params, _encoder(params, x, y), x, y), rtol=1e-5)
        params = jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)


def test_per_task_heads_aux_is_stacked_and_bad_axes_raise():
    params = _mlp_params(jax.random.key(10))
    x, y = _data(jax.random.key(11))
    tx = ob.mgda()
    fn = ob.value_and_balanced_grad(_encoder4, _one_head_aux, tx, has_aux=True, heads_in_axes=_AXES)
    (losses, aux), grads, state = fn(params, tx.init(None), x, y, _SCALES)
    z = _encoder(params, x, y)
    np.testing.assert_allclose(aux, jnp.mean(z @ params["heads"].T, axis=0), rtol=1e-5)
    _assert_tree_close(grads, _by_hand(params, x, y, np.asarray(state.weights)))
    bad = ob.value_and_balanced_grad(_encoder4, _one_head, tx, heads_in_axes=(0, 1))
    with pytest.raises(ValueError, match="heads_in_axes"):
        bad(params, tx.init(None), x, y, _SCALES)


# ----------------------------------------------------------------------------------------
# Structure, aux, T=1, dtypes, threading under scan, errors.
# ----------------------------------------------------------------------------------------


def test_has_aux_pytree_representation_and_tuple_params():
    enc_p, head_p = jnp.array([[1.0, 2.0], [0.5, -1.0]]), jnp.array([2.0, -1.0])
    x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])

    def encoder(p, x):
        h = x @ p[0]
        return {"a": h, "b": jnp.tanh(h)}  # a dict representation, batch-first leaves

    def heads(p, z, x):
        l1 = jnp.mean(z["a"] @ p[1])
        l2 = jnp.mean(z["b"] ** 2)
        return jnp.stack([l1, l2]), {"n": z["a"].shape[0]}

    tx = ob.balancer([1.0, 1.0], per_batch_item=True)
    fn = ob.value_and_balanced_grad(encoder, heads, tx, has_aux=True)
    params = (enc_p, head_p)
    (losses, aux), grads, state = fn(params, tx.init(None), x)
    assert aux == {"n": 3}
    assert jax.tree.structure(grads) == jax.tree.structure(params)

    # By hand: per-item norms over both leaves of the representation.
    z, vjp = jax.vjp(lambda e: encoder((e, head_p), x), enc_p)
    g1 = jax.grad(lambda zz: heads(params, zz, x)[0][0])(z)
    g2 = jax.grad(lambda zz: heads(params, zz, x)[0][1])(z)
    item = lambda g: np.mean(np.sqrt(np.sum(g["a"] ** 2, 1) + np.sum(g["b"] ** 2, 1)))
    c = 0.5 / np.array([item(g1), item(g2)])
    (enc_grad,) = vjp(jax.tree.map(lambda a, b: c[0] * a + c[1] * b, g1, g2))
    np.testing.assert_allclose(state.weights, c, rtol=1e-5)
    np.testing.assert_allclose(grads[0], enc_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grads[1], jnp.mean(z["a"], axis=0), rtol=1e-6)


def test_single_task_and_zero_gradient_are_finite():
    def heads(w, z, x):
        del w, x
        return jnp.sum(0.0 * z)[None]  # T=1, dL/dz = 0

    tx = ob.balancer([1.0], per_batch_item=True)
    w = jnp.ones((3, 2))
    losses, grad, state = ob.value_and_balanced_grad(lambda w, x: x @ w, heads, tx)(
        w, tx.init(None), jnp.ones((4, 3))
    )
    assert losses.shape == (1,)
    assert np.all(np.isfinite(grad)) and np.all(np.isfinite(state.weights))
    np.testing.assert_array_equal(grad, 0.0)


def test_bf16_params_keep_dtype_and_integer_leaves_are_skipped():
    params = {
        "w": jnp.ones((3, 2), jnp.bfloat16),
        "step": jnp.array(3, jnp.int32),
        "h": jnp.array([1.0, 1e4], jnp.bfloat16),
    }

    def encoder(p, x):
        return x.astype(jnp.bfloat16) @ p["w"]

    def heads(p, z, x):
        del x
        return (p["h"] * jnp.mean(z.astype(jnp.float32) ** 2, axis=0).astype(jnp.bfloat16)).astype(
            jnp.float32
        )

    tx = ob.mgda()
    fn = jax.jit(ob.value_and_balanced_grad(encoder, heads, tx))
    _, grads, state = fn(params, tx.init(None), jnp.ones((4, 3)))
    assert grads["w"].dtype == jnp.bfloat16 and grads["h"].dtype == jnp.bfloat16
    assert grads["step"].dtype == jax.dtypes.float0
    assert np.all(np.isfinite(np.asarray(grads["w"], np.float32)))
    assert np.all(np.isfinite(state.weights))


def test_trains_under_scan_with_threaded_state():
    params = _mlp_params(jax.random.key(6))
    x, y = _data(jax.random.key(7))
    tx = ob.mgda(norm_type="l2", num_tasks=T)  # full-shape state from init, for scan
    opt = optax.adam(1e-2)
    fn = ob.value_and_balanced_grad(_encoder, _heads, tx)

    def step(carry, _):
        p, opt_state, tx_state = carry
        losses, g, tx_state = fn(p, tx_state, x, y)
        updates, opt_state = opt.update(g, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state, tx_state), losses

    init = (params, opt.init(params), tx.init(None))
    _, losses = jax.jit(lambda c: jax.lax.scan(step, c, None, length=200))(init)
    assert np.all(np.asarray(losses[-1]) < 0.5 * np.asarray(losses[0]))


def test_non_vector_losses_raise():
    tx = ob.mgda()
    fn = ob.value_and_balanced_grad(lambda w, x: x * w, lambda w, z, x: jnp.sum(z), tx)
    with pytest.raises(ValueError, match="1-D array of per-task losses"):
        fn(jnp.ones(2), tx.init(None), jnp.ones(2))


# ----------------------------------------------------------------------------------------
# The example, in fast mode.
# ----------------------------------------------------------------------------------------


def test_encodec_style_example_fast(capsys):
    path = pathlib.Path(__file__).parent.parent / "examples" / "encodec_style.py"
    spec = importlib.util.spec_from_file_location("encodec_style_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shares, raw = module.main(steps=60, log_every=30)
    target = np.array([0.2, 0.3, 0.5])
    np.testing.assert_allclose(shares, target, atol=0.05)
    assert raw[2] > 0.9  # unbalanced, the spectral loss would take >90% of the gradient
    assert "balanced" in capsys.readouterr().out
