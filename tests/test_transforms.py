"""jbn under jit, grad, vmap (with and without axis_name), lax.scan, shard_map and pmap."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jbn
from tests import reference
from tests.helpers import cpu_devices, cpu_mesh, data, f64

pytestmark = pytest.mark.usefixtures("cpu_or_gpu_statistics")

STATE = jbn.BatchNormState(jnp.array([0.5, -0.5, 1.0]), jnp.array([1.5, 0.5, 2.0]))
SCALE, BIAS = jnp.array([1.0, 2.0, 0.5]), jnp.array([0.1, -0.2, 0.3])


def _batch_norm(x, **kwargs):
    return jbn.batch_norm(x, STATE, SCALE, BIAS, training=True, momentum=0.8, **kwargs)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_vmap_with_axis_name_equals_whole_batch(offset):
    x = data((8, 3), offset=offset)
    y, state = jax.vmap(functools.partial(_batch_norm, axis_name="batch"), axis_name="batch", out_axes=(0, None))(x)
    expected_y, expected_state = _batch_norm(x)
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(state.mean, expected_state.mean, rtol=1e-6)
    np.testing.assert_allclose(state.var, expected_state.var, rtol=1e-5)


def test_vmap_gradients_equal_whole_batch_gradients():
    x = data((8, 3), offset=1.0)
    weights = data((8, 3), seed=3)

    def loss(x, scale, bias, axis_name=None):
        y, _ = jbn.batch_norm(x, STATE, scale, bias, training=True, axis_name=axis_name)
        return jnp.sum(jnp.sin(y) * weights) if axis_name is None else jnp.sum(jnp.sin(y))

    def mapped_loss(x, scale, bias):
        def per_example(xi, wi):
            y, _ = jbn.batch_norm(xi, STATE, scale, bias, training=True, axis_name="batch")
            return jnp.sum(jnp.sin(y) * wi)

        return jnp.sum(jax.vmap(per_example, axis_name="batch")(x, weights))

    expected = jax.grad(loss, argnums=(0, 1, 2))(x, SCALE, BIAS)
    got = jax.grad(mapped_loss, argnums=(0, 1, 2))(x, SCALE, BIAS)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_vmap_without_axis_name_treats_each_example_as_its_batch():
    x = data((5, 3), offset=2.0)
    y, state = jax.vmap(_batch_norm)(x)
    np.testing.assert_allclose(y, jnp.broadcast_to(BIAS, (5, 3)), atol=1e-6)  # x - mean(x) = 0 for one example
    np.testing.assert_allclose(state.mean, 0.8 * STATE.mean[None] + 0.2 * x, rtol=1e-6)
    np.testing.assert_allclose(state.var, jnp.broadcast_to(0.8 * STATE.var, (5, 3)), rtol=1e-6)


def test_per_example_gradients_sum_to_the_batch_gradient():
    x = data((8, 3), offset=1.0)
    kernel = data((3, 3), seed=5)

    def example_loss(kernel, xi):
        y, _ = jbn.batch_norm(xi @ kernel, STATE, SCALE, BIAS, training=True, axis_name="batch")
        return jnp.sum(jnp.sin(y))

    def batch_loss(kernel):
        y, _ = jbn.batch_norm(x @ kernel, STATE, SCALE, BIAS, training=True)
        return jnp.sum(jnp.sin(y))

    per_example = jax.jit(jax.vmap(jax.grad(example_loss), in_axes=(None, 0), axis_name="batch"))(kernel, x)
    assert per_example.shape == (8, 3, 3)
    np.testing.assert_allclose(per_example.sum(0), jax.grad(batch_loss)(kernel), rtol=1e-4, atol=1e-5)


def test_vmap_over_an_ensemble_with_independent_states():
    x = data((4, 6, 3), offset=1.0)  # 4 models, a batch of 6 each
    states = jbn.BatchNormState(data((4, 3), seed=2), 1.0 + jnp.abs(data((4, 3), seed=3)))
    y, new = jax.jit(jax.vmap(lambda x, s: jbn.batch_norm(x, s, training=True)))(x, states)
    for model in range(4):
        ref_y, ref_mean, ref_var = reference.batch_norm(
            f64(x[model]), states.mean[model], states.var[model], training=True
        )
        np.testing.assert_allclose(f64(y[model]), ref_y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(new.mean[model], ref_mean, rtol=1e-5)
        np.testing.assert_allclose(new.var[model], ref_var, rtol=1e-5)


def test_scan_over_steps_threads_the_state():
    batches = data((5, 8, 3), offset=3.0)

    def step(state, x):
        y, state = jbn.batch_norm(x, state, training=True, momentum=0.9)
        return state, y

    final, ys = jax.jit(lambda b: jax.lax.scan(step, jbn.batch_norm_state(3), b))(batches)
    state = jbn.batch_norm_state(3)
    for i in range(5):
        y, state = jbn.batch_norm(batches[i], state, training=True, momentum=0.9)
        np.testing.assert_allclose(ys[i], y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(final.mean, state.mean, rtol=1e-6)
    np.testing.assert_allclose(final.var, state.var, rtol=1e-6)


def test_training_flag_is_static_under_jit():
    step = jax.jit(jbn.batch_norm, static_argnames=("training",))
    x = data((8, 3))
    y_train, _ = step(x, STATE, training=True)
    y_eval, _ = step(x, STATE, training=False)
    assert not np.allclose(y_train, y_eval)


def _sharded(mesh, *arrays):
    return [jax.device_put(a, NamedSharding(mesh, P("devices"))) for a in arrays]


# Valid rows per device: 2, 4, 1, 0 (one device has no data at all).
VALID = np.array([1, 1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0], bool)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_shard_map_with_uneven_masked_shards_equals_single_device(offset):
    mesh = cpu_mesh()
    x = np.array(data((16, 3), offset=offset))
    x[~VALID] = np.nan  # padding rows may hold anything

    def sharded(x, valid):
        return _batch_norm(x, mask=valid[:, None], axis_name="devices")

    fn = jax.jit(
        jax.shard_map(sharded, mesh=mesh, in_specs=(P("devices"), P("devices")), out_specs=(P("devices"), P()))
    )
    y, state = fn(*_sharded(mesh, jnp.asarray(x), jnp.asarray(VALID)))
    expected_y, expected_state = _batch_norm(jnp.asarray(x[VALID]))
    np.testing.assert_allclose(np.asarray(y)[VALID], expected_y, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(state.mean, expected_state.mean, rtol=1e-6)
    np.testing.assert_allclose(state.var, expected_state.var, rtol=1e-5)


def test_shard_map_gradients_equal_single_device():
    mesh = cpu_mesh()
    x = data((16, 3), offset=1.0)
    weights = data((16, 3), seed=9)

    def local_loss(x, w, scale):
        y, _ = jbn.batch_norm(x, STATE, scale, BIAS, training=True, axis_name="devices")
        return jax.lax.psum(jnp.sum(jnp.sin(y) * w), "devices")

    sharded_loss = jax.shard_map(local_loss, mesh=mesh, in_specs=(P("devices"), P("devices"), P()), out_specs=P())
    x_s, w_s = _sharded(mesh, x, weights)
    got = jax.jit(jax.grad(sharded_loss, argnums=(0, 2)))(x_s, w_s, SCALE)

    def loss(x, scale):
        y, _ = jbn.batch_norm(x, STATE, scale, BIAS, training=True)
        return jnp.sum(jnp.sin(y) * weights)

    expected = jax.grad(loss, argnums=(0, 1))(x, SCALE)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(g), e, rtol=1e-4, atol=1e-5)


def test_pmap_equals_single_device():
    x = np.asarray(data((4, 4, 3), offset=2.0))
    y, state = jax.pmap(functools.partial(_batch_norm, axis_name="p"), axis_name="p", devices=cpu_devices())(x)
    expected_y, expected_state = _batch_norm(jnp.asarray(x.reshape(16, 3)))
    np.testing.assert_allclose(np.asarray(y).reshape(16, 3), expected_y, rtol=1e-5, atol=1e-5)
    for device in range(4):
        np.testing.assert_allclose(state.mean[device], expected_state.mean, rtol=1e-6, atol=1e-6)


def test_pmap_axis_index_groups_pool_within_groups():
    x = np.asarray(data((4, 4, 3), offset=2.0))
    fn = functools.partial(_batch_norm, axis_name="p", axis_index_groups=[[0, 1], [2, 3]])
    y, state = jax.pmap(fn, axis_name="p", devices=cpu_devices())(x)
    for group in ([0, 1], [2, 3]):
        expected_y, expected_state = _batch_norm(jnp.asarray(x[group].reshape(8, 3)))
        np.testing.assert_allclose(np.asarray(y)[group].reshape(8, 3), expected_y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state.var[group[0]], expected_state.var, rtol=1e-5)


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_other_norms_pool_under_vmap_axis_name(norm):
    x = data((4, 6, 8), offset=1.0)
    if norm == "layer":
        mapped = jax.vmap(lambda xi: jbn.layer_norm(xi, reduction_axes=(0, 1), axis_name="b"), axis_name="b")(x)
        expected = jbn.layer_norm(x, reduction_axes=(0, 1, 2))
    else:  # statistics of each group pooled over the mapped examples: batch-wide group statistics
        mapped = jax.vmap(lambda xi: jbn.group_norm(xi[None], num_groups=2, axis_name="b")[0], axis_name="b")(x)
        expected = jbn.group_norm(x.reshape(1, 24, 8), num_groups=2).reshape(4, 6, 8)
    np.testing.assert_allclose(mapped, expected, rtol=1e-5, atol=1e-5)
