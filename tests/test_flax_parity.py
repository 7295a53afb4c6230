"""jbn's functions against flax.linen's layers (use_fast_variance=False), and the Flax defects jbn fixes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from tests import reference
from tests.helpers import data, f64, feature_values


def _init(module, x, **kwargs):
    return module.init(jax.random.key(0), x, **kwargs)


def _with_params(variables, scale, bias):
    params = dict(variables["params"])
    params.update({k: v for k, v in (("scale", scale), ("bias", bias)) if k in params})
    return {**variables, "params": params}


@pytest.mark.parametrize(("shape", "axis"), [((8, 3), -1), ((4, 5, 6, 3), -1), ((4, 3, 5), 1), ((4, 5, 6, 3), (1, 3))])
def test_batch_norm_matches_flax_over_several_steps(shape, axis):
    module = nn.BatchNorm(axis=axis, momentum=0.9, use_fast_variance=False)
    scale, bias = feature_values(shape, axis)
    variables = _with_params(_init(module, data(shape), use_running_average=False), scale, bias)
    state = jbn.batch_norm_state(variables["batch_stats"]["mean"].shape)
    for step in range(3):
        x = data(shape, seed=step, offset=step + 1.0)
        flax_y, updates = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        variables = {**variables, **updates}
        y, state = jbn.batch_norm(x, state, scale, bias, training=True, feature_axes=axis, momentum=0.9)
        np.testing.assert_allclose(y, flax_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.mean, variables["batch_stats"]["mean"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state.var, variables["batch_stats"]["var"], rtol=1e-5)
    x = data(shape, seed=10)
    flax_eval = module.apply(variables, x, use_running_average=True)
    np.testing.assert_allclose(
        jbn.batch_norm(x, state, scale, bias, training=False, feature_axes=axis)[0], flax_eval, rtol=1e-5, atol=1e-5
    )


def test_batch_norm_mask_matches_flax():
    x = data((8, 4), offset=1.0)
    mask = (jnp.arange(8) < 5)[:, None]
    module = nn.BatchNorm(use_running_average=False, use_fast_variance=False)
    variables = _init(module, x)
    flax_y, updates = module.apply(variables, x, mask=mask, mutable=["batch_stats"])
    y, state = jbn.batch_norm(x, jbn.batch_norm_state(4), jnp.ones(4), jnp.zeros(4), training=True, mask=mask)
    np.testing.assert_allclose(y, flax_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.var, updates["batch_stats"]["var"], rtol=1e-5)


@pytest.mark.parametrize(
    ("shape", "reduction_axes", "feature_axes"),
    [((8, 5), -1, -1), ((2, 4, 6, 5), (1, 2, 3), -1), ((2, 4, 6, 5), (2, 3), (2, 3))],
)
def test_layer_and_rms_norm_match_flax(shape, reduction_axes, feature_axes):
    x = data(shape, offset=2.0)
    scale, bias = feature_values(shape, feature_axes)
    axes = dict(reduction_axes=reduction_axes, feature_axes=feature_axes)
    layer = nn.LayerNorm(use_fast_variance=False, **axes)
    expected = layer.apply(_with_params(_init(layer, x), scale, bias), x)
    np.testing.assert_allclose(jbn.layer_norm(x, scale, bias, **axes), expected, rtol=1e-5, atol=1e-5)
    rms = nn.RMSNorm(**axes)
    expected = rms.apply(_with_params(_init(rms, x), scale, None), x)
    np.testing.assert_allclose(jbn.rms_norm(x, scale, **axes), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("shape", "feature_axes"), [((2, 4, 6, 5), -1), ((2, 5, 4, 6), 1)])
def test_instance_norm_matches_flax(shape, feature_axes):
    x = data(shape, offset=-1.0)
    scale, bias = feature_values(shape, feature_axes)
    module = nn.InstanceNorm(feature_axes=feature_axes, use_fast_variance=False)
    expected = module.apply(_with_params(_init(module, x), scale, bias), x)
    np.testing.assert_allclose(
        jbn.instance_norm(x, scale, bias, feature_axes=feature_axes), expected, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(("num_groups", "group_size"), [(4, None), (None, 2), (1, None)])
def test_group_norm_matches_flax(num_groups, group_size):
    x = data((2, 4, 6, 8), offset=1.0)
    scale, bias = feature_values(x.shape, -1)
    module = nn.GroupNorm(num_groups=num_groups, group_size=group_size, use_fast_variance=False)
    expected = module.apply(_with_params(_init(module, x), scale, bias), x)
    got = jbn.group_norm(x, scale, bias, num_groups=num_groups, group_size=group_size)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_flax_default_variance_is_wrong_on_offset_data_and_jbn_is_not():
    x = data((64, 8, 8, 16), offset=1e4)
    ref_y, _, _ = reference.batch_norm(f64(x), np.zeros(16), np.ones(16), training=True)
    module = nn.BatchNorm(use_running_average=False)  # Flax's default: use_fast_variance=True
    flax_y, _ = module.apply(_init(module, x), x, mutable=["batch_stats"])
    jbn_y, _ = jbn.batch_norm(x, jbn.batch_norm_state(16), training=True)
    flax_error, jbn_error = np.abs(f64(flax_y) - ref_y).max(), np.abs(f64(jbn_y) - ref_y).max()
    assert flax_error > 1000, flax_error
    assert jbn_error < 1e-3, jbn_error


def test_flax_group_norm_rejects_a_broadcast_mask_that_jbn_accepts():
    x = data((2, 5, 8))
    mask = (jnp.arange(5) < 3)[None, :, None] & jnp.ones((2, 1, 1), bool)
    module = nn.GroupNorm(num_groups=2)
    with pytest.raises(Exception):  # noqa: B017 - whichever error Flax's reshape raises
        module.apply(_init(module, x), x, mask=mask)
    expected = reference.group_norm(f64(x), num_groups=2, mask=mask)
    selected = np.broadcast_to(np.asarray(mask), x.shape)
    np.testing.assert_allclose(
        f64(jbn.group_norm(x, num_groups=2, mask=mask))[selected], expected[selected], rtol=1e-5, atol=1e-5
    )
