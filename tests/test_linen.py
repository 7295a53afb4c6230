"""jbn.linen against flax.linen: same attributes, same variables, same outputs; Flax's transforms; swaps."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbn.linen
from tests.helpers import data

BF16 = jnp.bfloat16
# (class name, attributes, input shape, mask shape or None)
CONFIGS = [
    ("BatchNorm", {}, (8, 3), None),
    ("BatchNorm", {"axis": 1, "momentum": 0.9}, (4, 3, 5), None),
    ("BatchNorm", {"axis": (1, 3), "use_bias": False}, (4, 5, 2, 3), None),
    ("BatchNorm", {"use_scale": False, "epsilon": 1e-3}, (4, 2, 2, 3), (4, 2, 2, 1)),
    ("BatchNorm", {"dtype": BF16, "param_dtype": BF16}, (8, 3), None),
    ("LayerNorm", {}, (4, 6), None),
    ("LayerNorm", {"reduction_axes": (1, 2), "feature_axes": (1, 2)}, (2, 3, 4), (2, 3, 1)),
    ("LayerNorm", {"use_bias": False, "use_scale": False}, (4, 6), None),
    ("LayerNorm", {"param_dtype": BF16}, (4, 6), None),
    ("RMSNorm", {}, (4, 6), None),
    ("RMSNorm", {"use_scale": False, "dtype": BF16}, (4, 6), (4, 1)),
    ("InstanceNorm", {}, (2, 4, 4, 3), None),
    ("InstanceNorm", {"feature_axes": 1, "use_bias": False}, (2, 3, 5), None),
    ("GroupNorm", {"num_groups": 4}, (2, 3, 3, 8), None),
    ("GroupNorm", {"num_groups": None, "group_size": 2, "use_scale": False}, (2, 5, 6), (2, 5, 6)),
    ("GroupNorm", {"num_groups": 2, "reduction_axes": (2, 3)}, (2, 3, 3, 8), None),
]
IDS = [f"{name}-{'-'.join(map(str, attrs)) or 'default'}" for name, attrs, _, _ in CONFIGS]


def _layers(name, attrs):
    flax_attrs = {**attrs, "use_fast_variance": False}  # Flax's exact variance, to compare numerics
    return getattr(nn, name)(**flax_attrs), getattr(jbn.linen, name)(**attrs)


def _call_kwargs(name, training, mask):
    kwargs = {} if mask is None else {"mask": mask}
    if name == "BatchNorm":
        kwargs["use_running_average"] = not training
    return kwargs


def _tolerance(attrs):
    return {"rtol": 2e-2, "atol": 2e-2} if BF16 in attrs.values() else {"rtol": 1e-5, "atol": 1e-5}


def test_attributes_match_flax():
    for name in ("BatchNorm", "LayerNorm", "RMSNorm", "InstanceNorm", "GroupNorm"):
        ours, theirs = getattr(jbn.linen, name)(), getattr(nn, name)()
        assert isinstance(ours, type(theirs))
        ours_fields = {f: getattr(ours, f) for f in theirs.__dataclass_fields__ if f not in ("parent", "name")}
        theirs_fields = {f: getattr(theirs, f) for f in ours_fields}
        assert ours_fields.pop("use_fast_variance") is False and theirs_fields.pop("use_fast_variance") is True
        assert ours_fields == theirs_fields, name


@pytest.mark.parametrize(("name", "attrs", "shape", "mask_shape"), CONFIGS, ids=IDS)
def test_variables_and_outputs_match_flax(name, attrs, shape, mask_shape):
    theirs, ours = _layers(name, attrs)
    x = data(shape, offset=1.0)
    mask = None if mask_shape is None else data(mask_shape, seed=5) > -0.5
    kwargs = _call_kwargs(name, training=True, mask=mask)
    if name == "GroupNorm" and mask is not None:  # Flax reshapes the mask: it must be full-sized there
        mask = jnp.broadcast_to(mask, shape)
    their_vars = theirs.init(jax.random.key(0), x, **kwargs)
    our_vars = ours.init(jax.random.key(0), x, **kwargs)
    chex.assert_trees_all_equal(our_vars, their_vars)  # structure, shapes, dtypes and initial values

    their_vars = jax.tree.map(lambda v: v + 0.1 * jnp.arange(v.size, dtype=v.dtype).reshape(v.shape), their_vars)
    mutable = ["batch_stats"] if name == "BatchNorm" else False
    for step in range(3):
        x = data(shape, seed=step, offset=step + 0.5)
        theirs_out = theirs.apply(their_vars, x, **kwargs, mutable=mutable)
        ours_out = ours.apply(their_vars if step == 0 else our_vars, x, **kwargs, mutable=mutable)
        if mutable:
            (theirs_y, their_updates), (ours_y, our_updates) = theirs_out, ours_out
            their_vars, our_vars = {**their_vars, **their_updates}, {**their_vars, **our_updates}
        else:
            theirs_y, ours_y, our_vars = theirs_out, ours_out, their_vars
        assert ours_y.dtype == theirs_y.dtype
        assert np.isfinite(np.float32(ours_y)).all()
        selected = np.ones(shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), shape)
        # Where a mask selects nothing for an example, Flax divides 0 by 0; those outputs are not compared.
        np.testing.assert_allclose(np.float32(ours_y)[selected], np.float32(theirs_y)[selected], **_tolerance(attrs))
    chex.assert_trees_all_close(our_vars, their_vars, rtol=1e-5, atol=1e-6)
    if name == "BatchNorm":
        eval_kwargs = _call_kwargs(name, training=False, mask=None)
        np.testing.assert_allclose(
            np.float32(ours.apply(our_vars, x, **eval_kwargs)),
            np.float32(theirs.apply(their_vars, x, **eval_kwargs)),
            **_tolerance(attrs),
        )


def test_checkpoints_swap_both_ways():
    x = data((8, 4), offset=2.0)
    theirs, ours = nn.BatchNorm(), jbn.linen.BatchNorm()
    flax_vars = theirs.init(jax.random.key(1), x, use_running_average=False)
    _, trained = theirs.apply(flax_vars, x, use_running_average=False, mutable=["batch_stats"])
    flax_vars = {**flax_vars, **trained}
    eval_x = data((8, 4), seed=3)
    flax_eval = theirs.apply(flax_vars, eval_x, use_running_average=True)
    np.testing.assert_allclose(ours.apply(flax_vars, eval_x, use_running_average=True), flax_eval, rtol=1e-6)
    _, our_trained = ours.apply(flax_vars, x, use_running_average=False, mutable=["batch_stats"])
    our_vars = {**flax_vars, **our_trained}
    np.testing.assert_allclose(
        theirs.apply(our_vars, eval_x, use_running_average=True),
        ours.apply(our_vars, eval_x, use_running_average=True),
        rtol=1e-6,
    )


def test_init_does_not_update_statistics_and_ignores_axis_name():
    layer = jbn.linen.BatchNorm(use_running_average=False, axis_name="batch")
    variables = layer.init(jax.random.key(0), data((8, 3), offset=5.0))  # no "batch" axis exists here
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.0)
    np.testing.assert_array_equal(variables["batch_stats"]["var"], 1.0)


def test_use_running_average_in_both_places_is_an_error():
    layer = jbn.linen.BatchNorm(use_running_average=True)
    x = data((4, 3))
    with pytest.raises(ValueError, match="use_running_average"):
        layer.init(jax.random.key(0), x, use_running_average=False)


def test_offset_data_exact_where_flax_default_is_not():
    x = data((64, 4, 4, 8), offset=1e4)
    x64 = np.asarray(x, np.float64)
    exact = (x64 - x64.mean((0, 1, 2))) / np.sqrt(x64.var((0, 1, 2)) + 1e-5)
    errors = {}
    for module in (nn.BatchNorm(use_running_average=False), jbn.linen.BatchNorm(use_running_average=False)):
        y, _ = module.apply(module.init(jax.random.key(0), x), x, mutable=["batch_stats"])
        errors[type(module).__module__] = np.abs(np.asarray(y, np.float64) - exact).max()
    assert errors["flax.linen.normalization"] > 100
    assert errors["jbn.linen"] < 1e-3


def test_use_fast_variance_reproduces_flax_default():
    x = data((64, 8), offset=1e4)
    theirs, ours = nn.LayerNorm(reduction_axes=0), jbn.linen.LayerNorm(reduction_axes=0, use_fast_variance=True)
    variables = theirs.init(jax.random.key(0), x)
    np.testing.assert_allclose(ours.apply(variables, x), theirs.apply(variables, x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("layer", "shape", "message"),
    [
        (jbn.linen.GroupNorm(num_groups=3), (2, 8), "`num_groups`=3 does not divide the 8 channels"),
        (jbn.linen.GroupNorm(num_groups=2, group_size=4), (2, 8), "Give exactly one of `num_groups`"),
        (jbn.linen.GroupNorm(num_groups=2, reduction_axes=(1,)), (2, 3, 8), "must include the channel axis -1"),
        (jbn.linen.InstanceNorm(feature_axes=0), (2, 3, 8), "includes axis 0"),
        (jbn.linen.LayerNorm(force_float32_reductions=False), (2, 8), "`force_float32_reductions=False`"),
    ],
)
def test_bad_configurations_raise_jbn_errors_at_init(layer, shape, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        layer.init(jax.random.key(0), jnp.ones(shape))


def test_state_of_another_layer_is_rejected():
    layer = jbn.linen.BatchNorm(use_running_average=True)
    variables = layer.init(jax.random.key(0), jnp.ones((2, 3)))
    variables = {**variables, "batch_stats": {"mean": jnp.zeros(4), "var": jnp.ones(4)}}
    with pytest.raises(ValueError, match=r"`state.mean` has shape \(4,\)"):
        layer.apply(variables, jnp.ones((2, 3)))


class _Net(nn.Module):
    """Dense + jbn BatchNorm, to run under Flax's lifted transforms."""

    @nn.compact
    def __call__(self, x, train):
        return jbn.linen.BatchNorm(use_running_average=not train, momentum=0.5)(nn.Dense(3)(x))


