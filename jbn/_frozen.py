"""Batch norm in eval mode (constant statistics) with its reverse mode from the backward kernel.

``y = (x - mean) * inv * scale + bias`` with ``inv = rsqrt(var + epsilon)`` has the derivative ::

    dy = A dx + xhat (dscale + scale dinv / inv) + (dbias - A dmean),    A = scale * inv,  xhat = (x - mean) * inv

whose per-feature terms are formed in plain JAX and whose x-sized part is the kernels' ``tangent`` with frozen
statistics (`jbn._fused`). Reverse mode is then one pass of the backward kernel over x and dy: dx = A dy with the
sums of dy and dy * xhat (dscale and dbias, from which the running statistics' cotangents follow), where XLA
makes one pass for dx and another for the two sums. It keeps x itself for the backward pass.
"""

import functools

import jax
import jax.numpy as jnp

from jbn import _fused
from jbn._normalize import normalize, standardizing_multiplier


def normalize_frozen(x, mean, var, scale, bias, epsilon, view) -> jax.Array:
    """``normalize(x, mean, var, scale, bias)`` in x's dtype, the terms at x's rank (`view` from
    `jbn._fused.frozen_view`)."""
    return _frozen(x, mean, var, scale, bias, epsilon, view)


@functools.partial(jax.custom_jvp, nondiff_argnums=(6,))
def _frozen(x, mean, var, scale, bias, epsilon, view):
    return normalize(x, mean, var, scale, bias, epsilon=epsilon)


@_frozen.defjvp
def _frozen_jvp(view, primals, tangents):
    x, mean, var, scale, _, epsilon = primals
    dx, dmean, dvar, dscale, dbias, depsilon = tangents
    inv, dinv = jax.jvp(lambda v, e: standardizing_multiplier(v, epsilon=e), (var, epsilon), (dvar, depsilon))
    given_scale = jnp.ones_like(inv) if scale is None else scale.astype(inv.dtype)
    amplitude = given_scale * inv
    slope = given_scale * dinv / inv + (0 if dscale is None else dscale)
    intercept = (0 if dbias is None else dbias) - amplitude * dmean
    dy = _fused.frozen_tangent(x, mean, inv, given_scale, dx, slope, intercept, view)
    return _frozen(*primals, view), dy
