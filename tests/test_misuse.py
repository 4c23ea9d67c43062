"""No silent misuse: each usual mistake raises a ``ValueError`` (or warns) saying what to do.

Each of these used to run without a word (issue 19). The messages are checked for the
part that tells the user what to do, so a reworded message still has to say it.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_balance as ob
from tests import inputs as I
from tests.methods import METHODS

ALL = [pytest.param(m, id=m.name) for m in METHODS]
T = 3

# Two leaves that share their first dimension: an ordinary (unstacked) gradient of these
# params looks like stacked gradients of T=8 tasks.
SQUARE = {"a": jnp.zeros((8, 8)), "b": jnp.zeros((8, 3))}


# ----------------------------------------------------------------------------------------
# Unstacked gradients read as stacked.
# ----------------------------------------------------------------------------------------


def test_unstacked_gradients_with_params_raise():
    tx = ob.mgda()
    with pytest.raises(ValueError, match=r"needs stacked per-task gradients.*value_and_task_grads"):
        tx.update(SQUARE, tx.init(SQUARE), SQUARE)


def test_unstacked_gradients_without_params_but_with_num_tasks_raise():
    tx = ob.mgda(num_tasks=T)
    with pytest.raises(ValueError, match=r"num_tasks=3.*pass `params` to `update`"):
        tx.update(SQUARE, tx.init(SQUARE))


def test_unstacked_gradients_without_params_or_num_tasks_are_the_documented_limit():
    """Without `params` and `num_tasks` nothing tells (8, 8), (8, 3) gradients from T=8
    stacked ones: the README ("Common mistakes") says to pass both. Pinned here so the
    README stays true."""
    tx = ob.mgda()
    _, state = tx.update(SQUARE, tx.init(SQUARE))
    assert state.weights.shape == (8,)


# ----------------------------------------------------------------------------------------
# Masks that select nothing; mask arguments that are not masks.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", ALL)
def test_shared_mask_selecting_no_leaf_raises(m):
    tx = m.make(T, shared={"bias": False, "dense": False})
    g = I.tree(I.rand_j(0, T))
    with pytest.raises(ValueError, match=r"selects no parameter leaf.*shared=\{'trunk': True"):
        tx.update(g, tx.init(I.params()), I.params(), task_losses=I.losses_for(T))


def test_gradnorm_norm_mask_disjoint_from_shared_raises():
    tx = ob.gradnorm(
        T, shared={"bias": True, "dense": False}, norm_mask={"bias": False, "dense": True}
    )
    g = I.tree(I.rand_j(0, T))
    with pytest.raises(ValueError, match=r"`norm_mask` and `shared` have no leaf in common"):
        tx.update(g, tx.init(I.params()), I.params(), task_losses=I.losses_for(T))


@pytest.mark.parametrize("mask", [True, False, np.bool_(True), jnp.array(True)])
def test_a_bare_bool_mask_is_refused_at_construction(mask):
    with pytest.raises(ValueError, match=r"`shared` must be None.*static_args"):
        ob.upgrad(shared=mask)
    with pytest.raises(ValueError, match=r"`norm_mask` must be None.*static_args"):
        ob.gradnorm(T, norm_mask=mask)


def test_inject_hyperparams_with_a_callable_mask_and_no_static_args_raises():
    """optax takes any callable for a schedule and calls it with the step count; a mask
    callable then returns a bool, which the factory now refuses (it used to be read as
    "every leaf shared", silently)."""

    def shared(params):  # every leaf but the head
        return jax.tree_util.tree_map_with_path(lambda path, _: "head" not in str(path), params)

    params = {"trunk": jnp.zeros(2), "head": jnp.zeros(2)}
    inj = optax.inject_hyperparams(ob.cagrad, static_args=("num_tasks",))
    with pytest.raises(ValueError, match=r"list it in `static_args`"):
        inj(c=0.5, num_tasks=2, shared=shared).init(params)


def test_nnx_state_with_a_dict_mask_gives_a_short_message_pointing_to_map_state():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.trunk = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(6)])
            self.heads = nnx.Linear(4, 3, rngs=rngs)

    params = nnx.state(Model(nnx.Rngs(0)), nnx.Param)
    stacked = jax.tree.map(lambda p: jnp.zeros((T, *p.shape)), params)
    tx = ob.mgda(num_tasks=T, shared={"trunk": True, "heads": False})
    with pytest.raises(ValueError) as e:
        tx.update(stacked, tx.init(params), params)
    msg = str(e.value)
    assert "does not match the parameters' structure" in msg
    assert "nnx.map_state(lambda path, _: path[0] != 'heads', params)" in msg
    assert len(msg) < 700, len(msg)  # was 1540 characters of tree dump


# ----------------------------------------------------------------------------------------
# Integer parameters.
# ----------------------------------------------------------------------------------------


def test_integer_parameters_raise_naming_the_leaf():
    params = {"w": jnp.zeros(4), "step": jnp.zeros((), jnp.int32)}

    def losses(p):
        return jnp.stack([jnp.sum(p["w"]), jnp.sum(p["w"] ** 2)])

    _, grads = ob.value_and_task_grads(losses)(params)
    assert grads["step"].dtype == jax.dtypes.float0
    tx = ob.mgda(num_tasks=2)
    with pytest.raises(ValueError, match=r"leaf \['step'\] has dtype float0.*nnx.Param"):
        tx.update(grads, tx.init(params), params)
    with pytest.raises(ValueError, match=r"leaf \['w'\] has dtype int32"):
        tx.update({"w": jnp.zeros((2, 4), jnp.int32)}, tx.init({"w": jnp.zeros(4)}))


# ----------------------------------------------------------------------------------------
# The method after the optimizer: a documented limit.
# ----------------------------------------------------------------------------------------


def test_method_after_the_optimizer_is_the_documented_limit():
    """``chain(adam, mgda)``: adam sees the stacked gradients and its moments broadcast to
    (T, *param.shape), so its state changes shape at the first update. The method cannot
    see what runs before it in a chain; the README ("Common mistakes") says to put the
    method first. Pinned so the README stays true."""
    params = I.params()
    tx = optax.chain(optax.adam(1e-3), ob.mgda(num_tasks=T))
    s0 = tx.init(params)
    _, s1 = tx.update(I.tree(I.rand_j(0, T)), s0, params)
    assert I.avals(s1) != I.avals(s0)
    assert s1[0][0].mu["bias"].shape == (T, 2)


# ----------------------------------------------------------------------------------------
# Losses that a loss-normalised method cannot use.
# ----------------------------------------------------------------------------------------

J2 = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


@pytest.mark.parametrize("norm_type", ["loss", "loss+"])
def test_negative_loss_raises_when_concrete(norm_type):
    for tx in (
        ob.mgda(norm_type=norm_type, num_tasks=2),
        ob.cr_mogm(ob.weightings.mgda(norm_type=norm_type), num_tasks=2),
    ):
        with pytest.raises(ValueError, match=r"tasks \[0\] are negative.*norm_type='l2'"):
            tx.update(J2, tx.init(jnp.zeros(3)), task_losses=jnp.array([-0.5, 2.0]))


def test_negative_loss_warns_at_run_time_under_jit():
    tx = ob.mgda(norm_type="loss", num_tasks=2)
    state = tx.init(jnp.zeros(3))
    step = jax.jit(lambda g, s, losses: tx.update(g, s, task_losses=losses))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # positive and zero losses: no warning
        step(J2, state, jnp.array([0.5, 2.0]))
        step(J2, state, jnp.array([0.0, 2.0]))
        jax.effects_barrier()
    with pytest.warns(UserWarning, match=r"tasks \[1\] are negative"):
        step(J2, state, jnp.array([0.5, -2.0]))
        jax.effects_barrier()
