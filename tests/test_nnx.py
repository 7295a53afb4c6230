"""jbn.nnx against flax.nnx: same constructors, same state, same outputs; nnx transforms; swaps."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn.nnx
from tests.helpers import data

BF16 = jnp.bfloat16
# (class name, constructor arguments, input shape, mask shape or None)
CONFIGS = [
    ("BatchNorm", {"num_features": 3}, (8, 3), None),
    ("BatchNorm", {"num_features": 3, "axis": 1, "momentum": 0.9, "use_bias": False}, (4, 3, 5), (4, 1, 5)),
    ("BatchNorm", {"num_features": 3, "use_scale": False, "dtype": BF16, "param_dtype": BF16}, (8, 3), None),
    ("LayerNorm", {"num_features": 6}, (4, 6), None),
    ("LayerNorm", {"num_features": 12, "reduction_axes": (1, 2), "feature_axes": (1, 2)}, (2, 3, 4), None),
    ("LayerNorm", {"num_features": 6, "use_bias": False, "param_dtype": BF16}, (4, 6), (4, 6)),
    ("RMSNorm", {"num_features": 6}, (4, 6), None),
    ("RMSNorm", {"num_features": 6, "use_scale": False, "dtype": BF16}, (4, 6), None),
    ("InstanceNorm", {"num_features": 3}, (2, 4, 4, 3), None),
    ("InstanceNorm", {"num_features": 3, "feature_axes": 1, "use_bias": False}, (2, 3, 5), None),
    ("GroupNorm", {"num_features": 8, "num_groups": 4}, (2, 3, 3, 8), None),
    ("GroupNorm", {"num_features": 6, "num_groups": None, "group_size": 2}, (2, 5, 6), (2, 5, 6)),
]
IDS = [f"{name}-{'-'.join(k for k in args if k != 'num_features') or 'default'}" for name, args, _, _ in CONFIGS]


def _pure(module):
    return nnx.to_pure_dict(nnx.state(module))


def _tolerance(args):
    return {"rtol": 2e-2, "atol": 2e-2} if BF16 in args.values() else {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize(("name", "args", "shape", "mask_shape"), CONFIGS, ids=IDS)
def test_state_and_outputs_match_flax(name, args, shape, mask_shape):
    theirs = getattr(nnx, name)(**args, use_fast_variance=False, rngs=nnx.Rngs(0))
    ours = getattr(jbn.nnx, name)(**args, rngs=nnx.Rngs(0))
    assert isinstance(ours, type(theirs))
    jax.tree.map(np.testing.assert_array_equal, _pure(ours), _pure(theirs))
    jax.tree.map(lambda a, b: assert_same_dtype(a, b), _pure(ours), _pure(theirs))
    perturbed = jax.tree.map(lambda v: v + 0.1 * jnp.arange(v.size, dtype=v.dtype).reshape(v.shape), _pure(theirs))
    for module in (theirs, ours):
        state = nnx.state(module)
        nnx.replace_by_pure_dict(state, perturbed)
        nnx.update(module, state)
    mask = None if mask_shape is None else data(mask_shape, seed=5) > -0.5
    kwargs = {} if mask is None else {"mask": mask}
    for step in range(3):
        x = data(shape, seed=step, offset=step + 0.5)
        ours_y, theirs_y = ours(x, **kwargs), theirs(x, **kwargs)
        assert ours_y.dtype == theirs_y.dtype
        selected = np.ones(shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), shape)
        np.testing.assert_allclose(np.float32(ours_y)[selected], np.float32(theirs_y)[selected], **_tolerance(args))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), _pure(ours), _pure(theirs))
    if name == "BatchNorm":
        ours.eval()
        theirs.eval()
        np.testing.assert_allclose(np.float32(ours(x)), np.float32(theirs(x)), **_tolerance(args))


def assert_same_dtype(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape


def test_train_eval_and_call_time_flag():
    layer = jbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    x = data((8, 3), offset=4.0)
    layer.eval()
    layer(x)
    np.testing.assert_array_equal(layer.mean[...], 0.0)  # eval: statistics untouched
    layer(x, use_running_average=False)  # the call's flag wins over the attribute
    assert float(layer.mean[0]) > 0.0
    layer.train()
    before = np.asarray(layer.mean[...])
    layer(x)
    assert not np.allclose(layer.mean[...], before)


def test_checkpoints_swap_both_ways():
    x = data((8, 4), offset=2.0)
    theirs, ours = nnx.BatchNorm(4, rngs=nnx.Rngs(0)), jbn.nnx.BatchNorm(4, rngs=nnx.Rngs(1))
    theirs(x)
    nnx.update(ours, nnx.state(theirs))
    theirs.eval()
    ours.eval()
    eval_x = data((8, 4), seed=3)
    np.testing.assert_allclose(ours(eval_x), theirs(eval_x), rtol=1e-6)
    ours(x, use_running_average=False)
    nnx.update(theirs, nnx.state(ours))
    np.testing.assert_allclose(theirs(eval_x), ours(eval_x), rtol=1e-6)


def test_jit_and_grad_thread_the_statistics():
    model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), jbn.nnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0)))
    x, target = data((8, 4)), data((8, 3), seed=2)

    @nnx.jit
    def step(model, x):
        def loss_fn(model):
            return jnp.mean((model(x) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        return loss, grads

    loss, grads = step(model, x)
    assert np.isfinite(float(loss))
    assert grads.layers[0].kernel[...].shape == (4, 3)
    assert float(jnp.abs(model.layers[1].mean[...]).sum()) > 0  # updated inside nnx.jit


def test_nnx_vmap_with_axis_name_works_on_repeated_calls():
    """Each call pools over the mapped axis and updates the one shared set of statistics."""
    layer = jbn.nnx.BatchNorm(3, axis_name="batch", rngs=nnx.Rngs(0))
    x = data((8, 3), offset=1.0)

    @nnx.vmap(in_axes=(None, 0), out_axes=0, axis_name="batch")
    def apply(layer, xi):
        return layer(xi)

    state = jbn.batch_norm_state(3)
    for _ in range(2):
        y = apply(layer, x)
        expected, state = jbn.batch_norm(x, state, jnp.ones(3), jnp.zeros(3), training=True)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.mean[...], state.mean, rtol=1e-6)


def test_nnx_scan_over_layers():
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return jbn.nnx.LayerNorm(4, rngs=nnx.Rngs(key))

    stack = make(jax.random.split(jax.random.key(0), 3))

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def forward(layer, x):
        return layer(x) * 2.0 + 1.0

    x = data((5, 4), offset=3.0)
    expected = x
    for _ in range(3):
        expected = jbn.layer_norm(expected) * 2.0 + 1.0
    np.testing.assert_allclose(forward(stack, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: jbn.nnx.GroupNorm(8, num_groups=3, rngs=nnx.Rngs(0)), "`num_groups`=3 does not divide the 8 channels"),
        (lambda: jbn.nnx.GroupNorm(8, num_groups=None, rngs=nnx.Rngs(0)), "Give exactly one of `num_groups`"),
    ],
)
def test_bad_configurations_raise_jbn_errors_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_mismatched_feature_size_raises_a_jbn_error():
    layer = jbn.nnx.LayerNorm(4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`scale` has shape \(4,\), but x of shape \(2, 3\)"):
        layer(jnp.ones((2, 3)))


def test_missing_use_running_average_is_an_error():
    layer = jbn.nnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs `use_running_average`"):
        layer(jnp.ones((2, 3)))


def test_offset_data_exact_where_flax_default_is_not():
    x = data((256, 8), offset=1e4)
    x64 = np.asarray(x, np.float64)
    exact = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    flax_error = np.abs(np.asarray(nnx.BatchNorm(8, rngs=nnx.Rngs(0))(x), np.float64) - exact).max()
    jbn_error = np.abs(np.asarray(jbn.nnx.BatchNorm(8, rngs=nnx.Rngs(0))(x), np.float64) - exact).max()
    assert flax_error > 100
    assert jbn_error < 1e-3


VARIANTS = [
    ("BatchRenorm", {"rmax": 2.0, "dmax": 1.0}, jbn.batch_renorm),
    ("GhostBatchNorm", {"virtual_batch_size": 4}, jbn.ghost_batch_norm),
]


@pytest.mark.parametrize(("name", "extra", "function"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_batch_norm_variants_call_their_function_and_share_batch_norms_state(name, extra, function):
    x = data((8, 3), offset=1.0)
    layer = getattr(jbn.nnx, name)(3, momentum=0.9, rngs=nnx.Rngs(0), **extra)
    plain = jbn.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    assert isinstance(layer, jbn.nnx.BatchNorm)
    assert jax.tree.map(jnp.shape, nnx.state(layer)) == jax.tree.map(jnp.shape, nnx.state(plain))
    state = jbn.BatchNormState(jnp.full(3, 2.0), jnp.full(3, 0.25))
    layer.mean[...], layer.var[...] = state.mean, state.var
    y = layer(x)
    expected_y, expected_state = function(
        x, state, layer.scale[...], layer.bias[...], training=True, momentum=0.9, **extra
    )
    np.testing.assert_allclose(y, expected_y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.mean[...], expected_state.mean, rtol=1e-6)
    layer.eval()
    plain.mean[...], plain.var[...] = layer.mean[...], layer.var[...]
    plain.eval()
    np.testing.assert_array_equal(layer(x), plain(x))
