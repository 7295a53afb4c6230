"""normalize(): the one place where jbn applies ``(x - mean) * rsqrt(var + epsilon) * scale + bias``."""

import jax
import jax.numpy as jnp
from jax import lax


def normalize(x, mean, var, scale=None, bias=None, *, epsilon, dtype=None, offset=None) -> jax.Array:
    """``y = (x - mean) * rsqrt(var + epsilon) * scale + bias``, computed in `var`'s dtype (float32 or wider).

    `mean` (or None: no centering), `var`, `offset`, `scale` and `bias` (or None) must already broadcast to x at
    x's rank. With `offset`, the mean is ``mean + offset`` and x is centered in two steps,
    ``(x - mean) - offset``, which keeps full precision when `mean` is a large shift near the data.
    The result is cast to `dtype`, x's dtype when None.
    """
    compute = var.dtype
    multiplier = lax.rsqrt(var + epsilon)
    if scale is not None:
        multiplier = multiplier * scale.astype(compute)
    centered = x.astype(compute) if mean is None else x.astype(compute) - mean
    # ((x - mean) - offset) * multiplier + bias, with the small per-feature terms folded together first.
    addend = None if bias is None else bias.astype(compute)
    if offset is not None:
        addend = -offset * multiplier if addend is None else addend - offset * multiplier
    y = centered * multiplier
    if addend is not None:
        y = y + addend
    return y.astype(x.dtype if dtype is None else dtype)


def feature_broadcast(value, ndim: int, feature_axes: tuple[int, ...]) -> jax.Array | None:
    """Reshapes a feature-shaped array (scale, bias, state) so it broadcasts against x of rank `ndim`."""
    if value is None:
        return None
    shape = [1] * ndim
    for axis, size in zip(feature_axes, value.shape, strict=True):
        shape[axis] = size
    return jnp.reshape(value, shape)
