"""jbn's closed-form derivative against autodiff of a plain float64 formula, and against a NumPy closed form.

Autodiff of the plain two-pass formula (written here, in float64) is the oracle for every transformation JAX
offers: reverse mode, forward mode, forward-over-reverse (Hessian-vector products), with masks, with a batch norm
feature that has no data (the running statistics' derivatives), and with epsilon traced.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jbn
from jbn import _fused, _kernel
from tests import reference
from tests.helpers import cpu_mesh, data, f64

MOMENTUM = 0.8


def _plain_standardize(x, axes, mask, epsilon, centered=True, fallback=None):
    """(x - mean) / sqrt(var + epsilon) by the textbook two-pass formula; differentiable, in x's dtype."""
    selected = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
    count = jnp.sum(selected, axes, keepdims=True)
    safe = jnp.maximum(count, 1)
    mean = jnp.sum(jnp.where(selected, x, 0), axes, keepdims=True) / safe if centered else jnp.zeros(())
    var = jnp.sum(jnp.where(selected, jnp.square(x - mean), 0), axes, keepdims=True) / safe
    if fallback is not None:
        mean, var = jnp.where(count > 0, mean, fallback[0]), jnp.where(count > 0, var, fallback[1])
    return (x - mean) / jnp.sqrt(var + epsilon), mean, var


def _plain(norm, x, scale, bias, state, mask, epsilon):
    """The norm `norm` in plain jnp, returning (y, batch-norm state or ())."""
    scale, bias = scale.reshape(1, 1, -1), bias.reshape(1, 1, -1)
    if norm == "batch":
        channels = x.shape[-1]
        fallback = (state.mean.reshape(1, 1, channels), state.var.reshape(1, 1, channels))
        xhat, mean, var = _plain_standardize(x, (0, 1), mask, epsilon, fallback=fallback)
        has_data = True if mask is None else jnp.sum(jnp.broadcast_to(mask, x.shape), (0, 1)) > 0
        new = [
            jnp.where(has_data, MOMENTUM * old + (1 - MOMENTUM) * new.reshape(-1), old)
            for old, new in ((state.mean, mean), (state.var, var))
        ]
        return xhat * scale + bias, jbn.BatchNormState(*new)
    if norm == "group":
        grouped = x.reshape(*x.shape[:-1], 2, -1)
        mask = None if mask is None else jnp.broadcast_to(mask, x.shape).reshape(grouped.shape)
        xhat = _plain_standardize(grouped, (1, 3), mask, epsilon)[0].reshape(x.shape)
        return xhat * scale + bias, ()
    axes = {"layer": (2,), "rms": (2,), "instance": (1,)}[norm]
    xhat = _plain_standardize(x, axes, mask, epsilon, centered=norm != "rms")[0]
    return xhat * scale + (0 if norm == "rms" else bias), ()


def _jbn(norm, x, scale, bias, state, mask, epsilon):
    if norm == "batch":
        return jbn.batch_norm(x, state, scale, bias, training=True, momentum=MOMENTUM, epsilon=epsilon, mask=mask)
    if norm == "rms":
        return jbn.rms_norm(x, scale, epsilon=epsilon, mask=mask), ()
    fn = {
        "layer": jbn.layer_norm,
        "instance": jbn.instance_norm,
        "group": functools.partial(jbn.group_norm, num_groups=2),
    }[norm]
    return fn(x, scale, bias, epsilon=epsilon, mask=mask), ()


NORMS = ["batch", "layer", "rms", "instance", "group"]


