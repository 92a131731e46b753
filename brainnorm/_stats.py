"""The statistics core: one place computes moments, one place applies them.

Every layer and function of brainnorm reduces to two calls:

``compute_moments(x, axes, ...)``
    returns :class:`Moments` ``(shift, delta, var, count)`` with the reduced
    axes kept at size 1. The mean is ``shift + delta``.

``apply_moments(x, moments, ...)``
    computes ``((x - shift) - delta) * rsqrt(var + eps) * scale + bias``.

Why a shift. The one-pass variance ``E[x^2] - E[x]^2`` loses every digit when
``|mean| >> std`` (float32 data ``1e4 + N(0, 1)`` gives variances off by
thousands), and even the two-pass ``E[(x - mean)^2]`` pays for the rounding of
the float32 mean when ``x - mean`` is formed and used as the centred value.
Here each group is shifted by a value ``k`` inside the data: one of its own
elements (unmasked data; the first elements may be padding, so masked data use
the float32 masked mean from a first pass). ``x - k`` is then exact for values
near ``k`` (Sterbenz), the sums of ``x - k`` and ``|x - k|^2`` lose almost
nothing, and normalizing in the shifted domain ``((x - k) - delta)`` with
``delta = E[x - k]`` keeps that precision in the output: about 1e-6 from a
float64 reference at an offset of 1e4. Because ``k`` belongs to the group,
``(k - mean)^2 <= n var`` bounds the cancellation.

The shift must be the same number everywhere it is used. XLA may evaluate a
value in several fusions and contract arithmetic differently in each (fused
multiply-add), so shifts are stored data values wherever possible: the
element itself (the larger of the group's first two, taken by a reduction so
that XLA keeps it in a buffer of its own instead of re-slicing it inside every
consumer, which its CPU backend runs several times slower), and when groups
or devices are merged, the shift of the member with the most valid elements.

Large inputs on the CPU backend. There, reductions of ``x - k`` cost a full
extra pass over memory (XLA writes the shifted array out first), and most data
are centred enough for the one-pass sums: ``_guarded_sums`` first computes
the sums of ``x`` and ``|x|^2`` and keeps them when every group satisfies
``|mean| <= 2 std`` (then ``E[x^2] - E[x]^2`` loses at most a factor 5 of
the sums' precision; relative variance error about 1e-6 in float32). Any other
group, or a non-finite sum, sends the whole call through the shifted sums (one
``lax.cond``; under ``vmap`` it becomes a select and both are computed). The
one-pass branch returns a shift of 0, so everything downstream is the same.
The guard is not used for inputs under :data:`GUARD_MIN_ELEMENTS` elements,
whose time is dominated by kernel launches (the guard's reduction, branch and
output copies: a LayerNorm inside a simulation loop ran 15 % slower with it),
nor on other backends, where a data-dependent branch waits for the device
and XLA fuses the shifted reductions into one read of ``x``.

On XLA's CPU backend, large float32 inputs of the layers skip this module's
sums for a fused kernel with the same semantics (``brainnorm/_cpu``, called
from ``functional._normalize_over``).

* ``k`` is held constant under differentiation (``stop_gradient``): the
  moments are exact functions of ``x`` for any fixed ``k``, so gradients are
  exact and the backward pass does not differentiate through the shift.
* Masks: one ``where`` makes a copy with padding set to 0 (so non-finite
  padding never enters arithmetic) and the mask becomes a float weight; the
  reductions then see only float arithmetic, which XLA's CPU backend fuses
  (boolean selects inside reductions are an order of magnitude slower there).

Distributed statistics (``axis_name``): each device shifts by its own ``k_i``;
one ``all_gather`` brings every device's ``(n_i, s1_i, s2_i, k_i)``, which are
re-expressed around a common shift and summed (Chan et al.'s pairwise update);
channel groups (GroupNorm) are merged from per-channel sums the same way.
Counts are summed, never per-device means averaged, so masked statistics are
exact when devices hold different numbers of valid elements.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

__all__: list[str] = []


class Moments(NamedTuple):
    """Statistics of the reduced groups, reduced axes kept with size 1.

    ``shift`` is None when the statistics are not shifted (fast variance, RMS,
    or externally given mean/var); ``delta`` is None when there is no mean
    (RMS normalization). ``count`` is None when every group is known to have
    at least one element (no mask).
    """

    shift: Optional[jax.Array]
    delta: Optional[jax.Array]
    var: jax.Array
    count: Optional[jax.Array]

    @property
    def mean(self) -> jax.Array:
        if self.delta is None:
            return jnp.zeros_like(self.var)
        if self.shift is None:
            return self.delta
        return self.shift + self.delta


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

    count: jax.Array
    shift: Optional[jax.Array]
    s1: Optional[jax.Array]
    s2: jax.Array


def _reciprocal(count):
    """``1 / max(count, 1)``, for shifts written as ``sum * reciprocal``.

    Every use of a shift must see the same rounded value. XLA may recompute a
    shift inside each consumer fusion, and it rewrites some divisions by
    constants into multiplications by a rounded reciprocal but not others, so
    ``sum / count`` could round differently in different places; a single
    multiplication has one IEEE result wherever it is evaluated.
    """
    return 1 / jnp.maximum(count, 1)


def _local_sums(x, axes, mask, use_mean, use_fast_variance) -> _Sums:
    """Sums of ``x`` (already in the statistics dtype) over ``axes``, kept with size 1."""
    real_dtype = jnp.zeros((), x.dtype).real.dtype
    if mask is None:
        count = jnp.asarray(math.prod(x.shape[a] for a in axes), real_dtype)
        count = jnp.broadcast_to(count, _kept_shape(x.shape, axes))
        valid_x = x
        weight = None
    else:
        # One select makes a copy in which padding is 0, so even inf/nan padding
        # never enters arithmetic; everything after it is float arithmetic,
        # which XLA's CPU reductions fuse (a boolean select inside a reduction
        # runs an order of magnitude slower there).
        mask = jnp.broadcast_to(mask, x.shape)
        weight = mask.astype(real_dtype)
        count = jnp.sum(weight, axis=axes, keepdims=True)
        valid_x = jnp.where(mask, x, jnp.zeros((), x.dtype))

    def total(values):
        return jnp.sum(values, axis=axes, keepdims=True)

    if not use_mean:
        return _Sums(count, None, None, total(abs_sq(valid_x)))
    if use_fast_variance:
        return _Sums(count, None, total(valid_x), total(abs_sq(valid_x)))
    shift, s1, s2 = _robust_sums(valid_x, weight, count, axes)
    return _Sums(count, shift, s1, s2)


#: Inputs with at least this many elements try the one-pass sums first on the
#: CPU backend (:func:`_guarded_sums`); smaller ones, and every input on other
#: backends, take the shifted sums directly (:func:`_shifted_sums`).
GUARD_MIN_ELEMENTS = 1 << 16


def _robust_sums(valid_x, weight, count, axes):
    """``(shift, sum(x - shift), sum(|x - shift|^2))`` over ``axes`` (kept), valid elements only.

    ``weight`` is None or the float mask (``valid_x`` is 0 at padding);
    ``count`` the valid count per group.
    """
    shifted = functools.partial(_shifted_sums, valid_x, weight, count, axes)
    if valid_x.size < GUARD_MIN_ELEMENTS:
        return shifted()
    guarded = functools.partial(_guarded_sums, valid_x, weight, count, axes)
    return jax.lax.platform_dependent(cpu=guarded, default=shifted)


def _shifted_sums(valid_x, weight, count, axes, s1=None):
    """Sums around a shift inside each group, in one pass over ``x`` (two when masked).

    ``s1`` is the masked sum of ``x`` when the caller has it. The shift is a
    constant under differentiation: the sums are exact functions of ``x`` for
    any fixed shift.
    """

    def total(values):
        return jnp.sum(values, axis=axes, keepdims=True)

    if weight is None:
        shift = _group_element(valid_x, axes)
    else:
        # The first elements may be padding: shift by the masked mean instead,
        # written as one multiplication so that every fusion rounds it alike.
        shift = (total(valid_x) if s1 is None else s1) * _reciprocal(count)
    shift = jax.lax.stop_gradient(shift)
    centered = _centered(valid_x, weight, shift)
    return shift, total(centered), total(abs_sq(centered))


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _guarded_sums(valid_x, weight, count, axes):
    """:func:`_shifted_sums`, computed from the one-pass sums when they are accurate.

    XLA's CPU backend reduces ``x`` itself several times faster than a shifted
    ``x``, which it first writes out in full. When every group's ``|mean|`` is
    within 2 standard deviations, the one-pass variance is as accurate as the
    shifted one (relative error ~1e-6 in float32), so the sums of ``x`` and
    ``|x|^2`` are used with a shift of 0; otherwise one ``lax.cond`` computes
    the shifted sums. The cond's fixed cost (a guard reduction, the branch,
    copies of its outputs) is what makes small inputs skip this.
    """

    def total(values):
        return jnp.sum(values, axis=axes, keepdims=True)

    s1, s2 = total(valid_x), total(abs_sq(valid_x))

    def one_pass_sums():
        return jnp.zeros_like(s1), s1, s2

    def shifted_sums():
        return _shifted_sums(valid_x, weight, count, axes, s1=s1)

    return jax.lax.cond(_one_pass_is_accurate(count, s1, s2), one_pass_sums, shifted_sums)


def _centered(valid_x, weight, shift):
    centered = valid_x - shift
    return centered if weight is None else centered * weight


@_guarded_sums.defjvp
def _guarded_sums_jvp(axes, primals, tangents):
    # Both branches compute the same moments and the shift is a constant, so
    # the derivative is that of the shifted sums for whichever shift was
    # used: sum(dx) and sum(2 Re(conj(x - shift) dx)). Written here, outside
    # the cond, so reverse mode differentiates plain sums instead of carrying
    # residuals of both branches through the cond.
    valid_x, weight, count = primals
    d_x = tangents[0]
    shift, s1, s2 = _guarded_sums(valid_x, weight, count, axes)
    centered = _centered(valid_x, weight, shift)
    d_s1 = jnp.sum(d_x, axis=axes, keepdims=True)
    d_s2 = jnp.sum(2 * jnp.real(jnp.conj(centered) * d_x), axis=axes, keepdims=True)
    return (shift, s1, s2), (jnp.zeros_like(shift), d_s1, d_s2.astype(s2.dtype))


# |mean| <= 2 std, written as var >= mean^2 / 4: the one-pass variance
# E[x^2] - E[x]^2 then loses at most a factor 1 + 4 = 5 of the precision of the
# sums (measured: relative error <= 1.2e-6 for float32 groups of 1e3 to 3e4
# elements).
_ONE_PASS_RATIO = 0.25


def _one_pass_is_accurate(count, s1, s2):
    """True when the unshifted sums give every group's variance accurately (a traced scalar)."""
    n = jnp.maximum(count.astype(jnp.real(s2).dtype), 1)
    mean_sq = abs_sq(s1 / n)
    var = s2 / n - mean_sq
    # One float max-reduction (cheaper on the CPU backend than reducing a
    # boolean array); a non-finite sum scores inf and nan propagates, so both
    # select the shifted sums.
    score = jnp.where(jnp.isfinite(s2), _ONE_PASS_RATIO * mean_sq - var, jnp.inf)
    return jnp.max(score, initial=-jnp.inf) <= 0  # no groups: nothing to guard


