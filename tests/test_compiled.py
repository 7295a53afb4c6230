"""What XLA:CPU compiles jbn's batch norm into: the counts that decide its speed there (not timings).

XLA:CPU runs a program of at most 8 operations in order on the calling thread and a longer one as a graph on its
thread pool, and writes to memory every array that a fusion outputs; see ``docs/performance.md``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from jbn import _fused, _stats
from tests import reference
from tests.helpers import data, f64, top_level_operations

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's programs")


@pytest.fixture(autouse=True, params=[True, False], ids=["kernel", "run-time branch"])
def cpu_statistics(request, monkeypatch):
    """Both ways batch norm's statistics go on the CPU: the statistics kernel, and XLA's sums with the branch."""
    monkeypatch.setattr(_stats, "BRANCH_FREE_PLATFORMS", ())
    if not request.param:
        monkeypatch.setattr(_fused, "statistics_view", lambda *args: None)


def test_a_batch_norm_forward_pass_is_at_most_8_operations():
    """Normalizing runs inside the statistics' run-time branch, so the top level keeps the sums, the check, the
    branch and the running averages."""
    x, state = data((256, 64)), jbn.batch_norm_state(64)
    forward = jax.jit(lambda x, state: jbn.batch_norm(x, state, training=True))
    assert len(top_level_operations(forward.lower(x, state).compile().as_text())) <= 8
    y, _ = forward(x, state)
    ref_mean, ref_var = reference.moments(f64(x), 0)
    np.testing.assert_allclose(y, (f64(x) - ref_mean) / np.sqrt(ref_var + 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 4, 4, 8), (64, 8, 4, 4)], ids=["NHWC", "NCHW"])
def test_a_batch_norm_training_step_writes_no_array_of_x_size_but_dx(shape):
    """y is written inside the branch; x-hat is not written for the sum of dy * x-hat (XLA shared it with dx)."""
    x, ct = data(shape), data(shape, seed=1)
    feature_axis = -1 if shape[-1] == 8 else 1
    state = jbn.batch_norm_state(8)

    def loss(x, scale):
        y, _ = jbn.batch_norm(x, state, scale, training=True, feature_axes=feature_axis)
        return jnp.sum(y * ct)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    text = step.lower(x, jnp.ones(8)).compile().as_text()
    entry = text[text.index("\nENTRY") :]
    written = [
        line for line in entry.splitlines() if " fusion(" in line and f"f32[{','.join(map(str, shape))}]" in line
    ]
    assert len(written) == 1, written
    dx, dscale = step(x, jnp.ones(8))
    axes = tuple(a for a in range(4) if a != feature_axis % 4)
    mean, var = (np.expand_dims(v, axes) for v in reference.moments(f64(x), axes))
    xhat, g = (f64(x) - mean) / np.sqrt(var + 1e-5), f64(ct)
    expected_dx = (g - g.mean(axes, keepdims=True) - xhat * (g * xhat).mean(axes, keepdims=True)) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dscale, np.sum(g * xhat, axes), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_fast_variance", [False, True])
def test_a_bfloat16_batch_norm_forward_pass_writes_no_float32_copy_of_x(use_fast_variance):
    """Each sum reads bfloat16 x and upcasts it inside its fusion (``_stats.upcast_apart``); shared, XLA wrote one
    float32 copy of x for all of them (it did with ``use_fast_variance``: XLA dropped the constant tags that kept
    the upcasts apart). The top level and the branch that centered data take."""
    x, state = data((256, 64), jnp.bfloat16), jbn.batch_norm_state(64)
    forward = jax.jit(lambda x: jbn.batch_norm(x, state, training=True, use_fast_variance=use_fast_variance))
    text = forward.lower(x).compile().as_text()
    entry = text[text.index("\nENTRY") :]
    keep = (
        []
        if use_fast_variance
        else [text[text.index(name) :] for name in re.findall(r"branch_computations={(%[\w.-]+)", entry)]
    )
    written = [line for part in [entry, *keep] for line in part.split("\n}\n")[0].splitlines() if " fusion(" in line]
    assert [line for line in written if "f32[256,64]" in line] == []
    y, _ = forward(x)
    ref_mean, ref_var = reference.moments(f64(x), 0)
    np.testing.assert_allclose(f64(y), (f64(x) - ref_mean) / np.sqrt(ref_var + 1e-5), rtol=1e-2, atol=1e-2)
