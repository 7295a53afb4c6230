"""A float64 NumPy oracle written from the formulas, independent of jbn's code."""

import functools

import numpy as np


def _axes(ndim, axes):
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(sorted(a % ndim for a in axes))


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def moments(x, axes, mask=None):
    """Two-pass masked mean and biased variance in float64; (0, 0) where nothing is selected."""
    x = _f64(x)
    axes = _axes(x.ndim, axes)
    selected = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape)
    count = selected.sum(axes)
    safe = np.maximum(count, 1)
    mean = np.where(selected, x, 0).sum(axes) / safe
    deviation = np.where(selected, x - np.expand_dims(mean, axes), 0)
    var = (deviation**2).sum(axes) / safe
    return mean, var


def _feature_view(value, ndim, feature_axes):
    shape = [1] * ndim
    for axis, size in zip(_axes(ndim, feature_axes), np.shape(value), strict=True):
        shape[axis] = size
    return np.reshape(_f64(value), shape)


def affine(x, mean, var, scale, bias, epsilon, feature_axes):
    """(x - mean) / sqrt(var + epsilon) * scale + bias, with mean and var already broadcastable to x."""
    x = _f64(x)
    y = (x - mean) / np.sqrt(var + epsilon)
    if scale is not None:
        y = y * _feature_view(scale, x.ndim, feature_axes)
    if bias is not None:
        y = y + _feature_view(bias, x.ndim, feature_axes)
    return y


def batch_norm(
    x, mean, var, scale=None, bias=None, *, training, feature_axes=-1, momentum=0.99, epsilon=1e-5, mask=None
):
    """Returns (y, new_mean, new_var)."""
    ndim = np.ndim(x)
    feature_axes = _axes(ndim, feature_axes)
    reduction = tuple(a for a in range(ndim) if a not in feature_axes)
    mean, var = _f64(mean), _f64(var)
    new_mean, new_var = mean, var
    if training:
        batch_mean, batch_var = moments(x, reduction, mask)
        selected = np.ones(np.shape(x), bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), np.shape(x))
        has_data = selected.sum(reduction) > 0
        new_mean = np.where(has_data, momentum * mean + (1 - momentum) * batch_mean, mean)
        new_var = np.where(has_data, momentum * var + (1 - momentum) * batch_var, var)
        mean, var = np.where(has_data, batch_mean, mean), np.where(has_data, batch_var, var)
    y = affine(
        x,
        _feature_view(mean, ndim, feature_axes),
        _feature_view(var, ndim, feature_axes),
        scale,
        bias,
        epsilon,
        feature_axes,
    )
    return y, new_mean, new_var


def layer_norm(x, scale=None, bias=None, *, reduction_axes=-1, feature_axes=-1, epsilon=1e-6, mask=None):
    axes = _axes(np.ndim(x), reduction_axes)
    mean, var = moments(x, axes, mask)
    return affine(x, np.expand_dims(mean, axes), np.expand_dims(var, axes), scale, bias, epsilon, feature_axes)


def rms_norm(x, scale=None, *, reduction_axes=-1, feature_axes=-1, epsilon=1e-6, mask=None):
    x = _f64(x)
    axes = _axes(x.ndim, reduction_axes)
    selected = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape)
    mean_square = np.where(selected, x * x, 0).sum(axes, keepdims=True) / np.maximum(
        selected.sum(axes, keepdims=True), 1
    )
    return affine(x, 0.0, mean_square, scale, None, epsilon, feature_axes)


def instance_norm(x, scale=None, bias=None, *, feature_axes=-1, epsilon=1e-6, mask=None):
    ndim = np.ndim(x)
    features = _axes(ndim, feature_axes)
    axes = tuple(a for a in range(1, ndim) if a not in features)
    mean, var = moments(x, axes, mask)
    return affine(x, np.expand_dims(mean, axes), np.expand_dims(var, axes), scale, bias, epsilon, feature_axes)


def group_norm(x, scale=None, bias=None, *, num_groups, feature_axis=-1, epsilon=1e-6, mask=None):
    """Loops over examples and groups explicitly, channels moved last."""
    original_shape = np.shape(x)
    x = np.moveaxis(_f64(x), feature_axis, -1)
    selected = np.ones(x.shape, bool)
    if mask is not None:
        selected = np.moveaxis(np.broadcast_to(np.asarray(mask, bool), original_shape), feature_axis, -1)
    size = x.shape[-1] // num_groups
    y = np.empty_like(x)
    for n in range(x.shape[0]):
        for g in range(num_groups):
            block = x[n, ..., g * size : (g + 1) * size]
            chosen = selected[n, ..., g * size : (g + 1) * size]
            count = max(chosen.sum(), 1)
            mean = np.where(chosen, block, 0).sum() / count
            var = (np.where(chosen, block - mean, 0) ** 2).sum() / count
            y[n, ..., g * size : (g + 1) * size] = (block - mean) / np.sqrt(var + epsilon)
    y = np.moveaxis(y, -1, feature_axis)
    ndim = y.ndim
    if scale is not None:
        y = y * _feature_view(scale, ndim, feature_axis)
    if bias is not None:
        y = y + _feature_view(bias, ndim, feature_axis)
    return y


