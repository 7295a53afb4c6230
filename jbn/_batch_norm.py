"""Batch normalization with explicit running statistics."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jbn import _checks
from jbn._normalize import feature_broadcast, normalize
from jbn._standardize import Options, standardize
from jbn._stats import compute_dtype


class BatchNormState(NamedTuple):
    """Running statistics of a batch norm layer: a pytree, passed in and returned, never mutated.

    Attributes:
      mean: running mean, shaped like x's feature axes (e.g. ``(C,)``), float32 by default.
      var: running biased variance, same shape and dtype as `mean`.
    """

    mean: jax.Array
    var: jax.Array


def batch_norm_state(num_features_or_shape, dtype=jnp.float32) -> BatchNormState:
    """A fresh BatchNormState: mean zeros and var ones (Flax's, Keras's and PyTorch's initial values).

    Args:
      num_features_or_shape: an int ``C`` for shape ``(C,)``, or the feature shape as a tuple.
      dtype: dtype of the statistics; float32 unless you have a reason (half precision loses updates).

    Examples:
      >>> import jbn
      >>> jbn.batch_norm_state(3)
      BatchNormState(mean=Array([0., 0., 0.], dtype=float32), var=Array([1., 1., 1.], dtype=float32))
    """
    shape = _checks.feature_shape(num_features_or_shape, "num_features_or_shape")
    return BatchNormState(jnp.zeros(shape, dtype), jnp.ones(shape, dtype))


def batch_norm(
    x,
    state: BatchNormState,
    scale=None,
    bias=None,
    *,
    training: bool,
    feature_axes=-1,
    momentum=0.99,
    epsilon=1e-5,
    mask=None,
    axis_name=None,
    axis_index_groups=None,
    dtype=None,
    use_fast_variance=False,
    skip_nonfinite_updates=False,
) -> tuple[jax.Array, BatchNormState]:
    """Batch normalization: ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias``, returning the new state.

    training=True: ``mean``, ``var`` are the batch statistics (biased variance) over every axis of x except
    `feature_axes`, and ``new_state = momentum * state + (1 - momentum) * (mean, var)``, the Flax/Keras
    convention (PyTorch's ``momentum=0.1`` is ``momentum=0.9`` here). training=False: ``mean``, ``var`` come from
    `state` and ``new_state`` is `state` itself. Statistics are exact and float32 (see ``jbn.moments``).

    With `mask`, only the selected entries form the batch statistics; if it selects nothing for a feature, that
    feature is normalized with the running statistics and its state is left unchanged. With `axis_name`, the
    statistics are those of the whole batch across the named axis (``jax.vmap``, ``shard_map``, ``pmap``),
    weighted by counts. Under ``jax.vmap`` without `axis_name`, each mapped slice is its own batch.

    Args:
      x: floating array, e.g. ``(N, C)``, ``(N, H, W, C)``, or ``(N, C, H, W)`` with ``feature_axes=1``.
      state: a BatchNormState whose fields have x's feature shape (``(C,)`` for ``feature_axes=-1``).
      scale: optional multiplier of x's feature shape; None means 1.
      bias: optional offset of x's feature shape; None means 0.
      training: required keyword, a Python bool: use batch statistics and update the state, or not.
      feature_axes: int or tuple of ints, the axes that keep their own statistics.
      momentum: in [0, 1], weight of the old running value.
      epsilon: >= 0, added to the variance.
      mask: optional boolean array broadcastable to x (e.g. ``(N, 1)``); False entries may hold NaN.
      axis_name: optional mapped axis name to pool the batch statistics over.
      axis_index_groups: optional sub-groups of `axis_name` that pool separately.
      dtype: output dtype; x's dtype when None.
      use_fast_variance: less exact, opt-in: Flax's one-pass variance, wrong on data far from zero (see
        ``jbn.moments``); only for reproducing runs made with Flax's default.
      skip_nonfinite_updates: if True, a feature whose batch mean or variance is NaN or inf keeps its running
        statistics, so one bad batch cannot poison them; the output still shows the bad values. With
        `axis_name`, the pooled statistics decide, so every participant skips alike.

    Returns:
      ``(y, new_state)``: y has x's shape; new_state has the state's shapes and dtypes.

    Raises:
      TypeError: `training` missing or not a bool, x or state of the wrong type, a non-boolean mask.
      ValueError: shapes that do not match x's feature shape, bad axes, momentum or epsilon out of range.

    Examples:
      >>> import jax, jax.numpy as jnp, jbn
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> state = jbn.batch_norm_state(2)
      >>> y, state = jbn.batch_norm(x, state, training=True, momentum=0.9)
      >>> y.round(3).tolist()
      [[-1.0, -1.0], [1.0, 1.0]]
      >>> print(state.mean, state.var)
      [0.2 2. ] [ 1.  10.9]
      >>> y, same = jbn.batch_norm(x, state, training=False)
      >>> same is state
      True
    """
    checked = check_arguments(x, state, scale, bias, training, feature_axes, momentum, epsilon, mask)
    if not checked.training:
        return evaluate(checked, epsilon, dtype), state
    y, _, new_state = train(
        checked,
        checked.scale,
        checked.bias,
        momentum=momentum,
        epsilon=epsilon,
        dtype=dtype,
        skip_nonfinite_updates=skip_nonfinite_updates,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance,
    )
    return y, new_state


class Checked(NamedTuple):
    """Batch norm's arguments after the checks: scale, bias and the running statistics broadcast to x's rank."""

    x: jax.Array
    training: bool
    feature_axes: tuple[int, ...]
    state: BatchNormState
    scale: jax.Array | None
    bias: jax.Array | None
    running_mean: jax.Array  # in the compute dtype
    running_var: jax.Array
    mask: jax.Array | None


def check_arguments(x, state, scale, bias, training, feature_axes, momentum, epsilon, mask) -> Checked:
    """The checks of every batch norm variant (`batch_norm`, `batch_renorm`, `ghost_batch_norm`)."""
    x = _checks.float_array(x)
    training = _checks.training(training)
    feature_axes = _checks.axes(x.ndim, feature_axes, "feature_axes")
    state_mean, state_var = _checks.state_fields(state, x.shape, feature_axes)
    scale = _checks.feature_param(scale, "scale", x.shape, feature_axes)
    bias = _checks.feature_param(bias, "bias", x.shape, feature_axes)
    _checks.momentum(momentum)
    _checks.epsilon(epsilon)
    mask = _checks.mask(mask, x.shape)
    compute = compute_dtype(jnp.promote_types(x.dtype, state_mean.dtype))

    def broadcast(value):
        return feature_broadcast(value, x.ndim, feature_axes)

    return Checked(
        x,
        training,
        feature_axes,
        BatchNormState(state_mean, state_var),
        broadcast(scale),
        broadcast(bias),
        broadcast(state_mean.astype(compute)),
        broadcast(state_var.astype(compute)),
        None if mask is None else jnp.broadcast_to(mask, x.shape),
    )


def evaluate(checked: Checked, epsilon, dtype) -> jax.Array:
    """Normalization with the running statistics (training=False)."""
    c = checked
    return normalize(c.x, c.running_mean, c.running_var, c.scale, c.bias, epsilon=epsilon, dtype=dtype)


def train(checked: Checked, scale, bias, *, momentum, epsilon, dtype, skip_nonfinite_updates, **statistics):
    """(y, batch statistics broadcast to x's rank, new state) with the batch statistics (training=True).

    `statistics` (axis_name, axis_index_groups, use_fast_variance) go to `Options`. Features without a selected
    entry normalize with the running statistics and keep them.
    """
    c = checked
    reduction_axes = tuple(axis for axis in range(c.x.ndim) if axis not in c.feature_axes)
    options = Options(reduction_axes, dtype, **statistics)
    y, stats = standardize(options, c.x, scale, bias, c.mask, (c.running_mean, c.running_var), epsilon)
    batch_mean, batch_var, count = (field.reshape(c.state.mean.shape) for field in stats)
    updates = count > 0
    if skip_nonfinite_updates:
        updates = updates & jnp.isfinite(batch_mean) & jnp.isfinite(batch_var)
    new_state = BatchNormState(
        moving_average(c.state.mean, batch_mean, updates, momentum),
        moving_average(c.state.var, batch_var, updates, momentum),
    )
    return y, stats, new_state


def moving_average(running, batch, updates, momentum):
    """The exponential moving average, kept in the running value's dtype; unchanged where `updates` is False."""
    updated = momentum * running + (1 - momentum) * batch
    return jnp.where(updates, updated, running).astype(running.dtype)
