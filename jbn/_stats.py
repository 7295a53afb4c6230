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

  The choice is made at run time (``lax.cond``; under ``vmap`` with per-example predicates both are computed and
  selected). The shift is a constant under differentiation: the statistics do not depend on it.
  The variance is clamped at 0, so it is never negative.
* Masks: entries where ``mask`` is False are never read into a sum (``jnp.where``, not a multiplication), so they
  may hold NaN or Inf. ``n`` is the number of selected entries. An empty selection gives mean 0 and variance 0.
* Cross-device statistics (``axis_name``): the participants sum their counts and sums with one ``psum``, agree
  on the branch with a scalar ``pmax`` and, when refining, sum their sums about the shared shift with a second
  ``psum``. The result is the statistics of the
  concatenated data, weighted by counts, so uneven or masked shards are exact (Flax averages per-device means
  instead). ``axis_index_groups`` restricts the pooling to sub-groups as in ``jax.lax.psum``.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jbn import _checks


class Moments(NamedTuple):
    """Statistics over the reduced axes; each field has x's shape with those axes removed.

    The mean is ``shift + offset``: `shift` is a point near the data and `offset` is small (often 0), so that
    ``(x - shift) - offset`` is exact where ``x - (shift + offset)`` would round the mean.
    """

    count: jax.Array  # entries that counted (float; a scalar without mask), pooled across `axis_name`
    shift: jax.Array
    offset: jax.Array
    var: jax.Array

    @property
    def mean(self) -> jax.Array:
        return self.shift + self.offset


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

    Example:
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
    return stats.mean, stats.var


# The one-pass variance E[x^2] - mean^2 is kept while mean^2 <= _CANCELLATION_LIMIT * var (see module docstring).
_CANCELLATION_LIMIT = 7.0


def masked_moments(
    x, axes, *, mask=None, axis_name=None, axis_index_groups=None, use_fast_variance=False, centered=True
) -> Moments:
    """moments() on checked arguments, as Moments; `centered=False` gives mean 0 and var = E[x^2]."""
    x = x.astype(compute_dtype(x.dtype))
    if mask is not None:
        mask = jnp.broadcast_to(mask, x.shape)

    def sums(*values):
        return tuple(_masked_sum(value, axes, mask) for value in values)

    def pooled(*values):
        if axis_name is None:
            return values
        return lax.psum(values, axis_name, axis_index_groups=axis_index_groups)

    count = _count(x, axes, mask)
    if not centered:
        count, sum_squares = pooled(count, *sums(jnp.square(x)))
        zeros = jnp.zeros_like(sum_squares)
        return Moments(count, zeros, zeros, sum_squares / jnp.maximum(count, 1))

    count, sum_x, sum_squares = pooled(count, *sums(x, jnp.square(x)))
    safe_count = jnp.maximum(count, 1)
    mean = sum_x / safe_count
    var = jnp.maximum(sum_squares / safe_count - jnp.square(mean), 0)

    def keep():
        return mean, jnp.zeros_like(mean), var

    def refine():
        shift = lax.stop_gradient(mean)
        expanded = jnp.expand_dims(shift, axes)
        # Spelled `x + (-k)` and `x - k` so that XLA fuses each into its own reduction instead of first writing a
        # shared `x - k` array to memory.
        sum_d, sum_d2 = pooled(*sums(x + (-expanded), jnp.square(x - expanded)))
        offset = sum_d / safe_count
        return shift, offset, jnp.maximum(sum_d2 - offset * sum_d, 0) / safe_count

    if use_fast_variance:
        return Moments(count, *keep())
    cancels = jnp.any(jnp.square(mean) > _CANCELLATION_LIMIT * var)
    if axis_name is not None:
        # refine() holds a collective, so every participant must take the same branch. Nothing guarantees that the
        # participants' pooled sums agree to the last bit; a predicate on the edge would split them: a deadlock.
        cancels = lax.pmax(cancels, axis_name, axis_index_groups=axis_index_groups)
    return Moments(count, *lax.cond(cancels, refine, keep))


def _count(x, axes, mask):
    if mask is None:
        return jnp.asarray(float(np.prod([x.shape[axis] for axis in axes])), x.dtype)
    return jnp.sum(mask, axes, dtype=x.dtype)


def _masked_sum(values, axes, mask):
    return jnp.sum(values if mask is None else jnp.where(mask, values, 0), axes)
