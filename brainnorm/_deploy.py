r"""Deployment without normalization: folding running statistics into weights and thresholds.

In evaluation a BatchNorm-family layer is a per-channel affine map,

.. math:: \mathrm{BN}(z) = g\,\frac{z - \hat\mu}{\sqrt{\hat\sigma^2 + \epsilon}} + \beta,

(``g`` is :math:`\gamma`, times :math:`\alpha V_{th}` for tdBN), so it can be
removed before a network is deployed, for example on neuromorphic hardware:

* :func:`fold_batch_norm` merges it into the preceding ``Linear`` or
  ``Conv`` (PyTorch's ``fuse_linear_bn_eval`` / ``fuse_conv_bn_eval``);
* :func:`fold_threshold` merges a normalization of the membrane potential
  (MPBN) into a per-channel firing threshold.
"""

from __future__ import annotations

from typing import TypeVar

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np

from . import _units
from ._batch_norm import BatchNorm0d, BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchRenorm
from ._temporal import ThresholdDependentBatchNorm
from ._typing import Array, Output, Value

__all__ = ["fold_batch_norm", "fold_threshold"]

_CONVS = (brainstate.nn.Conv1d, brainstate.nn.Conv2d, brainstate.nn.Conv3d)


def _norm_affine(owner, norm):
    """``(mean, std, g, beta, stats_unit, out_unit)`` of ``norm`` in evaluation, as per-statistic mantissas.

    ``mean`` and ``std = sqrt(running_var + eps)`` are in ``stats_unit``;
    ``g`` (the effective scale) and ``beta`` in ``out_unit`` (the unit of the
    layer's scale, None when dimensionless). Shapes: the running statistics'.
    """
    for attribute in ("running_mean", "running_var", "epsilon", "feature_axes", "in_size"):
        if not hasattr(norm, attribute):
            raise TypeError(
                f"{owner}: norm must be a BatchNorm-family layer (BatchNorm0d-3d, BatchRenorm, "
                f"ThresholdDependentBatchNorm), got {type(norm).__name__}."
            )
    if not getattr(norm, "track_running_stats", True) or norm.running_mean is None:
        raise ValueError(
            f"{owner}: norm must track running statistics (track_running_stats=True): without them it "
            f"normalizes with batch statistics, which no fixed weights can reproduce."
        )
    if hasattr(norm, "p"):
        raise ValueError(
            f"{owner}: norm must apply one affine map at every step, got {type(norm).__name__}, whose "
            f"per-step weights p cannot be folded into one layer."
        )
    mean, stats_unit = _units.split(norm.running_mean.value)
    feature_shape = tuple(d if i in norm.feature_axes else 1 for i, d in enumerate(norm.in_size))
    if tuple(np.shape(mean)) != feature_shape:
        raise ValueError(
            f"{owner}: norm must have one running statistic per channel (shape {feature_shape}), got "
            f"{type(norm).__name__} with running statistics of shape {tuple(np.shape(mean))} (per-step "
            f"statistics cannot be folded into one layer)."
        )
    var = _units.in_unit(owner, "running_var", norm.running_var.value, None if stats_unit is None else stats_unit**2)
    eps = _units.epsilon_value(owner, norm.epsilon, stats_unit)
    std = jnp.sqrt(jnp.asarray(var) + eps)
    params = {} if getattr(norm, "weight", None) is None else norm.weight.value
    scale, bias, out_unit = _units.affine_units(owner, params.get("scale"), params.get("bias"))
    g = jnp.ones(feature_shape, std.dtype) if scale is None else jnp.asarray(scale)
    if isinstance(norm, ThresholdDependentBatchNorm):
        g = g * (norm.alpha * norm.v_th)
    beta = jnp.zeros(feature_shape, std.dtype) if bias is None else jnp.asarray(bias)
    return jnp.asarray(mean), std, g, beta, stats_unit, out_unit


