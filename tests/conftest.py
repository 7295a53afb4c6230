"""Test configuration: several CPU devices for cross-device tests, strict rank promotion, hypothesis profiles."""

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_rank_promotion", "raise")

import os  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from jbn import _stats  # noqa: E402
from tests.helpers import EVERY_PLATFORM  # noqa: E402

# Property tests: a small profile in CI, a large one on demand (HYPOTHESIS_PROFILE=large python -m pytest ...).
_PROFILE = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=6, **_PROFILE)
settings.register_profile("medium", max_examples=300, **_PROFILE)
settings.register_profile("large", max_examples=2000, **_PROFILE)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module", params=["run-time branch", "branch-free"])
def statistics_path(request):
    """Runs a module's tests both ways `jbn._stats` may take to exact statistics, on any machine: the run-time
    branch (CPU, TPU) and the branch-free second pass (GPU). Caches are cleared so no trace of the other is reused.
    """
    everywhere = EVERY_PLATFORM if request.param == "branch-free" else ()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_stats, "BRANCH_FREE_PLATFORMS", everywhere)
        jax.clear_caches()
        yield request.param
        jax.clear_caches()
