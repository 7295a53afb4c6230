"""Quick start: jbn's pure functions in a jitted Optax training step, on data where Flax's default is wrong.

    python examples/quickstart.py [--steps 300] [--seed 0]

A linear regression whose 8 input features sit near 1e4 with unit spread (raw sensor readings, say) is
trained through jbn.batch_norm with Adam. The script prints the loss falling, checks that the running
statistics converge to the true feature means and variances, and compares the batch-norm output on such
data with a float64 computation: jbn's exact variance against flax.linen.BatchNorm's default one-pass formula.
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jbn

FEATURES = 8


def make_data(key, n):
    """x ~ 1e4 + N(0, diag(std^2)) per feature, y = w . standardized(x) + noise."""
    k1, k2 = jax.random.split(key)
    std = jnp.linspace(0.5, 2.0, FEATURES)
    x = 1e4 + std[None] * jax.random.normal(k1, (n, FEATURES))
    true_w = jnp.linspace(-1.0, 1.0, FEATURES)
    y = ((x - 1e4) / std[None]) @ true_w + 0.01 * jax.random.normal(k2, (n,))
    return x, y, std


def init(key):
    params = {"scale": jnp.ones(FEATURES), "bias": jnp.zeros(FEATURES), "w": 0.01 * jax.random.normal(key, (FEATURES,))}
    return params, jbn.batch_norm_state(FEATURES)


def loss_fn(params, state, x, y):
    h, state = jbn.batch_norm(x, state, params["scale"], params["bias"], training=True, momentum=0.9)
    return jnp.mean((h @ params["w"] - y) ** 2), state


def make_step(optimizer):
    @jax.jit
    def step(params, state, opt_state, x, y):
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss

    return step


def flax_default_error(x):
    """Max error of flax.linen.BatchNorm (default settings) and of jbn against float64, on x."""
    x64 = np.asarray(x, np.float64)
    exact = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    module = nn.BatchNorm(use_running_average=False)
    flax_y, _ = module.apply(module.init(jax.random.key(0), x), x, mutable=["batch_stats"])
    jbn_y, _ = jbn.batch_norm(x, jbn.batch_norm_state(FEATURES), training=True)
    return float(np.abs(np.asarray(flax_y) - exact).max()), float(np.abs(np.asarray(jbn_y) - exact).max())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    key = jax.random.key(args.seed)
    data_key, init_key, *batch_keys = jax.random.split(key, 2 + args.steps)
    x_all, y_all, std = make_data(data_key, 8192)
    params, state = init(init_key)
    optimizer = optax.adam(0.05)
    opt_state = optimizer.init(params)
    step = make_step(optimizer)
    losses = []
    for i, batch_key in enumerate(batch_keys):
        idx = jax.random.choice(batch_key, x_all.shape[0], (args.batch_size,), replace=False)
        params, state, opt_state, loss = step(params, state, opt_state, x_all[idx], y_all[idx])
        losses.append(float(loss))
        if i % max(1, args.steps // 5) == 0 or i == args.steps - 1:
            print(f"step {i:4d}  loss {loss:.4f}")

    mean_error = float(jnp.abs(state.mean - x_all.mean(0)).max())
    var_ratio = np.asarray(state.var / std**2)
    print(f"running mean vs data mean: max |difference| = {mean_error:.3f} (feature means near 1e4)")
    print("running var / true var:", " ".join(f"{ratio:.2f}" for ratio in var_ratio))
    flax_error, jbn_error = flax_default_error(x_all[:1024])
    print(f"batch norm output here, max error vs float64: flax.linen default {flax_error:.3g}, jbn {jbn_error:.3g}")
    return {"losses": losses, "state": state, "flax_error": flax_error, "jbn_error": jbn_error}


if __name__ == "__main__":
    main()
