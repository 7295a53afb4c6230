"""Batch, layer, instance, group and RMS norm (and none) side by side in a small CNN on the 8x8 digits.

    python examples/compare_norms.py [--epochs 15] [--seed 0] [--out docs/compare_norms.png]

Conv(16)-norm-ReLU-pool, Conv(32)-norm-ReLU-pool, Dense(10), trained with the same seed, data order and budget for each
normalization (jbn.linen layers). Then batch norm against group norm across batch sizes, in the CNN and in an MLP
(Dense(32)-norm-ReLU-Dense(10)): batch norm's statistics come from the batch, so they get noisy as batches
shrink, while group norm's do not depend on the batch. In the CNN every spatial position adds a sample to batch
norm's statistics, which protects it; the MLP has no such help. Adam's learning rate is scaled with the square
root of the batch size. Prints two tables and saves one figure with both experiments.
"""

import argparse
import pathlib

import flax.linen as nn
import jax
import matplotlib
import optax
import train_loop
from digits_mlp import linen_apply

import jbn.linen

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def norm_layer(kind: str, training: bool):
    """One normalization of NHWC feature maps, statistics as each method defines them."""
    return {
        "batch": lambda: jbn.linen.BatchNorm(use_running_average=not training, momentum=0.9),
        "layer": lambda: jbn.linen.LayerNorm(reduction_axes=(1, 2, 3), feature_axes=-1),
        "instance": lambda: jbn.linen.InstanceNorm(),
        "group": lambda: jbn.linen.GroupNorm(num_groups=4),
        "rms": lambda: jbn.linen.RMSNorm(reduction_axes=(1, 2, 3), feature_axes=-1),
        "none": lambda: lambda x: x,
    }[kind]()


class CNN(nn.Module):
    norm: str

    @nn.compact
    def __call__(self, x, training: bool):
        x = x.reshape(-1, 8, 8, 1)
        for features in (16, 32):
            x = nn.Conv(features, (3, 3), use_bias=self.norm == "none")(x)
            x = nn.relu(norm_layer(self.norm, training)(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))  # 8x8 -> 4x4 -> 2x2
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
    norm: str

    @nn.compact
    def __call__(self, x, training: bool):
        return nn.Dense(10)(nn.relu(norm_layer(self.norm, training)(nn.Dense(32)(x))))


def train(norm, batch_size, epochs, train_split, test_split, args, network=CNN):
    model = network(norm)
    variables = model.init(jax.random.key(args.seed), train_split.x[:2], False)
    # Adam's step size scaled with the square root of the batch size, from the base size's learning rate.
    optimizer = optax.adam(args.learning_rate * (batch_size / args.batch_size) ** 0.5)
    state = train_loop.init_state(variables["params"], variables.get("batch_stats", {}), optimizer)
    _, history = train_loop.fit(
        state,
        train_loop.make_steps(linen_apply(model), optimizer),
        train_split,
        test_split,
        epochs=epochs,
        batch_size=batch_size,
        seed=args.seed,
        max_steps=args.max_steps,
        progress=not args.no_progress,
        description=f"{network.__name__}, {norm} norm, batch {batch_size}",
    )
    return history


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 8, 32], help="for batch vs group norm")
    parser.add_argument("--batch-size-epochs", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="cap the steps per epoch (smoke tests)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/compare_norms.png"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    train_split, test_split = train_loop.digits(args.seed)
    norms = ["batch", "layer", "instance", "group", "rms", "none"]
    curves = {norm: train(norm, args.batch_size, args.epochs, train_split, test_split, args) for norm in norms}
    print(f"| normalization | best test accuracy | final test accuracy (batch {args.batch_size}) |")
    print("|---|---|---|")
    for norm, history in curves.items():
        best = max(h["test_accuracy"] for h in history)
        print(f"| {norm} | {best:.3f} | {history[-1]['test_accuracy']:.3f} |")

    runs = [(network, norm) for network in (MLP, CNN) for norm in ("batch", "group")]
    by_batch = {
        (network.__name__, norm, size): train(
            norm, size, args.batch_size_epochs, train_split, test_split, args, network
        )[-1]["test_accuracy"]
        for network, norm in runs
        for size in args.batch_sizes
    }
    print(f"\ntest accuracy after {args.batch_size_epochs} epochs by batch size")
    print("| batch size | " + " | ".join(f"{network.__name__} {norm} norm" for network, norm in runs) + " |")
    print("|---" * (len(runs) + 1) + "|")
    for size in args.batch_sizes:
        cells = " | ".join(f"{by_batch[(network.__name__, norm, size)]:.3f}" for network, norm in runs)
        print(f"| {size} | {cells} |")

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for norm, history in curves.items():
        left.plot([h["epoch"] for h in history], [h["test_accuracy"] for h in history], label=norm)
    left.set(xlabel="epoch", ylabel="test accuracy", title=f"normalizations, batch size {args.batch_size}")
    left.legend(loc="lower right")
    for network, norm in runs:
        accuracies = [by_batch[(network.__name__, norm, s)] for s in args.batch_sizes]
        style = ("o-" if norm == "batch" else "s--") if network is MLP else ("o:" if norm == "batch" else "s:")
        right.plot(args.batch_sizes, accuracies, style, label=f"{network.__name__}, {norm} norm")
    right.set_xscale("log", base=2)
    right.minorticks_off()
    right.set_xticks(args.batch_sizes, [str(s) for s in args.batch_sizes])
    right.set(xlabel="batch size", ylabel="test accuracy", title=f"by batch size ({args.batch_size_epochs} epochs)")
    right.legend(loc="lower right")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(f"figure: {args.out}")
    return {"curves": curves, "by_batch": by_batch}


if __name__ == "__main__":
    main()
