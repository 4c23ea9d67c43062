"""Properties from the literature's standard list, for the methods that claim them.

Drawn with ``hypothesis`` (the fixed "ci" profile of ``conftest.py``: deterministic,
bounded examples): the task count T in 2..4 (2..10 for KKT, where MGDA's polish missed
the conditions at T = 7-10, issue 13; only the MGDA variants pay for the extra shapes),
the effective dimension (columns of ``J`` past it are zero, so T > dimension gives
singular Gramians), the overall scale
(1e-3..1e3), per-task scales, seeds, and a structure (generic, duplicate rows, opposite
rows, a zero row, one row 1e3 larger). Every check starts from a fresh state.

* permutation: permuting the tasks permutes the weights and leaves the output unchanged;
* non-conflicting: ``g_i . d >= -tol`` for every task (MGDA);
* homogeneous: ``A(c J) = c A(J)``, ``c > 0`` (weights unchanged under a global scale);
* scale-invariant weights: scaling each task by its own ``c_i > 0`` keeps the weights
  (MGDA-l2: the weights are found on normalised gradients);
* scale-invariant output: the same keeps the output (the EnCodec balancer);
* KKT (MGDA): ``a`` on the simplex, ``(M a)_i >= a^T M a - tol`` for every i, with
  equality on the support, for the (normalised) Gramian ``M`` the registry names.

Flags come from the registry (``tests/methods.py``); a method that does not claim a
property is not tested for it, and its entry's ``notes`` say why where it matters.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from tests import inputs as I
from tests.methods import METHODS

KINDS = ("generic", "duplicate", "opposite", "zero_row", "one_large")


@st.composite
def problems(draw, kinds=KINDS, full_rank=False, max_tasks=4):
    """``(J, losses)``: J of shape ``(T, N)`` in float32, losses positive."""
    t = draw(st.integers(2, max_tasks))
    n = draw(st.integers(t if full_rank else 1, I.N))
    seed = draw(st.integers(0, 2**16))
    scale = 10.0 ** draw(st.floats(-3.0, 3.0))
    kind = draw(st.sampled_from(kinds))
    rng = np.random.default_rng(seed)
    j = I.rand_j(seed, t, n).astype(np.float64) * scale
    if kind == "duplicate":
        j[1] = j[0]
    elif kind == "opposite":
        j[1] = -j[0]
    elif kind == "zero_row":
        j[-1] = 0.0
    elif kind == "one_large":
        j[0] *= 1e3
    losses = rng.uniform(0.1, 3.0, size=t)
    return j.astype(np.float32), losses.astype(np.float32)


def _run(m, j, losses):
    s = I.stepper(m.name, j.shape[0])
    out, state = s.step(I.tree(j), s.init(), losses)
    return I.flat(out), np.asarray(state.weights, np.float64)


# Found by this suite (hunt profile): one task ~1e3 larger than the others in 3
# dimensions; the MGDA solver stopped on absolute tolerances and returned a point that
# conflicts with the large task (g_0 . d = -41 at the optimum's scale 0.2).
_J_LARGE = np.zeros((3, I.N), np.float32)
_J_LARGE[:, :3] = [
    [3.5158572e02, -5.0114763e-01, 4.9403143e02],
    [-3.2965273e-01, 4.2770422e-01, 4.0459886e-01],
    [2.8334540e-01, 4.9307165e-01, -5.3709334e-01],
]
_FOUND = (_J_LARGE, np.array([1.4523758, 2.2753484, 1.4141048], np.float32))


def _params(flag):
    return [pytest.param(m, id=m.name) for m in METHODS if getattr(m, flag)]


def _close(a, b, rel):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0), 1e-30)
    np.testing.assert_allclose(a, b, rtol=0, atol=rel * scale)


@pytest.mark.parametrize("m", _params("permutation_invariant"))
@given(prob=problems(kinds=("generic",), full_rank=True), data=st.data())
def test_permutation(m, prob, data):
    j, losses = prob
    assume(j.shape[0] >= m.min_tasks)  # Krum, TrimmedMean: none below (own files)
    perm = np.asarray(data.draw(st.permutations(range(j.shape[0]))))
    d, w = _run(m, j, losses)
    d_p, w_p = _run(m, j[perm], losses[perm])
    _close(w_p, w[perm], 1e-3)
    _close(d_p, d, 1e-3)


@pytest.mark.parametrize("m", _params("non_conflicting"))
@given(prob=problems())
@example(prob=_FOUND)
def test_non_conflicting(m, prob):
    j, losses = prob
    assume(j.shape[0] >= m.min_tasks)  # Krum, TrimmedMean: none below (own files)
    d, w = _run(m, j, losses)
    tol = I.conflict_tolerance(j, w, m)
    assert np.all(j.astype(np.float64) @ d >= -tol), (j.astype(np.float64) @ d, tol)


@pytest.mark.parametrize("m", _params("homogeneous"))
@given(prob=problems(kinds=("generic",), full_rank=True), log_c=st.floats(-3.0, 3.0))
def test_homogeneous(m, prob, log_c):
    j, losses = prob
    assume(j.shape[0] >= m.min_tasks)  # Krum, TrimmedMean: none below (own files)
    c = 10.0**log_c
    d, w = _run(m, j, losses)
    d_c, w_c = _run(m, (c * j).astype(np.float32), losses)
    _close(w_c, w, 1e-3)
    _close(d_c, c * d, 1e-3)


def _task_scales(data, t):
    logs = data.draw(st.lists(st.floats(-2.0, 2.0), min_size=t, max_size=t))
    return 10.0 ** np.asarray(logs)


@pytest.mark.parametrize("m", _params("scale_invariant_weights"))
@given(prob=problems(kinds=("generic",), full_rank=True), data=st.data())
def test_scale_invariant_weights(m, prob, data):
    j, losses = prob
    assume(j.shape[0] >= m.min_tasks)  # Krum, TrimmedMean: none below (own files)
    c = _task_scales(data, j.shape[0])
    _, w = _run(m, j, losses)
    _, w_c = _run(m, (c[:, None] * j).astype(np.float32), losses)
    _close(w_c, w, 1e-3)


@pytest.mark.parametrize("m", _params("scale_invariant_output"))
@given(prob=problems(kinds=("generic",), full_rank=True), data=st.data())
def test_scale_invariant_output(m, prob, data):
    j, losses = prob
    assume(j.shape[0] >= m.min_tasks)  # Krum, TrimmedMean: none below (own files)
    c = _task_scales(data, j.shape[0])
    d, _ = _run(m, j, losses)
    d_c, _ = _run(m, (c[:, None] * j).astype(np.float32), losses)
    _close(d_c, d, 1e-3)


@pytest.mark.parametrize("m", _params("kkt"))
@given(prob=problems(max_tasks=10))
@example(prob=_FOUND)
def test_kkt(m, prob):
    j, losses = prob
    assume(j.shape[0] >= m.min_tasks)  # Krum, TrimmedMean: none below (own files)
    _, a = _run(m, j, losses)
    j64 = j.astype(np.float64)
    mat = m.kkt(j64 @ j64.T, losses.astype(np.float64))
    assert np.all(a >= -1e-6) and abs(a.sum() - 1.0) < 1e-5, a
    ga = mat @ a
    obj = a @ ga
    # Rounding scale of (M a)_i - a^T M a in float32, per index (Cauchy-Schwarz with
    # r_i = sqrt(M_ii)): a task far smaller than another is held to its own scale; plus
    # weights resolved to the solver's epsilon (1e-5) on the simplex.
    r = np.sqrt(np.maximum(np.diag(mat), 0.0))
    tol = 1e-4 * (r * (r @ a) + (r @ a) ** 2) + 1e-5 * r * r.max() + 1e-30
    assert np.all(ga >= obj - tol), (ga - obj, a, tol)
    support = a > 1e-4
    assert np.all(np.abs(ga[support] - obj) <= tol[support]), (ga - obj, a, tol)


# ----------------------------------------------------------------------------------------
# Unclaimed properties have a counterexample: a method that does not claim a property
# must fail it somewhere, else the registry under-claims (set the flag).
# ----------------------------------------------------------------------------------------


def _conflict_prone() -> list[np.ndarray]:
    """T=3 inputs where a direction-blind combination conflicts with task 0."""
    out = []
    for s in (1.0, 10.0, 0.01):
        j = np.zeros((3, I.N), np.float32)
        j[0, :2] = [1.0, 0.0]
        j[1, :2] = [-0.9 * s, 0.436 * s]
        j[2, :2] = [-0.9 * s, -0.436 * s]
        out.append(j)
    return out


@pytest.mark.parametrize(
    "m", [pytest.param(m, id=m.name) for m in METHODS if not m.non_conflicting]
)
def test_unclaimed_non_conflicting_has_counterexample(m):
    worst = []
    for j in _conflict_prone():
        d, w = _run(m, j, I.losses_for(3))
        worst.append(np.min(j.astype(np.float64) @ d + I.conflict_tolerance(j, w, m)))
    assert min(worst) < 0, (
        f"{m.name} never conflicts here: claim non_conflicting=True in tests/methods.py"
    )


@pytest.mark.parametrize(
    "m",
    [
        pytest.param(m, id=m.name)
        for m in METHODS
        # A stochastic method (PCGrad's random order) is permutation invariant in
        # distribution only; its per-key behaviour is tested in its own file.
        if not m.permutation_invariant and not m.stochastic
    ],
)
def test_unclaimed_permutation_invariance_has_counterexample(m):
    j, losses = I.rand_j(11, 3), I.losses_for(3)
    perm = np.array([2, 0, 1])
    d, w = _run(m, j, losses)
    d_p, w_p = _run(m, j[perm], losses[perm])
    same = np.allclose(d_p, d, rtol=1e-3, atol=1e-6) and np.allclose(w_p, w[perm], rtol=1e-3)
    assert not same, f"{m.name} is permutation invariant here: claim it in tests/methods.py"
