"""Shared test data and tolerances."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

# (shape, feature_axes): channels last, two feature axes, channels first (NCW).
LAYOUTS = [((8, 3), -1), ((4, 5, 6, 3), -1), ((4, 3, 5), 1), ((4, 5, 6, 3), (1, 3))]
DTYPES = [jnp.float32, jnp.bfloat16]
MODES = ["eager", "jit"]
EVERY_PLATFORM = ("cpu", "cuda", "rocm", "tpu")  # lowering platforms, as `jax.lax.platform_dependent` names them


def cpu_devices():
    """The 4 CPU devices conftest makes: cross-device tests run on any machine, one with a single GPU too."""
    return jax.devices("cpu")[:4]


def cpu_mesh():
    """A mesh of `cpu_devices` along one axis, "devices"."""
    return jax.make_mesh((4,), ("devices",), devices=cpu_devices())


def top_level_operations(compiled_text) -> list[str]:
    """The operations of a compiled program's entry computation that XLA runs as tasks (not parameters, constants,
    tuples or bitcasts), by opcode."""
    entry = re.sub(r"/\*.*?\*/", "", compiled_text[compiled_text.index("\nENTRY") :])  # comments hold "="
    opcodes = re.findall(r"= [^=]*? ([a-z][\w-]*)\(", entry)
    return [op for op in opcodes if op not in {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}]


def data(shape, dtype=jnp.float32, seed=0, offset=0.0, spread=1.0):
    """Normal data with a per-position offset pattern, in `dtype`; also returned as float64 of those values."""
    rng = np.random.default_rng(seed)
    x = offset + spread * rng.standard_normal(shape)
    x = jnp.asarray(x, jnp.float32).astype(dtype)
    return x


def feature_values(x_shape, feature_axes, seed=1):
    """A random positive scale and a random bias of x's feature shape."""
    axes = (feature_axes,) if isinstance(feature_axes, int) else feature_axes
    shape = tuple(x_shape[a] for a in sorted(a % len(x_shape) for a in axes))
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.float32), jnp.asarray(rng.normal(size=shape), jnp.float32)


def tolerance(dtype):
    """Absolute tolerance for outputs of order 1: float32 arithmetic, or one bf16 rounding of the output."""
    return {"atol": 2e-5, "rtol": 1e-5} if dtype == jnp.float32 else {"atol": 3e-2, "rtol": 1e-2}


def call(mode, fn, *args, **kwargs):
    """Calls fn eagerly, or under jax.jit with array keyword arguments traced and the others static."""
    if mode == "eager":
        return fn(*args, **kwargs)
    arrays = {k: v for k, v in kwargs.items() if hasattr(v, "shape")}
    static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in arrays))
    return _jitted(fn, static)(*args, **arrays)


@functools.cache
def _jitted(fn, static):
    return jax.jit(functools.partial(fn, **dict(static)))


def f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)