def _inputs(mask_kind):
    """(4, 5, 6) float64 inputs with mean 3; masks: None, random, or (batch norm) a feature with no data."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(3.0 + 2.0 * rng.standard_normal((4, 5, 6)))
    scale, bias = jnp.asarray(rng.uniform(0.5, 1.5, 6)), jnp.asarray(rng.normal(size=6))
    state = jbn.BatchNormState(jnp.asarray(rng.normal(size=6)), jnp.asarray(rng.uniform(0.5, 2.0, 6)))
    mask = None
    if mask_kind != "none":
        mask = jnp.asarray(rng.uniform(size=(4, 5, 6)) < 0.7)
        mask = mask.at[..., 0].set(True)
        if mask_kind == "empty feature":
            mask = mask.at[..., 2].set(False)
    return (x, scale, bias, state, jnp.asarray(1e-3)), mask


def _loss(fn, norm, mask):
    """A scalar of y and the new state (so the state's derivatives count too)."""
    weights = jnp.asarray(np.random.default_rng(5).normal(size=(4, 5, 6)))

    def loss(x, scale, bias, state, epsilon):
        y, new_state = fn(norm, x, scale, bias, state, mask, epsilon)
        total = jnp.sum(jnp.sin(y) * weights)
        if new_state:
            total = total + jnp.sum(jnp.cos(new_state.mean)) + jnp.sum(jnp.sqrt(new_state.var))
        return total

    return loss


def _assert_trees_close(got, expected, rtol=1e-9, atol=1e-10):
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(g, e, rtol=rtol, atol=atol)


CASES = [(norm, mask) for norm in NORMS for mask in ("none", "random")] + [("batch", "empty feature")]


@pytest.mark.parametrize(("norm", "mask_kind"), CASES)
def test_gradients_equal_autodiff_of_the_plain_formula(norm, mask_kind):
    with jax.enable_x64(True):
        args, mask = _inputs(mask_kind)
        got = jax.jit(jax.grad(_loss(_jbn, norm, mask), argnums=(0, 1, 2, 3, 4)))(*args)
        expected = jax.grad(_loss(_plain, norm, mask), argnums=(0, 1, 2, 3, 4))(*args)
        _assert_trees_close(got, expected)


@pytest.mark.parametrize("norm", NORMS)
def test_forward_mode_and_hessian_vector_products_equal_the_plain_formula(norm):
    with jax.enable_x64(True):
        args, mask = _inputs("random")
        tangents = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(7).normal(size=a.shape)), args)
        got = jax.jvp(_loss(_jbn, norm, mask), args, tangents)
        expected = jax.jvp(_loss(_plain, norm, mask), args, tangents)
        _assert_trees_close(got, expected)

        def hvp(fn):
            loss = _loss(fn, norm, mask)
            gradient = jax.grad(lambda x: loss(x, *args[1:]))
            return jax.jvp(gradient, (args[0],), (tangents[0],))[1]

        _assert_trees_close(jax.jit(lambda: hvp(_jbn))(), hvp(_plain), rtol=1e-8, atol=1e-9)


def test_reverse_over_reverse_equals_the_plain_formula():
    with jax.enable_x64(True):
        args, mask = _inputs("none")

        def gradient_norm(fn):
            gradient = jax.grad(_loss(fn, "layer", mask))
            return lambda x: jnp.sum(jnp.square(gradient(x, *args[1:])))

        _assert_trees_close(jax.grad(gradient_norm(_jbn))(args[0]), jax.grad(gradient_norm(_plain))(args[0]))


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("norm", ["batch", "layer", "group"])
def test_float32_gradients_match_the_float64_closed_form(norm, offset):
    """Data with mean 1e4 keeps float32 gradients exact (autodiff of E[x^2] - mean^2 is off by orders there)."""
    x = data((8, 4, 6), offset=offset)
    ct = data((8, 4, 6), seed=3)
    scale, bias = jnp.linspace(0.5, 1.5, 6), jnp.linspace(-1.0, 1.0, 6)
    if norm == "batch":
        fn = lambda x, s, b: _jbn("batch", x, s, b, jbn.batch_norm_state(6), None, 1e-5)[0]  # noqa: E731
        axes = (0, 1)
    elif norm == "layer":
        fn = lambda x, s, b: jbn.layer_norm(x, s, b, epsilon=1e-5)  # noqa: E731
        axes = (2,)
    else:
        fn = lambda x, s, b: jbn.group_norm(x, s, b, num_groups=2, epsilon=1e-5)  # noqa: E731
        axes = None
    got = jax.jit(lambda *a: jax.vjp(fn, *a)[1](ct))(x, scale, bias)
    expected = reference.normalize_vjp(f64(x), f64(ct), axes, f64(scale), 1e-5, groups=2 if norm == "group" else None)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=2e-4, atol=2e-4 * np.abs(e).max())