def _merge(sums: _Sums, axis: int) -> _Sums:
    """Combine the sums of several groups along ``axis`` (kept with size 1), exactly.

    Shifted sums are re-expressed around a common shift (the count-weighted
    mean of the shifts, a value inside the data) before they are added: the
    pairwise update of Chan, Golub and LeVeque. Counts are added, so groups
    with more valid elements weigh more.
    """

    def total(values):
        return jnp.sum(values, axis=axis, keepdims=True)

    count = total(sums.count)
    if sums.shift is None:
        return _Sums(count, None, None if sums.s1 is None else total(sums.s1), total(sums.s2))
    n = sums.count
    # The common shift is the shift of the member with the most valid elements:
    # a stored value (no arithmetic XLA could round differently in different
    # fusions) that lies inside the data.
    largest = jnp.argmax(jnp.broadcast_to(n, sums.shift.shape), axis=axis, keepdims=True)
    shift = jax.lax.stop_gradient(jnp.take_along_axis(sums.shift, largest, axis=axis))
    offset = jax.lax.stop_gradient(sums.shift - shift)
    s1 = total(sums.s1 + n * offset)
    s2 = total(sums.s2 + 2 * jnp.real(jnp.conj(offset) * sums.s1) + n * abs_sq(offset))
    return _Sums(count, shift, s1, s2)


