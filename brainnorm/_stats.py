"""The statistics core: every statistic brainnorm computes is computed here.

Every layer and function of brainnorm reduces to these calls:

``compute_moments(x, axes, ...)`` / ``compute_group_moments(...)``
    return :class:`Moments` ``(shift, delta, var, count)`` with the reduced
    axes kept at size 1. The mean is ``shift + delta``; ``count`` is the
    number of valid elements behind each statistic (across devices too).

``apply_moments(x, moments, ...)``
    computes ``((x - shift) - delta) * rsqrt(var + eps) * scale + bias``.

``running_update``, ``instance_running_statistics``, ``standardize_weight``
    the running-statistic updates (with unbiased correction and empty groups)
    and weight standardization, from the same moments.

There is one implementation, in plain ``jax.numpy``/``jax.lax``: every JAX
transformation (forward and reverse differentiation of any order, ``vmap``,
``checkpoint``, ``eval_shape``) and every way of partitioning a program
(GSPMD with automatic or explicit mesh axes, ``shard_map``, ``pmap``) applies
to it as to any JAX code, on every backend and for every input size.

Why a shift. The one-pass variance ``E[x^2] - E[x]^2`` loses every digit when
``|mean| >> std`` (float32 data ``1e4 + N(0, 1)`` gives variances off by
thousands), and even the two-pass ``E[(x - mean)^2]`` pays for the rounding of
the float32 mean when ``x - mean`` is formed and used as the centred value.
Here each group is shifted by a value ``k`` close to its data, the sums of
``x - k`` and ``|x - k|^2`` are taken, and the output is formed in the shifted
domain, ``((x - k) - delta)`` with ``delta = E[x - k]``: about 1e-6 from a
float64 reference at an offset of 1e4. Which ``k``:

* one of the group's own elements (the larger of its first two, taken by a
  reduction so that XLA stores it in a buffer of its own): no extra pass over
  the data, and ``(k - mean)^2 <= n var`` bounds the cancellation. Used for
  unmasked groups when the element can be sliced locally;
* otherwise the group's mean from a first pass (``sum * (1 / count)``): with a
  mask (the first elements may be padding), for empty groups (the mean of
  nothing is 0), and when a reduced axis is sharded along an explicit mesh
  axis (slicing a sharded axis is not allowed there, while a sum is reduced
  across shards).

The shift must be the same number everywhere it is used, although XLA may
evaluate it inside several fusions and contract ``x - s * r`` into a fused
multiply-add in some of them. An element is stored data; a mean is frozen by
clearing the last bit of its float representation (:func:`_frozen`), which
forces the product to be rounded once, before any consumer sees it.

* ``k`` is held constant under differentiation (``stop_gradient``): the
  moments are exact functions of ``x`` for any fixed ``k``, so derivatives of
  every order are exact and never differentiate through the choice of shift.
* Masks are selected inside the reductions (``where(mask, ..., 0)`` feeds the
  sums directly), so padding, even ``nan``, never enters arithmetic and
  nothing full-size is written. A mask that is constant along the reduced
  axes (a padding mask ``(B, T, 1)``) takes the unmasked path, with a count
  per group.

How it is compiled. Every sum of a group (count, mean, the shifted sums) is
formed in one pass over the data by one many-operand reduction in a lane
layout (:func:`_sums_kept`); the shift and the scale are stored by one small
reduction (:func:`_stored_pair`) and read by the consumers, never recomputed
inside them; the output is one elementwise pass. Read ``x`` twice, write the
output once.

Distributed statistics (``axis_name``): each device shifts by its own ``k_i``;
one ``all_gather`` brings every device's ``(n_i, k_i, s1_i, s2_i)``, which are
re-expressed around a common shift and summed (Chan et al.'s pairwise update);
channel groups (GroupNorm) are merged from per-channel sums the same way.
Counts are summed, never per-device means averaged, so masked statistics are
exact when devices hold different numbers of valid elements. Under GSPMD no
name is needed: the reductions above are partitioned by XLA, which adds the
per-shard partial sums.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__: list[str] = []


class Moments(NamedTuple):
    """Statistics of the reduced groups, reduced axes kept with size 1.

    ``shift`` is None when the statistics are not shifted (fast variance, RMS,
    or externally given mean/var); ``delta`` is None when there is no mean
    (RMS normalization). With a ``scale`` (a power of two per group, see
    :func:`_magnitude_scale`), ``delta`` and ``var`` are those of
    ``(x - shift) * scale``: the core's own form, which cannot overflow where
    the squares of ``x`` would; :meth:`unscaled` gives them in ``x``'s unit.
    ``count`` is the number of valid elements behind each statistic (summed
    across devices with ``axis_name``): an array, or a NumPy scalar when it is
    one number known at trace time (unmasked data), which
    keeps the traced program free of tests that cannot fail; None for
    statistics given from outside (running averages), which are never empty.
    """

    # Fields hold JAX or NumPy arrays (or None where documented). ``count``
    # shadows ``tuple.count``, which a NamedTuple field may do.
    shift: Any
    delta: Any
    var: Any
    count: Any
    scale: Any = None

    @property
    def mean(self) -> jax.Array:
        if self.delta is None:
            return jnp.zeros_like(self.var)
        delta = self.delta if self.scale is None else self.delta / self.scale
        if self.shift is None:
            return delta
        return self.shift + delta

    def unscaled(self) -> "Moments":
        """The same statistics in the unit of ``x`` (``scale`` None); may overflow where ``x``'s squares do."""
        if self.scale is None:
            return self
        # 1 / scale is a power of two at most 2^126; scale^2 may be subnormal (flushed to 0), and XLA
        # rewrites (v / s) / s into v / (s * s), so the variance is multiplied twice by the reciprocal
        inverse = 1 / self.scale
        delta = None if self.delta is None else self.delta * inverse
        return self._replace(delta=delta, var=self.var * inverse * inverse, scale=None)


def stats_dtype(x_dtype, dtype=None):
    """At least float32; float64 and complex stay as they are."""
    base = x_dtype if dtype is None else jnp.promote_types(x_dtype, dtype)
    if not (jnp.issubdtype(base, jnp.floating) or jnp.issubdtype(base, jnp.complexfloating)):
        base = jnp.float32
    return jnp.promote_types(base, jnp.float32)


def abs_sq(x):
    """Elementwise ``|x|^2`` (real for complex input)."""
    if jnp.iscomplexobj(x):
        return jnp.square(x.real) + jnp.square(x.imag)
    return jnp.square(x)


def _as_tuple_name(axis_name):
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)


class _Sums(NamedTuple):
    """Raw sums of one group: valid count, shift, sum of ``x - shift`` and of its ``|.|^2``.

    ``shift`` is None for unshifted sums (fast variance, RMS); ``s1`` is None
    without a mean (RMS).
    """

    count: Any  # (a field may shadow tuple.count)
    shift: Any
    s1: Any
    s2: Any
    scale: Any = None


def _static(count) -> bool:
    """True for a count known at trace time (a NumPy scalar, the same for every group)."""
    return not isinstance(count, jax.Array)


def _has_data(count):
    """``count > 0``, or None when that is known to hold everywhere."""
    if _static(count) and np.all(np.asarray(count) > 0):
        return None
    return jnp.asarray(count) > 0


