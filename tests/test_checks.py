"""The bad-input contract: each misuse raises a ValueError or TypeError that names the argument."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jbn
import jbn.linen
import jbn.nnx

X = jnp.ones((8, 3))
IMAGES = jnp.ones((2, 4, 4, 8))
STATE = jbn.batch_norm_state(3)


def linen_init(layer, x, **kwargs):
    return layer.init(jax.random.key(0), x, **kwargs)


def nnx_call(cls, *args, x=X, **kwargs):
    return getattr(jbn.nnx, cls)(*args, rngs=nnx.Rngs(0), **kwargs)(x)


def bn(x=X, state=STATE, scale=None, bias=None, **kwargs):
    kwargs.setdefault("training", True)
    return jbn.batch_norm(x, state, scale, bias, **kwargs)


CASES = [
    # (call, exception, message pattern)
    (
        lambda: bn(state=jbn.batch_norm_state(4)),
        ValueError,
        "`state.mean` has shape (4,), but x of shape (8, 3) has feature shape (3,) along feature_axes=(1,)",
    ),
    (lambda: bn(state=jbn.BatchNormState(jnp.zeros(3), jnp.ones(2))), ValueError, "`state.var` has shape (2,)"),
    (lambda: bn(state={"mean": jnp.zeros(3), "var": jnp.ones(3)}), TypeError, "`state` must be a jbn.BatchNormState"),
    (lambda: bn(scale=jnp.ones(4)), ValueError, "`scale` has shape (4,), but x of shape (8, 3)"),
    (lambda: bn(bias=jnp.ones((1, 3))), ValueError, "`bias` has shape (1, 3)"),
    (lambda: bn(scale=jnp.ones(3, jnp.int32)), TypeError, "`scale` must have a floating dtype"),
    (lambda: jbn.batch_norm(X, STATE), TypeError, "training"),
    (lambda: bn(training=jnp.array(True)), TypeError, "`training` must be a Python bool"),
    (lambda: bn(training=None), TypeError, "`training` must be a Python bool"),
    (
        lambda: bn(x=jnp.ones((8, 3), jnp.int32)),
        TypeError,
        "`x` must have a floating dtype .* got int32 with shape (8, 3)",
    ),
    (lambda: bn(x=jnp.ones((8, 3), bool)), TypeError, "`x` must have a floating dtype .* got bool"),
    (lambda: bn(x="not an array"), TypeError, "`x` must be an array of floats, got str"),
    (lambda: bn(feature_axes=2), ValueError, "`feature_axes`=2 is out of range for x of rank 2"),
    (lambda: bn(feature_axes=(1, -1)), ValueError, "`feature_axes`=(1, -1) repeats an axis"),
    (lambda: bn(feature_axes=1.0), TypeError, "`feature_axes` must be an int or a tuple of ints"),
    (lambda: bn(momentum=1.5), ValueError, "`momentum`=1.5 is outside [0, 1]"),
    (lambda: bn(momentum=-0.1), ValueError, "`momentum`=-0.1 is outside [0, 1]"),
    (lambda: bn(momentum="fast"), TypeError, "`momentum` must be a real number"),
    (lambda: bn(epsilon=-1e-5), ValueError, "`epsilon`=-1e-05 must be >= 0"),
    (
        lambda: bn(mask=jnp.ones((8, 2), bool)),
        ValueError,
        "`mask` of shape (8, 2) does not broadcast to x of shape (8, 3)",
    ),
    (lambda: bn(mask=jnp.ones((2, 8, 3), bool)), ValueError, "`mask` of shape (2, 8, 3) does not broadcast"),
    (lambda: bn(mask=jnp.ones((8, 1))), TypeError, "`mask` must be boolean"),
    (lambda: jbn.batch_norm_state(0), ValueError, "`num_features_or_shape` must be a positive int"),
    (lambda: jbn.layer_norm(X, reduction_axes=(0, 5)), ValueError, "`reduction_axes`=(0, 5) is out of range"),
    (lambda: jbn.layer_norm(X, jnp.ones(8)), ValueError, "`scale` has shape (8,), but x of shape (8, 3)"),
    (lambda: jbn.layer_norm(X, epsilon=-1.0), ValueError, "`epsilon`=-1.0 must be >= 0"),
    (lambda: jbn.rms_norm(X, jnp.ones((3, 1))), ValueError, "`scale` has shape (3, 1)"),
    (lambda: jbn.rms_norm(jnp.ones(3, jnp.int8)), TypeError, "`x` must have a floating dtype"),
    (lambda: jbn.instance_norm(jnp.ones(3)), ValueError, "instance_norm needs x of rank >= 2"),
    (lambda: jbn.instance_norm(IMAGES, feature_axes=(0, 3)), ValueError, "`feature_axes`=(0, 3) includes axis 0"),
    (lambda: jbn.group_norm(IMAGES, num_groups=3), ValueError, "`num_groups`=3 does not divide the 8 channels of x"),
    (
        lambda: jbn.group_norm(IMAGES, num_groups=None, group_size=3),
        ValueError,
        "`group_size`=3 does not divide the 8 channels",
    ),
    (
        lambda: jbn.group_norm(IMAGES, num_groups=2, group_size=4),
        ValueError,
        "Give exactly one of `num_groups` and `group_size`",
    ),
    (lambda: jbn.group_norm(IMAGES, num_groups=None), ValueError, "Give exactly one of `num_groups` and `group_size`"),
    (lambda: jbn.group_norm(IMAGES, num_groups=0), ValueError, "`num_groups` must be a positive int, got 0"),
    (
        lambda: jbn.group_norm(IMAGES, num_groups=2, feature_axes=(1, 3)),
        ValueError,
        "group_norm needs exactly one channel axis",
    ),
    (
        lambda: jbn.group_norm(IMAGES, num_groups=2, feature_axes=0),
        ValueError,
        "includes axis 0, which group_norm treats as the batch axis",
    ),
    (
        lambda: jbn.group_norm(IMAGES, jnp.ones(4), num_groups=2),
        ValueError,
        "`scale` has shape (4,), but x of shape (2, 4, 4, 8)",
    ),
    (lambda: jbn.moments(X, 3), ValueError, "`axes`=3 is out of range for x of rank 2"),
    (lambda: jbn.moments(jnp.ones(3, jnp.int32), 0), TypeError, "`x` must have a floating dtype"),
    (lambda: jbn.moments(jnp.float32(1.0), 0), ValueError, "`axes`=0 names an axis, but x is a scalar (rank 0)"),
    (lambda: jbn.moments(X, 0, mask="rows"), TypeError, "`mask` must be an array, got str"),
    (lambda: jbn.layer_norm([3.5e38, 1.0]), ValueError, "`x` does not fit float32 (it would overflow to inf)"),
    (lambda: jbn.batch_norm_state(2.5), ValueError, "`num_features_or_shape` must be a positive int"),
    (lambda: jbn.batch_norm_state((3, 0)), ValueError, "`num_features_or_shape` must be a positive int"),
    (lambda: bn(x=jnp.float32(1.0)), ValueError, "`feature_axes`=-1 names an axis, but x is a scalar"),
    # The Flax modules raise the same errors, at init or at their first call.
    (
        lambda: linen_init(jbn.linen.BatchNorm(), "pixels", use_running_average=False),
        TypeError,
        "`x` must be an array of floats, got str",
    ),
    (
        lambda: linen_init(jbn.linen.BatchNorm(axis=2), X, use_running_average=False),
        ValueError,
        "`axis`=2 is out of range for x of rank 2",
    ),
    (
        lambda: linen_init(jbn.linen.BatchNorm(momentum=2.0), X, use_running_average=False),
        ValueError,
        "`momentum`=2.0 is outside [0, 1]",
    ),
    (
        lambda: linen_init(jbn.linen.BatchNorm(), X, use_running_average=False, mask=jnp.ones((8, 2), bool)),
        ValueError,
        "`mask` of shape (8, 2) does not broadcast",
    ),
    (lambda: linen_init(jbn.linen.LayerNorm(epsilon=-1.0), X), ValueError, "`epsilon`=-1.0 must be >= 0"),
    (lambda: linen_init(jbn.linen.LayerNorm(reduction_axes=3), X), ValueError, "`reduction_axes`=3 is out of range"),
    (lambda: linen_init(jbn.linen.RMSNorm(feature_axes=(0, 0)), X), ValueError, "`feature_axes`=(0, 0) repeats"),
    (lambda: linen_init(jbn.linen.InstanceNorm(), jnp.ones(3)), ValueError, "instance_norm needs x of rank >= 2"),
    (lambda: linen_init(jbn.linen.GroupNorm(num_groups=5), IMAGES), ValueError, "`num_groups`=5 does not divide"),
    (
        lambda: linen_init(jbn.linen.GroupNorm(force_float32_reductions=False), IMAGES),
        ValueError,
        "`force_float32_reductions=False` is not supported",
    ),
    (lambda: nnx_call("BatchNorm", 4), ValueError, "`state.mean` has shape (4,), but x of shape (8, 3)"),
    (lambda: nnx_call("BatchNorm", 3, use_running_average=None), ValueError, "needs `use_running_average`"),
    (lambda: nnx_call("LayerNorm", 5), ValueError, "`scale` has shape (5,)"),
    (lambda: nnx_call("RMSNorm", 3, epsilon=-0.5), ValueError, "`epsilon`=-0.5 must be >= 0"),
    (lambda: nnx_call("InstanceNorm", 3, x=jnp.ones(3)), ValueError, "instance_norm needs x of rank >= 2"),
    (lambda: nnx_call("GroupNorm", 8, num_groups=3, x=IMAGES), ValueError, "`num_groups`=3 does not divide the 8"),
    (lambda: nnx_call("GroupNorm", 8, num_groups=4, group_size=2, x=IMAGES), ValueError, "Give exactly one of"),
]


@pytest.mark.parametrize(("call", "error", "message"), CASES, ids=[c[2][:60] for c in CASES])
def test_bad_input_raises_a_clear_error(call, error, message):
    pattern = ".*".join(re.escape(part) for part in message.split(".*"))
    with pytest.raises(error, match=pattern):
        call()


def test_errors_are_raised_at_trace_time_under_jit():
    traced = jax.jit(lambda x, scale: jbn.batch_norm(x, STATE, scale, training=True))
    with pytest.raises(ValueError, match=re.escape("`scale` has shape (4,)")):
        traced.lower(X, jnp.ones(4))


def test_traced_momentum_is_accepted():
    _, state = jax.jit(lambda m: bn(momentum=m))(0.5)
    assert state.mean.shape == (3,)
