"""The public weighting layer: ``ob.Weighting``, ``ob.balance``, ``ob.weightings.<name>``.

For every method in the registry, the weighting called on statistics computed here in
NumPy (float64, from ``J`` directly, not through the core) gives the transformation's
output and state, step after step. CR-MOGM is checked against a NumPy EMA of SciPy's
MGDA and UPGrad solutions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

import optax_balance as ob
from tests import inputs as I
from tests import qp_reference as ref
from tests.methods import METHODS

T = 3
ALL = [pytest.param(m, id=m.name) for m in METHODS]


def _numpy_stats(j: np.ndarray, losses: np.ndarray, needs: tuple[str, ...]) -> ob.Stats:
    """The statistics of ``J`` (T, N) on the registry's tree, in float64 NumPy."""
    j = j.astype(np.float64)
    gram = j @ j.T
    fields = {}
    if "gram" in needs:
        fields["gram"] = gram
    if "gram" in needs or "sq_norms" in needs:
        fields["sq_norms"] = np.diag(gram)
    treedef = jax.tree.structure(I.params())
    blocks, start = [], 0
    for size in I.SIZES:
        blocks.append(j[:, start : start + size])
        start += size
    if "leaf_sq_norms" in needs:
        fields["leaf_sq_norms"] = jax.tree.unflatten(
            treedef, [np.sum(b**2, axis=1) for b in blocks]
        )
    if "leaf_gram" in needs:
        fields["leaf_gram"] = jax.tree.unflatten(treedef, [b @ b.T for b in blocks])
    if "grads" in needs:  # the stacked gradients themselves, leaf-shaped
        fields["grads"] = jax.tree.map(lambda g: np.asarray(g, np.float64), I.tree(j))
    if "losses" in needs:
        fields["losses"] = losses
    if "grads" in needs:
        fields["grads"] = I.tree(j)
    if "cross_gram" in needs:  # the suites' second batch is the first (Method.batch_kwargs)
        fields["cross_gram"] = gram
    cast = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), fields)
    return ob.Stats(**cast)


@pytest.mark.parametrize("m", ALL)
def test_weighting_equals_the_transformation(m):
    """Same output (``w @ J``) and the same state, over three steps from one init."""
    tx = m.make(T)
    w = tx.weighting
    assert isinstance(w, ob.Weighting)
    state_tx = state_w = tx.init(I.params())
    update = jax.jit(
        lambda g, s, losses: tx.update(g, s, I.params(), task_losses=losses, **m.batch_kwargs(g))
    )
    weigh = jax.jit(w.__call__)
    for step in range(3):
        j = I.rand_j(step, T)
        losses = I.losses_for(T) * (1.0 + step)
        d, state_tx = update(I.tree(j), state_tx, losses)
        weights, state_w = weigh(_numpy_stats(j, losses, w.needs), state_w)
        combined = j.astype(np.float64)
        if w.tracked is not None:  # the tracked estimates are combined, not J
            combined = I.flat(getattr(state_w, w.tracked))
        if isinstance(weights, jax.Array):
            want = np.asarray(weights, np.float64) @ combined
        else:  # per-leaf weights (MetaBalance) or per-coordinate ones (GradDrop)
            parts = []
            for wl, g in zip(jax.tree.leaves(weights), jax.tree.leaves(I.tree(j))):
                wl, g = np.asarray(wl, np.float64), np.asarray(g, np.float64).reshape(T, -1)
                parts.append(wl @ g if wl.ndim == 1 else np.sum(wl.reshape(T, -1) * g, axis=0))
            want = np.concatenate(parts)
        np.testing.assert_allclose(I.flat(d), want, rtol=2e-5, atol=2e-6)
        # Solver iteration counts may differ by the rounding of the two Gramians.
        counts = ("iterations", "root_iterations")
        state_a = state_tx._replace(**{k: 0 for k in counts if k in state_tx._fields})
        state_b = state_w._replace(**{k: 0 for k in counts if k in state_w._fields})
        for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
            if jnp.issubdtype(jnp.result_type(a), jnp.inexact):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
            else:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_upgrad_weighting_on_a_gramian_matches_torchjd():
    # torchjd 0.18: UPGradWeighting()(J @ J.T) for this J is [1.1109, 0.7894].
    j = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    weights, state = ob.weightings.upgrad()(j @ j.T)
    np.testing.assert_allclose(np.asarray(weights), [1.1109, 0.7894], atol=1e-4)
    np.testing.assert_allclose(np.asarray(weights), ref.upgrad_weights(j), rtol=1e-5)
    assert isinstance(state, ob.UPGradState)


