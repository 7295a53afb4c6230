"""moments(): the one place where jbn reduces over data.

Every norm in jbn (batch, layer, instance, group, RMS) asks this module for its statistics; they differ only in
the axes they reduce over.

Precision rules, said once here:

* Statistics are computed in float32 or wider: bfloat16 and float16 inputs are upcast before any arithmetic, so a
  float16 input of 300 (whose square overflows float16) is fine, and the statistics are float32.
* The variance is exact, not Flax's default ``E[x^2] - E[x]^2`` (off by more than 1,000 on data with mean 1e4).
  One pass sums ``x`` and ``x^2``; where that formula is safe we keep it, and where it would cancel we refine:

  - if ``mean^2 <= 7 var`` for every output position, the squares sum to at most 8 times the variance, so at most
    3 of float32's 24 bits cancel, and ``var = E[x^2] - mean^2`` is as exact as any float32 variance;
  - otherwise (data far from zero relative to its spread) a second pass sums ``d = x - k`` and ``d^2`` with the
    shift ``k`` = the first pass's mean, which loses nothing to cancellation. The mean is then ``k + o`` with the
    small offset ``o = sum(d) / n``, and ``var = (sum(d^2) - o sum(d)) / n``. Normalizing subtracts ``k`` and
    then ``o`` (not a rounded ``k + o``), so data with mean 1e4 keeps float32's full relative precision.

  - if the squares overflow or underflow float32 (data of magnitude above ~1e19 or below ~1e-15, such as 1e30
    or 1e-30), the data are first scaled by a power of two, ``x * s`` with ``s`` from ``max |x|`` (a third pass;
    exact, since multiplying by a power of two does not round), and the statistics are those of ``x * s``.
    Normalizing computes ``(x s - mean s) * rsqrt(var s^2 + epsilon s^2)``, which is the same value and never
    overflows. The mean and variance that ``moments`` and the running statistics report are divided back; a
    variance above float32's range (a spread above ~1.8e19) is reported as inf.

  On the CPU, where the statistics kernel applies (channels-last data: the reduced axes are the leading ones;
  float32 or bfloat16; no mask, no ``axis_name``), none of this branching happens: ``jbn/kernels/norm.cc`` sums
  ``x - shift`` and its square in double in one pass, the shift one of the data, which is exact whatever the
  offset or magnitude, and hands on the mean as two floats (shift and offset) and a power-of-two scale where the
  variance leaves [2^-100, 2^100]. XLA:CPU's sums take two passes, and data far from zero a second two (1.7-2.9x
  Flax's time for batch norm's forward pass, where the kernel's single pass is at or below Flax's).

  Elsewhere the choice is made at run time (``lax.switch``); under ``vmap`` every mapped example takes the most
  careful branch any of them needs, which is exact for all, so that one branch runs. The caller's use of the statistics
  (``then``: normalizing x) and the values derived from the first pass are computed inside the branch: XLA:CPU
  runs a program of at most 8 operations on the calling thread and a longer one as a graph on its thread pool,
  whose hand-offs cost more than a small batch norm's arithmetic. So a batch norm forward pass keeps 8 operations
  at the top level (Flax's has 6); with them outside the branch it had 16 and took 1.07-1.36x Flax's time. On a
  GPU, where a run-time branch waits for the host, there is no branch: every output position takes the second
  pass, rescaled where its squares leave float32's range. Shift and scale are constants under differentiation:
  the statistics do not depend on them. The variance is clamped at 0, so it is never negative.
* Masks: entries where ``mask`` is False are never read into a sum (``jnp.where``, not a multiplication), so they
  may hold NaN or Inf. ``n`` is the number of selected entries. An empty selection gives mean 0 and variance 0.
* Cross-device statistics (``axis_name``): the participants sum their counts and sums with one ``psum``, agree
  on the branch with a scalar ``pmax`` and, when refining, sum their sums about the shared shift with a second
  ``psum``. The result is the statistics of the
  concatenated data, weighted by counts, so uneven or masked shards are exact (Flax averages per-device means
  instead). ``axis_index_groups`` restricts the pooling to sub-groups as in ``jax.lax.psum``.
"""

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jbn import _checks, _fused
from jbn._normalize import centered as centered_on


