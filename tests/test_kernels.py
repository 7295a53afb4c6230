"""The fused CPU kernels: where they apply, their results against float64 and the XLA path, every transformation.

The XLA path (``JBN_KERNELS=0``) is the comparator besides the float64 oracle: both must give the same outputs
and gradients, eagerly and under jit, in float32 and bfloat16, for every (N, S, G, K) layout the kernels take.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from jbn import _fused, _kernel
from tests import reference
from tests.helpers import data, f64

# (name, function, x shape, keyword arguments, the kernel's (N, S, G, K) view)
CASES = [
    ("layer", jbn.layer_norm, (4, 5, 24), {}, (20, 1, 1, 24)),
    ("layer over two axes", jbn.layer_norm, (4, 5, 6), {"reduction_axes": (1, 2)}, (4, 1, 1, 30)),
    ("rms", jbn.rms_norm, (6, 40), {}, (6, 1, 1, 40)),
    ("instance", jbn.instance_norm, (3, 4, 5, 6), {}, (3, 20, 6, 1)),
    ("group", jbn.group_norm, (3, 4, 4, 8), {"num_groups": 4}, (3, 16, 4, 2)),
    ("one group per example", jbn.group_norm, (5, 12), {"num_groups": 1}, (5, 1, 1, 12)),
    # Long runs (K >= 16) summed per run; scale per channel, or per group (constant along K), short runs or long.
    ("layer over a long run", jbn.layer_norm, (3, 4, 32), {"reduction_axes": (1, 2)}, (3, 1, 1, 128)),
    (
        "layer, long runs",
        jbn.layer_norm,
        (2, 3, 2, 40),
        {"reduction_axes": (1, 3), "feature_axes": (2, 3)},
        (2, 3, 2, 40),
    ),
    (
        "layer, scale per group",
        jbn.layer_norm,
        (3, 4, 5, 16),
        {"reduction_axes": (1, 3), "feature_axes": 2},
        (3, 4, 5, 16),
    ),
    ("layer, short runs", jbn.layer_norm, (3, 4, 5, 4), {"reduction_axes": (1, 3), "feature_axes": 2}, (3, 4, 5, 4)),
    # Per-channel sums over rows go in chunks of up to 64 channels: 24 and 64 + 48 here (6, 8 and 16 + 4 above).
    ("instance, 24 channels", jbn.instance_norm, (2, 3, 5, 24), {}, (2, 15, 24, 1)),
    ("group, 112 channels", jbn.group_norm, (2, 3, 4, 112), {"num_groups": 28}, (2, 12, 28, 4)),
    # Channels first: rows with scale and bias per group (one per channel, constant along the row).
    ("instance, channels first", jbn.instance_norm, (3, 6, 4, 5), {"feature_axes": 1}, (3, 1, 6, 20)),
    ("rms, channels first", jbn.rms_norm, (3, 6, 20), {"reduction_axes": 2, "feature_axes": 1}, (3, 1, 6, 20)),
    # Channels first, scale per channel inside each row: one entry per H * W run (16 or more elements), or expanded
    # to every element (shorter runs).
    ("group, channels first", jbn.group_norm, (2, 8, 4, 5), {"num_groups": 4, "feature_axes": 1}, (2, 1, 4, 40)),
    (
        "layer, channels first",
        jbn.layer_norm,
        (2, 3, 4, 5),
        {"reduction_axes": (1, 2, 3), "feature_axes": 1},
        (2, 1, 1, 60),
    ),
    ("group, short planes", jbn.group_norm, (2, 8, 2, 3), {"num_groups": 2, "feature_axes": 1}, (2, 1, 2, 24)),
    # RMS norm over planes: nothing centered, also when slices of one example are pooled.
    ("rms over planes", jbn.rms_norm, (3, 4, 6), {"reduction_axes": 1}, (3, 4, 6, 1)),
    ("rms over long runs", jbn.rms_norm, (2, 3, 2, 32), {"reduction_axes": (1, 3), "feature_axes": 2}, (2, 3, 2, 32)),
]
IDS = [case[0] for case in CASES]


def _params(name, x, kwargs):
    """A scale and bias along the feature axes (the last by default; RMS norm has no bias)."""
    axes = kwargs.get("feature_axes", -1)
    shape = tuple(x.shape[axis] for axis in ((axes,) if isinstance(axes, int) else axes))
    rng = np.random.default_rng(7)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.float32)
    bias = None if name.startswith("rms") else jnp.asarray(rng.normal(size=shape), jnp.float32)
    return scale, bias


def _apply(fn, x, scale, bias, kwargs):
    return fn(x, scale, **kwargs) if bias is None else fn(x, scale, bias, **kwargs)


def _expected(fn, x, scale, bias, kwargs):
    """The float64 oracle's y."""
    x, scale, bias = f64(x), f64(scale), None if bias is None else f64(bias)
    if fn is jbn.rms_norm:
        return reference.rms_norm(x, scale, **kwargs)
    if fn is jbn.group_norm:  # whose oracle takes its one channel axis as feature_axis
        kwargs = {("feature_axis" if key == "feature_axes" else key): value for key, value in kwargs.items()}
        return reference.group_norm(x, scale, bias, **kwargs)
    oracle = {jbn.layer_norm: reference.layer_norm, jbn.instance_norm: reference.instance_norm}
    return oracle[fn](x, scale, bias, **kwargs)


