"""Drop-in replacements for flax.nnx's normalization layers, computed by jbn's functional core.

Each class subclasses the flax.nnx class of the same name: the same constructor (``num_features`` first,
``rngs=`` keyword), the same attributes (``scale``, ``bias`` as ``nnx.Param``, ``mean``, ``var`` as
``nnx.BatchStat``, ``None`` when disabled), ``model.train()`` / ``model.eval()`` and ``use_running_average`` at
call time, so ``nnx.state`` / ``nnx.update`` move weights either way. Differences, all deliberate:

* ``use_fast_variance`` defaults to ``False``: jbn's exact statistics (``True``: Flax's one-pass formula, less
  exact, for reproducing runs made with Flax's default).
* With ``dtype`` set, eval mode normalizes with the float32 running statistics (Flax first casts them to ``dtype``).
* Statistics across ``axis_name`` are weighted by counts; a batch whose mask selects nothing leaves the running
  statistics unchanged; GroupNorm accepts masks that broadcast over the channels.
"""

import math

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from jbn import _checks
from jbn._batch_norm import BatchNormState, batch_norm
from jbn._ghost import ghost_batch_norm
from jbn._norms import group_norm, instance_norm, layer_norm, rms_norm
from jbn._renorm import batch_renorm
from jbn._wrappers import core_options


def _value(variable):
    return None if variable is None else variable[...]


def _as_feature_shape(value, x, feature_axes, name):
    """nnx keeps parameters flat, ``(num_features,)``: shape them like x's feature axes when the sizes agree.

    When they do not, the value is passed on as it is and jbn's checks report the mismatch.
    """
    if value is None:
        return None
    shape = tuple(x.shape[axis] for axis in _checks.axes(x.ndim, feature_axes, name))
    return value.reshape(shape) if value.size == math.prod(shape) else value


