"""jbn.fold_batch_norm against float64, and jbn.linen.fold_batch_norms on sequential Flax models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
import jbn.linen
from tests.helpers import f64


def _random(shape, seed, low=None, high=None):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=shape) if low is None else rng.uniform(low, high, shape)
    return jnp.asarray(values, jnp.float32)


@pytest.mark.parametrize(
    ("kernel_shape", "output_axis", "with_bias", "with_affine"),
    [((6, 4), -1, True, True), ((3, 3, 2, 4), -1, False, True), ((4, 6), 0, True, False)],
    ids=["dense", "conv-no-bias", "torch-layout-no-affine"],
)
def test_folded_layer_equals_layer_then_batch_norm_in_float64(kernel_shape, output_axis, with_bias, with_affine):
    kernel = _random(kernel_shape, 0)
    bias = _random((4,), 1) if with_bias else None
    state = jbn.BatchNormState(_random((4,), 2), _random((4,), 3, 0.1, 3.0))
    scale, bn_bias = (_random((4,), 4), _random((4,), 5)) if with_affine else (None, None)
    folded_kernel, folded_bias = jbn.fold_batch_norm(kernel, bias, state, scale, bn_bias, output_axis=output_axis)
    inputs = np.random.default_rng(6).normal(size=(5, int(np.prod(kernel_shape)) // 4))
    flat = np.moveaxis(f64(kernel), output_axis, -1).reshape(-1, 4)
    flat_folded = np.moveaxis(f64(folded_kernel), output_axis, -1).reshape(-1, 4)
    z = inputs @ flat + (0 if bias is None else f64(bias))
    expected = (z - f64(state.mean)) / np.sqrt(f64(state.var) + 1e-5)
    if with_affine:
        expected = expected * f64(scale) + f64(bn_bias)
    np.testing.assert_allclose(inputs @ flat_folded + f64(folded_bias), expected, rtol=1e-5, atol=1e-5)


def _trained_stats(variables, seed):
    """Running statistics far from (0, 1), as after training."""
    stats = jax.tree.map(lambda v: v, variables["batch_stats"])
    for i, name in enumerate(sorted(stats)):
        size = stats[name]["mean"].shape
        stats[name] = {"mean": _random(size, seed + i), "var": _random(size, seed + 10 + i, 0.2, 4.0)}
    return {**variables, "batch_stats": stats}


MODELS = {
    "mlp": (
        lambda: nn.Sequential(
            [
                nn.Dense(8),
                nn.BatchNorm(use_running_average=True),
                nn.relu,
                nn.Dense(8, use_bias=False),
                jbn.linen.BatchNorm(use_running_average=True, use_scale=False, epsilon=1e-3),
                nn.relu,
                nn.Dense(3),
            ]
        ),
        (5, 6),
        5,
    ),
    "cnn": (
        lambda: nn.Sequential(
            [
                nn.Conv(4, (3, 3)),
                jbn.linen.BatchNorm(use_running_average=True),
                nn.relu,
                nn.BatchNorm(use_running_average=True),  # not after a Dense or Conv: kept
                nn.Conv(2, (1, 1)),
            ]
        ),
        (2, 5, 5, 3),
        4,
    ),
}


@pytest.mark.parametrize("name", MODELS)
def test_folding_a_sequential_model_keeps_its_inference_output(name):
    make, shape, folded_length = MODELS[name]
    model, x = make(), _random(shape, 7)
    variables = _trained_stats(model.init(jax.random.key(0), x), 20)
    folded, folded_variables = jbn.linen.fold_batch_norms(model, variables)
    assert len(folded.layers) == folded_length
    # Full float32 products: a GPU's default (TensorFloat-32) rounds the two models' products differently.
    with jax.default_matmul_precision("highest"):
        folded_y, y = folded.apply(folded_variables, x), model.apply(variables, x)
    np.testing.assert_allclose(folded_y, y, rtol=1e-5, atol=1e-5)


def test_mismatched_statistics_are_named():
    state = jbn.BatchNormState(jnp.zeros(3), jnp.ones(3))
    with pytest.raises(ValueError, match=r"`state.mean` has shape \(3,\), but the kernel of shape \(6, 4\) has 4"):
        jbn.fold_batch_norm(jnp.ones((6, 4)), None, state)
