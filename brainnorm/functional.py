r"""Pure normalization functions on arrays and :class:`brainunit.Quantity`.

These functions hold no state: running statistics go in and come out as
values. Axes are counted on ``x`` itself. The layers of :mod:`brainnorm` are
thin state holders over these functions, so both give identical numbers.

All statistics are computed in at least float32 with a shifted two-pass
variance that stays accurate when ``|mean| >> std`` (see the package
documentation); ``use_fast_variance=True`` selects the one-pass
:math:`E[x^2] - E[x]^2` of flax and brainstate.

Masks are boolean arrays broadcastable to ``x``; positions where the mask is
False are left out of every statistic but still transformed with their
group's statistics. A group without any valid element normalizes to 0 (the
output equals the bias) with finite gradients.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import _cpu, _units
from ._stats import (
    Moments,
    apply_moments,
    compute_group_moments,
    compute_moments,
    default_epsilon,
    output_dtype,
    stats_dtype,
)
from ._validation import canonical_axes, check_epsilon, check_mask, check_momentum, check_positive_int

__all__ = [
    "moments",
    "normalize",
    "layer_norm",
    "rms_norm",
    "batch_norm",
    "group_norm",
    "instance_norm",
    "local_response_norm",
    "weight_standardization",
]


# ---------------------------------------------------------------------------
# shared workers (also used by the layers)
# ---------------------------------------------------------------------------


def _prepare(owner, x, mask):
    """Split units, make ``x`` an array and validate ``mask`` against it."""
    x_m, unit = _units.split(x)
    x_m = jnp.asarray(x_m)
    return x_m, unit, check_mask(owner, mask, x_m.shape)


def _normalize_over(
    owner: str,
    x,
    axes: Sequence[int],
    *,
    scale=None,
    bias=None,
    epsilon=1e-6,
    mask=None,
    use_mean: bool = True,
    use_fast_variance: bool = False,
    axis_name=None,
    axis_index_groups=None,
    dtype=None,
    unit=None,
):
    """Normalize the mantissa array ``x`` over ``axes``; return ``(y, moments)``.

    ``unit`` is the unit of ``x`` (None: plain); ``epsilon`` may be a Quantity.
    ``y`` carries the unit of scale/bias, if any.
    """
    if epsilon is None:
        epsilon = default_epsilon(x.dtype)
    eps = _units.epsilon_value(owner, epsilon, unit)
    scale_m, bias_m, out_unit = _units.affine_units(owner, scale, bias)
    out_dtype = output_dtype(x.dtype, dtype)

    def core():
        stats = compute_moments(
            x,
            axes,
            mask=mask,
            use_mean=use_mean,
            use_fast_variance=use_fast_variance,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
        )
        return apply_moments(x, stats, epsilon=eps, scale=scale_m, bias=bias_m, out_dtype=out_dtype), stats

    fused = None
    if axis_name is None and not use_fast_variance and out_dtype == x.dtype:
        fused = _cpu.try_normalize(
            x, axes, scale=scale_m, bias=bias_m, epsilon=eps, mask=mask, use_mean=use_mean,
            core=lambda: _as_kernel_outputs(*core(), axes, x.shape),
        )
    if fused is None:
        y, stats = core()
    else:
        y, hi, lo, var, count = fused
        stats = Moments(hi, lo, var, count if mask is not None else None) if use_mean else Moments(
            None, None, var, count if mask is not None else None)
    return _units.attach(y, out_unit), stats


def _as_kernel_outputs(y, stats, axes, shape):
    """The core's ``(y, Moments)`` as the kernel's ``(y, hi, lo, var, count)`` (for other backends)."""
    kept = tuple(1 if i in set(axes) else d for i, d in enumerate(shape))
    var = jnp.broadcast_to(stats.var, kept)
    zeros = jnp.zeros(kept, var.dtype)
    shift = zeros if stats.shift is None else jnp.broadcast_to(stats.shift, kept).astype(var.dtype)
    delta = zeros if stats.delta is None else jnp.broadcast_to(stats.delta, kept).astype(var.dtype)
    if stats.count is None:
        count = jnp.full(kept, math.prod(shape[a] for a in axes), var.dtype)
    else:
        count = jnp.broadcast_to(stats.count, kept).astype(var.dtype)
    return y, shift, delta, var, count


def _running_update(old_mean, old_var, batch_mean, batch_var, count, momentum, unbiased, masked):
    """``momentum * old + (1 - momentum) * batch``; groups with no valid element keep ``old``.

    ``count`` is the number of valid elements behind each batch statistic
    (``masked``: some group may have none). With ``unbiased`` the batch variance is
    scaled by ``n / (n - 1)`` (``n = 1`` keeps the biased value).
    """
    if unbiased:
        n = jnp.asarray(count, batch_var.dtype)
        batch_var = batch_var * n / jnp.maximum(n - 1, 1)
    momentum = jnp.asarray(momentum, old_mean.dtype)
    new_mean = momentum * old_mean + (1 - momentum) * batch_mean.astype(old_mean.dtype)
    new_var = momentum * old_var + (1 - momentum) * batch_var.astype(old_var.dtype)
    if masked:
        has_data = count > 0
        new_mean = jnp.where(has_data, new_mean, old_mean)
        new_var = jnp.where(has_data, new_var, old_var)
    return new_mean, new_var


def _group_norm_over(
    owner,
    x,
    num_groups: int,
    feature_axis: int,
    reduction_axes: Sequence[int],
    *,
    scale=None,
    bias=None,
    epsilon=1e-6,
    mask=None,
    use_fast_variance=False,
    axis_name=None,
    axis_index_groups=None,
    dtype=None,
    unit=None,
):
    """Group normalization of the array ``x``; axes are non-negative on ``x``.

    ``reduction_axes`` must contain ``feature_axis`` (the group's channels).
    ``scale`` and ``bias`` broadcast against ``x``. Returns ``(y, moments)``.
    """
    eps = _units.epsilon_value(owner, epsilon, unit)
    scale_m, bias_m, out_unit = _units.affine_units(owner, scale, bias)
    stats = compute_group_moments(
        x, feature_axis, num_groups, reduction_axes, mask=mask, use_fast_variance=use_fast_variance,
        axis_name=axis_name, axis_index_groups=axis_index_groups,
    )
    y = apply_moments(x, stats, epsilon=eps, scale=scale_m, bias=bias_m, out_dtype=output_dtype(x.dtype, dtype))
    return _units.attach(y, out_unit), stats


def _local_response_norm(x, size, alpha, beta, k, feature_axis, mask=None, dtype=None):
    """LRN of the array ``x`` along the non-negative ``feature_axis``."""
    sdtype = stats_dtype(x.dtype)
    xs = x.astype(sdtype)
    squares = jnp.square(xs)
    if mask is not None:
        squares = jnp.where(mask, squares, jnp.zeros((), sdtype))
    window = [1] * x.ndim
    window[feature_axis] = size
    padding = [(0, 0)] * x.ndim
    padding[feature_axis] = (size // 2, (size - 1) // 2)
    # A concrete (NumPy) init value keeps reduce_window on its differentiable
    # sum path; a traced one would fall back to the generic op, which has no VJP.
    window_sum = jax.lax.reduce_window(squares, np.zeros((), sdtype), jax.lax.add, window, (1,) * x.ndim, padding)
    y = xs * jnp.power(k + (alpha / size) * window_sum, -beta)
    return y.astype(output_dtype(x.dtype, dtype))


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def moments(
    x,
    axes,
    *,
    mask=None,
    use_mean: bool = True,
    use_fast_variance: bool = False,
    axis_name=None,
    axis_index_groups=None,
    dtype=None,
):
    r"""Mean and variance of ``x`` over ``axes``.

    .. math::

        \mu = \frac{1}{n}\sum_{i \in \text{valid}} x_i, \qquad
        \sigma^2 = \frac{1}{n}\sum_{i \in \text{valid}} |x_i - \mu|^2

    computed in at least float32 with a shifted two-pass variance (accurate
    when ``|mu| >> sigma``).

    Parameters
    ----------
    x : array_like or Quantity
        Input.
    axes : int or sequence of int
        Axes of ``x`` to reduce (negative counts from the end).
    mask : array_like of bool, optional
        Valid positions, broadcastable to ``x``; integer masks are read as
        ``mask != 0``.
    use_mean : bool
        False gives mean 0 and ``var = mean(|x|^2)`` (RMS statistics).
    use_fast_variance : bool
        Use the one-pass :math:`E[|x|^2] - |E[x]|^2` (clipped at 0), as flax.
    axis_name : hashable or tuple, optional
        Mapped axis (``vmap``, ``pmap``, ``shard_map``) to reduce over as well;
        sums and valid counts are combined, so masked statistics are exact.
    axis_index_groups : sequence of sequences of int, optional
        Reduce within these groups of the named axis.
    dtype : dtype, optional
        Minimal dtype of the statistics (always at least float32).

    Returns
    -------
    mean, var : Array or Quantity
        Reduced axes kept with size 1. ``mean`` is in the unit of ``x``, ``var``
        in its square. Groups with no valid element give mean 0, var 0.

    Raises
    ------
    TypeError
        Floating mask.
    ValueError
        Axes out of range or repeated; mask shape not broadcastable to ``x``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from brainnorm.functional import moments
    >>> mean, var = moments(jnp.array([[1., 2., 3.], [4., 4., 4.]]), axes=-1)
    >>> mean.ravel().tolist(), [round(v, 4) for v in var.ravel().tolist()]
    ([2.0, 4.0], [0.6667, 0.0])
    """
    owner = "moments"
    x_m, unit, mask = _prepare(owner, x, mask)
    axes = canonical_axes(owner, "axes", axes, x_m.ndim)
    stats = compute_moments(
        x_m,
        axes,
        mask=mask,
        use_mean=use_mean,
        use_fast_variance=use_fast_variance,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        dtype=dtype,
    )
    var_unit = None if unit is None else unit**2
    return _units.attach(stats.mean, unit), _units.attach(stats.var, var_unit)


def normalize(x, mean, var, *, scale=None, bias=None, epsilon=1e-6, dtype=None):
    r"""Normalize with given statistics.

    .. math:: y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \gamma + \beta

    Parameters
    ----------
    x : array_like or Quantity
    mean, var : array_like or Quantity
        Broadcastable to ``x``; in the unit of ``x`` and its square.
    scale, bias : array_like or Quantity, optional
        Broadcastable to ``x``. If they carry units, so does the output.
    epsilon : float or Quantity
        Added to ``var`` (in the squared unit of ``x``).
    dtype : dtype, optional
        Output dtype; default the input's floating dtype.

    Returns
    -------
    Array or Quantity

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from brainnorm.functional import normalize
    >>> y = normalize(jnp.array([1., 3.]), 2., 1., epsilon=1e-12)
    >>> [round(v, 4) for v in y.tolist()]
    [-1.0, 1.0]
    """
    owner = "normalize"
    check_epsilon(owner, epsilon)
    x_m, unit = _units.split(x)
    x_m = jnp.asarray(x_m)
    mean_m = jnp.asarray(_units.in_unit(owner, "mean", mean, unit))
    var_m = jnp.asarray(_units.in_unit(owner, "var", var, None if unit is None else unit**2))
    sdtype = stats_dtype(x_m.dtype)
    stats = Moments(shift=None, delta=mean_m.astype(sdtype), var=var_m.astype(jnp.real(jnp.zeros((), sdtype)).dtype), count=None)
    eps = _units.epsilon_value(owner, epsilon, unit)
    scale_m, bias_m, out_unit = _units.affine_units(owner, scale, bias)
    y = apply_moments(x_m, stats, epsilon=eps, scale=scale_m, bias=bias_m, out_dtype=output_dtype(x_m.dtype, dtype))
    return _units.attach(y, out_unit)


def layer_norm(
    x,
    scale=None,
    bias=None,
    *,
    reduction_axes=-1,
    epsilon=1e-6,
    mask=None,
    use_fast_variance: bool = False,
    axis_name=None,
):
    r"""Layer normalization (Ba et al., 2016).

    .. math:: y = \frac{x - E[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    with statistics over ``reduction_axes`` of each sample.

    Parameters
    ----------
    x : array_like or Quantity
    scale, bias : array_like or Quantity, optional
        Broadcastable to ``x``.
    reduction_axes : int or sequence of int
        Axes of ``x`` to normalize over.
    epsilon : float, Quantity or None
        None picks PyTorch's default (machine epsilon of the input's precision).
    mask : array_like of bool, optional
        Valid positions, broadcastable to ``x``.
    use_fast_variance : bool
        One-pass variance (flax parity; inaccurate for large offsets).
    axis_name : hashable, optional
        Also reduce over this mapped axis.

    Returns
    -------
    Array or Quantity
        Same shape as ``x``; dimensionless unless scale/bias carry units.

    References
    ----------
    Ba, Kiros, Hinton. Layer Normalization. arXiv:1607.06450 (2016).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from brainnorm.functional import layer_norm
    >>> y = layer_norm(jnp.array([[1e4, 1e4 + 1.0, 1e4 + 2.0]]), epsilon=1e-12)
    >>> [round(v, 4) for v in y.ravel().tolist()]
    [-1.2247, 0.0, 1.2247]
    """
    owner = "layer_norm"
    check_epsilon(owner, epsilon, allow_none=True)
    x_m, unit, mask = _prepare(owner, x, mask)
    axes = canonical_axes(owner, "reduction_axes", reduction_axes, x_m.ndim)
    y, _ = _normalize_over(
        owner, x_m, axes, scale=scale, bias=bias, epsilon=epsilon, mask=mask,
        use_fast_variance=use_fast_variance, axis_name=axis_name, unit=unit,
    )
    return y


def rms_norm(x, scale=None, *, reduction_axes=-1, epsilon=1e-6, mask=None, axis_name=None):
    r"""Root-mean-square normalization (Zhang and Sennrich, 2019).

    .. math:: y = \frac{x}{\sqrt{E[|x|^2] + \epsilon}} \gamma

    Parameters
    ----------
    x : array_like or Quantity
    scale : array_like or Quantity, optional
        Broadcastable to ``x``.
    reduction_axes : int or sequence of int
        Axes of ``x`` to normalize over.
    epsilon : float, Quantity or None
        None picks PyTorch's default (machine epsilon of the input's precision).
    mask : array_like of bool, optional
    axis_name : hashable, optional

    Returns
    -------
    Array or Quantity

    References
    ----------
    Zhang, Sennrich. Root Mean Square Layer Normalization. NeurIPS 2019.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from brainnorm.functional import rms_norm
    >>> y = rms_norm(jnp.array([3.0, 4.0]), epsilon=1e-12)   # rms = sqrt(12.5)
    >>> [round(v, 4) for v in y.tolist()]
    [0.8485, 1.1314]
    """
    owner = "rms_norm"
    check_epsilon(owner, epsilon, allow_none=True)
    x_m, unit, mask = _prepare(owner, x, mask)
    axes = canonical_axes(owner, "reduction_axes", reduction_axes, x_m.ndim)
    y, _ = _normalize_over(
        owner, x_m, axes, scale=scale, epsilon=epsilon, mask=mask, use_mean=False,
        axis_name=axis_name, unit=unit,
    )
    return y


def batch_norm(
    x,
    running_mean,
    running_var,
    scale=None,
    bias=None,
    *,
    training: bool,
    feature_axes=-1,
    momentum=0.99,
    epsilon=1e-5,
    mask=None,
    unbiased_running_var: bool = False,
    axis_name=None,
):
    r"""Batch normalization (Ioffe and Szegedy, 2015), returning new running statistics.

    Training: statistics over every axis but ``feature_axes``, then

    .. math::

        y = \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}\gamma + \beta, \quad
        \hat\mu \leftarrow m \hat\mu + (1 - m)\mu_B, \quad
        \hat\sigma^2 \leftarrow m \hat\sigma^2 + (1 - m)\sigma_B^2

    (``m = momentum``, flax/brainstate convention: PyTorch's ``momentum`` is
    ``1 - m``). Evaluation (``training=False``) normalizes with the running
    statistics and returns them unchanged.

    Parameters
    ----------
    x : array_like or Quantity
    running_mean, running_var : array_like or Quantity
        Running statistics, broadcastable to ``x`` (the shape of the reduced
        statistics, e.g. ``(1, 1, C)``, or ``(C,)`` for trailing channels).
        New statistics are returned in the same shape.
    scale, bias : array_like or Quantity, optional
    training : bool
        Batch statistics (True) or running statistics (False).
    feature_axes : int or sequence of int
        Axes of ``x`` that are kept (channels).
    momentum : float
        Weight of the old running value, in [0, 1].
    epsilon : float or Quantity
    mask : array_like of bool, optional
        Valid positions; a channel with no valid entry keeps its running
        statistics and normalizes to the bias.
    unbiased_running_var : bool
        Update the running variance with ``n / (n - 1)`` times the batch
        variance (PyTorch), ``n`` being the valid count.
    axis_name : hashable, optional
        Also reduce over this mapped axis (synchronized batch norm).

    Returns
    -------
    y, new_running_mean, new_running_var

    References
    ----------
    Ioffe, Szegedy. Batch Normalization: Accelerating Deep Network Training
    by Reducing Internal Covariate Shift. ICML 2015.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from brainnorm.functional import batch_norm
    >>> x = jnp.array([[0.0, 10.0], [2.0, 30.0]])
    >>> y, rm, rv = batch_norm(x, jnp.zeros(2), jnp.ones(2), training=True, momentum=0.9)
    >>> [round(v, 4) for v in rm.tolist()], [round(v, 4) for v in rv.tolist()]
    ([0.1, 2.0], [1.0, 10.9])
    """
    owner = "batch_norm"
    check_epsilon(owner, epsilon)
    check_momentum(owner, momentum, allow_none=False)
    x_m, unit, mask = _prepare(owner, x, mask)
    feature = canonical_axes(owner, "feature_axes", feature_axes, x_m.ndim)
    axes = tuple(a for a in range(x_m.ndim) if a not in feature)
    return _batch_norm(
        owner, x_m, unit, running_mean, running_var, scale, bias, axes,
        training=training, momentum=momentum, epsilon=epsilon, mask=mask,
        unbiased_running_var=unbiased_running_var, axis_name=axis_name,
    )


def _batch_norm(
    owner, x, unit, running_mean, running_var, scale, bias, axes, *, training, momentum, epsilon,
    mask=None, unbiased_running_var=False, axis_name=None, axis_index_groups=None,
    use_fast_variance=False, dtype=None, stats_unit=None,
):
    """Batch norm of the array ``x`` (unit ``unit``) over the non-negative ``axes``.

    The statistics live in ``stats_unit`` (default: the running statistics'
    unit if they have one, else the input's); ``x`` is converted to it.
    """
    rm_m, rm_unit = _units.split(running_mean)
    rv_m, _ = _units.split(running_var)
    if stats_unit is None:
        stats_unit = rm_unit if rm_unit is not None else unit
    if unit != stats_unit:
        x = jnp.asarray(_units.in_unit(owner, "x", _units.attach(x, unit), stats_unit))
    rm_m = jnp.asarray(_units.in_unit(owner, "running_mean", running_mean, stats_unit) if rm_unit else rm_m)
    var_unit = None if stats_unit is None else stats_unit**2
    rv_m = jnp.asarray(_units.in_unit(owner, "running_var", running_var, var_unit) if rm_unit else rv_m)
    if training:
        y, stats = _normalize_over(
            owner, x, axes, scale=scale, bias=bias, epsilon=epsilon, mask=mask,
            use_fast_variance=use_fast_variance, axis_name=axis_name,
            axis_index_groups=axis_index_groups, dtype=dtype, unit=stats_unit,
        )
        stat_shape = rm_m.shape
        if stats.count is None:
            count = jnp.asarray(
                math.prod(x.shape[a] for a in axes) * _mapped_size(axis_name, axis_index_groups), jnp.float32
            )
        else:
            count = jnp.reshape(stats.count, stat_shape)
        new_mean, new_var = _running_update(
            rm_m, rv_m, jnp.reshape(stats.mean, stat_shape), jnp.reshape(stats.var, stat_shape),
            count, momentum, unbiased_running_var, masked=stats.count is not None,
        )
    else:
        eps = _units.epsilon_value(owner, epsilon, stats_unit)
        scale_m, bias_m, out_unit = _units.affine_units(owner, scale, bias)
        sdtype = stats_dtype(x.dtype)
        stats = Moments(shift=None, delta=rm_m.astype(sdtype), var=rv_m.astype(sdtype), count=None)
        y = _units.attach(
            apply_moments(x, stats, epsilon=eps, scale=scale_m, bias=bias_m, out_dtype=output_dtype(x.dtype, dtype)),
            out_unit,
        )
        new_mean, new_var = rm_m, rv_m
    return y, _units.attach(new_mean, stats_unit), _units.attach(new_var, var_unit)


def _mapped_size(axis_name, axis_index_groups):
    """Number of members reduced over by ``axis_name`` (1 without one)."""
    if axis_name is None:
        return 1
    if axis_index_groups is not None:
        return len(axis_index_groups[0])
    size = 1
    for name in (axis_name if isinstance(axis_name, tuple) else (axis_name,)):
        size *= jax.lax.psum(1, name)
    return size


def group_norm(
    x,
    num_groups: int,
    scale=None,
    bias=None,
    *,
    feature_axis=-1,
    reduction_axes=None,
    epsilon=1e-6,
    mask=None,
):
    r"""Group normalization (Wu and He, 2018).

    Channels along ``feature_axis`` are split into ``num_groups`` groups;

    .. math:: y = \frac{x - E_g[x]}{\sqrt{\mathrm{Var}_g[x] + \epsilon}}\gamma + \beta

    with statistics per sample and group over the group's channels and every
    other non-batch axis. The first axis of ``x`` is the batch axis (flax).

    Parameters
    ----------
    x : array_like or Quantity
        ``(B, ..., C, ...)``.
    num_groups : int
        Must divide the number of channels.
    scale, bias : array_like or Quantity, optional
        Broadcastable to ``x`` (e.g. shape ``(C,)`` for trailing channels).
    feature_axis : int
        Channel axis of ``x`` (not the batch axis).
    reduction_axes : int or sequence of int, optional
        Axes of ``x`` to reduce; must include ``feature_axis`` and exclude the
        batch axis. Default: every axis but the batch axis.
    epsilon : float or Quantity
    mask : array_like of bool, optional

    Returns
    -------
    Array or Quantity

    References
    ----------
    Wu, He. Group Normalization. ECCV 2018.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from brainnorm.functional import group_norm
    >>> x = jnp.array([[1., 3., 10., 30.]])
    >>> group_norm(x, 2, epsilon=1e-12).round(3).tolist()
    [[-1.0, 1.0, -1.0, 1.0]]
    """
    owner = "group_norm"
    check_epsilon(owner, epsilon)
    x_m, unit, mask = _prepare(owner, x, mask)
    if x_m.ndim < 2:
        raise ValueError(f"{owner}: x must have a batch axis and a channel axis, got shape {x_m.shape}.")
    feature = canonical_axes(owner, "feature_axis", feature_axis, x_m.ndim)[0]
    if feature == 0:
        raise ValueError(f"{owner}: feature_axis must not be the batch axis 0, got {feature_axis!r}.")
    if reduction_axes is None:
        axes = tuple(range(1, x_m.ndim))
    else:
        axes = canonical_axes(owner, "reduction_axes", reduction_axes, x_m.ndim)
        if 0 in axes:
            raise ValueError(f"{owner}: reduction_axes must not include the batch axis 0, got {reduction_axes!r}.")
        if feature not in axes:
            raise ValueError(
                f"{owner}: reduction_axes must include feature_axis={feature_axis!r} (the group's "
                f"channels), got {reduction_axes!r}."
            )
    num_groups = _check_groups(owner, x_m.shape[feature], num_groups, None)[0]
    y, _ = _group_norm_over(
        owner, x_m, num_groups, feature, axes, scale=scale, bias=bias, epsilon=epsilon, mask=mask, unit=unit
    )
    return y


def _check_groups(owner, channels, num_groups, group_size):
    """Resolve ``(num_groups, group_size)``: exactly one given, dividing ``channels``."""
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            f"{owner}: exactly one of num_groups and group_size must be given, got "
            f"num_groups={num_groups!r}, group_size={group_size!r} (pass num_groups=None "
            f"to use group_size)."
        )
    if group_size is not None:
        group_size = check_positive_int(owner, "group_size", group_size)
        if channels % group_size:
            raise ValueError(
                f"{owner}: group_size must divide the number of channels {channels}, got {group_size}."
            )
        return channels // group_size, group_size
    num_groups = check_positive_int(owner, "num_groups", num_groups)
    if channels % num_groups:
        raise ValueError(
            f"{owner}: num_groups must divide the number of channels {channels}, got {num_groups}."
        )
    return num_groups, channels // num_groups


def instance_norm(x, scale=None, bias=None, *, feature_axis=-1, epsilon=1e-5, mask=None):
    r"""Instance normalization (Ulyanov et al., 2016).

    .. math:: y = \frac{x - E_{s,c}[x]}{\sqrt{\mathrm{Var}_{s,c}[x] + \epsilon}}\gamma + \beta

    with statistics per sample ``s`` (first axis) and channel ``c`` over every
    other axis; equal to :func:`group_norm` with one channel per group.

    Parameters
    ----------
    x : array_like or Quantity
        ``(B, ..., C, ...)``.
    scale, bias : array_like or Quantity, optional
    feature_axis : int
        Channel axis (not the batch axis).
    epsilon : float or Quantity
    mask : array_like of bool, optional

    Returns
    -------
    Array or Quantity

    References
    ----------
    Ulyanov, Vedaldi, Lempitsky. Instance Normalization: The Missing
    Ingredient for Fast Stylization. arXiv:1607.08022 (2016).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from brainnorm.functional import instance_norm
    >>> x = jnp.array([[[1., 10.], [3., 30.]]])  # (B, T, C)
    >>> instance_norm(x, epsilon=1e-12).round(3).tolist()
    [[[-1.0, -1.0], [1.0, 1.0]]]
    """
    owner = "instance_norm"
    check_epsilon(owner, epsilon)
    x_m, unit, mask = _prepare(owner, x, mask)
    if x_m.ndim < 2:
        raise ValueError(f"{owner}: x must have a batch axis and a channel axis, got shape {x_m.shape}.")
    feature = canonical_axes(owner, "feature_axis", feature_axis, x_m.ndim)
    if 0 in feature:
        raise ValueError(f"{owner}: feature_axis must not be the batch axis 0, got {feature_axis!r}.")
    axes = tuple(a for a in range(1, x_m.ndim) if a not in feature)
    y, _ = _normalize_over(owner, x_m, axes, scale=scale, bias=bias, epsilon=epsilon, mask=mask, unit=unit)
    return y


def local_response_norm(x, size: int, *, alpha=1e-4, beta=0.75, k=1.0, feature_axis=-1):
    r"""Local response normalization across channels (Krizhevsky et al., 2012).

    .. math::

        b_c = a_c \left(k + \frac{\alpha}{n} \sum_{c'=c - \lfloor n/2 \rfloor}^{c + \lfloor (n-1)/2 \rfloor} a_{c'}^2\right)^{-\beta}

    with ``n = size`` and zero padding outside the channel range (PyTorch).

    Parameters
    ----------
    x : array_like or Quantity
        A Quantity is normalized through its mantissa (``alpha`` is then in
        the inverse squared unit) and keeps its unit.
    size : int
        Number of neighbouring channels summed.
    alpha, beta, k : float
    feature_axis : int
        Channel axis of ``x``.

    Returns
    -------
    Array or Quantity

    References
    ----------
    Krizhevsky, Sutskever, Hinton. ImageNet Classification with Deep
    Convolutional Neural Networks. NeurIPS 2012.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from brainnorm.functional import local_response_norm
    >>> local_response_norm(jnp.array([1., 2.]), 1, alpha=1., beta=1., k=0.).tolist()
    [1.0, 0.5]
    """
    owner = "local_response_norm"
    size = check_positive_int(owner, "size", size)
    x_m, unit = _units.split(x)
    x_m = jnp.asarray(x_m)
    feature = canonical_axes(owner, "feature_axis", feature_axis, x_m.ndim)[0]
    return _units.attach(_local_response_norm(x_m, size, alpha, beta, k, feature), unit)


def weight_standardization(w, eps=1e-4, gain=None, out_axis=-1):
    r"""Scaled weight standardization (Qiao et al., 2019; Brock et al., 2021).

    .. math::

        \hat w = \frac{w - E[w]}{\sqrt{\max(\mathrm{Var}[w] \cdot n_\mathrm{in}, \epsilon)}} g

    with statistics over every axis but ``out_axis`` and ``n_in`` their size
    (brainstate's definition).

    Parameters
    ----------
    w : array_like or Quantity
        Weight; a Quantity gives a dimensionless result (``eps`` is in its
        squared unit).
    eps : float
        Lower bound of ``Var[w] * fan_in``.
    gain : array_like, optional
        Broadcastable to ``w``.
    out_axis : int
        Output axis of ``w``.

    Returns
    -------
    Array

    References
    ----------
    Qiao et al. Micro-Batch Training with Batch-Channel Normalization and
    Weight Standardization. arXiv:1903.10520 (2019).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from brainnorm.functional import weight_standardization
    >>> w = weight_standardization(jnp.array([[1.], [3.]]), eps=1e-12)
    >>> [round(v, 4) for v in w.ravel().tolist()]
    [-0.7071, 0.7071]
    """
    owner = "weight_standardization"
    check_epsilon(owner, eps, option="eps")
    w_m, unit = _units.split(w)
    w_m = jnp.asarray(w_m)
    out = canonical_axes(owner, "out_axis", out_axis, w_m.ndim)
    axes = tuple(a for a in range(w_m.ndim) if a not in out)
    stats = compute_moments(w_m, axes)
    fan_in = math.prod(w_m.shape[a] for a in axes)
    eps_m = _units.epsilon_value(owner, eps, unit)
    factor = jax.lax.rsqrt(jnp.maximum(stats.var * fan_in, eps_m))
    gain_m, _, out_unit = _units.affine_units(owner, gain, None)
    if gain_m is not None:
        factor = factor * gain_m
    y = ((w_m.astype(stats.var.dtype) - stats.shift) - stats.delta) * factor
    return _units.attach(y.astype(output_dtype(w_m.dtype)), out_unit)
