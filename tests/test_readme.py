"""The README's quickstart runs exactly as written."""

import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _quickstart_block() -> str:
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Quickstart section holds one python block"
    return blocks[0]


def _printed_relative_losses(out: str) -> dict[str, np.ndarray]:
    rows = re.findall(r"^(.+?)\s+relative losses \[([^\]]*)\]", out, re.M)
    return {name.strip(): np.array(vals.split(), float) for name, vals in rows}


def test_readme_quickstart_runs_verbatim_and_balancing_helps(capsys):
    namespace: dict = {}
    exec(compile(_quickstart_block(), str(README), "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "task weights" in out
    rel = _printed_relative_losses(out)
    assert set(rel) == {"plain sum", "MGDA (l2)", "balancer"}, out
    # What the README says below the block: the sum and MGDA-l2 leave tasks 0 and 1 near
    # 0.8 of their first loss, the balancer takes every task below 0.05.
    for name in ("plain sum", "MGDA (l2)"):
        assert np.all(rel[name][:2] > 0.5) and rel[name][2] < 0.05, (name, out)
    assert np.all(rel["balancer"] < 0.05), out
    # ... and the printed table in the README is the one this block prints (rounding aside).
    section = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    (table,) = re.findall(r"```text\n(.*?)```", section, re.S)
    for name, want in _printed_relative_losses(table).items():
        np.testing.assert_allclose(rel[name], want, atol=0.02, err_msg=name)  # any x86-64 CPU


def _section_blocks(title: str) -> list[str]:
    section = README.read_text().split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_representation_section_runs_verbatim(capsys):
    blocks = _section_blocks("Balancing at the shared representation")
    assert len(blocks) == 2
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102
    losses = np.asarray(namespace["losses"])
    assert "weights at z" in capsys.readouterr().out
    # From [0.4, 11036] at the start (README comment) to a fraction of it.
    assert np.all(losses < np.array([0.2, 200.0])), losses
    # The per-task-head variant builds a working gradient function on the same names.
    exec(compile(blocks[1], str(README), "exec"), namespace)  # noqa: S102
    x, y, params = namespace["x"], namespace["y"], namespace["params"]
    params = {"encoder": params["encoder"], "heads": params["heads"]}
    state = namespace["balance"].init(
        namespace["jax"].eval_shape(namespace["encoder"], params, x, y)
    )
    vals, grads, _ = namespace["grad_fn"](params, state, x, y)
    assert vals.shape == (2,) and grads["heads"].shape == (2, 32)


def test_readme_write_your_own_method_runs_verbatim(capsys):
    (block,) = _section_blocks("Write your own method")
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    assert "task weights" in capsys.readouterr().out
    ob = namespace["ob"]
    w = np.asarray(ob.task_weights(namespace["opt_state"]))
    inv = 1.0 / np.array([5.0, 0.5])
    np.testing.assert_allclose(w, inv / inv.sum(), rtol=1e-6)
    # The combined gradient is w @ J, and the weighting runs on a Gramian as well.
    j = np.array([[3.0, 4.0], [0.0, 0.5]])
    np.testing.assert_allclose(np.asarray(namespace["updates"]["w"]), -0.1 * (w @ j), rtol=1e-6)
    weights, _ = namespace["inverse_norm"]()(j @ j.T)
    np.testing.assert_allclose(np.asarray(weights), w, rtol=1e-6)


def test_readme_memory_of_one_gradient_section_runs_verbatim(capsys):
    (block,) = _section_blocks("Balancing at the memory of one gradient")
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    assert "task weights" in capsys.readouterr().out
    losses = np.asarray(namespace["losses"])
    # From [0.4, 11036] at the start (README comment) to a fraction of it.
    assert np.all(losses < np.array([0.2, 200.0])), losses
    # The gradient is the method's on the stacked gradients (checked in depth elsewhere).
    ob, jax = namespace["ob"], namespace["jax"]
    params, x, y, method = (namespace[k] for k in ("params", "x", "y", "method"))

    @jax.jit
    def both(params, state):
        _, grads, _ = namespace["grad_fn"](params, state, x, y)
        losses, stacked = ob.value_and_task_grads(namespace["task_losses"])(params, x, y)
        return grads, method.update(stacked, state, params, task_losses=losses)[0]

    grads, want = both(params, method.init(params))
    for k in ("trunk", "heads"):
        scale = float(np.abs(want[k]).max())
        np.testing.assert_allclose(grads[k], want[k], rtol=1e-4, atol=1e-4 * scale)


def test_readme_checkpointing_section_runs_verbatim(capsys):
    blocks = _section_blocks("Checkpointing")
    assert len(blocks) == 2
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102
    assert "task weights" in capsys.readouterr().out
    ob, jax = namespace["ob"], namespace["jax"]
    assert np.asarray(ob.task_weights(namespace["opt_state"])).shape == (3,)
    restored = namespace["restored"]["opt_state"]
    assert np.asarray(ob.task_weights(restored)).shape == (3,)  # the full-shape state
    # The NNX block, on names the README's Flax NNX section defines.
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Linear(4, 3, rngs=rngs)

    namespace.update(nnx=nnx, Model=Model)
    exec(compile(blocks[1], str(README), "exec"), namespace)  # noqa: S102
    saved = nnx.state(namespace["build"]())
    restored = nnx.state((namespace["model"], namespace["optimizer"]))
    assert jax.tree.structure(saved) == jax.tree.structure(restored)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_readme_accumulation_and_aggregation_section_runs_verbatim(capsys):
    blocks = _section_blocks("Gradient accumulation and optax's aggregation API")
    assert len(blocks) == 2
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102
    assert "updated: True" in capsys.readouterr().out
    ob, state = namespace["ob"], namespace["opt_state"]
    assert int(state.micro_step) == 0 and np.asarray(ob.task_weights(state)).shape == (3,)
    assert np.any(np.asarray(namespace["params"]["w"]) != 0)  # the 4th micro-batch stepped
    exec(compile(blocks[1], str(README), "exec"), namespace)  # noqa: S102
    assert "task weights" in capsys.readouterr().out
    weights = np.asarray(ob.task_weights(namespace["opt_state"]))
    assert weights.shape == (3,) and np.all(np.isfinite(weights))


def test_readme_loss_based_section_runs_verbatim_and_balances(capsys):
    (block,) = _section_blocks("Loss-based methods: one backward pass")
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    assert "task weights" in capsys.readouterr().out
    rel = np.asarray(namespace["losses"] / namespace["first"])
    assert rel.shape == (3,) and np.all(rel < 1 / 30), rel  # the README's claim
    w = np.asarray(namespace["ob"].task_weights(namespace["opt_state"]))
    assert abs(w.sum() - 1.0) < 1e-5  # FAMO's weights: a convex combination
    # The README's comparison: the plain sum (weights 1) leaves task 0 at about half.
    plain = block.replace("ob.famo(num_tasks=3)", "ob.sum(num_tasks=3)")
    assert plain != block
    namespace = {}
    exec(compile(plain, str(README), "exec"), namespace)  # noqa: S102
    rel = np.asarray(namespace["losses"] / namespace["first"])
    assert 0.3 < rel[0] < 0.7 and rel[2] < 1 / 30, rel


def test_readme_two_batches_section_runs_verbatim(capsys):
    (block,) = _section_blocks("Two mini-batches (SDMGrad, MoDo)")
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    assert "task weights" in capsys.readouterr().out
    losses = np.asarray(namespace["losses"])
    # From [9.25, 4.25] at the start to the label noise (0.1^2) within a factor of five.
    assert losses.shape == (2,) and np.all(losses < 0.05), losses
    w = np.asarray(namespace["ob"].task_weights(namespace["opt_state"]))
    assert w.shape == (2,) and abs(w.sum() - 1.0) < 1e-5 and np.all(w >= 0)
