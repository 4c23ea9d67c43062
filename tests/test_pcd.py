"""PCD: torchjd 0.18's behaviour transcribed to NumPy, golden values, KKT, SciPy's primal.

The reference transcribes torchjd's ``PCDWeighting`` and its ``_solve_qp``
(``src/torchjd/aggregation/_pcd.py``, SimplexLab/TorchJD at commit
9090bb637ba1c8e5655f979c78ed345f7bcb337c, torchjd 0.18; found in the code index, the
local torchjd mirror stops at 0.17.0): the EMA of squared norms with bias correction, the
Goldfarb-Idnani dual active set with its float64 tolerances, the rescaling to ``||g_1||``.
The golden values are torchjd's own tests (``tests/unit/aggregation/test_pcd.py``, same
commit) and the paper's closed form for two tasks (Corollary 4.6).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import optimize

import optax_balance as ob
from tests import checks

F32_PRECISION = 10 * np.finfo(np.float32).eps  # torchjd: 10 eps of the Gramian's dtype


def _gi_qp(gram, taus, tol=1e-9, dependence_tol=1e-9, max_iters=None):
    """torchjd's ``_solve_qp``: weights [1, mu] of ``min ||d - g1||^2/2`` s.t. the
    constraints, by Goldfarb & Idnani's dual method; [1, 0, ...] when infeasible."""
    m = gram.shape[0]
    w = np.zeros(m)
    w[0] = 1.0
    if m == 1:
        return w, True
    max_iters = 10 * m if max_iters is None else max_iters
    gs = gram[1:, 1:]
    b = taus * np.diag(gs) - gram[1:, 0]
    mu = np.zeros(m - 1)
    atol = tol * max(np.diag(gram).max(), np.finfo(float).tiny)
    active: list[int] = []
    it = 0
    while it < max_iters:
        slacks = gs @ mu - b
        slacks[active] = 0.0
        p = int(np.argmin(slacks))
        if slacks[p] >= -atol:
            break
        slack_p = slacks[p]
        while it < max_iters:
            it += 1
            if active:
                r = np.linalg.solve(gs[np.ix_(active, active)], gs[active, p])
                z = gs[p, p] - gs[p, active] @ r
                ratios = np.where(r > 0, mu[active] / np.where(r > 0, r, 1.0), np.inf)
                k = int(np.argmin(ratios))
                partial = ratios[k]
            else:
                r, z, k, partial = np.zeros(0), gs[p, p], -1, np.inf
            full = -slack_p / z if z > dependence_tol * gs[p, p] else np.inf
            step = min(partial, full)
            if step == np.inf:
                return w, False
            mu[active] -= step * r
            mu[p] += step
            if full <= partial:
                active.append(p)
                break
            mu[active[k]] = 0.0
            del active[k]
            slack_p = gs[p] @ mu - b[p]
    w[1:] = np.maximum(mu, 0.0)
    return w, True


class TorchjdPCD:
    """torchjd's stateful ``PCDWeighting``, in float64: ``weights = self(J)``."""

    def __init__(self, tau=0.02, beta=0.999, eps=1e-8):
        self.tau, self.beta, self.eps = tau, beta, eps
        self.ema, self.n = None, 0
        self.feasible = True

    def __call__(self, jac):
        gram = jac @ jac.T
        m = len(gram)
        taus = np.broadcast_to(np.asarray(self.tau, float), (m - 1,))
        sq = np.diag(gram)
        self.ema = np.zeros(m) if self.ema is None else self.ema
        self.n += 1
        self.ema = self.beta * self.ema + (1 - self.beta) * sq
        den = np.sqrt(self.ema / (1 - self.beta**self.n) + self.eps)
        s = np.where(den > 0, 1.0 / np.where(den > 0, den, 1.0), 0.0)
        out = np.zeros(m)
        if sq[0] > 0:
            norm_gram = gram * np.outer(s, s)
            w, self.feasible = _gi_qp(norm_gram, taus, dependence_tol=max(1e-9, F32_PRECISION))
            d_sq = w @ norm_gram @ w
            size = (np.abs(w) @ np.sqrt(np.diag(norm_gram))) ** 2
            if d_sq > F32_PRECISION * size:
                out = w * s * np.sqrt(sq[0] / d_sq)
        return out


