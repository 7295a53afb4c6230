"""The small Optax training loop that every example shares: data, jitted steps, epochs, checkpoints.

A model is any ``apply(params, batch_stats, x, training) -> (logits, new_batch_stats)``; the loop threads params,
batch statistics and optimizer state explicitly through a pure, jitted ``train_step``, evaluates with the running
statistics, shuffles with a seed per epoch (so a resumed run sees the same batches), and can checkpoint to disk
with orbax-checkpoint and resume bit for bit.
"""

import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from sklearn.datasets import load_digits
from tqdm.auto import tqdm


class Split(NamedTuple):
    x: np.ndarray  # (N, 64) float32 in [0, 1]
    y: np.ndarray  # (N,) int32 labels 0-9


class TrainState(NamedTuple):
    params: Any
    batch_stats: Any
    opt_state: Any
    epoch: jax.Array  # epochs completed


def digits(seed: int = 0, test_fraction: float = 0.25) -> tuple[Split, Split]:
    """scikit-learn's 1,797 8x8 digits (shipped with the package), pixels scaled to [0, 1], split by a seed."""
    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x, y = (data.data[order] / 16.0).astype(np.float32), data.target[order].astype(np.int32)
    n_test = int(len(y) * test_fraction)
    return Split(x[n_test:], y[n_test:]), Split(x[:n_test], y[:n_test])


def init_state(params, batch_stats, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(params, batch_stats, optimizer.init(params), jnp.zeros((), jnp.int32))


def make_steps(apply: Callable, optimizer: optax.GradientTransformation):
    """Returns jitted ``train_step(state, x, y) -> (state, loss, accuracy)`` and ``eval_step(state, x, y)``."""

    def loss_fn(params, batch_stats, x, y):
        logits, batch_stats = apply(params, batch_stats, x, True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (batch_stats, jnp.mean(jnp.argmax(logits, -1) == y))

    @jax.jit
    def train_step(state: TrainState, x, y):
        (loss, (batch_stats, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, x, y
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state._replace(params=params, batch_stats=batch_stats, opt_state=opt_state), loss, accuracy

    @jax.jit
    def eval_step(state: TrainState, x, y):
        logits, _ = apply(state.params, state.batch_stats, x, False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    return train_step, eval_step


def batches(split: Split, batch_size: int, seed: int, epoch: int):
    """The epoch's minibatches: a permutation drawn from (seed, epoch) alone; the last partial batch is dropped."""
    order = np.random.default_rng([seed, epoch]).permutation(len(split.y))
    for start in range(0, len(order) - batch_size + 1, batch_size):
        index = order[start : start + batch_size]
        yield split.x[index], split.y[index]


def fit(
    state: TrainState,
    steps,
    train: Split,
    test: Split,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    max_steps: int | None = None,
    checkpoint_dir: str | pathlib.Path | None = None,
    progress: bool = True,
    description: str = "training",
) -> tuple[TrainState, list[dict]]:
    """Trains until `epochs` epochs are complete (from ``state.epoch``); returns the state and per-epoch metrics.

    With `checkpoint_dir`, the state is saved after every epoch and, if the directory already holds checkpoints,
    training resumes from the latest one. `max_steps` caps the steps per epoch (for smoke tests).
    """
    train_step, eval_step = steps
    checkpoints = Checkpoints(checkpoint_dir) if checkpoint_dir is not None else None
    if checkpoints is not None:
        state = checkpoints.restore_latest(state)
    history = []
    # disable=None: tqdm shows the bar on a terminal only, not in logs.
    bar = tqdm(range(int(state.epoch), epochs), desc=description, disable=None if progress else True, leave=False)
    for epoch in bar:
        losses, accuracies = [], []
        for step, (x, y) in enumerate(batches(train, batch_size, seed, epoch)):
            if max_steps is not None and step >= max_steps:
                break
            state, loss, accuracy = train_step(state, x, y)
            losses.append(loss)
            accuracies.append(accuracy)
        state = state._replace(epoch=state.epoch + 1)
        test_loss, test_accuracy = eval_step(state, test.x, test.y)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)),
                "train_accuracy": float(np.mean(accuracies)),
                "test_loss": float(test_loss),
                "test_accuracy": float(test_accuracy),
            }
        )
        bar.set_postfix(test_accuracy=f"{float(test_accuracy):.3f}")
        if checkpoints is not None:
            checkpoints.save(state)
    return state, history


class Checkpoints:
    """One orbax checkpoint per completed epoch, ``<directory>/epoch_<k>``."""

    def __init__(self, directory):
        self.directory = pathlib.Path(directory).absolute()
        self.checkpointer = ocp.StandardCheckpointer()

    def save(self, state: TrainState) -> None:
        self.checkpointer.save(self.directory / f"epoch_{int(state.epoch)}", state)
        self.checkpointer.wait_until_finished()

    def restore_latest(self, like: TrainState) -> TrainState:
        """The latest saved state, with `like`'s structure; `like` itself when nothing is saved yet."""
        saved = sorted(self.directory.glob("epoch_*"), key=lambda path: int(path.name.split("_")[1]))
        if not saved:
            return like
        restored = self.checkpointer.restore(saved[-1], jax.tree.map(ocp.utils.to_shape_dtype_struct, like))
        return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(restored))
