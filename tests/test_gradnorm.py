"""GradNorm against a plain NumPy transcription of the paper's Algorithm 1, and its claims."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_balance as ob
from optax_balance._norm import _gradnorm


class NumpyAdam:
    """optax.adam written out (b1=0.9, b2=0.999, eps=1e-8, bias-corrected)."""

    def __init__(self, lr, t):
        self.lr, self.mu, self.nu, self.count = lr, np.zeros(t), np.zeros(t), 0

    def step(self, g):
        self.count += 1
        self.mu = 0.9 * self.mu + 0.1 * g
        self.nu = 0.999 * self.nu + 0.001 * g * g
        mu_hat = self.mu / (1 - 0.9**self.count)
        nu_hat = self.nu / (1 - 0.999**self.count)
        return -self.lr * mu_hat / (np.sqrt(nu_hat) + 1e-8)


class NumpySGD:
    def __init__(self, lr, t):
        self.lr = lr

    def step(self, g):
        return -self.lr * g


class NumpyGradNorm:
    """Chen et al. 2018, Algorithm 1, with this library's documented loss policy."""

    def __init__(self, t, alpha, opt):
        self.t, self.alpha, self.opt = t, alpha, opt
        self.w = np.ones(t)
        self.l0 = np.zeros(t)
        self.has = np.zeros(t, bool)
        self.pre_clip = None

    def step(self, norm_grads, all_grads, losses):
        """norm_grads: per task, the gradient on the norm leaves; all_grads: to combine."""
        losses = np.asarray(losses, np.float64)
        out = sum(wi * np.asarray(g, np.float64) for wi, g in zip(self.w, all_grads))
        for i in range(self.t):
            if not self.has[i] and losses[i] > 0:
                self.l0[i], self.has[i] = losses[i], True
        lt = np.array(
            [max(losses[i], 0.0) / self.l0[i] if self.has[i] else 1.0 for i in range(self.t)]
        )
        r = lt / lt.mean() if lt.mean() > 0 else np.ones(self.t)
        n = np.array([np.sqrt(np.sum(np.asarray(g, np.float64) ** 2)) for g in norm_grads])
        big_g = self.w * n
        target = big_g.mean() * r**self.alpha
        grad = np.sign(big_g - target) * n  # d/dw_i |w_i n_i - target_i|
        w = self.w + self.opt.step(grad)
        self.pre_clip = w.copy()
        w = np.maximum(w, 0.0)
        self.w = self.t * w / w.sum() if w.sum() > 0 else np.ones(self.t)
        return out


def _random_problem(rng, t, steps, scales):
    grads, losses = [], []
    for s in range(steps):
        g = {
            "trunk": rng.normal(size=(t, 4, 3)) * scales[:, None, None],
            "last": rng.normal(size=(t, 3)) * scales[:, None],
            "head": rng.normal(size=(t, 2)),
        }
        grads.append(g)
        # Tasks whose losses fall at different rates.
        losses.append(np.exp(-np.arange(1, t + 1) * 0.05 * s) * (1 + 0.1 * rng.random(t)))
    return grads, losses