# Valid rows per device: 2, 4, 1, 0 (one device has no data at all).
VALID = np.array([1, 1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0], bool)


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_shard_map_gradients_with_uneven_masked_shards_equal_one_device(norm):
    """Synchronized batch norm's backward pass sums across devices; layer norm pools over the mapped axis too."""
    mesh = cpu_mesh()
    x = np.array(data((16, 3), offset=2.0))
    x[~VALID] = 7.0  # padding rows: their outputs are ignored by the loss, their statistics by the mask
    weights = data((16, 3), seed=9)
    state, scale, bias = jbn.batch_norm_state(3), jnp.array([1.0, 2.0, 0.5]), jnp.array([0.1, -0.2, 0.3])

    def normalized(x, valid, scale, axis_name=None):
        mask = valid[:, None]
        if norm == "batch":
            return jbn.batch_norm(x, state, scale, bias, training=True, mask=mask, axis_name=axis_name)[0]
        return jbn.layer_norm(x, scale, bias, reduction_axes=(0, 1), mask=mask, axis_name=axis_name)

    def local_loss(x, valid, w, scale):
        y = normalized(x, valid, scale, axis_name="devices")
        return jax.lax.psum(jnp.sum(jnp.where(valid[:, None], jnp.sin(y) * w, 0)), "devices")

    sharded = jax.shard_map(local_loss, mesh=mesh, in_specs=(P("devices"),) * 3 + (P(),), out_specs=P())
    put = functools.partial(jax.device_put, device=NamedSharding(mesh, P("devices")))
    got_x, got_scale = jax.jit(jax.grad(sharded, argnums=(0, 3)))(
        put(jnp.asarray(x)), put(jnp.asarray(VALID)), put(weights), scale
    )

    def loss(x_valid, scale):
        y = normalized(x_valid, jnp.ones(len(x_valid), bool), scale)
        return jnp.sum(jnp.sin(y) * weights[VALID])

    expected_x, expected_scale = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x[VALID]), scale)
    np.testing.assert_allclose(np.asarray(got_x)[VALID], expected_x, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_x)[~VALID], 0, atol=1e-6)  # nothing flows into padding
    np.testing.assert_allclose(got_scale, expected_scale, rtol=1e-4, atol=1e-5)


def _saved_bytes(fn, *args):
    """Bytes of the residuals the pullback of `fn` keeps (distinct buffers), under jit."""
    pullback = jax.jit(lambda *a: jax.vjp(fn, *a)[1])(*args)
    return sum({leaf.unsafe_buffer_pointer(): leaf.nbytes for leaf in jax.tree.leaves(pullback)}.values())


def test_eval_mode_batch_norm_keeps_x_itself_for_the_backward_pass():
    x = data((16, 32, 64), jnp.bfloat16)
    state, scale, bias = jbn.batch_norm_state(64), jnp.ones(64), jnp.zeros(64)
    saved = _saved_bytes(lambda x, s, b: jbn.batch_norm(x, state, s, b, training=False)[0], x, scale, bias)
    assert saved <= x.nbytes + 8 * 64 * 4, (saved, x.nbytes)  # not the float32 copy (2x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("norm", NORMS)
def test_the_backward_pass_keeps_only_x_and_per_group_statistics(norm, dtype):
    x = data((16, 32, 64), dtype)
    args = (x, jnp.ones(64), jnp.zeros(64), jbn.batch_norm_state(64), jnp.asarray(1e-5))
    groups = {"batch": 64, "layer": 16 * 32, "rms": 16 * 32, "instance": 16 * 64, "group": 16 * 2}[norm]
    per_group = 6 * 4  # shift, offset, var, scale, count (float32) and a flag, per group
    saved = _saved_bytes(lambda *a: _jbn(norm, *a[:4], None, a[4])[0], *args)
    assert saved <= x.nbytes + groups * per_group + 4 * 64 * 4, (saved, x.nbytes)


ON_THE_CPU = jax.default_backend() == "cpu"
KERNEL_LAYOUTS = [((48, 40), -1), ((4, 3, 5, 16), -1), ((4, 16, 3, 5), 1)]