def _with_unit(value, unit):
    """``value`` carrying ``unit`` (a brainunit Unit, possibly dimensionless) or plain."""
    if unit is None or (isinstance(unit, u.Unit) and unit.is_unitless):
        return value
    return u.Quantity(value, unit=unit)


_Layer = TypeVar("_Layer", bound=brainstate.nn.Module)
#: The layers whose evaluation-mode affine map can be folded.
FoldableNorm = BatchNorm0d | BatchNorm1d | BatchNorm2d | BatchNorm3d | BatchRenorm | ThresholdDependentBatchNorm


def fold_batch_norm(layer: _Layer, norm: FoldableNorm) -> _Layer:
    r"""A new layer equal to ``norm(layer(x))`` with ``norm`` in evaluation mode.

    For a ``brainstate.nn.Linear`` or ``Conv1d/2d/3d`` followed by a
    BatchNorm-family layer on its output channels, with
    :math:`s = g / \sqrt{\hat\sigma^2 + \epsilon}` per output channel:

    .. math:: W' = W\, s, \qquad b' = (b - \hat\mu)\, s + \beta

    (:math:`b = 0` for a layer without bias, which gains one). The result is a
    copy of ``layer`` (same class, options and weight mask) with ``W'`` and
    ``b'``; ``layer`` and ``norm`` are not changed. Like PyTorch's
    ``fuse_linear_bn_eval`` / ``fuse_conv_bn_eval``.

    Parameters
    ----------
    layer : brainstate.nn.Linear or brainstate.nn.Conv1d/Conv2d/Conv3d
        Channels last (``Linear``, ``Conv`` by default) or channels first
        (``Conv(channel_first=True)``).
    norm : BatchNorm0d-3d, BatchRenorm or ThresholdDependentBatchNorm
        With ``in_size`` equal to ``layer.out_size`` and its feature axis on
        the layer's output channels; ``track_running_stats=True``. Running
        statistics with units (e.g. mV) are fine when the layer's output has
        them (e.g. a weight in mV).

    Returns
    -------
    brainstate.nn.Module
        A new layer of the class of ``layer``.

    Raises
    ------
    TypeError
        A layer or norm of another kind.
    ValueError
        Channels or shapes that do not match, a norm without running
        statistics, or per-step statistics/weights (BNTT, TEBN, TAB).

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, brainnorm
    >>> from brainnorm._deploy import fold_batch_norm
    >>> fc, bn = brainstate.nn.Linear(4, 3), brainnorm.BatchNorm0d(3)
    >>> x = brainstate.random.normal(size=(16, 4))
    >>> with brainstate.environ.context(fit=True):
    ...     _ = bn(fc(x))
    >>> folded = fold_batch_norm(fc, bn)
    >>> bool(jnp.allclose(folded(x), bn(fc(x), use_running_average=True), atol=1e-5))
    True
    """
    return _fold_batch_norm(layer, norm)