@pytest.mark.parametrize(
    "alpha, make_opt, ref_opt",
    [
        (1.5, lambda: None, lambda t: NumpyAdam(1e-2, t)),
        (0.5, lambda: optax.sgd(0.05), lambda t: NumpySGD(0.05, t)),
        (3.0, lambda: optax.adam(0.3), lambda t: NumpyAdam(0.3, t)),
    ],
)
def test_matches_numpy_reference_over_steps(alpha, make_opt, ref_opt):
    t, steps = 3, 14
    rng = np.random.default_rng(1)
    scales = np.array([1.0, 4.0, 0.3])
    grads, losses = _random_problem(rng, t, steps, scales)
    shared = {"trunk": True, "last": True, "head": False}
    norm_mask = {"trunk": False, "last": True, "head": True}  # head is not shared: ignored
    tx = ob.gradnorm(
        t, alpha=alpha, weight_optimizer=make_opt(), shared=shared, norm_mask=norm_mask
    )
    ref = NumpyGradNorm(t, alpha, ref_opt(t))
    params = {"trunk": jnp.zeros((4, 3)), "last": jnp.zeros(3), "head": jnp.zeros(2)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g, loss in zip(grads, losses):
        gj = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), g)
        out, state = update(gj, state, params, task_losses=jnp.asarray(loss, jnp.float32))
        want_trunk = ref.step(
            [g["last"][i] for i in range(t)], [g["trunk"][i] for i in range(t)], loss
        )
        np.testing.assert_allclose(out["trunk"], want_trunk, rtol=2e-4, atol=1e-5)
        np.testing.assert_allclose(out["head"], g["head"].sum(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.weights, ref.w, rtol=2e-4, atol=1e-5)
        np.testing.assert_allclose(jnp.sum(state.weights), t, rtol=1e-6)
    np.testing.assert_allclose(state.initial_losses, losses[0], rtol=1e-6)
    assert bool(jnp.all(state.has_initial_loss))


def test_clip_keeps_weights_nonnegative():
    # sgd(1.0) on norms (5, 0.5): the first step sends w_0 to 1 - 5 < 0 without the clip.
    t = 2
    tx = ob.gradnorm(t, weight_optimizer=optax.sgd(1.0))
    ref = NumpyGradNorm(t, 1.5, NumpySGD(1.0, t))
    state = tx.init(jnp.zeros(2))
    update = jax.jit(tx.update)
    rng = np.random.default_rng(3)
    went_negative = 0
    for s in range(12):
        g = np.array([[3.0, 4.0], [0.3, 0.4]]) * (1 + 0.2 * rng.random((2, 1)))
        loss = np.array([1.0, 2.0]) * np.exp(-np.array([0.1, 0.02]) * s)
        out, state = update(jnp.asarray(g, jnp.float32), state, task_losses=jnp.asarray(loss))
        want = ref.step(list(g), list(g), loss)
        went_negative += int(np.any(ref.pre_clip < 0))
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(state.weights, ref.w, rtol=1e-4, atol=1e-6)
        assert bool(jnp.all(state.weights >= 0))
    assert went_negative >= 3  # the clip was exercised, repeatedly
    assert ref.pre_clip is not None


def test_all_clipped_restarts_from_one():
    # A weight optimizer that sends every weight to -w: all clipped to 0 -> restart at 1.
    flip = optax.stateless(lambda updates, params: -2.0 * params)
    tx = ob.gradnorm(3, weight_optimizer=flip)
    state = tx.init(jnp.zeros(2))
    g = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    _, state = tx.update(g, state, task_losses=jnp.ones(3))
    np.testing.assert_array_equal(state.weights, np.ones(3))


def test_gradient_of_gradnorm_loss_matches_hand_derivation():
    n = jnp.array([5.0, 0.5, 2.0, 0.0])
    rates = jnp.array([1.2, 0.6, 1.4, 0.8])
    for w in [jnp.array([1.0, 1.0, 1.0, 1.0]), jnp.array([0.0, 2.5, 1.5, 0.0])]:
        g = jax.grad(_gradnorm.gradnorm_loss)(w, n, rates, 1.5)
        big_g = np.asarray(w * n, np.float64)
        target = big_g.mean() * np.asarray(rates, np.float64) ** 1.5
        np.testing.assert_allclose(g, np.sign(big_g - target) * np.asarray(n), rtol=1e-6)
    # At w_0 = 0 the norm's one-sided derivative is used: the weight can grow again.
    assert float(g[0]) == -5.0


def test_initial_losses_and_nonpositive_loss_policy():
    t = 3
    tx = ob.gradnorm(t, weight_optimizer=optax.sgd(0.01))
    ref = NumpyGradNorm(t, 1.5, NumpySGD(0.01, t))
    state = tx.init(jnp.zeros(2))
    update = jax.jit(tx.update)
    g = np.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]])
    seq = [
        [0.0, 2.0, -1.0],  # tasks 0 and 2 have no usable L(0) yet
        [0.5, 1.5, -0.5],  # task 0 records L(0) = 0.5
        [0.4, 1.0, 3.0],  # task 2 records L(0) = 3.0
        [-0.1, 0.8, 2.0],  # task 0's loss drops below 0: counts as fully trained
        [0.0, 0.0, 0.0],  # every ratio 0: all r_i = 1
    ] + [[0.3, 0.6, 1.5]] * 6
    for i, loss in enumerate(seq):
        out, state = update(jnp.asarray(g, jnp.float32), state, task_losses=jnp.asarray(loss))
        want = ref.step(list(g), list(g), loss)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.weights, ref.w, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(state.has_initial_loss, ref.has)
        np.testing.assert_allclose(state.initial_losses, ref.l0, rtol=1e-6)
        if i == 0:
            np.testing.assert_array_equal(state.has_initial_loss, [False, True, False])
    np.testing.assert_allclose(state.initial_losses, [0.5, 2.0, 3.0])


