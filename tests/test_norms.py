"""layer_norm, rms_norm, instance_norm and group_norm against the float64 reference."""

import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from tests import reference
from tests.helpers import DTYPES, MODES, call, data, f64, feature_values, tolerance

# (shape, reduction_axes, feature_axes)
LAYER_LAYOUTS = [
    ((8, 3), -1, -1),
    ((4, 5, 6, 3), (1, 2, 3), -1),
    ((4, 5, 6, 3), (2, 3), (2, 3)),
    ((4, 3, 5), 1, 1),
]
INSTANCE_LAYOUTS = [((4, 5, 6, 3), -1), ((4, 3, 5), 1), ((4, 5, 6, 3), (1, 3))]
# (shape, feature_axis, num_groups, group_size)
GROUP_LAYOUTS = [((4, 5, 6, 8), -1, 4, None), ((4, 8, 5), 1, None, 2), ((2, 3, 4, 6), -1, 3, None)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "reduction_axes", "feature_axes"), LAYER_LAYOUTS)
def test_layer_norm(shape, reduction_axes, feature_axes, dtype, mode):
    x = data(shape, dtype, offset=3.0)
    scale, bias = feature_values(shape, feature_axes)
    kwargs = dict(reduction_axes=reduction_axes, feature_axes=feature_axes)
    y = call(mode, jbn.layer_norm, x, scale, bias, **kwargs)
    assert y.dtype == dtype and y.shape == shape
    np.testing.assert_allclose(f64(y), reference.layer_norm(f64(x), scale, bias, **kwargs), **tolerance(dtype))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "reduction_axes", "feature_axes"), LAYER_LAYOUTS)
def test_rms_norm(shape, reduction_axes, feature_axes, dtype, mode):
    x = data(shape, dtype, offset=3.0)
    scale, _ = feature_values(shape, feature_axes)
    kwargs = dict(reduction_axes=reduction_axes, feature_axes=feature_axes)
    y = call(mode, jbn.rms_norm, x, scale, **kwargs)
    assert y.dtype == dtype and y.shape == shape
    np.testing.assert_allclose(f64(y), reference.rms_norm(f64(x), scale, **kwargs), **tolerance(dtype))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "feature_axes"), INSTANCE_LAYOUTS)
def test_instance_norm(shape, feature_axes, dtype, mode):
    x = data(shape, dtype, offset=-2.0)
    scale, bias = feature_values(shape, feature_axes)
    y = call(mode, jbn.instance_norm, x, scale, bias, feature_axes=feature_axes)
    assert y.dtype == dtype and y.shape == shape
    expected = reference.instance_norm(f64(x), scale, bias, feature_axes=feature_axes)
    np.testing.assert_allclose(f64(y), expected, **tolerance(dtype))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "feature_axis", "num_groups", "group_size"), GROUP_LAYOUTS)
def test_group_norm(shape, feature_axis, num_groups, group_size, dtype, mode):
    x = data(shape, dtype, offset=1.0)
    scale, bias = feature_values(shape, feature_axis)
    kwargs = dict(num_groups=num_groups, group_size=group_size, feature_axes=feature_axis)
    y = call(mode, jbn.group_norm, x, scale, bias, **kwargs)
    assert y.dtype == dtype and y.shape == shape
    groups = num_groups or shape[feature_axis] // group_size
    expected = reference.group_norm(f64(x), scale, bias, num_groups=groups, feature_axis=feature_axis)
    np.testing.assert_allclose(f64(y), expected, **tolerance(dtype))


def _masked_cases():
    shape = (3, 5, 4)
    mask = jnp.arange(5)[None, :, None] < jnp.array([5, 2, 0])[:, None, None]  # (3, 5, 1), one empty example
    return shape, mask


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm", ["layer", "rms", "instance", "group"])
def test_broadcast_mask_with_nan_in_masked_entries(norm, mode):
    shape, mask = _masked_cases()
    x = jnp.where(mask, data(shape, offset=2.0), jnp.nan)
    scale, bias = feature_values(shape, -1)
    reduction = (1, 2)
    if norm == "layer":
        y = call(mode, jbn.layer_norm, x, scale, bias, reduction_axes=reduction, mask=mask)
        expected = reference.layer_norm(f64(x), scale, bias, reduction_axes=reduction, mask=mask)
    elif norm == "rms":
        y = call(mode, jbn.rms_norm, x, scale, reduction_axes=reduction, mask=mask)
        expected = reference.rms_norm(f64(x), scale, reduction_axes=reduction, mask=mask)
    elif norm == "instance":
        y = call(mode, jbn.instance_norm, x, scale, bias, mask=mask)
        expected = reference.instance_norm(f64(x), scale, bias, mask=mask)
    else:
        y = call(mode, jbn.group_norm, x, scale, bias, num_groups=2, mask=mask)
        expected = reference.group_norm(f64(x), scale, bias, num_groups=2, mask=mask)
    selected = np.broadcast_to(np.asarray(mask), shape)
    np.testing.assert_allclose(f64(y)[selected], expected[selected], rtol=1e-5, atol=2e-5)