def _select(pred, on_true, on_false):
    """``where(pred, on_true, on_false)`` in the dtype of ``on_true``.

    ``jnp.where`` (not a bare ``lax.select`` of broadcast constants) gives the
    constant the sharding of the other operands under explicit mesh axes.
    """
    on_true = jnp.asarray(on_true)
    return jnp.where(pred, on_true, jnp.asarray(on_false, on_true.dtype))


def _reciprocal(count):
    """``1 / max(count, 1)``, for shifts written as ``sum * reciprocal``.

    Every use of a shift must see the same rounded value. XLA may recompute a
    shift inside each consumer fusion, and it rewrites some divisions by
    constants into multiplications by a rounded reciprocal but not others, so
    ``sum / count`` could round differently in different places; a single
    multiplication has one IEEE result wherever it is evaluated.
    """
    if _static(count):
        return float(1 / np.maximum(count, 1))
    return 1 / jnp.maximum(count, 1)


def _local_sums(x, axes, mask, use_mean, use_fast_variance) -> _Sums:
    """Sums of ``x`` (already in the statistics dtype) over ``axes``, kept with size 1.

    Every sum of a group is formed in one pass (:func:`_sums_kept`); a mask is
    selected inside that pass, so nothing full-size is written. A mask that is
    constant along the reduced axes (a padding mask ``(B, T, 1)``) takes the
    unmasked path with a count per group.
    """
    real_dtype = jnp.zeros((), x.dtype).real.dtype
    size = math.prod(x.shape[a] for a in axes)
    has_data = None
    if mask is not None and _constant_along(mask, x.ndim, axes):
        has_data = jnp.broadcast_to(
            jnp.reshape(mask, (1,) * (x.ndim - jnp.ndim(mask)) + jnp.shape(mask)), _kept_shape(x.shape, axes)
        )
        mask = None
    if mask is None:
        count: Any = np.asarray(size, real_dtype)
        if has_data is not None:
            count = _select(has_data, jnp.asarray(size, real_dtype), 0)
        sums = _unmasked_sums(x, axes, count, use_mean, use_fast_variance)
        if has_data is None:
            return sums
        # groups that are padding: the sums of nothing (their values never reach them)
        return _Sums(
            count,
            None if sums.shift is None else _select(has_data, sums.shift, 0),
            None if sums.s1 is None else _select(has_data, sums.s1, 0),
            _select(has_data, sums.s2, 0),
            None if sums.scale is None else _select(has_data, sums.scale, 1),
        )
    mask = jnp.broadcast_to(mask, x.shape)
    zero = jnp.zeros((), x.dtype)
    if use_fast_variance:
        selected = jnp.where(mask, x, zero)
        values = [mask.astype(real_dtype)] + ([selected] if use_mean else []) + [abs_sq(selected)]
        count, *rest = _sums_kept(values, axes)
        return _Sums(count, None, rest[0] if use_mean else None, rest[-1])
    # A first pass: the count and the mean (the shift). Each term is divided by
    # the group's size first, so the sum cannot overflow (|sum| <= max |x|),
    # then rescaled to the valid count.
    count, part = _sums_kept([mask.astype(real_dtype), jnp.where(mask, x * (1.0 / max(size, 1)), zero)], axes)
    mean = jax.lax.stop_gradient(_frozen(part * (size * _reciprocal(count))))
    shift = mean if use_mean else None
    # the scale from the larger of |mean| and the first two valid elements (else 0)
    scale = _group_scale(jnp.where(mask, x, zero), axes, jnp.abs(mean))
    centered = (x if shift is None else x - shift) * scale
    centered = jnp.where(mask, centered, zero)
    values = ([centered] if use_mean else []) + [abs_sq(centered)]
    sums = _sums_kept(values, axes)
    return _Sums(count, shift, sums[0] if use_mean else None, sums[-1], scale)


def _constant_along(mask, ndim, axes) -> bool:
    """True when ``mask`` (broadcastable to rank ``ndim``) has size 1 along every reduced axis."""
    shape = (1,) * (ndim - jnp.ndim(mask)) + tuple(jnp.shape(mask))
    return all(shape[a] == 1 for a in axes)


def _unmasked_sums(x, axes, count, use_mean, use_fast_variance) -> _Sums:
    if use_fast_variance:
        values = ([x] if use_mean else []) + [abs_sq(x)]
        sums = _sums_kept(values, axes)
        return _Sums(count, None, sums[0] if use_mean else None, sums[-1])
    if _element_shift_possible(x, axes):
        shift, scale = _group_element(x, axes)
        shift = shift if use_mean else None
    else:
        # No element can be sliced: a first pass for the mean (see the masked path).
        size = math.prod(x.shape[a] for a in axes)
        (part,) = _sums_kept([x * (1.0 / max(size, 1))], axes)
        mean = jax.lax.stop_gradient(_frozen(part * (size * _reciprocal(count))))
        shift = mean if use_mean else None
        scale = _group_scale(x, axes, jnp.abs(mean))
    centered = (x if shift is None else x - shift) * scale
    values = ([centered] if use_mean else []) + [abs_sq(centered)]
    sums = _sums_kept(values, axes)
    return _Sums(count, shift, sums[0] if use_mean else None, sums[-1], scale)


def _magnitude_scale(magnitude):
    """``2^-e`` for ``magnitude`` in ``[2^(e-1), 2^e)``, at most 1 and at least the smallest normal float.

    Multiplying by a power of two is exact, so the sums of ``(x - shift) *
    scale`` carry the same digits as those of ``x - shift`` but stay far
    from overflow when ``|x|`` is near float32's largest value (whose square
    is not representable). The scale only ever shrinks values: small data
    keep the scale 1 (their squares may be subnormal, but then ``epsilon``
    dominates the variance anyway).
    """
    magnitude = jax.lax.stop_gradient(magnitude)
    info = jnp.finfo(magnitude.dtype)
    bias = info.maxexp - 1  # 127 for float32
    bits = jnp.dtype(f"uint{8 * magnitude.dtype.itemsize}")
    raw = jax.lax.bitcast_convert_type(magnitude, bits)
    biased = (raw >> np.array(info.nmant, bits)).astype(jnp.int32) & (2 * bias + 1)
    # magnitude in [2^(e-1), 2^e) with e = biased - bias + 1; 0 and subnormals give e <= -125
    exponent = jnp.clip(biased - (bias - 1), 0, bias - 1)  # 2^-(bias-1) is the smallest normal number
    return jax.lax.bitcast_convert_type((bias - exponent).astype(bits) << np.array(info.nmant, bits), magnitude.dtype)


def _element_shift_possible(x, axes) -> bool:
    """True when every group has an element and slicing one is allowed (static).

    Slicing an axis that is sharded along an explicit mesh axis is an error
    under JAX's explicit sharding; a sum over it is not.
    """
    if any(x.shape[a] == 0 for a in axes):
        return False
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec is None or not any(i < len(spec) and spec[i] is not None for i in axes)


def _frozen(value):
    """``value`` with the last bit of its significand cleared: rounded once, wherever XLA evaluates it.

    A shift ``s * r`` consumed as ``x - s * r`` may be contracted into a fused
    multiply-add in one fusion and not in another, which would shift the sums
    and the output by different numbers. A bit operation between the product
    and its consumers cannot be contracted or simplified away.
    """
    if jnp.iscomplexobj(value):
        return jax.lax.complex(_frozen(value.real), _frozen(value.imag))
    bits = jnp.dtype(f"uint{8 * value.dtype.itemsize}")
    raw = jax.lax.bitcast_convert_type(value, bits)
    return jax.lax.bitcast_convert_type(raw & ~np.array(1, bits), value.dtype)


