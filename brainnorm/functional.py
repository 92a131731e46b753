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
from typing import Any, overload

import jax.numpy as jnp
import numpy as np

from . import _stats, _units
from ._stats import Moments, Reduction, apply_moments, default_epsilon, output_dtype, stats_dtype
from ._typing import (
    Array,
    ArrayLike,
    Axes,
    AxisIndexGroups,
    AxisName,
    DTypeLike,
    Epsilon,
    Input,
    Momentum,
    Output,
    Value,
)
from ._validation import (
    canonical_axes,
    check_axis_name,
    check_broadcasts,
    check_dtype,
    check_epsilon,
    check_epsilon_range,
    check_groups,
    check_input,
    check_local_response,
    check_mask,
    check_momentum,
    check_momentum_shape,
    check_positive_int,
    check_real,
    check_running_statistics,
)

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
    "batch_renorm",
    "lp_normalize",
    "divisive_normalization",
    "gdn",
    "temporal_accumulated_batch_norm",
    "neu_norm",
]


# ---------------------------------------------------------------------------
# shared steps of the public functions (the layers call the public functions)
# ---------------------------------------------------------------------------


def _prepare(owner, x, mask):
    """Split units, make ``x`` an array and validate ``mask`` against it."""
    x_m, unit = _units.split(x)
    x_m = check_input(owner, x_m)
    return x_m, unit, check_mask(owner, mask, x_m.shape)


def _affine(owner, x, unit, epsilon, scale, bias, dtype):
    """Epsilon in the squared statistics unit, affine mantissas, output unit and dtype."""
    dtype = check_dtype(owner, "dtype", dtype)
    if epsilon is None:
        epsilon = default_epsilon(x.dtype)
    eps = _units.epsilon_value(owner, epsilon, unit)
    check_epsilon_range(owner, eps, stats_dtype(x.dtype))
    scale_m, bias_m, out_unit = _units.affine_units(owner, scale, bias)
    for option, value in (("scale", scale_m), ("bias", bias_m)):
        if value is not None:
            check_broadcasts(owner, option, value, x.shape)
    return eps, scale_m, bias_m, out_unit, output_dtype(x.dtype, dtype)


def _apply(owner, x, unit, stats: Moments, *, scale, bias, epsilon, dtype):
    """Normalize the array ``x`` (unit ``unit``) with given statistics; the result carries scale/bias's unit."""
    eps, scale_m, bias_m, out_unit, out_dtype = _affine(owner, x, unit, epsilon, scale, bias, dtype)
    return _units.attach(
        apply_moments(x, stats, epsilon=eps, scale=scale_m, bias=bias_m, out_dtype=out_dtype), out_unit
    )


def _normalize(owner, x, unit, reduction, *, mask, scale, bias, epsilon, dtype, with_moments=False, renorm=None):
    """Normalize the array ``x`` (unit ``unit``) with its own statistics: ``(y, moments or None)``."""
    eps, scale_m, bias_m, out_unit, out_dtype = _affine(owner, x, unit, epsilon, scale, bias, dtype)
    y, stats = _stats.normalize_over(
        x,
        reduction,
        mask=mask,
        scale=scale_m,
        bias=bias_m,
        epsilon=eps,
        out_dtype=out_dtype,
        with_moments=with_moments,
        renorm=renorm,
    )
    return _units.attach(y, out_unit), stats


def _groups(axis_index_groups):
    """``axis_index_groups`` as a hashable tuple of tuples (or None); validated by ``check_axis_name``."""
    return None if axis_index_groups is None else tuple(tuple(int(i) for i in g) for g in axis_index_groups)


def _with_unit(mean, var, unit):
    return _units.attach(mean, unit), _units.attach(var, None if unit is None else unit**2)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def moments(
    x: Input,
    axes: Axes,
    *,
    mask: ArrayLike | None = None,
    use_mean: bool = True,
    use_fast_variance: bool = False,
    axis_name: AxisName | None = None,
    axis_index_groups: AxisIndexGroups | None = None,
    dtype: DTypeLike | None = None,
) -> tuple[Output, Output]:
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
    axis_name, axis_index_groups = check_axis_name(owner, axis_name, axis_index_groups)
    dtype = check_dtype(owner, "dtype", dtype)
    axes = canonical_axes(owner, "axes", axes, x_m.ndim)
    stats = _stats.compute_moments(
        x_m,
        axes,
        mask=mask,  # type: ignore[arg-type]  # validated by _prepare: an array or None
        use_mean=use_mean,
        use_fast_variance=use_fast_variance,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        dtype=dtype,
    )
    var_unit = None if unit is None else unit**2
    return _units.attach(stats.mean, unit), _units.attach(stats.var, var_unit)