def test_inverse_training_rates_closed_form():
    r = _gradnorm.inverse_training_rates(
        jnp.array([1.0, 2.0, -3.0, 5.0]),
        jnp.array([2.0, 1.0, 1.0, 0.0]),
        jnp.array([True, True, True, False]),
    )
    # ratios 0.5, 2, 0 (negative loss), 1 (no L(0)); mean 0.875
    np.testing.assert_allclose(r, np.array([0.5, 2.0, 0.0, 1.0]) / 0.875, rtol=1e-6)


def test_nonfinite_step_keeps_state_and_uses_current_weights():
    tx = ob.gradnorm(2, weight_optimizer=optax.sgd(0.1))
    state = tx.init(jnp.zeros(2))
    g = jnp.array([[3.0, 4.0], [0.0, 1.0]])
    _, state = tx.update(g, state, task_losses=jnp.array([1.0, 1.0]))
    before = state
    for bad_losses, bad_g in [
        (jnp.array([jnp.nan, 1.0]), g),
        (jnp.array([1.0, jnp.inf]), g),
        (jnp.array([1.0, 1.0]), g.at[0, 0].set(jnp.inf)),
    ]:
        out, state = tx.update(bad_g, state, task_losses=bad_losses)
        jax.tree.map(np.testing.assert_array_equal, state, before)
    out, _ = tx.update(g, state, task_losses=jnp.array([jnp.nan, 1.0]))
    np.testing.assert_allclose(out, 0.625 * g[0] + 1.375 * g[1], rtol=1e-6)


def test_first_step_with_nonfinite_loss_records_nothing():
    tx = ob.gradnorm(2)
    state = tx.init(jnp.zeros(2))
    g = jnp.array([[3.0, 4.0], [0.0, 1.0]])
    _, state = tx.update(g, state, task_losses=jnp.array([jnp.nan, 1.0]))
    np.testing.assert_array_equal(state.has_initial_loss, [False, False])
    _, state = tx.update(g, state, task_losses=jnp.array([2.0, 1.0]))
    np.testing.assert_array_equal(state.initial_losses, [2.0, 1.0])


def test_hostile_inputs_stay_finite():
    for t in (1, 3):
        tx = ob.gradnorm(t)
        update = jax.jit(tx.update)
        for scale in (0.0, 1e-10, 1e10):
            state = tx.init(jnp.zeros(4))
            for dtype in (jnp.float32, jnp.bfloat16):
                g = (scale * jnp.tile(jnp.array([[1.0, -2.0, 3.0, 0.5]]), (t, 1))).astype(dtype)
                g = g.at[0].multiply(-1.0)  # opposite rows
                for _ in range(3):
                    out, state = update(g, state, task_losses=jnp.full((t,), scale))
                    assert out.dtype == dtype
                    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
                    assert bool(jnp.all(jnp.isfinite(state.weights)))
                    np.testing.assert_allclose(jnp.sum(state.weights), t, rtol=1e-5)
        if t == 1:
            np.testing.assert_array_equal(state.weights, [1.0])