def _batch_norm_loss(norm, training, feature_axes, ct):
    """A scalar of y and the new state, linear in y by `ct` (the cotangent of y a training step passes)."""

    def loss(x, scale, bias, state):
        y, new = norm(x, state, scale, bias, training=training, momentum=0.5, feature_axes=feature_axes)
        return jnp.sum(y.astype(ct.dtype) * ct) + jnp.sum(jnp.cos(new.mean)) + jnp.sum(jnp.sqrt(new.var))

    return loss


def _plain_batch_norm(x, state, scale, bias, *, training, momentum, feature_axes):
    axes = tuple(axis for axis in range(x.ndim) if axis != feature_axes % x.ndim)
    kept = [1 if axis in axes else size for axis, size in enumerate(x.shape)]
    if not training:
        xhat = (x - state.mean.reshape(kept)) / jnp.sqrt(state.var.reshape(kept) + 1e-5)
        return xhat * scale.reshape(kept) + bias.reshape(kept), state
    xhat, mean, var = _plain_standardize(x, axes, None, 1e-5)
    y = xhat * scale.reshape(kept) + bias.reshape(kept)
    new = [
        momentum * old + (1 - momentum) * batch.reshape(-1) for old, batch in zip(state[:2], (mean, var), strict=True)
    ]
    return y, jbn.BatchNormState(*new)


# Float32 training keeps XLA's backward pass by default; here it takes the kernel too, for float32's precision.
KERNEL_CASES = [(True, jnp.bfloat16), (True, jnp.float32), (False, jnp.bfloat16), (False, jnp.float32)]


def _all_through_the_kernel(monkeypatch):
    monkeypatch.setattr(_fused, "BATCH_BACKWARD_ELEMENTS", 0)
    monkeypatch.setattr(_fused, "FROZEN_BACKWARD_ELEMENTS", 0)
    monkeypatch.setattr(_fused, "TRAINING_BACKWARD_DTYPES", _fused._DTYPES)


@pytest.mark.skipif(not ON_THE_CPU, reason="the kernels run on the CPU only")
@pytest.mark.parametrize(("training", "dtype"), KERNEL_CASES)
@pytest.mark.parametrize(("shape", "feature_axes"), KERNEL_LAYOUTS)
def test_batch_norm_gradients_through_the_backward_kernel_equal_the_float64_formula(
    monkeypatch, shape, feature_axes, training, dtype
):
    """Large batch norm takes its backward pass from the kernel (training: bfloat16; eval mode: also float32); here
    every size and dtype does, with the running statistics' cotangents and data far from zero."""
    if not _kernel.enabled():
        pytest.skip("no C++ compiler")
    _all_through_the_kernel(monkeypatch)
    channels = shape[feature_axes]
    x = data(shape, dtype, offset=100.0, spread=3.0)
    scale, bias = jnp.linspace(0.5, 1.5, channels), jnp.linspace(-1.0, 1.0, channels)
    state = jbn.BatchNormState(jnp.linspace(99.0, 101.0, channels), jnp.linspace(5.0, 12.0, channels))
    ct = data(shape, dtype, seed=3).astype(jnp.float32)  # y's cotangent is rounded to y's dtype
    grad = jax.jit(jax.grad(_batch_norm_loss(jbn.batch_norm, training, feature_axes, ct), argnums=(0, 1, 2, 3)))
    assert "jbn_norm_backward" in grad.lower(x, scale, bias, state).compile().as_text()
    got = grad(x, scale, bias, state)
    assert got[0].dtype == dtype
    with jax.enable_x64(True):
        args = jax.tree.map(f64, (x, scale, bias, state))
        loss = _batch_norm_loss(_plain_batch_norm, training, feature_axes, jnp.asarray(f64(ct)))
        expected = jax.grad(loss, argnums=(0, 1, 2, 3))(*args)
    ulp = 2**-8 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(f64(got[0]), expected[0], rtol=ulp, atol=ulp * np.abs(expected[0]).max())
    _assert_trees_close(jax.tree.map(f64, got[1:]), expected[1:], rtol=1e-4, atol=1e-4)
    # Forward mode takes the tangent's twin.
    tangents = (data(shape, dtype, seed=4), jnp.ones(channels), jnp.ones(channels), state)

    def tangent(norm, args, tangents):
        def y(x, scale, bias, state):
            return norm(x, state, scale, bias, training=training, momentum=0.5, feature_axes=feature_axes)[0]

        return jax.jvp(y, args, tangents)[1]

    dy = tangent(jbn.batch_norm, (x, scale, bias, state), tangents)
    with jax.enable_x64(True):
        expected_dy = tangent(_plain_batch_norm, args, jax.tree.map(f64, tangents))
    np.testing.assert_allclose(f64(dy), expected_dy, rtol=2 * ulp, atol=2 * ulp * np.abs(expected_dy).max())
    # The backward pass keeps x and per-feature values only.
    y = functools.partial(jbn.batch_norm, training=training, feature_axes=feature_axes)
    saved = _saved_bytes(lambda *a: y(*a)[0], x, state, scale, bias)
    assert saved <= x.nbytes + 16 * channels * 4, (saved, x.nbytes)  # no second array of x's size


