"""Test configuration: several CPU devices for cross-device tests, strict rank promotion, hypothesis profiles."""

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_rank_promotion", "raise")

import os  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from jbn import _fused, _stats  # noqa: E402
from tests.helpers import EVERY_PLATFORM  # noqa: E402

# Property tests: a small profile in CI, a large one on demand (HYPOTHESIS_PROFILE=large python -m pytest ...).
_PROFILE = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=6, **_PROFILE)
settings.register_profile("medium", max_examples=300, **_PROFILE)
settings.register_profile("large", max_examples=2000, **_PROFILE)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _statistics_taken(path):
    """A context in which `jbn._stats` takes `path` to exact statistics; caches cleared on entry and exit."""
    patch = pytest.MonkeyPatch()
    patch.setattr(_stats, "BRANCH_FREE_PLATFORMS", EVERY_PLATFORM if path == "branch-free" else ())
    if path not in ("kernel", "as on a CPU"):
        patch.setattr(_fused, "statistics_view", lambda *args: None)
    jax.clear_caches()
    return patch


@pytest.fixture(scope="module", params=["kernel", "run-time branch", "branch-free"])
def statistics_path(request):
    """Runs a module's tests every way `jbn._stats` may take to exact statistics, on any machine: the statistics
    kernel where it applies (CPU, channels-last data), the run-time branch (the CPU's other cases, TPU) and the
    branch-free second pass (GPU). Caches are cleared so no trace of another is reused.
    """
    patch = _statistics_taken(request.param)
    yield request.param
    patch.undo()
    jax.clear_caches()


@pytest.fixture(scope="module", params=["as on a CPU", "branch-free"])
def cpu_or_gpu_statistics(request):
    """The CPU's statistics (the kernel where it applies, the run-time branch elsewhere) and a GPU's, for modules
    whose subject is not the statistics themselves (transformations, properties)."""
    patch = _statistics_taken(request.param)
    yield request.param
    patch.undo()
    jax.clear_caches()