def test_missing_task_losses_says_how_to_pass_them():
    tx = ob.gradnorm(2)
    state = tx.init(jnp.zeros(2))
    with pytest.raises(ValueError, match="task_losses=losses"):
        tx.update(jnp.ones((2, 2)), state)


@pytest.mark.parametrize(
    "args, kw, name",
    [
        ((0,), {}, "num_tasks"),
        ((2.0,), {}, "num_tasks"),
        ((None,), {}, "num_tasks"),
        ((2,), {"alpha": -0.1}, "alpha"),
        ((2,), {"alpha": float("nan")}, "alpha"),
        ((2,), {"weight_optimizer": 0.01}, "weight_optimizer"),
    ],
)
def test_invalid_hyperparameters(args, kw, name):
    with pytest.raises(ValueError, match=name):
        ob.gradnorm(*args, **kw)


def test_wrong_task_count_is_rejected():
    tx = ob.gradnorm(3)
    with pytest.raises(ValueError, match="num_tasks=3"):
        tx.update(jnp.ones((2, 4)), tx.init(jnp.zeros(4)), task_losses=jnp.ones(2))


def test_inject_hyperparams_alpha_matches_constant():
    g = jnp.array([[3.0, 4.0], [0.0, 1.0]])
    tx_a = ob.gradnorm(2, alpha=0.7, weight_optimizer=optax.sgd(0.1))
    tx_b = optax.inject_hyperparams(ob.gradnorm, static_args=("num_tasks", "weight_optimizer"))(
        num_tasks=2, alpha=0.7, weight_optimizer=optax.sgd(0.1)
    )
    sa, sb = tx_a.init(jnp.zeros(2)), tx_b.init(jnp.zeros(2))
    for loss in ([1.0, 1.0], [0.5, 0.9], [0.2, 0.8]):
        oa, sa = tx_a.update(g, sa, task_losses=jnp.array(loss))
        ob_, sb = jax.jit(tx_b.update)(g, sb, task_losses=jnp.array(loss))
        np.testing.assert_allclose(oa, ob_, rtol=1e-6)
        np.testing.assert_allclose(sa.weights, sb.inner_state.weights, rtol=1e-6)


# --------------------------------------------------------------------------------------
# The paper's synthetic problem (Sec. 4): f_i(x) = sigma_i tanh((B + eps_i) x).
# --------------------------------------------------------------------------------------

SIGMAS = (1.0, 3.0, 10.0)


def _toy(seed=0, din=10, dout=5, hidden=32, n=128):
    t = len(SIGMAS)
    sig = jnp.asarray(SIGMAS)
    k = jax.random.split(jax.random.key(seed), 4)
    b = jax.random.normal(k[0], (dout, din))
    eps = 0.35 * jax.random.normal(k[1], (t, dout, din))  # eps_i / B spread as in the paper
    x = jax.random.normal(k[2], (n, din)) / np.sqrt(din)
    y = sig[:, None, None] * jnp.tanh(jnp.einsum("tod,nd->tno", b + eps, x))
    kp = jax.random.split(k[3], 3)
    params = {
        "l1": jax.random.normal(kp[0], (din, hidden)) / np.sqrt(din),
        "l2": jax.random.normal(kp[1], (hidden, hidden)) / np.sqrt(hidden),
        "heads": jax.random.normal(kp[2], (t, hidden, dout)) / np.sqrt(hidden),
    }

    def losses(p):
        h = jax.nn.relu(jax.nn.relu(x @ p["l1"]) @ p["l2"])
        pred = jnp.einsum("nh,tho->tno", h, p["heads"])
        return jnp.mean((pred - y) ** 2, axis=(1, 2))

    return params, losses


