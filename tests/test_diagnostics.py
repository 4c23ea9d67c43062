"""``ob.conflict_stats`` against a NumPy reference written from its definition."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_balance as ob
from tests import inputs as I


def _reference(j: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Norms, cosines (0 for a zero gradient), conflicting pairs i < j, min off-diagonal."""
    j = j.astype(np.float64)
    norms = np.linalg.norm(j, axis=1)
    inv = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0)
    cos = (j @ j.T) * np.outer(inv, inv)
    t = len(j)
    pairs = [(a, b) for a in range(t) for b in range(a + 1, t)]
    conflicts = sum(float(j[a] @ j[b]) < 0 for a, b in pairs)
    min_cos = min((cos[a, b] for a, b in pairs), default=1.0)
    return norms, cos, conflicts, min_cos


@pytest.mark.parametrize("t", [1, 2, 5])
def test_matches_numpy_on_the_shared_leaves(t):
    j = I.rand_j(11 + t, t) * np.linspace(0.1, 10.0, t)[:, None].astype(np.float32)
    if t > 1:
        j[1] = 0.0  # a zero gradient: cosine 0 with everything, no conflict
    stats = jax.jit(ob.conflict_stats, static_argnames="shared")(I.tree(j), shared=None)
    norms, cos, conflicts, min_cos = _reference(j)
    np.testing.assert_allclose(np.asarray(stats.norms), norms, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.cosines), cos, rtol=1e-5, atol=1e-6)
    assert int(stats.num_conflicts) == conflicts
    np.testing.assert_allclose(float(stats.min_cosine), min_cos, rtol=1e-5, atol=1e-6)
    # Only the shared leaves: the bias (columns 0-1 of J) left out.
    masked = ob.conflict_stats(I.tree(j), shared={"bias": False, "dense": True})
    norms, cos, conflicts, _ = _reference(j[:, 2:])
    np.testing.assert_allclose(np.asarray(masked.norms), norms, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(masked.cosines), cos, rtol=1e-5, atol=1e-6)
    assert int(masked.num_conflicts) == conflicts


def test_low_precision_gradients_give_float32_statistics():
    j = I.rand_j(3, 4)
    stats = ob.conflict_stats(I.tree(j, jnp.bfloat16))
    assert stats.norms.dtype == jnp.float32 and stats.cosines.dtype == jnp.float32
    rounded = I.flat(I.tree(j, jnp.bfloat16)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(stats.norms), _reference(rounded)[0], rtol=1e-5)


def test_opposite_and_duplicate_gradients():
    g = np.array([1.0, 2.0, 0.0, -1.0, 0.5, 0.0, 0.0, 3.0], np.float32)
    stats = ob.conflict_stats(I.tree(np.stack([g, -g, 2 * g])))
    np.testing.assert_allclose(
        np.asarray(stats.cosines), [[1, -1, 1], [-1, 1, -1], [1, -1, 1]], atol=1e-6
    )
    assert int(stats.num_conflicts) == 2
    np.testing.assert_allclose(float(stats.min_cosine), -1.0, atol=1e-6)


def test_a_mask_selecting_nothing_raises():
    with pytest.raises(ValueError, match="selects no parameter leaf"):
        ob.conflict_stats(I.tree(I.rand_j(0, 2)), shared={"bias": False, "dense": False})
