"""The loss-based methods against plain NumPy references, over 14 steps of state.

Each reference is written here in float64 from the published definition, transcribing
the conventions of torchjd (``src/torchjd/scalarization/_*.py``, commit 862baeda) and
LibMTL (``LibMTL/weighting/*.py``, commit 4336804): UW, IMTL-L and FAMO's learned
parameters step by a hand-written SGD or Adam (torch's ``Adam`` formulas, L2 weight decay
added to the gradient); for the scalarisations (GLS, FAMO's weights, STCH, COSMOS, PBI)
the weights are the gradient of torchjd's forward, by central finite differences in
float64, so the reference never uses the library's closed forms. The library runs its
jitted ``update`` on an ordinary gradient (the one-backward path) with ``task_losses``.

Tolerance (``RTOL``): a step's weights come from at most ~20 float32 elementwise
operations (exp, log, softmax, a sum of T=3 terms) on O(1) values, each with relative
error <= u = 2^-24, so <= 20 u ~ 1.2e-6 per step; through the learned state they are
carried over 14 steps with a gain below 1 per step (the steps are small next to the
parameters), so <= 14 x that, 1.7e-5; finite differences add ~1e-9. RTOL = 3e-5 (and
ATOL = 3e-5 times the scale of the compared values, for entries near 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_balance as ob

T, STEPS = 3, 14
RTOL = 3e-5
_RNG = np.random.default_rng(2024)
LOSSES = _RNG.uniform(0.2, 3.0, size=(STEPS, T)).astype(np.float32)
# FAMO's exact form: each step's batch re-evaluated after its update (a bit lower).
AFTER = (LOSSES * _RNG.uniform(0.6, 1.0, size=(STEPS, T))).astype(np.float32)


def close(got, want, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(np.abs(want).max(initial=0.0), 1e-30)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale, err_msg=what)
    return float(np.max(np.abs(got - want)) / scale)


def run(tx, losses=LOSSES, **extra_seq):
    """The method's states after each of the steps (ordinary gradient, jitted update)."""
    p = jnp.zeros(2)

    @jax.jit
    def step(state, losses, extra):
        return tx.update(p, state, p, task_losses=losses, **extra)[1]

    state, out = tx.init(p), []
    for k, l_k in enumerate(losses):
        extra = {name: seq[k] for name, seq in extra_seq.items() if seq[k] is not None}
        state = step(state, l_k, extra)
        out.append(jax.device_get(state))
    return out


