"""The implementations `speed.py` compares: jbn and each peer, as functions of (x, params, state[, cotangent]).

Every row builds, for a workload, two jitted callables (PyTorch: plain ones):

* ``forward(x, params, state) -> (y, new_state)``
* ``train(x, params, state, ct) -> (y, new_state, dx, dparams)``: the forward pass and the backward pass of the
  cotangent `ct`, as in a training step.

and reports the residuals its autodiff keeps for the backward pass (bytes). A row returns None for a workload it
cannot express. Peers use their defaults (Flax's fast variance included); layouts are the workload's, except that
Equinox only has channels-first layers, so it gets NCHW data of the same size (said in the table).
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jbn


@dataclasses.dataclass(frozen=True)
class Workload:
    norm: str  # batch, batch_eval, layer, rms, group, instance
    shape: tuple[int, ...]
    channels_last: bool = True

    @property
    def channel_axis(self) -> int:
        return -1 if self.channels_last or len(self.shape) == 2 else 1

    @property
    def channels(self) -> int:
        return self.shape[self.channel_axis]

    @property
    def name(self) -> str:
        layout = "" if len(self.shape) < 4 else (" NHWC" if self.channels_last else " NCHW")
        return f"{self.norm} {'x'.join(map(str, self.shape))}{layout}"


def workloads(quick: bool) -> list[Workload]:
    if quick:
        return [
            Workload("batch", (16, 32)),
            Workload("batch", (4, 4, 4, 8), channels_last=False),
            Workload("batch_eval", (4, 4, 4, 8)),
            Workload("layer", (2, 8, 32)),
            Workload("rms", (2, 8, 32)),
            Workload("group", (2, 4, 4, 64)),
            Workload("group", (2, 64, 4, 4), channels_last=False),
            Workload("instance", (2, 4, 4, 8)),
        ]
    return [
        Workload("batch", (256, 1024)),
        Workload("batch", (4096, 512)),
        Workload("batch", (64, 32, 32, 64)),
        Workload("batch", (64, 64, 32, 32), channels_last=False),
        Workload("batch_eval", (64, 32, 32, 64)),
        Workload("layer", (16, 512, 768)),
        Workload("rms", (16, 512, 768)),
        Workload("group", (32, 32, 32, 128)),
        Workload("group", (32, 128, 32, 32), channels_last=False),
        Workload("instance", (32, 32, 32, 64)),
    ]


def wait_jax(value):
    """Returns once every JAX array in `value` is computed."""
    return jax.block_until_ready(value)


@dataclasses.dataclass
class Built:
    forward: Callable
    train: Callable
    params: object
    state: object
    residual_bytes: Callable
    note: str = ""
    to_native: Callable = lambda x: x
    wait: Callable = wait_jax  # wait(result of forward or train) returns once it is computed


def _jax_row(apply, params, state) -> Built:
    """`apply(x, params, state) -> (y, new_state)`, with its forward+backward and residuals."""

    def train(x, params, state, ct):
        (y, new_state), pullback = jax.vjp(apply, x, params, state)
        # Flax and Haiku return float32 for bfloat16 inputs with float32 parameters; the cotangent matches y.
        dx, dparams, _ = pullback((ct.astype(y.dtype), jax.tree.map(jnp.zeros_like, new_state)))
        return y, new_state, dx, dparams

    def residual_bytes(x):
        pullback = jax.jit(lambda x, p, s: jax.vjp(lambda *a: apply(*a)[0], x, p, s)[1])(x, params, state)
        buffers = {leaf.unsafe_buffer_pointer(): leaf.nbytes for leaf in jax.tree.leaves(pullback)}
        return sum(buffers.values())

    return Built(jax.jit(apply), jax.jit(train), params, state, residual_bytes)


def _scale_bias(channels):
    return {"scale": jnp.linspace(0.5, 1.5, channels), "bias": jnp.linspace(-0.1, 0.1, channels)}


def build_jbn(w: Workload) -> Built:
    c, axis = w.channels, w.channel_axis
    params = _scale_bias(c)
    if w.norm in ("batch", "batch_eval"):
        training = w.norm == "batch"

        def apply(x, p, state):
            return jbn.batch_norm(x, state, p["scale"], p["bias"], training=training, feature_axes=axis)

        return _jax_row(apply, params, jbn.batch_norm_state(c))
    fn = {
        "layer": lambda x, p: jbn.layer_norm(x, p["scale"], p["bias"]),
        "rms": lambda x, p: jbn.rms_norm(x, p["scale"]),
        "group": lambda x, p: jbn.group_norm(x, p["scale"], p["bias"], num_groups=32, feature_axes=axis),
        "instance": lambda x, p: jbn.instance_norm(x, p["scale"], p["bias"], feature_axes=axis),
    }[w.norm]
    return _jax_row(lambda x, p, state: (fn(x, p), state), params, ())


def _linen_module(w: Workload):
    import flax.linen as nn

    axis = w.channel_axis
    return {
        "batch": lambda: nn.BatchNorm(use_running_average=False, axis=axis),
        "batch_eval": lambda: nn.BatchNorm(use_running_average=True, axis=axis),
        "layer": nn.LayerNorm,
        "rms": nn.RMSNorm,
        "group": lambda: nn.GroupNorm(num_groups=32),
        "instance": lambda: nn.InstanceNorm(feature_axes=axis),
    }[w.norm]()


def _channels_last_only(build, w: Workload) -> Built | None:
    """Flax's GroupNorm takes channels-last data only: an NCHW workload runs on the same values transposed to NHWC
    (outside the timed calls), as Equinox's rows run NHWC workloads channels first."""
    nhwc = dataclasses.replace(w, shape=(w.shape[0], *w.shape[2:], w.shape[1]), channels_last=True)
    built = build(nhwc)
    if built is not None:
        built.note = "NHWC"
        built.to_native = lambda x: jnp.transpose(x, (0, 2, 3, 1))
    return built