def normalize(
    x: Input,
    mean: Value,
    var: Value,
    *,
    scale: Value | None = None,
    bias: Value | None = None,
    epsilon: Epsilon = 1e-6,
    dtype: DTypeLike | None = None,
) -> Array:
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
    x_m = check_input(owner, x_m)
    mean_m = check_input(owner, _units.in_unit(owner, "mean", mean, unit), option="mean")
    var_m = check_input(owner, _units.in_unit(owner, "var", var, None if unit is None else unit**2), option="var")
    for option, value in (("mean", mean_m), ("var", var_m)):
        check_broadcasts(owner, option, value, x_m.shape)
    stats = _stats.given_moments(mean_m, var_m, stats_dtype(x_m.dtype))
    return _apply(owner, x_m, unit, stats, scale=scale, bias=bias, epsilon=epsilon, dtype=dtype)


def layer_norm(
    x: Input,
    scale: Value | None = None,
    bias: Value | None = None,
    *,
    reduction_axes: Axes = -1,
    epsilon: Epsilon | None = 1e-6,
    mask: ArrayLike | None = None,
    use_fast_variance: bool = False,
    axis_name: AxisName | None = None,
    axis_index_groups: AxisIndexGroups | None = None,
    dtype: DTypeLike | None = None,
) -> Array:
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
    axis_index_groups : sequence of sequences of int, optional
        Reduce within these groups of the named axis.
    dtype : dtype, optional
        Output dtype; default the input's floating dtype.

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
    axis_name, axis_index_groups = check_axis_name(owner, axis_name, axis_index_groups)
    axes = canonical_axes(owner, "reduction_axes", reduction_axes, x_m.ndim)
    reduction = Reduction(
        axes,
        use_fast_variance=bool(use_fast_variance),
        axis_name=axis_name,
        axis_index_groups=_groups(axis_index_groups),
    )
    return _normalize(owner, x_m, unit, reduction, mask=mask, scale=scale, bias=bias, epsilon=epsilon, dtype=dtype)[0]


def rms_norm(
    x: Input,
    scale: Value | None = None,
    *,
    reduction_axes: Axes = -1,
    epsilon: Epsilon | None = 1e-6,
    mask: ArrayLike | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: AxisIndexGroups | None = None,
    dtype: DTypeLike | None = None,
) -> Array:
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
    axis_index_groups : sequence of sequences of int, optional
    dtype : dtype, optional
        Output dtype; default the input's floating dtype.

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
    axis_name, axis_index_groups = check_axis_name(owner, axis_name, axis_index_groups)
    axes = canonical_axes(owner, "reduction_axes", reduction_axes, x_m.ndim)
    reduction = Reduction(axes, use_mean=False, axis_name=axis_name, axis_index_groups=_groups(axis_index_groups))
    return _normalize(owner, x_m, unit, reduction, mask=mask, scale=scale, bias=None, epsilon=epsilon, dtype=dtype)[0]


