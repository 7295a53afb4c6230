"""Batch normalization with explicit running statistics."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jbn import _checks
from jbn._frozen import normalize_frozen
from jbn._fused import frozen_view
from jbn._normalize import feature_broadcast, normalize
from jbn._standardize import Options, standardize
from jbn._stats import compute_dtype


class BatchNormState(NamedTuple):
    """Running statistics of a batch norm layer: a pytree, passed in and returned, never mutated.

    Attributes:
      mean: running mean, shaped like x's feature axes (e.g. ``(C,)``), float32 by default.
      var: running biased variance, same shape and dtype as `mean`.
      count: None, or (``batch_norm_state(..., counted=True)``) the number of batches averaged so far per
        feature, int32 of `mean`'s shape; the ``"debiased_ema"`` and ``"cumulative"`` running averages need it.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array | None = None


def batch_norm_state(num_features_or_shape, dtype=jnp.float32, *, counted=False) -> BatchNormState:
    """A fresh BatchNormState: mean zeros and var ones (Flax's, Keras's and PyTorch's initial values).

    Args:
      num_features_or_shape: an int ``C`` for shape ``(C,)``, or the feature shape as a tuple.
      dtype: dtype of the statistics; float32 unless you have a reason (half precision loses updates).
      counted: also count the batches averaged (``count``, zeros), for ``running_average="debiased_ema"`` or
        ``"cumulative"`` in `jbn.batch_norm`.

    Examples:
      >>> import jbn
      >>> jbn.batch_norm_state(3)
      BatchNormState(mean=Array([0., 0., 0.], dtype=float32), var=Array([1., 1., 1.], dtype=float32), count=None)
      >>> import jax.numpy as jnp
      >>> state = jbn.batch_norm_state(1, counted=True)  # a debiased average is exact from the first batch
      >>> _, state = jbn.batch_norm(jnp.array([[1.0], [3.0]]), state, training=True, running_average="debiased_ema")
      >>> print(state.mean, state.var, state.count)
      [2.] [1.] [1]
    """
    shape = _checks.feature_shape(num_features_or_shape, "num_features_or_shape")
    count = jnp.zeros(shape, jnp.int32) if counted else None
    return BatchNormState(jnp.zeros(shape, dtype), jnp.ones(shape, dtype), count)


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
    running_average="ema",
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

      running_average: how the running statistics follow the batches: ``"ema"`` (the default, Flax's and
        Keras's: ``new = momentum * old + (1 - momentum) * batch``), ``"debiased_ema"`` (Haiku's zero-debiased
        average: ``new = old + (batch - old) (1 - momentum) / (1 - momentum^t)`` at the t-th batch, so the first
        batch's statistics replace the initial ones exactly; at momentum 1, its limit, the cumulative mean) or
        ``"cumulative"`` (the plain mean of every batch so far, ``new = old + (batch - old) / t``: PyTorch's
        ``momentum=None``). The last two need a state with a ``count`` (``jbn.batch_norm_state(...,
        counted=True)``), which they advance.
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
    averaging = Averaging(momentum, running_average, skip_nonfinite_updates)
    checked = check_arguments(x, state, scale, bias, training, feature_axes, averaging, epsilon, mask)
    if not checked.training:
        return evaluate(checked, epsilon, dtype), state
    y, _, new_state = train(
        checked,
        checked.scale,
        checked.bias,
        averaging=averaging,
        epsilon=epsilon,
        dtype=dtype,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance,
    )
    return y, new_state


class Averaging(NamedTuple):
    """How a batch updates the running statistics (see `batch_norm`'s `running_average`)."""

    momentum: float
    running_average: str = "ema"
    skip_nonfinite_updates: bool = False


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


def check_arguments(x, state, scale, bias, training, feature_axes, averaging: Averaging, epsilon, mask) -> Checked:
    """The checks of every batch norm variant (`batch_norm`, `batch_renorm`, `ghost_batch_norm`)."""
    x = _checks.float_array(x)
    training = _checks.training(training)
    feature_axes = _checks.axes(x.ndim, feature_axes, "feature_axes")
    state_mean, state_var = _checks.state_fields(state, x.shape, feature_axes)
    scale = _checks.feature_param(scale, "scale", x.shape, feature_axes)
    bias = _checks.feature_param(bias, "bias", x.shape, feature_axes)
    _checks.momentum(averaging.momentum)
    count = _checks.running_average(averaging.running_average, state, state_mean.shape)
    _checks.epsilon(epsilon)
    mask = _checks.mask(mask, x.shape)
    compute = compute_dtype(jnp.promote_types(x.dtype, state_mean.dtype))

    def broadcast(value):
        return feature_broadcast(value, x.ndim, feature_axes)

    return Checked(
        x,
        training,
        feature_axes,
        BatchNormState(state_mean, state_var, count),
        broadcast(scale),
        broadcast(bias),
        broadcast(state_mean.astype(compute)),
        broadcast(state_var.astype(compute)),
        None if mask is None else jnp.broadcast_to(mask, x.shape),
    )


def evaluate(checked: Checked, epsilon, dtype) -> jax.Array:
    """Normalization with the running statistics (training=False).

    Under differentiation (fine-tuning with frozen statistics) the backward pass keeps x itself, not the float32
    copy of a half-precision x that autodiff would keep; on the CPU it is one pass of the backward kernel
    (``jbn._frozen``).
    """
    c = checked
    terms = (c.running_mean, c.running_var, c.scale, c.bias)
    view = frozen_view(c.x, c.feature_axes, dtype, *terms)
    if view is not None:
        return normalize_frozen(c.x, *terms, epsilon, view)

    @jax.checkpoint
    def normalized(x, mean, var, scale, bias, epsilon):
        return normalize(x, mean, var, scale, bias, epsilon=epsilon, dtype=dtype)

    return normalized(c.x, *terms, epsilon)


def train(checked: Checked, scale, bias, *, averaging: Averaging, epsilon, dtype, **statistics):
    """(y, batch statistics broadcast to x's rank, new state) with the batch statistics (training=True).

    `statistics` (axis_name, axis_index_groups, use_fast_variance) go to `Options`. Features without a selected
    entry normalize with the running statistics and keep them.
    """
    c = checked
    reduction_axes = tuple(axis for axis in range(c.x.ndim) if axis not in c.feature_axes)
    options = Options(reduction_axes, dtype, **statistics)
    y, stats = standardize(options, c.x, scale, bias, c.mask, (c.running_mean, c.running_var), epsilon)
    batch_mean, batch_var, count = (field.reshape(c.state.mean.shape) for field in stats)
    return y, stats, updated_state(c.state, batch_mean, batch_var, count > 0, averaging)


def updated_state(state: BatchNormState, batch_mean, batch_var, has_data, averaging: Averaging) -> BatchNormState:
    """The running statistics after a batch, kept in their dtype; unchanged where a feature has no data."""
    updates = has_data
    if averaging.skip_nonfinite_updates:
        updates = updates & jnp.isfinite(batch_mean) & jnp.isfinite(batch_var)
    momentum = averaging.momentum
    count = None if state.count is None else jnp.where(updates, state.count + 1, state.count)

    def average(running, batch):
        if averaging.running_average == "ema":
            updated = momentum * running + (1 - momentum) * batch
        else:
            t = jnp.maximum(count, 1).astype(batch.dtype)
            m = jnp.asarray(momentum, batch.dtype)
            # At momentum 1 the debiased weight is 0 / 0; its limit is the cumulative one, 1 / t.
            if averaging.running_average == "cumulative" or momentum == 1:
                weight = 1 / t
            else:  # the first weight is 1 by selection: m**1 need not round to m (a GPU's pow does not)
                weight = jnp.where(t > 1, (1 - m) / (1 - m**t), 1)
            updated = (1 - weight) * running + weight * batch  # the first batch (weight 1) replaces exactly
        return jnp.where(updates, updated, running).astype(running.dtype)

    return BatchNormState(average(state.mean, batch_mean), average(state.var, batch_var), count)