def _loss_grads(fn, kwargs, x, scale, bias, cotangent):
    """y and the gradients of <y, cotangent> with respect to x, scale and bias (when present)."""
    params = (scale,) if bias is None else (scale, bias)
    y, vjp = jax.vjp(lambda x, *p: _apply(fn, x, *p, None, kwargs) if len(p) == 1 else fn(x, *p, **kwargs), x, *params)
    return y, vjp(cotangent)


def _run(fn, kwargs, x, scale, bias, cotangent, *, kernels, jit, monkeypatch):
    monkeypatch.setenv("JBN_KERNELS", "1" if kernels else "0")
    step = functools.partial(_loss_grads, fn, kwargs)
    return (jax.jit(step) if jit else step)(x, scale, bias, cotangent)


def _forward_eqns(fn, *args, **kwargs):
    """The kernel's forward calls in fn's jaxpr, nested ones (custom_jvp, pjit) included."""

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn
            for value in eqn.params.values():
                if isinstance(value, jax.extend.core.ClosedJaxpr | jax.extend.core.Jaxpr):
                    yield from walk(getattr(value, "jaxpr", value))

    jaxpr = jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args).jaxpr
    return [eqn for eqn in walk(jaxpr) if eqn.primitive is _fused.forward_p]


ON_THE_CPU = jax.default_backend() == "cpu"  # elsewhere every layout takes the XLA path (the twins)


@pytest.mark.skipif(not ON_THE_CPU, reason="the kernels run on the CPU only")
@pytest.mark.parametrize(("name", "fn", "shape", "kwargs", "view"), CASES, ids=IDS)
def test_the_kernels_take_these_layouts(name, fn, shape, kwargs, view):
    scale, bias = _params(name, jnp.ones(shape), kwargs)
    (eqn,) = _forward_eqns(lambda x: _apply(fn, x, scale, bias, kwargs), jnp.ones(shape))
    assert tuple(eqn.params[dim] for dim in "nsgk") == view
    if fn is not jbn.group_norm:  # which splits its channel axis into groups itself
        assert eqn.invars[0].aval.shape == shape  # x keeps its shape: XLA:CPU would copy a reshaped bfloat16 array