def batch_norm(
    x: Input,
    running_mean: Value | None = None,
    running_var: Value | None = None,
    scale: Value | None = None,
    bias: Value | None = None,
    *,
    training: bool,
    feature_axes: Axes = -1,
    momentum: Momentum = 0.99,
    epsilon: Epsilon = 1e-5,
    mask: ArrayLike | None = None,
    unbiased_running_var: bool = False,
    axis_name: AxisName | None = None,
    axis_index_groups: AxisIndexGroups | None = None,
    use_fast_variance: bool = False,
    dtype: DTypeLike | None = None,
) -> tuple[Array, Any, Any]:
    r"""Batch normalization (Ioffe and Szegedy, 2015), returning new running statistics.

    Training: statistics over every axis but ``feature_axes``, then

    .. math::

        y = \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}\gamma + \beta, \quad
        \hat\mu \leftarrow m \hat\mu + (1 - m)\mu_B, \quad
        \hat\sigma^2 \leftarrow m \hat\sigma^2 + (1 - m)\sigma_B^2

    (``m = momentum``, flax/brainstate convention: PyTorch's ``momentum`` is
    ``1 - m``). Evaluation (``training=False``) normalizes with the running
    statistics and returns them unchanged. Without running statistics
    (``running_mean=None``, PyTorch's ``track_running_stats=False``) both
    modes use the batch statistics and ``None`` is returned for them.

    Parameters
    ----------
    x : array_like or Quantity
    running_mean, running_var : array_like or Quantity, optional
        Running statistics with one entry per statistic, broadcastable to
        ``x`` (the shape of the reduced statistics, e.g. ``(1, 1, C)``, or
        ``(C,)`` for trailing channels). New statistics are returned in the
        same shape and unit; the input is converted to their unit.
    scale, bias : array_like or Quantity, optional
    training : bool
        Batch statistics (True) or running statistics (False).
    feature_axes : int or sequence of int
        Axes of ``x`` that are kept (channels).
    momentum : float or array
        Weight of the old running value, in [0, 1]. An array (for example the
        cumulative average's ``1 - 1 / (n + 1)``, or one value per statistic)
        is used as given.
    epsilon : float or Quantity
    mask : array_like of bool, optional
        Valid positions; a channel with no valid entry keeps its running
        statistics and normalizes to the bias.
    unbiased_running_var : bool
        Update the running variance with ``n / (n - 1)`` times the batch
        variance (PyTorch), ``n`` being the valid count (across devices).
    axis_name : hashable, optional
        Also reduce over this mapped axis (synchronized batch norm).
    axis_index_groups : sequence of sequences of int, optional
        Reduce within these groups of the named axis.
    use_fast_variance : bool
        One-pass variance (flax parity).
    dtype : dtype, optional
        Output dtype; default the input's floating dtype.

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
    return _batch_statistics(
        "batch_norm",
        x,
        running_mean,
        running_var,
        scale,
        bias,
        training=training,
        feature_axes=feature_axes,
        momentum=momentum,
        epsilon=epsilon,
        mask=mask,
        unbiased_running_var=unbiased_running_var,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance,
        dtype=dtype,
    )


def _batch_statistics(
    owner,
    x,
    running_mean,
    running_var,
    scale,
    bias,
    *,
    training,
    feature_axes,
    momentum,
    epsilon,
    mask,
    unbiased_running_var,
    axis_name,
    axis_index_groups,
    use_fast_variance,
    dtype,
    renorm=None,
):
    """Batch normalization, or renormalization with ``renorm = (r_max, d_max, active)``."""
    check_epsilon(owner, epsilon)
    momentum = check_momentum(owner, momentum, allow_none=False)
    x_m, unit, mask = _prepare(owner, x, mask)
    axis_name, axis_index_groups = check_axis_name(owner, axis_name, axis_index_groups)
    feature = canonical_axes(owner, "feature_axes", feature_axes, x_m.ndim)
    axes = tuple(a for a in range(x_m.ndim) if a not in feature)
    kept = tuple(1 if a in axes else d for a, d in enumerate(x_m.shape))
    check_running_statistics(owner, running_mean, running_var, kept)
    x_m, stats_unit, mean, var = _units.in_statistics_unit(owner, x_m, unit, running_mean, running_var)
    if mean is not None:
        check_momentum_shape(owner, momentum, mean.shape)
    options = dict(scale=scale, bias=bias, epsilon=epsilon, dtype=dtype)
    if training or mean is None:
        reduction = Reduction(
            axes,
            use_fast_variance=bool(use_fast_variance),
            axis_name=axis_name,
            axis_index_groups=_groups(axis_index_groups),
        )
        correction = None
        if renorm is not None and mean is not None:
            correction = _stats.Renorm(mean, var, *renorm)
        y, stats = _normalize(
            owner, x_m, stats_unit, reduction, mask=mask, with_moments=mean is not None, renorm=correction, **options
        )
    else:
        stats = _stats.given_moments(mean, var, stats_dtype(x_m.dtype))
        y = _apply(owner, x_m, stats_unit, stats, **options)
    if mean is None:
        return y, None, None
    if training:
        mean, var = _stats.running_update(
            mean, var, stats.mean, stats.var, stats.count, momentum, unbiased_var=unbiased_running_var
        )
    return (y,) + _with_unit(mean, var, stats_unit)


def batch_renorm(
    x: Input,
    running_mean: Value | None,
    running_var: Value | None,
    scale: Value | None = None,
    bias: Value | None = None,
    *,
    training: bool,
    r_max: float = 3.0,
    d_max: float = 5.0,
    renormalize: bool | ArrayLike = True,
    feature_axes: Axes = -1,
    momentum: Momentum = 0.99,
    epsilon: Epsilon = 1e-5,
    mask: ArrayLike | None = None,
    unbiased_running_var: bool = False,
    axis_name: AxisName | None = None,
    axis_index_groups: AxisIndexGroups | None = None,
    use_fast_variance: bool = False,
    dtype: DTypeLike | None = None,
) -> tuple[Array, Any, Any]:
    r"""Batch renormalization (Ioffe, 2017), returning new running statistics.

    Training, with the batch statistics :math:`\mu_B, \sigma_B^2` (over every
    axis but ``feature_axes``), :math:`s_B = \sqrt{\sigma_B^2 + \epsilon}` and
    :math:`s = \sqrt{\hat\sigma^2 + \epsilon}` of the running variance:

    .. math::

        r = \mathrm{clip}(s_B / s, 1 / r_{max}, r_{max}), \quad
        d = \mathrm{clip}((\mu_B - \hat\mu) / s, -d_{max}, d_{max}), \quad
        y = \gamma \left(\frac{x - \mu_B}{s_B} r + d\right) + \beta

    with ``r`` and ``d`` held constant under differentiation; the running
    statistics are updated as :func:`batch_norm` updates them. While
    ``renormalize`` is False (a warm-up; it may be a traced boolean),
    ``r = 1`` and ``d = 0``: batch normalization. A channel without a valid
    entry normalizes to the bias. Evaluation (``training=False``) normalizes
    with the running statistics.

    Parameters
    ----------
    x : array_like or Quantity
        Input; every axis but ``feature_axes`` is reduced.
    running_mean : array_like or Quantity
        Running mean, one entry per statistic and broadcastable to ``x``
        (required: the correction is relative to it).
    running_var : array_like or Quantity
        Running variance, same shape, in the squared unit.
    scale : array_like or Quantity, optional
        Gain :math:`\gamma`, broadcastable to ``x``.
    bias : array_like or Quantity, optional
        Offset :math:`\beta`, broadcastable to ``x``.
    training : bool
        Batch statistics with the correction, updating the running ones
        (True), or the running statistics alone (False).
    r_max : float
        Largest scale correction, ``>= 1``: ``r`` in ``[1/r_max, r_max]``.
    d_max : float
        Largest shift correction, ``>= 0``: ``d`` in ``[-d_max, d_max]``.
    renormalize : bool or bool array
        Apply the correction (False during a warm-up; may be traced).
    feature_axes : int or sequence of int
        Axes of ``x`` that are kept (channels).
    momentum : float or array
        Weight of the old running value, in [0, 1].
    epsilon : float or Quantity
        Positive constant added to the variances.
    mask : array_like of bool, optional
        Valid positions; a channel without one keeps its running statistics.
    unbiased_running_var : bool
        Fold the unbiased batch variance into the running variance (PyTorch).
    axis_name : hashable, optional
        Also reduce over this mapped axis, exactly.
    axis_index_groups : sequence of sequences of int, optional
        Reduce within these groups of the named axis.
    use_fast_variance : bool
        One-pass variance formula instead of the robust two-pass.
    dtype : dtype, optional
        Output dtype; default the input's floating dtype.

    Returns
    -------
    y : jax.Array
        Same shape as ``x``.
    new_running_mean, new_running_var : jax.Array or Quantity
        Updated running statistics (the given ones in evaluation).

    References
    ----------
    Ioffe. Batch Renormalization: Towards Reducing Minibatch Dependence in
    Batch-Normalized Models. NeurIPS 2017.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from brainnorm.functional import batch_renorm
    >>> x = jnp.array([[0.0], [2.0]])                     # batch mean 1, variance 1
    >>> y, rm, rv = batch_renorm(x, jnp.zeros(1), jnp.full(1, 4.0), training=True, epsilon=1e-12)
    >>> y.ravel().tolist()                                 # r = 1 / 2, d = 1 / 2
    [0.0, 1.0]
    """
    owner = "batch_renorm"
    r_max = check_real(owner, "r_max", r_max)
    d_max = check_real(owner, "d_max", d_max)
    if r_max < 1:
        raise ValueError(f"{owner}: r_max must be a finite real number >= 1, got {r_max!r}.")
    if d_max < 0:
        raise ValueError(f"{owner}: d_max must be a finite real number >= 0, got {d_max!r}.")
    if running_mean is None or running_var is None:
        raise ValueError(
            f"{owner}: running_mean and running_var must be given (the correction is relative to them), got "
            f"running_mean={'None' if running_mean is None else 'an array'}, "
            f"running_var={'None' if running_var is None else 'an array'}."
        )
    renormalize = _check_bool_like(owner, "renormalize", renormalize)
    return _batch_statistics(
        owner,
        x,
        running_mean,
        running_var,
        scale,
        bias,
        training=training,
        feature_axes=feature_axes,
        momentum=momentum,
        epsilon=epsilon,
        mask=mask,
        unbiased_running_var=unbiased_running_var,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance,
        dtype=dtype,
        renorm=(r_max, d_max, renormalize),
    )


def _check_bool_like(owner, option, value):
    """A Python bool or a boolean array (possibly traced)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if hasattr(value, "dtype") and jnp.dtype(value.dtype) == jnp.bool_:
        return value
    raise TypeError(f"{owner}: {option} must be a bool or a boolean array, got {type(value).__name__} {value!r}.")


