"""Fuzzing the public functions: any combination of arguments gives a result or a ValueError/TypeError."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jbn

_shapes = st.lists(st.integers(0, 3), min_size=0, max_size=4).map(tuple)


@st.composite
def _arrays(draw):
    shape = draw(_shapes)
    kind = draw(st.sampled_from(["float32", "bfloat16", "float16", "int32", "bool", "complex64"]))
    values = np.random.default_rng(draw(st.integers(0, 1000))).normal(size=shape) * draw(st.sampled_from([1, 1e30]))
    if kind == "bool":
        return jnp.asarray(values > 0)
    return jnp.asarray(values.astype(np.float32)).astype(kind)


_anything = st.one_of(
    _arrays(),
    st.none(),
    st.integers(-6, 6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.tuples(st.integers(-6, 6), st.integers(-6, 6)),
    st.lists(st.floats(-2, 2), max_size=3),
    st.booleans(),
)
_float_arrays = _arrays().filter(lambda a: jnp.issubdtype(a.dtype, jnp.floating))
_mostly_arrays = st.one_of(_float_arrays, _float_arrays, _anything)
_mostly_none = st.one_of(st.none(), st.none(), _anything)
_axes = st.one_of(st.integers(-6, 6), st.lists(st.integers(-6, 6), max_size=4).map(tuple), st.none(), st.floats(-2, 2))
_numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=2), st.none())


def _call(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except (ValueError, TypeError) as error:
        assert str(error), "an error must say what is wrong"


@settings(max_examples=10 * settings.default.max_examples)  # cheap calls: ten times the profile
@given(
    x=_mostly_arrays,
    state=st.one_of(_anything, st.builds(jbn.BatchNormState, _mostly_arrays, _mostly_arrays)),
    scale=_mostly_none,
    bias=_mostly_none,
    training=st.one_of(st.booleans(), _anything),
    feature_axes=_axes,
    momentum=st.one_of(st.floats(0, 1), _numbers),
    epsilon=st.one_of(st.floats(0, 1), _numbers),
    mask=_mostly_none,
)
def test_batch_norm_fuzz(x, state, scale, bias, training, feature_axes, momentum, epsilon, mask):
    _call(
        jbn.batch_norm,
        x,
        state,
        scale,
        bias,
        training=training,
        feature_axes=feature_axes,
        momentum=momentum,
        epsilon=epsilon,
        mask=mask,
    )


@settings(max_examples=10 * settings.default.max_examples)  # cheap calls: ten times the profile
@given(
    name=st.sampled_from(["layer_norm", "rms_norm", "instance_norm", "group_norm", "moments", "state"]),
    x=_mostly_arrays,
    scale=_mostly_none,
    bias=_mostly_none,
    axes=_axes,
    feature_axes=_axes,
    epsilon=st.one_of(st.floats(0, 1), _numbers),
    mask=_mostly_none,
    num_groups=st.one_of(st.integers(-2, 5), st.none(), st.floats(0, 3)),
    group_size=st.one_of(st.integers(-2, 5), st.none()),
)
def test_other_functions_fuzz(name, x, scale, bias, axes, feature_axes, epsilon, mask, num_groups, group_size):
    common = dict(epsilon=epsilon, mask=mask)
    if name == "layer_norm":
        _call(jbn.layer_norm, x, scale, bias, reduction_axes=axes, feature_axes=feature_axes, **common)
    elif name == "rms_norm":
        _call(jbn.rms_norm, x, scale, reduction_axes=axes, feature_axes=feature_axes, **common)
    elif name == "instance_norm":
        _call(jbn.instance_norm, x, scale, bias, feature_axes=feature_axes, **common)
    elif name == "group_norm":
        groups = dict(num_groups=num_groups, group_size=group_size, reduction_axes=axes)
        _call(jbn.group_norm, x, scale, bias, feature_axes=feature_axes, **groups, **common)
    elif name == "moments":
        _call(jbn.moments, x, axes, mask=mask)
    else:
        _call(jbn.batch_norm_state, x)