def _merge(sums: _Sums, axis: int) -> _Sums:
    """Combine the sums of several groups along ``axis`` (kept with size 1), exactly.

    Shifted sums are re-expressed around a common shift (the count-weighted
    mean of the shifts, a value inside the data) before they are added: the
    pairwise update of Chan, Golub and LeVeque. Counts are added, so groups
    with more valid elements weigh more.
    """

    def total(values):
        return _sum_kept(values, (axis,))

    n = sums.count
    count = n * sums.s2.shape[axis] if _static(n) else total(n)
    s1, s2 = sums.s1, sums.s2
    scale = sums.scale
    if scale is not None:
        # bring every member to the smallest scale (a power-of-two ratio: exact)
        scale = jax.lax.stop_gradient(jnp.min(scale, axis=axis, keepdims=True))
        ratio = jax.lax.stop_gradient(scale / sums.scale)
        s1 = None if s1 is None else s1 * ratio
        s2 = s2 * jnp.square(ratio)
    if sums.shift is None:
        return _Sums(count, None, None if s1 is None else total(s1), total(s2), scale)
    # The common shift is the shift of the member with the most valid elements:
    # a stored value (no arithmetic XLA could round differently in different
    # fusions) that lies inside the data.
    if _static(n):
        shift = jax.lax.slice_in_dim(sums.shift, 0, 1, axis=axis)
    else:
        largest = jnp.argmax(jnp.broadcast_to(n, sums.shift.shape), axis=axis, keepdims=True)
        shift = jnp.take_along_axis(sums.shift, largest, axis=axis)
    shift = jax.lax.stop_gradient(shift)
    offset = jax.lax.stop_gradient(sums.shift - shift)
    if scale is not None:
        offset = offset * scale
    merged_s1 = total(s1 + n * offset)
    merged_s2 = total(s2 + 2 * jnp.real(jnp.conj(offset) * s1) + n * abs_sq(offset))
    return _Sums(count, shift, merged_s1, merged_s2, scale)


def _finalize(sums: _Sums) -> Moments:
    n: Any
    if _static(sums.count):
        n = float(np.maximum(sums.count, 1))
    else:
        n = jnp.maximum(sums.count.astype(jnp.real(sums.s2).dtype), 1)
    var = sums.s2 / n
    if sums.s1 is None:
        delta = None
    else:
        delta = sums.s1 / n
        # E[|x-k|^2] - |E[x-k]|^2 can round below zero.
        var = jnp.maximum(var - abs_sq(delta), 0)
    return Moments(shift=sums.shift, delta=delta, var=var, count=sums.count, scale=sums.scale)


def compute_moments(
    x: jax.Array,
    axes: Sequence[int],
    *,
    mask: Optional[jax.Array] = None,
    use_mean: bool = True,
    use_fast_variance: bool = False,
    axis_name=None,
    axis_index_groups=None,
    dtype=None,
    scaled: bool = False,
) -> Moments:
    """Moments of ``x`` over ``axes`` (non-negative, counted on ``x``).

    ``mask`` is a boolean array broadcastable to ``x`` (already validated).
    With ``scaled`` the moments keep the core's power-of-two ``scale``
    (:class:`Moments`); otherwise they are in the unit of ``x``.
    """
    x = x.astype(stats_dtype(x.dtype, dtype))
    sums = _local_sums(x, tuple(sorted(axes)), mask, use_mean, use_fast_variance)
    if axis_name is not None:
        sums = _combine_across_devices(sums, axis_name, axis_index_groups)
    moments = _finalize(sums)
    return moments if scaled else moments.unscaled()


def compute_group_moments(
    x: jax.Array,
    feature_axis: int,
    num_groups: int,
    axes: Sequence[int],
    *,
    mask: Optional[jax.Array] = None,
    use_fast_variance: bool = False,
    axis_name=None,
    axis_index_groups=None,
    dtype=None,
    scaled: bool = False,
) -> Moments:
    """Moments of channel groups, returned per channel (each channel carries its group's).

    The channels along ``feature_axis`` form ``num_groups`` consecutive groups;
    ``axes`` (non-negative, containing ``feature_axis``) are reduced. The
    input is reduced per channel first (a reduction that keeps the channel
    axis, which XLA's CPU backend runs far faster than one over a split
    ``(groups, group_size)`` axis), then the small per-channel sums are merged
    within each group.
    """
    x = x.astype(stats_dtype(x.dtype, dtype))
    per_channel_axes = tuple(sorted(a for a in axes if a != feature_axis))
    sums = _local_sums(x, per_channel_axes, mask, True, use_fast_variance)
    channels = x.shape[feature_axis]
    grouped_shape = x.shape[:feature_axis] + (num_groups, channels // num_groups) + x.shape[feature_axis + 1 :]

    def split(value):
        if value is None or _static(value):
            return value
        kept = _kept_shape(grouped_shape, [a if a < feature_axis else a + 1 for a in per_channel_axes])
        return jnp.reshape(jnp.broadcast_to(value, _kept_shape(x.shape, per_channel_axes)), kept)

    sums = _merge(_Sums(*(split(v) for v in sums)), feature_axis + 1)
    if axis_name is not None:
        sums = _combine_across_devices(sums, axis_name, axis_index_groups)
    moments = _finalize(sums)

    def per_channel(value):
        if value is None or _static(value):
            return value
        full = value.shape[: feature_axis + 1] + (channels // num_groups,) + value.shape[feature_axis + 2 :]
        return jnp.reshape(
            jnp.broadcast_to(value, full), value.shape[:feature_axis] + (channels,) + value.shape[feature_axis + 2 :]
        )

    moments = Moments(*(per_channel(v) for v in moments))
    return moments if scaled else moments.unscaled()


def _pair_axis(x, axes):
    """The reduced axis along which each group's first two elements are taken (None: groups of one)."""
    pairs = [a for a in axes if x.shape[a] >= 2]
    return pairs[-1] if pairs else None


def _first_elements(x, axes, along):
    index = tuple(slice(0, 2) if i == along else slice(0, 1) if i in axes else slice(None) for i in range(x.ndim))
    return x[index]


def _group_element(x, axes):
    """One of each group's own values and the group's power-of-two scale, reduced axes kept with size 1.

    The element is the larger of the group's first two elements along one
    reduced axis: a value of the group (no arithmetic, so every fusion sees
    the same number, and ``(shift - mean)^2 <= n var`` bounds the
    cancellation). The scale is :func:`_magnitude_scale` of the larger
    absolute value of the same two elements. Both come out of one reduction
    (:func:`_stored_pair`), so XLA stores them in buffers of their own and
    never recomputes them inside the fusions that consume them.
    """
    along = _pair_axis(x, axes)
    first = _first_elements(x, axes, along)
    if along is None:
        return jax.lax.stop_gradient(first), jax.lax.stop_gradient(_magnitude_scale(jnp.abs(first)))
    return _stored_pair(first, _magnitude_scale(jnp.abs(first)), along)


def _group_scale(selected, axes, magnitude):  # magnitude: |mean| of each group
    """The power-of-two scale of each group from its first two elements of ``selected`` and ``magnitude``.

    ``selected`` holds 0 at padding; ``magnitude`` (kept shape) is a further
    magnitude of the group: ``|mean|``.
    """
    if not _element_shift_possible(selected, axes):
        return jax.lax.stop_gradient(_magnitude_scale(magnitude))
    along = _pair_axis(selected, axes)
    first = jnp.maximum(jnp.abs(_first_elements(selected, axes, along)), magnitude)
    if along is None:
        return jax.lax.stop_gradient(_magnitude_scale(first))
    return _stored_pair(first, _magnitude_scale(first), along)[1]


def _stored_pair(first, scales, along):
    """``(max of first, min of scales)`` along ``along`` (kept) by one two-operand reduction.

    XLA's CPU backend computes a many-operand reduction in a fusion of its own
    and stores its results; the consumers read them (the scale's bit
    operations would otherwise be copied into every consumer fusion). Complex
    numbers have no order: their element is the first.
    """
    kept = _kept_shape(first.shape, (along,))
    # constants under differentiation (and JAX's JVP of a general reduce needs nonzero tangents)
    first, scales = jax.lax.stop_gradient(first), jax.lax.stop_gradient(scales)
    if jnp.iscomplexobj(first):
        element = jax.lax.slice_in_dim(first, 0, 1, axis=along)
        scale = jnp.min(scales, axis=along)
        return jax.lax.stop_gradient(element), jax.lax.stop_gradient(jnp.reshape(scale, kept))
    inits = (np.array(-np.inf, first.dtype), np.ones((), scales.dtype))
    element, scale = jax.lax.reduce(
        (first, scales), inits, lambda a, b: (jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])), (along,)
    )
    return jax.lax.stop_gradient(jnp.reshape(element, kept)), jax.lax.stop_gradient(jnp.reshape(scale, kept))