def two_task_closed_form(jac, tau, scales):
    """Corollary 4.6: ``d~ = g1~ + max(0, (tau |g2~|^2 - g1~.g2~) / |g2~|^2) g2~``."""
    g1, g2 = jac[0] * scales[0], jac[1] * scales[1]
    mu = max(0.0, (tau * (g2 @ g2) - g1 @ g2) / (g2 @ g2)) if g2 @ g2 > 0 else 0.0
    d = g1 + mu * g2
    if np.linalg.norm(d) <= 1e-6 * (np.linalg.norm(g1) + mu * np.linalg.norm(g2)):
        return np.zeros_like(jac[0])
    return d * np.linalg.norm(jac[0]) / np.linalg.norm(d)


def scipy_primal(g, tau):
    """``argmin_d ||d - g_1||^2 / 2`` s.t. ``g_j . d >= tau ||g_j||^2`` by SLSQP (rows ``g``)."""
    res = optimize.minimize(
        lambda x: 0.5 * np.sum((x - g[0]) ** 2),
        g[0],
        jac=lambda x: x - g[0],
        constraints=[
            {
                "type": "ineq",
                "fun": lambda x: g[1:] @ x - tau * np.sum(g[1:] ** 2, axis=1),
                "jac": lambda x: g[1:],
            }
        ],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 500},
    )
    return res.x


def rand(rng, t, n=10, spread=1.0):
    jac = rng.normal(size=(t, n)) * 10 ** rng.uniform(-spread, spread, size=(t, 1))
    return jac.astype(np.float32).astype(np.float64)  # exactly what the library sees


@functools.cache
def _injected(t, n, beta=0.999):
    """``(init, update)`` of ``ob.pcd`` with a per-task ``tau`` traced (one compile per
    shape for every tau): ``update(jac, state) -> (d, state)``."""
    tx = optax.inject_hyperparams(ob.pcd, static_args=("beta",))(tau=np.zeros(t - 1), beta=beta)

    def init(tau):
        s = tx.init(jnp.zeros(n))
        return s._replace(hyperparams={**s.hyperparams, "tau": jnp.asarray(tau, jnp.float32)})

    update = jax.jit(tx.update)
    return init, lambda jac, s: update(jnp.asarray(jac, jnp.float32), s)


@pytest.mark.parametrize("t", [2, 3, 8, 16])
def test_matches_torchjd_over_steps(t):
    """Twelve steps of state (EMA, bias correction), scalar and per-task tau."""
    rng = np.random.default_rng(t)
    init, update = _injected(t, 24, beta=0.9)
    for tau in (0.0, 0.3, list(np.linspace(0.05, 1.0, t - 1))):
        state = init(np.broadcast_to(tau, (t - 1,)))
        reference = TorchjdPCD(tau=tau, beta=0.9)
        for _ in range(12):
            jac = rand(rng, t, 24, spread=2.0)
            d, full = update(jac, state)
            state, inner = full, full.inner_state
            want = reference(jac)
            scale = np.linalg.norm(jac[0])
            np.testing.assert_allclose(np.asarray(d), want @ jac, atol=1e-5 * scale, rtol=0)
            np.testing.assert_allclose(np.asarray(inner.sq_norm_ema), reference.ema, rtol=1e-5)
            assert bool(inner.feasible) == reference.feasible


