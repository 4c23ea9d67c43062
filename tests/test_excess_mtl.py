"""ExcessMTL: torchjd's stateful weighting transcribed to NumPy, over many steps.

The reference transcribes torchjd's ``ExcessMTLWeighting.forward``
(``src/torchjd/aggregation/_excess_mtl.py``, SimplexLab/TorchJD at commit
862baeda7dc5beef3731f75a23382427ad5db3ef, torchjd 0.17-0.18): squared gradients
accumulated per coordinate, the excess risk ``sum g^2 / sqrt(S + 1e-7)``, the warmup and
its baseline, the exponentiated-gradient step (as torchjd 0.18 computes it: a softmax of
the log-weights plus the step, the same number as 0.17's product, without its overflow).
The golden values are torchjd's own tests (``tests/unit/aggregation/test_excess_mtl.py``,
same commit).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_balance as ob
from tests import inputs as I


class TorchjdExcessMTL:
    """torchjd's ``ExcessMTLWeighting`` on a matrix ``J`` (T, n), float64."""

    def __init__(self, robust_step_size=1.0, n_warmup_steps=0):
        self.eta, self.warmup = robust_step_size, n_warmup_steps
        self.weights = self.sq_sum = self.initial = self.warmup_sum = None
        self.n = 0

    def __call__(self, jac):
        m = jac.shape[0]
        if self.sq_sum is None:
            self.sq_sum = np.zeros_like(jac)
            self.warmup_sum = np.zeros(m)
            self.weights = np.full(m, 1.0 / m)
        sq = jac**2
        self.sq_sum = self.sq_sum + sq
        w = (sq / np.sqrt(self.sq_sum + 1e-7)).sum(axis=1)
        if self.n < self.warmup:
            self.warmup_sum = self.warmup_sum + w
            self.n += 1
            return self.weights
        self.n += 1
        if self.initial is None:
            if self.warmup > 0:
                self.initial = self.warmup_sum / self.warmup
                w = w / (self.initial + 1e-7)
            else:
                self.initial = w
        else:
            w = w / (self.initial + 1e-7)
        # torchjd 0.18: softmax(log(weights) + eta w) (0.17: weights * exp(eta w), normalised).
        z = np.log(self.weights) + w * self.eta
        weights = np.exp(z - z.max())
        self.weights = weights / weights.sum()
        return self.weights


def _run(tx, jacs, params=None, **kw):
    """Each ``J`` (T, 8) as the registry's two-leaf tree; returns outputs and states."""
    params = I.params() if params is None else params
    update = jax.jit(lambda g, s: tx.update(g, s, params, **kw))
    state = tx.init(params)
    outs, states = [], []
    for j in jacs:
        d, state = update(I.tree(j), state)
        outs.append(I.flat(d))
        states.append(state)
    return outs, states


@pytest.mark.parametrize("t", [2, 5, 16])
@pytest.mark.parametrize("warmup, eta", [(0, 1.0), (3, 0.3)])
def test_matches_torchjd_over_steps(t, warmup, eta):
    rng = np.random.default_rng(t + warmup)
    # Tasks on different scales, changing from step to step.
    jacs = [
        (rng.normal(size=(t, I.N)) * 10 ** rng.uniform(-1, 1, size=(t, 1))).astype(np.float32)
        for _ in range(12)
    ]
    outs, states = _run(ob.excess_mtl(robust_step_size=eta, n_warmup_steps=warmup), jacs)
    reference = TorchjdExcessMTL(eta, warmup)
    for j, d, state in zip(jacs, outs, states):
        j64 = j.astype(np.float64)
        want = reference(j64)
        np.testing.assert_allclose(np.asarray(state.weights), want, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(d, want @ j64, rtol=1e-5, atol=1e-5)
        # The accumulator is the sum of squares, leaf by leaf.
        np.testing.assert_allclose(I.flat(state.sq_grad_sum), reference.sq_sum, rtol=1e-5)
    assert int(states[-1].step) == 12


def test_golden_two_consecutive_steps():
    # torchjd: weights_1 = [e^2, e] / (e^2 + e); then S = [[5, 0], [5, 0]], E = [1, 4] / sqrt 5,
    # baseline [2, 1]: weights_2 ~ weights_1 * exp([1 / (2 sqrt 5), 4 / sqrt 5]).
    tx = ob.excess_mtl()
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(2))
    _, state = update(jnp.array([[2.0, 0.0], [1.0, 0.0]]), state)
    e2, e1 = np.exp(2.0), np.exp(1.0)
    w1 = np.array([e2, e1]) / (e2 + e1)
    np.testing.assert_allclose(np.asarray(state.weights), w1, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.baseline), [2.0, 1.0], rtol=1e-6)
    _, state = update(jnp.array([[1.0, 0.0], [2.0, 0.0]]), state)
    w2 = w1 * np.exp([1 / (2 * np.sqrt(5)), 4 / np.sqrt(5)])
    np.testing.assert_allclose(np.asarray(state.weights), w2 / w2.sum(), rtol=1e-6)