@pytest.mark.parametrize(
    ("fn", "shape", "kwargs", "why"),
    [
        (jbn.layer_norm, (4, 5, 6), {"mask": jnp.ones((4, 5, 6), bool)}, "a mask"),
        (jbn.layer_norm, (4, 5, 6), {"use_fast_variance": True}, "the opt-in fast variance"),
        (jbn.layer_norm, (4, 5, 6), {"dtype": jnp.bfloat16}, "y in another dtype"),
        (jbn.layer_norm, (2, 3, 4, 5), {"reduction_axes": (0, 2)}, "kept axes on both sides of a reduced one"),
    ],
)
def test_the_xla_path_serves_the_rest(fn, shape, kwargs, why):
    assert not _forward_eqns(fn, jnp.ones(shape), **kwargs), why


def test_the_xla_path_serves_empty_arrays_float16_and_traced_epsilon():
    assert not _forward_eqns(jbn.layer_norm, jnp.ones((4, 0, 6)))
    assert not _forward_eqns(lambda x: jbn.layer_norm(x.astype(jnp.float16)), jnp.ones((4, 6)))
    assert not _forward_eqns(lambda x, e: jbn.layer_norm(x, epsilon=e), jnp.ones((4, 6)), 1e-5)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(("name", "fn", "shape", "kwargs", "view"), CASES, ids=IDS)
