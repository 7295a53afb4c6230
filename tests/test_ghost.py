"""jbn.ghost_batch_norm against the float64 formula, batch norm as its limit, and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from tests import reference
from tests.helpers import MODES, call, data, feature_values

LAYOUTS = [((8, 3), -1), ((8, 5, 6, 3), -1), ((8, 3, 5), 1)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("virtual", [1, 2, 4])
@pytest.mark.parametrize(("shape", "feature_axes"), LAYOUTS)
def test_training_matches_reference(shape, feature_axes, virtual, mode):
    x = data(shape, offset=1e4 if virtual == 4 else 0.5)
    scale, bias = feature_values(shape, feature_axes)
    state = jbn.batch_norm_state(3)
    y, new_state = call(
        mode,
        jbn.ghost_batch_norm,
        x,
        state,
        scale,
        bias,
        virtual_batch_size=virtual,
        training=True,
        feature_axes=feature_axes,
        momentum=0.9,
    )
    expected_y, mean, var = reference.ghost_batch_norm(
        x, state.mean, state.var, scale, bias, virtual_batch_size=virtual, feature_axes=feature_axes, momentum=0.9
    )
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=3e-5)
    np.testing.assert_allclose(new_state.mean, mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new_state.var, var, rtol=1e-5, atol=1e-6)


def test_a_virtual_batch_without_data_does_not_count():
    x = np.array(data((8, 3), offset=2.0))
    mask = np.ones((8, 1), bool)
    mask[4:] = False  # the second virtual batch of 4 is all padding
    x[4:] = np.nan
    state = jbn.batch_norm_state(3)
    y, new_state = jbn.ghost_batch_norm(jnp.asarray(x), state, virtual_batch_size=4, training=True, mask=mask)
    expected_y, mean, var = reference.ghost_batch_norm(
        x, state.mean, state.var, None, None, virtual_batch_size=4, mask=mask
    )
    np.testing.assert_allclose(np.asarray(y)[:4], expected_y[:4], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(new_state.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(new_state.var, var, rtol=1e-6)


@pytest.mark.parametrize(("shape", "feature_axes"), LAYOUTS)
def test_one_virtual_batch_is_batch_norm(shape, feature_axes):
    x = data(shape, offset=3.0)
    scale, bias = feature_values(shape, feature_axes)
    state = jbn.batch_norm_state(3)
    kwargs = {"training": True, "feature_axes": feature_axes}
    y, ghost_state = jbn.ghost_batch_norm(x, state, scale, bias, virtual_batch_size=shape[0], **kwargs)
    expected_y, expected_state = jbn.batch_norm(x, state, scale, bias, **kwargs)
    np.testing.assert_allclose(y, expected_y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ghost_state.mean, expected_state.mean, rtol=1e-6)
    np.testing.assert_allclose(ghost_state.var, expected_state.var, rtol=1e-6)
    loss = lambda fn: lambda x, s: jnp.sum(jnp.sin(fn(x, s)[0]))  # noqa: E731
    ghost = loss(lambda x, s: jbn.ghost_batch_norm(x, state, s, bias, virtual_batch_size=shape[0], **kwargs))
    plain = loss(lambda x, s: jbn.batch_norm(x, state, s, bias, **kwargs))
    # Ghost batch norm keeps axis 0 (the virtual batches) and takes the fused CPU kernels; batch norm takes the XLA
    # path. Gradients up to ~3.7 here: both are within 3e-6 of float64 (the kernels within 7e-7).
    for g, e in zip(jax.grad(ghost, (0, 1))(x, scale), jax.grad(plain, (0, 1))(x, scale), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=4e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"virtual_batch_size": 3},
            ValueError,
            r"`virtual_batch_size`=3 does not divide the batch: x has shape \(8, 3\)",
        ),
        ({"virtual_batch_size": 0}, TypeError, r"`virtual_batch_size` must be a positive int, got 0"),
        ({"virtual_batch_size": 2.0}, TypeError, r"`virtual_batch_size` must be a positive int, got 2.0"),
        ({"virtual_batch_size": 2, "feature_axes": 0}, ValueError, r"splits x's first axis .* feature_axes=\(0,\)"),
    ],
)
def test_bad_virtual_batches_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        jbn.ghost_batch_norm(
            data((8, 3)), jbn.batch_norm_state(8 if "feature_axes" in kwargs else 3), training=True, **kwargs
        )