def _sum_kept(values, axes):
    """``sum(values, axes, keepdims=True)`` with a reshape instead of a broadcast.

    The reshape transposes to a reshape; a ``keepdims`` broadcast transposes
    to one more (trivial) reduction in every derivative program.
    """
    return jnp.reshape(jnp.sum(values, axis=tuple(axes)), _kept_shape(values.shape, axes))


def _kept_shape(shape, axes):
    return tuple(1 if i in axes else d for i, d in enumerate(shape))


# Several sums in one pass
# ---------------------------------------------------------------------------
# A reduction of one operand is handed by XLA's CPU backend to a fusion kind
# that grows downstream and, when two reductions share a producer such as
# ``(x - k) * s``, writes that producer out in full and reads it twice. One
# reduction with several operands (``lax.reduce``) forms every sum of a group
# from one read of its inputs; XLA's own loop emitter vectorizes it when the
# reduced axis is short and a contiguous block of kept elements ("lanes") lies
# inside it. So each stage reduces a short axis (``_LANE_STEP`` elements) with
# lanes kept, and the next stage (on data ``_LANE_STEP`` times smaller) goes on
# until little is left. The partial sums are also a pairwise summation: more
# accurate than one long running sum.
_LANES = 64
_LANE_STEP = 16


def _lane_layout_possible(x) -> bool:
    """False where a reshape of ``x`` may not be allowed: an axis sharded along an explicit mesh axis."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec is None or all(entry is None for entry in spec)


def _add_all(a, b):
    return tuple(p + q for p, q in zip(a, b, strict=True))


def _variadic_sum(values, axes):
    """``sum(v, axes)`` of every ``v`` in ``values`` by one ``lax.reduce`` (the axes dropped).

    A lone value is summed as its two halves along a reduced axis: XLA turns
    a one-operand sum into the fusion kind that grows downstream.
    """
    values = tuple(values)
    axes = tuple(axes)
    halved = [a for a in axes if values[0].shape[a] % 2 == 0]
    if len(values) == 1 and halved:
        a = halved[0]
        half = values[0].shape[a] // 2
        low = jax.lax.slice_in_dim(values[0], 0, half, axis=a)
        high = jax.lax.slice_in_dim(values[0], half, 2 * half, axis=a)
        first, second = _variadic_sum((low, high), axes)
        return (first + second,)
    return _reduce_sums(axes, *values)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _reduce_sums(axes, *values):
    """One many-operand ``lax.reduce`` computing ``sum(v, axes)`` for each ``v``.

    JAX has no transpose rule for a general ``reduce``: the tangents are sums
    of one operand each, so every transformation applies.
    """
    inits = tuple(np.zeros((), v.dtype) for v in values)
    return tuple(jax.lax.reduce(values, inits, _add_all, axes))


@_reduce_sums.defjvp
def _reduce_sums_jvp(axes, primals, tangents):
    return _reduce_sums(axes, *primals), tuple(jnp.sum(t, axis=axes) for t in tangents)


def _steps_fit(r) -> bool:
    return r % _LANE_STEP == 0 and r >= 2 * _LANE_STEP


def _lane_sums(values, axes):
    """Sums of same-shaped ``values`` over ``axes`` (dropped), by stages that each read their input once.

    Only the innermost axes are reshaped: a leading axis may be sharded (a
    batch axis under GSPMD), and merging it with others would make the
    partitioner move the data. The stages:

    * the innermost axes reduced (LayerNorm, RMSNorm): they are merged and
      split into blocks of 64 lanes (then 8), each stage summing the blocks;
    * the innermost axes kept (channels last): the reduced axis next to them
      (merged with the reduced axes before it while shorter than 32, the
      leading axis excepted) is split into steps of 16, which one stage sums
      with the kept elements as lanes.

    Whatever is left (the lanes, leading axes) is summed last, on data at
    least 16 times smaller: by one reduction when only lanes remain, else by
    one-operand sums, which GSPMD turns into partial sums and an all-reduce.
    """
    shape = list(values[0].shape)
    axes = sorted(axes)
    ndim = len(shape)
    trailing = ndim
    while trailing > 0 and (trailing - 1) in axes:
        trailing -= 1
    if trailing < ndim:
        # innermost reduced block of m elements: reshape it (it is never a batch axis)
        m = math.prod(shape[trailing:])
        lanes = _LANES if m >= 2 * _LANES else 8
        if m % lanes == 0 and m >= 2 * lanes:
            split = shape[:trailing] + [m // lanes, lanes]
            parts = _variadic_sum([jnp.reshape(v, split) for v in values], (trailing,))
            return _lane_sums(parts, [a for a in axes if a < trailing] + [trailing])
        if m <= _LANES and all(a >= trailing for a in axes):
            return _variadic_sum(values, axes)  # short rows: one reduction
    else:
        # channels last: split the reduced axis next to the kept ones, merged with the
        # reduced axes before it while it is too short (never with the leading axis)
        j = max(axes)
        start = j
        while not _steps_fit(math.prod(shape[start : j + 1])) and start - 1 >= 1 and start - 1 in axes:
            start -= 1
        r = math.prod(shape[start : j + 1])
        if _steps_fit(r):
            split = shape[:start] + [r // _LANE_STEP, _LANE_STEP] + shape[j + 1 :]
            parts = _variadic_sum([jnp.reshape(v, split) for v in values], (start + 1,))
            return _lane_sums(parts, [a for a in axes if a < start] + [start])
    return tuple(jnp.sum(v, axis=tuple(axes)) for v in values)


def _sums_kept(values, axes):
    """``sum(v, axes, keepdims=True)`` for each array of ``values`` (one shape), in one pass over them."""
    values = tuple(values)
    shape = values[0].shape
    axes = tuple(a for a in axes if shape[a] != 1)
    if not axes:
        return values
    kept = _kept_shape(shape, axes)
    if math.prod(shape) == 0 or not all(_lane_layout_possible(v) for v in values):
        return tuple(_sum_kept(v, axes) for v in values)
    return tuple(jnp.reshape(v, kept) for v in _lane_sums(values, axes))


# The gathered statistics are identical on every member of the axis; newer JAX
# can say so (``to='invarying'``, only inside shard_map), which lets
# ``shard_map`` return them with a replicated ``out_specs`` under its default
# replication checks.
_GATHER_HAS_TO = "to" in inspect.signature(jax.lax.all_gather).parameters


def _varies_along(value, name) -> bool:
    """True inside ``shard_map`` (with replication checks) for a value that varies along ``name``."""
    aval = jax.typeof(value)
    manual = getattr(aval, "manual_axis_type", None)
    varying = getattr(manual, "varying", None) if manual is not None else getattr(aval, "vma", None)
    return varying is not None and bool(varying) and name in varying


def _gather(value, name, axis_index_groups):
    if _GATHER_HAS_TO and axis_index_groups is None and _varies_along(value, name):
        return jax.lax.all_gather(value, name, to="invarying")
    return jax.lax.all_gather(value, name, axis_index_groups=axis_index_groups)


def _combine_across_devices(sums: _Sums, axis_name, axis_index_groups) -> _Sums:
    """Exact global sums over the named axis with a single collective.

    Unscaled sums (the fast variance) are added with one ``psum``; the others
    are gathered with one ``all_gather`` and merged like groups
    (:func:`_merge`), which brings them to a common shift and scale.
    """
    count = jnp.broadcast_to(jnp.asarray(sums.count), sums.s2.shape)  # summed across devices: traced from here
    s1, s2 = sums.s1, sums.s2
    if sums.scale is None:
        parts = [count.astype(s2.dtype)] + ([s1] if s1 is not None else []) + [s2]
        if any(jnp.iscomplexobj(p) for p in parts):
            parts = [p.astype(jnp.result_type(*parts)) for p in parts]
        stacked = jax.lax.psum(jnp.stack(parts), axis_name, axis_index_groups=axis_index_groups)
        count = stacked[0].real.astype(count.dtype)
        s2 = stacked[-1].real.astype(s2.dtype) if not jnp.iscomplexobj(s2) else stacked[-1]
        if s1 is not None:
            s1 = stacked[1].astype(s1.dtype)
        return _Sums(count, None, s1, s2)

    fields = [("count", count), ("shift", sums.shift), ("s1", s1), ("s2", s2), ("scale", sums.scale)]
    fields = [(name, value) for name, value in fields if value is not None]
    common = jnp.result_type(*(value for _, value in fields))
    local = jnp.stack([value.astype(common) for _, value in fields])
    gathered = local
    for name in _as_tuple_name(axis_name):
        gathered = _gather(gathered, name, axis_index_groups)
        gathered = gathered.reshape((-1,) + local.shape)
    real = {"count", "s2", "scale"}
    members = {name: gathered[:, i].real if name in real else gathered[:, i] for i, (name, _) in enumerate(fields)}
    merged = _merge(_Sums(**{"shift": None, "s1": None, **members}), axis=0)
    dtypes = dict(fields)
    return _Sums(
        **{
            name: None if getattr(merged, name) is None else getattr(merged, name)[0].astype(dtypes[name].dtype)
            for name in _Sums._fields
        }
    )


def inverse_std(moments: Moments, epsilon):
    """``rsqrt(var + eps)`` of the (scaled) moments, and 0 for groups with no valid element.

    With a scale the variance is that of the scaled values, so epsilon is
    scaled alike; where that product underflows (huge data, whose variance
    dwarfs epsilon) the sum is kept above the smallest normal number, so a
    constant group still gives 0 rather than 0 * inf.
    """
    if moments.scale is None:
        inv = jax.lax.rsqrt(moments.var + epsilon)
    else:
        tiny = jnp.finfo(moments.var.dtype).tiny
        inv = jax.lax.rsqrt(jnp.maximum(moments.var + epsilon * jnp.square(moments.scale), tiny))
    has_data = None if moments.count is None else _has_data(moments.count)
    return inv if has_data is None else _select(has_data, inv, 0)


def applied(moments: Moments, epsilon):
    """``(delta, inv)`` in the unit of ``x``, for ``y = ((x - shift) - delta) * inv``.

    With a power-of-two scale ``s`` the moments are those of ``(x - shift) *
    s``: ``delta / s`` and ``inv * s`` are exact, and
    ``((x - shift) - delta / s) * (inv * s)`` rounds exactly as the scaled
    form would, without a multiplication per element.
    """
    inv = inverse_std(moments, epsilon)
    delta = moments.delta
    if moments.scale is not None:
        inv = inv * moments.scale
        if delta is not None:
            delta = delta * (1 / moments.scale)
    return delta, inv


def apply_moments(x, moments: Moments, *, epsilon, scale=None, bias=None, out_dtype=None):
    """``((x - shift) - delta) * rsqrt(var + eps) * scale + bias`` in the stats dtype (see :func:`applied`)."""
    y = x.astype(apply_dtype(x, moments))
    if moments.shift is not None:
        y = y - moments.shift
    delta, factor = applied(moments, epsilon)
    if delta is not None:
        y = y - delta
    if scale is not None:
        factor = factor * scale
    y = y * factor
    if bias is not None:
        y = y + bias
    if out_dtype is not None:
        y = y.astype(out_dtype)
    return y


class Reduction(NamedTuple):
    """How a normalization groups ``x``: static and hashable (a custom-JVP parameter).

    ``axes`` are the reduced axes of ``x`` (non-negative); with ``groups =
    (feature_axis, num_groups)`` the channels along ``feature_axis`` (one of
    ``axes``) form consecutive groups whose statistics every member channel
    carries. ``axis_index_groups`` is a tuple of tuples.
    """

    axes: tuple
    groups: Optional[tuple] = None
    use_mean: bool = True
    use_fast_variance: bool = False
    axis_name: object = None
    axis_index_groups: Optional[tuple] = None

    def moments(self, x, mask) -> Moments:
        options = dict(
            mask=mask,
            use_fast_variance=self.use_fast_variance,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
        )
        if self.groups is None:
            return compute_moments(x, self.axes, use_mean=self.use_mean, scaled=True, **options)
        feature_axis, num_groups = self.groups
        return compute_group_moments(x, feature_axis, num_groups, self.axes, scaled=True, **options)

    def total(self, values):
        """Sums of ``values`` (full size, 0 at padding) over each group, shaped like the moments."""
        return self.totals([values])[0]

    def totals(self, values):
        """:meth:`total` of several arrays of one shape.

        These sums are linear in tangents inside the derivative rule, which
        reverse mode transposes: they are one-operand sums (JAX has no
        transpose rule for a many-operand reduction).
        """
        if self.groups is None:
            sums = tuple(_sum_kept(v, self.axes) for v in values)
        else:
            feature, num_groups = self.groups
            per_channel = tuple(_sum_kept(v, tuple(a for a in self.axes if a != feature)) for v in values)
            channels = per_channel[0].shape[feature]
            shape = per_channel[0].shape
            split = shape[:feature] + (num_groups, channels // num_groups) + shape[feature + 1 :]
            sums = tuple(
                jnp.reshape(jnp.broadcast_to(_sum_kept(jnp.reshape(v, split), (feature + 1,)), split), shape)
                for v in per_channel
            )
        if self.axis_name is not None:
            sums = tuple(jax.lax.psum(sums, self.axis_name, axis_index_groups=self.axis_index_groups))
        return tuple(sums)


class Renorm(NamedTuple):
    """Batch renormalization's correction (Ioffe, 2017): running statistics, limits and whether it applies.

    In training, with the batch statistics ``mu_B``, ``sigma_B = sqrt(var_B +
    eps)`` and ``sigma = sqrt(running_var + eps)``: ``r = clip(sigma_B /
    sigma, 1 / r_max, r_max)`` and ``d = clip((mu_B - running_mean) / sigma,
    -d_max, d_max)``, both constants under differentiation, and the output is
    ``((x - mu_B) / sigma_B * r + d) * scale + bias``. Where ``active`` is
    False (warm-up) and in groups without a valid element, ``r = 1`` and
    ``d = 0``. The running statistics broadcast to the moments' shape.
    """

    running_mean: jax.Array
    running_var: jax.Array
    r_max: float
    d_max: float
    active: object = True

    def corrected_affine(self, stats: Moments, epsilon, scale, bias, d_scale=None, d_bias=None):
        """``(scale * r, scale * d + bias)`` and their tangents (``r``, ``d`` constant)."""
        batch = stats.unscaled()
        dtype = batch.var.dtype
        mean = (
            jnp.reshape(self.running_mean, batch.var.shape)
            if jnp.size(self.running_mean) == batch.var.size
            else self.running_mean
        )
        var = (
            jnp.reshape(self.running_var, batch.var.shape)
            if jnp.size(self.running_var) == batch.var.size
            else self.running_var
        )
        inv_sigma = jax.lax.rsqrt(jnp.asarray(var, dtype) + epsilon)
        r = jnp.clip(jnp.sqrt(batch.var + epsilon) * inv_sigma, 1 / self.r_max, self.r_max)
        d = jnp.clip((batch.mean - jnp.asarray(mean, dtype)) * inv_sigma, -self.d_max, self.d_max)
        active = jnp.asarray(self.active, bool)
        if batch.count is not None and not (_static(batch.count) and np.all(np.asarray(batch.count) > 0)):
            active = active & (jnp.asarray(batch.count) > 0)
        r = jax.lax.stop_gradient(jnp.where(active, r, jnp.ones((), dtype)))
        d = jax.lax.stop_gradient(jnp.where(active, d, jnp.zeros((), dtype)))
        new_scale = r if scale is None else scale * r
        new_bias = d if scale is None else scale * d
        if bias is not None:
            new_bias = new_bias + bias
        if d_scale is None and d_bias is None:
            return new_scale, new_bias, None, None
        d_new_scale = jnp.zeros_like(new_scale) if scale is None else d_scale * r
        d_new_bias = jnp.zeros_like(new_bias) if scale is None else d_scale * d
        if bias is not None:
            d_new_bias = d_new_bias + d_bias
        return new_scale, new_bias, d_new_scale, d_new_bias


def normalize_over(
    x,
    reduction: Reduction,
    *,
    mask=None,
    scale=None,
    bias=None,
    epsilon,
    out_dtype=None,
    with_moments=True,
    renorm: Optional[Renorm] = None,
):
    """Normalize ``x`` with its own statistics: ``(y, moments)`` (``moments`` None unless ``with_moments``).

    ``y = ((x - shift) - delta) * rsqrt(var + eps) * scale + bias`` (without
    the mean for RMS statistics), differentiated by a custom JVP in plain JAX:
    the tangent of the normalized value is the textbook
    ``r (dx - mean(dx)) - (x - mean) r^3 mean((x - mean) dx)`` (means over the
    valid elements of each group, across devices with ``axis_name``), which is
    linear in the tangents, so reverse mode transposes it, and differentiable,
    so derivatives of every order follow. The moments' tangents are those of
    the mean and variance. The shift is a constant, as in the moments. With
    ``renorm`` the output is batch renormalization's (:class:`Renorm`).
    """
    if not _inexact(x):
        x = x.astype(stats_dtype(x.dtype))
    # integer or boolean parameters have no tangent space: make them floats
    scale = scale if scale is None or _inexact(scale) else jnp.asarray(scale, stats_dtype(x.dtype))
    bias = bias if bias is None or _inexact(bias) else jnp.asarray(bias, stats_dtype(x.dtype))
    if renorm is not None:
        renorm = renorm._replace(
            running_mean=jax.lax.stop_gradient(renorm.running_mean),
            running_var=jax.lax.stop_gradient(renorm.running_var),
            active=jnp.asarray(renorm.active, bool),
        )
    y, stats = _normalized(reduction, out_dtype or x.dtype, bool(with_moments), x, mask, scale, bias, epsilon, renorm)
    if stats is not None and mask is None:
        # unmasked counts are known at trace time: keep them static
        count = np.asarray(
            math.prod(x.shape[a] for a in reduction.axes if reduction.groups is None or a != reduction.groups[0]),
            stats.count.dtype,
        )
        if reduction.groups is not None:
            count = count * (x.shape[reduction.groups[0]] // reduction.groups[1])
        if reduction.axis_name is None:
            stats = stats._replace(count=count)
    return y, stats


def _inexact(value) -> bool:
    dtype = jnp.result_type(value)
    return jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating)


def _normalized_primal(reduction, out_dtype, x, mask, scale, bias, epsilon, renorm=None):
    stats = reduction.moments(x, mask)
    if renorm is not None:
        scale, bias, _, _ = renorm.corrected_affine(stats, epsilon, scale, bias)
    y = apply_moments(x, stats, epsilon=epsilon, scale=scale, bias=bias, out_dtype=out_dtype)
    return y, stats


def _as_output(stats: Moments) -> Moments:
    """The moments as outputs of a JAX function: in ``x``'s unit, the count as an array of the statistics' shape."""
    stats = stats.unscaled()
    count = jnp.broadcast_to(jnp.asarray(stats.count), stats.var.shape).astype(stats.var.dtype)
    return stats._replace(count=count)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _normalized(reduction, out_dtype, with_moments, x, mask, scale, bias, epsilon, renorm):
    y, stats = _normalized_primal(reduction, out_dtype, x, mask, scale, bias, epsilon, renorm)
    return y, (_as_output(stats) if with_moments else None)


@_normalized.defjvp
def _normalized_jvp(reduction, out_dtype, with_moments, primals, tangents):
    x, mask, scale, bias, epsilon, renorm = primals
    dx, _, d_scale, d_bias, _, _ = tangents
    stats = reduction.moments(x, mask)
    if renorm is not None:
        # r and d are constants: the correction is an affine map with new parameters
        d_scale = _instantiate(d_scale, scale)
        d_bias = _instantiate(d_bias, bias)
        scale, bias, d_scale, d_bias = renorm.corrected_affine(
            stats, epsilon, scale, bias, d_scale if d_scale is not None else 0.0, d_bias
        )
    y = apply_moments(x, stats, epsilon=epsilon, scale=scale, bias=bias, out_dtype=out_dtype)
    # The tangent is formed on the scaled values (x - shift) * s of the moments
    # (their tangent is dx * s): every per-group product then stays near 1, in
    # forward mode and in its transpose (in x's unit, 1 / std^2 of data beyond
    # 1e19 is below float32's smallest normal number).
    sdtype = apply_dtype(x, stats)
    delta = stats.delta
    inv = inverse_std(stats, epsilon)
    shifted = x.astype(sdtype)
    if stats.shift is not None:
        shifted = shifted - stats.shift
    if stats.scale is not None:
        shifted = shifted * stats.scale
    centered = shifted if delta is None else shifted - delta
    factor = inv if scale is None else inv * scale
    n = float(np.maximum(stats.count, 1)) if _static(stats.count) else jnp.maximum(stats.count, 1)

    if mask is None:

        def means(tangent, coefficient=None):
            """``mean(tangent)`` (with a mean) and ``mean(coefficient * tangent)``, in one pass."""
            values = ([] if delta is None else [tangent]) + [coefficient * tangent]
            return [v / n for v in reduction.totals(values)]

        def finite(values):
            return values
    else:
        # Padding may hold anything (nan, inf): the reductions select the
        # coefficient, never the product, so their transposes multiply the
        # cotangent by 0 rather than 0 by nan; and a non-finite padded value
        # is dropped from the output's dependence on the statistics (its
        # output is not finite anyway), so a zero cotangent there cannot
        # turn into 0 * nan in the statistics' cotangents.
        def means(tangent, coefficient=None):
            # tangents are selected (a select transposes to a select, never 0 * nan); the outer
            # select of the product is not redundant: jit(vmap(...)) of the bare product of a
            # selected coefficient and batched tangents compiled to wrong sums on XLA's CPU backend
            product = _select(mask, _select(mask, coefficient, 0) * tangent, 0)
            values = ([] if delta is None else [_select(mask, tangent, 0)]) + [product]
            return [v / n for v in reduction.totals(values)]

        def finite(values):
            return jnp.where(mask | jnp.isfinite(values), values, jnp.zeros((), values.dtype))

    dxs = jnp.asarray(dx).astype(sdtype)
    if stats.scale is not None:
        dxs = dxs * stats.scale
    per_group = jnp.shape(factor) == jnp.shape(inv)
    # One factor per group (BatchNorm, InstanceNorm): the products are formed
    # with x - shift, before centring; a factor per element (LayerNorm's scale
    # along the normalized axes): with the centred values.
    *d_mean_list, d_sq = means(dxs, jnp.conj(shifted if per_group else centered))
    d_mean = d_mean_list[0] if d_mean_list else None
    d_sq = jnp.real(d_sq)
    if per_group:
        # half the variance's tangent, before centring
        if d_mean is not None:
            d_sq = d_sq - jnp.real(jnp.conj(delta) * d_mean)
        slope = -(inv * inv * d_sq) * factor
        if scale is not None:
            slope = slope + inv * d_scale
        d_y = dxs * factor + finite(shifted) * slope
        if d_mean is not None:
            d_y = d_y - (delta * slope + d_mean * factor)
    else:
        if d_mean is not None:
            dxs = dxs - d_mean
        safe = finite(centered)
        d_y = (dxs - safe * (inv * inv * d_sq)) * factor
        if scale is not None:
            d_y = d_y + safe * inv * d_scale
    if bias is not None:
        d_y = d_y + d_bias
    if not with_moments:
        return (y, None), (d_y.astype(y.dtype), None)
    d_var = 2 * d_sq
    if stats.scale is not None:
        inverse = 1 / stats.scale  # as in Moments.unscaled
        d_var = d_var * inverse * inverse
        d_mean = None if d_mean is None else d_mean * inverse
    d_stats = Moments(
        shift=None if stats.shift is None else jnp.zeros_like(stats.shift),
        delta=None if stats.delta is None else d_mean.astype(stats.delta.dtype),
        var=d_var.astype(stats.var.dtype),
        count=None,
    )
    stats = _as_output(stats)
    return (y, stats), (d_y.astype(y.dtype), d_stats._replace(count=jnp.zeros_like(stats.count)))


def _instantiate(tangent, primal):
    """A symbolic-zero-free tangent for ``primal`` (None stays None)."""
    if primal is None:
        return None
    if tangent is None or type(tangent).__name__ == "SymbolicZero":
        return jnp.zeros_like(primal)
    return tangent


def apply_dtype(x, moments: Moments):
    """The dtype in which :func:`apply_moments` computes."""
    sdtype = moments.var.dtype if moments.delta is None else jnp.result_type(moments.var, moments.delta)
    if jnp.iscomplexobj(x):
        sdtype = jnp.result_type(sdtype, x.dtype)
    return sdtype


def output_dtype(x_dtype, dtype=None):
    """``dtype`` if given, else the input's inexact dtype, else the default float."""
    if dtype is not None:
        return jnp.dtype(dtype)
    if jnp.issubdtype(x_dtype, jnp.floating) or jnp.issubdtype(x_dtype, jnp.complexfloating):
        return jnp.dtype(x_dtype)
    import brainstate

    return jnp.dtype(brainstate.environ.dftype())