class Moments(NamedTuple):
    """Statistics over the reduced axes; each field has x's shape with those axes removed.

    They describe ``x * scale`` (`scale` is a power of two, 1 unless x's magnitude is extreme): its mean is
    ``shift + offset``, with `shift` a point near the data and `offset` small (often 0), so that
    ``(x * scale - shift) - offset`` is exact where subtracting a rounded mean would not be; `var` is its variance.
    """

    count: jax.Array  # entries that counted (float; a scalar without mask), pooled across `axis_name`
    scale: jax.Array
    shift: jax.Array
    offset: jax.Array
    var: jax.Array

    @property
    def mean(self) -> jax.Array:
        """The mean of x itself."""
        return (self.shift + self.offset) / self.scale

    @property
    def unscaled_var(self) -> jax.Array:
        """The variance of x itself (inf when it exceeds float32's range)."""
        return self.var / jnp.square(self.scale)


def compute_dtype(dtype) -> jnp.dtype:
    """float32 for half precision inputs; wider float dtypes are kept."""
    return jnp.promote_types(dtype, jnp.float32)


def moments(x, axes, *, mask=None, axis_name=None, axis_index_groups=None, use_fast_variance=False):
    """Mean and biased variance of `x` over `axes`, exact, masked and optionally pooled across devices.

    ``mean = sum(x[mask]) / n``, ``var = sum((x[mask] - mean)^2) / n`` with ``n`` the number of selected
    entries, over `axes` of x and, if `axis_name` is given, over every participant of that named axis.
    See the module docstring of ``jbn._stats`` for the precision, mask and cross-device rules.

    Args:
      x: floating array of any shape.
      axes: int or tuple of ints, the axes to reduce over (may be empty).
      mask: optional boolean array broadcastable to x; False entries are ignored (they may hold NaN).
      axis_name: optional name of a mapped axis (``jax.vmap``, ``shard_map``, ``pmap``) to pool over.
      axis_index_groups: optional groups of indices of `axis_name` that pool separately.
      use_fast_variance: less exact, opt-in: always use the one-pass ``E[x^2] - mean^2`` (Flax's default), which
        is wrong on data far from zero (see the module docstring); for reproducing runs made with Flax.

    Returns:
      ``(mean, var)``, float32 (or x's dtype if wider), shaped like x without `axes`.

    Raises:
      TypeError: x is not floating, or `mask` is not boolean.
      ValueError: `axes` out of range or repeated, or `mask` does not broadcast to x.

    Examples:
      >>> import jax.numpy as jnp, jbn
      >>> x = jnp.array([[1e4 + 1, 1e4 - 1], [1e4 + 3, 1e4 - 3]])
      >>> mean, var = jbn.moments(x, 0)
      >>> mean.tolist(), var.tolist()
      ([10002.0, 9998.0], [1.0, 1.0])
    """
    x = _checks.float_array(x)
    stats = masked_moments(
        x,
        _checks.axes(x.ndim, axes, "axes"),
        mask=_checks.mask(mask, x.shape),
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance,
    )
    return stats.mean, stats.unscaled_var


# The one-pass variance E[x^2] - mean^2 is kept while mean^2 <= _CANCELLATION_LIMIT * var (see module docstring).
_CANCELLATION_LIMIT = 7.0
# Mean squares outside (_TINY, inf) are rescaled first: below it, squares of float32 lose bits to underflow.
_TINY = 2.0**-100
_KEEP, _REFINE, _RESCALE = 0, 1, 2


