"""Property-based tests (hypothesis) of every public function against the float64 reference, and invariants.

Run the large profile (1,000 examples per property) with:
    HYPOTHESIS_PROFILE=large python -m pytest tests/test_properties.py
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jbn
from tests import reference

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _shape(draw, min_rank=1):
    rank = draw(st.integers(min_rank, 5))
    return tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))


def _axes(draw, rank, candidates=None, min_size=1):
    """A subset of `candidates`, each axis written positive or negative, as an int or a tuple."""
    candidates = list(range(rank)) if candidates is None else candidates
    chosen = draw(st.lists(st.sampled_from(candidates), min_size=min_size, max_size=len(candidates), unique=True))
    written = tuple(axis - rank if draw(st.booleans()) else axis for axis in chosen)
    return written[0] if len(written) == 1 and draw(st.booleans()) else written


def _data(draw, shape, dtype):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    offset = draw(st.sampled_from([0.0, 3.0, 100.0]))
    spread = draw(st.sampled_from([1.0, 0.01, 10.0]))
    return jnp.asarray(offset + spread * rng.standard_normal(shape), jnp.float32).astype(dtype), rng


def _mask(draw, shape, rng):
    """None, or a boolean mask broadcastable to `shape`: random, all False or a single True."""
    kind = draw(st.sampled_from(["none", "random", "all_false", "single_true"]))
    if kind == "none":
        return None
    mask_shape = tuple(size if draw(st.booleans()) else 1 for size in shape)
    mask_shape = mask_shape[draw(st.integers(0, len(shape))) :]  # leading axes may be left to broadcasting
    if kind == "random":
        return jnp.asarray(rng.random(mask_shape) < 0.6)
    mask = np.zeros(mask_shape, bool)
    if kind == "single_true" and mask.size:
        mask.flat[rng.integers(mask.size)] = True
    return jnp.asarray(mask)


def _poison(x, mask):
    """Masked-out entries hold NaN: they must never reach the statistics."""
    return x if mask is None else jnp.where(mask, x, jnp.nan)


def _assert_close(actual, expected, dtype, mask=None):
    """Compares in the output dtype (the reference is rounded to it), at the entries that the mask selects."""
    expected = np.asarray(jnp.asarray(expected, jnp.float32).astype(dtype).astype(jnp.float32), np.float64)
    actual = np.asarray(jnp.asarray(actual).astype(jnp.float32), np.float64)
    if mask is not None:
        selected = np.broadcast_to(np.asarray(mask), actual.shape)
        actual, expected = actual[selected], expected[selected]
    tolerance = 1e-4 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance)


def _params(draw, rng, shape, feature_axes):
    features = tuple(shape[a % len(shape)] for a in sorted(np.atleast_1d(feature_axes) % len(shape)))
    scale = jnp.asarray(rng.uniform(0.5, 2.0, features), jnp.float32) if draw(st.booleans()) else None
    bias = jnp.asarray(rng.normal(size=features), jnp.float32) if draw(st.booleans()) else None
    return scale, bias


@pytest.mark.usefixtures("cpu_or_gpu_statistics")
@given(st.data())
def test_moments_match_reference(data):
    shape = _shape(data.draw)
    dtype = data.draw(st.sampled_from(DTYPES))
    x, rng = _data(data.draw, shape, dtype)
    axes = _axes(data.draw, len(shape), min_size=0)
    mask = _mask(data.draw, shape, rng)
    mean, var = jbn.moments(_poison(x, mask), axes, mask=mask)
    ref_mean, ref_var = reference.moments(np.asarray(x.astype(jnp.float32), np.float64), axes, mask)
    assert mean.dtype == var.dtype == jnp.float32
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var, ref_var, rtol=1e-4, atol=1e-6)


@pytest.mark.usefixtures("cpu_or_gpu_statistics")
@given(st.data())
def test_batch_norm_matches_reference(data):
    shape = _shape(data.draw)
    dtype = data.draw(st.sampled_from(DTYPES))
    x, rng = _data(data.draw, shape, dtype)
    feature_axes = _axes(data.draw, len(shape))
    scale, bias = _params(data.draw, rng, shape, feature_axes)
    features = tuple(shape[a] for a in sorted(np.atleast_1d(feature_axes) % len(shape)))
    state = jbn.BatchNormState(
        jnp.asarray(rng.normal(size=features), jnp.float32), jnp.asarray(rng.uniform(0.5, 2, features), jnp.float32)
    )
    training = data.draw(st.booleans())
    momentum = data.draw(st.floats(0.0, 1.0))
    mask = _mask(data.draw, shape, rng)
    y, new = jbn.batch_norm(
        _poison(x, mask), state, scale, bias, training=training, feature_axes=feature_axes, momentum=momentum, mask=mask
    )
    ref_y, ref_mean, ref_var = reference.batch_norm(
        np.asarray(x.astype(jnp.float32), np.float64),
        state.mean,
        state.var,
        scale,
        bias,
        training=training,
        feature_axes=feature_axes,
        momentum=momentum,
        mask=mask,
    )
    assert y.shape == x.shape and y.dtype == dtype
    assert new.mean.shape == new.var.shape == features and new.mean.dtype == jnp.float32
    _assert_close(y, ref_y, dtype, mask)  # masked entries hold NaN, in eval mode too
    np.testing.assert_allclose(new.mean, ref_mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new.var, ref_var, rtol=1e-4, atol=1e-4)


def _per_example(name):
    return {
        "layer": (jbn.layer_norm, reference.layer_norm),
        "rms": (jbn.rms_norm, reference.rms_norm),
    }[name]


@given(st.data(), st.sampled_from(["layer", "rms"]))
def test_layer_and_rms_norm_match_reference(data, name):
    shape = _shape(data.draw)
    dtype = data.draw(st.sampled_from(DTYPES))
    x, rng = _data(data.draw, shape, dtype)
    reduction_axes = _axes(data.draw, len(shape))
    feature_axes = _axes(data.draw, len(shape))
    scale, bias = _params(data.draw, rng, shape, feature_axes)
    mask = _mask(data.draw, shape, rng)
    ours, theirs = _per_example(name)
    kwargs = dict(reduction_axes=reduction_axes, feature_axes=feature_axes, mask=mask)
    extra = {} if name == "rms" else {"bias": bias}
    y = ours(_poison(x, mask), scale, **extra, **kwargs)
    expected = theirs(np.asarray(x.astype(jnp.float32), np.float64), scale, **extra, **kwargs)
    assert y.shape == x.shape and y.dtype == dtype
    _assert_close(y, expected, dtype, mask)


@given(st.data())
def test_instance_norm_matches_reference(data):
    shape = _shape(data.draw, min_rank=2)
    dtype = data.draw(st.sampled_from(DTYPES))
    x, rng = _data(data.draw, shape, dtype)
    feature_axes = _axes(data.draw, len(shape), candidates=list(range(1, len(shape))))
    scale, bias = _params(data.draw, rng, shape, feature_axes)
    mask = _mask(data.draw, shape, rng)
    y = jbn.instance_norm(_poison(x, mask), scale, bias, feature_axes=feature_axes, mask=mask)
    expected = reference.instance_norm(
        np.asarray(x.astype(jnp.float32), np.float64), scale, bias, feature_axes=feature_axes, mask=mask
    )
    _assert_close(y, expected, dtype, mask)


@given(st.data())
def test_group_norm_matches_reference(data):
    shape = list(_shape(data.draw, min_rank=2))
    channel = data.draw(st.integers(1, len(shape) - 1))
    groups = data.draw(st.integers(1, 3))
    shape[channel] = groups * data.draw(st.integers(1, 3))
    shape = tuple(shape)
    dtype = data.draw(st.sampled_from(DTYPES))
    x, rng = _data(data.draw, shape, dtype)
    scale, bias = _params(data.draw, rng, shape, channel)
    mask = _mask(data.draw, shape, rng)
    by_size = data.draw(st.booleans())
    counts = {"num_groups": None, "group_size": shape[channel] // groups} if by_size else {"num_groups": groups}
    y = jbn.group_norm(_poison(x, mask), scale, bias, feature_axes=channel - len(shape), mask=mask, **counts)
    expected = reference.group_norm(
        np.asarray(x.astype(jnp.float32), np.float64), scale, bias, num_groups=groups, feature_axis=channel, mask=mask
    )
    _assert_close(y, expected, dtype, mask)


@given(st.data())
def test_vmap_axis_name_pools_like_the_whole_batch(data):
    shape = _shape(data.draw, min_rank=2)
    x, _ = _data(data.draw, shape, jnp.float32)
    state = jbn.batch_norm_state(shape[-1])
    fn = functools.partial(jbn.batch_norm, state=state, training=True, axis_name="batch")
    # Under jit: one compilation per drawn shape instead of one per operation (test_transforms runs it eagerly).
    y, new = jax.jit(jax.vmap(lambda xi: fn(xi), axis_name="batch", out_axes=(0, None)))(x)
    expected_y, expected = jax.jit(functools.partial(jbn.batch_norm, training=True))(x, state)
    np.testing.assert_allclose(y, expected_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(new.var, expected.var, rtol=1e-5, atol=1e-6)
    reduction = _axes(data.draw, len(shape) - 1)
    pooled = jax.jit(
        jax.vmap(lambda xi: jbn.layer_norm(xi, reduction_axes=reduction, axis_name="batch"), axis_name="batch")
    )(x)
    shifted = tuple(a % (len(shape) - 1) + 1 for a in np.atleast_1d(reduction))
    expected_pooled = jax.jit(functools.partial(jbn.layer_norm, reduction_axes=(0, *shifted)))(x)
    np.testing.assert_allclose(pooled, expected_pooled, rtol=1e-4, atol=1e-4)


@given(st.data())
def test_eval_never_changes_state_and_training_keeps_its_dtype(data):
    shape = _shape(data.draw)
    dtype = data.draw(st.sampled_from(DTYPES))
    x, _ = _data(data.draw, shape, dtype)
    feature_axes = _axes(data.draw, len(shape))
    features = tuple(shape[a] for a in sorted(np.atleast_1d(feature_axes) % len(shape)))
    state_dtype = data.draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    state = jbn.batch_norm_state(features, dtype=state_dtype)
    _, same = jbn.batch_norm(x, state, training=False, feature_axes=feature_axes)
    assert same is state
    out_dtype = data.draw(st.sampled_from([None, jnp.float32, jnp.bfloat16]))
    y, new = jbn.batch_norm(x, state, training=True, feature_axes=feature_axes, dtype=out_dtype)
    assert y.shape == x.shape and y.dtype == (out_dtype or dtype)
    assert new.mean.shape == new.var.shape == features
    assert new.mean.dtype == new.var.dtype == state_dtype


@given(st.data())
def test_normalization_ignores_positive_scaling_and_shifting(data):
    shape = _shape(data.draw, min_rank=2)
    x, rng = _data(data.draw, shape, jnp.float32)
    a, b = data.draw(st.sampled_from([0.5, 3.0, 1e3])), data.draw(st.sampled_from([-50.0, 0.0, 7.0]))
    norm = data.draw(st.sampled_from(["batch", "layer", "instance", "group"]))
    fn = {
        "batch": lambda v: jbn.batch_norm(v, jbn.batch_norm_state(shape[-1]), training=True, epsilon=0.0)[0],
        "layer": lambda v: jbn.layer_norm(v, reduction_axes=tuple(range(1, len(shape))), epsilon=0.0),
        "instance": lambda v: jbn.instance_norm(v, epsilon=0.0),
        "group": lambda v: jbn.group_norm(v, num_groups=1, epsilon=0.0),
    }[norm]
    x = x + jnp.asarray(rng.normal(size=shape), jnp.float32)  # a spread in every group of entries
    np.testing.assert_allclose(fn(a * x + b), fn(x), rtol=2e-3, atol=2e-3)


@given(st.data())
def test_group_norm_extremes_are_layer_and_instance_norm(data):
    shape = _shape(data.draw, min_rank=2)
    x, _ = _data(data.draw, shape, jnp.float32)
    non_batch = tuple(range(1, len(shape)))
    np.testing.assert_allclose(
        jbn.group_norm(x, num_groups=1), jbn.layer_norm(x, reduction_axes=non_batch), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        jbn.group_norm(x, num_groups=None, group_size=1), jbn.instance_norm(x), rtol=1e-4, atol=1e-4
    )


@given(st.data())
def test_momentum_one_keeps_and_zero_replaces(data):
    shape = _shape(data.draw)
    x, rng = _data(data.draw, shape, jnp.float32)
    state = jbn.BatchNormState(jnp.asarray(rng.normal(size=shape[-1:]), jnp.float32), jnp.ones(shape[-1:]))
    _, kept = jbn.batch_norm(x, state, training=True, momentum=1.0)
    _, replaced = jbn.batch_norm(x, state, training=True, momentum=0.0)
    np.testing.assert_array_equal(kept.mean, state.mean)
    np.testing.assert_array_equal(kept.var, state.var)
    mean, var = jbn.moments(x, tuple(range(len(shape) - 1)))
    np.testing.assert_allclose(replaced.mean, mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(replaced.var, var, rtol=1e-6, atol=1e-7)