def default_epsilon(x_dtype):
    """PyTorch's ``eps=None``: machine epsilon of float32, or float64 for double input."""
    if jnp.dtype(x_dtype) in (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128)):
        return float(jnp.finfo(jnp.float64).eps)
    return float(jnp.finfo(jnp.float32).eps)


def given_moments(mean, var, dtype) -> Moments:
    """Moments from given (running) statistics, in the statistics dtype ``dtype``."""
    real = jnp.zeros((), dtype).real.dtype
    return Moments(shift=None, delta=jnp.asarray(mean).astype(dtype), var=jnp.asarray(var).astype(real), count=None)


def unbiased(var, count):
    """``var * n / (n - 1)`` (Bessel's correction); ``n <= 1`` keeps ``var``."""
    n = jnp.asarray(count, var.dtype)
    return var * n / jnp.maximum(n - 1, 1)


def running_update(old_mean, old_var, batch_mean, batch_var, count, momentum, *, unbiased_var=False):
    """``momentum * old + (1 - momentum) * batch``; groups with no valid element keep ``old``.

    ``count`` is the number of valid elements (or instances) behind each batch
    statistic; with ``unbiased_var`` the batch variance is first scaled by
    ``n / (n - 1)``. Every argument broadcasts to the shape of ``old_mean``;
    the results are in the dtypes of ``old_mean`` and ``old_var``.
    """
    if unbiased_var:
        batch_var = unbiased(batch_var, count)
    shape = old_mean.shape
    batch_mean = jnp.reshape(batch_mean, shape) if batch_mean.size == old_mean.size else batch_mean
    batch_var = jnp.reshape(batch_var, shape) if batch_var.size == old_var.size else batch_var
    if np.ndim(momentum) == 0 and not isinstance(momentum, jax.Array):
        momentum = float(momentum)  # folded at trace time
    else:
        momentum = jnp.asarray(momentum, old_mean.dtype)
    new_mean = momentum * old_mean + (1 - momentum) * batch_mean.astype(old_mean.dtype)
    new_var = momentum * old_var + (1 - momentum) * batch_var.astype(old_var.dtype)
    has_data = _has_data(count)
    if has_data is None:
        return new_mean, new_var
    has_data = jnp.reshape(has_data, shape) if has_data.size == old_mean.size else has_data
    return _select(has_data, new_mean, old_mean), _select(has_data, new_var, old_var)