def test_golden_values_from_torchjd():
    # The secondary task can only be served by moving against the primary one.
    # d~ = g1~ + 1.02 g2~ cancels to -0.02 g1~, and d is rescaled to ||g1|| by
    # sqrt(||g1||^2 / w^T G~ w): that quadratic form sums terms of size 1 + 2.04 + 1.04
    # to 0.0004, so its float32 rounding (a few eps per term) is amplified ~1e4 times:
    # ~1e-3 relative on w^T G~ w, half that on d. (Seen: 7.6e-5 with XLA's classic
    # emitters at -O0, < 1e-5 with its default code generation.)
    d, _ = checks.run(ob.pcd(tau=0.02), [[1.0, 0.0], [-3.0, 0.0]])
    np.testing.assert_allclose(np.asarray(d), [-1.0, 0.0], atol=1e-3)
    # Anti-parallel secondary gradients: infeasible, dropped, the primary gradient.
    j = np.array([[1.0, 1.0], [0.0, 1.0], [0.0, -2.0]])
    d, state = checks.run(ob.pcd(), j)
    np.testing.assert_allclose(np.asarray(d), j[0], rtol=1e-6)
    assert not bool(state.feasible)
    # Constraints already met: the primary gradient.
    j = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    d, state = checks.run(ob.pcd(tau=0.5), j)
    np.testing.assert_allclose(np.asarray(d), j[0], rtol=1e-6)
    assert int(state.iterations) == 0
    # A zero primary gradient gives zero; one task gives itself.
    j = np.random.default_rng(0).normal(size=(3, 5))
    j[0] = 0.0
    np.testing.assert_array_equal(np.asarray(checks.run(ob.pcd(), j)[0]), 0.0)
    j1 = np.random.default_rng(1).normal(size=(1, 5))
    np.testing.assert_allclose(np.asarray(checks.run(ob.pcd(), j1)[0]), j1[0], rtol=1e-6)
    # A zero secondary gradient with eps = 0: its scale is 0, not 1/0.
    j = np.array([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
    np.testing.assert_allclose(np.asarray(checks.run(ob.pcd(eps=0.0), j)[0]), j[0], rtol=1e-6)


def test_two_tasks_match_the_closed_form():
    rng = np.random.default_rng(7)
    init, update = _injected(2, 6)
    for tau in (0.0, 0.02, 0.5, 1.0):
        for scale in (1e-8, 1e-3, 1.0, 1e3, 1e8):
            jac = scale * rand(rng, 2, 6)
            d, _ = update(jac, init([tau]))
            scales = 1.0 / np.sqrt(np.sum(jac**2, axis=1) + 1e-8)
            want = two_task_closed_form(jac, tau, scales)
            np.testing.assert_allclose(np.asarray(d), want, rtol=1e-4, atol=1e-4 * scale)


def test_second_call_uses_the_debiased_moving_average():
    rng = np.random.default_rng(8)
    beta = 0.9
    j1, j2 = rand(rng, 2, 6), 10.0 * rand(rng, 2, 6)
    tx = ob.pcd(tau=0.3, beta=beta, eps=0.0)
    _, state = tx.update(jnp.asarray(j1, jnp.float32), tx.init(jnp.zeros(6)))
    d, _ = tx.update(jnp.asarray(j2, jnp.float32), state)
    ema = beta * (1 - beta) * np.sum(j1**2, 1) + (1 - beta) * np.sum(j2**2, 1)
    scales = 1.0 / np.sqrt(ema / (1 - beta**2))
    np.testing.assert_allclose(np.asarray(d), two_task_closed_form(j2, 0.3, scales), rtol=1e-5)


@pytest.mark.parametrize("t", [3, 8, 16])
def test_kkt_conditions_and_scipy_primal(t):
    """From the weights: mu >= 0, every constraint met, complementary slackness (1e-4);
    and the direction equals SciPy's (SLSQP) solution of the primal QP."""
    rng = np.random.default_rng(20 + t)
    init, update = _injected(t, 30)
    for tau in (0.02, 0.5):
        for _ in range(2):
            jac = rand(rng, t, 30)
            d, state = update(jac, init(np.full(t - 1, tau)))
            state = state.inner_state
            assert bool(state.feasible)
            s = 1.0 / np.sqrt(np.sum(jac**2, axis=1) + 1e-8)  # first step: v = ||g||^2
            g = jac * s[:, None]
            w = np.asarray(state.weights, np.float64) / s
            mu = w[1:] / w[0]
            d_tilde = g[0] + mu @ g[1:]
            slack = g[1:] @ d_tilde - tau * np.sum(g[1:] ** 2, axis=1)
            assert np.all(mu >= 0)
            assert np.all(slack >= -1e-4)
            assert np.all(np.abs(mu * slack) <= 1e-4)
            np.testing.assert_allclose(d_tilde, scipy_primal(g, tau), atol=1e-4)
            np.testing.assert_allclose(
                np.linalg.norm(np.asarray(d)), np.linalg.norm(jac[0]), rtol=1e-5
            )


def test_first_call_is_invariant_to_positive_row_scaling():
    jac = rand(np.random.default_rng(9), 4, 6)
    c = np.array([2.0, 0.1, 30.0, 0.5])
    d, _ = checks.run(ob.pcd(eps=0.0), jac)
    d_c, _ = checks.run(ob.pcd(eps=0.0), c[:, None] * jac)
    np.testing.assert_allclose(np.asarray(d_c), c[0] * np.asarray(d), rtol=1e-4, atol=1e-6)


def test_tau_vector_and_weighting_on_a_gramian():
    jac = rand(np.random.default_rng(10), 4, 6)
    d_vec, _ = checks.run(ob.pcd(tau=[0.3, 0.3, 0.3]), jac)
    d_sca, _ = checks.run(ob.pcd(tau=0.3), jac)
    np.testing.assert_allclose(np.asarray(d_vec), np.asarray(d_sca), rtol=1e-6)
    weights, _ = ob.weightings.pcd(tau=0.3)(jac @ jac.T)
    # Different values per task: each secondary task gets its own share.
    init, update = _injected(4, 6)
    d, state = update(jac, init([0.9, 0.0, 0.5]))
    s = 1.0 / np.sqrt(np.sum(jac**2, axis=1) + 1e-8)
    w = np.asarray(state.inner_state.weights, np.float64) / s
    g = jac * s[:, None]
    slack = g[1:] @ (w @ g / w[0]) - np.array([0.9, 0.0, 0.5]) * np.sum(g[1:] ** 2, axis=1)
    assert np.all(slack >= -1e-4) and np.all(np.abs(w[1:] * slack) <= 1e-4)
    np.testing.assert_allclose(np.asarray(weights) @ jac, np.asarray(d_sca), rtol=1e-5)
    with pytest.raises(ValueError, match="`tau` has 2 entries"):
        ob.weightings.pcd(tau=[0.1, 0.2])(jac @ jac.T)
    with pytest.raises(ValueError, match="built for 3 tasks"):
        ob.pcd(tau=[0.1, 0.2], num_tasks=4)


def test_iterations_at_t8_and_t32():
    """About T active-set iterations (torchjd's bound is 10 (T - 1))."""
    rng = np.random.default_rng(11)
    for t in (8, 32):
        init, update = _injected(t, 64)
        _, state = update(rand(rng, t, 64), init(np.full(t - 1, 0.5)))
        assert 0 < int(state.inner_state.iterations) <= 2 * t


def test_finite_on_hostile_inputs():
    checks.assert_finite_on_hostile(lambda t: ob.pcd())


def test_signature_and_invalid_hyperparameters():
    sig = inspect.signature(ob.pcd)
    assert [sig.parameters[p].default for p in ("tau", "beta", "eps")] == [0.02, 0.999, 1e-8]
    for p in ("tau", "beta", "eps", "shared", "axis_name", "sync", "num_tasks"):
        assert sig.parameters[p].kind == inspect.Parameter.KEYWORD_ONLY
    for tau in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="`tau`"):
            ob.pcd(tau=tau)
        with pytest.raises(ValueError, match="`tau`"):
            ob.pcd(tau=[0.1, tau])
    with pytest.raises(ValueError, match="`tau`"):
        ob.pcd(tau=[[0.1, 0.2]])
    with pytest.raises(ValueError, match=r"`beta` must be in \[0, 1\)"):
        ob.pcd(beta=1.0)
    with pytest.raises(ValueError, match="`eps`"):
        ob.pcd(eps=-1e-9)
