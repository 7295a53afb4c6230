"""jbn.precise_statistics: exact population statistics over batches, for BatchNormStates and Flax models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
import jbn.linen
from tests.helpers import data

# Batches of different sizes (the last one short), far from zero and spread differently.
BATCHES = [data((n, 3), seed=n, offset=100.0 + n, spread=1.0 + n / 4) for n in (8, 8, 8, 5)]


@pytest.mark.parametrize("mode", ["ema", "debiased_ema", "cumulative"])
def test_population_statistics_of_a_state_are_those_of_all_rows(mode):
    state = jbn.batch_norm_state(3, counted=mode != "ema")
    state = state._replace(mean=jnp.full(3, 50.0))  # the current running values do not matter

    def update(state, x):
        return jbn.batch_norm(x, state, training=True, momentum=0.9, running_average=mode)[1]

    precise = jbn.precise_statistics(update, state, BATCHES, momentum=0.9)
    everything = np.concatenate([np.asarray(b, np.float64) for b in BATCHES])
    np.testing.assert_allclose(precise.mean, everything.mean(0), rtol=1e-6)
    np.testing.assert_allclose(precise.var, everything.var(0), rtol=1e-4)
    if mode != "ema":
        np.testing.assert_array_equal(precise.count, [4, 4, 4])


class _Model(nn.Module):
    @nn.compact
    def __call__(self, x, training: bool):
        h = nn.Dense(4)(x)
        h = nn.BatchNorm(use_running_average=not training, momentum=0.9)(h)  # Flax's own layer
        h = nn.relu(h)
        h = nn.Dense(2)(h)
        return jbn.linen.BatchNorm(use_running_average=not training, momentum=0.9)(h), (x, h)


def test_every_batch_norm_of_a_flax_model_gets_its_inputs_population_statistics():
    # Full float32 products: a GPU's default (TensorFloat-32) would round the Dense layers' products to ~1e-3.
    with jax.default_matmul_precision("highest"):
        model = _Model()
        variables = model.init(jax.random.key(0), BATCHES[0], True)
        params = variables["params"]

        def update(batch_stats, x):
            _, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, True, mutable=["batch_stats"])
            return updates["batch_stats"]

        precise = jbn.precise_statistics(update, variables["batch_stats"], BATCHES, momentum=0.9)
        first_inputs = np.concatenate([np.asarray(b) @ np.asarray(params["Dense_0"]["kernel"]) for b in BATCHES])
        first_inputs = first_inputs + np.asarray(params["Dense_0"]["bias"])
        np.testing.assert_allclose(precise["BatchNorm_0"]["mean"], first_inputs.mean(0), rtol=1e-5, atol=1e-4)
        # Flax's own layer computes its batch variance with E[x^2] - E[x]^2: good to about 1e-3 on these inputs.
        np.testing.assert_allclose(precise["BatchNorm_0"]["var"], first_inputs.var(0), rtol=1e-3)

        # The second layer's input depends on the first's batch statistics in training mode; check it against the
        # inputs that the same training-mode passes produce.
        second = np.concatenate(
            [np.asarray(model.apply(variables, b, True, mutable=["batch_stats"])[0][1][1]) for b in BATCHES]
        )
        np.testing.assert_allclose(precise["BatchNorm_1"]["mean"], second.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(precise["BatchNorm_1"]["var"], second.var(0), rtol=1e-4)


def test_empty_batches_and_momentum_1_are_errors():
    update = lambda state, x: jbn.batch_norm(x, state, training=True)[1]  # noqa: E731
    with pytest.raises(ValueError, match=r"`batches` is empty"):
        jbn.precise_statistics(update, jbn.batch_norm_state(3), [])
    with pytest.raises(ValueError, match=r"`momentum`=1 never moves the statistics"):
        jbn.precise_statistics(update, jbn.batch_norm_state(3), BATCHES, momentum=1.0)