def instance_running_statistics(
    moments: Moments, batch_axes, *, unbiased_var=False, axis_name=None, axis_index_groups=None
):
    """Batch average of per-instance statistics (PyTorch's InstanceNorm tracking).

    Returns ``(mean, var, instances)`` reduced over ``batch_axes`` (kept with
    size 1): the averages over the instances that have at least one valid
    element, and their number (across devices with ``axis_name``). With
    ``unbiased_var`` each instance's variance is corrected by its own count.
    """
    count = jnp.broadcast_to(moments.count, moments.var.shape).astype(moments.var.dtype)
    var = unbiased(moments.var, count) if unbiased_var else moments.var
    has_data = (count > 0).astype(var.dtype)
    mean = jnp.broadcast_to(moments.mean, var.shape)
    instances = jnp.sum(has_data, axis=batch_axes, keepdims=True)
    if axis_name is None:
        # weights that sum to 1: no sum of variances near float32's largest value can overflow
        weight = has_data / jnp.maximum(instances, 1)
        return (
            jnp.sum(weight * mean, axis=batch_axes, keepdims=True),
            jnp.sum(weight * var, axis=batch_axes, keepdims=True),
            instances,
        )
    sums = jnp.stack(
        [
            instances,
            jnp.sum(has_data * mean, axis=batch_axes, keepdims=True),
            jnp.sum(has_data * var, axis=batch_axes, keepdims=True),
        ]
    )
    instances, mean_sum, var_sum = jax.lax.psum(sums, axis_name, axis_index_groups=axis_index_groups)
    safe = jnp.maximum(instances, 1)
    return mean_sum / safe, var_sum / safe, instances


