"""What jbn.linen and jbn.nnx share: the translation of a Flax layer's attributes into core keyword arguments."""

import jax.numpy as jnp
from flax.linen.dtypes import canonicalize_dtype

from jbn import _checks


def float_input(x):
    """Integer and boolean inputs become float32, as Flax's layers compute them; other misuse is jbn's error."""
    if isinstance(x, str):
        return _checks.float_array(x)
    x = _checks.as_array(x, "x")
    return x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(jnp.promote_types(x.dtype, jnp.float32))


def core_options(layer, x, mask, *params) -> dict:
    """Keyword arguments every core norm takes, read off a Flax layer's attributes of the same names.

    The output dtype follows Flax: the layer's `dtype`, or else the promotion of x's and the parameters' dtypes.
    """
    return {
        "epsilon": layer.epsilon,
        "mask": mask,
        "axis_name": layer.axis_name,
        "axis_index_groups": layer.axis_index_groups,
        "dtype": canonicalize_dtype(x, *params, dtype=layer.dtype),
    }