def fd_grad(f, x, h=1e-6):
    """Central finite differences of a scalar function of a float64 vector."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = h * max(1.0, abs(x[i]))
        g[i] = (f(x + e) - f(x - e)) / (2 * e[i])
    return g


def softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


class TorchAdam:
    """``torch.optim.Adam(lr, weight_decay)`` written out (betas 0.9, 0.999; eps 1e-8)."""

    def __init__(self, lr, weight_decay=0.0):
        self.lr, self.wd, self.k, self.m, self.v = lr, weight_decay, 0, 0.0, 0.0

    def step(self, p, g):
        g = g + self.wd * p
        self.k += 1
        self.m = 0.9 * self.m + 0.1 * g
        self.v = 0.999 * self.v + 0.001 * g * g
        denom = np.sqrt(self.v) / np.sqrt(1 - 0.999**self.k) + 1e-8
        return p - self.lr / (1 - 0.9**self.k) * self.m / denom


class SGD:
    def __init__(self, lr):
        self.lr = lr

    def step(self, p, g):
        return p - self.lr * g


# ----------------------------------------------------------------------------------------
# Fixed and random weights.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tx, want",
    [
        (ob.mean(num_tasks=T), np.full(T, 1.0 / T)),
        (ob.sum(num_tasks=T), np.ones(T)),
        (ob.constant([0.5, 2.0, 0.0]), np.array([0.5, 2.0, 0.0])),
    ],
    ids=["mean", "sum", "constant"],
)
def test_linear(tx, want):
    for state in run(tx):
        np.testing.assert_array_equal(state.weights, want.astype(np.float32))


def test_rlw_draws_the_documented_keys():
    """softmax of N(0, 1) draws; key, step_key = split(key) at every update (seed 7)."""
    states = run(ob.rlw(seed=7, num_tasks=T))
    key = jax.random.key(7)
    for state in states:
        key, step_key = jax.random.split(key)
        draws = np.asarray(jax.random.normal(step_key, (T,), jnp.float32), np.float64)
        close(state.weights, softmax(draws))
    # Weights differ from step to step and stay on the simplex.
    w = np.stack([s.weights for s in states])
    assert np.all(w > 0) and np.allclose(w.sum(1), 1.0, atol=1e-6)
    assert np.all(np.ptp(w, axis=0) > 0.05)


# ----------------------------------------------------------------------------------------
# Learned log-variances / log-scales: UW and IMTL-L.
# ----------------------------------------------------------------------------------------


def ref_uw(opt, init):
    """torchjd UW: sum_i 0.5 exp(-s_i) L_i + 0.5 s_i, s stepped on its gradient."""
    s, ws, ss = np.full(T, init), [], []
    for l_k in LOSSES.astype(np.float64):
        w = 0.5 * np.exp(-s)
        grad = fd_grad(lambda s_, l_k=l_k: np.sum(0.5 * np.exp(-s_) * l_k + 0.5 * s_), s)
        s = opt.step(s, grad)
        ws.append(w)
        ss.append(s)
    return ws, ss


def ref_imtl_l(opt, init):
    """torchjd IMTLL: sum_i exp(s_i) L_i - s_i, s stepped on its gradient."""
    s, ws, ss = np.full(T, init), [], []
    for l_k in LOSSES.astype(np.float64):
        w = np.exp(s)
        grad = fd_grad(lambda s_, l_k=l_k: np.sum(np.exp(s_) * l_k - s_), s)
        s = opt.step(s, grad)
        ws.append(w)
        ss.append(s)
    return ws, ss


LEARNED = {
    "uw_sgd": (lambda: ob.uw(T, weight_optimizer=optax.sgd(0.3)), ref_uw, lambda: SGD(0.3), 0.0),
    "uw_libmtl_init": (
        lambda: ob.uw(T, weight_optimizer=optax.sgd(0.3), init=-0.5),
        ref_uw,
        lambda: SGD(0.3),
        -0.5,
    ),
    "uw_adam_default": (lambda: ob.uw(T), ref_uw, lambda: TorchAdam(1e-2), 0.0),
    "imtl_l_sgd": (
        lambda: ob.imtl_l(T, weight_optimizer=optax.sgd(0.1)),
        ref_imtl_l,
        lambda: SGD(0.1),
        0.0,
    ),
    "imtl_l_adam_default": (lambda: ob.imtl_l(T), ref_imtl_l, lambda: TorchAdam(1e-2), 0.0),
}


@pytest.mark.parametrize("case", list(LEARNED))
def test_learned_scales_follow_a_hand_written_optimizer(case):
    make, ref, opt, init = LEARNED[case]
    states = run(make())
    want_w, want_s = ref(opt(), init)
    field = "log_vars" if case.startswith("uw") else "log_scales"
    for k, (state, w, s) in enumerate(zip(states, want_w, want_s)):
        close(state.weights, w, f"weights, step {k}")
        close(getattr(state, field), s, f"{field}, step {k}")
    # The parameters really moved (towards e^s = L for UW, e^-s = L for IMTL-L).
    assert np.abs(want_s[-1] - init).max() > 0.05


# ----------------------------------------------------------------------------------------
# DWA.
# ----------------------------------------------------------------------------------------


class TorchjdDWA:
    """torchjd DWA: weights from the two previous epochs' averages; step() ends an epoch."""

    def __init__(self, temperature):
        self.tau, self.sum, self.n, self.averages = temperature, None, 0, []

    def forward(self, values):
        if len(self.averages) < 2:
            w = np.ones_like(values)
        else:
            rates = self.averages[1] / self.averages[0]
            w = len(values) * softmax(rates / self.tau)
        self.sum = values.copy() if self.sum is None else self.sum + values
        self.n += 1
        return w

    def step(self):
        self.averages = [*self.averages, self.sum / self.n][-2:]
        self.sum, self.n = None, 0


@pytest.mark.parametrize("every, temperature", [(1, 2.0), (3, 2.0), (4, 0.5)])
def test_dwa_against_torchjd_with_an_epoch_every_k_updates(every, temperature):
    states = run(ob.dwa(temperature=temperature, every=every, num_tasks=T))
    ref = TorchjdDWA(temperature)
    for k, (state, l_k) in enumerate(zip(states, LOSSES.astype(np.float64))):
        close(state.weights, ref.forward(l_k), f"step {k}")
        if (k + 1) % every == 0:
            ref.step()
    assert len(ref.averages) == 2  # the rates were in use
    assert not np.allclose(states[-1].weights, 1.0)


# ----------------------------------------------------------------------------------------
# Scalarisations: the weights are the gradient of torchjd's forward.
# ----------------------------------------------------------------------------------------


def gls_forward(values):
    return np.exp(np.mean(np.log(values)))


def stch_forward(mu, weights, reference):
    def f(values):
        y = weights * (values - reference)
        return mu * np.log(np.sum(np.exp(y / mu)))

    return f


def cosmos_forward(lambda_, weights):
    def f(values):
        cos = weights @ values / (np.linalg.norm(weights) * np.linalg.norm(values))
        return weights @ values - lambda_ * cos

    return f