def standardize_weight(w, axes, eps, gain=None):
    """Weight standardization: ``(w - E[w]) / sqrt(max(Var[w] * n, eps)) * gain`` over ``axes``.

    Formed on the core's scaled moments (those of ``(w - shift) * s``, ``s`` a
    power of two): ``Var[w] * n`` would overflow for weights near 1e19, and
    epsilon is scaled alike (kept above the smallest normal number, so a
    constant group still gives 0).
    """
    stats = compute_moments(w, axes, scaled=True)
    fan_in = math.prod(w.shape[a] for a in axes)
    s = stats.scale
    tiny = jnp.finfo(stats.var.dtype).tiny
    factor = jax.lax.rsqrt(jnp.maximum(stats.var * fan_in, jnp.maximum(eps * jnp.square(s), tiny))) * s
    if gain is not None:
        factor = factor * gain
    return ((w.astype(stats.var.dtype) - stats.shift) - stats.delta * (1 / s)) * factor


def local_response(x, size, alpha, beta, k, feature_axis, *, mask=None):
    """``x * (k + alpha / size * window_sum(x^2))^(-beta)`` along ``feature_axis``, in the stats dtype.

    The window covers ``size`` channels, zero-padded ``size // 2`` before and
    ``(size - 1) // 2`` after (PyTorch); masked-out positions count as 0.
    """
    sdtype = stats_dtype(x.dtype)
    xs = x.astype(sdtype)
    # select before squaring, so that padding (even nan) has a zero derivative
    squares = jnp.square(xs if mask is None else jnp.where(mask, xs, jnp.zeros((), sdtype)))
    window = [1] * x.ndim
    window[feature_axis] = size
    padding = [(0, 0)] * x.ndim
    padding[feature_axis] = (size // 2, (size - 1) // 2)
    # A concrete (NumPy) init value keeps reduce_window on its differentiable
    # sum path; a traced one would fall back to the generic op, which has no VJP.
    window_sum = jax.lax.reduce_window(squares, np.zeros((), sdtype), jax.lax.add, window, (1,) * x.ndim, padding)
    factor = jnp.power(k + (alpha / size) * window_sum, -beta)
    if mask is None:
        return xs * factor
    # A non-finite padded value still gives its output (x * factor), but its
    # output does not depend on the window sums in the derivative, so a zero
    # cotangent there cannot become 0 * nan in its neighbours' gradients.
    finite = jnp.where(mask | jnp.isfinite(xs), xs, jnp.zeros((), sdtype))
    return finite * factor + (xs - finite) * jax.lax.stop_gradient(factor)


def l2_norm(v, axes, floor=0.0):
    """``sqrt(max(sum(|v|^2), floor))`` over ``axes`` (kept with size 1).

    The floor sits inside the square root: sqrt has an infinite slope at 0, so
    clamping outside would still give a NaN gradient for a zero column.
    """
    squares = jnp.sum(abs_sq(v), axis=tuple(axes), keepdims=True)
    return jnp.sqrt(jnp.maximum(squares, floor))


def lp_normalized(x, p, axes, epsilon, mask=None):
    """``x / max(||x||_p, epsilon)`` over ``axes``; masked positions left out of the norm and set to 0.

    The quotient is formed as ``(x s) / max(||x s||_p, epsilon s)``, with
    ``s`` a power of two (exact, a constant under differentiation) that brings
    the largest magnitude into ``[1/2, 1]``: below 1 for large values, so that
    ``|x|^p`` cannot overflow, and above 1 for small ones, so that it is not
    flushed to 0 (XLA's CPU backend flushes subnormals); ``epsilon`` is still
    compared with the norm in the unit of ``x``. The denominator is then near
    1, so the derivative of the quotient (through its inverse square) stays
    in range too. Where the norm is 0 its derivative is taken as 0 (PyTorch's
    subgradient), and ``|x|^p`` is differentiated safely at 0 for any ``p``.
    """
    sdtype = stats_dtype(x.dtype)
    xs = x.astype(sdtype)
    valid = xs if mask is None else jnp.where(mask, xs, jnp.zeros((), sdtype))
    magnitude = jnp.abs(valid)
    largest = jnp.max(magnitude, axis=tuple(axes), keepdims=True)
    frozen = jax.lax.stop_gradient(largest)
    # _magnitude_scale only shrinks (magnitudes of 1 and above); below 1 the factor is the
    # reciprocal of its factor for 1 / largest, halved (1 / 0 = inf gives 2^125 in float32)
    scale = jax.lax.stop_gradient(jnp.where(frozen < 1, 0.5 / _magnitude_scale(1 / frozen), _magnitude_scale(frozen)))
    if p == math.inf:
        norm = largest * scale
    else:
        scaled = magnitude * scale
        if p == 2:
            powered = jnp.square(scaled)
        elif p == 1:
            powered = scaled
        else:
            positive = scaled > 0
            powered = jnp.where(positive, jnp.where(positive, scaled, 1) ** p, 0)
        total = jnp.sum(powered, axis=tuple(axes), keepdims=True)
        positive = total > 0
        norm = jnp.where(positive, jnp.where(positive, total, 1) ** (1 / p), 0)
    # the selected copy holds 0 at masked positions: they return 0, and padding (even nan) never enters
    return (valid * scale) / jnp.maximum(norm, jnp.asarray(epsilon, norm.dtype) * scale)
