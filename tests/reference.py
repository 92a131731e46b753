"""Independent float64 NumPy references for every normalization.

Written from the formulas, not from brainnorm's code: plain two-pass
statistics in float64 over explicit axes, with masks as boolean weights.
"""

from __future__ import annotations

import numpy as np


def moments(x, axes, mask=None, use_mean=True):
    """Mean and biased variance over ``axes`` (kept), valid count; empty groups give 0."""
    x = np.asarray(x, np.complex128 if np.iscomplexobj(x) else np.float64)
    axes = tuple(a % x.ndim for a in np.atleast_1d(axes))
    valid = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape)
    count = valid.sum(axis=axes, keepdims=True)
    safe = np.maximum(count, 1)
    mean = np.where(valid, x, 0).sum(axis=axes, keepdims=True) / safe if use_mean else np.zeros(count.shape)
    var = np.where(valid, np.abs(x - mean) ** 2, 0).sum(axis=axes, keepdims=True) / safe
    return mean, var, count


def normalize(x, axes, mask=None, eps=1e-6, scale=None, bias=None, use_mean=True):
    """``(x - mean) / sqrt(var + eps) * scale + bias``; groups without valid elements give ``bias``."""
    x64 = np.asarray(x, np.float64)
    mean, var, count = moments(x64, axes, mask, use_mean)
    y = np.where(count > 0, (x64 - mean) / np.sqrt(var + eps), 0.0)
    if scale is not None:
        y = y * np.asarray(scale, np.float64)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


def group_normalize(x, num_groups, feature_axis, axes, mask=None, eps=1e-6, scale=None, bias=None):
    """Group norm: ``feature_axis`` split into groups, statistics over ``axes`` (incl. the channels)."""
    x64 = np.asarray(x, np.float64)
    feature_axis %= x64.ndim
    axes = tuple(a % x64.ndim for a in np.atleast_1d(axes))
    channels = x64.shape[feature_axis]
    y = np.empty_like(x64)
    full_mask = None if mask is None else np.broadcast_to(np.asarray(mask, bool), x64.shape)
    size = channels // num_groups
    for g in range(num_groups):
        sl = [slice(None)] * x64.ndim
        sl[feature_axis] = slice(g * size, (g + 1) * size)
        sl = tuple(sl)
        y[sl] = normalize(x64[sl], axes, None if full_mask is None else full_mask[sl], eps)
    if scale is not None:
        y = y * np.asarray(scale, np.float64)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


def running_update(old_mean, old_var, x, axes, momentum, mask=None, unbiased=False):
    """One BatchNorm training step of the running statistics (flax momentum convention)."""
    mean, var, count = moments(x, axes, mask)
    mean, var, count = (np.squeeze(a, axis=tuple(axes)) for a in (mean, var, count))
    if unbiased:
        var = var * count / np.maximum(count - 1, 1)
    new_mean = momentum * np.asarray(old_mean, np.float64) + (1 - momentum) * mean
    new_var = momentum * np.asarray(old_var, np.float64) + (1 - momentum) * var
    return np.where(count > 0, new_mean, old_mean), np.where(count > 0, new_var, old_var)


def local_response_norm(x, size, alpha=1e-4, beta=0.75, k=1.0, feature_axis=-1):
    """PyTorch's LRN: window of ``size`` channels, zero padding size//2 before, (size-1)//2 after."""
    x64 = np.moveaxis(np.asarray(x, np.float64), feature_axis, -1)
    channels = x64.shape[-1]
    squares = x64**2
    window_sum = np.zeros_like(x64)
    for c in range(channels):
        lo, hi = max(0, c - size // 2), min(channels, c + (size - 1) // 2 + 1)
        window_sum[..., c] = squares[..., lo:hi].sum(-1)
    y = x64 * (k + alpha / size * window_sum) ** (-beta)
    return np.moveaxis(y, -1, feature_axis)


def weight_standardization(w, eps=1e-4, gain=None, out_axis=-1):
    w64 = np.asarray(w, np.float64)
    out_axis %= w64.ndim
    axes = tuple(a for a in range(w64.ndim) if a != out_axis)
    fan_in = int(np.prod([w64.shape[a] for a in axes]))
    mean = w64.mean(axis=axes, keepdims=True)
    var = w64.var(axis=axes, keepdims=True)
    y = (w64 - mean) / np.sqrt(np.maximum(var * fan_in, eps))
    return y if gain is None else y * np.asarray(gain, np.float64)


def apply_stats(x, mean, var, eps, scale=None, bias=None):
    """``(x - mean) / sqrt(var + eps) * scale + bias`` with given statistics, in float64."""
    y = (np.asarray(x, np.float64) - np.asarray(mean, np.float64)) / np.sqrt(np.asarray(var, np.float64) + eps)
    if scale is not None:
        y = y * np.asarray(scale, np.float64)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


def masked_local_response_norm(x, size, mask, alpha=1e-4, beta=0.75, k=1.0, feature_axis=-1):
    """LRN whose window sums leave out masked positions (their squares read as 0)."""
    x64 = np.asarray(x, np.float64)
    valid = np.broadcast_to(np.asarray(mask, bool), x64.shape)
    squares = np.moveaxis(np.where(valid, x64**2, 0.0), feature_axis, -1)
    channels = squares.shape[-1]
    window_sum = np.zeros_like(squares)
    for c in range(channels):
        lo, hi = max(0, c - size // 2), min(channels, c + (size - 1) // 2 + 1)
        window_sum[..., c] = squares[..., lo:hi].sum(-1)
    factor = np.moveaxis((k + alpha / size * window_sum) ** (-beta), -1, feature_axis)
    return x64 * factor
