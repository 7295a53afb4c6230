"""jbn.moments: exactness on both sides of the cancellation limit, masks, dtypes and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from jbn import _fused, _stats
from tests import reference
from tests.helpers import EVERY_PLATFORM, MODES, call, data, f64

pytestmark = pytest.mark.usefixtures("statistics_path")

# (shape, axes, mask shape or None)
CASES = [
    ((8, 3), 0, None),
    ((4, 5, 6), (0, 2), None),
    ((4, 5, 6), -1, (4, 5, 1)),
    ((4, 5, 6), (0, 1, 2), (5, 6)),
    ((4, 5), (), None),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("offset", [0.0, 3.0, 1e4])
@pytest.mark.parametrize(("shape", "axes", "mask_shape"), CASES)
def test_moments_match_reference(shape, axes, mask_shape, offset, mode):
    x = data(shape, offset=offset)
    kwargs = {}
    if mask_shape is not None:
        kwargs["mask"] = data(mask_shape, seed=3) > -0.3
    mean, var = call(mode, jbn.moments, x, axes=axes, **kwargs)
    ref_mean, ref_var = reference.moments(f64(x), axes, kwargs.get("mask"))
    assert mean.dtype == var.dtype == jnp.float32
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("ratio", [0.0, 6.9, 7.1, 100.0, 1e8])
def test_variance_is_exact_on_both_sides_of_the_cancellation_limit(ratio):
    """mean^2 / var around 7 switches from the one-pass formula to the shifted second pass."""
    z = np.random.default_rng(4).standard_normal((4096, 4))
    x = jnp.asarray((z - z.mean(0)) / z.std(0) + np.sqrt(ratio), jnp.float32)
    _, var = jax.jit(jbn.moments, static_argnums=1)(x, 0)
    _, ref_var = reference.moments(f64(x), 0)
    np.testing.assert_allclose(var, ref_var, rtol=3e-6)


def test_peers_failure_case_tiny_spread_around_1000():
    x = 1000.0 + 0.01 * data((4096, 2))
    mean, var = jbn.moments(x, 0)
    ref_mean, ref_var = reference.moments(f64(x), 0)
    np.testing.assert_allclose(var, ref_var, rtol=1e-4)  # Flax's default gives 0 or 0.125 here
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-7)


def test_masked_entries_may_hold_nan_and_inf():
    x = data((6, 4), offset=2.0)
    mask = jnp.arange(6)[:, None] < 4
    poisoned = jnp.where(mask, x, jnp.array([jnp.nan, jnp.inf, -jnp.inf, jnp.nan]))
    mean, var = jbn.moments(poisoned, 0, mask=mask)
    ref_mean, ref_var = reference.moments(f64(x)[:4], 0)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=1e-5)


def test_empty_selection_gives_zero_mean_and_variance():
    mean, var = jbn.moments(jnp.full((4, 3), jnp.nan), 0, mask=jnp.zeros((4, 1), bool))
    np.testing.assert_array_equal(mean, 0.0)
    np.testing.assert_array_equal(var, 0.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_statistics_are_float32(dtype):
    x = data((64, 4), offset=300.0, spread=3.0).astype(dtype)  # 300**2 overflows float16
    mean, var = jbn.moments(x, 0)
    assert mean.dtype == var.dtype == jnp.float32
    ref_mean, ref_var = reference.moments(f64(x), 0)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=1e-4)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_gradients_of_the_statistics(offset):
    x = data((16, 3), offset=offset)
    weights = jnp.array([1.0, -2.0, 0.5])

    def loss(x):
        mean, var = jbn.moments(x, 0)
        return jnp.sum(weights * var) + jnp.sum(mean)

    grad = jax.grad(loss)(x)
    centered = f64(x) - f64(x).mean(0)
    expected = 2 * centered / 16 * np.asarray(weights, np.float64) + 1 / 16
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_constant_input_has_zero_variance_and_finite_gradients():
    x = jnp.full((5, 2), 3.0)
    _, var = jbn.moments(x, 0)
    np.testing.assert_array_equal(var, 0.0)
    grad = jax.grad(lambda x: jnp.sum(jbn.layer_norm(x, bias=jnp.ones(2), reduction_axes=0, feature_axes=1)))(x)
    assert np.isfinite(grad).all()


def test_vmap_with_a_different_path_per_example():
    x = jnp.stack([data((32, 2)), data((32, 2), seed=1, offset=1e4)])  # one per side of the limit
    _, var = jax.vmap(lambda xi: jbn.moments(xi, 0))(x)
    for i in range(2):
        np.testing.assert_allclose(var[i], reference.moments(f64(x[i]), 0)[1], rtol=1e-5)


def test_under_vmap_one_branch_runs_for_every_example(monkeypatch):
    """A mapped switch would compute every branch and select; the most careful branch serves all examples."""
    monkeypatch.setattr(_stats, "BRANCH_FREE_PLATFORMS", ())
    monkeypatch.setattr(_fused, "statistics_view", lambda *args: None)
    x = jnp.stack([data((32, 2)), data((32, 2), seed=1, offset=1e4)])  # one per side of the limit
    vmapped = jax.jit(jax.vmap(jax.vmap(lambda xi: jbn.moments(xi, 0)), in_axes=1, out_axes=1))
    assert vmapped.lower(x[:, None]).compile().as_text().count(" conditional(") == 1
    _, var = vmapped(x[:, None])
    for i in range(2):
        np.testing.assert_allclose(var[i, 0], reference.moments(f64(x[i]), 0)[1], rtol=1e-5)


def test_the_platform_compiled_for_decides_whether_the_statistics_branch_at_run_time(monkeypatch):
    """A GPU runs a branch by waiting for the host, so there the statistics take their second pass unconditionally;
    the choice is made for the platform compiled for (here by naming this one), not by the default backend."""
    x = data((64, 8), offset=1e4)

    def conditionals():
        return jax.jit(lambda x: jbn.moments(x, 0)).lower(x).compile().as_text().count(" conditional(")

    monkeypatch.setattr(_fused, "statistics_view", lambda *args: None)
    monkeypatch.setattr(_stats, "BRANCH_FREE_PLATFORMS", ())
    assert conditionals() == 1
    monkeypatch.setattr(_stats, "BRANCH_FREE_PLATFORMS", EVERY_PLATFORM)
    assert conditionals() == 0
    np.testing.assert_allclose(jbn.moments(x, 0)[1], reference.moments(f64(x), 0)[1], rtol=1e-5)
