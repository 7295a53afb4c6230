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
import numpy as np

from jbn import _checks
from jbn._batch_norm import BatchNormState, batch_norm
from jbn._fold import fold_batch_norm
from jbn._ghost import ghost_batch_norm
from jbn._norms import group_norm, instance_norm, layer_norm, rms_norm
from jbn._renorm import batch_renorm
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
    (default False; see ``jbn.batch_norm``): True keeps ``batch_stats`` when a batch's statistics are NaN or inf,
    and ``running_average`` (default ``"ema"``; ``"debiased_ema"`` or ``"cumulative"`` add a ``batch_stats/count``
    variable; see ``jbn.batch_norm``).

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
    running_average: str = "ema"

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask: jax.Array | None = None):
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        _checks.float32_reductions(self.force_float32_reductions)
        x = float_input(x)
        feature_shape = _feature_shape(x, self.axis, "axis")
        mean = self.variable("batch_stats", "mean", lambda shape: jnp.zeros(shape, jnp.float32), feature_shape)
        var = self.variable("batch_stats", "var", lambda shape: jnp.ones(shape, jnp.float32), feature_shape)
        count = None
        if self.running_average != "ema":  # the other averages count the batches: one more variable
            count = self.variable("batch_stats", "count", lambda shape: jnp.zeros(shape, jnp.int32), feature_shape)
        scale, bias = _scale_and_bias(self, feature_shape, self.use_bias)
        initializing = self.is_initializing()
        options = core_options(self, x, mask, scale, bias)
        if initializing:  # as in Flax: the named axis need not exist yet
            options["axis_name"] = None
        core, extra = self._core()
        y, state = core(
            x,
            BatchNormState(mean.value, var.value, None if count is None else count.value),
            scale,
            bias,
            training=not use_running_average,
            feature_axes=self.axis,
            momentum=self.momentum,
            use_fast_variance=self.use_fast_variance,
            skip_nonfinite_updates=self.skip_nonfinite_updates,
            running_average=self.running_average,
            **options,
            **extra,
        )
        if not use_running_average and not initializing:
            mean.value, var.value = state.mean, state.var
            if count is not None:
                count.value = state.count
        return y

    def _core(self):
        """The function this layer calls and its extra keyword arguments (the variants below override it)."""
        return batch_norm, {}


class BatchRenorm(BatchNorm):
    """`jbn.linen.BatchNorm` with batch renormalization in training (``jbn.batch_renorm``; Ioffe, 2017).

    Same attributes and variables as BatchNorm, so a checkpoint moves between the two, plus `rmax` and `dmax`,
    the clipping limits of the correction ``r`` and shift ``d`` (``rmax=1, dmax=0`` is batch norm).

    Examples:
      >>> import jax, jax.numpy as jnp, jbn.linen
      >>> layer = jbn.linen.BatchRenorm(use_running_average=False, rmax=1.0, dmax=0.0)
      >>> x = jnp.array([[1.0], [3.0]])
      >>> y, _ = layer.apply(layer.init(jax.random.key(0), x), x, mutable=["batch_stats"])
      >>> print(y.ravel().round(3))
      [-1.  1.]
    """

    rmax: float = 3.0
    dmax: float = 5.0

    def _core(self):
        return batch_renorm, {"rmax": self.rmax, "dmax": self.dmax}


class GhostBatchNorm(BatchNorm):
    """`jbn.linen.BatchNorm` with statistics per virtual batch in training (``jbn.ghost_batch_norm``).

    Same attributes and variables as BatchNorm, plus `virtual_batch_size`, which must divide the batch (the first
    axis of x) at every call in training; ``init`` (which updates nothing) accepts any batch size.

    Examples:
      >>> import jax, jax.numpy as jnp, jbn.linen
      >>> layer = jbn.linen.GhostBatchNorm(use_running_average=False, virtual_batch_size=2)
      >>> x = jnp.array([[1.0], [3.0], [10.0], [30.0]])
      >>> y, _ = layer.apply(layer.init(jax.random.key(0), x), x, mutable=["batch_stats"])
      >>> print(y.ravel().round(3))
      [-1.  1. -1.  1.]
    """

    virtual_batch_size: int = 32

    def _core(self):
        if self.is_initializing():  # init may see any batch size; it does not update the statistics
            return batch_norm, {}
        return ghost_batch_norm, {"virtual_batch_size": self.virtual_batch_size}


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


def fold_batch_norms(model: nn.Sequential, variables) -> tuple[nn.Sequential, dict]:
    """An `nn.Sequential` for inference with every Dense or Conv + BatchNorm pair folded into one layer.

    Each ``nn.Dense`` or ``nn.Conv`` directly followed by a batch norm over the last axis (Flax's or jbn's
    `BatchNorm`, `BatchRenorm`, `GhostBatchNorm`) becomes one layer of the same kind with a bias, whose weights
    are ``jbn.fold_batch_norm`` of the pair; the batch norm is dropped. Other layers are kept as they are. The
    result computes the original model's inference output (``use_running_average=True``) with one pass over the
    activations less per pair.

    Args:
      model: an ``nn.Sequential`` whose layers are modules or functions (``nn.relu``).
      variables: its variables: ``{"params": ..., "batch_stats": ...}``.

    Returns:
      ``(folded_model, folded_variables)``, ready for ``folded_model.apply(folded_variables, x)``.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jbn.linen
      >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=True), nn.relu, nn.Dense(2)])
      >>> x = jax.random.normal(jax.random.key(0), (3, 5))
      >>> variables = model.init(jax.random.key(1), x)
      >>> folded, folded_variables = jbn.linen.fold_batch_norms(model, variables)
      >>> len(folded.layers), bool(jnp.allclose(folded.apply(folded_variables, x), model.apply(variables, x)))
      (3, True)
    """
    params, stats = variables["params"], variables.get("batch_stats", {})
    layers, new_params, new_stats = [], {}, {}

    def keep(layer, old_name):
        name = f"layers_{len(layers)}"
        layers.append(layer)
        for source, target in ((params, new_params), (stats, new_stats)):
            if old_name in source:
                target[name] = source[old_name]

    index = 0
    while index < len(model.layers):
        layer, name = model.layers[index], f"layers_{index}"
        following = model.layers[index + 1] if index + 1 < len(model.layers) else None
        if isinstance(layer, (nn.Dense, nn.Conv)) and _folds_into(following):
            norm = f"layers_{index + 1}"
            kernel, bias = fold_batch_norm(
                params[name]["kernel"],
                params[name].get("bias"),
                BatchNormState(stats[norm]["mean"], stats[norm]["var"]),
                params.get(norm, {}).get("scale"),
                params.get(norm, {}).get("bias"),
                epsilon=following.epsilon,
            )
            layers.append(layer.clone(parent=None, use_bias=True))
            new_params[f"layers_{len(layers) - 1}"] = {"kernel": kernel, "bias": bias}
            index += 2
        else:
            keep(layer, name)
            index += 1
    folded = {"params": new_params} | ({"batch_stats": new_stats} if new_stats else {})
    return nn.Sequential(layers), folded


def _folds_into(layer) -> bool:
    """A batch norm over the last axis only (the output features of a Dense or Conv)."""
    return isinstance(layer, nn.BatchNorm) and tuple(np.atleast_1d(layer.axis)) in ((-1,),)
