"""jbn.batch_renorm against the float64 formula, batch norm as its limit, its gradients and its errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from tests import reference
from tests.helpers import LAYOUTS, MODES, call, data, feature_values

FAR = {"mean": 1.5, "var": 9.0}  # running statistics far from the batch's: r and d are clipped
NEAR = {"mean": 0.1, "var": 1.2}


def _state(shape, feature_axes, values):
    axes = (feature_axes,) if isinstance(feature_axes, int) else feature_axes
    features = tuple(shape[a] for a in sorted(a % len(shape) for a in axes))
    return jbn.BatchNormState(jnp.full(features, values["mean"]), jnp.full(features, values["var"]))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("running", [FAR, NEAR], ids=["clipped", "unclipped"])
@pytest.mark.parametrize(("shape", "feature_axes"), LAYOUTS)
def test_training_matches_reference(shape, feature_axes, running, mode):
    x = data(shape, offset=0.3)
    scale, bias = feature_values(shape, feature_axes)
    state = _state(shape, feature_axes, running)
    y, new_state = call(
        mode,
        jbn.batch_renorm,
        x,
        state,
        scale,
        bias,
        training=True,
        rmax=1.5,
        dmax=0.5,
        feature_axes=feature_axes,
        momentum=0.9,
    )
    expected_y, mean, var = reference.batch_renorm(
        x, state.mean, state.var, scale, bias, rmax=1.5, dmax=0.5, feature_axes=feature_axes, momentum=0.9
    )
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(new_state.mean, mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new_state.var, var, rtol=1e-6)


@pytest.mark.parametrize(("shape", "feature_axes"), LAYOUTS)
def test_rmax_1_and_dmax_0_is_batch_norm(shape, feature_axes):
    x = data(shape, offset=2.0)
    scale, bias = feature_values(shape, feature_axes)
    state = _state(shape, feature_axes, FAR)
    kwargs = {"training": True, "feature_axes": feature_axes}
    renorm = functools.partial(jbn.batch_renorm, x, state, scale, bias, rmax=1.0, dmax=0.0, **kwargs)
    plain = functools.partial(jbn.batch_norm, x, state, scale, bias, **kwargs)
    (y, renorm_state), (expected_y, expected_state) = renorm(), plain()
    np.testing.assert_allclose(y, expected_y, rtol=1e-6, atol=1e-6)  # the same value, rounded once more
    np.testing.assert_array_equal(renorm_state.mean, expected_state.mean)
    np.testing.assert_array_equal(renorm_state.var, expected_state.var)
    loss = functools.partial(lambda fn, x, s: jnp.sum(jnp.sin(fn(x, state, s, bias, **kwargs)[0])))
    got = jax.grad(lambda x, s: loss(functools.partial(jbn.batch_renorm, rmax=1.0, dmax=0.0), x, s), (0, 1))(x, scale)
    expected = jax.grad(lambda x, s: loss(jbn.batch_norm, x, s), (0, 1))(x, scale)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_gradients_treat_r_and_d_as_constants():
    """Autodiff of the float64 formula with r and d under stop_gradient, as in the paper."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jnp.asarray(1.0 + 2.0 * rng.standard_normal((6, 3)))
        scale, bias = jnp.asarray([0.5, 1.0, 2.0]), jnp.asarray([0.1, 0.2, 0.3])
        state = jbn.BatchNormState(jnp.asarray([3.0, 0.0, 1.0]), jnp.asarray([0.5, 9.0, 4.0]))
        weights = jnp.asarray(rng.standard_normal((6, 3)))

        def plain(x, scale, bias):
            mean, var = jnp.mean(x, 0, keepdims=True), jnp.var(x, 0, keepdims=True)
            sigma, batch_sigma = jnp.sqrt(state.var[None] + 1e-5), jnp.sqrt(var + 1e-5)
            r = jax.lax.stop_gradient(jnp.clip(batch_sigma / sigma, 1 / 2.0, 2.0))
            d = jax.lax.stop_gradient(jnp.clip((mean - state.mean[None]) / sigma, -1.0, 1.0))
            return ((x - mean) / batch_sigma * r + d) * scale[None] + bias[None]

        def ours(x, scale, bias):
            return jbn.batch_renorm(x, state, scale, bias, training=True, rmax=2.0, dmax=1.0)[0]

        def loss(fn):
            return lambda *a: jnp.sum(jnp.sin(fn(*a)) * weights)

        got = jax.grad(loss(ours), (0, 1, 2))(x, scale, bias)
        expected = jax.grad(loss(plain), (0, 1, 2))(x, scale, bias)
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)


def test_limits_may_be_traced_for_a_schedule():
    x = data((8, 3), offset=1.0)
    state = _state((8, 3), -1, FAR)

    @jax.jit
    def step(x, state, rmax, dmax):
        return jbn.batch_renorm(x, state, training=True, rmax=rmax, dmax=dmax)

    for rmax, dmax in ((1.0, 0.0), (2.0, 1.0)):
        y, _ = step(x, state, rmax, dmax)
        expected, _, _ = reference.batch_renorm(x, state.mean, state.var, None, None, rmax=rmax, dmax=dmax)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=2e-5)


def test_eval_is_batch_norm_inference():
    x, state = data((8, 3)), _state((8, 3), -1, NEAR)
    y, same = jbn.batch_renorm(x, state, training=False)
    assert same is state
    np.testing.assert_array_equal(y, jbn.batch_norm(x, state, training=False)[0])


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"rmax": 0.5, "dmax": 1.0}, r"`rmax`=0.5 must be >= 1"),
        ({"rmax": 2.0, "dmax": -1.0}, r"`dmax`=-1.0 must be >= 0"),
    ],
)
def test_bad_limits_are_named(limits, message):
    with pytest.raises(ValueError, match=message):
        jbn.batch_renorm(data((4, 3)), jbn.batch_norm_state(3), training=True, **limits)