def build_linen(w: Workload) -> Built | None:
    if w.norm == "group" and not w.channels_last:
        return _channels_last_only(build_linen, w)
    module = _linen_module(w)
    if module is None:
        return None
    variables = module.init(jax.random.key(0), jnp.zeros(w.shape))
    state = variables.get("batch_stats", {})
    values = _scale_bias(w.channels)
    params = {"params": {name: values[name].reshape(v.shape) for name, v in variables["params"].items()}}

    def apply(x, p, state):
        if w.norm == "batch":
            y, updates = module.apply({**p, "batch_stats": state}, x, mutable=["batch_stats"])
            return y, updates["batch_stats"]
        return module.apply({**p, "batch_stats": state} if state else p, x), state

    return _jax_row(apply, params, state)


def build_nnx(w: Workload) -> Built | None:
    from flax import nnx

    if w.norm == "group" and not w.channels_last:
        return _channels_last_only(build_nnx, w)
    rngs, c, axis = nnx.Rngs(0), w.channels, w.channel_axis
    module = {
        "batch": lambda: nnx.BatchNorm(c, axis=axis, rngs=rngs),
        "batch_eval": lambda: nnx.BatchNorm(c, axis=axis, use_running_average=True, rngs=rngs),
        "layer": lambda: nnx.LayerNorm(c, rngs=rngs),
        "rms": lambda: nnx.RMSNorm(c, rngs=rngs),
        "group": lambda: nnx.GroupNorm(c, num_groups=32, rngs=rngs),
        "instance": lambda: nnx.InstanceNorm(c, feature_axes=axis, rngs=rngs) if w.channels_last else None,
    }[w.norm]()
    if module is None:
        return None
    graphdef, params, state = nnx.split(module, nnx.Param, ...)

    def apply(x, p, state):
        model = nnx.merge(graphdef, p, state)
        y = model(x)
        return y, nnx.state(model, nnx.BatchStat)

    return _jax_row(apply, params, state)


def build_haiku(w: Workload) -> Built | None:
    import haiku as hk

    fmt = "channels_last" if w.channels_last or len(w.shape) == 2 else "channels_first"

    def layer(x, is_training):
        if w.norm in ("batch", "batch_eval"):
            return hk.BatchNorm(True, True, 0.99, data_format=fmt)(x, is_training=is_training)
        return {
            "layer": lambda: hk.LayerNorm(axis=-1, create_scale=True, create_offset=True),
            "rms": lambda: hk.RMSNorm(axis=-1),
            "group": lambda: hk.GroupNorm(groups=32, data_format=fmt),
            "instance": lambda: hk.InstanceNorm(True, True, data_format=fmt),
        }[w.norm]()(x)

    transformed = hk.transform_with_state(layer)
    params, state = transformed.init(jax.random.key(0), jnp.zeros(w.shape), True)

    def apply(x, p, state):
        return transformed.apply(p, state, None, x, w.norm != "batch_eval")

    return _jax_row(apply, params, state)


