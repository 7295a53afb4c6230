"""The documentation site builds with no warning, and its API reference covers every public name."""

import os
import pathlib
import re
import subprocess
import sys

import jbn
import jbn.convert
import jbn.linen
import jbn.nnx

ROOT = pathlib.Path(__file__).parent.parent


def test_site_builds_strictly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's notice about its successor, not a warning
    )
    assert result.returncode == 0, result.stderr[-3000:]
    api = (tmp_path / "api" / "jbn" / "index.html").read_text()
    assert "batch_norm" in api and "rsqrt" in api  # rendered from the docstrings


def _public_names():
    names = [f"jbn.{name}" for name in jbn.__all__]
    for module in (jbn.linen, jbn.nnx):  # what the module itself defines (not what it imports)
        names += [
            f"{module.__name__}.{name}"
            for name, value in vars(module).items()
            if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
        ]
    return names


def test_every_public_name_has_an_entry_in_the_api_reference():
    reference = "".join(path.read_text() for path in (ROOT / "docs" / "api").glob("*.md"))
    entries = set(re.findall(r"^::: (\S+)$", reference, re.MULTILINE))
    names = _public_names()
    assert len(names) == 27
    assert entries == {*names, "jbn.convert"}  # the converters' page renders the whole module


def test_readme_and_docs_index_state_the_supported_versions():
    for path in (ROOT / "README.md", ROOT / "docs" / "index.md"):
        assert "Python 3.11+, JAX 0.10.2+, Flax 0.12.8+" in path.read_text(), path
