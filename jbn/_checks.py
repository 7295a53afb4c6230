"""Every ValueError and TypeError that jbn raises about its arguments comes from here.

All checks read static information only (shapes, dtypes, Python numbers), so they run at trace time under
`jax.jit` and name the argument, what was received and what was expected.
"""

import warnings
from collections.abc import Sequence
from numbers import Real

import jax
import jax.numpy as jnp
import numpy as np

Axes = int | Sequence[int]


def as_array(value, name: str) -> jax.Array:
    """`value` as a JAX array, or a TypeError naming the argument (not JAX's own message about a dtype).

    A Python number or list too large for float32 is a ValueError rather than a silent inf.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            return jnp.asarray(value)
    except RuntimeWarning:
        raise ValueError(f"`{name}` does not fit float32 (it would overflow to inf): {value!r}.") from None
    except (TypeError, ValueError, OverflowError) as error:
        raise TypeError(f"`{name}` must be an array, got {type(value).__name__}: {error}") from None


def float_array(x, name: str = "x") -> jax.Array:
    """Returns `x` as a floating JAX array, or raises a TypeError naming `name`."""
    if not hasattr(x, "dtype") and not isinstance(x, (list, tuple, Real)):
        raise TypeError(f"`{name}` must be an array of floats, got {type(x).__name__}.")
    x = as_array(x, name)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must have a floating dtype (float32, bfloat16, float16, float64), got {x.dtype} "
            f"with shape {x.shape}; cast it first, e.g. `{name}.astype(jnp.float32)`."
        )
    return x


def axes(ndim: int, axes: Axes, name: str) -> tuple[int, ...]:
    """Returns `axes` as a sorted tuple of non-negative ints, checked against an array of rank `ndim`."""
    if isinstance(axes, (int, np.integer)):
        as_tuple = (axes,)
    elif isinstance(axes, Sequence):
        as_tuple = tuple(axes)
    else:
        raise TypeError(f"`{name}` must be an int or a tuple of ints, got {axes!r}.")
    for axis in as_tuple:
        if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
            raise TypeError(f"`{name}` must be an int or a tuple of ints, got {axes!r}.")
        if ndim == 0:
            raise ValueError(f"`{name}`={axes!r} names an axis, but x is a scalar (rank 0): it has none.")
        if not -ndim <= axis < ndim:
            raise ValueError(f"`{name}`={axes!r} is out of range for x of rank {ndim} (valid: {-ndim} to {ndim - 1}).")
    positive = tuple(int(axis) % ndim for axis in as_tuple)
    if len(set(positive)) != len(positive):
        raise ValueError(f"`{name}`={axes!r} repeats an axis (as non-negative axes: {positive}) for x of rank {ndim}.")
    return tuple(sorted(positive))


def feature_shape(value, name: str) -> tuple[int, ...]:
    """An int ``C`` as ``(C,)``, or a sequence of positive ints as a tuple."""
    sizes = (value,) if isinstance(value, (int, np.integer)) else value
    if not isinstance(sizes, Sequence) or not all(
        isinstance(size, (int, np.integer)) and not isinstance(size, bool) and size > 0 for size in sizes
    ):
        raise ValueError(f"`{name}` must be a positive int or a tuple of them, got {value!r}.")
    return tuple(int(size) for size in sizes)


def feature_param(value, name: str, x_shape: tuple[int, ...], feature_axes: tuple[int, ...]) -> jax.Array | None:
    """Checks that a scale, bias or state field has x's feature shape; None passes through."""
    if value is None:
        return None
    value = float_array(value, name)
    expected = tuple(x_shape[axis] for axis in feature_axes)
    if value.shape != expected:
        raise ValueError(
            f"`{name}` has shape {value.shape}, but x of shape {x_shape} has feature shape {expected} "
            f"along feature_axes={feature_axes}."
        )
    return value


