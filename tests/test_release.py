"""The package builds (sdist and wheel), passes twine's checks, and the wheel works in a fresh environment."""

import os
import pathlib
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib import metadata

import pytest

import jbn

ROOT = pathlib.Path(__file__).parent.parent


def _run(*command, cwd=ROOT, timeout=300, env=None):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{' '.join(map(str, command))}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out))
    return out


def test_version_has_one_source():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert metadata.version("jbn") == jbn.__version__
    assert f"## {jbn.__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_sdist_and_wheel_pass_twine_check_and_the_wheel_ships_py_typed(dist):
    wheel, sdist = next(dist.glob("*.whl")), next(dist.glob("*.tar.gz"))
    assert wheel.name.startswith(f"jbn-{jbn.__version__}-") and sdist.name == f"jbn-{jbn.__version__}.tar.gz"
    _run(sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist))
    files = zipfile.ZipFile(wheel).namelist()
    assert {"jbn/py.typed", "jbn/__init__.py", "jbn/kernels/norm.cc"} <= set(files)
    assert not any(name.startswith(("tests/", "examples/", "benchmarks/")) for name in files)


SMOKE = """
import jax, jax.numpy as jnp, optax, jbn, jbn.linen, jbn.nnx
print(jbn.__file__, jbn.__version__)
params = {"w": jnp.ones((4, 3)) / 4, "scale": jnp.ones(3), "bias": jnp.zeros(3)}
optimizer = optax.sgd(0.1)

def loss_fn(params, state, x):
    h, state = jbn.batch_norm(x @ params["w"], state, params["scale"], params["bias"], training=True)
    h = jbn.layer_norm(h, params["scale"], params["bias"])  # the fused CPU kernels, built from the wheel's source
    return jnp.mean(h ** 2 * jnp.arange(3.0)), state

@jax.jit
def step(params, state, opt_state, x):
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), state, opt_state, loss

x = jax.random.normal(jax.random.key(0), (16, 4)) + 3.0
params, state, _, loss = step(params, jbn.batch_norm_state(3), optimizer.init(params), x)
assert jnp.isfinite(loss) and bool(jnp.all(state.mean > 0)), (loss, state)
from jbn import _kernel
assert _kernel.enabled(), "the fused kernels did not build"
print("step ok", float(loss))
"""


def test_the_wheel_installs_into_a_fresh_environment_and_trains_a_step(dist, tmp_path):
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", str(venv))
    python = venv / "bin" / "python"
    # Dependencies come from this environment (no download); jbn itself only from the wheel.
    site_packages = _run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    (pathlib.Path(site_packages) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(next(dist.glob("*.whl"))))
    env = {**os.environ, "JBN_CACHE_DIR": str(tmp_path / "kernels")}  # a fresh cache: built here, from the wheel
    out = _run(str(python), "-c", SMOKE, cwd=tmp_path, env=env)
    assert f"{site_packages}/jbn/__init__.py {jbn.__version__}" in out and "step ok" in out
