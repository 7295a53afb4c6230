"""jbn: exact, explicit normalization layers for JAX (batch, layer, instance, group and RMS norm)."""

from jbn._batch_norm import BatchNormState, batch_norm, batch_norm_state
from jbn._fold import fold_batch_norm
from jbn._ghost import ghost_batch_norm
from jbn._norms import group_norm, instance_norm, layer_norm, rms_norm
from jbn._precise import precise_statistics
from jbn._renorm import batch_renorm
from jbn._stats import moments

__version__ = "0.1.0"

__all__ = [
    "BatchNormState",
    "batch_norm",
    "batch_norm_state",
    "batch_renorm",
    "fold_batch_norm",
    "ghost_batch_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "moments",
    "precise_statistics",
    "rms_norm",
]
