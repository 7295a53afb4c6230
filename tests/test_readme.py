"""The README's tour runs as written."""

import pathlib
import re


def _python_blocks():
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", readme, re.DOTALL)


def test_readme_tour_runs():
    namespace = {}
    exec(compile(_python_blocks()[0], "README.md", "exec"), namespace)
    assert namespace["mean"].shape == (16,)
    assert namespace["state"].var.shape == (16,)


def test_readme_switching_example_runs():
    (block,) = [b for b in _python_blocks() if "import jbn.linen" in b]
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["layer"].momentum == 0.9
    assert namespace["block_norm"].scale[...].shape == (64,)