def masked_moments(
    x, axes, *, mask=None, axis_name=None, axis_index_groups=None, use_fast_variance=False, centered=True, then=None
):
    """moments() on checked arguments, as Moments; `centered=False` gives mean 0 and var = E[x^2].

    With `then`, returns ``then(moments)``, computed inside the run-time branch (see the module docstring).
    """
    compute = compute_dtype(x.dtype)

    uses = itertools.count()

    def wide():
        return upcast_apart(x, compute, next(uses))

    if mask is not None:
        mask = jnp.broadcast_to(mask, x.shape)

    def pooled(*values, reduce=lax.psum):
        if axis_name is None:
            return values
        return reduce(values, axis_name, axis_index_groups=axis_index_groups)

    def sums(*values):
        return pooled(*(masked_sum(value, axes, mask) for value in values))

    count = _count(x.shape, compute, axes, mask)
    finish = then or (lambda stats: stats)
    # The statistics kernel where it applies (see the module docstring), for every platform compiled for: a kernel
    # is CPU code, and exports need ``JBN_KERNELS=0`` anyway.
    kernel = centered and not use_fast_variance and mask is None and axis_name is None
    view = _fused.statistics_view(x, axes) if kernel else None
    if view is not None:
        return finish(Moments(count, *_fused.statistics(x, axes, view)))
    if centered:
        count, sum_x, sum_squares = pooled(count, *(masked_sum(v, axes, mask) for v in (wide(), jnp.square(wide()))))
    else:
        count, sum_squares = pooled(count, masked_sum(jnp.square(wide()), axes, mask))
    # The values derived from the first pass are computed where they are used, in each branch anew (see the module
    # docstring).
    first = functools.partial(_first_pass, count, sum_x if centered else None, sum_squares)

    def scale_of_x():
        magnitude = jnp.abs(lax.stop_gradient(wide()))  # pmax has no derivative; the scale needs none
        selected = magnitude if mask is None else jnp.where(mask, magnitude, 0)
        (largest,) = pooled(jnp.max(selected, axes, initial=0), reduce=lax.pmax)
        return _power_of_two_scale(largest)

    def keep():
        _, _, mean, var = first()
        return finish(Moments(count, jnp.ones_like(var), mean, jnp.zeros_like(var), var))

    def about(scale, shift):
        """Exact statistics of x * scale from sums about `shift` (in scaled units)."""
        safe_count = first().safe_count
        scaled = wide() if scale is None else wide() * jnp.expand_dims(scale, axes)
        scale = jnp.ones_like(shift) if scale is None else scale
        shift = lax.stop_gradient(shift)
        expanded = jnp.expand_dims(shift, axes)
        if not centered:
            (sum_d2,) = sums(jnp.square(scaled))
            zeros = jnp.zeros_like(sum_d2)
            return finish(Moments(count, scale, zeros, zeros, sum_d2 / safe_count))
        # Spelled apart, so that XLA fuses each into its own reduction instead of first writing a shared `x - k`
        # array to memory.
        sum_d, sum_d2 = sums(
            centered_on(scaled, expanded, spelled_apart=True), jnp.square(centered_on(scaled, expanded))
        )
        offset = sum_d / safe_count
        var = jnp.maximum(sum_d2 - offset * sum_d, 0) / safe_count
        return finish(Moments(count, scale, shift, offset, var))

    def refine():
        return about(None, first().mean)

    def rescaled(scale):
        """Statistics of x * scale about the first pass's mean in those units (0 where it overflowed)."""
        mean = first().mean
        return about(scale, jnp.where(jnp.isfinite(mean), mean * scale, 0))

    def rescale():
        return rescaled(scale_of_x())

    if use_fast_variance:
        return keep()
    _, mean_square, mean, var = first()
    # A mean square of exactly 0 with a nonzero mean means the squares underflowed (data near 1e-30).
    out_of_range = ~jnp.isfinite(mean_square) | ((mean_square < _TINY) & ((mean_square > 0) | (mean != 0)))

    def chosen_at_run_time():
        # The most careful branch any output position needs, in one reduction (the branches are ordered by care).
        cancels = jnp.square(mean) > _CANCELLATION_LIMIT * var
        branch = jnp.max(jnp.where(out_of_range, _RESCALE, jnp.where(cancels, _REFINE, _KEEP)), initial=_KEEP)
        if axis_name is not None:
            # The branches hold collectives, so every participant must take the same one. Nothing guarantees that
            # the participants' pooled sums agree to the last bit; a predicate on the edge would split them: a
            # deadlock. Any participant's choice is exact for all, so they take the most careful one.
            branch = lax.pmax(branch, axis_name, axis_index_groups=axis_index_groups)
        return lax.switch(_most_careful(branch), (keep, refine, rescale))

    def branch_free():
        # Every position takes the second pass, rescaled where its squares leave float32's range.
        return rescaled(jnp.where(out_of_range, scale_of_x(), jnp.ones_like(var)))

    branch_free_here = dict.fromkeys(BRANCH_FREE_PLATFORMS, branch_free)
    return lax.platform_dependent(default=chosen_at_run_time, **branch_free_here)


class _FirstPass(NamedTuple):
    safe_count: jax.Array  # the count, at least 1
    mean_square: jax.Array
    mean: jax.Array  # 0 without centering
    var: jax.Array  # E[x^2] - mean^2, clamped at 0


