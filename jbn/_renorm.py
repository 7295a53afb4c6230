"""Batch renormalization (Ioffe, 2017): batch norm whose training output is corrected toward the running statistics."""

import jax
import jax.numpy as jnp
from jax import lax

from jbn import _checks
from jbn._batch_norm import Averaging, BatchNormState, check_arguments, evaluate, train


def batch_renorm(
    x,
    state: BatchNormState,
    scale=None,
    bias=None,
    *,
    training: bool,
    rmax=3.0,
    dmax=5.0,
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
    """Batch renormalization: ``y = ((x - mean_B) / sigma_B * r + d) * scale + bias`` in training.

    With the batch statistics ``mean_B``, ``sigma_B = sqrt(var_B + epsilon)`` and the running ones ``mean``,
    ``sigma = sqrt(var + epsilon)`` (from `state`, before this batch's update)::

        r = stop_gradient(clip(sigma_B / sigma, 1 / rmax, rmax))
        d = stop_gradient(clip((mean_B - mean) / sigma, -dmax, dmax))

    Gradients flow through the batch statistics as in batch norm, while ``r`` and ``d`` move the output toward
    what the running statistics would give, so training and inference agree better for small or non-i.i.d.
    batches (Ioffe, "Batch Renormalization", NeurIPS 2017). ``rmax=1, dmax=0`` is exactly `jbn.batch_norm`. The
    paper starts at that setting and relaxes it over training (e.g. to ``rmax=3, dmax=5``): `rmax` and `dmax` may
    be traced values, so a schedule can be computed inside a jitted step. The running statistics are updated as
    by `jbn.batch_norm`, and ``training=False`` is batch norm's inference. Other arguments as `jbn.batch_norm`.

    Args:
      x: floating array, e.g. ``(N, H, W, C)``.
      state: the running statistics, a `BatchNormState` of x's feature shape.
      scale: optional array of x's feature shape; None means 1.
      bias: optional array of x's feature shape; None means 0.
      training: required bool: renormalized batch statistics (True) or the running statistics (False).
      rmax: >= 1, the largest correction factor ``r`` (and ``1 / rmax`` the smallest).
      dmax: >= 0, the largest shift ``|d|``, in running standard deviations.

    Returns:
      ``(y, new_state)``.

    Raises:
      ValueError: ``rmax < 1`` or ``dmax < 0`` (when given as numbers), and batch norm's own checks.

    Examples:
      >>> import jax.numpy as jnp, jbn
      >>> x = jnp.array([[1.0], [3.0]])  # batch mean 2, batch std 1
      >>> state = jbn.BatchNormState(jnp.array([0.0]), jnp.array([4.0]))  # running mean 0, std 2
      >>> y, _ = jbn.batch_renorm(x, state, training=True, rmax=3.0, dmax=5.0, epsilon=0.0)
      >>> y.ravel().tolist()  # r = 1/2, d = 1: (xhat * r + d)
      [0.5, 1.5]
    """
    _checks.renorm_limits(rmax, dmax)
    averaging = Averaging(momentum, running_average, skip_nonfinite_updates)
    checked = check_arguments(x, state, scale, bias, training, feature_axes, averaging, epsilon, mask)
    if not checked.training:
        return evaluate(checked, epsilon, dtype), state
    compute = checked.running_var.dtype
    xhat, stats, new_state = train(
        checked,
        None,
        None,
        averaging=averaging,
        epsilon=epsilon,
        dtype=compute,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance,
    )
    sigma = jnp.sqrt(checked.running_var + epsilon)
    batch_sigma = jnp.sqrt(lax.stop_gradient(stats.var) + epsilon)
    r = lax.stop_gradient(jnp.clip(batch_sigma / sigma, 1 / rmax, rmax))
    d = lax.stop_gradient(jnp.clip((stats.mean - checked.running_mean) / sigma, -dmax, dmax))
    y = xhat * r + d
    if checked.scale is not None:
        y = y * checked.scale.astype(compute)
    if checked.bias is not None:
        y = y + checked.bias.astype(compute)
    return y.astype(checked.x.dtype if dtype is None else dtype), new_state