@pytest.mark.parametrize("transform", ["jit", "remat"])
def test_lifted_jit_and_remat(transform):
    wrapped = getattr(nn, transform)(_Net, static_argnums=(2,))
    x = data((8, 4))
    variables = _Net().init(jax.random.key(0), x, True)
    y, updates = wrapped().apply(variables, x, True, mutable=["batch_stats"])
    expected_y, expected_updates = _Net().apply(variables, x, True, mutable=["batch_stats"])
    # One compiled program rounds a little differently from op-by-op dispatch on a GPU (fused multiply-adds).
    np.testing.assert_allclose(y, expected_y, rtol=1e-5)
    chex.assert_trees_all_close(updates, expected_updates)


def test_lifted_scan_threads_batch_stats():
    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            def body(module, carry, _):
                return jbn.linen.BatchNorm(use_running_average=False, momentum=0.5)(carry) * 2 + 1, None

            scan = nn.scan(body, variable_axes={"params": 0, "batch_stats": 0}, split_rngs={"params": True}, length=3)
            return scan(self, x, None)[0]

    x = data((8, 3), offset=2.0)
    variables = Stack().init(jax.random.key(0), x)
    y, updates = Stack().apply(variables, x, mutable=["batch_stats"])
    assert updates["batch_stats"]["BatchNorm_0"]["mean"].shape == (3, 3)  # one layer per scan step
    expected = x
    for _ in range(3):
        expected = (
            jbn.batch_norm(expected, jbn.batch_norm_state(3), jnp.ones(3), jnp.zeros(3), training=True)[0] * 2 + 1
        )
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_lifted_vmap_with_axis_name_pools_over_the_mapped_axis():
    mapped = nn.vmap(
        jbn.linen.BatchNorm,
        in_axes=0,
        out_axes=0,
        variable_axes={"params": None, "batch_stats": None},
        split_rngs={"params": False},
        axis_name="batch",
    )
    layer = mapped(use_running_average=False, axis_name="batch")
    x = data((8, 3), offset=1.0)
    variables = layer.init(jax.random.key(0), x)
    y, updates = layer.apply(variables, x, mutable=["batch_stats"])
    expected_y, expected_state = jbn.batch_norm(x, jbn.batch_norm_state(3), jnp.ones(3), jnp.zeros(3), training=True)
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], expected_state.mean, rtol=1e-6)


