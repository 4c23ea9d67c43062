"""optax wrappers that work: gradient accumulation, aggregating.process, inject_hyperparams.

* ``ob.accumulate(optax.chain(method, adam), k)`` over k equal micro-batches takes, once
  per k calls, exactly the step ``optax.chain(method, adam)`` takes on the whole batch:
  the stacked gradients *and* the losses are averaged (the reference is the full-batch
  step, computed separately). The other calls return zeros and change no state.
* ``optax.MultiSteps(method, k)`` initialised with the params fails with a message that
  points to ``ob.accumulate``.
* ``aggregating.process(per_task_clip, ob.upgrad(), optax.adam(...))``: every task's
  gradient is clipped to norm 1 before balancing (reference: clipped in NumPy, then the
  plain chain).
* ``optax.inject_hyperparams`` with a callable ``shared`` listed in ``static_args``, and
  JAX arrays as per-task vectors (the balancer's ``weights``, injected or not).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.experimental import aggregating

import optax_balance as ob
from tests import inputs as I

T = 3
K = 3  # micro-batches per update
B = 4  # items per micro-batch

_rng = np.random.default_rng(0)
_X = _rng.normal(size=(2 * K, B, 3)).astype(np.float32)  # two rounds of K micro-batches
_Y = _rng.normal(size=(2 * K, T, B, 2)).astype(np.float32)


def _task_losses(params, x, y):  # (T,): task t fits y[t]; mean over the batch
    pred = x @ params["dense"]["w"] + params["bias"]  # (B, 2)
    return jnp.mean((pred[None] - y) ** 2, axis=(1, 2))


def _params():
    return jax.tree.map(lambda p: p + 0.1, I.params())


_ACCUMULATED = {
    "mgda_loss+": lambda: ob.mgda(norm_type="loss+", num_tasks=T),  # reads the losses
    "gradnorm": lambda: ob.gradnorm(T),  # losses, L(0), an inner optimizer
    "pcgrad": lambda: ob.pcgrad(num_tasks=T),  # a PRNG key
    "metabalance": lambda: ob.metabalance(num_tasks=T),  # per-leaf EMAs
    "balancer": lambda: ob.balancer([1.0, 2.0, 3.0]),  # EMA norms
    "upgrad": lambda: ob.upgrad(num_tasks=T),  # a solver
}


@pytest.mark.parametrize("name", list(_ACCUMULATED))
def test_accumulate_equals_the_whole_batch_step(name):
    make = _ACCUMULATED[name]
    acc = ob.accumulate(optax.chain(make(), optax.adam(1e-2)), every_k=K)
    full = optax.chain(make(), optax.adam(1e-2))

    @jax.jit
    def micro_step(params, state, x, y):
        losses, grads = ob.value_and_task_grads(_task_losses)(params, x, y)
        updates, state = acc.update(grads, state, params, task_losses=losses)
        return optax.apply_updates(params, updates), state, updates

    @jax.jit
    def full_step(params, state, x, y):  # x, y: the K micro-batches, as one batch
        x = x.reshape(K * B, 3)
        y = jnp.moveaxis(y, 0, 1).reshape(T, K * B, 2)
        losses, grads = ob.value_and_task_grads(_task_losses)(params, x, y)
        updates, state = full.update(grads, state, params, task_losses=losses)
        return optax.apply_updates(params, updates), state

    p_acc = p_full = _params()
    s_acc, s_full = acc.init(p_acc), full.init(p_full)
    for r in range(2):
        for i in range(K):
            inner_before = s_acc.inner
            p_acc, s_acc, updates = micro_step(p_acc, s_acc, _X[r * K + i], _Y[r * K + i])
            if i < K - 1:  # zeros, and no state moved
                assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
                assert I.trees_equal(s_acc.inner, inner_before)
                assert not bool(s_acc.ready) and int(s_acc.micro_step) == i + 1
        assert bool(s_acc.ready) and int(s_acc.micro_step) == 0
        rnd = slice(r * K, (r + 1) * K)
        p_full, s_full = full_step(p_full, s_full, _X[rnd], _Y[rnd])
        np.testing.assert_allclose(I.flat(p_acc), I.flat(p_full), rtol=1e-5, atol=1e-6)
        # Weights to 1e-4 of the largest: the micro-batch mean and the whole batch's
        # gradients differ by float32 rounding, which a solver's weights carry in absolute
        # terms (a weight of 6.5e-4 moved by 9e-8 under another XLA code generator).
        w_acc, w_full = np.asarray(ob.task_weights(s_acc)), np.asarray(ob.task_weights(s_full))
        np.testing.assert_allclose(w_acc, w_full, rtol=1e-4, atol=1e-4 * np.abs(w_full).max())
    if name == "gradnorm":  # L(0): the losses of the whole first batch, not the last micro
        whole = _task_losses(
            _params(), _X[:K].reshape(K * B, 3), np.moveaxis(_Y[:K], 0, 1).reshape(T, K * B, 2)
        )
        np.testing.assert_allclose(
            np.asarray(s_acc.inner[0].initial_losses), np.asarray(whole), rtol=1e-5
        )


def test_accumulate_as_the_aggregator_of_aggregating_process():
    """``process(identity, accumulate(method, k), adam)``: adam runs only on the steps the
    accumulator is ``ready``, as with ``accumulate(chain(method, adam), k)``."""
    method = lambda: ob.mgda(norm_type="loss+", num_tasks=T)  # noqa: E731
    a = aggregating.process(
        optax.with_extra_args_support(optax.identity()),
        ob.accumulate(method(), every_k=K),
        optax.adam(1e-2),
    )
    b = ob.accumulate(optax.chain(method(), optax.adam(1e-2)), every_k=K)
    assert isinstance(a, aggregating.Aggregator) and isinstance(b, aggregating.Aggregator)

    def run(tx):
        @jax.jit
        def step(params, state, x, y):
            losses, grads = ob.value_and_task_grads(_task_losses)(params, x, y)
            updates, state = tx.update(grads, state, params, task_losses=losses)
            return optax.apply_updates(params, updates), state

        params = _params()
        state = tx.init(params)
        for i in range(2 * K):
            params, state = step(params, state, _X[i], _Y[i])
        return params, state

    (pa, sa), (pb, sb) = run(a), run(b)
    np.testing.assert_allclose(I.flat(pa), I.flat(pb), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(ob.task_weights(sa)), ob.task_weights(sb))


class _SoftmaxState(NamedTuple):
    weights: jax.Array


def test_accumulate_ordinary_gradients_of_a_loss_based_weighting():
    """``stacked=False``: a loss-only weighting given an ordinary gradient passes it
    through; the accumulator averages it and the losses, and the weighting's state
    advances once, on the mean losses."""
    w = ob.Weighting(
        lambda t: _SoftmaxState(jnp.ones((t,)) / t),
        lambda stats, s: (
            jax.nn.softmax(stats.losses),
            _SoftmaxState(jax.nn.softmax(stats.losses)),
        ),
        needs=("losses",),
        name="softmax_of_losses",
    )
    tx = ob.accumulate(ob.balance(w, num_tasks=T), every_k=2, stacked=False)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    g1, g2 = {"w": jnp.array([1.0, 2.0, 3.0])}, {"w": jnp.array([3.0, 0.0, 1.0])}
    l1, l2 = jnp.array([1.0, 2.0, 3.0]), jnp.array([3.0, 0.0, 1.0])
    out1, state = tx.update(g1, state, params, task_losses=l1)
    out2, state = tx.update(g2, state, params, task_losses=l2)
    np.testing.assert_array_equal(out1["w"], np.zeros(3))
    np.testing.assert_allclose(out2["w"], [2.0, 1.0, 2.0])
    mean_l = np.array([2.0, 1.0, 2.0])
    np.testing.assert_allclose(
        ob.task_weights(state), np.exp(mean_l) / np.exp(mean_l).sum(), rtol=1e-6
    )
    with pytest.raises(ValueError, match=r"accumulator is stacked.*stacked=False"):
        ob.accumulate(ob.mgda(num_tasks=T), 2).update(
            g1, ob.accumulate(ob.mgda(num_tasks=T), 2).init(params)
        )


def test_accumulate_refuses_what_it_cannot_size():
    params = I.params()
    with pytest.raises(ValueError, match=r"pass num_tasks=T"):
        ob.accumulate(ob.mgda(), 2).init(params)
    with pytest.raises(ValueError, match=r"holds no balancing state"):
        ob.accumulate(optax.adam(1e-3), 2).init(params)
    with pytest.raises(ValueError, match=r"`every_k` must be an integer in \[1, inf\)"):
        ob.accumulate(ob.mgda(num_tasks=T), 0)
    tx = ob.accumulate(ob.mgda(num_tasks=T), 2)
    with pytest.raises(ValueError, match=r"leaf \['bias'\] has shape \(2, 2\).*\(3, 2\)"):
        tx.update(I.tree(I.rand_j(0, 2)), tx.init(params))
    with pytest.raises(ValueError, match=r"`task_losses` must have shape \(3,\)"):
        tx.update(I.tree(I.rand_j(0, T)), tx.init(params), task_losses=jnp.ones(2))


def test_multisteps_with_params_points_to_accumulate():
    params = {"a": jnp.zeros((10, 2)), "b": jnp.zeros(10)}
    grads = jax.tree.map(lambda p: jnp.ones((T, *p.shape)), params)
    ms = optax.MultiSteps(ob.mgda(num_tasks=T), every_k_schedule=4)
    with pytest.raises(ValueError, match=r"ob\.accumulate\(optax\.chain\(method, optimizer\), k\)"):
        ms.update(grads, ms.init(params), params)


# ----------------------------------------------------------------------------------------
# aggregating.process: per-task preprocessing before balancing.
# ----------------------------------------------------------------------------------------


def test_per_task_clipping_before_upgrad():
    clip = jax.vmap(optax.projections.projection_l2_ball, in_axes=(0, None))
    per_task_clip = optax.with_extra_args_support(optax.stateless(lambda g, _: clip(g, 1.0)))
    tx = aggregating.process(per_task_clip, ob.upgrad(num_tasks=T), optax.adam(1e-2))
    j = I.rand_j(7, T) * np.array([[0.1], [3.0], [30.0]], np.float32)  # norms ~0.1, 3, 30
    params = I.params()
    updates, state = tx.update(I.tree(j), tx.init(params), params, task_losses=I.losses_for(T))
    # Reference: each row scaled to norm <= 1 in NumPy, then the plain chain.
    norms = np.linalg.norm(j, axis=1, keepdims=True)
    clipped = (j * np.minimum(1.0, 1.0 / norms)).astype(np.float32)
    ref = optax.chain(ob.upgrad(num_tasks=T), optax.adam(1e-2))
    want, ref_state = ref.update(I.tree(clipped), ref.init(params), params)
    np.testing.assert_allclose(I.flat(updates), I.flat(want), rtol=1e-6)
    np.testing.assert_allclose(ob.task_weights(state), ob.task_weights(ref_state), rtol=1e-6)
    # ... and the clipping mattered: on the raw rows UPGrad weighs differently.
    raw = ob.upgrad(num_tasks=T)
    _, raw_state = raw.update(I.tree(j), raw.init(params))
    assert not np.allclose(ob.task_weights(raw_state), ob.task_weights(state), rtol=1e-2)


# ----------------------------------------------------------------------------------------
# optax.inject_hyperparams; JAX arrays as per-task vectors.
# ----------------------------------------------------------------------------------------


def _shared(params):  # every leaf but the bias: a callable mask
    return jax.tree_util.tree_map_with_path(lambda path, _: "bias" not in str(path), params)


def test_inject_hyperparams_with_a_callable_mask_in_static_args():
    inj = optax.inject_hyperparams(ob.cagrad, static_args=("shared", "num_tasks"))
    tx = inj(c=0.5, num_tasks=T, shared=_shared)
    plain = ob.cagrad(c=0.25, num_tasks=T, shared=_shared)
    params = I.params()
    state = tx.init(params)
    state.hyperparams["c"] = jnp.float32(0.25)  # c is injected: change it through the state
    g = I.tree(I.rand_j(3, T))
    got, _ = jax.jit(tx.update)(g, state, params)
    want, _ = plain.update(g, plain.init(params), params)
    np.testing.assert_allclose(I.flat(got), I.flat(want), rtol=1e-5, atol=1e-7)
    # The bias is task-specific: summed over the tasks, whatever the weights.
    np.testing.assert_allclose(np.asarray(got["bias"]), np.asarray(g["bias"]).sum(0), rtol=1e-6)


def test_per_task_vectors_accept_jax_arrays():
    params, g = I.params(), I.tree(I.rand_j(5, T))
    lst = ob.balancer([1.0, 2.0, 3.0])
    want, _ = lst.update(g, lst.init(params))
    arr = ob.balancer(jnp.array([1.0, 2.0, 3.0]))
    got, _ = arr.update(g, arr.init(params))
    np.testing.assert_allclose(I.flat(got), I.flat(want), rtol=1e-6)
    inj = optax.inject_hyperparams(ob.balancer)(weights=jnp.array([1.0, 2.0, 3.0]))
    got, _ = jax.jit(inj.update)(g, inj.init(params))
    np.testing.assert_allclose(I.flat(got), I.flat(want), rtol=1e-6)
    up = ob.upgrad(pref_vector=jnp.array([1.0, 1.0, 2.0]))
    want_up = ob.upgrad(pref_vector=[1.0, 1.0, 2.0])
    np.testing.assert_allclose(
        I.flat(up.update(g, up.init(params))[0]),
        I.flat(want_up.update(g, want_up.init(params))[0]),
        rtol=1e-6,
    )
