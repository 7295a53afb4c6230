"""jbn's pure functions with no Flax at all: a dict of params, a BatchNormState, and JAX's transformations.

    python examples/functional_api.py [--epochs 10] [--ensemble 8] [--seed 0]

1. A Dense(32)-BatchNorm-ReLU-Dense(10) classifier written as one function, trained with a jitted Optax step.
2. An ensemble of models, each with its own parameters and running statistics, trained in one call by jax.vmap.
3. Per-example gradients through batch norm: jax.vmap(jax.grad(...), axis_name="batch") computes each example's
   gradient while the batch statistics still pool over the whole batch; their sum equals the batch gradient.
4. A whole epoch as one lax.scan over steps, identical to the Python loop.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import train_loop

import jbn

HIDDEN = 32


def init_params(key):
    k1, k2 = jax.random.split(key)
    glorot = jax.nn.initializers.glorot_uniform()
    params = {
        "w1": glorot(k1, (64, HIDDEN)),
        "b1": jnp.zeros(HIDDEN),
        "scale": jnp.ones(HIDDEN),
        "bias": jnp.zeros(HIDDEN),
        "w2": glorot(k2, (HIDDEN, 10)),
        "b2": jnp.zeros(10),
    }
    return params, jbn.batch_norm_state(HIDDEN)


def forward(params, state, x, training, *, momentum=0.9, axis_name=None, mask=None):
    """logits, new_state: the model is this function; nothing about it is hidden."""
    h = x @ params["w1"] + params["b1"][None]
    h, state = jbn.batch_norm(
        h,
        state,
        params["scale"],
        params["bias"],
        training=training,
        momentum=momentum,
        axis_name=axis_name,
        mask=mask,
    )
    return jax.nn.relu(h) @ params["w2"] + params["b2"][None], state


def loss_fn(params, state, x, y, axis_name=None):
    logits, state = forward(params, state, x, True, axis_name=axis_name)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state


def accuracy(params, state, split):
    logits, _ = forward(params, state, split.x, False)
    return float(jnp.mean(jnp.argmax(logits, -1) == split.y))


def train_single(train, test, args):
    params, state = init_params(jax.random.key(args.seed))
    optimizer = optax.adam(1e-2)
    steps = train_loop.make_steps(lambda p, s, x, training: forward(p, s, x, training), optimizer)
    final, history = train_loop.fit(
        train_loop.init_state(params, state, optimizer),
        steps,
        train,
        test,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        max_steps=args.max_steps,
        progress=False,
    )
    print(f"1. one model: test accuracy {history[-1]['test_accuracy']:.3f} after {args.epochs} epochs")
    return final


def train_ensemble(train, test, args):
    """Each member has its own initialisation and its own BatchNormState; one vmapped step trains all."""
    params, states = jax.vmap(init_params)(jax.random.split(jax.random.key(args.seed + 1), args.ensemble))
    optimizer = optax.adam(1e-2)
    opt_states = jax.vmap(optimizer.init)(params)

    @jax.jit
    @jax.vmap
    def step(params, state, opt_state, x, y):
        (_, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state

    for epoch in range(args.epochs):
        for i, (x, y) in enumerate(train_loop.batches(train, args.batch_size, args.seed, epoch)):
            if args.max_steps is not None and i >= args.max_steps:
                break
            x_all, y_all = np.broadcast_to(x, (args.ensemble, *x.shape)), np.broadcast_to(y, (args.ensemble, *y.shape))
            params, states, opt_states = step(params, states, opt_states, x_all, y_all)
    logits = jax.vmap(lambda p, s: forward(p, s, test.x, False)[0])(params, states)
    members = np.asarray(jnp.mean(jnp.argmax(logits, -1) == test.y[None], axis=1))
    ensemble = float(jnp.mean(jnp.argmax(logits.mean(0), -1) == test.y))
    print(f"2. ensemble of {args.ensemble}: members {members.min():.3f}-{members.max():.3f}, averaged {ensemble:.3f}")
    return members, ensemble


def per_example_gradients(params, state, train):
    """Gradients of each example's loss, with batch statistics pooled over the mapped batch axis."""
    x, y = train.x[:16], train.y[:16]

    def example_loss(params, xi, yi):
        logits, _ = forward(params, state, xi[None], True, axis_name="batch")
        return optax.softmax_cross_entropy_with_integer_labels(logits, yi[None]).sum()

    per_example = jax.jit(jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0), axis_name="batch"))(params, x, y)

    def batch_loss(params):
        logits, _ = forward(params, state, x, True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()

    batched = jax.grad(batch_loss)(params)
    difference = max(float(jnp.abs(per_example[k].sum(0) - batched[k]).max()) for k in params)
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(16, -1) ** 2, 1) for g in jax.tree.leaves(per_example)))
    print(
        f"3. per-example gradients of 16 examples: norms {float(norms.min()):.3f}-{float(norms.max()):.3f}; "
        f"their sum vs the batch gradient: max |difference| {difference:.2e}"
    )
    return difference


def scan_epoch(train, args):
    """One epoch as a single lax.scan over stacked batches, against the same steps in a Python loop."""
    params, state = init_params(jax.random.key(args.seed))
    optimizer = optax.sgd(0.1)
    carry = (params, state, optimizer.init(params))

    def step(carry, batch):
        params, state, opt_state = carry
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), state, opt_state), loss

    batch_list = list(train_loop.batches(train, args.batch_size, args.seed, 0))[: args.max_steps]
    stacked = tuple(np.stack(parts) for parts in zip(*batch_list, strict=True))
    (scanned, _, _), losses = jax.jit(lambda c, b: jax.lax.scan(step, c, b))(carry, stacked)
    looped = carry
    jitted_step = jax.jit(step)
    for batch in batch_list:
        looped, _ = jitted_step(looped, batch)
    difference = max(
        float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(looped[0]), strict=True)
    )
    print(
        f"4. lax.scan over {len(batch_list)} steps: loss {float(losses[0]):.3f} -> {float(losses[-1]):.3f}; "
        f"max |scan - loop| in params {difference:.2e}"
    )
    return difference


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ensemble", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="cap the steps per epoch (smoke tests)")
    args = parser.parse_args(argv)
    train, test = train_loop.digits(args.seed)
    final = train_single(train, test, args)
    members, ensemble = train_ensemble(train, test, args)
    gradient_difference = per_example_gradients(final.params, final.batch_stats, train)
    scan_difference = scan_epoch(train, args)
    return {
        "members": members,
        "ensemble": ensemble,
        "gradient_difference": gradient_difference,
        "scan_difference": scan_difference,
    }


if __name__ == "__main__":
    main()