def pbi_forward(theta, weights, reference):
    def f(values):
        shifted = values - reference
        direction = weights / np.linalg.norm(weights)
        d1 = shifted @ direction
        perp = shifted - d1 * direction
        return d1 + theta * np.sqrt(perp @ perp + 1e-12)

    return f


_PREF = np.array([0.2, 0.5, 0.3])
_REF = np.array([0.1, 0.0, 0.15])
SCALARISATIONS = {
    "gls": (ob.gls(num_tasks=T), gls_forward),
    "stch": (ob.stch(mu=0.5, num_tasks=T), stch_forward(0.5, np.full(T, 1 / T), np.zeros(T))),
    "stch_pref_ref": (
        ob.stch(mu=0.1, weights=_PREF, reference=_REF),
        stch_forward(0.1, _PREF, _REF),
    ),
    "cosmos": (ob.cosmos(lambda_=2.0, weights=_PREF), cosmos_forward(2.0, _PREF)),
    "pbi": (ob.pbi(theta=5.0, weights=_PREF), pbi_forward(5.0, _PREF, np.zeros(T))),
    "pbi_ref": (
        ob.pbi(theta=0.5, weights=_PREF, reference=_REF),
        pbi_forward(0.5, _PREF, _REF),
    ),
}


@pytest.mark.parametrize("case", list(SCALARISATIONS))
def test_scalarisation_weights_are_the_forward_gradient(case):
    tx, forward = SCALARISATIONS[case]
    for k, (state, l_k) in enumerate(zip(run(tx), LOSSES.astype(np.float64))):
        close(state.weights, fd_grad(forward, l_k), f"step {k}")


# ----------------------------------------------------------------------------------------
# FAMO.
# ----------------------------------------------------------------------------------------


class TorchjdFAMO:
    """torchjd FAMO: forward(values) -> weights (the gradient of its output in the
    values, c held constant); update(values_after) steps the logits with torch's Adam."""

    def __init__(self, lr, weight_decay, min_losses):
        self.xi = np.zeros(T)
        self.b = np.asarray(min_losses, np.float64)
        self.adam = TorchAdam(lr, weight_decay)
        self.prev = None

    def forward(self, values):
        self.prev = values.copy()
        z = softmax(self.xi)
        c = 1.0 / np.sum(z / (values - self.b + 1e-8))
        return fd_grad(lambda v: c * np.sum(z * np.log(v - self.b + 1e-8)), values)

    def update(self, values):
        delta = np.log(self.prev - self.b + 1e-8) - np.log(values - self.b + 1e-8)
        z = softmax(self.xi)
        jac = np.diag(z) - np.outer(z, z)  # d softmax / d xi
        self.xi = self.adam.step(self.xi, jac.T @ delta)


FAMO_CASES = {
    "default": dict(lr=0.025, weight_decay=1e-3, min_losses=np.zeros(T)),
    "bounds_fast": dict(lr=0.2, weight_decay=1e-2, min_losses=np.array([0.1, 0.0, 0.15])),
}


@pytest.mark.parametrize("exact", [False, True], ids=["one_pass", "losses_after"])
@pytest.mark.parametrize("case", list(FAMO_CASES))
def test_famo_against_torchjd(case, exact):
    """Default: step t's logit step goes from L(t-1) to L(t), before forming the weights.
    Exact: the next step receives losses_after (the batch re-evaluated after its update)
    and the logit step is torchjd's update(losses_after)."""
    kw = FAMO_CASES[case]
    b = kw["min_losses"]
    tx = ob.famo(T, lr=kw["lr"], weight_decay=kw["weight_decay"], min_losses=list(b))
    after_seq = [None] + list(AFTER[:-1]) if exact else [None] * STEPS
    states = run(tx, losses_after=after_seq)
    ref = TorchjdFAMO(**kw)
    for k, (state, l_k) in enumerate(zip(states, LOSSES.astype(np.float64))):
        if k > 0:
            ref.update(AFTER[k - 1].astype(np.float64) if exact else l_k)
        close(state.weights, ref.forward(l_k), f"weights, step {k}")
        close(state.logits, ref.xi, f"logits, step {k}")
    assert np.abs(ref.xi).max() > 0.05  # the logits moved


def test_famo_exact_form_reaches_weighted_loss_too():
    """weighted_loss forwards losses_after, so it uses the weights update then records."""
    tx = ob.famo(T)
    p = jnp.zeros(2)
    state = tx.init(p)
    _, state = tx.update(p, state, p, task_losses=LOSSES[0])
    after, losses = jnp.asarray(AFTER[0]), jnp.asarray(LOSSES[1])
    loss = ob.weighted_loss(tx, losses, state, losses_after=after)
    _, new = tx.update(p, state, p, task_losses=losses, losses_after=after)
    np.testing.assert_allclose(loss, new.weights @ losses, rtol=1e-6)
    _, other = tx.update(p, state, p, task_losses=losses)  # the one-pass step differs
    assert not np.allclose(other.logits, new.logits)