def _finalize(sums: _Sums, masked: bool) -> Moments:
    n = jnp.maximum(sums.count.astype(jnp.real(sums.s2).dtype), 1)
    var = sums.s2 / n
    if sums.s1 is None:
        delta = None
    else:
        delta = sums.s1 / n
        # E[|x-k|^2] - |E[x-k]|^2 can round below zero.
        var = jnp.maximum(var - abs_sq(delta), 0)
    return Moments(shift=sums.shift, delta=delta, var=var, count=sums.count if masked else None)


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
) -> Moments:
    """Moments of ``x`` over ``axes`` (non-negative, counted on ``x``).

    ``mask`` is a boolean array broadcastable to ``x`` (already validated).
    """
    x = x.astype(stats_dtype(x.dtype, dtype))
    sums = _local_sums(x, tuple(sorted(axes)), mask, use_mean, use_fast_variance)
    if axis_name is not None:
        sums = _combine_across_devices(sums, axis_name, axis_index_groups)
    return _finalize(sums, mask is not None)


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
    grouped_shape = x.shape[:feature_axis] + (num_groups, channels // num_groups) + x.shape[feature_axis + 1:]

    def split(value):
        if value is None:
            return None
        kept = _kept_shape(grouped_shape, [a if a < feature_axis else a + 1 for a in per_channel_axes])
        return jnp.reshape(jnp.broadcast_to(value, _kept_shape(x.shape, per_channel_axes)), kept)

    sums = _merge(_Sums(*(split(v) for v in sums)), feature_axis + 1)
    if axis_name is not None:
        sums = _combine_across_devices(sums, axis_name, axis_index_groups)
    moments = _finalize(sums, mask is not None)

    def per_channel(value):
        if value is None:
            return None
        full = value.shape[:feature_axis + 1] + (channels // num_groups,) + value.shape[feature_axis + 2:]
        return jnp.reshape(jnp.broadcast_to(value, full), value.shape[:feature_axis] + (channels,) + value.shape[feature_axis + 2:])

    return Moments(*(per_channel(v) for v in moments))


def _group_element(x, axes):
    """One of each group's own values, reduced axes kept with size 1.

    The larger of the group's first two elements along one reduced axis: a
    value of the group (no arithmetic, so every fusion sees the same number,
    and ``(shift - mean)^2 <= n var`` bounds the cancellation), computed by a
    reduction so that XLA stores it in a buffer of its own. A plain slice
    would be re-read inside every consumer fusion, which XLA's CPU backend
    runs several times slower than broadcasting a stored value.
    """
    pairs = [a for a in axes if x.shape[a] >= 2]
    along = pairs[-1] if pairs else None
    index = tuple(
        slice(0, 2) if i == along else slice(0, 1) if i in axes else slice(None) for i in range(x.ndim)
    )
    first = x[index]
    if along is None:
        return first  # groups of one element
    if jnp.iscomplexobj(first):
        # complex numbers have no order: the first element
        return jax.lax.slice_in_dim(first, 0, 1, axis=along)
    return jnp.max(first, axis=along, keepdims=True)


def _kept_shape(shape, axes):
    return tuple(1 if i in axes else d for i, d in enumerate(shape))


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
    return bool(varying) and name in varying


def _gather(value, name, axis_index_groups):
    if _GATHER_HAS_TO and axis_index_groups is None and _varies_along(value, name):
        return jax.lax.all_gather(value, name, to="invarying")
    return jax.lax.all_gather(value, name, axis_index_groups=axis_index_groups)


def _combine_across_devices(sums: _Sums, axis_name, axis_index_groups) -> _Sums:
    """Exact global sums over the named axis with a single collective.

    Unshifted sums are added with one ``psum``; shifted ones are gathered with
    one ``all_gather`` and merged like groups (:func:`_merge`).
    """
    count, shift, s1, s2 = sums
    if shift is None:
        parts = [count.astype(s2.dtype)] + ([s1] if s1 is not None else []) + [s2]
        if any(jnp.iscomplexobj(p) for p in parts):
            parts = [p.astype(jnp.result_type(*parts)) for p in parts]
        stacked = jax.lax.psum(jnp.stack(parts), axis_name, axis_index_groups=axis_index_groups)
        count = stacked[0].real.astype(count.dtype)
        s2 = stacked[-1].real.astype(s2.dtype) if not jnp.iscomplexobj(s2) else stacked[-1]
        if s1 is not None:
            s1 = stacked[1].astype(s1.dtype)
        return _Sums(count, shift, s1, s2)

    common = jnp.result_type(s1, shift)
    parts = jnp.stack([count.astype(common), shift.astype(common), s1.astype(common), s2.astype(common)])
    gathered = parts
    for name in _as_tuple_name(axis_name):
        gathered = _gather(gathered, name, axis_index_groups)
        gathered = gathered.reshape((-1,) + parts.shape)
    merged = _merge(
        _Sums(gathered[:, 0].real, gathered[:, 1], gathered[:, 2], gathered[:, 3].real), axis=0
    )
    return _Sums(
        merged.count[0].astype(count.dtype), merged.shift[0].astype(shift.dtype),
        merged.s1[0].astype(s1.dtype), merged.s2[0].astype(s2.dtype),
    )


def inverse_std(moments: Moments, epsilon):
    """``rsqrt(var + eps)``, and 0 for groups with no valid element."""
    inv = jax.lax.rsqrt(moments.var + epsilon)
    if moments.count is not None:
        inv = jnp.where(moments.count > 0, inv, jnp.zeros((), inv.dtype))
    return inv


def apply_moments(x, moments: Moments, *, epsilon, scale=None, bias=None, out_dtype=None):
    """``((x - shift) - delta) * rsqrt(var + eps) * scale + bias`` in the stats dtype."""
    sdtype = moments.var.dtype if moments.delta is None else jnp.result_type(moments.var, moments.delta)
    if jnp.iscomplexobj(x):
        sdtype = jnp.result_type(sdtype, x.dtype)
    y = x.astype(sdtype)
    if moments.shift is not None:
        y = y - moments.shift
    if moments.delta is not None:
        y = y - moments.delta
    factor = inverse_std(moments, epsilon)
    if scale is not None:
        factor = factor * scale
    y = y * factor
    if bias is not None:
        y = y + bias
    if out_dtype is not None:
        y = y.astype(out_dtype)
    return y


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
