"""normalize(): the one place where jbn applies ``(x - mean) * rsqrt(var + epsilon) * scale + bias``."""

import jax
import jax.numpy as jnp
from jax import lax


def normalize(x, mean, var, scale=None, bias=None, *, epsilon, dtype=None, offset=None, input_scale=None) -> jax.Array:
    """``y = (x - mean) * rsqrt(var + epsilon) * scale + bias``, computed in `var`'s dtype (float32 or wider).

    `mean` (or None: no centering), `var`, `offset`, `input_scale`, `scale` and `bias` (or None) must already
    broadcast to x at x's rank. With `offset`, the mean is ``mean + offset`` and x is centered in two steps,
    ``(x - mean) - offset``, which keeps full precision when `mean` is a large shift near the data. With
    `input_scale` ``s`` (a power of two), `mean`, `offset` and `var` describe ``x * s``; the result is
    ``(x - mean / s - offset / s) * rsqrt(var + epsilon s^2) * s``, the same value, with no square of extreme x.
    The result is cast to `dtype`, x's dtype when None.
    """
    compute = var.dtype
    if input_scale is not None:
        epsilon = _scaled_epsilon(epsilon, input_scale)
    multiplier = lax.rsqrt(var + epsilon)
    if input_scale is not None:
        # Undo the scale on the per-feature terms (exact: a power of two), not on every element of x.
        multiplier = multiplier * input_scale
        mean = None if mean is None else mean / input_scale
        offset = None if offset is None else offset / input_scale
    centered = x.astype(compute)
    if scale is not None:
        multiplier = multiplier * scale.astype(compute)
    if mean is not None:
        centered = centered - mean
    if offset is not None:
        centered = centered - offset
    y = centered * multiplier
    if bias is not None:
        y = y + bias.astype(compute)
    return y.astype(x.dtype if dtype is None else dtype)


def _scaled_epsilon(epsilon, input_scale):
    """epsilon * s^2, floored at min(epsilon, 2^-80).

    For data near 1e30, epsilon * s^2 underflows to 0; a constant input (variance 0) would then divide 0 by 0, and
    rsqrt's derivative would overflow. The floor is far below any nonzero variance of float32 data in scaled
    units (~1e-15), and leaves epsilon untouched when s is 1.
    """
    scaled = jnp.where(epsilon > 0, epsilon * jnp.square(input_scale), 0)  # not 0 * inf for data near 1e-30
    return jnp.maximum(scaled, jnp.minimum(epsilon, 2.0**-80))


def feature_broadcast(value, ndim: int, feature_axes: tuple[int, ...]) -> jax.Array | None:
    """Reshapes a feature-shaped array (scale, bias, state) so it broadcasts against x of rank `ndim`."""
    if value is None:
        return None
    shape = [1] * ndim
    for axis, size in zip(feature_axes, value.shape, strict=True):
        shape[axis] = size
    return jnp.reshape(value, shape)
