"""Layer, RMS, instance and group normalization: each picks its reduction axes, then moments and normalize."""

import jax
import jax.numpy as jnp

from jbn import _checks
from jbn._normalize import feature_broadcast
from jbn._standardize import Options, standardize


def layer_norm(
    x,
    scale=None,
    bias=None,
    *,
    reduction_axes=-1,
    feature_axes=-1,
    epsilon=1e-6,
    mask=None,
    axis_name=None,
    axis_index_groups=None,
    dtype=None,
    use_fast_variance=False,
) -> jax.Array:
    """Layer normalization: ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias``, statistics per example.

    ``mean`` and ``var`` (biased) are taken over `reduction_axes`, separately for every position of the other
    axes; `scale` and `bias` vary along `feature_axes`. Defaults match ``flax.linen.LayerNorm``.

    Args:
      x: floating array, e.g. ``(B, T, C)``.
      scale: optional array of x's shape along `feature_axes` (``(C,)`` by default); None means 1.
      bias: optional array of the same shape; None means 0.
      reduction_axes: int or tuple, the axes the statistics are taken over.
      feature_axes: int or tuple, the axes `scale` and `bias` vary along.
      epsilon: >= 0, added to the variance.
      mask: optional boolean array broadcastable to x; False entries are ignored (see ``jbn.moments``).
      axis_name: optional mapped axis name to pool the statistics over.
      axis_index_groups: optional sub-groups of `axis_name` that pool separately.
      dtype: output dtype; x's dtype when None.
      use_fast_variance: less exact, opt-in: Flax's one-pass variance, wrong on data far from zero (see
        ``jbn.moments``); only for reproducing runs made with Flax's default.

    Returns:
      y, shaped like x.

    Examples:
      >>> import jax.numpy as jnp, jbn
      >>> jbn.layer_norm(jnp.array([[1.0, 3.0], [10.0, 30.0]])).round(3).tolist()
      [[-1.0, 1.0], [-1.0, 1.0]]
    """
    x, scale, bias, feature_axes, mask = _checked(x, scale, bias, feature_axes, epsilon, mask)
    reduction_axes = _checks.axes(x.ndim, reduction_axes, "reduction_axes")
    return _normalize_over(
        x,
        reduction_axes,
        feature_axes,
        scale,
        bias,
        epsilon=epsilon,
        dtype=dtype,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance,
    )


def rms_norm(
    x,
    scale=None,
    *,
    reduction_axes=-1,
    feature_axes=-1,
    epsilon=1e-6,
    mask=None,
    axis_name=None,
    axis_index_groups=None,
    dtype=None,
) -> jax.Array:
    """RMS normalization: ``y = x * rsqrt(mean(x^2) + epsilon) * scale``, with no centering and no bias.

    ``mean(x^2)`` is taken over `reduction_axes` for every position of the other axes. Defaults match
    ``flax.linen.RMSNorm``. With ``epsilon=0``, data so small that every square underflows float32 (|x| below
    ~1e-19, all of it) cannot be told from zeros and divide by zero; any ``epsilon > 0`` gives the right ~0.

    Args:
      x: floating array, e.g. ``(B, T, C)``.
      scale: optional array of x's shape along `feature_axes` (``(C,)`` by default); None means 1.
      reduction_axes: int or tuple, the axes the mean square is taken over.
      feature_axes: int or tuple, the axes `scale` varies along.
      epsilon: >= 0, added to the mean square.
      mask: optional boolean array broadcastable to x; False entries are ignored.
      axis_name: optional mapped axis name to pool the mean square over.
      axis_index_groups: optional sub-groups of `axis_name` that pool separately.
      dtype: output dtype; x's dtype when None.

    Returns:
      y, shaped like x.

    Examples:
      >>> import jax.numpy as jnp, jbn
      >>> print(jbn.rms_norm(jnp.array([[3.0, 4.0, 0.0]]), epsilon=0.0))
      [[1.0392305 1.3856406 0.       ]]
    """
    x, scale, _, feature_axes, mask = _checked(x, scale, None, feature_axes, epsilon, mask)
    reduction_axes = _checks.axes(x.ndim, reduction_axes, "reduction_axes")
    return _normalize_over(
        x,
        reduction_axes,
        feature_axes,
        scale,
        None,
        epsilon=epsilon,
        dtype=dtype,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        centered=False,
    )


def instance_norm(
    x,
    scale=None,
    bias=None,
    *,
    feature_axes=-1,
    epsilon=1e-6,
    mask=None,
    axis_name=None,
    axis_index_groups=None,
    dtype=None,
    use_fast_variance=False,
) -> jax.Array:
    """Instance normalization: ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias`` per example and channel.

    ``mean`` and ``var`` are taken over every axis except axis 0 (the batch) and `feature_axes`, e.g. over
    ``(H, W)`` for ``(N, H, W, C)``. Defaults match ``flax.linen.InstanceNorm``.

    Args:
      x: floating array of rank >= 2 with the batch on axis 0, e.g. ``(N, H, W, C)``.
      scale: optional array of x's feature shape (``(C,)`` by default); None means 1.
      bias: optional array of the same shape; None means 0.
      feature_axes: int or tuple, not including axis 0.
      epsilon: >= 0, added to the variance.
      mask: optional boolean array broadcastable to x; False entries are ignored.
      axis_name: optional mapped axis name to pool the statistics over.
      axis_index_groups: optional sub-groups of `axis_name` that pool separately.
      dtype: output dtype; x's dtype when None.
      use_fast_variance: less exact, opt-in: Flax's one-pass variance, wrong on data far from zero (see
        ``jbn.moments``); only for reproducing runs made with Flax's default.

    Returns:
      y, shaped like x.

    Examples:
      >>> import jax.numpy as jnp, jbn
      >>> x = jnp.array([[[1.0], [3.0]], [[10.0], [30.0]]])  # (N=2, L=2, C=1)
      >>> jbn.instance_norm(x)[..., 0].round(3).tolist()
      [[-1.0, 1.0], [-1.0, 1.0]]
    """
    x, scale, bias, feature_axes, mask = _checked(x, scale, bias, feature_axes, epsilon, mask)
    _checks.not_batch_axis(x.ndim, feature_axes, "instance_norm")
    reduction_axes = tuple(axis for axis in range(1, x.ndim) if axis not in feature_axes)
    return _normalize_over(
        x,
        reduction_axes,
        feature_axes,
        scale,
        bias,
        epsilon=epsilon,
        dtype=dtype,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance,
    )


