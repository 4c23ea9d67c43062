"""The README's quickstart runs exactly as written."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _quickstart_block() -> str:
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Quickstart section holds one python block"
    return blocks[0]


def test_readme_quickstart_runs_verbatim_and_learns(capsys):
    namespace: dict = {}
    exec(compile(_quickstart_block(), str(README), "exec"), namespace)  # noqa: S102
    assert "task weights" in capsys.readouterr().out
    losses = np.asarray(namespace["losses"])
    assert losses.shape == (2,) and np.all(losses < 1e-2), losses


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
