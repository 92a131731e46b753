r"""Statistics of the spiking-network normalizations: TAB and NeuNorm.

Pure functions on arrays and :class:`brainunit.Quantity`, built on the
statistics core (:mod:`brainnorm._stats`); the layers of
:mod:`brainnorm._spiking` hold states and call them.

``temporal_accumulated_batch_norm``
    Temporal accumulated batch normalization (TAB; Jiang et al., ICLR 2024):
    the statistics of step ``t`` are those of steps ``0..t`` together.
    Each step is reduced by :func:`brainnorm._stats.compute_moments` (shifted
    two-pass moments, masks, ``axis_name``); the per-step moments are then
    re-expressed around one shift ``k`` for the whole sequence (the shift of
    its first step, a value inside the data) and summed cumulatively over
    time, which is Chan, Golub and LeVeque's pairwise update applied along the
    time axis. The output is formed in the shifted domain,
    ``((x - k) - E[x - k]) / std``, so a large offset ``|mean| >> std`` costs
    no digits, and the sums keep the core's power-of-two scale, so data whose
    squares overflow stay finite. The sums of a sequence so far
    (:class:`AccumulatedSums`) can be passed in and are returned, so that one
    step at a time gives what a whole sequence gives. Padding (mask False) is
    selected out before any arithmetic, and a padded position whose output is
    not finite (nan padding) depends on the statistics only as a constant, so
    padding never reaches a gradient.

``neu_norm``
    NeuNorm (Wu et al., AAAI 2019): an auxiliary state driven by the
    channel sum of the input spikes, subtracted with a learned weight.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _units
from ._stats import (
    Moments,
    Reduction,
    abs_sq,
    apply_moments,
    compute_moments,
    given_moments,
    output_dtype,
    running_update,
    stats_dtype,
)
from ._typing import ArrayLike, Axes, AxisIndexGroups, AxisName, DTypeLike, Epsilon, Input, Momentum, Output, Value
from ._validation import (
    canonical_axes,
    check_axis_name,
    check_broadcasts,
    check_dtype,
    check_epsilon,
    check_flag,
    check_input,
    check_mask,
    check_momentum,
    check_momentum_shape,
    check_running_statistics,
)

__all__ = ["AccumulatedSums", "temporal_accumulated_batch_norm", "neu_norm"]


class AccumulatedSums(NamedTuple):
    """Sums of a sequence so far, per statistic (the reduced axes kept with size 1, no time axis).

    Plain arrays in the unit of the statistics (the running statistics' unit,
    else the input's), multiplied by ``scale``.

    Attributes
    ----------
    count : Array
        Number of valid elements seen (0 starts a new sequence).
    shift : Array
        The sequence's shift ``k`` (a value inside the data of its first step).
    total : Array
        Sum of ``(x - k) * scale`` over the valid elements.
    total_sq : Array
        Sum of ``|(x - k) * scale|^2`` over the valid elements.
    scale : Array or None
        A power of two at most 1 (the statistics core's, see
        :class:`brainnorm._stats.Moments`), so that the sums of huge data
        (``|x| ~ 1e19``, whose squares overflow float32) stay finite; None
        (or absent, for sums from a 4-field tuple) means 1.
    """

    count: Any  # arrays (JAX or NumPy); the field may shadow tuple.count
    shift: Any
    total: Any
    total_sq: Any
    scale: Any = None


def _is_static(count) -> bool:
    """A count known at trace time (NumPy), the same for every statistic of a step."""
    return not isinstance(count, jax.Array)


def _per_step(owner, option, value, steps, ndim):
    """A per-step array (``p``) of ``steps`` entries, shaped ``(steps, 1, ..., 1)`` for rank ``ndim``."""
    value = jnp.asarray(_units.in_unit(owner, option, value, None))
    if value.size != steps and value.size != 1:
        raise ValueError(f"{owner}: {option} must have one entry per time step ({steps}), got shape {value.shape}.")
    return jnp.reshape(value, (-1,) + (1,) * (ndim - 1))


def _accumulated_in(owner, accumulated, stat_shape, dtype):
    """``accumulated`` as arrays of ``stat_shape`` (one entry per statistic) in ``dtype``; scale 1 if absent."""
    if not isinstance(accumulated, tuple) or len(accumulated) not in (4, 5):
        raise TypeError(
            f"{owner}: accumulated must be an AccumulatedSums (count, shift, total, total_sq[, scale]), got "
            f"{type(accumulated).__name__}."
        )
    size = int(np.prod(stat_shape))
    values = []
    for name, value in zip(AccumulatedSums._fields, tuple(accumulated) + (None,) * (5 - len(accumulated)), strict=True):
        if value is None and name == "scale":
            value = jnp.ones(stat_shape, dtype)
        value = jnp.asarray(_units.split(value)[0])
        if value.size != size:
            raise ValueError(
                f"{owner}: accumulated.{name} must have one entry per statistic ({size}, shape "
                f"{tuple(stat_shape)}), got shape {value.shape}."
            )
        values.append(jnp.reshape(value, stat_shape).astype(dtype))
    return AccumulatedSums(*values)


def _accumulate(step_moments: Moments, accumulated):
    """Statistics of steps ``0..t`` for every ``t`` from per-step moments, and the sums after the last step.

    Each step's moments are re-expressed around the sequence's shift ``k``
    (sums of ``x - k`` and ``|x - k|^2``) and summed cumulatively along the
    time axis (axis 0). ``accumulated`` holds the sums of earlier steps of the
    same sequence (None: the sequence starts here). Where nothing has been
    seen yet, ``k`` is this call's first step's shift.

    The moments of the core carry a power-of-two ``scale`` per step (they are
    those of ``(x - shift) * scale``): every step and the earlier sums are
    brought to the smallest scale (an exact multiplication) before they are
    added, so the sums of data whose squares overflow (``|x| ~ 1e19`` in
    float32) stay finite; the returned moments carry that scale.
    """
    var = step_moments.var
    real = var.dtype
    steps = var.shape[0]
    first_shift = jnp.zeros_like(step_moments.delta[:1]) if step_moments.shift is None else step_moments.shift[:1]
    count = step_moments.count
    step_count: Any
    if _is_static(count):
        # unmasked, single device: every statistic of a step counts the same
        step_count = np.full((steps,) + (1,) * (var.ndim - 1), count, dtype=np.dtype(real))
    else:
        step_count = jnp.broadcast_to(jnp.asarray(count, real), var.shape)
    if accumulated is None:
        shift = first_shift
    else:
        seen = accumulated.count[None] > 0
        shift = jnp.where(seen, accumulated.shift[None].astype(first_shift.dtype), first_shift)
    shift = jax.lax.stop_gradient(shift)
    # the common scale: the smallest of the steps' and of the earlier sums' (powers of two, ratios exact)
    step_scale = step_moments.scale
    scale = None
    if step_scale is not None or accumulated is not None:
        step_scale = jnp.ones_like(var) if step_scale is None else jnp.broadcast_to(step_scale, var.shape)
        scale = jnp.min(step_scale, axis=0, keepdims=True)
        if accumulated is not None:
            scale = jnp.minimum(scale, jnp.where(seen, accumulated.scale[None].astype(real), 1))
        scale = jax.lax.stop_gradient(scale)
        ratio = jax.lax.stop_gradient(scale / step_scale)
    # offset of each step's mean from k: (own shift - k) + (mean - own shift), small for steady data;
    # delta and var are those of the step's scaled values
    own_shift = jnp.zeros_like(shift) if step_moments.shift is None else step_moments.shift
    if scale is None:
        offset = (own_shift - shift) + step_moments.delta
        step_var = var
    else:
        offset = (own_shift - shift) * scale + step_moments.delta * ratio
        step_var = var * jnp.square(ratio)
    total = jnp.cumsum(step_count * offset, axis=0)
    total_sq = jnp.cumsum(step_count * (step_var + abs_sq(offset)), axis=0)
    if _is_static(step_count) and accumulated is None:
        count = np.cumsum(step_count, axis=0).astype(np.dtype(real))
    else:
        count = jnp.cumsum(jnp.asarray(step_count, real), axis=0)
    if accumulated is not None:
        assert scale is not None  # set above whenever there are earlier sums
        # entries that have seen nothing start anew, whatever their sums hold
        earlier = jax.lax.stop_gradient(scale / jnp.where(seen, accumulated.scale[None].astype(real), 1))
        total = total + jnp.where(seen, accumulated.total[None] * earlier, 0).astype(total.dtype)
        total_sq = total_sq + jnp.where(seen, accumulated.total_sq[None] * jnp.square(earlier), 0).astype(real)
        count = count + jnp.where(seen, accumulated.count[None], 0).astype(real)
    n = np.maximum(count, 1) if _is_static(count) else jnp.maximum(count, 1)
    delta = total / n
    cumulative_var = jnp.maximum(total_sq / n - abs_sq(delta), 0)
    last = AccumulatedSums(
        count=jnp.broadcast_to(jnp.asarray(count[-1], real), var.shape[1:]),
        shift=jnp.broadcast_to(shift[0], var.shape[1:]),
        total=jnp.broadcast_to(total[-1], var.shape[1:]),
        total_sq=jnp.broadcast_to(total_sq[-1], var.shape[1:]),
        scale=jnp.ones(var.shape[1:], real) if scale is None else jnp.broadcast_to(scale[0], var.shape[1:]),
    )
    moments = Moments(shift=shift, delta=delta, var=cumulative_var, count=count, scale=scale)
    return moments, last


def _apply_with_padding(x, stats: Moments, mask, *, epsilon, scale, bias, out_dtype):
    """:func:`apply_moments`, where a padded position with a non-finite output does not depend on the statistics.

    Padding may hold anything (data loaders pad with nan). Its output is
    still ``x`` transformed with its group's statistics, but where that output
    is not finite the statistics and the parameters enter it only as constants:
    a zero cotangent there (a loss that reads valid outputs only) would
    otherwise reach them as ``0 * nan``. The two forms are selected, never
    multiplied by a 0/1 mask, and a select transposes to a select. Valid and
    finite padded positions keep the exact derivative.
    """
    if mask is None:
        return apply_moments(x, stats, epsilon=epsilon, scale=scale, bias=bias, out_dtype=out_dtype)
    frozen = stats._replace(
        **{
            name: jax.lax.stop_gradient(getattr(stats, name))
            for name in ("shift", "delta", "var", "scale")
            if getattr(stats, name) is not None
        }
    )
    constant = None if scale is None else jax.lax.stop_gradient(scale)
    offset = None if bias is None else jax.lax.stop_gradient(bias)
    alone = apply_moments(x, frozen, epsilon=epsilon, scale=constant, bias=offset, out_dtype=out_dtype)
    dropped = jax.lax.stop_gradient(~mask & ~jnp.isfinite(alone))
    live = apply_moments(
        jnp.where(dropped, jnp.zeros((), x.dtype), x),
        stats,
        epsilon=epsilon,
        scale=scale,
        bias=bias,
        out_dtype=out_dtype,
    )
    return jnp.where(dropped, alone, live)


def temporal_accumulated_batch_norm(
    x: Input,
    running_mean: Value | None = None,
    running_var: Value | None = None,
    scale: Value | None = None,
    bias: Value | None = None,
    p: ArrayLike | None = None,
    *,
    training: bool,
    feature_axes: Axes = -1,
    momentum: Momentum = 0.99,
    epsilon: Epsilon = 1e-5,
    mask: ArrayLike | None = None,
    unbiased_running_var: bool = False,
    accumulated: AccumulatedSums | None = None,
    return_accumulated: bool = False,
    axis_name: AxisName | None = None,
    axis_index_groups: AxisIndexGroups | None = None,
    use_fast_variance: bool = False,
    dtype: DTypeLike | None = None,
) -> tuple[Any, ...]:
    r"""Temporal accumulated batch normalization, TAB (Jiang et al., ICLR 2024).

    ``x`` is time-major, ``(T, ...)``. The statistics of step ``t`` are taken
    over the steps ``0..t`` together (and every axis but axis 0 and
    ``feature_axes``):

    .. math::

        \mu_t = \frac{1}{N_t}\sum_{s \le t}\sum_i x_{s,i}, \qquad
        \sigma_t^2 = \frac{1}{N_t}\sum_{s \le t}\sum_i |x_{s,i} - \mu_t|^2, \qquad
        y_t = p_t^2 \left(\gamma_t \frac{x_t - \mu_t}{\sqrt{\sigma_t^2 + \epsilon}} + \beta_t\right)

    with :math:`N_t` the number of valid elements of steps ``0..t``. In
    training the running statistics of step ``t`` are updated with
    :math:`\mu_t, \sigma_t^2` (``unbiased_running_var``: with
    :math:`\sigma_t^2 N_t / (N_t - 1)`); in evaluation (``training=False``)
    step ``t`` is normalized with its running statistics. Without running
    statistics both modes use the accumulated batch statistics.

    Parameters
    ----------
    x : array_like or Quantity
        ``(T, ...)``, time first.
    running_mean, running_var : array_like or Quantity, optional
        One entry per step and statistic: the shape of the statistics,
        ``(T, ...)`` with 1 at the reduced axes (e.g. ``(T, 1, C)`` for
        ``(T, B, C)`` input). Returned updated, in the same unit.
    scale, bias : array_like or Quantity, optional
        :math:`\gamma_t, \beta_t`, broadcastable to ``x`` (e.g. ``(T, 1, C)``).
    p : array_like, optional
        :math:`p_t`, shape ``(T,)`` (the output is scaled by ``p ** 2``).
    training : bool
    feature_axes : int or sequence of int
        Kept axes of ``x`` (channels); not axis 0.
    momentum : float or array
        Weight of the old running value (flax/brainstate convention; PyTorch's
        momentum is ``1 - momentum``); an array broadcastable to the running
        statistics gives one value per step.
    epsilon : float or Quantity
        Added to the variance, in the squared unit of the statistics.
    mask : array_like of bool, optional
        Valid positions, broadcastable to ``x``; left out of every statistic.
    unbiased_running_var : bool
        Update the running variance with the unbiased variance, counting every
        valid element of steps ``0..t``.
    accumulated : AccumulatedSums, optional
        Sums of the earlier steps of this sequence (from a previous call with
        ``return_accumulated=True``); None starts a new sequence. Entries with
        ``count == 0`` start anew too.
    return_accumulated : bool
        Also return the sums after the last step of ``x`` (unchanged when the
        running statistics are used).
    axis_name, axis_index_groups : optional
        Mapped axis to reduce over as well (exact sums and counts).
    use_fast_variance : bool
        One-pass per-step variance.
    dtype : dtype, optional
        Output dtype (default the input's floating dtype).

    Returns
    -------
    y, new_running_mean, new_running_var[, accumulated]
        The running statistics are None when not given.

    Raises
    ------
    ValueError
        ``x`` without a time axis, ``feature_axes`` containing axis 0 or out of
        range, running statistics or ``p`` of the wrong shape, a mask that does
        not broadcast.
    TypeError
        Floating mask, bad epsilon or momentum.

    References
    ----------
    Jiang, Zoonekynd, De Masi, Ballester. TAB: Temporal Accumulated Batch
    Normalization in Spiking Neural Networks. ICLR 2024.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from brainnorm._spiking_functional import temporal_accumulated_batch_norm
    >>> x = jnp.array([[[0.0], [2.0]], [[4.0], [6.0]]])       # (T=2, B=2, C=1)
    >>> y, _, _ = temporal_accumulated_batch_norm(x, training=True, epsilon=1e-12)
    >>> y[0].ravel().tolist(), [round(v, 4) for v in y[1].ravel().tolist()]
    ([-1.0, 1.0], [0.4472, 1.3416])
    """
    return _temporal_accumulated_batch_norm(
        "temporal_accumulated_batch_norm",
        x,
        running_mean,
        running_var,
        scale,
        bias,
        p,
        training=training,
        feature_axes=feature_axes,
        momentum=momentum,
        epsilon=epsilon,
        mask=mask,
        unbiased_running_var=unbiased_running_var,
        accumulated=accumulated,
        return_accumulated=return_accumulated,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance,
        dtype=dtype,
    )


def _temporal_accumulated_batch_norm(
    owner: str,
    x,
    running_mean,
    running_var,
    scale,
    bias,
    p,
    *,
    training,
    feature_axes,
    momentum,
    epsilon,
    mask,
    unbiased_running_var,
    accumulated,
    return_accumulated,
    axis_name,
    axis_index_groups,
    use_fast_variance,
    dtype,
):
    """:func:`temporal_accumulated_batch_norm`, its errors naming ``owner`` (a layer passes its class name)."""
    check_epsilon(owner, epsilon)
    momentum = check_momentum(owner, momentum, allow_none=False)
    axis_name, axis_index_groups = check_axis_name(owner, axis_name, axis_index_groups)
    dtype = check_dtype(owner, "dtype", dtype)
    x_m, unit = _units.split(x)
    x_m = check_input(owner, x_m)
    if x_m.ndim < 1:
        raise ValueError(f"{owner}: x must have a leading time axis (T, ...), got shape {x_m.shape}.")
    mask = check_mask(owner, mask, x_m.shape)
    feature = canonical_axes(owner, "feature_axes", feature_axes, x_m.ndim, allow_empty=True)
    if 0 in feature:
        raise ValueError(f"{owner}: feature_axes must not include the time axis 0, got {feature_axes!r}.")
    axes = tuple(a for a in range(1, x_m.ndim) if a not in feature)
    kept = tuple(1 if a in axes else d for a, d in enumerate(x_m.shape))
    check_running_statistics(owner, running_mean, running_var, kept)
    x_m, stats_unit, mean, var = _units.in_statistics_unit(owner, x_m, unit, running_mean, running_var)
    if mean is not None:
        check_momentum_shape(owner, momentum, mean.shape)
    steps = x_m.shape[0]
    weight = None if p is None else jnp.square(_per_step(owner, "p", p, steps, x_m.ndim))
    eps = _units.epsilon_value(owner, epsilon, stats_unit)
    scale_m, bias_m, out_unit = _units.affine_units(owner, scale, bias)
    if scale_m is not None:
        check_broadcasts(owner, "scale", scale_m, x_m.shape)
        scale_m = check_input(owner, scale_m, "scale")
    if bias_m is not None:
        check_broadcasts(owner, "bias", bias_m, x_m.shape)
        bias_m = check_input(owner, bias_m, "bias")
    if weight is not None:
        # p_t^2 (gamma_t x_hat + beta_t) = x_hat (p_t^2 gamma_t) + p_t^2 beta_t
        scale_m = weight if scale_m is None else weight * scale_m
        bias_m = None if bias_m is None else weight * bias_m
    out_dtype = output_dtype(x_m.dtype, dtype)
    sdtype = stats_dtype(x_m.dtype)
    stat_shape = kept[1:]
    if accumulated is not None:
        accumulated = _accumulated_in(owner, accumulated, stat_shape, jnp.zeros((), sdtype).real.dtype)

    if mean is not None and not training:
        stats = given_moments(mean, var, sdtype)
        y = _apply_with_padding(x_m, stats, mask, epsilon=eps, scale=scale_m, bias=bias_m, out_dtype=out_dtype)
        new_mean, new_var, last = mean, var, accumulated
    else:
        groups = None if axis_index_groups is None else tuple(tuple(int(i) for i in g) for g in axis_index_groups)
        step_moments = compute_moments(
            # padding is selected out before any arithmetic, so that even its derivative never sees it
            x_m if mask is None else jnp.where(mask, x_m, jnp.zeros((), x_m.dtype)),
            axes,
            mask=mask,
            use_fast_variance=bool(use_fast_variance),
            axis_name=axis_name,
            axis_index_groups=groups,
            scaled=True,
        )
        stats, last = _accumulate(step_moments, accumulated)
        y = _apply_with_padding(x_m, stats, mask, epsilon=eps, scale=scale_m, bias=bias_m, out_dtype=out_dtype)
        new_mean = new_var = None
        if mean is not None:
            batch = stats.unscaled()
            new_mean, new_var = running_update(
                mean, var, batch.mean, batch.var, batch.count, momentum, unbiased_var=unbiased_running_var
            )
    result: tuple = (_units.attach(y, out_unit),)
    if new_mean is None:
        result += (None, None)
    else:
        result += (
            _units.attach(new_mean, stats_unit),
            _units.attach(new_var, None if stats_unit is None else stats_unit**2),
        )
    if return_accumulated:
        result += (last,)
    return result


def _check_decay(owner, k):
    """``k`` as a Python float in [0, 1]."""
    if isinstance(k, (bool, str, bytes)) or np.ndim(k) != 0 or np.asarray(k).dtype.kind not in "iuf":
        raise TypeError(f"{owner}: k must be a number in [0, 1], got {type(k).__name__} {k!r}.")
    value = float(np.asarray(k))
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{owner}: k must be a number in [0, 1], got {k!r}.")
    return value


def neu_norm(
    x: Input,
    weight: ArrayLike,
    state: Value | None = None,
    *,
    k: float = 0.9,
    feature_axes: Axes = -1,
    multi_step: bool = False,
) -> tuple[Output, Output]:
    r"""NeuNorm (Wu et al., AAAI 2019): subtract the recent channel-summed activity.

    .. math::

        a_t = k\, a_{t-1} + \frac{1 - k}{C^2} \sum_c s_t[c], \qquad y_t = s_t - w\, a_t

    per sample and non-feature position, with ``C`` channels (the entries of
    the feature axes). Equal to spikingjelly 2.0's ``functional.neunorm_step``
    with ``momentum = k`` and ``input_scale = (1 - k) / C**2``.

    Parameters
    ----------
    x : array_like or Quantity
        Input spikes ``s_t``: one step ``(...)`` or, with ``multi_step``, a
        sequence ``(T, ...)``.
    weight : array_like
        ``w``, broadcastable to one step of ``x`` without enlarging it.
    state : array_like or Quantity, optional
        ``a_{t-1}``: one step of ``x`` with 1 at the feature axes (in the unit
        of ``x``); None starts from 0.
    k : float
        Decay of the state, in [0, 1].
    feature_axes : int or sequence of int
        Channel axes, counted on one step of ``x`` (negative from the end).
    multi_step : bool
        ``x`` is ``(T, ...)``: the steps are taken in order.

    Returns
    -------
    y, new_state
        ``y`` like ``x``; ``new_state`` is ``a`` after the last step.

    Raises
    ------
    ValueError
        ``k`` outside [0, 1], ``x`` without a channel axis, ``feature_axes``
        out of range, ``weight`` that does not broadcast to one step of ``x``,
        ``state`` that does not broadcast to one step with 1 at the feature
        axes.
    TypeError
        Non-numeric ``x``, ``weight`` or ``state``, a ``multi_step`` that is
        not a bool.
    UnitError
        ``weight`` with a unit, ``state`` in a unit not convertible to that of
        ``x``.

    References
    ----------
    Wu, Deng, Li, Zhu, Xie, Shi. Direct Training for Spiking Neural Networks:
    Faster, Larger, Better. AAAI 2019.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from brainnorm._spiking_functional import neu_norm
    >>> y, a = neu_norm(jnp.array([[1.0, 1.0]]), jnp.ones(2), k=0.5)   # a = 0.5 / 4 * 2
    >>> y.tolist(), a.tolist()
    ([[0.75, 0.75]], [[0.25]])
    """
    owner = "neu_norm"
    k = _check_decay(owner, k)
    multi_step = bool(check_flag(owner, "multi_step", multi_step))
    x_m, unit = _units.split(x)
    x_m = check_input(owner, x_m)
    step_ndim = x_m.ndim - (1 if multi_step else 0)
    if step_ndim < 1:
        raise ValueError(
            f"{owner}: x must have a channel axis{' after the time axis' if multi_step else ''}, got shape {x_m.shape}."
        )
    feature = canonical_axes(owner, "feature_axes", feature_axes, step_ndim)
    offset = 1 if multi_step else 0
    reduce_axes = tuple(a + offset for a in feature)
    channels = int(np.prod([x_m.shape[a] for a in reduce_axes]))
    if not jnp.issubdtype(x_m.dtype, jnp.floating):
        x_m = x_m.astype(output_dtype(x_m.dtype))
    weight_m = check_input(owner, _units.in_unit(owner, "weight", weight, None), "weight")
    one_step = tuple(x_m.shape[offset:])
    try:
        fits = np.broadcast_shapes(weight_m.shape, one_step) == one_step
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"{owner}: weight must be an array that broadcasts to one step of x, shape {one_step}, got shape "
            f"{weight_m.shape}."
        )
    # the channel sum of every step at once; the recursion over time is then on small arrays
    drive = Reduction(reduce_axes).total(x_m) * ((1.0 - k) / channels**2)
    step_shape = drive.shape[offset:]
    if state is None:
        previous = jnp.zeros(step_shape, drive.dtype)
    else:
        previous = check_input(owner, _units.in_unit(owner, "state", state, unit), "state")
        try:
            np.broadcast_shapes(previous.shape, step_shape)
        except ValueError:
            raise ValueError(
                f"{owner}: state must broadcast to {step_shape} (one step of x with 1 at the feature "
                f"axes), got shape {previous.shape}."
            ) from None
        previous = jnp.broadcast_to(previous, step_shape).astype(drive.dtype)
    if multi_step:

        def step(a, d):
            a = k * a + d
            return a, a

        last, activity = jax.lax.scan(step, previous, drive)
    else:
        activity = last = k * previous + drive
    y = (x_m - weight_m * activity).astype(x_m.dtype)
    return _units.attach(y, unit), _units.attach(last.astype(drive.dtype), unit)