@pytest.mark.skipif(not ON_THE_CPU, reason="the kernels run on the CPU only")
def test_the_backward_kernel_takes_batch_norm_from_512k_elements_in_bfloat16_and_256k_in_eval_mode():
    if not _kernel.enabled():
        pytest.skip("no C++ compiler")
    state = jbn.batch_norm_state(512)

    def uses_the_kernel(shape, dtype, training=True):
        x = jax.ShapeDtypeStruct(shape, dtype)
        y = functools.partial(jbn.batch_norm, state=state, training=training)
        grad = jax.jit(jax.grad(lambda x: jnp.sum(y(x)[0].astype(jnp.float32))))
        return "jbn_norm_backward" in grad.lower(x).compile().as_text()

    assert uses_the_kernel((1024, 512), jnp.bfloat16)
    assert not uses_the_kernel((1023, 512), jnp.bfloat16)  # XLA's pass was as fast below
    assert not uses_the_kernel((1024, 512), jnp.float32)  # and in float32 training
    assert uses_the_kernel((512, 512), jnp.float32, training=False)  # eval mode: both dtypes, from 256K
    assert not uses_the_kernel((511, 512), jnp.float32, training=False)


@pytest.mark.skipif(not ON_THE_CPU, reason="the kernels run on the CPU only")
@pytest.mark.parametrize("training", [True, False])
def test_second_order_derivatives_through_the_backward_kernel_equal_the_xla_path(monkeypatch, training):
    """Hessian-vector products (forward over reverse) and reverse over reverse of batch norm, float32, NHWC."""
    if not _kernel.enabled():
        pytest.skip("no C++ compiler")
    shape, channels = (3, 4, 5, 8), 8
    x, ct = data(shape, offset=3.0), data(shape, seed=3)
    direction = data(shape, seed=4)
    state = jbn.BatchNormState(jnp.linspace(2.0, 4.0, channels), jnp.linspace(0.5, 2.0, channels))
    scale = jnp.linspace(0.5, 1.5, channels)

    def loss(x, scale):
        y, new = jbn.batch_norm(x, state, scale, training=training, momentum=0.5)
        return jnp.vdot(jnp.sin(y), ct) + jnp.sum(jnp.sqrt(new.var))

    def second_order():
        jax.clear_caches()
        hvp = jax.jvp(jax.grad(loss), (x, scale), (direction, scale))[1]
        rr = jax.grad(lambda x, s: jnp.sum(jnp.square(jax.grad(loss)(x, s))), argnums=(0, 1))(x, scale)
        text = jax.jit(jax.grad(loss)).lower(x, scale).compile().as_text()
        return hvp, rr, "jbn_norm_backward" in text

    *plain, kernel_used = second_order()
    assert not kernel_used
    _all_through_the_kernel(monkeypatch)
    *fused, kernel_used = second_order()
    assert kernel_used
    jax.clear_caches()
    _assert_trees_close(fused, plain, rtol=1e-4, atol=1e-4)
