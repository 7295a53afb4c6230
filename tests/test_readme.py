"""The README's tour runs as written."""

import pathlib
import re


def test_readme_tour_runs():
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    tour = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)[0]
    namespace = {}
    exec(compile(tour, "README.md", "exec"), namespace)
    assert namespace["mean"].shape == (16,)
    assert namespace["state"].var.shape == (16,)