def lp_normalize(
    x: Input,
    p: float = 2.0,
    *,
    axis: Axes = -1,
    epsilon: Epsilon = 1e-12,
    mask: ArrayLike | None = None,
) -> Output:
    r"""Lp normalization: ``x / max(||x||_p, epsilon)`` over ``axis``.

    Equal to ``torch.nn.functional.normalize(x, p, dim, eps)`` (L2 by default:
    cosine similarity, L2 QK-norm). Positions where ``mask`` is False are left
    out of the norm and returned as 0. The norm is formed on values rescaled
    by a power of two, so it neither overflows nor underflows in float32
    (``x`` of magnitude 1e30 normalizes like ``x`` of magnitude 1); at
    ``x = 0`` the gradient is finite (the norm's subgradient 0, as in PyTorch).

    Parameters
    ----------
    x : array_like or Quantity
        A Quantity gives a dimensionless result (``epsilon`` is read in its unit).
    p : float
        The norm's order: a positive number, or ``inf`` (the largest magnitude).
    axis : int or sequence of int
        Axes of ``x`` that the norm runs over.
    epsilon : float or Quantity
        Lower bound of the norm, positive.
    mask : array_like of bool, optional
        Valid positions, broadcastable to ``x``.

    Returns
    -------
    Array
        Same shape as ``x``, in the input's floating dtype.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from brainnorm.functional import lp_normalize
    >>> lp_normalize(jnp.array([3.0, 4.0])).tolist()
    [0.6000000238418579, 0.800000011920929]
    >>> lp_normalize(jnp.array([3.0, 4.0]), p=1).tolist()
    [0.4285714626312256, 0.5714285969734192]
    """
    owner = "lp_normalize"
    p = (
        math.inf
        if isinstance(p, (int, float, np.floating)) and p == math.inf
        else check_real(owner, "p", p, positive=True)
    )
    x_m, unit, mask = _prepare(owner, x, mask)
    axes = canonical_axes(owner, "axis", axis, x_m.ndim)
    check_epsilon(owner, epsilon)
    # epsilon bounds the norm, which has the unit of x
    eps = _units.in_unit(owner, "epsilon", epsilon, unit) if _units.split(epsilon)[1] is not None else epsilon
    y = _stats.lp_normalized(x_m, p, axes, eps, mask)
    return y.astype(output_dtype(x_m.dtype))


