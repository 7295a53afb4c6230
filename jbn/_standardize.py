"""standardize(): statistics and normalization in one function, with a closed-form derivative.

Every norm's training path is ``moments`` followed by ``normalize``. Differentiated by plain autodiff, that chain
saves several arrays the size of x for the backward pass and spreads it over many passes. Here its derivative is
written out (a ``jax.custom_jvp``, so forward mode, reverse mode, ``vmap`` and higher orders all work). With
``xhat = (x - mean) / sqrt(var + epsilon)``, ``A = scale / sqrt(var + epsilon)`` and ``<.>`` the (masked, pooled)
mean over the reduced axes::

    dmean = <dx>                          (0 without centering)
    dvar  = 2 <(x - mean) dx>
    dy    = A (dx - dmean - xhat <xhat dx>) + dscale xhat + dbias

Reverse mode transposes this linear map, which gives the familiar backward pass
``dx = A dy - <A dy> - xhat <A dy xhat>`` (two reductions, one elementwise pass). The tangent is computed under
``jax.checkpoint``, so the only arrays of x's size kept for the backward pass are x itself (and the mask): the
backward pass recomputes ``xhat`` from x and the per-group statistics instead of storing it. Cross-device sums
(``axis_name``) are ``psum``s in the tangent, which JAX transposes as it does for plain autodiff.

Where a batch norm feature has no selected entry, it normalizes with given fallback statistics (the running ones),
whose tangents then flow to y instead.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jbn import _fused
from jbn._normalize import centered, normalize, standardizing_multiplier, unscaled
from jbn._stats import Moments, masked_moments, masked_sum, reduction_stages, upcast_apart


class Options(NamedTuple):
    """The static arguments of `standardize`."""

    axes: tuple[int, ...]
    dtype: object = None
    centered: bool = True
    axis_name: object = None
    axis_index_groups: object = None
    use_fast_variance: bool = False


class Statistics(NamedTuple):
    """What `standardize` reports besides y; shaped like x without the reduced axes (kept as size 1)."""

    mean: jax.Array  # of x (0 without centering)
    var: jax.Array  # of x (the mean square without centering); inf beyond float32's range
    count: jax.Array  # the number of selected entries, pooled


def standardize(options: Options, x, scale, bias, mask, fallback, epsilon) -> tuple[jax.Array, Statistics]:
    """``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` with statistics over ``options.axes``.

    `scale`, `bias` (or None) broadcast to x at x's rank; `mask` is None or a boolean array of x's shape;
    `fallback` is None or ``(mean, var)`` shaped like the statistics, used where no entry was selected.
    Returns y (``options.dtype``, x's dtype when None) and the `Statistics`. On the CPU, the cases the fused
    kernels take go to them (``jbn/_fused.py``); their results agree with this module's to float32 rounding.
    """
    plan = _fused.layout(options, x, scale, bias, mask, epsilon)
    if plan is None:
        return _standardize(options, x, scale, bias, mask, fallback, epsilon)
    # The kernels take no mask, so every group has data and `fallback` is never needed.
    y, mean, var = _fused.standardize(x, scale, bias, plan, epsilon=epsilon, centered=options.centered)
    kept = tuple(1 if axis in options.axes else size for axis, size in enumerate(x.shape))
    count = jnp.full(kept, plan.s * plan.k, jnp.float32)
    return y, Statistics(mean.reshape(kept), var.reshape(kept), count)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _standardize(options, x, scale, bias, mask, fallback, epsilon):
    y, statistics, _ = _forward(options, x, scale, bias, mask, fallback, epsilon)
    return y, statistics


class _Residuals(NamedTuple):
    """Per-group values the derivative needs besides x (in the scaled units of `Moments`)."""

    shift: jax.Array
    offset: jax.Array
    var: jax.Array
    input_scale: jax.Array
    count: jax.Array
    has_data: jax.Array


def _forward(options, x, scale, bias, mask, fallback, epsilon):
    """(y, Statistics, _Residuals): normalizing runs inside the statistics' run-time branch (see ``jbn._stats``)."""
    return moments_of(options, x, mask, then=functools.partial(_normalized, options, x, scale, bias, fallback, epsilon))


def moments_of(options, x, mask, *, then=None):
    """`masked_moments` of x as `options` ask."""
    return masked_moments(
        x,
        options.axes,
        mask=mask,
        axis_name=options.axis_name,
        axis_index_groups=options.axis_index_groups,
        use_fast_variance=options.use_fast_variance,
        centered=options.centered,
        then=then,
    )


def _normalized(options, x, scale, bias, fallback, epsilon, stats: Moments):
    stats = Moments(*(jnp.expand_dims(jnp.broadcast_to(field, stats.var.shape), options.axes) for field in stats))
    has_data = stats.count > 0
    shift, offset, var, input_scale = stats.shift, stats.offset, stats.var, stats.scale
    mean, unscaled_var = stats.mean, stats.unscaled_var
    if fallback is not None:
        # No selected entry: normalize with the fallback (running) statistics, unscaled.
        fallback_mean, fallback_var = fallback
        shift, mean = jnp.where(has_data, shift, fallback_mean), jnp.where(has_data, mean, fallback_mean)
        var, unscaled_var = jnp.where(has_data, var, fallback_var), jnp.where(has_data, unscaled_var, fallback_var)
        offset, input_scale = jnp.where(has_data, offset, 0), jnp.where(has_data, input_scale, 1)
    residuals = _Residuals(shift, offset, var, input_scale, stats.count, has_data)
    y = normalize(
        x,
        shift if options.centered else None,
        var,
        scale,
        bias,
        epsilon=epsilon,
        dtype=options.dtype,
        offset=offset if options.centered else None,
        input_scale=input_scale,
    )
    return y, Statistics(mean, unscaled_var, stats.count), residuals


def _standardize_jvp(options, primals, tangents):
    x, scale, bias, mask, fallback, epsilon = primals
    dx, dscale, dbias, _, dfallback, depsilon = tangents
    y, statistics, residuals = _forward(options, x, scale, bias, mask, fallback, epsilon)
    named = {"x": dx, "scale": dscale, "bias": dbias, "fallback": dfallback, "epsilon": depsilon}
    present = {name: _instantiate(tangent) for name, tangent in named.items() if not _is_zero(tangent)}
    view = _fused.tangent_view(options, x, scale, mask, present)
    if view is not None:
        multiplier = standardizing_multiplier(residuals.var, epsilon=epsilon, input_scale=residuals.input_scale)
        shift, offset = unscaled(residuals.shift, residuals.offset, residuals.input_scale)
        dy, dmean, dvar = _fused.batch_tangent(x, scale, shift, offset, multiplier, present, view)
        return (y, statistics), (dy, Statistics(dmean, dvar, jnp.zeros_like(statistics.count)))

    @jax.checkpoint  # the backward pass recomputes xhat from x instead of keeping it
    def tangent(x, scale, mask, epsilon, residuals, present):
        return _tangent(options, x, scale, mask, epsilon, residuals, fallback is not None, present)

    dy, dmean, dvar = tangent(x, scale, mask, epsilon, residuals, present)
    dy = dy.astype(y.dtype)
    return (y, statistics), (dy, Statistics(dmean, dvar, jnp.zeros_like(statistics.count)))


def _tangent(options, x, scale, mask, epsilon, residuals, has_fallback, present):
    """(dy, dmean, dvar) for the tangents in `present` (by input name); see the module docstring."""
    # Fresh copies for the backward pass: without the barriers XLA shares full-size intermediates (broadcasts of
    # the statistics, x - mean) between the forward and backward passes and writes them to memory. One barrier
    # per array: a joint one would mark every output as varying across devices under shard_map if one input is.
    x, scale, mask, epsilon, residuals = jax.tree.map(lax.optimization_barrier, (x, scale, mask, epsilon, residuals))
    compute = residuals.var.dtype
    mean, offset = (residuals.shift, residuals.offset) if options.centered else (None, None)
    multiplier = standardizing_multiplier(residuals.var, epsilon=epsilon, input_scale=residuals.input_scale)
    xhat = centered(upcast_apart(x, compute, 0), mean, offset=offset, input_scale=residuals.input_scale) * multiplier
    tangents = {name: jax.tree.map(lambda t: t.astype(compute), value) for name, value in present.items()}
    dmean, tau = _statistics_tangents(options, xhat, mask, multiplier, residuals, has_fallback, tangents)
    amplitude = multiplier if scale is None else multiplier * scale.astype(compute)
    dx, dscale, dbias = (tangents.get(name) for name in ("x", "scale", "bias"))
    if all(amplitude.shape[axis] == 1 for axis in options.axes):
        # A second centering of x, for the slope's sum in reverse mode (of dy * (x - mean)), kept apart from xhat's:
        # shared, XLA:CPU writes it to memory for that sum instead of fusing it in.
        apart = centered(
            upcast_apart(x, compute, 1), mean, offset=offset, input_scale=residuals.input_scale, spelled_apart=True
        )
        dy = _per_group_tangent(amplitude, apart, multiplier, dx, dmean, tau, dscale, dbias)
    else:
        mean_term, var_term = (_broadcast_over(value, xhat.shape, options.axes) for value in (dmean, tau))
        dy = amplitude * (-mean_term - xhat * var_term if dx is None else dx - mean_term - xhat * var_term)
        if dscale is not None:
            dy = dy + xhat * dscale
        if dbias is not None:
            dy = dy + dbias
    if "epsilon" in tangents:
        tau = tau - multiplier * tangents["epsilon"] / 2  # epsilon is not part of the variance's tangent
    return lax.optimization_barrier(dy), dmean, 2 * tau / multiplier


def _statistics_tangents(options, xhat, mask, multiplier, residuals, has_fallback, tangents):
    """``dmean`` and ``tau = multiplier d(var + epsilon) / 2``, shaped like the statistics.

    Where the batch has data, ``dmean = <dx>`` and ``d var = 2 <xhat dx> / multiplier``; elsewhere both come from
    the fallback statistics' tangents.
    """
    zeros = jnp.zeros_like(residuals.var)
    dmean, tau = zeros, zeros
    if "x" in tangents:
        dx = tangents["x"]
        sums = [masked_sum(dx * xhat, options.axes, mask, keepdims=True)]
        if options.centered:
            sums.append(masked_sum(dx, options.axes, mask, keepdims=True))
        if options.axis_name is not None:
            sums = lax.psum(sums, options.axis_name, axis_index_groups=options.axis_index_groups)
        count = jnp.maximum(residuals.count, 1)
        tau = sums[0] / count
        dmean = sums[1] / count if options.centered else zeros
    if has_fallback and "fallback" in tangents:
        fallback_mean, fallback_var = tangents["fallback"]
        dmean = jnp.where(residuals.has_data, dmean, fallback_mean)
        tau = jnp.where(residuals.has_data, tau, multiplier * fallback_var / 2)
    if "epsilon" in tangents:
        tau = tau + multiplier * tangents["epsilon"] / 2
    return dmean, tau


_standardize.defjvp(_standardize_jvp, symbolic_zeros=True)


def _per_group_tangent(amplitude, centered_x, multiplier, dx, dmean, tau, dscale, dbias):
    """``A dx + xhat (dscale - A tau) + (dbias - A dmean)`` where A is constant along the reduced axes, with
    ``xhat = centered_x * multiplier``.

    The coefficients are formed at the statistics' shape before they meet x's shape, the multiplier included.
    Reverse mode then needs only two sums over x's size, of dy and of dy * centered_x, which give dscale, dbias
    and the mean terms of dx at once (batch and instance norm); the general form needs four.
    """
    slope, intercept = -(amplitude * tau), -(amplitude * dmean)
    if dscale is not None:
        slope = slope + dscale
    if dbias is not None:
        intercept = intercept + dbias
    dy = centered_x * (multiplier * slope) + intercept
    return dy if dx is None else dy + amplitude * dx


def _broadcast_over(value, shape, axes):
    """`value` (size 1 along `axes`) broadcast to `shape`; its transpose sums over `axes` as `masked_sum` does.

    In reverse mode the broadcasts of the tangent become sums of dy; broadcasting the minor axes first and the
    major ones second, with a barrier between, makes those sums two-stage where `reduction_stages` says so.
    """
    stages = reduction_stages(shape, axes)
    if stages is not None:
        partial = tuple(size if axis in stages[1] else value.shape[axis] for axis, size in enumerate(shape))
        value = lax.optimization_barrier(jnp.broadcast_to(value, partial))
    return jnp.broadcast_to(value, shape)


def _instantiate(tangent):
    """Zeros for the symbolic zeros inside a partly nonzero tuple (the fallback's mean and var)."""
    if isinstance(tangent, tuple):
        return tuple(jnp.zeros(t.aval.shape, t.aval.dtype) if _is_zero(t) else t for t in tangent)
    return tangent


def _is_zero(tangent) -> bool:
    return (
        tangent is None
        or isinstance(tangent, SymbolicZero)
        or (isinstance(tangent, tuple) and all(_is_zero(t) for t in tangent))
    )
