"""Forward-pass timing of jbn against flax.linen, interleaved in one process; prints median ratios.

    python benchmarks/forward.py [--rounds 200] [--quick]

Each round times every row once (A B A B ...), after warm-up, with block_until_ready, so a noisy machine slows
both rows alike; the ratio jbn/flax is taken per round and summarized by its median and interquartile range.
Two data sets: well-conditioned N(0, 1) and offset 1e4 + N(0, 1), where Flax's default variance is wrong.
"""

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jbn


def workloads(quick):
    shape = (8, 8, 8, 16) if quick else (64, 32, 32, 64)
    ln_shape = (4, 16, 32) if quick else (16, 512, 768)
    channels, ln_features = shape[-1], ln_shape[-1]
    bn_state, ones, zeros = jbn.batch_norm_state(channels), jnp.ones(channels), jnp.zeros(channels)
    flax_bn = nn.BatchNorm(use_running_average=False)
    bn_vars = flax_bn.init(jax.random.key(0), jnp.zeros(shape))
    flax_ln = nn.LayerNorm()
    ln_vars = flax_ln.init(jax.random.key(0), jnp.zeros(ln_shape))
    ln_scale, ln_bias = jnp.ones(ln_features), jnp.zeros(ln_features)
    # Parameters and state are arguments, not constants, so XLA cannot fold a scale of ones away.
    jbn_bn = jax.jit(lambda x, state, scale, bias: jbn.batch_norm(x, state, scale, bias, training=True))
    flax_bn_fn = jax.jit(lambda variables, x: flax_bn.apply(variables, x, mutable=["batch_stats"]))
    jbn_ln = jax.jit(jbn.layer_norm)
    flax_ln_fn = jax.jit(flax_ln.apply)
    return {
        f"batch_norm train {shape}": (
            shape,
            lambda x: jbn_bn(x, bn_state, ones, zeros),
            lambda x: flax_bn_fn(bn_vars, x),
        ),
        f"layer_norm {ln_shape}": (
            ln_shape,
            lambda x: jbn_ln(x, ln_scale, ln_bias),
            lambda x: flax_ln_fn(ln_vars, x),
        ),
    }


def measure(fns, x, rounds):
    for fn in fns:
        jax.block_until_ready(fn(x))
    times = np.zeros((rounds, len(fns)))
    for r in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            jax.block_until_ready(fn(x))
            times[r, i] = time.perf_counter() - start
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few rounds, a smoke test")
    args = parser.parse_args(argv)
    rounds = 5 if args.quick else args.rounds
    print(f"{'workload':40s} {'data':10s} {'jbn ms':>8s} {'flax ms':>8s} {'jbn/flax':>9s} {'IQR':>13s}")
    results = {}
    for name, (shape, jbn_fn, flax_fn) in workloads(args.quick).items():
        for label, offset in (("N(0,1)", 0.0), ("1e4+N(0,1)", 1e4)):
            x = jax.random.normal(jax.random.key(1), shape) + offset
            times = measure((jbn_fn, flax_fn), x, rounds)
            ratio = times[:, 0] / times[:, 1]
            q1, median, q3 = np.percentile(ratio, [25, 50, 75])
            jbn_ms, flax_ms = np.median(times, axis=0) * 1e3
            results[(name, label)] = median
            print(f"{name:40s} {label:10s} {jbn_ms:8.3f} {flax_ms:8.3f} {median:9.2f} [{q1:5.2f}, {q3:5.2f}]")
    return results


if __name__ == "__main__":
    main()