def _fold_batch_norm(layer, norm):
    """:func:`fold_batch_norm` on untyped arguments (brainstate types a layer's sizes loosely)."""
    owner = "fold_batch_norm"
    if isinstance(layer, brainstate.nn.Linear):
        out_size = tuple(layer.out_size)
        channel_axis = len(out_size) - 1
        channels = out_size[-1]
        bias_shape = (channels,)
    elif isinstance(layer, _CONVS):
        out_size = tuple(layer.out_size)
        channel_axis = 0 if layer.channel_first else len(out_size) - 1
        channels = layer.out_channels
        spatial = (1,) * layer.num_spatial_dims
        bias_shape = (1, channels) + spatial if layer.channel_first else spatial + (channels,)
    else:
        raise TypeError(
            f"{owner}: layer must be a brainstate.nn.Linear, Conv1d, Conv2d or Conv3d, got {type(layer).__name__}."
        )
    mean, std, g, beta, stats_unit, out_unit = _norm_affine(owner, norm)
    if tuple(norm.feature_axes) != (channel_axis,) or norm.in_size[channel_axis] != channels:
        raise ValueError(
            f"{owner}: norm must normalize the {channels} output channels of the layer (axis "
            f"{channel_axis} of its output {out_size}), got {type(norm).__name__} with in_size={norm.in_size} "
            f"and feature axes {tuple(norm.feature_axes)}."
        )
    if tuple(norm.in_size) != out_size:
        raise ValueError(
            f"{owner}: norm must take the layer's output shape {out_size} as its in_size, got "
            f"in_size={tuple(norm.in_size)}."
        )
    # per output channel
    mean, std, g, beta = (jnp.reshape(v, (channels,)) for v in (mean, std, g, beta))
    factor = g / std  # unit out_unit / stats_unit
    params = dict(layer.weight.value)
    weight_m, weight_unit = _units.split(params["weight"])
    weight_m = jnp.asarray(weight_m)
    # the kernel's output channels are its last axis (Linear: (in, out); Conv: (*kernel, in / groups, out))
    new_weight = (weight_m * factor).astype(weight_m.dtype)
    if "bias" in params:
        bias_m, bias_unit = _units.split(params["bias"])
        if bias_unit is None and stats_unit is not None and not np.any(np.asarray(bias_m)):
            layer_bias = jnp.asarray(bias_m)  # a plain zero bias adds to a Quantity output (brainunit allows 0)
        else:
            layer_bias = jnp.asarray(_units.in_unit(owner, "the layer's bias", params["bias"], stats_unit))
        layer_bias = jnp.reshape(layer_bias, (channels,))
    else:
        layer_bias = jnp.zeros((channels,), weight_m.dtype)
    new_bias = (layer_bias - mean) * factor + beta
    factor_unit = _divide_units(out_unit, stats_unit)
    params["weight"] = _with_unit(new_weight, _multiply_units(weight_unit, factor_unit))
    bias_dtype = jnp.result_type(_units.split(params["bias"])[0]) if "bias" in params else weight_m.dtype
    params["bias"] = _with_unit(jnp.reshape(new_bias, bias_shape).astype(bias_dtype), out_unit)
    folded = brainstate.graph.clone(layer)
    folded.weight.value = params
    return folded


def _divide_units(numerator, denominator):
    if denominator is None:
        return numerator
    return (u.UNITLESS if numerator is None else numerator) / denominator


def _multiply_units(first, second):
    if first is None:
        return second
    if second is None:
        return first
    return first * second


def _check_threshold(owner, v_th, dtype):
    """``v_th`` (a mantissa) as an array of finite real numbers in ``dtype``.

    A NaN threshold would make every comparison false, and one beyond the
    dtype's range would round to inf: refused here rather than folded into a
    threshold that silently never (or always) fires.
    """
    expected = "a finite real number or array (in the unit of the norm's scale and bias)"
    if isinstance(v_th, (bool, np.bool_, str, bytes)) or v_th is None:
        raise TypeError(f"{owner}: v_th must be {expected}, got {type(v_th).__name__} {v_th!r:.80}.")
    if isinstance(v_th, jax.core.Tracer):
        return v_th.astype(dtype)  # traced: its values are not known here
    try:
        values = np.asarray(v_th)
    except (TypeError, ValueError):  # ragged nesting
        values = np.asarray(None)
    if values.dtype.kind not in "iuf":
        raise TypeError(f"{owner}: v_th must be {expected}, got {type(v_th).__name__} {v_th!r:.80}.")
    with np.errstate(over="ignore"):
        cast = values.astype(dtype)
    if not np.all(np.isfinite(cast)):
        raise ValueError(f"{owner}: v_th must be {expected} within {np.dtype(dtype).name}'s range, got {v_th!r:.80}.")
    return jnp.asarray(cast)


