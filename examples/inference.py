"""Inference with batch norm: the running statistics against statistics recomputed over the training set.

    python examples/inference.py [--epochs 4] [--momentum 0.99] [--seed 0]

During training, batch norm keeps an exponential moving average of the batch statistics; it trails the
weights, which keep changing, and with few steps it has not forgotten its initial values (mean 0, var 1).
After training, one pass over the whole training set in training mode with ``momentum=0`` replaces the running
statistics by the exact population statistics of the layer's input under the final weights (the idea of
PreciseBN). The script prints the test accuracy with each, and how far the running statistics were off.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import train_loop
from functional_api import forward, init_params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--momentum", type=float, default=0.99, help="the running statistics' momentum in training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="cap the steps per epoch (smoke tests)")
    args = parser.parse_args(argv)

    train, test = train_loop.digits(args.seed)
    params, state = init_params(jax.random.key(args.seed))
    optimizer = optax.adam(1e-2)

    def apply(params, state, x, training):
        return forward(params, state, x, training, momentum=args.momentum)

    final, history = train_loop.fit(
        train_loop.init_state(params, state, optimizer),
        train_loop.make_steps(apply, optimizer),
        train,
        test,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        max_steps=args.max_steps,
        progress=False,
    )
    running = final.batch_stats
    _, precise = jax.jit(lambda p, s, x: forward(p, s, x, True, momentum=0.0))(final.params, running, train.x)

    def test_accuracy(state):
        logits, _ = forward(final.params, state, test.x, False)
        return float(jnp.mean(jnp.argmax(logits, -1) == test.y))

    mean_gap = float(jnp.abs(running.mean - precise.mean).max() / jnp.sqrt(precise.var).mean())
    var_ratio = np.asarray(running.var / precise.var)
    accuracies = {"running": test_accuracy(running), "precise": test_accuracy(precise)}
    steps = sum(1 for _ in train_loop.batches(train, args.batch_size, args.seed, 0)) * args.epochs
    print(f"after {args.epochs} epochs ({steps} steps, momentum {args.momentum}):")
    print(
        f"  running statistics: mean off by up to {mean_gap:.2f} std, "
        f"var ratio {var_ratio.min():.2f}-{var_ratio.max():.2f}"
    )
    print(f"  test accuracy with running statistics:            {accuracies['running']:.3f}")
    print(f"  test accuracy with statistics of the training set: {accuracies['precise']:.3f}")
    return {"accuracies": accuracies, "history": history, "precise": precise}


if __name__ == "__main__":
    main()