def state_fields(state, x_shape: tuple[int, ...], feature_axes: tuple[int, ...]):
    """Checks a BatchNormState-like `state` (fields `mean` and `var`) against x's feature shape."""
    if not (hasattr(state, "mean") and hasattr(state, "var")):
        raise TypeError(
            f"`state` must be a jbn.BatchNormState (fields `mean` and `var`), got {type(state).__name__}; "
            "make one with jbn.batch_norm_state(num_features)."
        )
    mean = feature_param(state.mean, "state.mean", x_shape, feature_axes)
    var = feature_param(state.var, "state.var", x_shape, feature_axes)
    return mean, var


def mask(mask, x_shape: tuple[int, ...]) -> jax.Array | None:
    """Returns a boolean mask of x's rank (size-1 axes kept), checked to broadcast to `x_shape`."""
    if mask is None:
        return None
    mask = as_array(mask, "mask")
    if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.integer)):
        raise TypeError(
            f"`mask` must be boolean (True marks the entries that count), got {mask.dtype}; "
            "for a float mask use `mask > 0`."
        )
    padded = (1,) * (len(x_shape) - mask.ndim) + mask.shape
    if mask.ndim > len(x_shape) or any(m not in (1, s) for m, s in zip(padded, x_shape, strict=True)):
        raise ValueError(f"`mask` of shape {mask.shape} does not broadcast to x of shape {x_shape}.")
    return mask.reshape(padded).astype(jnp.bool_)


def training(value) -> bool:
    """`training` must be a static Python bool: the mode decides which statistics exist."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"`training` must be a Python bool (static under jit), got {type(value).__name__}; "
            "pass it as a static argument, e.g. jax.jit(f, static_argnames='training')."
        )
    return bool(value)


def _static_number(value, name: str) -> float | None:
    """A Python float for a concrete number; None for a traced value (not checkable at trace time)."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a real number, got {value!r}.") from None


def momentum(value) -> None:
    number = _static_number(value, "momentum")
    if number is not None and not 0.0 <= number <= 1.0:
        raise ValueError(
            f"`momentum`={value!r} is outside [0, 1]; it weighs the old running value "
            "(new = momentum * old + (1 - momentum) * batch). PyTorch's momentum m is jbn's 1 - m."
        )


def epsilon(value) -> None:
    number = _static_number(value, "epsilon")
    if number is not None and not number >= 0.0:
        raise ValueError(f"`epsilon`={value!r} must be >= 0; it is added to the variance before the square root.")


RUNNING_AVERAGES = ("ema", "debiased_ema", "cumulative")


def running_average(mode, state, feature_shape: tuple[int, ...]):
    """Checks `running_average` and, where it needs one, the state's ``count``; returns the count (or None)."""
    if mode not in RUNNING_AVERAGES:
        raise ValueError(f"`running_average`={mode!r} is not one of {RUNNING_AVERAGES}.")
    count = getattr(state, "count", None)
    if mode != "ema" and count is None:
        raise ValueError(
            f"`running_average`={mode!r} counts the batches, but `state` has no count: make it with "
            "jbn.batch_norm_state(num_features, counted=True)."
        )
    if count is None:
        return None
    count = as_array(count, "state.count")
    if count.shape != feature_shape or not jnp.issubdtype(count.dtype, jnp.integer):
        raise ValueError(
            f"`state.count` has shape {count.shape} and dtype {count.dtype}; it must be integer of the "
            f"statistics' shape {feature_shape}."
        )
    return count


def renorm_limits(rmax, dmax) -> None:
    """`rmax` >= 1 and `dmax` >= 0 where they are Python numbers (a schedule may pass traced values)."""
    r, d = _static_number(rmax, "rmax"), _static_number(dmax, "dmax")
    if r is not None and not r >= 1.0:
        raise ValueError(f"`rmax`={rmax!r} must be >= 1: r is clipped to [1/rmax, rmax] (rmax=1 is batch norm).")
    if d is not None and not d >= 0.0:
        raise ValueError(f"`dmax`={dmax!r} must be >= 0: d is clipped to [-dmax, dmax] (dmax=0 is batch norm).")


