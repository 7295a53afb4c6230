"""jbn.convert: state from and to PyTorch, Keras and Haiku; the real libraries are used where installed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
import jbn.convert

RNG = np.random.default_rng(0)
VALUES = {
    "scale": RNG.uniform(0.5, 1.5, 4).astype(np.float32),
    "bias": RNG.normal(size=4).astype(np.float32),
    "mean": RNG.normal(size=4).astype(np.float32),
    "var": RNG.uniform(0.5, 2.0, 4).astype(np.float32),
}


def _jbn_eval(values, x, feature_axes=-1, epsilon=1e-5):
    state = jbn.BatchNormState(jnp.asarray(values["mean"]), jnp.asarray(values["var"]))
    scale, bias = (jnp.asarray(values[k]) if k in values else None for k in ("scale", "bias"))
    return jbn.batch_norm(x, state, scale, bias, training=False, feature_axes=feature_axes, epsilon=epsilon)[0]


@pytest.mark.parametrize(
    ("to", "back", "args"),
    [
        (jbn.convert.to_torch, jbn.convert.from_torch, ()),
        (jbn.convert.to_keras, jbn.convert.from_keras, ()),
        (lambda v: jbn.convert.to_haiku(v, 4), lambda p_s: jbn.convert.from_haiku(*p_s), ()),
    ],
    ids=["torch", "keras", "haiku"],
)
def test_round_trips_keep_every_value(to, back, args):
    returned = back(to(VALUES))
    assert sorted(returned) == sorted(VALUES)
    for name, value in VALUES.items():
        np.testing.assert_array_equal(returned[name], value)


def test_names_and_shapes_of_each_library():
    assert sorted(jbn.convert.to_torch(VALUES)) == [
        "bias", "num_batches_tracked", "running_mean", "running_var", "weight"
    ]  # fmt: skip
    assert sorted(jbn.convert.to_keras(VALUES)) == ["beta", "gamma", "moving_mean", "moving_variance"]
    params, state = jbn.convert.to_haiku(VALUES, 4, name="bn")
    assert params["bn"]["scale"].shape == (1, 1, 1, 4) and sorted(params["bn"]) == ["offset", "scale"]
    assert sorted(state) == ["bn/~/mean_ema", "bn/~/var_ema"]
    assert jbn.convert.torch_momentum(0.1) == pytest.approx(0.9)


def test_missing_entries_are_named():
    with pytest.raises(KeyError, match=r"PyTorch state dict has no \['bn.running_var'\]"):
        jbn.convert.from_torch({"bn.running_mean": np.zeros(3)}, prefix="bn.")
    with pytest.raises(KeyError, match=r"jbn's values are 'mean', 'var' and optionally"):
        jbn.convert.to_keras({"mean": np.zeros(3)})
    with pytest.raises(KeyError, match=r"no 'batch_norm/~/mean_ema'"):
        jbn.convert.from_haiku({}, {"other/~/mean_ema": {}})


def test_keras_outputs_need_keras_epsilon():
    x = RNG.normal(size=(6, 4)).astype(np.float32)
    values = jbn.convert.from_keras(jbn.convert.to_keras(VALUES | {"var": np.full(4, 1e-3, np.float32)}))
    keras_formula = (x - values["mean"]) / np.sqrt(values["var"] + 1e-3) * values["scale"] + values["bias"]
    np.testing.assert_allclose(_jbn_eval(values, x, epsilon=jbn.convert.KERAS_EPSILON), keras_formula, rtol=1e-5)
    assert not np.allclose(_jbn_eval(values, x), keras_formula, rtol=1e-2)  # jbn's default epsilon differs


def test_a_trained_pytorch_batch_norm_converts_with_its_eval_outputs():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    layer = torch.nn.BatchNorm2d(4, momentum=0.1)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    layer.train()
    for _ in range(3):
        layer(torch.randn(8, 4, 5, 5) * 2 + 1)
    layer.eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = layer(x).numpy()
    state_dict = {key: value.detach().numpy() for key, value in layer.state_dict().items()}
    values = jbn.convert.from_torch(state_dict)
    np.testing.assert_allclose(_jbn_eval(values, jnp.asarray(x.numpy()), feature_axes=1), expected, atol=1e-5)

    fresh = torch.nn.BatchNorm2d(4)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in jbn.convert.to_torch(values, 3).items()})
    fresh.eval()
    with torch.no_grad():
        np.testing.assert_allclose(fresh(x).numpy(), expected, atol=1e-6)

    # One training step: the same running mean with momentum 0.1 -> 0.9; the variance differs by n / (n - 1).
    batch = torch.randn(8, 4, 5, 5)
    fresh.train()
    fresh(batch)
    _, new_state = jbn.batch_norm(
        jnp.asarray(batch.numpy()),
        jbn.BatchNormState(jnp.asarray(values["mean"]), jnp.asarray(values["var"])),
        training=True,
        momentum=jbn.convert.torch_momentum(0.1),
        feature_axes=1,
    )
    np.testing.assert_allclose(new_state.mean, fresh.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    n = 8 * 5 * 5
    batch_var = batch.numpy().var((0, 2, 3))
    np.testing.assert_allclose(
        fresh.running_var.numpy() - np.asarray(new_state.var), 0.1 * batch_var / (n - 1), rtol=1e-3, atol=1e-6
    )


def test_a_trained_haiku_batch_norm_converts_with_its_eval_outputs():
    hk = pytest.importorskip("haiku")
    transformed = hk.transform_with_state(lambda x, training: hk.BatchNorm(True, True, 0.9)(x, training))
    x = jnp.asarray(RNG.normal(size=(8, 3, 3, 4)) * 2 + 1, jnp.float32)
    params, state = transformed.init(jax.random.key(0), x, True)
    params = jax.tree.map(lambda p: p + 0.3, params)
    for _ in range(3):
        _, state = transformed.apply(params, state, None, x * 1.5, True)
    expected, _ = transformed.apply(params, state, None, x, False)
    values = jbn.convert.from_haiku(params, state)
    np.testing.assert_allclose(_jbn_eval(values, x), expected, rtol=1e-5, atol=1e-5)
    params_back, state_back = jbn.convert.to_haiku(values, x.ndim)
    round_trip, _ = transformed.apply(params_back, state_back, None, x, False)
    np.testing.assert_allclose(round_trip, expected, rtol=1e-5, atol=1e-5)
