"""Folding an inference-mode batch norm into the Dense or Conv layer before it."""

import jax
import jax.numpy as jnp

from jbn import _checks
from jbn._batch_norm import BatchNormState


def fold_batch_norm(
    kernel, bias, state: BatchNormState, scale=None, bn_bias=None, *, epsilon=1e-5, output_axis=-1
) -> tuple[jax.Array, jax.Array]:
    """The kernel and bias of one layer equal to a linear layer followed by inference-mode batch norm.

    For ``z = x @ kernel + bias`` (or a convolution with that kernel) followed by
    ``y = (z - mean) / sqrt(var + epsilon) * scale + bn_bias`` with the running statistics, ``y`` equals the output
    of the same layer with::

        m = scale / sqrt(var + epsilon)
        kernel' = kernel * m        (along the kernel's output-feature axis)
        bias'   = (bias - mean) * m + bn_bias

    so the batch norm disappears at inference (one pass over the activations less). Computed in float32 or wider;
    the results have the kernel's and bias's dtypes. The folded layer's outputs equal the original's up to float32
    rounding of the products; on a GPU, whose float32 matrix products default to TensorFloat-32, that rounding is
    about 1e-3 of the outputs' size unless ``jax.default_matmul_precision("highest")`` is in effect.

    Args:
      kernel: the linear layer's weights, e.g. ``(in, out)`` for Dense, ``(H, W, in, out)`` for Flax's Conv.
      bias: the linear layer's bias, shape ``(out,)``, or None (no bias: 0).
      state: the batch norm's running statistics, each of shape ``(out,)``.
      scale: the batch norm's scale ``(out,)``, or None (1).
      bn_bias: the batch norm's bias ``(out,)``, or None (0).
      epsilon: the batch norm's epsilon (Flax and PyTorch: 1e-5; Keras: 1e-3).
      output_axis: the kernel's output-feature axis (-1 for Flax's Dense and Conv; 0 for PyTorch's layouts).

    Returns:
      ``(kernel', bias')``.

    Raises:
      ValueError: the statistics, scale or biases do not have the kernel's output size.

    Examples:
      >>> import jax.numpy as jnp, jbn
      >>> kernel, bias = jnp.array([[2.0, 1.0]]), jnp.array([1.0, 0.0])
      >>> state = jbn.BatchNormState(jnp.array([3.0, 0.0]), jnp.array([4.0, 1.0]))
      >>> folded_kernel, folded_bias = jbn.fold_batch_norm(kernel, bias, state, epsilon=0.0)
      >>> folded_kernel.tolist(), folded_bias.tolist()  # ((x*2 + 1) - 3) / 2 = x - 1
      ([[1.0, 1.0]], [-1.0, 0.0])
    """
    kernel = _checks.float_array(kernel, "kernel")
    (axis,) = _checks.axes(kernel.ndim, output_axis, "output_axis")
    features = (kernel.shape[axis],)
    values = {"bias": bias, "state.mean": state.mean, "state.var": state.var, "scale": scale, "bn_bias": bn_bias}
    for name, value in values.items():
        if value is not None and jnp.shape(value) != features:
            raise ValueError(
                f"`{name}` has shape {jnp.shape(value)}, but the kernel of shape {kernel.shape} has {features[0]} "
                f"outputs along output_axis={output_axis}: every batch norm value must have shape {features}."
            )
    _checks.epsilon(epsilon)
    compute = jnp.promote_types(kernel.dtype, jnp.float32)
    multiplier = jax.lax.rsqrt(jnp.asarray(state.var, compute) + epsilon)
    if scale is not None:
        multiplier = multiplier * jnp.asarray(scale, compute)
    shape = [1] * kernel.ndim
    shape[axis] = features[0]
    folded_kernel = (kernel.astype(compute) * multiplier.reshape(shape)).astype(kernel.dtype)
    centered = -jnp.asarray(state.mean, compute) if bias is None else jnp.asarray(bias, compute) - state.mean
    folded_bias = centered * multiplier
    if bn_bias is not None:
        folded_bias = folded_bias + jnp.asarray(bn_bias, compute)
    return folded_kernel, folded_bias.astype(kernel.dtype if bias is None else jnp.asarray(bias).dtype)