def _first_pass(count, sum_x, sum_squares) -> _FirstPass:
    """The one-pass statistics from the pooled count, sum (None: not centered) and sum of squares."""
    safe_count = jnp.maximum(count, 1)
    mean_square = sum_squares / safe_count
    if sum_x is None:
        return _FirstPass(safe_count, mean_square, jnp.zeros_like(mean_square), mean_square)
    mean = sum_x / safe_count
    return _FirstPass(safe_count, mean_square, mean, jnp.maximum(mean_square - jnp.square(mean), 0))


@jax.custom_batching.custom_vmap
def _most_careful(branch):
    """The branch to take; under ``vmap``, the most careful branch any mapped example needs, for all of them.

    Every branch is exact wherever a less careful one is, so one branch serves every example, and only that branch
    runs: a mapped switch would compute all three and select (and, with `then`, the caller's work three times).
    """
    return branch


@_most_careful.def_vmap
def _most_careful_vmap(axis_size, in_batched, branch):
    del axis_size
    (batched,) = in_batched
    return (_most_careful(jnp.max(branch, 0)) if batched else branch), False


# Where a run-time branch costs more than a pass over x. On a GPU, XLA copies a branch's predicate to the host and
# waits for it: on an H100 the branch made forward passes up to 2x slower (layer norm on 16x512x768: 88 µs against
# 44 without it), where one more pass over x costs a few µs. Chosen for the platform compiled for, not the default.
BRANCH_FREE_PLATFORMS = ("cuda", "rocm")


def upcast_apart(x, dtype, tag: int) -> jax.Array:
    """x in `dtype`, upcast where it is used, not once for all uses.

    XLA would write one shared float32 copy of a bfloat16 x to memory instead of fusing the upcast into each
    reduction and elementwise pass that reads it. A barrier of a different shape per use keeps the upcasts apart:
    x passed ``tag + 1`` times. XLA merges identical barriers, and drops a barrier's constant operands first, so
    a constant tag, ``(x, tag)``, did not.
    """
    if x.dtype == dtype:
        return x
    return lax.optimization_barrier((x,) * (tag + 1))[0].astype(dtype)


def _power_of_two_scale(largest):
    """2^-e with largest = f * 2^e, f in [0.5, 1): scales |x| below 1 without rounding; 1 for 0, inf or NaN."""
    _, exponent = jnp.frexp(largest)
    scale = jnp.ldexp(jnp.ones_like(largest), -jnp.clip(exponent, -125, 125))
    return jnp.where(jnp.isfinite(largest) & (largest > 0), scale, 1)


def _count(shape, dtype, axes, mask):
    if mask is None:
        return jnp.asarray(float(np.prod([shape[axis] for axis in axes])), dtype)
    return masked_sum(mask.astype(dtype), axes)


def masked_sum(values, axes, mask=None, *, keepdims=False):
    """The sum over `axes` of the entries where `mask` is True (all if None); masked entries are never read.

    Summed in two stages where `reduction_stages` says so, with an optimization barrier between them so that XLA
    does not merge them back.
    """
    values = values if mask is None else jnp.where(mask, values, 0)
    stages = reduction_stages(values.shape, axes)
    if stages is not None:
        values = lax.optimization_barrier(jnp.sum(values, stages[0], keepdims=True))
    total = jnp.sum(values, axes, keepdims=True)  # after a first stage its axes have size 1
    return total if keepdims else jnp.squeeze(total, axes)


# A run of reduced minor-most axes with fewer elements than this is summed after the other reduced axes.
_SHORT_MINOR_RUN = 128


def reduction_stages(shape, axes) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(major axes, minor axes) to sum in that order, or None for one stage.

    XLA:CPU sums a short run of minor-most axes together with major ones about 10 times slower than the major
    axes first and the short run of the small result second (group norm on channels-last data: 4 channels per
    group); a long minor run (NCHW batch norm, 1,024 = H x W) is as fast in one stage.
    """
    minor = []
    for axis in reversed(range(len(shape))):
        if axis not in axes:
            break
        minor.append(axis)
    major = tuple(axis for axis in axes if axis not in minor)
    if not minor or not major or np.prod([shape[axis] for axis in minor]) >= _SHORT_MINOR_RUN:
        return None
    return major, tuple(sorted(minor))
