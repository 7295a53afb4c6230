"""The running averages of batch norm: Flax's EMA, Haiku's zero-debiased EMA, PyTorch's cumulative average."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
import jbn.linen
import jbn.nnx
from tests.helpers import data

MOMENTUM = 0.9


def _expected(batches, mode, initial_mean=0.0, initial_var=1.0):
    """float64: the running (mean, var) after `batches`, from their biased statistics."""
    mean, var, hidden_mean, hidden_var = initial_mean, initial_var, 0.0, 0.0
    for t, batch in enumerate(batches, start=1):
        batch = np.asarray(batch, np.float64)
        batch_mean, batch_var = batch.mean(0), batch.var(0)
        if mode == "ema":
            mean, var = MOMENTUM * mean + (1 - MOMENTUM) * batch_mean, MOMENTUM * var + (1 - MOMENTUM) * batch_var
        elif mode == "debiased_ema":  # Haiku's: an EMA started at 0, divided by 1 - momentum^t
            hidden_mean = MOMENTUM * hidden_mean + (1 - MOMENTUM) * batch_mean
            hidden_var = MOMENTUM * hidden_var + (1 - MOMENTUM) * batch_var
            mean, var = hidden_mean / (1 - MOMENTUM**t), hidden_var / (1 - MOMENTUM**t)
        else:  # the mean of the batches' statistics
            mean = (mean * (t - 1) + batch_mean) / t if t > 1 else batch_mean
            var = (var * (t - 1) + batch_var) / t if t > 1 else batch_var
    return mean, var


BATCHES = [data((6, 3), seed=s, offset=s, spread=1 + s) for s in range(4)]


@pytest.mark.parametrize("mode", ["ema", "debiased_ema", "cumulative"])
def test_running_statistics_after_several_batches_match_the_formula(mode):
    state = jbn.batch_norm_state(3, counted=True)
    step = jax.jit(lambda x, s: jbn.batch_norm(x, s, training=True, momentum=MOMENTUM, running_average=mode)[1])
    for batch in BATCHES:
        state = step(batch, state)
    mean, var = _expected(BATCHES, mode)
    np.testing.assert_allclose(state.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.var, var, rtol=1e-5)
    np.testing.assert_array_equal(state.count, [4, 4, 4])


def test_the_debiased_average_at_momentum_one_is_its_limit_the_cumulative_mean():
    """(1 - m) / (1 - m^t) is 0 / 0 at m = 1 (Haiku's average gives NaN there); its limit is 1 / t."""
    state = jbn.batch_norm_state(3, counted=True)
    for batch in BATCHES:
        _, state = jbn.batch_norm(batch, state, training=True, momentum=1.0, running_average="debiased_ema")
    mean, var = _expected(BATCHES, "cumulative")
    np.testing.assert_allclose(state.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.var, var, rtol=1e-5)


@pytest.mark.parametrize("mode", ["debiased_ema", "cumulative"])
def test_the_first_batch_replaces_any_initial_statistics_exactly(mode):
    """Equinox debiases a variance that starts at 1 as if it started at 0: wrong after one step. Not here."""
    state = jbn.BatchNormState(jnp.full(3, 5.0), jnp.full(3, 7.0), jnp.zeros(3, jnp.int32))
    _, state = jbn.batch_norm(BATCHES[0], state, training=True, momentum=0.99, running_average=mode)
    mean, var = jbn.moments(BATCHES[0], 0)
    np.testing.assert_array_equal(state.mean, mean)
    np.testing.assert_array_equal(state.var, var)


def test_a_feature_without_data_keeps_its_count_and_statistics():
    state = jbn.batch_norm_state(3, counted=True)
    mask = jnp.array([[True, True, False]])
    _, state = jbn.batch_norm(BATCHES[0], state, training=True, mask=mask, running_average="cumulative")
    np.testing.assert_array_equal(state.count, [1, 1, 0])
    np.testing.assert_array_equal(state.mean[2], 0.0)
    np.testing.assert_array_equal(state.var[2], 1.0)


@pytest.mark.parametrize(
    ("state", "mode", "message"),
    [
        (jbn.batch_norm_state(3), "cumulative", r"`running_average`='cumulative' counts the batches, but `state`"),
        (jbn.batch_norm_state(3, counted=True), "mean", r"`running_average`='mean' is not one of"),
        (
            jbn.BatchNormState(jnp.zeros(3), jnp.ones(3), jnp.zeros(3)),
            "debiased_ema",
            r"`state.count` has shape \(3,\) and dtype float32; it must be integer",
        ),
    ],
)
def test_bad_running_averages_are_named(state, mode, message):
    with pytest.raises(ValueError, match=message):
        jbn.batch_norm(BATCHES[0], state, training=True, running_average=mode)


def test_linen_and_nnx_layers_keep_a_count_only_when_they_need_one():
    x = BATCHES[0]
    plain = jbn.linen.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    assert sorted(plain["batch_stats"]) == ["mean", "var"]
    layer = jbn.linen.BatchNorm(use_running_average=False, momentum=MOMENTUM, running_average="debiased_ema")
    variables = layer.init(jax.random.key(0), x)
    for batch in BATCHES:
        _, updates = layer.apply(variables, batch, mutable=["batch_stats"])
        variables = {**variables, **updates}
    mean, var = _expected(BATCHES, "debiased_ema")
    np.testing.assert_allclose(variables["batch_stats"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(variables["batch_stats"]["count"], [4, 4, 4])

    module = jbn.nnx.BatchNorm(3, momentum=MOMENTUM, running_average="cumulative", rngs=nnx.Rngs(0))
    assert jbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0)).count is None
    for batch in BATCHES:
        module(batch)
    mean, var = _expected(BATCHES, "cumulative")
    np.testing.assert_allclose(module.var[...], var, rtol=1e-5)
    np.testing.assert_array_equal(module.count[...], [4, 4, 4])
