"""Extreme inputs (1e30, 1e-30, constants, one example, bf16 near 1e3) and the non-finite guard."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jbn
import jbn.linen
import jbn.nnx
from tests import reference
from tests.helpers import data, f64

pytestmark = pytest.mark.usefixtures("statistics_path")

NORMS = {  # name: (jbn call, reference call), statistics over every axis but the last for batch norm
    "batch": (
        lambda x, **k: jbn.batch_norm(x, jbn.batch_norm_state(x.shape[-1]), training=True, **k)[0],
        lambda x, **k: reference.batch_norm(x, np.zeros(x.shape[-1]), np.ones(x.shape[-1]), training=True, **k)[0],
    ),
    "layer": (jbn.layer_norm, reference.layer_norm),
    "rms": (jbn.rms_norm, reference.rms_norm),
    "instance": (jbn.instance_norm, reference.instance_norm),
    "group": (functools.partial(jbn.group_norm, num_groups=2), functools.partial(reference.group_norm, num_groups=2)),
}


# rms_norm with epsilon=0 on data near 1e-30 is left out: it cannot tell underflowed squares from zeros
# (documented in its docstring), and its default epsilon gives the right ~0.
EXTREMES = [
    (norm, magnitude, epsilon)
    for norm in NORMS
    for magnitude in (1e30, 1e-30)
    for epsilon in (0.0, 1e-6)
    if not (norm == "rms" and magnitude < 1 and epsilon == 0)
]


@pytest.mark.parametrize(("norm", "magnitude", "epsilon"), EXTREMES)
def test_extreme_magnitudes_are_exact(norm, magnitude, epsilon):
    """Squares of 1e30 overflow float32 and squares of 1e-30 underflow: jbn rescales by a power of two first."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3, 8)) * magnitude, jnp.float32)
    ours, theirs = NORMS[norm]
    y = ours(x, epsilon=epsilon)
    assert np.isfinite(f64(y)).all()
    # With epsilon, data of magnitude 1e-30 normalize to ~1e-27: epsilon dominates, as the formula says.
    np.testing.assert_allclose(f64(y), theirs(f64(x), epsilon=epsilon), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("magnitude", "reported"), [(1e30, np.inf), (1e-30, 0.0)])
def test_moments_report_variances_outside_float32_as_inf_or_zero(magnitude, reported):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((64, 2)) * magnitude, jnp.float32)
    mean, var = jbn.moments(x, 0)
    ref_mean, _ = reference.moments(f64(x), 0)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5)
    np.testing.assert_array_equal(var, reported)  # 1e60 and 1e-60 are not float32 numbers


@pytest.mark.parametrize("value", [0.0, 3.0, 1e30, -1e-30])
@pytest.mark.parametrize("norm", ["batch", "layer", "instance", "group"])
def test_constant_input_gives_bias_and_finite_gradients(norm, value):
    x = jnp.full((4, 3, 8), value, jnp.float32)
    bias = jnp.linspace(-1.0, 1.0, 8)
    ours, _ = NORMS[norm]
    np.testing.assert_allclose(ours(x, bias=bias), jnp.broadcast_to(bias, x.shape), atol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(ours(x, bias=bias) * jnp.arange(8.0)[None, None]))(x)
    assert np.isfinite(grad).all()


def test_batch_of_one_in_training_is_its_own_batch():
    """Documented: one example is normalized by its own statistics (y = bias); the variance it adds is 0."""
    x = data((1, 4), offset=5.0)
    state = jbn.BatchNormState(jnp.ones(4), jnp.full(4, 2.0))
    y, new = jbn.batch_norm(x, state, bias=jnp.full(4, 0.5), training=True, momentum=0.5)
    np.testing.assert_allclose(y, jnp.full((1, 4), 0.5))
    np.testing.assert_allclose(new.mean, 0.5 + 0.5 * x[0], rtol=1e-6)
    np.testing.assert_allclose(new.var, jnp.full(4, 1.0))


@pytest.mark.parametrize("norm", ["batch", "layer", "instance", "group"])
def test_bfloat16_with_mean_1e3(norm):
    x = (1e3 + data((8, 4, 8))).astype(jnp.bfloat16)  # bf16 steps are 4 at 1e3: the data are coarse, not wrong
    ours, theirs = NORMS[norm]
    y = ours(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(f64(y), theirs(f64(x)), atol=3e-2, rtol=1e-2)


def _poisoned():
    x = data((8, 3), offset=1.0)
    return x.at[2, 1].set(jnp.nan)


def test_without_the_guard_a_nan_batch_poisons_the_state():
    _, new = jbn.batch_norm(_poisoned(), jbn.batch_norm_state(3), training=True)
    assert np.isnan(new.mean[1]) and np.isfinite(new.mean[0])


def test_guard_keeps_the_state_of_nonfinite_features_and_shows_the_nan():
    state = jbn.BatchNormState(jnp.array([1.0, 2.0, 3.0]), jnp.array([4.0, 5.0, 6.0]))
    x = _poisoned().at[0, 2].set(jnp.inf)
    y, new = jbn.batch_norm(x, state, training=True, momentum=0.5, skip_nonfinite_updates=True)
    assert np.isnan(f64(y)[:, 1]).all() and np.isfinite(f64(y)[:, 0]).all()
    np.testing.assert_array_equal(new.mean[1:], state.mean[1:])
    np.testing.assert_array_equal(new.var[1:], state.var[1:])
    _, expected_mean, expected_var = reference.batch_norm(
        f64(x)[:, :1], state.mean[:1], state.var[:1], training=True, momentum=0.5
    )
    np.testing.assert_allclose(new.mean[:1], expected_mean, rtol=1e-6)
    np.testing.assert_allclose(new.var[:1], expected_var, rtol=1e-6)


def test_guard_under_axis_name_skips_on_every_participant():
    state = jbn.batch_norm_state(3)
    fn = functools.partial(jbn.batch_norm, state=state, training=True, axis_name="b", skip_nonfinite_updates=True)
    _, new = jax.vmap(lambda xi: fn(xi), axis_name="b", out_axes=(0, None))(_poisoned())
    assert new.mean[1] == 0.0 and new.var[1] == 1.0  # one example's NaN reaches the pooled statistics
    assert new.mean[0] != 0.0


def test_guard_in_the_flax_modules():
    x = _poisoned()
    layer = jbn.linen.BatchNorm(use_running_average=False, skip_nonfinite_updates=True)
    variables = layer.init(jax.random.key(0), x)
    _, updates = layer.apply(variables, x, mutable=["batch_stats"])
    assert updates["batch_stats"]["mean"][1] == 0.0
    assert isinstance(layer, nn.BatchNorm)
    module = jbn.nnx.BatchNorm(3, skip_nonfinite_updates=True, rngs=nnx.Rngs(0))
    module(x)
    assert module.mean[1] == 0.0 and module.mean[0] != 0.0
