"""Precise population statistics (PreciseBN): the running statistics recomputed exactly over a data set."""

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jbn._batch_norm import BatchNormState


def precise_statistics(update: Callable, stats, batches: Iterable, *, momentum=0.99, weight=None):
    """The exact mean and variance of every batch norm layer's input over `batches`, as running statistics.

    During training the running statistics are a moving average that trails the changing weights. After
    training, this recomputes them under the final weights as the population statistics of each layer's input
    over the whole data (Wu and Johnson, "Rethinking 'Batch' in BatchNorm", 2021): each batch's statistics are
    recovered from one call of `update`, then pooled weighted by batch size, with the exact parallel formula
    ``M2 = M2_a + M2_b + (mean_b - mean_a)^2 n_a n_b / (n_a + n_b)`` in float64 (not an average of the batches'
    variances, which misses the spread between batches).

    Args:
      update: ``update(stats, batch) -> new_stats``, one training-mode forward pass that returns the updated
        running statistics, with the structure of `stats`; it is jitted here. For a linen model:
        ``lambda s, x: model.apply({"params": params, "batch_stats": s}, x, mutable=["batch_stats"])[1]
        ["batch_stats"]``; for the functions: ``lambda s, x: forward(params, s, x, training=True)[1]``.
      stats: the current running statistics: a Flax ``batch_stats`` tree (dicts with ``mean`` and ``var``), a
        `BatchNormState`, or any pytree of those.
      batches: an iterable of batches (each passed to `update` as it is), e.g. the training set in batches.
      momentum: the layers' momentum (``new = momentum * old + (1 - momentum) * batch``), used to read the batch
        statistics back; layers with a ``count`` (``"debiased_ema"``, ``"cumulative"``) need none.
      weight: optional ``weight(batch) -> number``, a batch's weight in the pooled statistics; by default its
        number of examples (the first axis of its first array).

    Returns:
      `stats` with every mean and variance replaced by the population statistics (and every count by the
      number of batches), in their dtypes.

    Raises:
      ValueError: `batches` is empty, or ``momentum`` is 1 (the batch statistics cannot be read back).

    Examples:
      >>> import jax.numpy as jnp, jbn
      >>> batches = [jnp.array([[0.0], [2.0]]), jnp.array([[10.0], [12.0], [14.0], [16.0]])]
      >>> update = lambda state, x: jbn.batch_norm(x, state, training=True)[1]
      >>> state = jbn.precise_statistics(update, jbn.batch_norm_state(1), batches)
      >>> print(state.mean, state.var)  # of all six values
      [9.] [35.666664]
    """
    if momentum == 1:
        raise ValueError("`momentum`=1 never moves the statistics: the batch statistics cannot be read back.")
    nodes, structure = jax.tree.flatten(stats, is_leaf=_is_statistics)
    zeroed = structure.unflatten([_zeroed(node) for node in nodes])
    step = jax.jit(update)
    pooled = [None] * len(nodes)
    batch_count = 0
    for batch in batches:
        updated = structure.flatten_up_to(step(zeroed, batch))
        n = float(weight(batch) if weight is not None else np.shape(jax.tree.leaves(batch)[0])[0])
        for i, node in enumerate(updated):
            mean, var = _batch_statistics(node, momentum)
            pooled[i] = _combined(pooled[i], (n, mean, n * var))
        batch_count += 1
    if batch_count == 0:
        raise ValueError("`batches` is empty: there is nothing to compute the statistics of.")
    return structure.unflatten([_with(node, p, batch_count) for node, p in zip(nodes, pooled, strict=True)])


def _is_statistics(node) -> bool:
    return isinstance(node, BatchNormState) or (isinstance(node, dict) and {"mean", "var"} <= set(node))


def _fields(node) -> dict:
    return node._asdict() if isinstance(node, BatchNormState) else dict(node)


def _rebuilt(node, fields: dict):
    return BatchNormState(**fields) if isinstance(node, BatchNormState) else type(node)(fields)


def _zeroed(node):
    return _rebuilt(node, {k: None if v is None else np.zeros_like(v) for k, v in _fields(node).items()})


def _batch_statistics(node, momentum):
    """A batch's (mean, var) in float64, from running statistics updated from zero."""
    fields = _fields(node)
    mean, var = (np.asarray(fields[k], np.float64) for k in ("mean", "var"))
    if fields.get("count") is None:  # new = momentum * 0 + (1 - momentum) * batch
        mean, var = mean / (1 - momentum), var / (1 - momentum)
    return mean, var


def _combined(a, b):
    """(n, mean, M2) of the union of two groups of values (Chan, Golub and LeVeque's parallel formula)."""
    if a is None:
        return b
    (n_a, mean_a, m2_a), (n_b, mean_b, m2_b) = a, b
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta**2 * (n_a * n_b / n)


def _with(node, pooled, batch_count):
    n, mean, m2 = pooled
    fields = _fields(node)
    fields["mean"] = jnp.asarray(mean, jnp.asarray(fields["mean"]).dtype)
    fields["var"] = jnp.asarray(m2 / n, jnp.asarray(fields["var"]).dtype)
    if fields.get("count") is not None:
        fields["count"] = jnp.full_like(fields["count"], batch_count)
    return _rebuilt(node, fields)
