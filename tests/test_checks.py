"""The bad-input contract: each misuse raises a ValueError or TypeError that names the argument."""

import re

import jax
import jax.numpy as jnp
import pytest

import jbn

X = jnp.ones((8, 3))
IMAGES = jnp.ones((2, 4, 4, 8))
STATE = jbn.batch_norm_state(3)


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
