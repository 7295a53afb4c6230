"""Drop-in replacements for flax.linen's normalization layers, computed by jbn's functional core.

Each class subclasses the Flax class of the same name, so it has every attribute, default and initializer of
Flax's (``isinstance(jbn.linen.BatchNorm(), flax.linen.BatchNorm)`` holds) and creates the same variables:
``params/{scale,bias}`` and, for batch norm, ``batch_stats/{mean,var}``, with Flax's shapes and dtypes, so
checkpoints move either way. Two deliberate differences:

* ``use_fast_variance`` defaults to ``False``: jbn's exact statistics. ``True`` gives Flax's one-pass formula,
  less exact (off by more than 1,000 on data with mean 1e4), for reproducing runs made with Flax's default.
* ``force_float32_reductions=False`` is refused: statistics are always float32 or wider.

jbn's behaviour also differs where Flax's is a defect: statistics across ``axis_name`` are weighted by counts
(exact for uneven or masked shards), a batch whose mask selects nothing leaves ``batch_stats`` unchanged instead
of writing NaN, and GroupNorm accepts masks that broadcast over the channels (``(B, T, 1)``).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jbn import _checks
from jbn._batch_norm import BatchNormState, batch_norm
from jbn._norms import group_norm, instance_norm, layer_norm, rms_norm
from jbn._wrappers import core_options, float_input


def _feature_shape(x, feature_axes, name):
    x = jnp.asarray(x)
    return tuple(x.shape[axis] for axis in _checks.axes(x.ndim, feature_axes, name))


def _scale_and_bias(module, feature_shape, use_bias=True):
    scale = module.param("scale", module.scale_init, feature_shape, module.param_dtype) if module.use_scale else None
    bias = module.param("bias", module.bias_init, feature_shape, module.param_dtype) if use_bias else None
    return scale, bias


class BatchNorm(nn.BatchNorm):
    """flax.linen.BatchNorm computed by ``jbn.batch_norm``: ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias``.

    Training (``use_running_average=False``) normalizes with the batch statistics over every axis but `axis` and
    updates ``batch_stats`` (make it mutable: ``apply(..., mutable=['batch_stats'])``) as
    ``new = momentum * old + (1 - momentum) * batch``; eval uses ``batch_stats``. As in Flax, ``init`` does not
    update the statistics and ignores `axis_name`. Attributes are Flax's, plus ``skip_nonfinite_updates``
    (default False; see ``jbn.batch_norm``): True keeps ``batch_stats`` when a batch's statistics are NaN or inf.

    Examples:
      >>> import jax, jax.numpy as jnp, jbn.linen
      >>> layer = jbn.linen.BatchNorm(use_running_average=False, momentum=0.9, skip_nonfinite_updates=True)
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> variables = layer.init(jax.random.key(0), x)
      >>> y, updates = layer.apply(variables, x, mutable=["batch_stats"])
      >>> print(y.round(3))
      [[-1. -1.]
       [ 1.  1.]]
      >>> print(updates["batch_stats"]["mean"])
      [0.2 2. ]
      >>> _, kept = layer.apply(variables, x.at[0, 0].set(jnp.nan), mutable=["batch_stats"])
      >>> print(kept["batch_stats"]["mean"])  # the NaN feature keeps its statistics
      [0. 2.]
    """

    use_fast_variance: bool = False
    skip_nonfinite_updates: bool = False

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask: jax.Array | None = None):
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        _checks.float32_reductions(self.force_float32_reductions)
        x = float_input(x)
        feature_shape = _feature_shape(x, self.axis, "axis")
        mean = self.variable("batch_stats", "mean", lambda shape: jnp.zeros(shape, jnp.float32), feature_shape)
        var = self.variable("batch_stats", "var", lambda shape: jnp.ones(shape, jnp.float32), feature_shape)
        scale, bias = _scale_and_bias(self, feature_shape, self.use_bias)
        initializing = self.is_initializing()
        options = core_options(self, x, mask, scale, bias)
        if initializing:  # as in Flax: the named axis need not exist yet
            options["axis_name"] = None
        y, state = batch_norm(
            x,
            BatchNormState(mean.value, var.value),
            scale,
            bias,
            training=not use_running_average,
            feature_axes=self.axis,
            momentum=self.momentum,
            use_fast_variance=self.use_fast_variance,
            skip_nonfinite_updates=self.skip_nonfinite_updates,
            **options,
        )
        if not use_running_average and not initializing:
            mean.value, var.value = state.mean, state.var
        return y


class LayerNorm(nn.LayerNorm):
    """flax.linen.LayerNorm computed by ``jbn.layer_norm``: statistics over `reduction_axes` per example.

    ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias``; `scale` and `bias` vary along `feature_axes`.

    Examples:
      >>> import jax, jax.numpy as jnp, jbn.linen
      >>> layer = jbn.linen.LayerNorm()
      >>> x = jnp.array([[1.0, 3.0]])
      >>> print(layer.apply(layer.init(jax.random.key(0), x), x).round(3))
      [[-1.  1.]]
    """

    use_fast_variance: bool = False

    @nn.compact
    def __call__(self, x, *, mask: jax.Array | None = None):
        _checks.float32_reductions(self.force_float32_reductions)
        x = float_input(x)
        scale, bias = _scale_and_bias(self, _feature_shape(x, self.feature_axes, "feature_axes"), self.use_bias)
        return layer_norm(
            x,
            scale,
            bias,
            reduction_axes=self.reduction_axes,
            feature_axes=self.feature_axes,
            **core_options(self, x, mask, scale, bias),
            use_fast_variance=self.use_fast_variance,
        )


class RMSNorm(nn.RMSNorm):
    """flax.linen.RMSNorm computed by ``jbn.rms_norm``: ``y = x * rsqrt(mean(x^2) + epsilon) * scale``.

    ``use_fast_variance`` is accepted for compatibility and has no effect: RMS norm does not center.

    Examples:
      >>> import jax, jax.numpy as jnp, jbn.linen
      >>> layer = jbn.linen.RMSNorm(epsilon=0.0)
      >>> x = jnp.array([[3.0, -3.0]])
      >>> print(layer.apply(layer.init(jax.random.key(0), x), x).round(3))
      [[ 1. -1.]]
    """

    use_fast_variance: bool = False

    @nn.compact
    def __call__(self, x, *, mask: jax.Array | None = None):
        _checks.float32_reductions(self.force_float32_reductions)
        x = float_input(x)
        scale, _ = _scale_and_bias(self, _feature_shape(x, self.feature_axes, "feature_axes"), use_bias=False)
        return rms_norm(
            x,
            scale,
            reduction_axes=self.reduction_axes,
            feature_axes=self.feature_axes,
            **core_options(self, x, mask, scale),
        )


class InstanceNorm(nn.InstanceNorm):
    """flax.linen.InstanceNorm computed by ``jbn.instance_norm``: statistics per example and channel.

    ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias`` with ``mean``, ``var`` over every axis but the batch
    axis 0 and `feature_axes`.

    Examples:
      >>> import jax, jax.numpy as jnp, jbn.linen
      >>> layer = jbn.linen.InstanceNorm()
      >>> x = jnp.array([[[1.0], [3.0]]])  # (N=1, L=2, C=1)
      >>> print(layer.apply(layer.init(jax.random.key(0), x), x)[..., 0].round(3))
      [[-1.  1.]]
    """

    use_fast_variance: bool = False

    @nn.compact
    def __call__(self, x, *, mask: jax.Array | None = None):
        _checks.float32_reductions(self.force_float32_reductions)
        x = float_input(x)
        scale, bias = _scale_and_bias(self, _feature_shape(x, self.feature_axes, "feature_axes"), self.use_bias)
        return instance_norm(
            x,
            scale,
            bias,
            feature_axes=self.feature_axes,
            **core_options(self, x, mask, scale, bias),
            use_fast_variance=self.use_fast_variance,
        )


class GroupNorm(nn.GroupNorm):
    """flax.linen.GroupNorm computed by ``jbn.group_norm``: statistics per example and group of channels.

    ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias`` with ``mean``, ``var`` over the non-batch axes and the
    channels of each group.

    Channels are the last axis; `reduction_axes` (Flax's convention) must include it. Exactly one of
    `num_groups` and `group_size`; pass ``num_groups=None`` with `group_size`.

    Examples:
      >>> import jax, jax.numpy as jnp, jbn.linen
      >>> layer = jbn.linen.GroupNorm(num_groups=2)
      >>> x = jnp.array([[1.0, 3.0, 10.0, 30.0]])
      >>> print(layer.apply(layer.init(jax.random.key(0), x), x).round(3))
      [[-1.  1. -1.  1.]]
    """

    use_fast_variance: bool = False

    @nn.compact
    def __call__(self, x, *, mask: jax.Array | None = None):
        _checks.float32_reductions(self.force_float32_reductions)
        x = float_input(x)
        reduction_axes = None
        if self.reduction_axes is not None:
            reduction_axes = _checks.channel_in_reduction_axes(x.ndim, self.reduction_axes, -1)
        _checks.group_count(x.shape[-1], self.num_groups, self.group_size)
        scale, bias = _scale_and_bias(self, (x.shape[-1],), self.use_bias)
        return group_norm(
            x,
            scale,
            bias,
            num_groups=self.num_groups,
            group_size=self.group_size,
            reduction_axes=reduction_axes,
            **core_options(self, x, mask, scale, bias),
            use_fast_variance=self.use_fast_variance,
        )
