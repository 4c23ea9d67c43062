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