def test_golden_warmup_baseline_is_the_average():
    j1, j2 = np.array([[2.0, 0.0], [1.0, 0.0]]), np.array([[1.0, 0.0], [2.0, 0.0]])
    tx = ob.excess_mtl(n_warmup_steps=2)
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(2))
    for j in (j1, j2):  # warmup: uniform weights, statistics collected
        d, state = update(jnp.asarray(j, jnp.float32), state)
        np.testing.assert_allclose(np.asarray(state.weights), [0.5, 0.5])
        np.testing.assert_allclose(np.asarray(d), j.mean(0), rtol=1e-6)
    _, state = update(jnp.asarray(j1, jnp.float32), state)
    e_1 = np.array([4 / 2, 1 / 1])  # J1^2 / sqrt(J1^2) (+1e-7)
    e_2 = np.array([1, 4]) / np.sqrt(5)
    baseline = (e_1 + e_2) / 2
    e_3 = np.array([4 / 3, 1 / np.sqrt(6)])  # S = [[9, 0], [6, 0]]
    want = 0.5 * np.exp(e_3 / (baseline + 1e-7))
    np.testing.assert_allclose(np.asarray(state.baseline), baseline, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.weights), want / want.sum(), rtol=1e-6)


def test_weights_change_after_warmup_towards_the_larger_excess():
    tx = ob.excess_mtl(n_warmup_steps=2)
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(2))
    for _ in range(2):
        _, state = update(jnp.array([[1.0, 0.0], [1.0, 0.0]]), state)
    _, state = update(jnp.array([[2.0, 0.0], [1.0, 0.0]]), state)
    assert state.weights[0] > state.weights[1]
    np.testing.assert_allclose(float(jnp.sum(state.weights)), 1.0, rtol=1e-6)


def test_accumulator_only_on_shared_leaves_and_like_the_params():
    tx = ob.excess_mtl(shared={"bias": False, "dense": True})
    state = tx.init(I.params())
    assert state.sq_grad_sum["bias"] is None
    assert state.sq_grad_sum["dense"]["w"].shape == (0, 3, 2)  # placeholder before T is known
    j = I.rand_j(0, 3)
    _, state = tx.update(I.tree(j), state, I.params())
    assert state.sq_grad_sum["dense"]["w"].shape == (3, 3, 2)
    np.testing.assert_allclose(
        np.asarray(state.sq_grad_sum["dense"]["w"]).reshape(3, -1), j[:, 2:] ** 2, rtol=1e-6
    )


def test_large_excess_stays_finite():
    """exp(eta E) overflows float32 for E > 88; the update is a softmax in log space."""
    tx = ob.excess_mtl(num_tasks=3)
    j = np.array([[1e10] * I.N, [1.0] * I.N, [0.0] * I.N], np.float32)
    outs, states = _run(tx, [j, 0.5 * j])
    for s in states:
        w = np.asarray(s.weights)
        assert np.all(np.isfinite(w)) and abs(w.sum() - 1.0) < 1e-6
    np.testing.assert_allclose(np.asarray(states[0].weights), [1.0, 0.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("warmup", [0, 2])
def test_a_squared_gradient_overflow_keeps_the_state(warmup):
    """A finite gradient whose square overflows float32 (3e38^2) makes S infinite. The
    guard does not scan S (``unscanned``): the excess risk, hence the weights (after the
    warmup) or the warmup sum (during it), must turn non-finite and reject the step."""
    tx = ob.excess_mtl(num_tasks=3, n_warmup_steps=warmup)
    rng = np.random.default_rng(3)
    clean = [rng.normal(size=(3, I.N)).astype(np.float32) for _ in range(warmup + 1)]
    big = rng.normal(size=(3, I.N)).astype(np.float32)
    big[0, 3] = 3e38
    for k in range(warmup + 1):  # the overflow in the warmup, then right after it
        _, states = _run(tx, clean[:k] + [big])
        before = states[-2] if k else tx.init(I.params())
        assert all(
            np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(states[-1]), jax.tree.leaves(before))
        ), f"state changed by the overflowing step {k}"


def test_a_weight_below_float32_range_recovers():
    """Step 1 pushes task 1 down by 150 nats (e^-150: 0 in float32); step 2 boosts it by
    1e4. In exact arithmetic (the float64 reference) task 1 then takes over; a float32
    weight that had underflowed to 0 would stay 0 for good. The log-weights keep it."""
    j1 = np.zeros((2, I.N), np.float32)
    j1[:, 0] = [150.0, 0.01]
    j2 = np.zeros((2, I.N), np.float32)
    j2[:, 1] = [1.0, 100.0]
    _, states = _run(ob.excess_mtl(num_tasks=2), [j1, j2])
    reference = TorchjdExcessMTL()
    w1, w2 = reference(j1.astype(np.float64)), reference(j2.astype(np.float64))
    assert w1[1] < 1e-60 and w2[1] > 0.999
    assert float(states[0].weights[1]) == 0.0  # below float32's range ...
    np.testing.assert_allclose(float(states[0].log_weights[1]), np.log(w1[1]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(states[1].weights), w2, atol=1e-6)  # ... and back


def test_stats_sync_is_refused():
    with pytest.raises(ValueError, match="use sync='grads'"):
        ob.excess_mtl(axis_name="data", sync="stats")


def test_signature_and_invalid_hyperparameters():
    sig = inspect.signature(ob.excess_mtl)
    assert sig.parameters["robust_step_size"].default == 1.0
    assert sig.parameters["n_warmup_steps"].default == 0
    for p in ("robust_step_size", "n_warmup_steps", "shared", "axis_name", "sync", "num_tasks"):
        assert sig.parameters[p].kind == inspect.Parameter.KEYWORD_ONLY
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="`robust_step_size`"):
            ob.excess_mtl(robust_step_size=bad)
    with pytest.raises(ValueError, match="`n_warmup_steps` must be a Python int"):
        ob.excess_mtl(n_warmup_steps=1.5)
    with pytest.raises(ValueError, match=r"`n_warmup_steps` must be an integer in \[0, inf\)"):
        ob.excess_mtl(n_warmup_steps=-1)
