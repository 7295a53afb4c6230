"""jbn.batch_norm against the float64 reference: outputs, state updates, modes, masks, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from tests import reference
from tests.helpers import DTYPES, LAYOUTS, MODES, call, data, f64, feature_values, tolerance


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "feature_axes"), LAYOUTS)
def test_training_matches_reference(shape, feature_axes, dtype, mode):
    x = data(shape, dtype, offset=2.0)
    scale, bias = feature_values(shape, feature_axes)
    state = jbn.BatchNormState(*feature_values(shape, feature_axes, seed=2))
    state = state._replace(var=jnp.abs(state.var) + 0.5)
    y, new = call(mode, jbn.batch_norm, x, state, scale, bias, training=True, feature_axes=feature_axes, momentum=0.9)
    ref_y, ref_mean, ref_var = reference.batch_norm(
        f64(x), state.mean, state.var, scale, bias, training=True, feature_axes=feature_axes, momentum=0.9
    )
    assert y.dtype == dtype and y.shape == shape
    np.testing.assert_allclose(f64(y), ref_y, **tolerance(dtype))
    assert new.mean.dtype == new.var.dtype == jnp.float32
    np.testing.assert_allclose(new.mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.var, ref_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("shape", "feature_axes"), LAYOUTS)
def test_eval_uses_running_statistics_and_returns_state(shape, feature_axes, mode):
    x = data(shape)
    scale, bias = feature_values(shape, feature_axes)
    var, mean = feature_values(shape, feature_axes, seed=3)  # var from the positive draw
    state = jbn.BatchNormState(mean, var)
    y, new = call(mode, jbn.batch_norm, x, state, scale, bias, training=False, feature_axes=feature_axes)
    ref_y, _, _ = reference.batch_norm(f64(x), mean, var, scale, bias, training=False, feature_axes=feature_axes)
    np.testing.assert_allclose(f64(y), ref_y, rtol=1e-5, atol=2e-5)
    if mode == "eager":
        assert new is state
    np.testing.assert_array_equal(new.mean, mean)
    np.testing.assert_array_equal(new.var, var)


def test_moving_average_rule_by_hand():
    x = jnp.array([[0.0, 1.0], [2.0, 5.0]])
    state = jbn.BatchNormState(jnp.array([1.0, 1.0]), jnp.array([2.0, 2.0]))
    _, new = jbn.batch_norm(x, state, training=True, momentum=0.75)
    # batch mean (1, 3), biased var (1, 4)
    np.testing.assert_allclose(new.mean, [0.75 * 1 + 0.25 * 1, 0.75 * 1 + 0.25 * 3])
    np.testing.assert_allclose(new.var, [0.75 * 2 + 0.25 * 1, 0.75 * 2 + 0.25 * 4])


@pytest.mark.parametrize(("momentum", "keeps_old"), [(1.0, True), (0.0, False)])
def test_momentum_one_keeps_and_zero_replaces(momentum, keeps_old):
    x = data((16, 4), offset=3.0)
    state = jbn.batch_norm_state(4)
    _, new = jbn.batch_norm(x, state, training=True, momentum=momentum)
    batch_mean, batch_var = reference.moments(f64(x), 0)
    np.testing.assert_allclose(new.mean, state.mean if keeps_old else batch_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new.var, state.var if keeps_old else batch_var, rtol=1e-6, atol=1e-6)


def test_scale_and_bias_are_optional():
    x = data((8, 3))
    state = jbn.batch_norm_state(3)
    y, _ = jbn.batch_norm(x, state, training=True)
    ref_y, _, _ = reference.batch_norm(f64(x), state.mean, state.var, training=True)
    np.testing.assert_allclose(f64(y), ref_y, rtol=1e-5, atol=1e-5)


def test_batch_norm_state_shapes_and_dtype():
    state = jbn.batch_norm_state((5, 3), dtype=jnp.bfloat16)
    assert state.mean.shape == state.var.shape == (5, 3)
    assert state.mean.dtype == jnp.bfloat16
    np.testing.assert_array_equal(state.mean, 0)
    np.testing.assert_array_equal(state.var, 1)
    assert jax.tree_util.tree_structure(state).num_leaves == 2


def test_state_dtype_is_kept_and_output_dtype_can_be_chosen():
    x = data((8, 3), jnp.bfloat16)
    state = jbn.batch_norm_state(3, dtype=jnp.bfloat16)
    y, new = jbn.batch_norm(x, state, training=True, dtype=jnp.float32)
    assert y.dtype == jnp.float32
    assert new.mean.dtype == new.var.dtype == jnp.bfloat16


@pytest.mark.parametrize("mode", MODES)
def test_mask_ignores_nan_in_masked_rows(mode):
    x = data((10, 4), offset=1.0)
    valid = jnp.arange(10) < 6
    x = jnp.where(valid[:, None], x, jnp.nan)
    state = jbn.batch_norm_state(4)
    y, new = call(mode, jbn.batch_norm, x, state, training=True, mask=valid[:, None], momentum=0.5)
    ref_y, ref_mean, ref_var = reference.batch_norm(f64(x)[:6], state.mean, state.var, training=True, momentum=0.5)
    np.testing.assert_allclose(f64(y)[:6], ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.mean, ref_mean, rtol=1e-6)
    np.testing.assert_allclose(new.var, ref_var, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_all_false_mask_keeps_state_and_output_is_finite(mode):
    x = data((6, 3))
    state = jbn.BatchNormState(jnp.array([0.5, -1.0, 2.0]), jnp.array([2.0, 1.0, 0.5]))
    y, new = call(mode, jbn.batch_norm, x, state, training=True, mask=jnp.zeros((6, 1), bool))
    np.testing.assert_array_equal(new.mean, state.mean)
    np.testing.assert_array_equal(new.var, state.var)
    assert np.isfinite(f64(y)).all()
    ref_y, _, _ = reference.batch_norm(f64(x), state.mean, state.var, training=False)
    np.testing.assert_allclose(f64(y), ref_y, rtol=1e-5, atol=1e-5)


def test_per_feature_mask_updates_only_features_with_data():
    x = data((6, 3))
    mask = jnp.array([[True, False, True]] * 3 + [[True, False, False]] * 3)
    state = jbn.batch_norm_state(3)
    _, new = jbn.batch_norm(x, state, training=True, mask=mask, momentum=0.0)
    np.testing.assert_allclose(new.mean[0], f64(x)[:, 0].mean(), rtol=1e-6)
    assert new.mean[1] == 0.0 and new.var[1] == 1.0
    np.testing.assert_allclose(new.var[2], f64(x)[:3, 2].var(), rtol=1e-5)


def test_batch_of_one_is_finite():
    x = data((1, 3))
    y, new = jbn.batch_norm(x, jbn.batch_norm_state(3), jnp.ones(3), jnp.full(3, 0.25), training=True)
    np.testing.assert_allclose(y, jnp.full((1, 3), 0.25))  # a single example is its own mean
    assert np.isfinite(new.var).all()


@pytest.mark.parametrize("mode", MODES)
def test_offset_data_is_exact(mode):
    x = data((64, 8, 8, 16), offset=1e4)
    y, new = call(mode, jbn.batch_norm, x, jbn.batch_norm_state(16), training=True, momentum=0.0)
    ref_y, ref_mean, ref_var = reference.batch_norm(f64(x), np.zeros(16), np.ones(16), training=True, momentum=0.0)
    assert np.abs(f64(y) - ref_y).max() < 1e-3
    np.testing.assert_allclose(new.var, ref_var, rtol=1e-4)
    np.testing.assert_allclose(new.mean, ref_mean, rtol=1e-7)


def test_gradients_match_finite_differences_of_reference():
    x = data((6, 3), offset=0.5)
    scale, bias = feature_values((6, 3), -1)
    weights = data((6, 3), seed=7)
    state = jbn.batch_norm_state(3)

    def loss(x, scale, bias):
        return jnp.sum(jbn.batch_norm(x, state, scale, bias, training=True)[0] * weights)

    def ref_loss(x, scale, bias):
        y, _, _ = reference.batch_norm(x, np.zeros(3), np.ones(3), scale, bias, training=True)
        return float(np.sum(y * f64(weights)))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)
    for grad, argnum in zip(grads, range(3), strict=True):
        args = [f64(x), f64(scale), f64(bias)]
        numeric = np.zeros_like(args[argnum])
        for index in np.ndindex(numeric.shape):
            plus, minus = [a.copy() for a in args], [a.copy() for a in args]
            plus[argnum][index] += 1e-6
            minus[argnum][index] -= 1e-6
            numeric[index] = (ref_loss(*plus) - ref_loss(*minus)) / 2e-6
        np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)
