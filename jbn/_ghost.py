"""Ghost (virtual) batch norm (Hoffer et al., 2017): batch statistics over small virtual batches of one batch."""

import jax
import jax.numpy as jnp

from jbn import _checks
from jbn._batch_norm import Averaging, BatchNormState, check_arguments, evaluate, updated_state
from jbn._standardize import Options, standardize


def ghost_batch_norm(
    x,
    state: BatchNormState,
    scale=None,
    bias=None,
    *,
    virtual_batch_size: int,
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
    """Ghost batch norm: `jbn.batch_norm` with statistics per virtual batch of `virtual_batch_size` examples.

    x's first axis (the batch) is split into ``G = N / virtual_batch_size`` consecutive virtual batches; in
    training, each is normalized with its own statistics, ``y_g = (x_g - mean_g) * rsqrt(var_g + epsilon) * scale
    + bias``, and the running statistics move toward the mean over the virtual batches (those with selected
    entries) of their statistics: ``new = momentum * state + (1 - momentum) * mean_g(mean_g, var_g)``. Small
    virtual batches inside a large batch keep batch norm's regularizing noise at large-batch training speed
    (Hoffer, Hubara and Soudry, "Train longer, generalize better", NeurIPS 2017). With ``virtual_batch_size = N``
    it is exactly `jbn.batch_norm`; ``training=False`` is batch norm's inference. With `axis_name`, virtual batch
    ``g`` of every participant is pooled with virtual batch ``g`` of the others. Other arguments as
    `jbn.batch_norm`.

    Args:
      x: floating array ``(N, ...)``; axis 0 is the batch and must not be a feature axis.
      state: the running statistics, a `BatchNormState` of x's feature shape.
      scale: optional array of x's feature shape; None means 1.
      bias: optional array of x's feature shape; None means 0.
      virtual_batch_size: a positive int that divides ``N``.
      training: required bool.

    Returns:
      ``(y, new_state)``.

    Raises:
      ValueError: `virtual_batch_size` does not divide ``N``, or axis 0 is a feature axis.
      TypeError: `virtual_batch_size` is not a positive int.

    Examples:
      >>> import jax.numpy as jnp, jbn
      >>> x = jnp.array([[1.0], [3.0], [10.0], [30.0]])  # two virtual batches of 2
      >>> y, state = jbn.ghost_batch_norm(x, jbn.batch_norm_state(1), virtual_batch_size=2, training=True)
      >>> y.ravel().round(3).tolist()
      [-1.0, 1.0, -1.0, 1.0]
      >>> print(state.mean)  # 0.99 * 0 + 0.01 * mean(2, 20)
      [0.11]
    """
    averaging = Averaging(momentum, running_average, skip_nonfinite_updates)
    checked = check_arguments(x, state, scale, bias, training, feature_axes, averaging, epsilon, mask)
    if not checked.training:
        return evaluate(checked, epsilon, dtype), state
    c = checked
    ghosts = _checks.virtual_batch_size(virtual_batch_size, c.x.shape, c.feature_axes)

    def split(value):
        """(N, ...) -> (G, N / G, ...); arrays with a batch axis of size 1 (broadcasting) get (1, 1, ...)."""
        if value is None:
            return None
        leading = (ghosts, -1) if value.shape[0] == c.x.shape[0] else (1, 1)
        return value.reshape(*leading, *value.shape[1:])

    reduction_axes = tuple(axis + 1 for axis in range(c.x.ndim) if axis not in c.feature_axes)
    options = Options(
        reduction_axes,
        dtype,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance,
    )
    fallback = (split(c.running_mean), split(c.running_var))
    y, stats = standardize(options, split(c.x), split(c.scale), split(c.bias), split(c.mask), fallback, epsilon)
    # Each virtual batch with data counts once; features with no data anywhere keep their running statistics.
    has_data = (stats.count > 0).astype(stats.mean.dtype)
    virtual = has_data.sum(0).reshape(c.state.mean.shape)

    def average(field):
        total = jnp.sum(jnp.where(has_data > 0, field, 0), 0).reshape(c.state.mean.shape)
        return total / jnp.maximum(virtual, 1)

    batch_mean, batch_var = average(stats.mean), average(stats.var)
    new_state = updated_state(c.state, batch_mean, batch_var, virtual > 0, averaging)
    return y.reshape(c.x.shape), new_state