class BatchNorm(nnx.BatchNorm):
    """flax.nnx.BatchNorm computed by ``jbn.batch_norm``: ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias``.

    Training (``use_running_average=False``, the default, or after ``model.train()``) normalizes with the batch
    statistics over every axis but `axis` and updates ``mean`` and ``var`` as
    ``new = momentum * old + (1 - momentum) * batch``; eval (``model.eval()``) uses them. Arguments are
    flax.nnx.BatchNorm's, plus ``skip_nonfinite_updates`` (default False; see ``jbn.batch_norm``): True keeps the
    running statistics when a batch's statistics are NaN or inf, and ``running_average`` (default ``"ema"``;
    ``"debiased_ema"`` or ``"cumulative"`` add a ``count`` batch statistic; see ``jbn.batch_norm``).

    Examples:
      >>> import jax.numpy as jnp, jbn.nnx, flax.nnx as nnx
      >>> layer = jbn.nnx.BatchNorm(2, momentum=0.9, skip_nonfinite_updates=True, rngs=nnx.Rngs(0))
      >>> print(layer(jnp.array([[1.0, 10.0], [3.0, 30.0]])).round(3))
      [[-1. -1.]
       [ 1.  1.]]
      >>> print(layer.mean[...])
      [0.2 2. ]
      >>> _ = layer(jnp.array([[jnp.nan, 10.0], [3.0, 30.0]]))
      >>> print(layer.mean[...])  # the NaN feature keeps its statistics
      [0.2 3.8]
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_fast_variance: bool = False,
        skip_nonfinite_updates: bool = False,
        running_average: str = "ema",
        **kwargs,
    ):
        super().__init__(num_features, use_fast_variance=use_fast_variance, **kwargs)
        self.skip_nonfinite_updates = skip_nonfinite_updates
        self.running_average = running_average
        # The other averages count the batches: one more variable.
        self.count = None if running_average == "ema" else nnx.BatchStat(jnp.zeros(self.mean.shape, jnp.int32))

    def __call__(self, x, use_running_average: bool | None = None, *, mask: jax.Array | None = None):
        use_running_average = _checks.running_average_flag(
            use_running_average, self.use_running_average, "jbn.nnx.BatchNorm"
        )
        x, scale, bias = self.promote_dtype((x, _value(self.scale), _value(self.bias)), dtype=self.dtype)
        x = _checks.float_array(x)
        core, extra = self._core()
        y, state = core(
            x,
            BatchNormState(self.mean[...], self.var[...], _value(self.count)),
            _as_feature_shape(scale, x, self.axis, "axis"),
            _as_feature_shape(bias, x, self.axis, "axis"),
            training=not use_running_average,
            feature_axes=self.axis,
            momentum=self.momentum,
            **core_options(self, x, mask, scale, bias),
            use_fast_variance=self.use_fast_variance,
            skip_nonfinite_updates=self.skip_nonfinite_updates,
            running_average=self.running_average,
            **extra,
        )
        if not use_running_average:
            self.mean[...] = jax.lax.stop_gradient(state.mean)
            self.var[...] = jax.lax.stop_gradient(state.var)
            if self.count is not None:
                self.count[...] = state.count
        return y

    def _core(self):
        """The function this layer calls and its extra keyword arguments (the variants below override it)."""
        return batch_norm, {}


class BatchRenorm(BatchNorm):
    """`jbn.nnx.BatchNorm` with batch renormalization in training (``jbn.batch_renorm``; Ioffe, 2017).

    Same arguments and variables as BatchNorm, plus `rmax` and `dmax`, the clipping limits of the correction
    ``r`` and shift ``d`` (``rmax=1, dmax=0`` is batch norm); they are plain attributes, so a schedule may set
    them between steps.

    Examples:
      >>> import jax.numpy as jnp, jbn.nnx, flax.nnx as nnx
      >>> layer = jbn.nnx.BatchRenorm(1, rmax=1.0, dmax=0.0, rngs=nnx.Rngs(0))
      >>> print(layer(jnp.array([[1.0], [3.0]])).ravel().round(3))
      [-1.  1.]
    """

    def __init__(self, num_features: int, *, rmax: float = 3.0, dmax: float = 5.0, **kwargs):
        super().__init__(num_features, **kwargs)
        self.rmax, self.dmax = rmax, dmax

    def _core(self):
        return batch_renorm, {"rmax": self.rmax, "dmax": self.dmax}


class GhostBatchNorm(BatchNorm):
    """`jbn.nnx.BatchNorm` with statistics per virtual batch in training (``jbn.ghost_batch_norm``).

    Same arguments and variables as BatchNorm, plus `virtual_batch_size`, which must divide the batch (the first
    axis of x) in training.

    Examples:
      >>> import jax.numpy as jnp, jbn.nnx, flax.nnx as nnx
      >>> layer = jbn.nnx.GhostBatchNorm(1, virtual_batch_size=2, rngs=nnx.Rngs(0))
      >>> print(layer(jnp.array([[1.0], [3.0], [10.0], [30.0]])).ravel().round(3))
      [-1.  1. -1.  1.]
    """

    def __init__(self, num_features: int, *, virtual_batch_size: int = 32, **kwargs):
        super().__init__(num_features, **kwargs)
        self.virtual_batch_size = virtual_batch_size

    def _core(self):
        return ghost_batch_norm, {"virtual_batch_size": self.virtual_batch_size}


class LayerNorm(nnx.LayerNorm):
    """flax.nnx.LayerNorm computed by ``jbn.layer_norm``: statistics over `reduction_axes` per example.

    ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias``; `scale` and `bias` vary along `feature_axes`.

    Examples:
      >>> import jax.numpy as jnp, jbn.nnx, flax.nnx as nnx
      >>> print(jbn.nnx.LayerNorm(2, rngs=nnx.Rngs(0))(jnp.array([[1.0, 3.0]])).round(3))
      [[-1.  1.]]
    """

    def __init__(self, num_features: int, *, use_fast_variance: bool = False, **kwargs):
        super().__init__(num_features, use_fast_variance=use_fast_variance, **kwargs)

    def __call__(self, x, *, mask: jax.Array | None = None):
        x, scale, bias = self.promote_dtype((x, _value(self.scale), _value(self.bias)), dtype=self.dtype)
        x = _checks.float_array(x)
        return layer_norm(
            x,
            _as_feature_shape(scale, x, self.feature_axes, "feature_axes"),
            _as_feature_shape(bias, x, self.feature_axes, "feature_axes"),
            reduction_axes=self.reduction_axes,
            feature_axes=self.feature_axes,
            **core_options(self, x, mask, scale, bias),
            use_fast_variance=self.use_fast_variance,
        )


class RMSNorm(nnx.RMSNorm):
    """flax.nnx.RMSNorm computed by ``jbn.rms_norm``: ``y = x * rsqrt(mean(x^2) + epsilon) * scale``.

    Examples:
      >>> import jax.numpy as jnp, jbn.nnx, flax.nnx as nnx
      >>> print(jbn.nnx.RMSNorm(2, epsilon=0.0, rngs=nnx.Rngs(0))(jnp.array([[3.0, -3.0]])).round(3))
      [[ 1. -1.]]
    """

    def __init__(self, num_features: int, *, use_fast_variance: bool = False, **kwargs):
        super().__init__(num_features, use_fast_variance=use_fast_variance, **kwargs)

    def __call__(self, x, mask: jax.Array | None = None):
        x, scale = self.promote_dtype((x, _value(self.scale)), dtype=self.dtype)
        x = _checks.float_array(x)
        return rms_norm(
            x,
            _as_feature_shape(scale, x, self.feature_axes, "feature_axes"),
            reduction_axes=self.reduction_axes,
            feature_axes=self.feature_axes,
            **core_options(self, x, mask, scale),
        )


class InstanceNorm(nnx.InstanceNorm):
    """flax.nnx.InstanceNorm computed by ``jbn.instance_norm``: statistics per example and channel.

    ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias`` with ``mean``, ``var`` over every axis but the batch
    axis 0 and `feature_axes`.

    Examples:
      >>> import jax.numpy as jnp, jbn.nnx, flax.nnx as nnx
      >>> layer = jbn.nnx.InstanceNorm(1, rngs=nnx.Rngs(0))
      >>> print(layer(jnp.array([[[1.0], [3.0]]]))[..., 0].round(3))
      [[-1.  1.]]
    """

    def __init__(self, num_features: int, *, use_fast_variance: bool = False, **kwargs):
        super().__init__(num_features, use_fast_variance=use_fast_variance, **kwargs)

    def __call__(self, x, *, mask: jax.Array | None = None):
        x, scale, bias = self.promote_dtype((x, _value(self.scale), _value(self.bias)), dtype=self.dtype)
        x = _checks.float_array(x)
        return instance_norm(
            x,
            _as_feature_shape(scale, x, self.feature_axes, "feature_axes"),
            _as_feature_shape(bias, x, self.feature_axes, "feature_axes"),
            feature_axes=self.feature_axes,
            **core_options(self, x, mask, scale, bias),
            use_fast_variance=self.use_fast_variance,
        )


class GroupNorm(nnx.GroupNorm):
    """flax.nnx.GroupNorm computed by ``jbn.group_norm``: statistics per example and group of channels.

    ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias`` with ``mean``, ``var`` over the non-batch axes and the
    channels of each group.

    Channels are the last axis. Exactly one of `num_groups` and `group_size` (pass ``num_groups=None`` with
    `group_size`); a bad combination raises jbn's error at construction.

    Examples:
      >>> import jax.numpy as jnp, jbn.nnx, flax.nnx as nnx
      >>> layer = jbn.nnx.GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0))
      >>> print(layer(jnp.array([[1.0, 3.0, 10.0, 30.0]])).round(3))
      [[-1.  1. -1.  1.]]
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = 32,
        group_size: int | None = None,
        *,
        use_fast_variance: bool = False,
        **kwargs,
    ):
        _checks.group_count(num_features, num_groups, group_size)
        super().__init__(num_features, num_groups, group_size, use_fast_variance=use_fast_variance, **kwargs)

    def __call__(self, x, *, mask: jax.Array | None = None):
        x, scale, bias = self.promote_dtype((x, _value(self.scale), _value(self.bias)), dtype=self.dtype)
        x = _checks.float_array(x)
        reduction_axes = None
        if self.reduction_axes is not None:
            reduction_axes = _checks.channel_in_reduction_axes(x.ndim, self.reduction_axes, self.feature_axis)
        return group_norm(
            x,
            scale,
            bias,
            num_groups=self.num_groups,
            group_size=None,
            feature_axes=self.feature_axis,
            reduction_axes=reduction_axes,
            **core_options(self, x, mask, scale, bias),
            use_fast_variance=self.use_fast_variance,
        )
