"""GradVac: golden values, a NumPy reference on the raw gradients over many steps, properties.

The reference transcribes torchjd's ``src/torchjd/aggregation/_gradvac.py`` (SimplexLab/
TorchJD at commit 862baeda7dc5beef3731f75a23382427ad5db3ef) and, for the per-leaf form,
LibMTL's ``LibMTL/weighting/GradVac.py`` (``all_matrix`` grouping): it works on the
gradient vectors themselves (not on a Gramian) in float64, and takes the task orders from
the documented key schedule, written out here with ``jax.random``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_balance as ob

J_GOLDEN = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


@functools.partial(jax.jit, static_argnums=1)
def _documented_orders(key_data: jax.Array, t: int) -> tuple[jax.Array, jax.Array]:
    key, step_key = jax.random.split(jax.random.wrap_key_data(key_data))
    orders = jax.vmap(lambda k: jax.random.permutation(k, t))(jax.random.split(step_key, t))
    return jax.random.key_data(key), orders


def documented_orders(key_data: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    """(next key data, the (T, T) orders of this step), as GradVac's docstring says: row i
    is ``jax.random.permutation(jax.random.split(step_key, T)[i], T)``."""
    key, orders = _documented_orders(jnp.asarray(key_data), t)
    return np.asarray(key), np.asarray(orders)


U32 = 2.0**-24


def reference_step(J, targets, orders, beta=0.5, eps=1e-8):
    """One GradVac step on the raw gradients ``J`` (T, n), in float64.

    Returns ``(output, weights, new_targets, kappa, tight)``. ``kappa`` is the largest
    condition number :math:`|c|^T |G| |c| / c^T G c` of a corrected gradient's squared
    norm met in the step: computing it through the Gramian in float32 (as the library
    and torchjd's weighting do) costs about ``u * kappa`` of relative accuracy, which
    sets the tolerances. ``tight`` counts the comparisons ``phi < target`` decided within
    ``100 u kappa``, i.e. that rounding could flip (a test needs none).
    """
    J = np.asarray(J, np.float64)
    t = len(J)
    gram = J @ J.T
    pc = J.copy()
    coef = np.eye(t)
    targets = np.array(targets, np.float64)
    kappa, tight = 1.0, 0
    for i in range(t):
        for j in orders[i]:
            if j == i:
                continue
            c = coef[i]
            sq = c @ gram @ c
            if sq > 0:
                kappa = max(kappa, (np.abs(c) @ np.abs(gram) @ np.abs(c)) / sq)
            norm_i = np.linalg.norm(pc[i])
            norm_j = np.linalg.norm(J[j])
            phi = pc[i] @ J[j] / (norm_i * norm_j + eps)
            hat = targets[i, j]
            if norm_j > 0 and abs(phi - hat) < 100 * U32 * kappa:
                tight += 1
            # torchjd also corrects against a zero g_j (adding w * 0): same output.
            if phi < hat and norm_j > 0:
                w = (
                    norm_i
                    * (hat * np.sqrt(max(1 - phi**2, 0.0)) - phi * np.sqrt(max(1 - hat**2, 0.0)))
                    / (norm_j * np.sqrt(max(1 - hat**2, 0.0)) + eps)
                )
                pc[i] = pc[i] + w * J[j]
                coef[i, j] += w
            targets[i, j] = (1 - beta) * hat + beta * phi
    return pc.sum(0), coef.sum(0), targets, kappa, tight


def _split(J, sizes):
    """J (T, sum(sizes)) as a tree of flat leaves ``l0, l1, ...``."""
    out, start = {}, 0
    for n, size in enumerate(sizes):
        out[f"l{n}"] = jnp.asarray(J[:, start : start + size])
        start += size
    return out


def _flat(tree):
    return np.concatenate([np.asarray(tree[k], np.float64) for k in sorted(tree)])


def run_against_reference(t, sizes, steps, *, seed, beta=0.5, per_leaf=False, x64=False):
    """GradVac and the reference side by side over ``steps`` random steps.

    Float32 (x64=False) is held to ``1e-5 + 10 u kappa`` (see :func:`reference_step`),
    float64 to ``1e-10 + 10 u64 kappa``. Returns the largest deviation of the output
    (relative to ``sum_j |w_j| max|g_j|``) and the largest kappa met.
    """
    u, base, dt = (2.0**-53, 1e-10, jnp.float64) if x64 else (U32, 1e-5, jnp.float32)
    rng = np.random.default_rng(seed)
    tx = ob.gradvac(beta=beta, seed=seed, per_leaf=per_leaf)
    update = jax.jit(tx.update)
    state = tx.init(_split(np.zeros((t, sum(sizes)), dt), sizes))
    bounds = np.cumsum([0, *sizes])
    blocks = (
        [slice(bounds[n], bounds[n + 1]) for n in range(len(sizes))]
        if per_leaf
        else [slice(0, bounds[-1])]
    )
    targets = [np.zeros((t, t)) for _ in blocks]
    key = np.asarray(state.key)
    kappa_max, worst = 1.0, 0.0
    for step in range(steps):
        # a shared component keeps cosines varied, of both signs; scales 0.1..10
        J = rng.normal(size=(t, bounds[-1]))
        J = J + rng.normal(size=(1, bounds[-1])) * rng.uniform(-1, 1, size=(t, 1))
        J = (J * rng.uniform(0.1, 10.0, size=(t, 1))).astype(np.float32).astype(np.float64)
        key, orders = documented_orders(key, t)
        outs, weights, sqs = [], [], []
        for n, sl in enumerate(blocks):
            out, w, targets[n], kappa, tight = reference_step(J[:, sl], targets[n], orders, beta)
            assert tight == 0 or x64, "a branch decided at rounding level: pick another seed"
            kappa_max = max(kappa_max, kappa)
            outs.append(out)
            weights.append(w)
            sqs.append(np.sum(J[:, sl] ** 2, axis=1))
        rel = base + 10 * u * kappa_max
        d, state = update(_split(J.astype(dt), sizes), state)
        np.testing.assert_array_equal(np.asarray(state.key), key)
        ref = np.concatenate(outs)
        scale = max(np.abs(w) @ np.abs(J).max(axis=1) for w in weights)
        err = np.max(np.abs(_flat(d) - ref)) / scale
        assert err <= rel, (step, err, rel)
        worst = max(worst, err)
        if per_leaf:
            for n in range(len(sizes)):
                np.testing.assert_allclose(state.targets[f"l{n}"], targets[n], atol=rel)
            # the (T,) summary: per-leaf weights averaged with the squared norms
            summary = sum(w * q for w, q in zip(weights, sqs)) / sum(sqs)
            np.testing.assert_allclose(state.weights, summary, rtol=rel)
        else:
            np.testing.assert_allclose(state.targets, targets[0], atol=rel, err_msg=f"{step}")
            np.testing.assert_allclose(state.weights, weights[0], rtol=rel, err_msg=f"{step}")
    return worst, kappa_max


@pytest.mark.parametrize("t", [1, 2, 3, 5, 8, 16])
def test_matches_reference_over_steps(t):
    """12 steps on random gradients in 2T + 3 dimensions (full rank), float32."""
    run_against_reference(t, [t + 1, t + 2], 12, seed=100 + t, beta=0.3)


@pytest.mark.parametrize("t", [8, 16])
def test_rank_deficient_matches_reference_in_x64(t):
    """T tasks in 5 dimensions: corrected gradients cancel, and the squared norms
    computed through the Gramian lose ``u * kappa`` (kappa up to ~1e7 here), beyond what
    float32 can resolve; float64 checks the algorithm on them, float32 stays finite."""
    with jax.enable_x64(True):
        run_against_reference(t, [2, 3], 12, seed=200 + t, x64=True)
    tx = ob.gradvac()
    state, update = tx.init(jnp.zeros(5)), jax.jit(tx.update)
    rng = np.random.default_rng(t)
    for _ in range(12):
        d, state = update(jnp.asarray(rng.normal(size=(t, 5)), jnp.float32), state)
        assert np.all(np.isfinite(np.asarray(d))) and np.all(np.isfinite(state.targets))


def test_per_leaf_matches_reference_over_steps():
    """The paper's per-layer form: GradVac on each leaf, one draw of orders per step."""
    run_against_reference(3, [4, 5], 10, seed=7, per_leaf=True)  # float32, full rank
    with jax.enable_x64(True):
        run_against_reference(
            8, [3, 4], 10, seed=8, per_leaf=True, x64=True
        )  # rank-deficient leaves


def test_per_leaf_on_one_leaf_is_the_whole_model():
    rng = np.random.default_rng(3)
    whole, per_leaf = ob.gradvac(seed=4), ob.gradvac(seed=4, per_leaf=True)
    s1, s2 = whole.init(jnp.zeros(6)), per_leaf.init(jnp.zeros(6))
    up1, up2 = jax.jit(whole.update), jax.jit(per_leaf.update)
    for _ in range(5):
        J = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
        d1, s1 = up1(J, s1)
        d2, s2 = up2(J, s2)
        np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s1.targets, s2.targets, atol=1e-6)
        np.testing.assert_allclose(s1.weights, s2.weights, rtol=1e-5)


