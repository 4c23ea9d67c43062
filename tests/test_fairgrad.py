"""FairGrad: golden values, a transcription of torchjd's SciPy solve, the system's residual.

The reference transcribes torchjd's ``FairGradWeighting.forward``
(``src/torchjd/aggregation/_fairgrad.py``, SimplexLab/TorchJD at commit
862baeda7dc5beef3731f75a23382427ad5db3ef, itself from the official OptMN-Lab code):
``scipy.optimize.least_squares`` on ``G x - x^(-1/alpha)`` from ``1/T`` each, bounded to
``x >= 0``, in float64 (with tight tolerances instead of SciPy's defaults, so the
reference is the solution itself; alpha=0 is the mean).
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
from optax_balance._gramian import _fairgrad
from tests import checks
from tests import qp_reference as ref

J_ISSUE = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


def torchjd_fairgrad_weights(jac: np.ndarray, alpha: float) -> np.ndarray:
    gram = jac @ jac.T
    t = len(gram)
    if alpha == 0:
        return np.full(t, 1.0 / t)
    res = optimize.least_squares(
        lambda x: gram @ x - np.power(x, -1.0 / alpha),
        np.full(t, 1.0 / t),
        bounds=(0, np.inf),
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
        max_nfev=10000,
    )
    return res.x


def relative_residual(jac: np.ndarray, w: np.ndarray, alpha: float) -> float:
    """``max_i |w_i^(1/alpha) (G w)_i - 1|`` in float64: 0 exactly at the solution."""
    w = np.asarray(w, np.float64)
    return float(np.max(np.abs(w ** (1.0 / alpha) * (jac @ jac.T @ w) - 1.0)))


@functools.cache
def _injected(n):
    """``(jac, alpha) -> (d, state)`` from a fresh state, alpha traced: one compile per
    shape for every alpha."""
    tx = optax.inject_hyperparams(ob.fairgrad)(alpha=1.0)
    state0 = tx.init(jnp.zeros(n))

    @jax.jit
    def run(jac, alpha):
        d, s = tx.update(jac, state0._replace(hyperparams={**state0.hyperparams, "alpha": alpha}))
        return d, s.inner_state

    return lambda jac, alpha: run(jnp.asarray(jac, jnp.float32), jnp.float32(alpha))


def test_golden_values():
    # alpha = 1 is the Nash bargaining system: by hand, G = [[18, -22], [-22, 38]],
    # w_1 (G w)_1 = w_2 (G w)_2 = 1 gives (w_2 / w_1)^2 = 18/38 and
    # w_1^2 (18 - 22 sqrt(18/38)) = 1.
    d, state = checks.run(ob.fairgrad(alpha=1.0), J_ISSUE)
    w1 = 1.0 / np.sqrt(18.0 - 22.0 * np.sqrt(18.0 / 38.0))
    np.testing.assert_allclose(np.asarray(state.weights), [w1, w1 * np.sqrt(18 / 38)], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(d), [w1, w1 * np.sqrt(18 / 38)] @ J_ISSUE, rtol=1e-5)
    # Every task's progress is the inverse of its weight.
    np.testing.assert_allclose(J_ISSUE @ np.asarray(d) * np.asarray(state.weights), 1.0, rtol=1e-5)


@pytest.mark.parametrize("t", [2, 5, 16])
def test_matches_torchjd_scipy_reference(t):
    rng = np.random.default_rng(t)
    update = _injected(24)
    for alpha in (0.5, 1.0, 2.0):
        for scale in (1e-3, 1.0, 1e3):
            jac = scale * ref.random_jacobian(rng, t, 24)
            d, state = update(jac, alpha)
            want = torchjd_fairgrad_weights(jac, alpha)
            assert relative_residual(jac, want, alpha) < 1e-7, "reference did not converge"
            np.testing.assert_allclose(np.asarray(state.weights), want, rtol=1e-4)
            np.testing.assert_allclose(np.asarray(d), want @ jac, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("t", [3, 16, 32])
def test_solution_meets_the_system(t):
    """``w > 0`` and ``w_i^(1/alpha) (G w)_i = 1`` to 1e-4 (float64 check of float32 w)."""
    rng = np.random.default_rng(50 + t)
    update = _injected(48)
    for alpha in (0.25, 1.0, 4.0):
        for _ in range(2):
            jac = ref.random_jacobian(rng, t, 48)
            d, state = update(jac, alpha)
            w = np.asarray(state.weights, np.float64)
            assert w.min() > 0
            assert relative_residual(jac, w, alpha) <= 1e-4, (
                alpha,
                relative_residual(jac, w, alpha),
            )
            assert float(state.residual) <= 1e-5
            assert int(state.iterations) <= 30
            # Non-conflicting: g_i . d = w_i^(-1/alpha) > 0.
            assert np.all(jac @ np.asarray(d, np.float64) > 0)


def test_alpha_zero_is_the_mean():
    jac = ref.random_jacobian(np.random.default_rng(1), 4, 6)
    d, state = checks.run(ob.fairgrad(alpha=0.0), jac)
    np.testing.assert_allclose(np.asarray(d), jac.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.weights), 0.25)
    # alpha = 0 given through inject_hyperparams (traced): the same.
    inj = optax.inject_hyperparams(ob.fairgrad, static_args=("num_tasks",))(num_tasks=4)
    s = inj.init(jnp.zeros(6))
    s = s._replace(hyperparams={**s.hyperparams, "alpha": jnp.float32(0.0)})
    d_inj, s_inj = jax.jit(inj.update)(jnp.asarray(jac, jnp.float32), s)
    np.testing.assert_allclose(np.asarray(d_inj), np.asarray(d), rtol=1e-6)
    assert int(s_inj.inner_state.iterations) == 0


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_scaling_law_from_1e_minus_10_to_1e10(alpha):
    """``J -> c J`` gives ``d -> c^((1-alpha)/(1+alpha)) d``: the solve is scale-free."""
    jac = ref.random_jacobian(np.random.default_rng(2), 3, 6)
    update = _injected(6)
    d1, _ = update(jac, alpha)
    for c in (1e-10, 1e-5, 1e5, 1e10):
        d, s = update(c * jac, alpha)
        np.testing.assert_allclose(
            np.asarray(d, np.float64), c ** ((1 - alpha) / (1 + alpha)) * np.asarray(d1), rtol=1e-4
        )
        assert float(s.residual) <= 1e-5


def test_zero_gradient_task_gets_weight_zero_and_the_rest_is_exact():
    jac = ref.random_jacobian(np.random.default_rng(3), 4, 6)
    with_zero = jac.copy()
    with_zero[2] = 0.0
    _, state = _injected(6)(with_zero, 2.0)
    w = np.asarray(state.weights)
    assert w[2] == 0.0
    reduced = np.delete(jac, 2, axis=0)
    np.testing.assert_allclose(np.delete(w, 2), torchjd_fairgrad_weights(reduced, 2.0), rtol=1e-4)


def test_no_solution_stays_finite_and_is_reported():
    """Opposite gradients: no solution (the weights of that pair grow); the output stays
    finite and orthogonal to them, the third task is served."""
    g = ref.random_jacobian(np.random.default_rng(4), 2, 6)
    jac = np.stack([g[0], -g[0], g[1]])
    d, state = _injected(6)(jac, 1.0)
    d = np.asarray(d, np.float64)
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(np.asarray(state.weights)))
    assert abs(g[0] @ d) <= 1e-3 * np.linalg.norm(g[0]) * np.linalg.norm(d)
    assert g[1] @ d > 0


def test_solver_directly_and_max_iters():
    rng = np.random.default_rng(5)
    jac = ref.random_jacobian(rng, 8, 12)
    gram = jac @ jac.T
    gn = gram / gram.diagonal().max()
    w, res, its = _fairgrad.solve_fair(
        jnp.asarray(gn, jnp.float32), jnp.float32(1.5), max_iters=50, tol=1e-5
    )
    assert relative_residual(jac / np.sqrt(gram.diagonal().max()), np.asarray(w), 1.5) <= 1e-4
    assert 0 < int(its) < 50 and float(res) <= 1e-5
    _, state = checks.run(ob.fairgrad(alpha=1.5, max_iters=1), jac)
    assert int(state.iterations) == 1 and float(state.residual) > 1e-5


def test_finite_on_hostile_inputs():
    checks.assert_finite_on_hostile(lambda t: ob.fairgrad(alpha=2.0))


def test_signature_and_invalid_hyperparameters():
    sig = inspect.signature(ob.fairgrad)
    assert sig.parameters["alpha"].default == 1.0
    assert sig.parameters["max_iters"].default is None
    for p in ("alpha", "max_iters", "shared", "axis_name", "sync", "num_tasks"):
        assert sig.parameters[p].kind == inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, inf\)"):
        ob.fairgrad(alpha=-0.5)
    with pytest.raises(ValueError, match="`alpha`"):
        ob.fairgrad(alpha=float("inf"))
    with pytest.raises(ValueError, match="`max_iters` must be a Python int"):
        ob.fairgrad(max_iters=2.5)
    with pytest.raises(ValueError, match=r"`max_iters` must be an integer in \[1, inf\)"):
        ob.fairgrad(max_iters=0)
