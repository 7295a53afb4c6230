"""What jbn.linen and jbn.nnx share: the translation of a Flax layer's attributes into core keyword arguments."""

from flax.linen.dtypes import canonicalize_dtype


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