def normalize_vjp(x, ct, axes, scale, epsilon, groups=None):
    """(dx, dscale, dbias) of ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` for cotangent `ct`.

    The textbook closed form ``dx = (g - mean(g) - xhat mean(g xhat)) / sqrt(var + epsilon)`` with
    ``g = ct * scale``, statistics over `axes`; scale and bias along the last axis. With `groups`, the last axis
    is split into that many groups and the statistics are over every axis but the first and the group axis.
    """
    x, ct, scale = _f64(x), _f64(ct), _f64(scale)
    shape = x.shape
    if groups is not None:
        x, ct, scale = (a.reshape(*a.shape[:-1], groups, -1) for a in (x, ct, scale))
        axes = (*range(1, x.ndim - 2), x.ndim - 1)
    mean = x.mean(axes, keepdims=True)
    std = np.sqrt(x.var(axes, keepdims=True) + epsilon)
    xhat = (x - mean) / std
    g = ct * scale
    dx = (g - g.mean(axes, keepdims=True) - xhat * (g * xhat).mean(axes, keepdims=True)) / std
    batch_axes = tuple(range(x.ndim - (2 if groups is not None else 1)))
    dscale = (ct * xhat).sum(batch_axes).reshape(-1)
    dbias = ct.sum(batch_axes).reshape(-1)
    return dx.reshape(shape), dscale, dbias


def batch_renorm(x, mean, var, scale, bias, *, rmax, dmax, feature_axes=-1, momentum=0.99, epsilon=1e-5):
    """Ioffe's training-mode batch renormalization; returns (y, new_mean, new_var)."""
    x = _f64(x)
    features = _axes(x.ndim, feature_axes)
    reduction = tuple(a for a in range(x.ndim) if a not in features)
    batch_mean, batch_var = moments(x, reduction)
    mean, var = _f64(mean), _f64(var)
    sigma, batch_sigma = np.sqrt(var + epsilon), np.sqrt(batch_var + epsilon)
    r = np.clip(batch_sigma / sigma, 1 / rmax, rmax)
    d = np.clip((batch_mean - mean) / sigma, -dmax, dmax)
    view = functools.partial(_feature_view, ndim=x.ndim, feature_axes=features)
    xhat = (x - view(batch_mean)) / view(batch_sigma)
    y = xhat * view(r) + view(d)
    y = y if scale is None else y * view(scale)
    y = y if bias is None else y + view(bias)
    return y, momentum * mean + (1 - momentum) * batch_mean, momentum * var + (1 - momentum) * batch_var


def ghost_batch_norm(
    x, mean, var, scale, bias, *, virtual_batch_size, feature_axes=-1, momentum=0.99, epsilon=1e-5, mask=None
):
    """Batch norm on each run of `virtual_batch_size` examples; running statistics from the mean over the runs
    with data of their statistics. Returns (y, new_mean, new_var)."""
    x = _f64(x)
    selected = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape)
    features = _axes(x.ndim, feature_axes)
    reduction = tuple(a for a in range(x.ndim) if a not in features)
    y = np.empty_like(x)
    means, variances, present = [], [], []
    for start in range(0, x.shape[0], virtual_batch_size):
        part = slice(start, start + virtual_batch_size)
        part_y, _, _ = batch_norm(
            x[part],
            mean,
            var,
            scale,
            bias,
            training=True,
            feature_axes=features,
            momentum=0.0,
            epsilon=epsilon,
            mask=selected[part],
        )
        y[part] = part_y
        part_mean, part_var = moments(x[part], reduction, selected[part])
        means.append(part_mean)
        variances.append(part_var)
        present.append(selected[part].sum(reduction) > 0)
    present = np.array(present)
    count = present.sum(0)
    batch_mean = np.where(present, np.array(means), 0).sum(0) / np.maximum(count, 1)
    batch_var = np.where(present, np.array(variances), 0).sum(0) / np.maximum(count, 1)
    new_mean = np.where(count > 0, momentum * _f64(mean) + (1 - momentum) * batch_mean, mean)
    new_var = np.where(count > 0, momentum * _f64(var) + (1 - momentum) * batch_var, var)
    return y, new_mean, new_var