def virtual_batch_size(value, x_shape: tuple[int, ...], feature_axes: tuple[int, ...]) -> int:
    """The number of virtual batches along axis 0; `value` must divide x's first axis, not a feature axis."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise TypeError(f"`virtual_batch_size` must be a positive int, got {value!r}.")
    if not x_shape or 0 in feature_axes:
        raise ValueError(
            f"ghost batch norm splits x's first axis into virtual batches, but x of shape {x_shape} has "
            f"feature_axes={feature_axes} including it (or no axis at all)."
        )
    if x_shape[0] % value:
        raise ValueError(
            f"`virtual_batch_size`={value} does not divide the batch: x has shape {x_shape}, and {x_shape[0]} "
            f"examples do not split into virtual batches of {value}; pick a divisor of {x_shape[0]}."
        )
    return x_shape[0] // value


def group_count(channels: int, num_groups: int | None, group_size: int | None) -> int:
    """Returns the number of groups, checking that exactly one of num_groups/group_size divides `channels`."""
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            f"Give exactly one of `num_groups` and `group_size`, got num_groups={num_groups!r} and "
            f"group_size={group_size!r}; to use group_size, pass num_groups=None (its default is 32)."
        )
    for name, value in (("num_groups", num_groups), ("group_size", group_size)):
        if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    divisor, name = (num_groups, "num_groups") if num_groups is not None else (group_size, "group_size")
    if channels % divisor:
        raise ValueError(f"`{name}`={divisor} does not divide the {channels} channels of x.")
    return int(num_groups) if num_groups is not None else channels // int(group_size)


def not_batch_axis(ndim: int, feature_axes: tuple[int, ...], name: str) -> None:
    """Instance and group norm keep axis 0 as the batch: it needs a feature axis of its own."""
    if ndim < 2:
        raise ValueError(f"{name} needs x of rank >= 2 (batch axis 0 and a feature axis), got x of rank {ndim}.")
    if 0 in feature_axes:
        raise ValueError(f"`feature_axes`={feature_axes} includes axis 0, which {name} treats as the batch axis.")


def single_channel_axis(ndim: int, feature_axes: tuple[int, ...], name: str) -> tuple[int]:
    """Group norm splits exactly one channel axis into groups."""
    not_batch_axis(ndim, feature_axes, name)
    if len(feature_axes) != 1:
        raise ValueError(f"{name} needs exactly one channel axis in `feature_axes`, got {feature_axes}.")
    return feature_axes


def float32_reductions(force_float32_reductions: bool) -> None:
    """jbn's statistics are always float32 or wider: the Flax option to reduce in half precision is refused."""
    if not force_float32_reductions:
        raise ValueError(
            "`force_float32_reductions=False` is not supported: jbn always computes statistics in float32 (or "
            "wider), which costs nothing in memory traffic; remove the argument."
        )


def channel_in_reduction_axes(ndim: int, reduction_axes, channel: int) -> tuple[int, ...]:
    """Flax's GroupNorm `reduction_axes` must include the channel axis; returns the other axes."""
    axes_ = axes(ndim, reduction_axes, "reduction_axes")
    if channel % ndim not in axes_:
        raise ValueError(
            f"`reduction_axes`={reduction_axes!r} must include the channel axis {channel} (the channels of a group "
            f"are always reduced over), for x of rank {ndim}."
        )
    return tuple(axis for axis in axes_ if axis != channel % ndim)


def running_average_flag(call_value, attribute_value, layer: str):
    """The train/eval switch of the Flax wrappers: from the call, or else from the layer; never missing."""
    value = attribute_value if call_value is None else call_value
    if value is None:
        raise ValueError(
            f"{layer} needs `use_running_average`: pass it to the constructor or to the call "
            "(True: normalize with the running statistics; False: with the batch statistics, updating them)."
        )
    return value