def _resnet_block(norms):
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            residual = x
            x = nn.Conv(8, (3, 3), use_bias=False)(x)
            x = nn.relu(norms.BatchNorm(use_running_average=not train)(x))
            x = nn.Conv(8, (3, 3), use_bias=False)(x)
            x = norms.GroupNorm(num_groups=4)(x)
            return nn.relu(x + residual).mean((1, 2)) @ jnp.ones((8, 1))

    return Block()


def _transformer_block(norms):
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = x + nn.MultiHeadDotProductAttention(num_heads=2, deterministic=True)(norms.LayerNorm()(x))
            x = x + nn.Dense(8)(nn.gelu(nn.Dense(16)(norms.RMSNorm()(x))))
            return norms.LayerNorm()(x).mean(1) @ jnp.ones((8, 1))

    return Block()


@pytest.mark.parametrize("make_block", [_resnet_block, _transformer_block], ids=["resnet", "transformer"])
def test_swapping_the_import_trains_identically(make_block):
    x = data((8, 4, 4, 8)) if make_block is _resnet_block else data((8, 5, 8))
    target = data((8, 1), seed=11)
    losses = {}
    for norms in (nn, jbn.linen):
        block = make_block(norms)
        variables = block.init(jax.random.key(0), x, False)
        params, stats = variables["params"], variables.get("batch_stats", {})
        optimizer = optax.sgd(0.05)
        opt_state = optimizer.init(params)

        @jax.jit
        def step(params, stats, opt_state, block=block, optimizer=optimizer):
            def loss_fn(params):
                y, updates = block.apply({"params": params, "batch_stats": stats}, x, True, mutable=["batch_stats"])
                return jnp.mean((y - target) ** 2), updates.get("batch_stats", {})

            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = optimizer.update(grads, opt_state)
            return optax.apply_updates(params, updates), stats, opt_state, loss

        losses[norms.__name__] = []
        for _ in range(4):
            params, stats, opt_state, loss = step(params, stats, opt_state)
            losses[norms.__name__].append(float(loss))
    np.testing.assert_allclose(losses["jbn.linen"], losses["flax.linen"], rtol=1e-4)
    assert losses["jbn.linen"][-1] < losses["jbn.linen"][0]


