"""Synchronized batch norm across devices with shard_map: exact pooled statistics, data-parallel training.

    python examples/multi_device.py [--devices 8] [--epochs 5] [--batch-size 60]

On a CPU, JAX is asked for `--devices` host devices before it starts (on a GPU or TPU machine, the real devices
are used). Each device holds a shard of every batch; batches that do not divide evenly are padded and masked.

1. jbn.batch_norm under shard_map with axis_name="data" and a mask gives the statistics of the whole batch,
   exactly, however unevenly the valid rows fall on the devices.
2. The digits MLP trained data-parallel (batch statistics pooled across devices, gradients of the global loss)
   matches single-device training on the same global batches, and every device holds the same running statistics.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import train_loop
from functional_api import forward, init_params
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jbn


def padded(x, multiple):
    """x padded with zero rows to a multiple of `multiple` rows, and the mask of the real rows."""
    extra = -len(x) % multiple
    mask = np.arange(len(x) + extra) < len(x)
    return np.concatenate([x, np.zeros((extra, *x.shape[1:]), x.dtype)]), mask


def check_statistics(mesh, train):
    n = mesh.size
    h = np.asarray(train.x[: 10 * n + 3] @ np.random.default_rng(0).normal(size=(64, 8)), np.float32) + 100.0
    x, mask = padded(h, n)
    state = jbn.batch_norm_state(8)

    def sharded(x, mask):
        return jbn.batch_norm(x, state, training=True, mask=mask[:, None], axis_name="data")

    spec = NamedSharding(mesh, P("data"))
    fn = jax.jit(jax.shard_map(sharded, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=(P("data"), P())))
    y, pooled = fn(jax.device_put(x, spec), jax.device_put(mask, spec))
    expected_y, expected = jbn.batch_norm(jnp.asarray(h), state, training=True)
    y_difference = float(np.abs(np.asarray(y)[mask] - np.asarray(expected_y)).max())
    state_difference = max(
        float(jnp.abs(pooled.mean - expected.mean).max()), float(jnp.abs(pooled.var - expected.var).max())
    )
    print(
        f"1. {len(h)} rows on {n} devices ({len(x) - len(h)} padding rows masked): pooled vs single-device "
        f"statistics max |difference| {state_difference:.2e}, outputs {y_difference:.2e}"
    )
    return state_difference, y_difference


def global_loss(params, state, x, y, mask, axis_name=None):
    """Mean cross-entropy over the valid rows of the global batch; under shard_map, pooled over `axis_name`."""
    logits, state = forward(params, state, x, True, axis_name=axis_name, mask=mask[:, None])
    losses = jnp.where(mask, optax.softmax_cross_entropy_with_integer_labels(logits, y), 0.0)
    total, count = losses.sum(), mask.sum()
    if axis_name is not None:
        total, count = jax.lax.psum((total, count), axis_name)
    return total / count, state


def train(train_split, test_split, args, mesh=None):
    """SGD with momentum on the global batches; with a mesh, each batch is sharded over its devices.

    (Adam would hide nothing, but it turns rounding-level differences in near-zero gradients into steps of the
    full learning rate, so the two runs would drift apart visibly for reasons unrelated to batch norm.)
    """
    params, state = init_params(jax.random.key(args.seed))
    optimizer = optax.sgd(0.1, momentum=0.9)
    opt_state = optimizer.init(params)
    multiple = 1 if mesh is None else mesh.size
    if mesh is None:
        loss = global_loss
    else:
        loss = jax.shard_map(
            lambda p, s, x, y, m: global_loss(p, s, x, y, m, axis_name="data"),
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data"), P("data")),
            out_specs=(P(), P()),
        )

    @jax.jit
    def step(params, state, opt_state, x, y, mask):
        (_, state), grads = jax.value_and_grad(loss, has_aux=True)(params, state, x, y, mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state

    for epoch in range(args.epochs):
        for i, (x, y) in enumerate(train_loop.batches(train_split, args.batch_size, args.seed, epoch)):
            if args.max_steps is not None and i >= args.max_steps:
                break
            x, mask = padded(x, multiple)
            y, _ = padded(y, multiple)
            if mesh is not None:
                x, y, mask = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y, mask))
            # Waiting for each step keeps one multi-device step in flight: with 8 host devices on a 2-core CPU,
            # XLA's in-process collectives were seen to deadlock when several steps queued up.
            params, state, opt_state = jax.block_until_ready(step(params, state, opt_state, x, y, mask))
    logits, _ = forward(params, state, test_split.x, False)
    return params, state, float(jnp.mean(jnp.argmax(logits, -1) == test_split.y))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8, help="host devices to ask for on a CPU (at start only)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="cap the steps per epoch (smoke tests)")
    args = parser.parse_args(argv)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    train_split, test_split = train_loop.digits(args.seed)
    differences = check_statistics(mesh, train_split)
    sharded_params, sharded_state, sharded_accuracy = train(train_split, test_split, args, mesh)
    params, _, accuracy = train(train_split, test_split, args)
    param_difference = max(
        float(jnp.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(sharded_params), jax.tree.leaves(params), strict=True)
    )
    replicas = {tuple(np.asarray(shard.data).ravel()) for shard in sharded_state.mean.addressable_shards}
    print(
        f"2. data-parallel on {mesh.size} devices: test accuracy {sharded_accuracy:.3f} "
        f"(single device {accuracy:.3f}); max |params difference| {param_difference:.2e}; "
        f"running statistics identical on every device: {len(replicas) == 1}"
    )
    return {
        "statistics_difference": differences[0],
        "output_difference": differences[1],
        "param_difference": param_difference,
        "accuracies": (sharded_accuracy, accuracy),
        "replicas_agree": len(replicas) == 1,
    }


if __name__ == "__main__":
    import sys

    devices = argparse.ArgumentParser(add_help=False)
    devices.add_argument("--devices", type=int, default=8)
    jax.config.update("jax_num_cpu_devices", devices.parse_known_args(sys.argv[1:])[0].devices)
    main()
