"""The classic Keras batch-norm example, rebuilt with jbn and Optax, on scikit-learn's 8x8 digits.

    python examples/digits_mlp.py [--epochs 50] [--batch-size 32] [--seed 0] [--out docs/digits_mlp.png]

Dense(32) -> BatchNorm -> ReLU -> Dense(10) with softmax cross-entropy and Adam, trained with and without
batch norm in three settings: Keras's defaults (learning rate 1e-3), a 10x higher learning rate, and a bad
initialisation (every kernel scaled by 10). Prints a table (epochs to reach 95% test accuracy, final test
accuracy) and saves a PNG of the test-accuracy curves.
"""

import argparse
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import optax
import train_loop

import jbn.linen

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SETTINGS = {  # name: (learning rate, kernel initialisation scale)
    "Keras defaults": (1e-3, 1.0),
    "learning rate x10": (1e-2, 1.0),
    "initialisation x10": (1e-3, 10.0),
}
TARGET = 0.95


class MLP(nn.Module):
    use_batch_norm: bool
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x, training: bool):
        def kernel_init(key, shape, dtype=jnp.float32):  # Keras's glorot_uniform, optionally scaled
            return self.init_scale * nn.initializers.glorot_uniform()(key, shape, dtype)

        x = nn.Dense(32, kernel_init=kernel_init)(x)
        if self.use_batch_norm:
            # 42 steps an epoch on this small set: momentum 0.9 lets the running statistics settle in an epoch.
            x = jbn.linen.BatchNorm(use_running_average=not training, momentum=0.9)(x)
        return nn.Dense(10, kernel_init=kernel_init)(nn.relu(x))


def linen_apply(model: nn.Module):
    """The loop's ``apply(params, batch_stats, x, training)`` for a linen model with optional batch_stats."""

    def apply(params, batch_stats, x, training):
        variables = {"params": params, "batch_stats": batch_stats}
        if not training:
            return model.apply(variables, x, False), batch_stats
        logits, updates = model.apply(variables, x, True, mutable=["batch_stats"])
        return logits, updates.get("batch_stats", {})

    return apply


def train(model, learning_rate, train_split, test_split, args, description):
    variables = model.init(jax.random.key(args.seed), train_split.x[:2], False)
    optimizer = optax.adam(learning_rate)
    state = train_loop.init_state(variables["params"], variables.get("batch_stats", {}), optimizer)
    steps = train_loop.make_steps(linen_apply(model), optimizer)
    _, history = train_loop.fit(
        state,
        steps,
        train_split,
        test_split,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        max_steps=args.max_steps,
        progress=not args.no_progress,
        description=description,
    )
    return history


def epochs_to(history, target):
    return next((h["epoch"] for h in history if h["test_accuracy"] >= target), None)


def plot(results, path):
    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(4 * len(SETTINGS), 3.4))
    for ax, setting in zip(axes, SETTINGS, strict=True):
        for use_batch_norm, style in ((True, "-"), (False, "--")):
            history = results[(setting, use_batch_norm)]
            label = "with batch norm" if use_batch_norm else "without"
            ax.plot([h["epoch"] for h in history], [h["test_accuracy"] for h in history], style, label=label)
        ax.axhline(TARGET, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(setting)
        ax.set_xlabel("epoch")
        lowest = min(h["test_accuracy"] for use in (True, False) for h in results[(setting, use)])
        ax.set_ylim(min(0.5, lowest - 0.02), 1.0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(loc="lower right")
    fig.suptitle("8x8 digits, Dense(32)-BatchNorm-ReLU-Dense(10), Adam")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="cap the steps per epoch (smoke tests)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/digits_mlp.png"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    train_split, test_split = train_loop.digits(args.seed)
    results = {}
    for setting, (learning_rate, init_scale) in SETTINGS.items():
        for use_batch_norm in (True, False):
            model = MLP(use_batch_norm=use_batch_norm, init_scale=init_scale)
            name = f"{setting}, {'batch norm' if use_batch_norm else 'no batch norm'}"
            results[(setting, use_batch_norm)] = train(model, learning_rate, train_split, test_split, args, name)

    print(f"| setting | batch norm | epochs to {TARGET:.0%} test accuracy | final test accuracy |")
    print("|---|---|---|---|")
    for (setting, use_batch_norm), history in results.items():
        reached = epochs_to(history, TARGET)
        print(
            f"| {setting} | {'yes' if use_batch_norm else 'no'} | {reached if reached else 'not reached'} | "
            f"{history[-1]['test_accuracy']:.3f} |"
        )
    plot(results, args.out)
    print(f"learning curves: {args.out}")
    return results


if __name__ == "__main__":
    main()
