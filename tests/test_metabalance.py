"""MetaBalance against a plain NumPy transcription of the paper's Algorithm 1."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_balance as ob


class NumpyMetaBalance:
    """He et al. 2022, Algorithm 1 (strategies A/B/C), per parameter leaf, in float64."""

    def __init__(self, t, relax_factor=0.7, beta=0.9, main_task=0, strategy="both", eps=1e-12):
        self.t, self.r, self.beta, self.main, self.strategy, self.eps = (
            t,
            relax_factor,
            beta,
            main_task,
            strategy,
            eps,
        )
        self.m = {}

    def _scale(self, m, i):
        mm, mi = m[self.main], m[i]
        if i == self.main or mi == 0:
            return 1.0
        if self.strategy == "reduce" and not mi > mm:
            return 1.0
        if self.strategy == "enlarge" and not mi < mm:
            return 1.0
        return self.r * mm / (mi + self.eps) + (1.0 - self.r)

    def step(self, grads, shared):
        out, scaled_sq, raw_sq = {}, np.zeros(self.t), np.zeros(self.t)
        for name, g in grads.items():
            g = np.asarray(g, np.float64)
            if not shared[name]:
                out[name] = g.sum(0)
                continue
            norms = np.array([np.linalg.norm(g[i]) for i in range(self.t)])
            m = self.beta * self.m.get(name, np.zeros(self.t)) + (1 - self.beta) * norms
            self.m[name] = m
            total = np.zeros(g.shape[1:])
            for i in range(self.t):
                gi = self._scale(m, i) * g[i]
                total += gi
                scaled_sq[i] += np.sum(gi**2)
                raw_sq[i] += np.sum(g[i] ** 2)
            out[name] = total
        # The reported weight: by how much each task's shared gradient norm was scaled.
        weights = np.sqrt(scaled_sq / raw_sq)
        return out, weights


def _grads(rng, t, s):
    # Task scales drift over time so that auxiliaries cross the main task's norm.
    drift = np.array([1.0, 3.0 * np.exp(-0.3 * s), 0.2 + 0.3 * s, 0.05])[:t]
    return {
        "emb": rng.normal(size=(t, 5, 2)) * drift[:, None, None],
        "dense": rng.normal(size=(t, 3)) * drift[::-1, None],
        "head": rng.normal(size=(t, 4)),
    }


@pytest.mark.parametrize("strategy", ["both", "reduce", "enlarge"])
@pytest.mark.parametrize("main_task, beta, relax", [(0, 0.9, 0.7), (2, 0.5, 0.3), (1, 0.0, 0.95)])
def test_matches_numpy_reference_over_steps(strategy, main_task, beta, relax):
    t = 4
    rng = np.random.default_rng(7)
    shared = {"emb": True, "dense": True, "head": False}
    tx = ob.metabalance(
        relax_factor=relax, beta=beta, main_task=main_task, strategy=strategy, shared=shared
    )
    ref = NumpyMetaBalance(t, relax, beta, main_task, strategy)
    params = {"emb": jnp.zeros((5, 2)), "dense": jnp.zeros(3), "head": jnp.zeros(4)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for s in range(12):
        g = _grads(rng, t, s)
        out, state = update(jax.tree.map(jnp.float32, g), state, params)
        want, w = ref.step(g, shared)
        for k in g:
            np.testing.assert_allclose(out[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(state.ema_norms["emb"], ref.m["emb"], rtol=1e-5)
        np.testing.assert_allclose(state.ema_norms["dense"], ref.m["dense"], rtol=1e-5)
        assert state.ema_norms["head"] is None
        np.testing.assert_allclose(state.weights, w, rtol=1e-5)
        assert float(state.weights[main_task]) == 1.0


def test_strategies_scale_the_right_auxiliaries():
    # Main task 0 has norm 2; aux 1 is larger (8), aux 2 smaller (0.5). beta=0: no memory.
    g = jnp.array([[2.0, 0.0], [0.0, 8.0], [0.5, 0.0]])
    r = 0.5
    big = r * 2.0 / 8.0 + (1 - r)  # 0.625
    small = r * 2.0 / 0.5 + (1 - r)  # 2.5
    expect = {"both": [1.0, big, small], "reduce": [1.0, big, 1.0], "enlarge": [1.0, 1.0, small]}
    for strategy, w in expect.items():
        tx = ob.metabalance(relax_factor=r, beta=0.0, strategy=strategy)
        out, state = tx.update(g, tx.init(jnp.zeros(2)))
        np.testing.assert_allclose(state.weights, w, rtol=1e-6)
        np.testing.assert_allclose(out, np.asarray(w) @ np.asarray(g), rtol=1e-6)


def test_aux_norm_moves_toward_main_norm():
    # With beta = 0, ||g_hat_i|| = r ||g_main|| + (1 - r) ||g_i|| on every leaf.
    rng = np.random.default_rng(0)
    g = rng.normal(size=(3, 6)) * np.array([[1.0], [50.0], [0.01]])
    n = np.linalg.norm(g, axis=1)
    for r in (0.0, 0.4, 0.9):
        tx = ob.metabalance(relax_factor=r, beta=0.0)
        _, state = tx.update(jnp.asarray(g, jnp.float32), tx.init(jnp.zeros(6)))
        np.testing.assert_allclose(np.asarray(state.weights) * n, r * n[0] + (1 - r) * n, rtol=1e-5)


def test_zero_gradients_are_safe():
    tx = ob.metabalance(beta=0.9, num_tasks=3)
    update = jax.jit(tx.update)
    state = tx.init({"a": jnp.zeros(2), "b": jnp.zeros(2)})
    # Task 2 never has a gradient on "a"; the main task has none on "b".
    g = {
        "a": jnp.array([[1.0, 1.0], [2.0, 0.0], [0.0, 0.0]]),
        "b": jnp.array([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]]),
    }
    out, state = update(g, state)
    np.testing.assert_allclose(state.ema_norms["a"][2], 0.0)
    # "a": task 2 keeps weight 1 (its EMA is 0); task 1 is scaled by 0.7 * 0.1414 / 0.2 + 0.3.
    w1 = 0.7 * np.sqrt(2.0) / 2.0 + 0.3
    np.testing.assert_allclose(
        out["a"], np.array([1.0, 1.0]) + w1 * np.array([2.0, 0.0]), rtol=1e-5
    )
    # "b": the main task's EMA is 0, so the auxiliaries shrink to (1 - r) g.
    np.testing.assert_allclose(out["b"], 0.3 * np.array([3.0, 5.0]), rtol=1e-5)
    assert bool(jnp.all(jnp.isfinite(state.weights)))
    # All-zero step: output zero, weights finite.
    zero = jax.tree.map(jnp.zeros_like, g)
    out, state = update(zero, tx.init({"a": jnp.zeros(2), "b": jnp.zeros(2)}))
    assert all(bool(jnp.all(v == 0)) for v in jax.tree.leaves(out))
    np.testing.assert_array_equal(state.weights, np.ones(3))


def test_hostile_inputs_stay_finite():
    for t in (1, 3):
        tx = ob.metabalance()
        update = jax.jit(tx.update)
        for scale in (0.0, 1e-10, 1e10):
            for dtype in (jnp.float32, jnp.bfloat16):
                state = tx.init(jnp.zeros(4))
                base = jnp.array([[1.0, -2.0, 3.0, 0.5]]) * jnp.array([[1.0], [-1.0], [1e-3]])[:t]
                g = (scale * base).astype(dtype)
                for _ in range(3):
                    out, state = update(g, state)
                    assert out.dtype == dtype
                    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
                    assert bool(jnp.all(jnp.isfinite(state.weights)))
        np.testing.assert_array_equal(state.weights[0], 1.0)


def test_nonfinite_step_keeps_ema():
    tx = ob.metabalance(beta=0.5)
    g = jnp.array([[3.0, 4.0], [0.0, 10.0]])
    _, state = tx.update(g, tx.init(jnp.zeros(2)))
    before = state
    out, state = tx.update(g.at[1, 0].set(jnp.nan), state)
    jax.tree.map(np.testing.assert_array_equal, state, before)
    assert not bool(jnp.all(jnp.isfinite(out)))  # the bad gradient stays visible downstream


def test_num_tasks_learned_at_first_update_and_main_task_checked():
    tx = ob.metabalance(main_task=2)
    state = tx.init(jnp.zeros(3))
    assert state.weights.shape == (0,)
    _, state = tx.update(jnp.ones((3, 3)), state)
    assert state.weights.shape == (3,) and state.ema_norms.shape == (3,)
    with pytest.raises(ValueError, match="main_task"):
        tx.update(jnp.ones((2, 3)), tx.init(jnp.zeros(3)))


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"relax_factor": 1.0}, "relax_factor"),
        ({"relax_factor": -0.1}, "relax_factor"),
        ({"beta": 1.0}, "beta"),
        ({"beta": -0.5}, "beta"),
        ({"main_task": -1}, "main_task"),
        ({"main_task": 1.5}, "main_task"),
        ({"main_task": 3, "num_tasks": 3}, "main_task"),
        ({"strategy": "shrink"}, "strategy"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"num_tasks": 0}, "num_tasks"),
    ],
)
def test_invalid_hyperparameters(kw, name):
    with pytest.raises(ValueError, match=name):
        ob.metabalance(**kw)


def test_inject_hyperparams_matches_constant():
    rng = np.random.default_rng(2)
    kw = {"relax_factor": 0.6, "beta": 0.8, "epsilon": 1e-9}
    tx_a = ob.metabalance(main_task=1, num_tasks=3, **kw)
    tx_b = optax.inject_hyperparams(ob.metabalance, static_args=("main_task", "num_tasks"))(
        main_task=1, num_tasks=3, **kw
    )
    sa, sb = tx_a.init(jnp.zeros(4)), tx_b.init(jnp.zeros(4))
    for _ in range(3):
        g = jnp.asarray(rng.normal(size=(3, 4)) * np.array([[1.0], [5.0], [0.1]]), jnp.float32)
        oa, sa = tx_a.update(g, sa)
        ob_, sb = jax.jit(tx_b.update)(g, sb)
        np.testing.assert_allclose(oa, ob_, rtol=1e-6)
        np.testing.assert_allclose(sa.ema_norms, sb.inner_state.ema_norms, rtol=1e-6)


def _two_task_problem():
    x = jax.random.normal(jax.random.key(0), (64, 4))
    y = jnp.stack([x[:, 0] - x[:, 1], 100.0 * x[:, 2]], axis=1)  # main, loud auxiliary

    def losses(p, x, y):
        h = jnp.tanh(x @ p["trunk"])
        return jnp.mean((h @ p["heads"].T - y) ** 2, axis=0)

    params = {"trunk": 0.5 * jnp.eye(4), "heads": 0.1 * jnp.ones((2, 4))}
    return params, losses, x, y


def _train(balance, steps=60):
    params, losses, x, y = _two_task_problem()
    tx = optax.chain(balance, optax.adam(3e-2))

    @jax.jit
    def step(p, s):
        ls, g = ob.value_and_task_grads(losses)(p, x, y)
        u, s = tx.update(g, s, p, task_losses=ls)
        return optax.apply_updates(p, u), s, ls

    state = tx.init(params)
    for _ in range(steps):
        params, state, ls = step(params, state)
    return ls, state


def test_jit_chain_with_adam_helps_main_task_against_loud_auxiliary():
    shared = {"trunk": True, "heads": False}
    ls_mb, state = _train(ob.metabalance(shared=shared, num_tasks=2))
    ls_sum, _ = _train(ob.balancer([1.0, 1.0], balance_grads=False, shared=shared))
    # The auxiliary's gradient is ~100x the main task's: MetaBalance shrinks it, so the
    # shared trunk serves the main task better than under the plain sum.
    w = ob.task_weights(state)
    assert float(w[0]) == 1.0 and float(w[1]) < 0.5
    assert float(ls_mb[0]) < 0.95 * float(ls_sum[0])


def test_inside_flax_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.trunk = nnx.Linear(4, 8, rngs=rngs)
            self.heads = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.heads(jnp.tanh(self.trunk(x)))

    _, _, x, y = _two_task_problem()
    model = Model(nnx.Rngs(0))
    tx = optax.chain(ob.metabalance(num_tasks=2), optax.adam(1e-2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def task_losses(params):
        return jnp.mean((nnx.merge(graphdef, params, rest)(x) - y) ** 2, axis=0)

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
    assert w.shape == (2,) and float(w[0]) == 1.0 and float(w[1]) < 1.0
    assert float(last[0]) < float(first[0])


def test_differentiable_through_update_at_zero_gradients():
    tx = ob.metabalance(num_tasks=2)
    state = tx.init(jnp.zeros(3))

    def f(g):
        out, new = tx.update(g, state)
        return jnp.sum(out) + jnp.sum(new.weights)

    for g in (jnp.zeros((2, 3)), jnp.array([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]])):
        assert bool(jnp.all(jnp.isfinite(jax.grad(f)(g))))