def test_integer_input_is_computed_in_float32_as_in_flax():
    x = jnp.arange(12, dtype=jnp.int32).reshape(4, 3)
    theirs, ours = nn.LayerNorm(use_fast_variance=False), jbn.linen.LayerNorm()
    variables = theirs.init(jax.random.key(0), x)
    expected = theirs.apply(variables, x)
    got = ours.apply(variables, x)
    assert got.dtype == expected.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6)


VARIANTS = [
    ("BatchRenorm", {"rmax": 2.0, "dmax": 1.0}, jbn.batch_renorm),
    ("GhostBatchNorm", {"virtual_batch_size": 4}, jbn.ghost_batch_norm),
]


@pytest.mark.parametrize(("name", "extra", "function"), VARIANTS, ids=[v[0] for v in VARIANTS])
def test_batch_norm_variants_call_their_function_and_share_batch_norms_variables(name, extra, function):
    x = data((8, 3), offset=1.0)
    layer = getattr(jbn.linen, name)(use_running_average=False, momentum=0.9, **extra)
    variables = layer.init(jax.random.key(0), x[:3])  # init takes any batch size
    assert isinstance(layer, jbn.linen.BatchNorm)
    chex.assert_trees_all_equal_shapes(
        variables, jbn.linen.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    )
    state = jbn.BatchNormState(jnp.full(3, 2.0), jnp.full(3, 0.25))  # far from the batch: renorm's r, d clip
    variables = {**variables, "batch_stats": {"mean": state.mean, "var": state.var}}
    y, updates = layer.apply(variables, x, mutable=["batch_stats"])
    params = variables["params"]
    expected_y, expected_state = function(
        x, state, params["scale"], params["bias"], training=True, momentum=0.9, **extra
    )
    np.testing.assert_allclose(y, expected_y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], expected_state.mean, rtol=1e-6)
    frozen = getattr(jbn.linen, name)(use_running_average=True, **extra)
    np.testing.assert_array_equal(
        frozen.apply(variables, x), jbn.linen.BatchNorm(use_running_average=True).apply(variables, x)
    )
