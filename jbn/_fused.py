"""Layer, RMS, group and instance norm on the CPU through the fused kernels of ``jbn/kernels/norm.cc``.

XLA:CPU spreads a normalization over several passes and writes per-row broadcasts to memory; the kernels read x
once per statistic in cache-sized pieces and write y (forward) or dx, dscale and dbias (backward) in one more pass.
x is viewed as ``(N, S, G, K)``: statistics per ``(n, g)`` over S and K, scale and bias per channel ``(g, k)``.

Three primitives carry the math, each with a plain-JAX twin (``_reference_*``) that defines it:

* ``forward``: ``(x, scale, bias) -> (y, mean, std, var)`` with ``std = sqrt(var + epsilon)``;
* ``tangent``: the derivative, linear in ``(dx, dscale, dbias)``:
  ``dy = scale / std (dx - <dx> - xhat <xhat dx>) + dscale xhat + dbias``, ``dmean = <dx>`` (0 without centering),
  ``dvar = 2 <(x - mean) dx>``;
* ``backward``: its transpose, ``(dy, dmean, dvar) -> (dx, dscale, dbias)``, the kernel of reverse mode. The
  statistics' cotangents add ``(dmean + 2 (x - mean) dvar) / count`` to dx in the same pass (batch norm's running
  statistics are outputs too).

So reverse mode runs the backward kernel on x and the per-group mean and std (nothing else is saved), forward
mode evaluates ``tangent``, and the transpose of ``backward`` is ``tangent`` again (reverse over reverse). Higher
derivatives with respect to x, ``vmap`` that is not over x alone, and other platforms use the twins.

A fourth entry, ``statistics``, gives only the exact statistics, for batch norm on channels-last data
(``jbn._stats``), which XLA then normalizes; its derivatives are plain JAX, except that large bfloat16 batch norm
takes its derivative from ``tangent`` (`batch_tangent`), so its reverse mode is the backward kernel. A fifth,
``affine``, applies given per-feature terms, ``((x - m) - o) * a + b``, for `jbn._normalize.normalize` in
bfloat16, whose rounding XLA:CPU does slowly; its derivatives are plain JAX.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jbn import _kernel

_AXES = (1, 3)  # S and K of the (N, S, G, K) view
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


class Layout(NamedTuple):
    """x as ``(n, s, g, k)``; G's axes of x are ``[groups_from, runs_from)``, K's ``[runs_from, x.ndim)``.

    Scale and bias have one entry per position of x's axes ``[groups_from, entries_until)``: they are constant
    along the axes after (see `standardize`).
    """

    n: int
    s: int
    g: int
    k: int
    groups_from: int
    runs_from: int
    entries_until: int


def layout(options, x, scale, bias, mask, epsilon) -> Layout | None:
    """The ``(N, S, G, K)`` view of x for statistics over ``options.axes``, or None where the kernels do not apply.

    They apply on the CPU to float32 and bfloat16 x with y of the same dtype, a static epsilon, no mask, no
    cross-device axis or sharding, and the exact variance, where the statistics are per example (axis 0 kept),
    the reduced axes are a trailing run (K) and a run before the kept group axes (S), and scale and bias vary only
    along the axes from G on (see `_runs` for the view without an S run).
    """
    if (
        mask is not None
        or options.axis_name is not None
        or options.use_fast_variance
        or options.dtype not in (None, x.dtype)
        or not _static(epsilon)
        or not _on_the_cpu(x, scale, bias)
    ):
        return None
    axes = options.axes
    varying = {axis for v in (scale, bias) if v is not None for axis, size in enumerate(v.shape) if size != 1}
    runs = _runs(x.ndim, set(axes), varying)
    # Statistics across examples (batch norm): only the statistics come from a kernel (`statistics_view`); the
    # whole forward pass through the kernels was slower than XLA's normalization.
    if runs is None or 0 in axes:
        return None
    s_from, g_from, k_from = runs
    if any(axis < g_from for axis in varying):
        return None
    if not _kernel.enabled():
        return None
    shape = x.shape
    sizes = (shape[:s_from], shape[s_from:g_from], shape[g_from:k_from], shape[k_from:])
    until = max(k_from, max(varying, default=0) + 1)  # past the last axis of K along which scale or bias vary
    return Layout(*(int(np.prod(part, dtype=np.int64)) for part in sizes), g_from, k_from, until)


def _runs(ndim, reduced, varying):
    """``(s_from, g_from, k_from)`` with axes ``[s_from, g_from)`` and ``[k_from, ndim)`` reduced, others kept.

    Without an S run the kept axes before K are N up to the first one along which scale or bias vary (`varying`),
    G from it: channels-first instance norm is ``(N, 1, C, H * W)`` with scale per group.
    """
    k_from = ndim
    while k_from > 0 and k_from - 1 in reduced:
        k_from -= 1
    g_from = k_from
    while g_from > 0 and g_from - 1 not in reduced:
        g_from -= 1
    s_from = g_from
    while s_from > 0 and s_from - 1 in reduced:
        s_from -= 1
    if any(axis in reduced for axis in range(s_from)):
        return None
    if s_from == g_from:
        first = min((axis for axis in varying if axis < k_from), default=k_from)
        return (first, first, k_from)
    return (s_from, g_from, k_from)


def _on_the_cpu(x, *others) -> bool:
    """Whether the kernels can take x (and `others`, or None): float32 or bfloat16, not empty, unsharded, on the CPU."""
    arrays = [v for v in (x, *others) if v is not None]
    return (
        x.dtype in _DTYPES
        and x.size > 0
        and all(jax.typeof(v).sharding.mesh.empty for v in arrays)
        and jax.default_backend() == "cpu"
    )


def _static(epsilon) -> bool:
    try:
        float(epsilon)
    except (jax.errors.ConcretizationTypeError, TypeError):
        return False
    return True


def standardize(x, scale, bias, plan: Layout, *, epsilon, centered):
    """``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` through the kernels (`plan` from `layout`), with
    the mean and (biased) variance per ``(n, g)``, shaped ``(plan.n, plan.g)``.

    Scale and bias go to the kernels with one entry per run of the trailing axes of K along which neither varies:
    per group ``(G,)`` where they are constant along K (one value per channel of channels-first instance norm,
    not one per pixel), ``(G * C / G,)`` for channels-first group norm (one per H * W plane), per channel
    ``(G * K,)`` where they vary along K's last axis. x goes in its own shape, the view as attributes: XLA:CPU
    copies a bfloat16 array to reshape it.
    """
    shape = x.shape[plan.groups_from : plan.entries_until]

    def entries(value, default):
        given = None if value is None else value.reshape(value.shape[plan.groups_from : plan.entries_until])
        return _entries(given, default, shape)

    view = tuple(np.int64(size) for size in plan[:4])
    return _standardize(x, entries(scale, 1.0), entries(bias, 0.0), np.float32(epsilon), centered, view)


def _entries(value, default, shape) -> jax.Array:
    """`value` broadcast to `shape` (or `default` where None), flattened, float32: a kernel's per-entry input."""
    return (
        (jnp.full(shape, default, jnp.float32) if value is None else jnp.broadcast_to(value, shape))
        .reshape(-1)
        .astype(jnp.float32)
    )


def statistics_view(x, axes) -> tuple[int, int, int] | None:
    """``(s, g, k)``: x as ``(1, S, G, K)`` for exact statistics over `axes` from the statistics kernel, or None.

    It applies on the CPU to float32 and bfloat16 x where the reduced axes are the leading ones (S, at least one
    axis): batch norm's ``(1, N·H·W, C, 1)`` on channels-last data. Channels first, ``(1, N, C, H·W)``, the kernel's
    sums per run of H·W took 2.6x the time of XLA's two sums (64x64x32x32), so that layout keeps XLA's.
    """
    runs = _runs(x.ndim, set(axes), set())
    if not _on_the_cpu(x) or runs is None or runs[0] != 0 or runs[1] == 0 or runs[2] != x.ndim:
        return None
    if not _kernel.enabled():
        return None
    _, g_from, k_from = runs
    return tuple(int(np.prod(x.shape[a:b], dtype=np.int64)) for a, b in ((0, g_from), (g_from, k_from), (k_from, None)))


def statistics(x, axes, view) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(scale, shift, offset, var)`` over `axes` (`view` from `statistics_view`), float32, shaped like x without
    `axes`: the statistics of ``x * scale``, whose mean is ``shift + offset``, from one pass in double (see
    ``jbn/kernels/norm.cc``). `scale` is a power of two, 1 unless the variance leaves [2^-100, 2^100]. Under
    ``vmap`` the batch adds examples to the view; derivatives of any order come from plain JAX (`shift` and `scale`
    are constants, as in ``jbn._stats``).
    """
    return _statistics(x, tuple(axes), tuple(view))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _statistics(x, axes, view):
    s, g, k = view
    call = jax.ffi.ffi_call("jbn_norm_statistics", jax.ShapeDtypeStruct((4, g), jnp.float32), vmap_method="expand_dims")
    out = call(x, s=np.int64(s), g=np.int64(g), k=np.int64(k))
    kept = tuple(size for axis, size in enumerate(x.shape) if axis not in axes)
    shift, offset, var, scale = (out[i].reshape(kept) for i in range(4))
    return scale, shift, offset, var


@_statistics.defjvp
def _statistics_jvp(axes, view, primals, tangents):
    (x,), (dx,) = primals, tangents
    scale, shift, offset, var = _statistics(x, axes, view)
    scale_x = jnp.expand_dims(scale, axes)
    scaled_dx = dx.astype(jnp.float32) * scale_x
    centered = (x.astype(jnp.float32) * scale_x - jnp.expand_dims(shift, axes)) - jnp.expand_dims(offset, axes)
    zeros = jnp.zeros_like(var)
    tangents = (zeros, zeros, jnp.mean(scaled_dx, axes), 2 * jnp.mean(centered * scaled_dx, axes))
    return (scale, shift, offset, var), tangents


def affine_view(x, dtype, terms) -> tuple[int, int, tuple[int, ...]] | None:
    """``(c, k, shape)`` for `affine`: x as ``(R, C, K)`` where the per-feature `terms` (at x's rank, or None)
    vary along one run of axes only, C, whose sizes at x's rank are `shape`; None where the kernel does not apply.

    It applies on the CPU to bfloat16 x with a bfloat16 result and float32 terms, to rows of C channels (K = 1:
    channels last) or runs of at least 16 elements per entry (channels first). In float32, XLA's own elementwise
    code was as fast as the kernel; in bfloat16 its rounding made it 1.2-1.6x slower with x in cache.
    """
    given = [t for t in terms if t is not None]
    if x.dtype != jnp.bfloat16 or dtype != jnp.bfloat16 or any(t.dtype != jnp.float32 for t in given):
        return None
    if not _on_the_cpu(x, *given):
        return None
    varying = sorted({axis for t in given for axis, size in enumerate(t.shape) if size != 1})
    first, last = (varying[0], varying[-1] + 1) if varying else (0, 0)
    if varying != list(range(first, last)) or any(t.ndim != x.ndim for t in given):
        return None
    c, k = (int(np.prod(x.shape[a:b], dtype=np.int64)) for a, b in ((first, last), (last, x.ndim)))
    if (k != 1 and k < 16) or x.size < 16 * c or not _kernel.enabled():
        return None
    shape = tuple(size if first <= axis < last else 1 for axis, size in enumerate(x.shape))
    return c, k, shape


def affine(x, terms, view) -> jax.Array:
    """``((x - m) - o) * a + b`` per feature, rounded once to x's dtype, by the kernel (`view` from `affine_view`).

    `terms` are ``(m, o, a, b)`` at x's rank, each float32 or None (for m, o: 0; a: 1; b: -0, which keeps the sign
    of a zero product as ``(x - m) * a`` alone would). Its derivatives are plain JAX; under ``vmap`` every term is
    broadcast to the mapped examples.
    """
    entries = (_entries(term, default, view[2]) for term, default in zip(terms, (0.0, 0.0, 1.0, -0.0), strict=True))
    return _affine(x, *entries, view)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _affine(x, m, o, a, b, view):
    c, k, _ = view
    call = jax.ffi.ffi_call("jbn_norm_affine", jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="broadcast_all")
    return call(x, m, o, a, b, c=np.int64(c), k=np.int64(k))


@_affine.defjvp
def _affine_jvp(view, primals, tangents):
    shape = view[2]

    def formula(x, m, o, a, b):
        m, o, a, b = (t.reshape(shape) for t in (m, o, a, b))
        return ((x.astype(jnp.float32) - m) - o) * a + b

    _, dy = jax.jvp(formula, primals, tangents)
    y = _affine(*primals, view)
    return y, dy.astype(y.dtype)


# Batch norm's backward pass through the backward kernel from this many elements of x in training (bfloat16 only:
# TRAINING_BACKWARD_DTYPES) and in eval mode (FROZEN_BACKWARD_ELEMENTS, float32 and bfloat16). On a 2-core AVX-512
# EPYC, against XLA's backward pass: bfloat16 training steps took 0.49-0.71x the time on 2-4M elements (NHWC, NCHW,
# 4096x512), 0.73x on 512K, 1.03x on 256K; float32 training 0.94-0.98x on 2-4M and 1.10x on 512K, so float32
# training keeps XLA's pass. Eval mode (one pass channels last, where XLA makes two) took 0.39-0.72x the time in
# bfloat16 and 0.62-0.86x in float32 on 256K-4M elements channels last, 0.27-0.50x and 0.83-1.01x channels first;
# on 64K float32 took 1.01-1.12x, and on 16K both 1.3-1.5x, where the hand-off to the thread pool weighs.
BATCH_BACKWARD_ELEMENTS = 1 << 19
FROZEN_BACKWARD_ELEMENTS = 1 << 18
TRAINING_BACKWARD_DTYPES = (jnp.dtype(jnp.bfloat16),)


def tangent_view(options, x, scale, mask, present) -> tuple[int, int, int, int] | None:
    """``(1, s, g, k)``: x as ``(1, S, G, K)`` for batch norm's derivative through ``tangent`` (whose transpose is
    the backward kernel), or None where it does not apply.

    It applies on the CPU to x of a dtype in `TRAINING_BACKWARD_DTYPES` (bfloat16) and at least
    `BATCH_BACKWARD_ELEMENTS` elements with y of x's dtype, statistics
    across examples (S leading, K trailing, G kept), centered, without a mask or a cross-device axis, for tangents
    of x, scale, bias and the fallback statistics (unused: without a mask every feature has data), not epsilon.
    """
    if mask is not None or options.axis_name is not None or options.dtype not in (None, x.dtype):
        return None
    if not options.centered or set(present) - {"x", "scale", "bias", "fallback"}:
        return None
    if x.dtype not in TRAINING_BACKWARD_DTYPES or x.size < BATCH_BACKWARD_ELEMENTS or not _on_the_cpu(x, scale):
        return None
    return _batch_view(x, set(options.axes))


def batch_tangent(x, scale, shift, offset, multiplier, present, view):
    """``(dy, dmean, dvar)``, batch norm's derivative (see `jbn._standardize`) by ``tangent``, with the mean
    ``shift + offset`` and ``1 / std = multiplier``, each at x's rank in x's units; `view` from `tangent_view`.
    Reverse mode runs the backward kernel: dx, dscale and dbias, the running statistics' part of dx included, in
    one pass after the sums.
    """
    tangents = [
        present[name] if name in present else jnp.zeros_like(like)
        for name, like in (("x", x), ("scale", multiplier), ("bias", multiplier))
    ]
    dy, dmean, dvar = _view_tangent(x, shift, offset, multiplier, scale, *tangents, view, frozen=False)
    return dy, dmean.reshape(shift.shape), dvar.reshape(shift.shape)


def frozen_view(x, feature_axes, dtype, *terms) -> tuple[int, int, int, int] | None:
    """``(1, s, g, k)``: x as ``(1, S, G, K)`` for the derivative of a normalization with constant per-feature
    `terms` (batch norm in eval mode) through ``tangent`` (`jbn._frozen`), or None where it does not apply.

    It applies on the CPU to float32 and bfloat16 x of at least `FROZEN_BACKWARD_ELEMENTS` with y of x's dtype
    (`dtype` None or x's) and float32 terms (or None), where every axis but the `feature_axes` is reduced, S
    leading and K trailing.
    """
    given = [t for t in terms if t is not None]
    if x.size < FROZEN_BACKWARD_ELEMENTS or dtype not in (None, x.dtype) or any(t.dtype != jnp.float32 for t in given):
        return None
    if not _on_the_cpu(x, *given):
        return None
    return _batch_view(x, set(range(x.ndim)) - set(feature_axes))


def _batch_view(x, reduced) -> tuple[int, int, int, int] | None:
    """``(1, S, G, K)`` for statistics across examples: the `reduced` axes a leading run (S, not empty) and a
    trailing one (K, possibly empty) around the kept ones (G); None where they are not, or the kernels are off."""
    runs = _runs(x.ndim, reduced, set())
    if runs is None or runs[0] != 0 or runs[1] == 0 or not _kernel.enabled():
        return None
    _, g_from, k_from = runs
    sizes = ((0, g_from), (g_from, k_from), (k_from, x.ndim))
    return (1, *(int(np.prod(x.shape[a:b], dtype=np.int64)) for a, b in sizes))


def frozen_tangent(x, mean, inv, scale, dx, slope, intercept, view):
    """``scale * inv * dx + slope * (x - mean) * inv + intercept`` in x's dtype by ``tangent`` with frozen
    statistics (`view` from `frozen_view`; the others at x's rank, dx of x's shape): reverse mode is one pass of
    the backward kernel."""
    return _view_tangent(x, mean, jnp.zeros_like(mean), inv, scale, dx, slope, intercept, view, frozen=True)[0]


def _view_tangent(x, shift, offset, multiplier, scale, dx, dscale, dbias, view, *, frozen):
    """``tangent`` on batch norm's view `(1, S, G, K)`: the per-feature values (at x's rank, or scale None) as the
    kernels take them, float32 with one entry per G."""
    n, s, g, k = view

    def per_group(value):
        return jnp.broadcast_to(value, multiplier.shape).reshape(n, g).astype(jnp.float32)

    mean = jnp.stack([per_group(shift), per_group(offset)], axis=-1)
    std = 1 / per_group(multiplier)
    entries = [per_group(v).reshape(g) for v in (1.0 if scale is None else scale, dscale, dbias)]
    return tangent_p.bind(
        x, mean, std, entries[0], dx.astype(x.dtype), *entries[1:], centered=True, frozen=frozen, n=n, s=s, g=g, k=k
    )


def _dims(view):
    return dict(zip("nsgk", view, strict=True))


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _standardize(x, scale, bias, epsilon, centered, view):
    y, mean, _, var = forward_p.bind(x, scale, bias, epsilon=epsilon, centered=centered, **_dims(view))
    return y, mean[..., 0] + mean[..., 1], var


@_standardize.defjvp
def _standardize_jvp(epsilon, centered, view, primals, tangents):
    x, scale, bias = primals
    dims = _dims(view)
    y, mean, std, var = forward_p.bind(x, scale, bias, epsilon=epsilon, centered=centered, **dims)
    dy, dmean, dvar = tangent_p.bind(x, mean, std, scale, *tangents, centered=centered, frozen=False, **dims)
    return (y, mean[..., 0] + mean[..., 1], var), (dy, dmean, dvar)


# The plain-JAX twins, on the (N, S, G, K) view. mean is (N, G, 2): hi + lo, the mean to about twice float32's
# precision; std and var are (N, G); scale, bias, dscale and dbias have one entry per run of K / (entries / G)
# elements of each group's K: (G * K,), (G,) or in between.


def _group(statistic):
    return statistic[:, None, :, None]


def _channel(x, value):
    """A value with one entry per run of each group's K (see above) at the view's rank, as (1, 1, G, K)."""
    per_group = value.reshape(x.shape[2], -1)
    return jnp.repeat(per_group, x.shape[3] // per_group.shape[1], axis=1)[None, None]


def _centered(x, mean):
    return x.astype(jnp.float32) - _group(mean[..., 0]) - _group(mean[..., 1])


def _reference_forward(x, scale, bias, *, epsilon, centered, n, s, g, k):
    view = x.reshape(n, s, g, k)
    wide = view.astype(jnp.float32)
    hi = jnp.mean(wide, _AXES) if centered else jnp.zeros((n, g))
    lo = jnp.mean(wide - _group(hi), _AXES) if centered else hi  # what rounding hi lost
    mean = jnp.stack([hi, lo], axis=-1)
    deviation = _centered(view, mean)
    var = jnp.mean(jnp.square(deviation), _AXES)
    std = jnp.sqrt(var + epsilon)
    y = deviation / _group(std) * _channel(view, scale) + _channel(view, bias)
    return y.astype(x.dtype).reshape(x.shape), mean, std, var


def _reference_tangent(x, mean, std, scale, dx, dscale, dbias, *, centered, frozen, n, s, g, k):
    view = x.reshape(n, s, g, k)
    deviation, dx = _centered(view, mean), dx.reshape(view.shape).astype(jnp.float32)
    xhat = deviation / _group(std)
    zeros = jnp.zeros((n, g))
    dmean = jnp.mean(dx, _AXES) if centered and not frozen else zeros
    dvar = zeros if frozen else 2 * jnp.mean(deviation * dx, _AXES)
    slope = 0.0 if frozen else jnp.mean(dx * xhat, _AXES, keepdims=True)
    dy = _channel(view, scale) / _group(std) * (dx - _group(dmean) - xhat * slope)
    dy = (dy + _channel(view, dscale) * xhat + _channel(view, dbias)).astype(x.dtype).reshape(x.shape)
    return dy, dmean, dvar


def _reference_backward(x, mean, std, scale, dy, dmean, dvar, *, centered, frozen, n, s, g, k):
    view = x.reshape(n, s, g, k)
    deviation, dy = _centered(view, mean), dy.reshape(view.shape).astype(jnp.float32)
    xhat = deviation / _group(std)
    grad = dy * _channel(view, scale)
    mean_grad = jnp.mean(grad, _AXES, keepdims=True) if centered and not frozen else 0.0
    slope = 0.0 if frozen else jnp.mean(grad * xhat, _AXES, keepdims=True)
    dx = (grad - mean_grad - xhat * slope) / _group(std)
    if not frozen:
        dx = dx + (_group(dmean) * centered + 2 * deviation * _group(dvar)) / (s * k)

    def per_entry(value):  # summed over (N, S) and over each entry's run
        return jnp.sum(value, (0, 1)).reshape(g, scale.size // g, -1).sum(-1).reshape(-1)

    dscale, dbias = per_entry(dy * xhat), per_entry(dy)
    return dx.astype(x.dtype).reshape(x.shape), dscale, dbias


# Primitives.


def _primitive(name, reference, multiple_results):
    primitive = Primitive(f"jbn_{name}")
    primitive.multiple_results = multiple_results

    @functools.cache
    def jitted(**params):
        return jax.jit(functools.partial(primitive.bind, **params))

    primitive.def_impl(lambda *args, **params: jitted(**params)(*args))
    mlir.register_lowering(primitive, mlir.lower_fun(reference, multiple_results=multiple_results))

    def jvp(primals, tangents, **params):
        tangents = [ad.instantiate_zeros(t) for t in tangents]
        return jax.jvp(functools.partial(reference, **params), tuple(primals), tuple(tangents))

    def vmapped(args, dims, **params):
        out = jax.vmap(functools.partial(reference, **params), in_axes=dims)(*args)
        return out, (0,) * len(out) if multiple_results else 0

    ad.primitive_jvps[primitive] = jvp
    batching.primitive_batchers[primitive] = vmapped
    return primitive


forward_p = _primitive("norm_forward", _reference_forward, multiple_results=True)
tangent_p = _primitive("norm_tangent", _reference_tangent, multiple_results=True)
backward_p = _primitive("norm_backward", _reference_backward, multiple_results=True)


def _forward_avals(x, scale, bias, *, n, g, **_):
    per_group = jax.core.ShapedArray((n, g), jnp.float32)
    return x, jax.core.ShapedArray((n, g, 2), jnp.float32), per_group, per_group


forward_p.def_abstract_eval(_forward_avals)
tangent_p.def_abstract_eval(lambda x, mean, std, *_, **__: (x, std, std))
backward_p.def_abstract_eval(lambda x, mean, std, scale, *_, **__: (x, scale, scale))
mlir.register_lowering(forward_p, jax.ffi.ffi_lowering("jbn_norm_forward"), platform="cpu")
mlir.register_lowering(backward_p, jax.ffi.ffi_lowering("jbn_norm_backward"), platform="cpu")


def _forward_batched(args, dims, *, n, **params):
    """vmap over x alone folds the mapped axis into N; anything else maps the twin."""
    x, scale, bias = args
    if dims[1] is not None or dims[2] is not None:
        out = jax.vmap(functools.partial(_reference_forward, n=n, **params), in_axes=dims)(*args)
        return out, (0,) * 4
    x = jnp.moveaxis(x, dims[0], 0)
    y, *statistics = forward_p.bind(x, scale, bias, n=np.int64(x.shape[0] * n), **params)
    return (y, *(v.reshape(x.shape[0], n, *v.shape[1:]) for v in statistics)), (0,) * 4


batching.primitive_batchers[forward_p] = _forward_batched


def _instantiated(cotangents, specs):
    return [jnp.zeros(*spec) if type(c) is ad.Zero else c for c, spec in zip(cotangents, specs, strict=True)]


def _tangent_transpose(cotangents, x, mean, std, scale, dx, dscale, dbias, **params):
    if any(ad.is_undefined_primal(v) for v in (x, mean, std, scale)):
        raise NotImplementedError("jbn: the normalization's tangent is linear in (dx, dscale, dbias) only")
    if all(type(c) is ad.Zero for c in cotangents):
        return [None] * 7
    per_group = (std.shape, jnp.float32)
    cotangents = _instantiated(cotangents, ((x.shape, x.dtype), per_group, per_group))
    grads = backward_p.bind(x, mean, std, scale, *cotangents, **params)
    linear = (dx, dscale, dbias)
    return [None] * 4 + [g if ad.is_undefined_primal(v) else None for g, v in zip(grads, linear, strict=True)]


def _backward_transpose(cotangents, x, mean, std, scale, dy, dmean, dvar, **params):
    if any(ad.is_undefined_primal(v) for v in (x, mean, std, scale)):
        raise NotImplementedError("jbn: the normalization's backward pass is linear in (dy, dmean, dvar) only")
    if all(type(c) is ad.Zero for c in cotangents):
        return [None] * 7
    cotangents = _instantiated(cotangents, ((x.shape, x.dtype), (scale.shape, jnp.float32), (scale.shape, jnp.float32)))
    tangents = tangent_p.bind(x, mean, std, scale, *cotangents, **params)
    linear = (dy, dmean, dvar)
    return [None] * 4 + [t if ad.is_undefined_primal(v) else None for t, v in zip(tangents, linear, strict=True)]


ad.primitive_transposes[tangent_p] = _tangent_transpose
ad.primitive_transposes[backward_p] = _backward_transpose
