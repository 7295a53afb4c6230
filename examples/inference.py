"""Inference with batch norm: the running statistics against statistics recomputed over the training set.

    python examples/inference.py [--epochs 4] [--momentum 0.99] [--seed 0]

During training, batch norm keeps an exponential moving average of the batch statistics; it trails the
weights, which keep changing, and with few steps it has not forgotten its initial values (mean 0, var 1).
After training, ``jbn.precise_statistics`` recomputes them in one pass over the training set, batch by batch,
as the exact population statistics of each layer's input under the final weights (PreciseBN). The script
prints the test accuracy with each, how far the running statistics were off, and checks the pooled result
against one pass over the whole training set as a single batch.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import train_loop
from functional_api import forward, init_params

import jbn


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

    def update(state, x):
        return forward(final.params, state, x, True, momentum=args.momentum)[1]

    batches = (train.x[start : start + 256] for start in range(0, len(train.x), 256))  # every row, once
    precise = jbn.precise_statistics(update, running, batches, momentum=args.momentum)
    # The same population statistics from the whole training set as one batch (possible at this size only).
    _, whole = jax.jit(lambda p, s, x: forward(p, s, x, True, momentum=0.0))(final.params, running, train.x)
    agreement = float(jnp.abs(precise.mean - whole.mean).max() / jnp.sqrt(whole.var).mean())

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
    print(f"  jbn.precise_statistics over batches vs one pass over everything: mean within {agreement:.1e} std")
    return {"accuracies": accuracies, "history": history, "precise": precise, "agreement": agreement}


if __name__ == "__main__":
    main()