def test_outputs_and_gradients_equal_the_xla_path_and_float64(name, fn, shape, kwargs, view, dtype, jit, monkeypatch):
    x = data(shape, dtype, offset=3.0)
    scale, bias = _params(name, x, kwargs)
    cotangent = data(shape, dtype, seed=5)
    fused = _run(fn, kwargs, x, scale, bias, cotangent, kernels=True, jit=jit, monkeypatch=monkeypatch)
    # The comparator under jit either way: the XLA path's eager mode is tested in test_norms, and op by op it costs
    # a compilation per operation.
    plain = _run(fn, kwargs, x, scale, bias, cotangent, kernels=False, jit=True, monkeypatch=monkeypatch)
    tolerance = {"atol": 3e-5, "rtol": 1e-5} if dtype == jnp.float32 else {"atol": 5e-2, "rtol": 2e-2}
    for got, want in zip(jax.tree.leaves(fused), jax.tree.leaves(plain), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(f64(got), f64(want), **tolerance)
    np.testing.assert_allclose(f64(fused[0]), _expected(fn, x, scale, bias, kwargs), **tolerance)


@pytest.mark.parametrize("groups", [None, 4])
def test_gradients_on_offset_data_match_the_float64_closed_form(groups):
    """1e4 + N(0, 1): the kernels keep the mean as two floats, so nothing cancels."""
    x = data((6, 5, 16), offset=1e4)
    scale, bias = _params("layer", x, {})
    cotangent = data(x.shape, seed=3)
    if groups is None:
        fn, kwargs, axes = jbn.layer_norm, {}, (2,)
        expected_y = reference.layer_norm(f64(x), f64(scale), f64(bias))
    else:
        fn, kwargs, axes = jbn.group_norm, {"num_groups": groups}, None
        expected_y = reference.group_norm(f64(x), f64(scale), f64(bias), num_groups=groups)
    y, grads = jax.jit(functools.partial(_loss_grads, fn, kwargs))(x, scale, bias, cotangent)
    expected = reference.normalize_vjp(f64(x), f64(cotangent), axes, f64(scale), 1e-6, groups=groups)
    assert np.abs(f64(y) - expected_y).max() < 2e-6
    for got, want in zip(grads, expected, strict=True):
        assert np.abs(f64(got) - want).max() < 2e-6 * np.abs(want).max()


def _xla_and_fused(fn, *args, monkeypatch):
    """fn under jit on the XLA path and through the kernels. The caches are cleared in between: jit reuses the
    trace of the same function, which would hold the XLA path for both."""
    monkeypatch.setenv("JBN_KERNELS", "0")
    jax.clear_caches()
    plain = jax.jit(fn)(*args)
    monkeypatch.setenv("JBN_KERNELS", "1")
    jax.clear_caches()
    return jax.jit(fn)(*args), plain


def _assert_close(got, want, rtol=2e-5, atol=2e-5):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(f64(a), f64(b), rtol=rtol, atol=atol)


@pytest.mark.parametrize(("name", "fn", "shape", "kwargs", "view"), CASES[::2], ids=IDS[::2])
def test_forward_mode_second_order_and_vmap_equal_the_xla_path(name, fn, shape, kwargs, view, monkeypatch):
    x = data(shape, offset=2.0)
    scale, bias = _params(name, x, kwargs)
    direction = data(shape, seed=9)
    cotangent = data(shape, seed=4)

    def loss(x, scale):
        return jnp.vdot(_apply(fn, x, scale, bias, kwargs), cotangent)

    def curved(x, scale):  # y enters nonlinearly: the outer pass differentiates the forward kernel's y too
        return jnp.vdot(jnp.sin(_apply(fn, x, scale, bias, kwargs)), cotangent)

    cases = {
        "jvp": lambda x, s: jax.jvp(lambda x, s: _apply(fn, x, s, bias, kwargs), (x, s), (direction, s * 0.5)),
        "hessian-vector": lambda x, s: jax.jvp(jax.grad(loss), (x, s), (direction, s))[1],
        "reverse over reverse": lambda x, s: jax.grad(lambda x, s: jnp.sum(jnp.square(jax.grad(curved)(x, s))))(x, s),
        "reverse over reverse in x alone": lambda x, s: jax.grad(lambda x: jnp.sum(jax.grad(curved)(x, s)))(x),
        "vmap over x": lambda x, s: jax.vmap(lambda x: _apply(fn, x, s, bias, kwargs), 1, 1)(x[:, None]),
        "vmap over scale": lambda x, s: jax.vmap(lambda s: _apply(fn, x, s, bias, kwargs))(jnp.stack([s, 2 * s])),
        "per-example gradients": lambda x, s: jax.vmap(jax.grad(loss), (0, None))(x[None].repeat(2, 0), s),
    }
    for case, f in cases.items():
        fused, plain = _xla_and_fused(f, x, scale, monkeypatch=monkeypatch)
        _assert_close(fused, plain, rtol=1e-4, atol=1e-4 if "second" in case or "reverse" in case else 2e-5)
    if ON_THE_CPU:  # vmap over x alone folds the mapped axis into N: still one kernel call.
        (eqn,) = _forward_eqns(jax.vmap(lambda x: _apply(fn, x, scale, bias, kwargs)), x[None].repeat(3, 0))
        assert eqn.params["n"] == 3 * view[0]


def test_results_do_not_depend_on_thread_timing():
    x = data((64, 33, 48), offset=1.0)
    scale = jnp.linspace(0.5, 1.5, 48)
    step = jax.jit(jax.grad(lambda x, s: jnp.sum(jnp.sin(jbn.layer_norm(x, s))), argnums=(0, 1)))
    first, second = step(x, scale), step(x, scale)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(("name", "fn", "shape", "kwargs", "view"), CASES, ids=IDS)
def test_the_plain_jax_twins_equal_the_kernels(name, fn, shape, kwargs, view):
    """The twins define the primitives on other platforms and under transformations the kernels do not take."""
    if not _kernel.enabled():  # registers the kernels (when this test runs first)
        pytest.skip("no C++ compiler")
    x = data(view, offset=5.0)
    channels = view[2] * view[3]
    scale, bias = jnp.linspace(0.5, 1.5, channels), jnp.linspace(-1.0, 1.0, channels)
    dy = data(view, seed=2)
    centered = not name.startswith("rms")
    dims = {dim: np.int64(size) for dim, size in zip("nsgk", view, strict=True)}
    params = {"epsilon": np.float32(1e-6), "centered": centered, **dims}
    fused = jax.jit(lambda *a: _fused.forward_p.bind(*a, **params))(x, scale, bias)
    _assert_close(fused, _fused._reference_forward(x, scale, bias, **params), rtol=1e-5, atol=1e-5)
    _, mean, std, _ = fused
    # The statistics' cotangents too (batch norm's running statistics are outputs).
    dmean, dvar = (jax.random.normal(jax.random.key(seed), std.shape) for seed in (3, 4))
    grads = (x, mean, std, scale, dy, dmean, dvar)
    for frozen in (False, True):  # frozen: constant statistics (batch norm in eval mode)
        bind = functools.partial(_fused.backward_p.bind, centered=centered, frozen=frozen, **dims)
        backward = jax.jit(bind)(*grads)
        expected = _fused._reference_backward(*grads, centered=centered, frozen=frozen, **dims)
        _assert_close(backward, expected, atol=1e-4)


def test_a_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        _kernel._build()
    monkeypatch.setattr(_kernel, "_build", lambda: (_ for _ in ()).throw(RuntimeError("compiler failed: boom")))
    with pytest.warns(RuntimeWarning, match="boom.*XLA path"):
        assert _kernel._register.__wrapped__() is False


def test_the_build_is_cached(monkeypatch, tmp_path):
    source = tmp_path / "kernels" / "tiny.cc"  # the caching, not the kernels (the rest of the suite builds those)
    source.parent.mkdir()
    source.write_text('extern "C" int jbn_tiny() { return 1; }\n')
    monkeypatch.setattr(_kernel, "SOURCE", source)
    cache = tmp_path / "cache"
    monkeypatch.setenv("JBN_CACHE_DIR", str(cache))
    built = _kernel._build()
    stamp = built.stat().st_mtime_ns
    assert _kernel._build() == built and built.stat().st_mtime_ns == stamp
    assert [p.name for p in cache.iterdir()] == [built.name]  # no temporary files left behind
    source.write_text('extern "C" int jbn_tiny() { return 2; }\n')
    assert _kernel._build() != built  # a changed source is built anew


def test_jax_export_works_with_the_kernels_off(monkeypatch):
    """Exported code may not hold custom calls without compatibility guarantees: JBN_KERNELS=0 leaves none."""
    monkeypatch.setenv("JBN_KERNELS", "0")
    exported = jax.export.export(jax.jit(lambda x: jbn.layer_norm(x)))(jax.ShapeDtypeStruct((4, 8), jnp.float32))
    x = data((4, 8))
    np.testing.assert_allclose(f64(exported.call(x)), reference.layer_norm(f64(x)), atol=2e-6)


@pytest.mark.parametrize(
    ("fn", "shape", "kwargs"),
    [
        (jbn.instance_norm, (1, 48, 48, 8), {}),
        (jbn.layer_norm, (2, 64, 3, 32), {"reduction_axes": (1, 3), "feature_axes": 2}),
    ],
    ids=["short runs", "long runs"],
)
def test_few_examples_split_into_slices_pool_exactly(fn, shape, kwargs):
    """One or two examples are split into slices of rows across the threads; Chan's formula pools them."""
    x = data(shape, offset=1e4, spread=0.01)
    scale, bias = _params("layer", x, kwargs)
    y = jax.jit(lambda x: fn(x, scale, bias, **kwargs))(x)
    expected = _expected(fn, x, scale, bias, kwargs)
    assert np.abs(f64(y) - expected).max() < 2e-5


@pytest.mark.parametrize(
    ("fn", "shape", "kwargs"),
    [
        (jbn.instance_norm, (16, 32, 32, 64), {}),
        (jbn.instance_norm, (2, 128, 128, 32), {}),
        (jbn.layer_norm, (16, 64, 4, 256), {"reduction_axes": (1, 3), "feature_axes": 2}),
        (jbn.layer_norm, (8, 256, 512), {}),
        (jbn.instance_norm, (16, 64, 32, 32), {"feature_axes": 1}),
        (jbn.group_norm, (8, 64, 32, 32), {"num_groups": 32, "feature_axes": 1}),
    ],
    ids=[
        "whole examples",
        "slices of two examples",
        "scale per group",
        "rows",
        "rows, scale per group",
        "rows, per plane",
    ],
)
def test_large_outputs_stored_around_the_cache_equal_the_xla_path(fn, shape, kwargs, monkeypatch):
    """float32 outputs of 4 MiB and more go out in non-temporal stores, a 64-byte line of 16 channels at a time."""
    x = data(shape, offset=3.0)
    scale, bias = _params("layer", x, kwargs)
    cotangent = data(shape, seed=5)
    fused = _run(fn, kwargs, x, scale, bias, cotangent, kernels=True, jit=True, monkeypatch=monkeypatch)
    plain = _run(fn, kwargs, x, scale, bias, cotangent, kernels=False, jit=True, monkeypatch=monkeypatch)
    _assert_close(fused, plain, rtol=1e-5, atol=3e-5)
    assert np.abs(f64(fused[0]) - _expected(fn, x, scale, bias, kwargs)).max() < 2e-5


# Batch norm's statistics on channels-last data: one pass in the kernel, no run-time branch (``_fused.statistics``).
BATCH_SHAPES = [(64, 12), (4, 5, 6, 8), (300, 70)]  # 70 channels: one chunk of 64 and one of 6


@pytest.mark.parametrize("offset", [0.0, 10.0, 1e4])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", BATCH_SHAPES)
def test_batch_norm_statistics_take_one_pass_without_a_branch(shape, dtype, offset):
    """Data far from zero take the same single pass as centered data (the XLA path takes a second one)."""
    x = data(shape, dtype, offset=offset)
    state, (scale, bias) = jbn.batch_norm_state(shape[-1]), _params("layer", x, {})
    step = jax.jit(lambda x: jbn.batch_norm(x, state, scale, bias, training=True, momentum=0.9))
    text = step.lower(x).compile().as_text()
    assert "jbn_norm_statistics" in text and " conditional(" not in text
    y, new_state = step(x)
    expected, mean, var = reference.batch_norm(f64(x), state.mean, state.var, scale, bias, training=True, momentum=0.9)
    tolerance = {"atol": 2e-5} if dtype == jnp.float32 else {"rtol": 1e-2, "atol": 1e-2}  # y rounded to bfloat16
    np.testing.assert_allclose(f64(y), expected, **tolerance)
    np.testing.assert_allclose(new_state.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(new_state.var, var, rtol=1e-5)


@pytest.mark.parametrize("magnitude", [1e-30, 1e25])
def test_batch_norm_statistics_of_extreme_magnitudes_are_scaled_by_a_power_of_two(magnitude):
    """Variances outside [2^-100, 2^100] come with a power-of-two scale, so that XLA's squares stay in range."""
    x = data((128, 8), spread=magnitude)
    scale, shift, offset, var = _fused.statistics(x, (0,), _fused.statistics_view(x, (0,)))
    assert np.all(f64(scale) != 1)
    ref_mean, ref_var = reference.moments(f64(x), 0)
    np.testing.assert_allclose((f64(shift) + f64(offset)) / f64(scale), ref_mean, rtol=1e-6, atol=magnitude * 1e-7)
    np.testing.assert_allclose(f64(var) / f64(scale) ** 2, ref_var, rtol=1e-6)
    y, _ = jbn.batch_norm(x, jbn.batch_norm_state(8), training=True, epsilon=0.0)
    np.testing.assert_allclose(f64(y), (f64(x) - ref_mean) / np.sqrt(ref_var), atol=1e-5)


@pytest.mark.parametrize(
    "shape",
    [(600, 700), (2100, 250)],
    ids=["4 slices on the calling thread", "5 slices on the thread pool"],  # 420K and 525K elements
)
def test_batch_norm_statistics_pool_their_slices_exactly(shape):
    """Slices of 128K elements, each about its own shift, pooled with Chan's formula: the statistics are those of
    the whole batch to float32's precision, also where the rows drift far from zero and apart slice by slice."""
    rows = np.arange(shape[0])[:, None]
    x = jnp.asarray(1e4 + 0.05 * rows + np.random.default_rng(0).standard_normal(shape), jnp.float32)
    scale, shift, offset, var = _fused.statistics(x, (0,), _fused.statistics_view(x, (0,)))
    ref_mean, ref_var = reference.moments(f64(x), 0)
    np.testing.assert_allclose(f64(scale), 1.0)
    np.testing.assert_allclose(f64(shift) + f64(offset), ref_mean, rtol=1e-12, atol=0)
    np.testing.assert_allclose(f64(var), ref_var, rtol=2**-23)


@pytest.mark.parametrize("in_axes", [0, 1])
def test_the_statistics_kernel_folds_a_vmapped_batch_into_its_examples(in_axes):
    """Under vmap the kernel runs once, with the batch as examples, in front of x whichever axis was mapped."""
    x = jnp.stack([data((40, 6)), data((40, 6), seed=1, offset=1e4), data((40, 6), seed=2, spread=1e-3)], in_axes)
    mapped = jax.jit(jax.vmap(lambda xi: jbn.moments(xi, 0), in_axes=in_axes))
    assert mapped.lower(x).compile().as_text().count("jbn_norm_statistics") == 1
    mean, var = mapped(x)
    for i in range(3):
        ref_mean, ref_var = reference.moments(f64(jnp.take(x, i, in_axes)), 0)
        np.testing.assert_allclose(mean[i], ref_mean, rtol=1e-6)
        np.testing.assert_allclose(var[i], ref_var, rtol=1e-5)


def test_derivatives_through_the_statistics_kernel_equal_the_xla_path(monkeypatch):
    """First and second derivatives of the statistics themselves (``jbn.moments``) come from plain JAX."""
    x = data((12, 3), offset=3.0)

    def f(x):
        mean, var = jbn.moments(x, 0)
        return jnp.sum(jnp.sin(mean) * var)

    with_kernel = jax.jit(jax.grad(f))(x), jax.hessian(f)(x)
    assert "jbn_norm_statistics" in jax.jit(jax.grad(f)).lower(x).compile().as_text()
    monkeypatch.setattr(_fused, "statistics_view", lambda *args: None)
    jax.clear_caches()
    without = jax.jit(jax.grad(f))(x), jax.hessian(f)(x)
    for a, b in zip(with_kernel, without, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _without_affine_kernel(monkeypatch):
    monkeypatch.setattr(_fused, "affine_view", lambda *args: None)
    jax.clear_caches()


# (x shape, feature_axes): channels last (rows of C), channels first (runs of H·W), two feature axes (one run);
# the last two above 512K elements, where the kernel's tasks go to the thread pool.
AFFINE_LAYOUTS = [
    ((64, 12), -1),
    ((4, 5, 6, 8), -1),
    ((3, 8, 4, 5), 1),
    ((5, 3, 4, 16), (1, 2)),
    ((1100, 512), -1),
    ((4, 32, 64, 72), 1),
]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "training"])
@pytest.mark.parametrize(("shape", "axes"), AFFINE_LAYOUTS)
def test_bfloat16_batch_norm_normalizes_through_the_affine_kernel_with_the_xla_paths_bits(
    shape, axes, training, monkeypatch
):
    """Batch norm's normalization in bfloat16 gives XLA's bits, special values included, eagerly and under jit."""
    x = np.array(data(shape, offset=5.0, spread=3.0), np.float32)
    x.reshape(-1)[:5] = [np.nan, np.inf, -np.inf, 0.0, -0.0]
    x = jnp.asarray(x).astype(jnp.bfloat16)
    channels = int(np.prod([shape[a] for a in np.atleast_1d(axes)]))
    features = [shape[a] for a in np.atleast_1d(axes)]
    state = jbn.batch_norm_state(features)._replace(
        mean=jnp.linspace(4.0, 6.0, channels).reshape(features), var=jnp.linspace(0.5, 9.0, channels).reshape(features)
    )
    scale = jnp.linspace(0.5, 1.5, channels).reshape(features)

    def normalize(x):
        return jbn.batch_norm(x, state, scale, None, training=training, feature_axes=axes)[0]

    def jitted_and_eager():
        # Each against its own kind: eagerly the per-feature terms are computed op by op, under jit XLA folds them
        # as constants, and the two may differ in the last bit of a term (so in a few results of 563,200, here).
        return jax.jit(normalize)(x), normalize(x), jax.jit(normalize).lower(x).compile().as_text()

    *with_kernel, text = jitted_and_eager()
    assert "jbn_norm_affine" in text
    _without_affine_kernel(monkeypatch)
    *without, text = jitted_and_eager()
    assert "jbn_norm_affine" not in text
    for got, expected in zip(with_kernel, without, strict=True):
        chex.assert_trees_all_equal(got.view(jnp.uint16), expected.view(jnp.uint16))


@pytest.mark.parametrize(
    ("dtype", "shape", "axes", "why"),
    [
        (jnp.float32, (64, 12), -1, "float32: XLA's own code is as fast"),
        (jnp.bfloat16, (4, 3, 2, 5), 1, "runs of 10 elements per entry"),
        (jnp.bfloat16, (4, 5, 6, 8), (1, 3), "features along two runs of axes"),
        (jnp.bfloat16, (8, 12), -1, "fewer than 16 rows per entry"),
    ],
)
def test_the_affine_kernel_leaves_these_to_xla(dtype, shape, axes, why):
    x = data(shape, dtype)
    features = [shape[a] for a in np.atleast_1d(axes)]
    step = jax.jit(lambda x: jbn.batch_norm(x, jbn.batch_norm_state(features), training=False, feature_axes=axes)[0])
    assert "jbn_norm_affine" not in step.lower(x).compile().as_text(), why


def test_the_affine_kernel_under_vmap_and_its_derivatives_equal_the_xla_path(monkeypatch):
    """vmap over x and over the running statistics (one set of terms per mapped example), and first and second
    derivatives with respect to x, scale, bias and the statistics, equal the XLA path's."""
    x = jnp.stack([data((32, 8), jnp.bfloat16, seed=i, offset=i) for i in range(3)])
    means, variances = jnp.stack([jnp.full(8, float(i)) for i in range(3)]), jnp.linspace(0.5, 2.0, 24).reshape(3, 8)
    scale, bias = jnp.linspace(0.5, 1.5, 8), jnp.linspace(-1.0, 1.0, 8)

    def loss(x, scale, bias, mean, var):
        state = jbn.BatchNormState(mean, var, None)
        y = jbn.batch_norm(x, state, scale, bias, training=False)[0]
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    def results():
        mapped = jax.jit(
            jax.vmap(lambda x, m, v: jbn.batch_norm(x, jbn.BatchNormState(m, v, None), scale, bias, training=False)[0])
        )
        text = mapped.lower(x, means, variances).compile().as_text()
        over_x = jax.vmap(
            lambda x: jbn.batch_norm(x, jbn.BatchNormState(means[0], variances[0], None), scale, bias, training=False)[
                0
            ]
        )(x)
        args = (x[0], scale, bias, means[0], variances[0])
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)
        hessian = jax.hessian(loss, argnums=1)(*args)
        return text.count("jbn_norm_affine"), mapped(x, means, variances), over_x, grads, hessian

    calls, *with_kernel = results()
    assert calls == 1
    _without_affine_kernel(monkeypatch)
    calls, *without = results()
    assert calls == 0
    chex.assert_trees_all_close(with_kernel, without, rtol=1e-6, atol=1e-6)
