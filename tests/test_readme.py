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