def build_equinox(w: Workload) -> Built | None:
    import equinox as eqx

    c = w.channels
    if w.norm in ("layer", "rms"):
        layer = eqx.nn.LayerNorm(c) if w.norm == "layer" else eqx.nn.RMSNorm(c)
        params, static = eqx.partition(layer, eqx.is_array)

        def apply(x, p, state):
            per_token = eqx.combine(p, static)
            return jnp.vectorize(per_token, signature="(c)->(c)")(x), state

        return _jax_row(apply, params, ())
    if w.norm == "batch_eval":
        return None
    if w.norm in ("group", "instance"):
        layer = eqx.nn.GroupNorm(32 if w.norm == "group" else c, c)
        params, static = eqx.partition(layer, eqx.is_array)

        def apply(x, p, state):
            return jax.vmap(eqx.combine(p, static))(x), state

        built = _jax_row(apply, params, ())
    else:
        layer, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(c, axis_name="batch", mode="batch")
        params, static = eqx.partition(layer, eqx.is_array)

        def apply(x, p, state):
            vmapped = jax.vmap(eqx.combine(p, static), axis_name="batch", in_axes=(0, None), out_axes=(0, None))
            return vmapped(x, state)

        built = _jax_row(apply, params, state)
    if w.channels_last and len(w.shape) == 4:
        # Equinox's convolution-style layers are channels-first, (C, H, W) per example: same bytes, NCHW order.
        built.note = "NCHW"
        built.to_native = lambda x: jnp.transpose(x, (0, 3, 1, 2))
    return built


def _torch_device(torch) -> str:
    """PyTorch's device for the rows: its GPU where JAX runs on a GPU and PyTorch sees one, else the CPU."""
    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def build_torch(w: Workload) -> Built | None:
    import torch
    import torch.nn.functional as functional

    c, device = w.channels, _torch_device(torch)
    scale = torch.linspace(0.5, 1.5, c, device=device, requires_grad=True)
    bias = torch.linspace(-0.1, 0.1, c, device=device, requires_grad=True)
    memory_format = torch.channels_last if (w.channels_last and len(w.shape) == 4) else torch.contiguous_format

    def weights(x):
        """On CUDA, PyTorch's layer and group norm take bfloat16 x only with weights of x's dtype."""
        return (scale, bias) if device == "cpu" else (scale.to(x.dtype), bias.to(x.dtype))

    def layer(x, state):
        if w.norm in ("batch", "batch_eval"):
            mean, var = state
            return functional.batch_norm(x, mean, var, scale, bias, training=w.norm == "batch", momentum=0.01, eps=1e-5)
        if w.norm == "layer":
            return functional.layer_norm(x, (c,), *weights(x), eps=1e-6)
        if w.norm == "rms":
            return functional.rms_norm(x, (c,), scale, eps=1e-6)
        if w.norm == "group":
            return functional.group_norm(x, 32, *weights(x), eps=1e-6)
        return functional.instance_norm(x, weight=scale, bias=bias, eps=1e-6)

    def to_torch(x):
        """NHWC workloads: a channels-last NCHW tensor (the same bytes in memory)."""
        array = np.array(jnp.asarray(x, jnp.float32))
        t = torch.from_numpy(array)
        if w.channels_last and len(w.shape) == 4:
            t = t.permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
        dtype = torch.bfloat16 if x.dtype == jnp.bfloat16 else torch.float32
        return t.to(device=device, dtype=dtype)

    state = (torch.zeros(c, device=device), torch.ones(c, device=device))

    def forward(x, params, state):
        with torch.no_grad():
            return layer(x, state), state

    def train(x, params, state, ct):
        x = x.detach().requires_grad_(True)
        scale.grad = bias.grad = None
        y = layer(x, state)
        y.backward(ct)
        return y, state, x.grad, (scale.grad, bias.grad)

    def residual_bytes(x):
        saved = {}

        def pack(t):
            saved[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
            return t

        x = x.detach().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x, state)
        return sum(saved.values())

    def wait(result):
        if device == "cuda":
            torch.cuda.synchronize()
        return result

    return Built(forward, train, None, state, residual_bytes, to_native=to_torch, wait=wait)


ROWS = {
    "jbn": build_jbn,
    "flax.linen": build_linen,
    "flax.nnx": build_nnx,
    "haiku": build_haiku,
    "equinox": build_equinox,
    "torch": build_torch,
}


def available(names) -> tuple[dict, list[str]]:
    """The rows among `names` whose library imports, and the others, each with the reason it did not."""
    import importlib

    modules = {"flax.linen": "flax", "flax.nnx": "flax", "haiku": "haiku", "equinox": "equinox", "torch": "torch"}
    rows, missing = {}, []
    for name in names:
        try:
            if name in modules:
                importlib.import_module(modules[name])
            rows[name] = ROWS[name]
        except Exception as error:  # not installed, or broken against this JAX (an AttributeError at import)
            missing.append(f"{name} ({type(error).__name__}: {str(error)[:80]})")
    return rows, missing
