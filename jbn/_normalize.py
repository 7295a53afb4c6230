"""normalize(): the one place where jbn applies ``(x - mean) * rsqrt(var + epsilon) * scale + bias``."""

import jax
import jax.numpy as jnp
from jax import lax

from jbn import _fused


def normalize(x, mean, var, scale=None, bias=None, *, epsilon, dtype=None, offset=None, input_scale=None) -> jax.Array:
    """``y = (x - mean) * rsqrt(var + epsilon) * scale + bias``, computed in `var`'s dtype (float32 or wider).

    `mean` (or None: no centering), `var`, `offset`, `input_scale`, `scale` and `bias` (or None) must already
    broadcast to x at x's rank. With `offset`, the mean is ``mean + offset`` and x is centered in two steps,
    ``(x - mean) - offset``, which keeps full precision when `mean` is a large shift near the data. With
    `input_scale` ``s`` (a power of two), `mean`, `offset` and `var` describe ``x * s``; the result is
    ``(x - mean / s - offset / s) * rsqrt(var + epsilon s^2) * s``, the same value, with no square of extreme x.
    The result is cast to `dtype`, x's dtype when None. On the CPU, bfloat16 results of per-feature terms come
    from a kernel (`jbn._fused.affine`: the same formula and bits; XLA:CPU rounds to bfloat16 slowly).
    """
    compute = var.dtype
    dtype = x.dtype if dtype is None else jnp.dtype(dtype)
    multiplier = standardizing_multiplier(var, epsilon=epsilon, input_scale=input_scale)
    if scale is not None:
        multiplier = multiplier * scale.astype(compute)
    shifts = unscaled(mean, offset, input_scale)
    bias = None if bias is None else bias.astype(compute)
    terms = (*shifts, multiplier, bias)
    view = _fused.affine_view(x, dtype, terms)
    if view is not None:
        return _fused.affine(x, terms, view)
    y = _subtracted(x.astype(compute), shifts) * multiplier
    if bias is not None:
        y = y + bias
    return y.astype(dtype)


def centered(x, mean, *, offset=None, input_scale=None, spelled_apart=False) -> jax.Array:
    """``x - mean``, in two steps ``(x - mean / s) - offset / s`` (see `normalize`); x as it is if `mean` is None.

    `spelled_apart` computes ``(x + (-mean / s)) + (-offset / s)``, the same value bit for bit, for a second use
    of the same centering that XLA must not merge with the first (it would write the shared array to memory).
    """
    return _subtracted(x, unscaled(mean, offset, input_scale), spelled_apart=spelled_apart)


def unscaled(mean, offset, input_scale):
    """``(mean / s, offset / s)``, each None where not given: the centering terms in x's own units."""
    if input_scale is None:
        return mean, offset
    # Undo the scale on the per-feature terms (exact: a power of two), not on every element of x.
    return tuple(None if term is None else term / input_scale for term in (mean, offset))


def _subtracted(x, terms, *, spelled_apart=False):
    for term in terms:
        if term is not None:
            x = x + (-term) if spelled_apart else x - term
    return x


def standardizing_multiplier(var, *, epsilon, input_scale=None) -> jax.Array:
    """``1 / sqrt(var_x + epsilon)`` where `var` is the variance of ``x * input_scale`` (see `normalize`)."""
    if input_scale is None:
        return lax.rsqrt(var + epsilon)
    return lax.rsqrt(var + _scaled_epsilon(epsilon, input_scale)) * input_scale


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
