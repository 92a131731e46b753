"""Float64 NumPy references for training dynamics: running statistics and gradients.

Written from the formulas, independently of brainnorm's code. Complements
tests/reference.py (statistics and outputs).
"""

from __future__ import annotations

import numpy as np


def _valid(x, mask):
    return np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape)


def batch_moments(x, axes, mask=None):
    """Mean, biased variance and valid count over ``axes`` (squeezed), in float64."""
    x = np.asarray(x, np.float64)
    valid = _valid(x, mask)
    count = valid.sum(axis=axes)
    safe = np.maximum(count, 1)
    mean = np.where(valid, x, 0).sum(axis=axes) / safe
    var = np.where(valid, (x - np.expand_dims(mean, axes)) ** 2, 0).sum(axis=axes) / safe
    return mean, var, count


def apply_stats(x, mean, var, eps, scale=None, bias=None):
    """``(x - mean) / sqrt(var + eps) * scale + bias`` with given statistics."""
    y = (np.asarray(x, np.float64) - np.asarray(mean, np.float64)) / np.sqrt(np.asarray(var, np.float64) + eps)
    if scale is not None:
        y = y * np.asarray(scale, np.float64)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


def instance_running_update(old_mean, old_var, x, instance_axes, batch_axes, momentum, mask=None, unbiased=False):
    """One InstanceNorm training step of PyTorch-style running statistics.

    Per-instance mean and variance over ``instance_axes`` (with ``n/(n-1)``
    per instance when ``unbiased``), averaged over the instances (``batch_axes``)
    that have at least one valid element; channels without any such instance
    keep their old values. Returns arrays with ``instance_axes`` and
    ``batch_axes`` removed.
    """
    x = np.asarray(x, np.float64)
    valid = _valid(x, mask)
    count = valid.sum(axis=instance_axes, keepdims=True)
    safe = np.maximum(count, 1)
    mean = np.where(valid, x, 0).sum(axis=instance_axes, keepdims=True) / safe
    var = np.where(valid, (x - mean) ** 2, 0).sum(axis=instance_axes, keepdims=True) / safe
    if unbiased:
        var = var * count / np.maximum(count - 1, 1)
    has = (count > 0).astype(np.float64)
    all_axes = tuple(sorted(set(instance_axes) | set(batch_axes)))
    instances = has.sum(axis=all_axes)
    batch_mean = (has * mean).sum(axis=all_axes) / np.maximum(instances, 1)
    batch_var = (has * var).sum(axis=all_axes) / np.maximum(instances, 1)
    new_mean = momentum * np.asarray(old_mean, np.float64) + (1 - momentum) * batch_mean
    new_var = momentum * np.asarray(old_var, np.float64) + (1 - momentum) * batch_var
    return np.where(instances > 0, new_mean, old_mean), np.where(instances > 0, new_var, old_var)


def normalize_vjp(x, g, axes, eps, scale=None, mask=None):
    """Backward pass of ``y = (x - mean) / sqrt(var + eps) * scale + bias``.

    Statistics over ``axes`` from the valid positions only; every position
    (masked ones too) is transformed, and a group without valid elements
    gives ``y = bias``. ``g`` is dL/dy. Returns ``(dL/dx, g * x_hat)``: the
    scale gradient is ``g * x_hat`` summed over the axes the scale is shared
    across, the bias gradient is ``g`` summed likewise.

    With ``v`` the valid indicator, ``n`` the valid count, ``s = sqrt(var + eps)``
    and ``h = g * scale``:
    ``dL/dx_i = (h_i - v_i/n * sum h - v_i * xhat_i / n * sum(h * xhat)) / s``.
    """
    x = np.asarray(x, np.float64)
    g = np.broadcast_to(np.asarray(g, np.float64), x.shape)
    axes = tuple(a % x.ndim for a in np.atleast_1d(axes))
    v = _valid(x, mask).astype(np.float64)
    n = v.sum(axis=axes, keepdims=True)
    safe = np.maximum(n, 1)
    mean = (v * x).sum(axis=axes, keepdims=True) / safe
    var = (v * (x - mean) ** 2).sum(axis=axes, keepdims=True) / safe
    s = np.sqrt(var + eps)
    xhat = np.where(n > 0, (x - mean) / s, 0.0)
    h = g if scale is None else g * np.asarray(scale, np.float64)
    sum_h = h.sum(axis=axes, keepdims=True)
    sum_hx = (h * xhat).sum(axis=axes, keepdims=True)
    dx = (h - v / safe * sum_h - v * xhat / safe * sum_hx) / s
    dx = np.where(n > 0, dx, 0.0)
    return dx, g * xhat
