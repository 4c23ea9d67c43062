"""The shared core: validation, masks, statistics, combination, helpers."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_balance as ob
from optax_balance import _core
from tests.tolerance import assert_gram_close


def _tree(rng, t, dtype=np.float32):
    return {
        "trunk": {"w": rng.normal(size=(t, 4, 3)).astype(dtype), "b": rng.normal(size=(t, 3))},
        "head": rng.normal(size=(t, 5)).astype(dtype),
    }


def test_gramian_matches_numpy_float64():
    rng = np.random.default_rng(0)
    leaves = [jnp.asarray(x, jnp.float32) for x in jax.tree.leaves(_tree(rng, 4))]
    # The reference starts from the same float32 values the core sees.
    flat = np.concatenate([np.asarray(x, np.float64).reshape(4, -1) for x in leaves], 1)
    got = _core.gramian(leaves, 4)
    # Entries with cancellation are accurate to float32 rounding of |x_i| . |x_j|, not
    # of themselves: tests/tolerance.py derives the bound.
    assert_gram_close(got, flat)
    assert got.dtype == jnp.float32


def test_statistics_are_float32_for_bf16_gradients():
    g = jnp.asarray(np.random.default_rng(1).normal(size=(3, 7)), jnp.bfloat16)
    assert _core.leaf_gram(g).dtype == jnp.float32
    assert _core.leaf_sq_norms(g).dtype == jnp.float32
    assert_gram_close(_core.leaf_gram(g), g.astype(jnp.float32))


def test_combine_weights_shared_and_sums_task_specific_leaves():
    rng = np.random.default_rng(2)
    tree = _tree(rng, 3)
    w = jnp.array([0.2, 0.3, 0.5])
    mask = {"trunk": {"w": True, "b": True}, "head": False}
    out = _core.combine(tree, w, mask)
    np.testing.assert_allclose(out["trunk"]["w"], np.tensordot(w, tree["trunk"]["w"], 1), rtol=1e-6)
    np.testing.assert_allclose(out["head"], tree["head"].sum(0), rtol=1e-6)


@pytest.mark.parametrize("t", [1, 3, 40])  # 40: past the unrolled sum, the fori_loop
def test_combine_per_coordinate_weights(t):
    rng = np.random.default_rng(t)
    g = rng.normal(size=(t, 4, 5)).astype(np.float32)
    w = rng.uniform(-1.0, 2.0, size=(t, 4, 5)).astype(np.float32)
    want = np.sum(w.astype(np.float64) * g, axis=0)
    got = _core.combine_leaf(jnp.asarray(w), jnp.asarray(g))
    bound = 6 * np.sqrt(t + 1) * 2.0**-24 * np.sum(np.abs(w.astype(np.float64) * g), axis=0)
    assert got.dtype == jnp.float32 and np.all(np.abs(np.asarray(got) - want) <= bound)
    low = _core.combine_leaf(jnp.asarray(w), jnp.asarray(g, jnp.bfloat16))
    assert low.dtype == jnp.bfloat16  # accumulated in f32, returned in the leaf's dtype


def test_combine_single_leaf_tree_with_per_coordinate_weights():
    # The params tree is one array: its per-coordinate weights are one (T, ...) array too.
    g = jnp.asarray(np.random.default_rng(3).normal(size=(3, 4)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(4).uniform(size=(3, 4)), jnp.float32)
    np.testing.assert_allclose(_core.combine(g, w, True), np.sum(w * g, axis=0), rtol=1e-6)
    np.testing.assert_allclose(
        _core.combine(g, jnp.array([1.0, 2.0, 3.0]), True), np.array([1.0, 2.0, 3.0]) @ g, rtol=1e-6
    )


def test_combine_keeps_leaf_dtype():
    g = jnp.ones((2, 3), jnp.bfloat16)
    assert _core.combine_leaf(jnp.array([0.5, 0.5]), g).dtype == jnp.bfloat16


def test_shared_mask_prefix_and_callable_agree():
    params = {"trunk": {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}, "head": jnp.zeros(5)}
    prefix = _core.resolve_mask({"trunk": True, "head": False}, params)
    full = _core.resolve_mask(lambda p: {"trunk": {"w": True, "b": True}, "head": False}, params)
    assert prefix == full == {"trunk": {"w": True, "b": True}, "head": False}


def test_task_specific_leaves_take_no_part_in_the_statistics():
    # A huge task-specific gradient must not change MGDA's weights on the trunk.
    trunk = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    grads = {"trunk": trunk, "head": jnp.array([[1e6, 0.0], [0.0, -1e6]])}
    tx = ob.mgda(shared={"trunk": True, "head": False})
    out, state = tx.update(grads, tx.init({"trunk": jnp.zeros(3), "head": jnp.zeros(2)}))
    np.testing.assert_allclose(state.weights, [0.6, 0.4], atol=1e-6)
    np.testing.assert_allclose(out["trunk"], [0.0, 1.0, 1.0], atol=1e-5)
    np.testing.assert_allclose(out["head"], [1e6, -1e6])


def test_wrong_task_count_names_the_leaf():
    tx = ob.balancer([1.0, 1.0])
    grads = {"a": jnp.ones((2, 3)), "b": {"c": jnp.ones((3, 2))}}
    with pytest.raises(ValueError, match=re.escape("['b']['c']")) as e:
        tx.update(grads, tx.init({"a": jnp.ones(3), "b": {"c": jnp.ones(2)}}))
    assert "num_tasks=2" in str(e.value) and "size 3" in str(e.value)


def test_leaves_disagreeing_on_t():
    tx = ob.mgda()
    grads = {"a": jnp.ones((2, 3)), "b": jnp.ones((3, 2))}
    with pytest.raises(ValueError, match=r"disagree on the task count.*\['a'\].*T=2.*\['b'\].*T=3"):
        tx.update(grads, tx.init({"a": jnp.ones(3), "b": jnp.ones(2)}))


def test_scalar_leaf_is_rejected_with_advice():
    tx = ob.mgda()
    with pytest.raises(ValueError, match="leading task axis"):
        tx.update({"a": jnp.ones(())}, tx.init({"a": jnp.ones(())}))


def test_validation_happens_at_trace_time_under_jit():
    tx = ob.balancer([1.0, 1.0])
    with pytest.raises(ValueError, match="num_tasks=2"):
        jax.jit(tx.update)(jnp.ones((3, 4)), tx.init(jnp.ones(4)))


def test_task_losses_of_wrong_shape():
    tx = ob.mgda(norm_type="loss")
    with pytest.raises(ValueError, match=r"`task_losses` must have shape \(2,\)"):
        tx.update(jnp.ones((2, 3)), tx.init(jnp.ones(3)), task_losses=jnp.ones(3))


def test_missing_task_losses_says_how_to_pass_them():
    tx = ob.mgda(norm_type="loss+")
    with pytest.raises(ValueError, match="task_losses=losses"):
        tx.update(jnp.ones((2, 3)), tx.init(jnp.ones(3)))


def test_mask_structure_mismatch():
    tx = ob.mgda(shared={"x": True, "y": False})
    with pytest.raises(ValueError, match="`shared` mask does not match"):
        tx.update({"a": jnp.ones((2, 3))}, tx.init({"a": jnp.ones(3)}))


def test_mask_of_arrays_is_rejected():
    tx = ob.mgda(shared={"a": jnp.array(True)})
    with pytest.raises(ValueError, match=r"mask leaf \['a'\] must be a Python bool"):
        tx.update({"a": jnp.ones((2, 3))}, tx.init({"a": jnp.ones(3)}))


def test_unknown_keyword_arguments_are_ignored():
    tx = ob.mgda()
    g = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    out, _ = tx.update(g, tx.init(jnp.zeros(2)), value=3.0, foo="bar", task_losses=None)
    np.testing.assert_allclose(out, [0.5, 0.5], atol=1e-6)


def test_value_and_task_grads_matches_jacrev_with_one_forward_pass():
    calls = []

    def losses(p, x):
        calls.append(1)  # counts traces of the forward function
        h = jnp.tanh(x @ p["w"])
        return jnp.stack([jnp.sum(h**2), jnp.sum(h * p["b"]), jnp.mean(p["b"] ** 3)])

    rng = np.random.default_rng(3)
    p = {"w": jnp.asarray(rng.normal(size=(4, 2))), "b": jnp.asarray(rng.normal(size=2))}
    x = jnp.asarray(rng.normal(size=(5, 4)))
    vals, grads = jax.jit(ob.value_and_task_grads(losses))(p, x)
    assert len(calls) == 1
    np.testing.assert_allclose(vals, losses(p, x), rtol=1e-6)
    jac = jax.jacrev(losses)(p, x)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(jac)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Row i is the gradient of loss i alone.
    g1 = jax.grad(lambda q: losses(q, x)[1])(p)
    np.testing.assert_allclose(grads["w"][1], g1["w"], rtol=1e-5, atol=1e-6)


def test_value_and_task_grads_has_aux_and_bad_output():
    f = lambda p: (jnp.stack([p**2, 3 * p]), {"aux": p + 1})
    (vals, aux), g = ob.value_and_task_grads(f, has_aux=True)(2.0)
    np.testing.assert_allclose(vals, [4.0, 6.0])
    np.testing.assert_allclose(g, [4.0, 3.0])
    assert float(aux["aux"]) == 3.0
    with pytest.raises(ValueError, match=r"1-D array of per-task losses"):
        ob.value_and_task_grads(lambda p: p**2)(2.0)


def test_task_weights_found_in_nested_states():
    params = jnp.zeros(3)
    g = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    inner = optax.chain(optax.identity(), ob.mgda(num_tasks=2))
    tx = optax.chain(inner, optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
    _, state = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(ob.task_weights(state), [0.6, 0.4], atol=1e-6)
    with pytest.raises(ValueError, match="no balancing state"):
        ob.task_weights(optax.adam(1e-3).init(params))


def test_empty_state_is_filled_by_the_first_update_and_then_fixed():
    tx = ob.mgda()
    s0 = tx.init(jnp.zeros(3))
    assert s0.weights.shape == (0,)
    _, s1 = tx.update(jnp.ones((4, 3)), s0)
    assert s1.weights.shape == (4,)
    with pytest.raises(ValueError, match="re-run `init` or pass num_tasks=5"):
        tx.update(jnp.ones((5, 3)), s1)
    assert ob.mgda(num_tasks=4).init(jnp.zeros(3)).weights.shape == (4,)


def test_no_recompilation_on_second_call():
    traces = []
    tx = ob.mgda(num_tasks=3)

    @jax.jit
    def step(g, s):
        traces.append(1)
        return tx.update(g, s)

    g = jnp.asarray(np.random.default_rng(4).normal(size=(3, 6)), jnp.float32)
    s = tx.init(jnp.zeros(6))
    _, s = step(g, s)
    _, s = step(g * 2, s)
    _, s = step(g * 3, s)
    assert len(traces) == 1


@pytest.mark.parametrize("make", [ob.mgda, ob.upgrad, ob.cagrad], ids=lambda f: f.__name__)
def test_eager_update_compiles_only_on_its_first_call(make):
    # Called without jit, a solver's while_loop (and the Gramian's chunk loop, here on a
    # leaf of two 16384-column chunks) is a new closure on every call: unless the core
    # jits them once per transformation, every eager call compiles them again (seconds).
    compiles = []

    def listener(name, _secs, **_kw):
        if name.endswith("backend_compile_duration"):
            compiles.append(name)

    rng = np.random.default_rng(5)
    g = {"w": jnp.asarray(rng.normal(size=(3, 2 * 16384 + 5)), jnp.float32), "b": jnp.ones((3, 4))}
    tx = make()
    state = tx.init(jax.tree.map(lambda x: x[0], g))
    d0, state = tx.update(g, state)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        d1, state = tx.update(g, state)
        d2, _ = tx.update(g, state)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    for d in (d1, d2):
        np.testing.assert_allclose(np.asarray(d["w"]), np.asarray(d0["w"]), rtol=1e-5, atol=1e-6)


def test_bad_num_tasks():
    with pytest.raises(ValueError, match="`num_tasks` must be >= 1"):
        ob.mgda(num_tasks=0)
    with pytest.raises(ValueError, match="`num_tasks` must be a Python int"):
        ob.mgda(num_tasks=2.5)  # type: ignore[arg-type]


def test_bad_sync():
    with pytest.raises(ValueError, match=r"`sync` must be one of \('grads', 'stats'\)"):
        ob.mgda(sync="params")  # type: ignore[arg-type]


def test_init_state_can_be_donated():
    # Every method's init gives one buffer per leaf, so a jitted step that donates the
    # optimizer state runs (a shared buffer is "donated twice"). Every method: distinct
    # device buffers (no compile); a few: the donated step itself.
    from tests.methods import METHODS

    params = {"w": jnp.ones((3, 2))}
    grads = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 2)), jnp.float32)}
    for m in METHODS:
        leaves = [x for x in jax.tree.leaves(m.make(3).init(params)) if np.size(x)]
        pointers = [x.unsafe_buffer_pointer() for x in leaves if isinstance(x, jax.Array)]
        assert len(set(pointers)) == len(pointers), f"{m.name}: init shares a buffer"
    for m in [m for m in METHODS if m.name in ("mgda", "gradnorm", "db_mtl", "sdmgrad", "famo")]:
        tx = optax.chain(m.make(3), optax.adam(1e-3))

        def step(p, s, g, tx=tx, m=m):
            u, s = tx.update(g, s, p, task_losses=jnp.ones(3), **m.batch_kwargs(g))
            return optax.apply_updates(p, u), s

        step = jax.jit(step, donate_argnums=(0, 1))
        p, s = step(jax.tree.map(jnp.copy, params), tx.init(params), grads)
        p, s = step(p, s, grads)
        assert np.all(np.isfinite(np.asarray(p["w"]))), m.name