def group_norm(
    x,
    scale=None,
    bias=None,
    *,
    num_groups=32,
    group_size=None,
    feature_axes=-1,
    reduction_axes=None,
    epsilon=1e-6,
    mask=None,
    axis_name=None,
    axis_index_groups=None,
    dtype=None,
    use_fast_variance=False,
) -> jax.Array:
    """Group normalization: ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias`` per example and group.

    The ``C`` channels on `feature_axes` are split into `num_groups` consecutive groups of `group_size`
    channels; ``mean`` and ``var`` are taken per example over every non-batch axis and the channels of one group.
    Give exactly one of `num_groups` and `group_size` (``num_groups=None, group_size=4``), as in Flax.
    One group is layer norm over all non-batch axes; ``group_size=1`` is instance norm.

    Args:
      x: floating array of rank >= 2 with the batch on axis 0: ``(N, ..., C)``, or ``(N, C, H, W)`` with
        ``feature_axes=1``.
      scale: optional ``(C,)`` array; None means 1.
      bias: optional ``(C,)`` array; None means 0.
      num_groups: number of groups, dividing C; None when `group_size` is given.
      group_size: channels per group, dividing C; None when `num_groups` is given.
      feature_axes: the one channel axis (an int, or a tuple of one), not axis 0.
      reduction_axes: the other axes the statistics pool over besides the channels of a group; by default every
        axis but 0 and the channel axis. Axes left out keep separate statistics, like the batch axis.
      epsilon: >= 0, added to the variance.
      mask: optional boolean array broadcastable to x (e.g. ``(N, T, 1)`` for ``(N, T, C)``).
      axis_name: optional mapped axis name to pool the statistics over.
      axis_index_groups: optional sub-groups of `axis_name` that pool separately.
      dtype: output dtype; x's dtype when None.
      use_fast_variance: less exact, opt-in: Flax's one-pass variance, wrong on data far from zero (see
        ``jbn.moments``); only for reproducing runs made with Flax's default.

    Returns:
      y, shaped like x.

    Examples:
      >>> import jax.numpy as jnp, jbn
      >>> x = jnp.array([[1.0, 3.0, 10.0, 30.0]])  # (N=1, C=4), two groups of two channels
      >>> jbn.group_norm(x, num_groups=2).round(3).tolist()
      [[-1.0, 1.0, -1.0, 1.0]]
    """
    x, scale, bias, feature_axes, mask = _checked(x, scale, bias, feature_axes, epsilon, mask)
    (channel,) = _checks.single_channel_axis(x.ndim, feature_axes, "group_norm")
    groups = _checks.group_count(x.shape[channel], num_groups, group_size)
    if reduction_axes is None:
        reduction_axes = tuple(axis for axis in range(1, x.ndim) if axis != channel)
    reduction_axes = _checks.axes(x.ndim, reduction_axes, "reduction_axes")

    # Split the channel axis into (groups, channels per group) and normalize over the second one too.
    def grouped(shape, split):
        return (*shape[:channel], *split, *shape[channel + 1 :])

    if mask is not None:
        mask = mask.reshape(grouped(mask.shape, (groups, -1) if mask.shape[channel] > 1 else (1, 1)))
    grouped_axes = (*(axis + (axis > channel) for axis in reduction_axes if axis != channel), channel + 1)
    y = _normalize_over(
        x.reshape(grouped(x.shape, (groups, -1))),
        grouped_axes,
        (channel, channel + 1),
        None if scale is None else scale.reshape(groups, -1),
        None if bias is None else bias.reshape(groups, -1),
        epsilon=epsilon,
        dtype=dtype,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance,
    )
    return y.reshape(x.shape)


def _checked(x, scale, bias, feature_axes, epsilon, mask):
    """The checks every norm shares; returns x, scale, bias, canonical feature_axes and mask."""
    x = _checks.float_array(x)
    feature_axes = _checks.axes(x.ndim, feature_axes, "feature_axes")
    scale = _checks.feature_param(scale, "scale", x.shape, feature_axes)
    bias = _checks.feature_param(bias, "bias", x.shape, feature_axes)
    _checks.epsilon(epsilon)
    return x, scale, bias, feature_axes, _checks.mask(mask, x.shape)


def _normalize_over(x, reduction_axes, feature_axes, scale, bias, *, epsilon, dtype, **statistics_options):
    """Statistics over `reduction_axes` for every other position, then the affine normalization.

    `statistics_options` (mask, axis_name, axis_index_groups, use_fast_variance, centered) go to `Options`.
    """
    mask = statistics_options.pop("mask")
    if mask is not None:
        mask = jnp.broadcast_to(mask, x.shape)
    options = Options(reduction_axes, dtype, **statistics_options)

    def broadcast(value):
        return feature_broadcast(value, x.ndim, feature_axes)

    y, _ = standardize(options, x, broadcast(scale), broadcast(bias), mask, None, epsilon)
    return y