def test_group_norm_full_mask_on_channels_first():
    x = data((2, 6, 5), offset=1.0)
    mask = data((2, 6, 5), seed=4) > -0.5
    y = jbn.group_norm(x, num_groups=3, feature_axes=1, mask=mask)
    expected = reference.group_norm(f64(x), num_groups=3, feature_axis=1, mask=mask)
    np.testing.assert_allclose(f64(y), expected, rtol=1e-5, atol=2e-5)


def test_fully_masked_rows_are_finite():
    x = data((2, 4))
    y = jbn.layer_norm(x, mask=jnp.array([[True], [False]]))
    assert np.isfinite(f64(y)).all()


@pytest.mark.parametrize("mode", MODES)
def test_offset_data_is_exact_for_every_norm(mode):
    x = data((4, 6, 6, 8), offset=1e4)
    cases = {
        "layer": (jbn.layer_norm, reference.layer_norm, {}),
        "rms": (jbn.rms_norm, reference.rms_norm, {}),
        "instance": (jbn.instance_norm, reference.instance_norm, {}),
        "group": (jbn.group_norm, reference.group_norm, {"num_groups": 4}),
    }
    for name, (fn, ref, kwargs) in cases.items():
        error = np.abs(f64(call(mode, fn, x, **kwargs)) - ref(f64(x), **kwargs)).max()
        assert error < 1e-3, (name, error)


def test_group_norm_with_one_group_is_layer_norm_over_non_batch_axes():
    x = data((3, 4, 5, 6))
    np.testing.assert_allclose(
        jbn.group_norm(x, num_groups=1), jbn.layer_norm(x, reduction_axes=(1, 2, 3)), rtol=1e-5, atol=1e-5
    )


def test_group_norm_with_group_size_one_is_instance_norm():
    x = data((3, 4, 5, 6))
    np.testing.assert_allclose(
        jbn.group_norm(x, num_groups=None, group_size=1), jbn.instance_norm(x), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("norm", [jbn.layer_norm, jbn.instance_norm])
def test_float16_near_300_is_exact(norm):
    x = data((2, 4, 16), offset=300.0, spread=5.0).astype(jnp.float16)  # x**2 overflows float16
    y = norm(x)
    assert y.dtype == jnp.float16
    expected = reference.layer_norm(f64(x)) if norm is jbn.layer_norm else reference.instance_norm(f64(x))
    np.testing.assert_allclose(f64(y), expected, atol=5e-3)


def test_output_dtype_can_be_chosen():
    x = data((4, 8), jnp.bfloat16)
    assert jbn.layer_norm(x, dtype=jnp.float32).dtype == jnp.float32
    assert jbn.rms_norm(x).dtype == jnp.bfloat16


def test_group_norm_reduction_axes_keep_other_axes_separate():
    x = data((2, 3, 4, 6), offset=1.0)
    y = jbn.group_norm(x, num_groups=2, reduction_axes=(2,))  # statistics per (example, row, group)
    grouped = f64(x).reshape(2, 3, 4, 2, 3)
    mean = grouped.mean((2, 4), keepdims=True)
    expected = ((grouped - mean) / np.sqrt(grouped.var((2, 4), keepdims=True) + 1e-6)).reshape(x.shape)
    np.testing.assert_allclose(f64(y), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", [jbn.layer_norm, jbn.instance_norm])
def test_use_fast_variance_is_the_one_pass_formula(norm):
    x = data((2, 3, 64), offset=1e4)
    fast = f64(norm(x, use_fast_variance=True))
    exact = reference.layer_norm(f64(x)) if norm is jbn.layer_norm else reference.instance_norm(f64(x))
    assert np.abs(fast - exact).max() > 1.0  # what Flax's default gives: the reason it is opt-in
    assert np.abs(f64(norm(x)) - exact).max() < 1e-3
