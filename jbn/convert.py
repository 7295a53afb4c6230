"""Batch norm weights and running statistics to and from PyTorch, Keras and Haiku, as plain dicts of NumPy arrays.

jbn's side is always ``{"scale", "bias", "mean", "var"}`` (each ``(C,)``; ``scale``/``bias`` absent when the
layer has none): ``jbn.BatchNormState(values["mean"], values["var"])`` and the scale and bias of
``jbn.batch_norm``, or ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}`` of ``jbn.linen.BatchNorm``
after reshaping nothing. No library is imported: convert its state to NumPy first (``tensor.numpy()``,
``keras_variable.numpy()``).

The conventions that do not convert by renaming:

* PyTorch's ``momentum`` weighs the *new* value (default 0.1); jbn's weighs the old one: ``torch_momentum(0.1)``
  is 0.9. Its ``running_var`` averages *unbiased* batch variances; it is copied as it is, because PyTorch's eval
  normalizes with it as stored, so the converted layer gives PyTorch's eval outputs (only continued training
  differs, by a factor ``n / (n - 1)`` for batches of ``n`` values per feature). Epsilon: 1e-5, as jbn's.
* Keras's epsilon is 1e-3 (`KERAS_EPSILON`), jbn's 1e-5: pass ``epsilon=KERAS_EPSILON`` to keep Keras's outputs.
  Its momentum (0.99) has jbn's meaning.
* Haiku's ``scale``/``offset`` have the input's rank (``(1, 1, 1, C)`` for NHWC), and its running statistics are
  zero-debiased exponential moving averages: ``average`` is used (it is what Haiku normalizes with), and
  `to_haiku` writes a ``counter`` so large that the debiasing factor is 1.
"""

from collections.abc import Mapping

import numpy as np

KERAS_EPSILON = 1e-3
TORCH_EPSILON = 1e-5

_TORCH = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_KERAS = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}


def torch_momentum(momentum: float) -> float:
    """jbn's momentum (weight of the old value) for PyTorch's (weight of the new value): ``1 - momentum``."""
    return 1.0 - momentum


def from_torch(state_dict: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """jbn's values from a PyTorch ``BatchNorm{1,2,3}d`` state dict (keys ``prefix + "weight"``, ...).

    Examples:
      >>> import numpy as np, jbn.convert
      >>> torch_state = {"weight": np.ones(2), "bias": np.zeros(2), "running_mean": np.array([1.0, 2.0]),
      ...                "running_var": np.array([4.0, 9.0]), "num_batches_tracked": np.array(10)}
      >>> sorted(jbn.convert.from_torch(torch_state))
      ['bias', 'mean', 'scale', 'var']
    """
    return _renamed(state_dict, _TORCH, prefix, "PyTorch state dict")


def to_torch(values: Mapping, num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """A PyTorch ``BatchNorm{1,2,3}d`` state dict (float32; ``num_batches_tracked`` int64) from jbn's values."""
    state = {_TORCH[name]: np.asarray(value, np.float32) for name, value in _checked(values).items()}
    state["num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
    return state


def from_keras(weights: Mapping) -> dict[str, np.ndarray]:
    """jbn's values from a Keras ``BatchNormalization`` layer's weights by name (``gamma``, ``beta``, ...).

    Use ``epsilon=jbn.convert.KERAS_EPSILON`` with them to reproduce Keras's outputs.
    """
    return _renamed(weights, _KERAS, "", "Keras weights")


def to_keras(values: Mapping) -> dict[str, np.ndarray]:
    """Keras ``BatchNormalization`` weights by name from jbn's values."""
    return {_KERAS[name]: np.asarray(value, np.float32) for name, value in _checked(values).items()}


def from_haiku(params: Mapping, state: Mapping, name: str = "batch_norm") -> dict[str, np.ndarray]:
    """jbn's values from Haiku's ``params`` and ``state`` of the ``hk.BatchNorm`` module called `name`."""
    module = params.get(name, {})
    try:
        mean = state[f"{name}/~/mean_ema"]["average"]
        var = state[f"{name}/~/var_ema"]["average"]
    except KeyError:
        raise KeyError(
            f"Haiku state has no '{name}/~/mean_ema' and '{name}/~/var_ema' averages; its modules are "
            f"{sorted(state)}. Pass the BatchNorm's module name as `name`."
        ) from None
    values = {"mean": mean, "var": var}
    values |= {key: module[source] for key, source in (("scale", "scale"), ("bias", "offset")) if source in module}
    return {key: np.asarray(value, np.float32).reshape(-1) for key, value in values.items()}


def to_haiku(values: Mapping, input_ndim: int, name: str = "batch_norm") -> tuple[dict, dict]:
    """Haiku ``(params, state)`` for an ``hk.BatchNorm`` called `name` on channels-last inputs of rank `input_ndim`."""
    values = _checked(values)
    channels = values["mean"].shape[0]
    shape = (1,) * (input_ndim - 1) + (channels,)
    params = {
        name: {
            target: np.asarray(values[key], np.float32).reshape(shape)
            for key, target in (("scale", "scale"), ("bias", "offset"))
            if key in values
        }
    }

    def ema(value):
        average = np.asarray(value, np.float32).reshape(shape)
        # hidden / (1 - decay ** counter) is the average Haiku uses; with this counter the divisor is 1.
        return {"average": average, "hidden": average.copy(), "counter": np.asarray(2**30, np.int32)}

    state = {f"{name}/~/mean_ema": ema(values["mean"]), f"{name}/~/var_ema": ema(values["var"])}
    return params, state


def _renamed(source: Mapping, names: dict, prefix: str, what: str) -> dict[str, np.ndarray]:
    missing = [prefix + names[key] for key in ("mean", "var") if prefix + names[key] not in source]
    if missing:
        raise KeyError(f"{what} has no {missing}; its keys are {sorted(source)}.")
    return {
        key: np.asarray(source[prefix + theirs], np.float32).reshape(-1)
        for key, theirs in names.items()
        if prefix + theirs in source
    }


def _checked(values: Mapping) -> dict[str, np.ndarray]:
    unknown = set(values) - set(_TORCH)
    if unknown or not {"mean", "var"} <= set(values):
        raise KeyError(f"jbn's values are 'mean', 'var' and optionally 'scale', 'bias'; got {sorted(values)}.")
    return {key: np.asarray(value).reshape(-1) for key, value in values.items()}
