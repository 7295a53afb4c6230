"""Precision on offset data: max |error| of each norm's output against float64, jbn and flax.linen side by side.

    python benchmarks/precision.py [--offset 1e4] [--quick]

Data is float32 ``offset + N(0, 1)``; the reference is the same formula in float64 NumPy on the same values.
Flax is shown with its default (the one-pass ``E[x^2] - E[x]^2`` variance) and with ``use_fast_variance=False``.
A second table does the same for the gradient dx of a random cotangent (relative to max |dx|), against the
closed form ``dx = (g - mean(g) - xhat mean(g xhat)) / sqrt(var + epsilon)``, ``g = dy * scale``, in float64.
"""

import argparse

import flax.linen as nn
import jax
import numpy as np

import jbn


def _reference(x, axes, epsilon):
    x = np.asarray(x, np.float64)
    mean = x.mean(axes, keepdims=True)
    return (x - mean) / np.sqrt(x.var(axes, keepdims=True) + epsilon)


def _grouped_reference(x, groups, epsilon):
    n, *spatial, c = x.shape
    grouped = np.asarray(x, np.float64).reshape(n, *spatial, groups, c // groups)
    axes = (*range(1, len(spatial) + 1), grouped.ndim - 1)
    return _reference(grouped, axes, epsilon).reshape(x.shape)


def _rms_reference(x, epsilon):
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + epsilon)


def cases(shape):
    """name -> (jbn function, flax module factory taking use_fast_variance, float64 reference)."""
    return {
        "batch_norm": (
            lambda x: jbn.batch_norm(x, jbn.batch_norm_state(shape[-1]), training=True)[0],
            lambda fast: nn.BatchNorm(use_running_average=False, use_fast_variance=fast),
            lambda x: _reference(x, (0, 1, 2), 1e-5),
        ),
        "layer_norm": (
            jbn.layer_norm,
            lambda fast: nn.LayerNorm(use_fast_variance=fast),
            lambda x: _reference(x, (-1,), 1e-6),
        ),
        "rms_norm": (jbn.rms_norm, lambda fast: nn.RMSNorm(use_fast_variance=fast), lambda x: _rms_reference(x, 1e-6)),
        "instance_norm": (
            jbn.instance_norm,
            lambda fast: nn.InstanceNorm(use_fast_variance=fast),
            lambda x: _reference(x, (1, 2), 1e-6),
        ),
        "group_norm": (
            lambda x: jbn.group_norm(x, num_groups=8),
            lambda fast: nn.GroupNorm(num_groups=8, use_fast_variance=fast),
            lambda x: _grouped_reference(x, 8, 1e-6),
        ),
    }


def _gradient_reference(x, ct, axes, epsilon, groups=None):
    """The closed-form dx (scale 1) in float64; with `groups`, channels split into groups as group norm does."""
    x, ct = np.asarray(x, np.float64), np.asarray(ct, np.float64)
    shape = x.shape
    if groups is not None:
        x, ct = (a.reshape(*a.shape[:-1], groups, -1) for a in (x, ct))
        axes = (*range(1, x.ndim - 2), x.ndim - 1)
    std = np.sqrt(x.var(axes, keepdims=True) + epsilon)
    xhat = (x - x.mean(axes, keepdims=True)) / std
    dx = (ct - ct.mean(axes, keepdims=True) - xhat * (ct * xhat).mean(axes, keepdims=True)) / std
    return dx.reshape(shape)


GRADIENT_CASES = {  # the centered norms: reduction axes, epsilon, groups
    "batch_norm": ((0, 1, 2), 1e-5, None),
    "layer_norm": ((-1,), 1e-6, None),
    "instance_norm": ((1, 2), 1e-6, None),
    "group_norm": (None, 1e-6, 8),
}


def _dx(fn, x, ct):
    return np.asarray(jax.jit(lambda x: jax.vjp(fn, x)[1](ct)[0])(x), np.float64)


def gradient_errors(shape, x):
    ct = jax.random.normal(jax.random.key(1), shape)
    print("\nmax |dx - float64| / max |dx|, same data, a random cotangent")
    print(f"{'norm':14s} {'jbn':>10s} {'flax default':>13s} {'flax exact':>11s}")
    errors = {}
    for name, (jbn_fn, flax_module, _) in cases(shape).items():
        if name not in GRADIENT_CASES:
            continue
        expected = _gradient_reference(x, ct, *GRADIENT_CASES[name])
        size = np.abs(expected).max()
        row = [np.abs(_dx(jbn_fn, x, ct) - expected).max() / size]
        for fast in (True, False):
            module = flax_module(fast)
            variables = module.init(jax.random.key(0), x)
            flax_dx = _dx(lambda x, module=module, variables=variables: _apply(module, variables, x), x, ct)
            row.append(np.abs(flax_dx - expected).max() / size)
        errors[name] = row
        print(f"{name:14s} {row[0]:10.2e} {row[1]:13.2e} {row[2]:11.2e}")
    return errors


def _apply(module, variables, x):
    output = module.apply(variables, x, mutable=["batch_stats"])
    return output[0] if isinstance(output, tuple) else output


def _flax_output(module, x):
    return _apply(module, module.init(jax.random.key(0), x), x)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--offset", type=float, default=1e4)
    parser.add_argument("--quick", action="store_true", help="small shapes, a smoke test")
    args = parser.parse_args(argv)
    shape = (4, 4, 4, 16) if args.quick else (32, 16, 16, 64)
    x = jax.random.normal(jax.random.key(0), shape) + args.offset
    print(f"max |output - float64| on float32 {args.offset:g} + N(0, 1), shape {shape}")
    print(f"{'norm':14s} {'jbn':>10s} {'flax default':>13s} {'flax exact':>11s}")
    errors = {}
    for name, (jbn_fn, flax_module, reference) in cases(shape).items():
        expected = reference(x)
        row = [np.abs(np.asarray(jax.jit(jbn_fn)(x), np.float64) - expected).max()]
        row += [
            np.abs(np.asarray(_flax_output(flax_module(fast), x), np.float64) - expected).max()
            for fast in (True, False)
        ]
        errors[name] = row
        print(f"{name:14s} {row[0]:10.2e} {row[1]:13.2e} {row[2]:11.2e}")
    gradient_errors(shape, x)
    return errors


if __name__ == "__main__":
    main()