def test_beta_zero_is_pcgrad_with_the_same_key():
    """Targets that stay at 0 correct exactly the conflicting pairs, as PCGrad does (up to
    eps), and both draw the task orders from the same key schedule."""
    rng = np.random.default_rng(11)
    gv, pc = ob.gradvac(beta=0.0, seed=9), ob.pcgrad(seed=9)
    s1, s2 = gv.init(jnp.zeros(4)), pc.init(jnp.zeros(4))
    up1, up2 = jax.jit(gv.update), jax.jit(pc.update)
    for _ in range(6):
        J = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)  # 6 tasks in 4-D: conflicts
        d1, s1 = up1(J, s1)
        d2, s2 = up2(J, s2)
        np.testing.assert_allclose(d1, d2, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(s1.targets, 0.0)


def test_targets_pull_cosines_up_over_steps():
    """Repeated gradients with cosine -0.5: the targets move toward it; once a target is
    above the current cosine, the corrected gradient has the target's cosine exactly."""
    J = np.array([[1.0, 0.0], [-0.5, np.sqrt(0.75)]])
    tx = ob.gradvac(beta=0.5)
    state, update = tx.init(jnp.zeros(2)), jax.jit(tx.update)
    targets = np.zeros((2, 2))
    for _ in range(4):
        d, state = update(jnp.asarray(J, jnp.float32), state)
        ref, _, targets, _, _ = reference_step(J, targets, np.array([[0, 1], [1, 0]]))
        np.testing.assert_allclose(d, ref, atol=1e-6)
    # cos = -0.5 every step: targets 0 -> -0.25 -> -0.375 -> -0.4375 -> -0.46875
    np.testing.assert_allclose(state.targets[0, 1], -0.46875, atol=1e-6)


def test_zero_gradient_finite_and_not_inflated():
    J = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 1.0]])
    tx = ob.gradvac()
    state, update = tx.init(jnp.zeros(3)), jax.jit(tx.update)
    targets = np.zeros((3, 3))
    key = np.asarray(state.key)
    for _ in range(3):
        key, orders = documented_orders(key, 3)
        ref, _, targets, _, _ = reference_step(J, targets, orders)
        d, state = update(jnp.asarray(J, jnp.float32), state)
        np.testing.assert_allclose(d, ref, atol=1e-5)
        assert np.all(np.isfinite(np.asarray(state.weights)))
        # task 1 (zero) is never corrected against: its weight stays 1, not ~1/eps
        assert float(state.weights[1]) == 1.0