def _batch_and_channel_axes(owner, shape, batch_axes, feature_axis):
    """Validated ``(batch, feature)`` axes of group and instance normalization."""
    ndim = len(shape)
    if ndim == 0:
        raise ValueError(f"{owner}: x must have a channel axis, got shape {tuple(shape)}.")
    batch = canonical_axes(owner, "batch_axes", batch_axes, ndim, allow_empty=True)
    if len(batch) >= ndim:
        raise ValueError(
            f"{owner}: x must have a batch axis and a channel axis, got shape {tuple(shape)} "
            f"with batch_axes={batch_axes!r}."
        )
    feature = canonical_axes(owner, "feature_axis", feature_axis, ndim)
    if set(feature) & set(batch):
        raise ValueError(f"{owner}: feature_axis must not be a batch axis {batch}, got feature_axis={feature_axis!r}.")
    return batch, feature


def group_norm(
    x: Input,
    num_groups: int | None,
    scale: Value | None = None,
    bias: Value | None = None,
    *,
    feature_axis: int = -1,
    reduction_axes: Axes | None = None,
    epsilon: Epsilon = 1e-6,
    mask: ArrayLike | None = None,
    group_size: int | None = None,
    batch_axes: Axes = 0,
    use_fast_variance: bool = False,
    axis_name: AxisName | None = None,
    axis_index_groups: AxisIndexGroups | None = None,
    dtype: DTypeLike | None = None,
) -> Array:
    r"""Group normalization (Wu and He, 2018).

    Channels along ``feature_axis`` are split into ``num_groups`` groups;

    .. math:: y = \frac{x - E_g[x]}{\sqrt{\mathrm{Var}_g[x] + \epsilon}}\gamma + \beta

    with statistics per sample and group over the group's channels and every
    other non-batch axis. The first axis of ``x`` is the batch axis (flax),
    unless ``batch_axes`` says otherwise.

    Parameters
    ----------
    x : array_like or Quantity
        ``(B, ..., C, ...)``.
    num_groups : int or None
        Must divide the number of channels; None when ``group_size`` is given.
    scale, bias : array_like or Quantity, optional
        Broadcastable to ``x`` (e.g. shape ``(C,)`` for trailing channels).
    feature_axis : int
        Channel axis of ``x`` (not a batch axis).
    reduction_axes : int or sequence of int, optional
        Axes of ``x`` to reduce; must include ``feature_axis`` and exclude the
        batch axes. Default: every axis but the batch axes.
    epsilon : float or Quantity
    mask : array_like of bool, optional
    group_size : int, optional
        Channels per group, instead of ``num_groups``.
    batch_axes : int or sequence of int
        Axes of ``x`` whose entries are separate samples (``()`` for one
        unbatched sample; ``(0, 1)`` for ``(T, B, ...)``).
    use_fast_variance : bool
        One-pass variance (flax parity).
    axis_name : hashable, optional
        Also reduce over this mapped axis (a sample split across devices).
    axis_index_groups : sequence of sequences of int, optional
    dtype : dtype, optional
        Output dtype; default the input's floating dtype.

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
    axis_name, axis_index_groups = check_axis_name(owner, axis_name, axis_index_groups)
    batch, feature = _batch_and_channel_axes(owner, x_m.shape, batch_axes, feature_axis)
    if len(feature) != 1:
        raise ValueError(f"{owner}: feature_axis must name one axis, got {feature_axis!r}.")
    feature = feature[0]
    if reduction_axes is None:
        axes = tuple(a for a in range(x_m.ndim) if a not in batch)
    else:
        axes = canonical_axes(owner, "reduction_axes", reduction_axes, x_m.ndim)
        if set(axes) & set(batch):
            raise ValueError(f"{owner}: reduction_axes must not include a batch axis {batch}, got {reduction_axes!r}.")
        if feature not in axes:
            raise ValueError(
                f"{owner}: reduction_axes must include feature_axis={feature_axis!r} (the group's "
                f"channels), got {reduction_axes!r}."
            )
    num_groups, _ = check_groups(owner, x_m.shape[feature], num_groups, group_size)
    reduction = Reduction(
        axes,
        groups=(feature, num_groups),
        use_fast_variance=bool(use_fast_variance),
        axis_name=axis_name,
        axis_index_groups=_groups(axis_index_groups),
    )
    return _normalize(owner, x_m, unit, reduction, mask=mask, scale=scale, bias=bias, epsilon=epsilon, dtype=dtype)[0]


@overload
def instance_norm(
    x: Input,
    scale: Value | None = None,
    bias: Value | None = None,
    *,
    feature_axis: Axes = -1,
    epsilon: Epsilon = 1e-5,
    mask: ArrayLike | None = None,
    batch_axes: Axes = 0,
    running_mean: None = None,
    running_var: None = None,
    training: bool = True,
    momentum: Momentum = 0.99,
    unbiased_running_var: bool = False,
    axis_name: AxisName | None = None,
    axis_index_groups: AxisIndexGroups | None = None,
    use_fast_variance: bool = False,
    dtype: DTypeLike | None = None,
) -> Array: ...


@overload
def instance_norm(
    x: Input,
    scale: Value | None = None,
    bias: Value | None = None,
    *,
    feature_axis: Axes = -1,
    epsilon: Epsilon = 1e-5,
    mask: ArrayLike | None = None,
    batch_axes: Axes = 0,
    running_mean: Value,
    running_var: Value,
    training: bool = True,
    momentum: Momentum = 0.99,
    unbiased_running_var: bool = False,
    axis_name: AxisName | None = None,
    axis_index_groups: AxisIndexGroups | None = None,
    use_fast_variance: bool = False,
    dtype: DTypeLike | None = None,
) -> tuple[Array, Any, Any]: ...


def instance_norm(
    x: Input,
    scale: Value | None = None,
    bias: Value | None = None,
    *,
    feature_axis: Axes = -1,
    epsilon: Epsilon = 1e-5,
    mask: ArrayLike | None = None,
    batch_axes: Axes = 0,
    running_mean: Value | None = None,
    running_var: Value | None = None,
    training: bool = True,
    momentum: Momentum = 0.99,
    unbiased_running_var: bool = False,
    axis_name: AxisName | None = None,
    axis_index_groups: AxisIndexGroups | None = None,
    use_fast_variance: bool = False,
    dtype: DTypeLike | None = None,
) -> Any:
    r"""Instance normalization (Ulyanov et al., 2016).

    .. math:: y = \frac{x - E_{s,c}[x]}{\sqrt{\mathrm{Var}_{s,c}[x] + \epsilon}}\gamma + \beta

    with statistics per sample ``s`` (first axis, or ``batch_axes``) and
    channel ``c`` over every other axis; equal to :func:`group_norm` with one
    channel per group.

    With running statistics (PyTorch's ``track_running_stats=True``), training
    normalizes with the instance statistics and updates the running ones with
    their batch average (over the instances with a valid element); evaluation
    (``training=False``) normalizes with the running statistics. The function
    then returns ``(y, new_running_mean, new_running_var)`` like
    :func:`batch_norm`.

    Parameters
    ----------
    x : array_like or Quantity
        ``(B, ..., C, ...)``.
    scale, bias : array_like or Quantity, optional
    feature_axis : int or sequence of int
        Channel axes (not batch axes).
    epsilon : float or Quantity
    mask : array_like of bool, optional
    batch_axes : int or sequence of int
        Axes of ``x`` whose entries are separate samples (``()``: one sample).
    running_mean, running_var : array_like or Quantity, optional
        Running statistics, one entry per channel (e.g. ``(C,)``).
    training : bool
        With running statistics: update them (True) or normalize with them.
    momentum : float or array
        Weight of the old running value (flax/brainstate convention).
    unbiased_running_var : bool
        Correct each instance's variance by ``n / (n - 1)`` before averaging.
    axis_name : hashable, optional
        Average the instance statistics across this mapped axis too (the
        normalization itself is per instance).
    axis_index_groups : sequence of sequences of int, optional
    use_fast_variance : bool
    dtype : dtype, optional

    Returns
    -------
    Array or Quantity, or ``(y, new_running_mean, new_running_var)``

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
    momentum = check_momentum(owner, momentum, allow_none=False)
    x_m, unit, mask = _prepare(owner, x, mask)
    axis_name, axis_index_groups = check_axis_name(owner, axis_name, axis_index_groups)
    batch, feature = _batch_and_channel_axes(owner, x_m.shape, batch_axes, feature_axis)
    axes = tuple(a for a in range(x_m.ndim) if a not in batch and a not in feature)
    kept = tuple(1 if a in axes or a in batch else d for a, d in enumerate(x_m.shape))
    check_running_statistics(owner, running_mean, running_var, kept)
    x_m, stats_unit, mean, var = _units.in_statistics_unit(owner, x_m, unit, running_mean, running_var)
    if mean is not None:
        check_momentum_shape(owner, momentum, mean.shape)
    options = dict(scale=scale, bias=bias, epsilon=epsilon, dtype=dtype)
    if mean is not None and not training:
        stats = _stats.given_moments(mean, var, stats_dtype(x_m.dtype))
        return (_apply(owner, x_m, stats_unit, stats, **options),) + _with_unit(mean, var, stats_unit)
    reduction = Reduction(axes, use_fast_variance=bool(use_fast_variance))
    y, stats = _normalize(owner, x_m, stats_unit, reduction, mask=mask, with_moments=mean is not None, **options)
    if mean is None:
        return y
    batch_mean, batch_var, instances = _stats.instance_running_statistics(
        stats,
        batch,
        unbiased_var=unbiased_running_var,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
    )
    mean, var = _stats.running_update(mean, var, batch_mean, batch_var, instances, momentum)
    return (y,) + _with_unit(mean, var, stats_unit)


def local_response_norm(
    x: Input,
    size: int,
    *,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 1.0,
    feature_axis: int = -1,
    mask: ArrayLike | None = None,
    dtype: DTypeLike | None = None,
) -> Output:
    r"""Local response normalization across channels (Krizhevsky et al., 2012).

    .. math::

        b_c = a_c \left(k + \frac{\alpha}{n}
        \sum_{c'=c - \lfloor n/2 \rfloor}^{c + \lfloor (n-1)/2 \rfloor} a_{c'}^2\right)^{-\beta}

    with ``n = size`` and zero padding outside the channel range (PyTorch).

    Parameters
    ----------
    x : array_like or Quantity
        A Quantity is normalized through its mantissa (``alpha`` is then in
        the inverse squared unit) and keeps its unit.
    size : int
        Number of neighbouring channels summed.
    alpha, beta, k : float
        Finite and representable in the statistics dtype, with ``alpha >= 0``,
        ``k >= 0`` and ``k > 0`` when ``beta > 0``: the base ``k + alpha / n *
        sum`` then stays positive (PyTorch accepts other values and returns
        nan where the base is negative, or zero under a positive ``beta``).
    feature_axis : int
        Channel axis of ``x``.
    mask : array_like of bool, optional
        Positions where the mask is False count as zero in every window.
    dtype : dtype, optional
        Output dtype; default the input's floating dtype.

    Returns
    -------
    Array or Quantity

    Raises
    ------
    ValueError
        ``alpha < 0``, ``k < 0``, ``k == 0`` with ``beta > 0``, a value that is
        not finite or overflows the statistics dtype, a non-positive ``size``.
    TypeError
        A non-numeric ``alpha``, ``beta`` or ``k``.

    References
    ----------
    Krizhevsky, Sutskever, Hinton. ImageNet Classification with Deep
    Convolutional Neural Networks. NeurIPS 2012.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from brainnorm.functional import local_response_norm
    >>> local_response_norm(jnp.array([0., 1.]), 1, alpha=3., beta=0.5, k=1.).tolist()   # 1 / sqrt(1 + 3)
    [0.0, 0.5]
    """
    owner = "local_response_norm"
    size = check_positive_int(owner, "size", size)
    alpha, beta, k = check_local_response(owner, alpha, beta, k)
    dtype = check_dtype(owner, "dtype", dtype)
    x_m, unit, mask = _prepare(owner, x, mask)
    # the values must also fit the dtype this input is computed in (float32 unless float64)
    check_local_response(owner, alpha, beta, k, stats_dtype(x_m.dtype))
    feature = canonical_axes(owner, "feature_axis", feature_axis, x_m.ndim)
    if len(feature) != 1:
        raise ValueError(f"{owner}: feature_axis must name one axis, got {feature_axis!r}.")
    y = _stats.local_response(x_m, size, alpha, beta, k, feature[0], mask=mask)
    return _units.attach(y.astype(output_dtype(x_m.dtype, dtype)), unit)


def weight_standardization(
    w: ArrayLike,
    eps: float = 1e-4,
    gain: ArrayLike | None = None,
    out_axis: int = -1,
) -> Array:
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
    w_m = check_input(owner, w_m, option="w")
    out = canonical_axes(owner, "out_axis", out_axis, w_m.ndim)
    axes = tuple(a for a in range(w_m.ndim) if a not in out)
    gain_m, _, out_unit = _units.affine_units(owner, gain, None)
    if gain_m is not None:
        gain_m = check_input(owner, gain_m, option="gain")
        check_broadcasts(owner, "gain", gain_m, w_m.shape)
    y = _stats.standardize_weight(w_m, axes, _units.epsilon_value(owner, eps, unit), gain_m)
    return _units.attach(y.astype(output_dtype(w_m.dtype)), out_unit)


# Divisive normalization (neuroscience) lives in its own module of the core.
from ._divisive_functional import divisive_normalization, gdn  # noqa: E402

# Accumulated (TAB) and NeuNorm statistics of spiking networks, likewise.
from ._spiking_functional import AccumulatedSums as AccumulatedSums  # noqa: E402  (re-exported: the sums of single-step TAB)
from ._spiking_functional import neu_norm, temporal_accumulated_batch_norm  # noqa: E402