def _train(tx, params, losses, steps):
    def step(carry, _):
        p, s = carry
        ls, g = ob.value_and_task_grads(losses)(p)
        u, s = tx.update(g, s, p, task_losses=ls)
        return (optax.apply_updates(p, u), s), ls

    (p, s), hist = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return hist, s


def test_synthetic_problem_weights_equalise_training_rates():
    t, steps = len(SIGMAS), 300
    params, losses = _toy()
    # Norms on the last shared layer, as in the paper; the whole loss w_i L_i is weighted.
    norm_mask = {"l1": False, "l2": True, "heads": False}
    gradnorm = ob.gradnorm(t, norm_mask=norm_mask)
    plain = ob.balancer([1.0] * t, balance_grads=False)  # sum_i L_i
    run = jax.jit(_train, static_argnums=(0, 2, 3))
    hist_gn, state = run(optax.chain(gradnorm, optax.sgd(1e-2)), params, losses, steps)
    hist_eq, _ = run(optax.chain(plain, optax.sgd(1e-2)), params, losses, steps)
    hist_gn, hist_eq = np.asarray(hist_gn), np.asarray(hist_eq)
    w = np.asarray(ob.task_weights(state))

    def inverse_rates(hist):
        ratio = hist[-1] / hist[0]
        return ratio / ratio.mean()

    r_gn, r_eq = inverse_rates(hist_gn), inverse_rates(hist_eq)
    # With equal weights the large-sigma tasks dominate the trunk and train fastest.
    assert r_eq[0] > 1.0 > r_eq[-1]
    # GradNorm shifts weight from large-sigma tasks (large gradients) to small ones ...
    assert w[0] > 1.0 > w[-1] and np.all(np.diff(w) < 0)
    np.testing.assert_allclose(w.sum(), t, rtol=1e-5)
    assert np.all(w >= 0)
    # ... and the training rates are closer together.
    assert np.ptp(r_gn) < 0.6 * np.ptp(r_eq)
    np.testing.assert_allclose(state[0].initial_losses, hist_gn[0], rtol=1e-6)


def test_inside_flax_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.trunk = nnx.Linear(3, 4, rngs=rngs)
            self.heads = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.heads(jax.nn.relu(self.trunk(x)))

    x = jax.random.normal(jax.random.key(1), (16, 3))
    y = jnp.stack([x[:, 0], 10.0 * x[:, 1]], axis=1)
    model = Model(nnx.Rngs(0))
    tx = optax.chain(ob.gradnorm(2, weight_optimizer=optax.sgd(0.05)), optax.adam(1e-2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def task_losses(params):
        m = nnx.merge(graphdef, params, rest)
        return jnp.mean((m(x) - y) ** 2, axis=0)

    @nnx.jit
    def step(model, optimizer):
        _, params, _ = nnx.split(model, nnx.Param, ...)
        losses, grads = ob.value_and_task_grads(task_losses)(params)
        optimizer.update(model, grads, task_losses=losses)
        return losses

    first = step(model, optimizer)
    for _ in range(30):
        last = step(model, optimizer)
    w = ob.task_weights(optimizer.opt_state)
    assert w.shape == (2,)
    np.testing.assert_allclose(jnp.sum(w), 2.0, rtol=1e-5)
    assert float(w[0]) != 1.0  # the weights were learned
    assert float(jnp.sum(last)) < float(jnp.sum(first))


def test_differentiable_through_update_at_zero_gradients():
    tx = ob.gradnorm(2, weight_optimizer=optax.sgd(0.1))
    state = tx.init(jnp.zeros(3))

    def f(g):
        out, new = tx.update(g, state, task_losses=jnp.array([1.0, 2.0]))
        return jnp.sum(out) + jnp.sum(new.weights * jnp.array([1.0, 3.0]))

    for g in (jnp.zeros((2, 3)), jnp.array([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]])):
        d = jax.grad(f)(g)
        assert bool(jnp.all(jnp.isfinite(d)))