def fold_threshold(norm: FoldableNorm, v_th: Value) -> tuple[Output, Array]:
    r"""Per-channel thresholds that fold a membrane-potential normalization (MPBN) away.

    MPBN (Guo et al., ICCV 2023) normalizes the membrane potential ``u``
    before the spike, :math:`s = H(\mathrm{BN}(u) - V_{th})` with
    :math:`H(x) = 1` for :math:`x \ge 0`. With ``norm`` in evaluation,
    :math:`\mathrm{BN}(u) = g (u - \hat\mu) / \sigma + \beta`
    (:math:`\sigma = \sqrt{\hat\sigma^2 + \epsilon}`), so

    .. math::

        H(\mathrm{BN}(u) - V_{th}) = H(\mathrm{sign}\,(u - \theta)), \qquad
        \theta = \hat\mu + \frac{(V_{th} - \beta)\,\sigma}{g}, \quad
        \mathrm{sign} = \mathrm{sign}(g)

    for every ``u`` other than :math:`\theta`. Where :math:`g = 0` the
    normalized potential is the constant :math:`\beta`: the threshold is
    :math:`-\infty` (always fires) if :math:`\beta \ge V_{th}`, else
    :math:`+\infty` (never), with sign +1.

    Parameters
    ----------
    norm : BatchNorm0d-3d, BatchRenorm or ThresholdDependentBatchNorm
        The normalization of the membrane potential, with running statistics.
    v_th : float, array or Quantity
        Threshold of the normalized potential (in the unit of the norm's
        scale and bias, dimensionless by default), broadcastable to the
        norm's feature shape.

    Returns
    -------
    threshold : jax.Array or Quantity
        In the unit of the running statistics (e.g. mV), of the norm's
        feature shape (``in_size`` with 1 at non-feature axes).
    sign : jax.Array
        +1 or -1, same shape.

    Raises
    ------
    TypeError, ValueError
        As for :func:`fold_batch_norm`; a ``v_th`` in a unit that does not
        fit, or that is not a finite real number or array (NaN, beyond the
        running statistics' dtype, a string, None).

    References
    ----------
    Guo, Chen, Zhang, Peng, Liu, Huang, Ma. Membrane Potential Batch
    Normalization for Spiking Neural Networks. ICCV 2023.

    Examples
    --------
    >>> import brainstate, brainunit as u, jax.numpy as jnp, brainnorm
    >>> from brainnorm._deploy import fold_threshold
    >>> bn = brainnorm.BatchNorm0d(2)
    >>> with brainstate.environ.context(fit=True):
    ...     _ = bn(jnp.array([[-60.0, -50.0], [-50.0, -70.0]]) * u.mV)
    >>> threshold, sign = fold_threshold(bn, 1.0)
    >>> threshold.unit == u.mV, sign.tolist()
    (True, [1.0, 1.0])
    """
    owner = "fold_threshold"
    mean, std, g, beta, stats_unit, out_unit = _norm_affine(owner, norm)
    v_th_m = _check_threshold(owner, _units.in_unit(owner, "v_th", v_th, out_unit), std.dtype)
    try:
        np.broadcast_shapes(v_th_m.shape, mean.shape)
    except ValueError:
        raise ValueError(
            f"{owner}: v_th must broadcast to the norm's feature shape {mean.shape}, got shape {v_th_m.shape}."
        ) from None
    v_th_m = jnp.broadcast_to(v_th_m, mean.shape).astype(std.dtype)
    g = jnp.broadcast_to(g, mean.shape)
    active = g != 0
    safe_g = jnp.where(active, g, 1)
    threshold = mean + (v_th_m - beta) * std / safe_g
    constant = jnp.where(beta >= v_th_m, -jnp.inf, jnp.inf)  # g == 0: always or never
    threshold = jnp.where(active, threshold, constant)
    sign = jnp.where(g < 0, -1.0, 1.0).astype(std.dtype)
    return _with_unit(threshold, stats_unit), sign