@pytest.mark.parametrize("scale", [1e-10, 1e10])
def test_extreme_scales_finite(scale):
    rng = np.random.default_rng(2)
    J = rng.normal(size=(4, 5)) * np.array([[1.0], [1e-3], [1e3], [1.0]]) * scale
    tx = ob.gradvac()
    state, update = tx.init(jnp.zeros(5)), jax.jit(tx.update)
    for _ in range(3):
        d, state = update(jnp.asarray(J, jnp.float32), state)
        assert np.all(np.isfinite(np.asarray(d))) and np.all(np.isfinite(state.weights))
        assert np.all(np.isfinite(state.targets))


def test_not_homogeneous_for_small_gradients():
    """eps is absolute (as torchjd): gradients far below sqrt(eps) are treated differently
    (the registry does not claim homogeneity)."""
    J = np.array([[1.0, 0.0], [-0.9, 0.436], [-0.9, -0.436]], np.float32)
    tx = ob.gradvac()
    s0 = tx.init(jnp.zeros(2))
    _, big = tx.update(jnp.asarray(J), s0)
    _, small = tx.update(jnp.asarray(1e-6 * J), s0)
    assert np.max(np.abs(np.asarray(big.targets) - np.asarray(small.targets))) > 0.1


def test_non_finite_step_keeps_key_and_targets():
    tx = ob.gradvac(seed=5)
    update = jax.jit(tx.update)
    J = jnp.asarray(J_GOLDEN, jnp.float32)
    _, s1 = update(J, tx.init(jnp.zeros(3)))
    d2, s2 = update(J.at[0, 0].set(jnp.nan), s1)
    for a, b in zip(s2, s1):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(d2[1:], (np.asarray(s1.weights) @ J_GOLDEN)[1:], rtol=1e-6)


def test_state_shapes():
    tx = ob.gradvac(num_tasks=4, per_leaf=True)
    state = tx.init({"a": jnp.zeros(3), "b": jnp.zeros((2, 2))})
    assert state.weights.shape == (4,) and state.targets["b"].shape == (4, 4)
    assert ob.gradvac().init(jnp.zeros(3)).targets.shape == (0, 0)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"beta": -0.1}, "`beta` must be in [0, 1]"),
        ({"beta": 1.1}, "`beta` must be in [0, 1]"),
        ({"eps": -1e-9}, "`eps` must be in [0, inf)"),
        ({"seed": 1.5}, "`seed` must be a Python int"),
        ({"per_leaf": 1}, "`per_leaf` must be a bool"),
        ({"num_tasks": 0}, "`num_tasks` must be >= 1"),
    ],
)
def test_invalid_hyperparameters(kwargs, fragment):
    with pytest.raises(ValueError) as e:
        ob.gradvac(**kwargs)
    assert fragment in str(e.value)