def test_weighting_call_forms_and_errors():
    j = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], np.float32)
    mgda = ob.weightings.mgda(norm_type="loss")
    with pytest.raises(ValueError, match=r"needs \['losses'\]"):
        mgda(j @ j.T)
    w_loss, _ = mgda(j @ j.T, losses=np.array([0.5, 2.0]))
    w_stats, _ = mgda(ob.Stats(gram=jnp.asarray(j @ j.T), losses=jnp.array([0.5, 2.0])))
    np.testing.assert_allclose(np.asarray(w_loss), np.asarray(w_stats))
    with pytest.raises(ValueError, match=r"\(T, T\) Gramian"):
        ob.weightings.mgda()(np.ones((2, 3)))
    with pytest.raises(ValueError, match="per-leaf state"):
        ob.weightings.metabalance()(ob.Stats(leaf_sq_norms={"a": jnp.ones(2)}))
    with pytest.raises(ValueError, match="must name statistics"):
        ob.Weighting(lambda t: None, lambda s, st: (None, st), needs=("hessian",))
    with pytest.raises(ValueError, match="ob.Weighting"):
        ob.balance(ob.mgda())  # a transformation, not a weighting
    with pytest.raises(ValueError, match="built for 2 tasks"):
        ob.balance(ob.weightings.upgrad(pref_vector=[1.0, 1.0]), num_tasks=3)


def test_balance_is_what_the_factories_build():
    j = I.rand_j(7, T)
    for a, b in [
        (ob.upgrad(num_tasks=T), ob.balance(ob.weightings.upgrad(), num_tasks=T)),
        (
            ob.cagrad(c=0.4, shared={"bias": False, "dense": True}, num_tasks=T),
            ob.balance(ob.weightings.cagrad(c=0.4), shared={"bias": False, "dense": True}),
        ),
    ]:
        da, sa = a.update(I.tree(j), a.init(I.params()), I.params())
        db, sb = b.update(I.tree(j), b.init(I.params()), I.params())
        assert I.trees_equal(da, db) and I.trees_equal(sa, sb)


def test_methods_are_optax_aggregators():
    aggregating = pytest.importorskip("optax.experimental").aggregating
    tx = ob.upgrad()
    assert isinstance(tx, aggregating.Aggregator)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)


# ----------------------------------------------------------------------------------------
# CR-MOGM against a NumPy EMA of independently solved weights.
# ----------------------------------------------------------------------------------------


def _mgda_exact(j: np.ndarray) -> np.ndarray:
    """argmin_{a in simplex} ||a J||^2 by SciPy's SLSQP (the reference, not our solver)."""
    g = j @ j.T
    t = g.shape[0]
    res = scipy.optimize.minimize(
        lambda a: a @ g @ a,
        np.full(t, 1.0 / t),
        jac=lambda a: 2 * g @ a,
        bounds=[(0, 1)] * t,
        constraints=({"type": "eq", "fun": lambda a: a.sum() - 1, "jac": lambda a: np.ones(t)},),
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 500},
    )
    return res.x


@pytest.mark.parametrize(
    "inner, reference, alpha, initial",
    [
        (ob.weightings.mgda, _mgda_exact, 0.9, None),
        (ob.weightings.mgda, _mgda_exact, 0.3, [0.2, 0.3, 0.5]),
        (ob.weightings.upgrad, ref.upgrad_weights, 0.9, None),
        (ob.weightings.upgrad, ref.upgrad_weights, 0.6, [1.0, 0.0, 0.0]),
    ],
    ids=["mgda", "mgda-initial", "upgrad", "upgrad-initial"],
)
def test_cr_mogm_against_numpy_ema(inner, reference, alpha, initial):
    rng = np.random.default_rng(42)
    tx = ob.cr_mogm(inner(), alpha=alpha, initial_weights=initial, num_tasks=T)
    state = tx.init(jnp.zeros(5))
    update = jax.jit(tx.update)
    lam = None if initial is None else np.asarray(initial, np.float64)
    for _ in range(12):
        # Random Jacobians whose rows conflict (a shared negative direction on one row)
        j = rng.normal(size=(T, 5))
        j[0] -= 1.5 * j[1]
        hat = reference(j)
        lam = hat if lam is None else alpha * lam + (1 - alpha) * hat
        d, state = update(jnp.asarray(j, jnp.float32), state)
        np.testing.assert_allclose(np.asarray(state.weights), lam, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(d), lam @ j, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(state.inner.weights), hat, rtol=1e-4, atol=1e-4)


def test_cr_mogm_validation_and_extremes():
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\]"):
        ob.cr_mogm(ob.weightings.mgda(), alpha=1.5)
    with pytest.raises(ValueError, match="not the transformation"):
        ob.cr_mogm(ob.mgda())
    with pytest.raises(ValueError, match="initial_weights"):
        ob.cr_mogm(ob.weightings.upgrad(pref_vector=[1.0, 1.0]), initial_weights=[1.0, 1.0, 1.0])
    j = jnp.asarray(I.rand_j(3, T))
    frozen = ob.cr_mogm(ob.weightings.mgda(), alpha=1.0, initial_weights=[1.0, 0.0, 0.0])
    d, s = frozen.update(j, frozen.init(jnp.zeros(I.N)))
    np.testing.assert_allclose(np.asarray(d), np.asarray(j[0]), rtol=1e-6)
    plain = ob.cr_mogm(ob.weightings.mgda(), alpha=0.0)
    d0, _ = plain.update(j, plain.init(jnp.zeros(I.N)))
    d1, _ = ob.mgda().update(j, ob.mgda().init(jnp.zeros(I.N)))
    np.testing.assert_allclose(np.asarray(d0), np.asarray(d1), rtol=1e-6)
