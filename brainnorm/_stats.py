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
the float32 mean when ``x - mean`` is formed. Subtracting a value ``k`` that
lies inside the data first makes ``x - k`` exact (Sterbenz) and small, so the
sums of ``x - k`` and ``|x - k|^2`` lose almost nothing; normalizing in the
shifted domain ``((x - k) - (mean - k))`` keeps that precision in the output.

* Unmasked data: ``k`` is one of the group's own values (its first element).
  Because ``k`` belongs to the group, ``(k - mean)^2 <= n * var``, which bounds
  the cancellation in ``E[(x-k)^2] - (E[x-k])^2`` by a factor ``n``; the two
  sums come from a single pass over ``x``, as cheap as the one-pass formula.
* Masked data: the first element may be padding, so ``k`` is the float32
  masked mean from a first pass; the second pass sums the shifted values.
* ``k`` is held constant under differentiation (``stop_gradient``): the
  moments are exact functions of ``x`` for any fixed ``k``, so gradients are
  exact and the backward pass does not differentiate through the shift.

Distributed statistics (``axis_name``): each device shifts by its own ``k_i``;
one ``all_gather`` brings every device's ``(n_i, s1_i, s2_i, k_i)``, which are
re-expressed around a common shift and summed (Chan et al.'s pairwise update).
Counts are summed, never per-device means averaged, so masked statistics are
exact when devices hold different numbers of valid elements.
"""

from __future__ import annotations

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


def _first_element(x, axes):
    """The element at index 0 of every reduced axis, reduced axes kept."""
    index = tuple(slice(0, 1) if i in axes else slice(None) for i in range(x.ndim))
    return x[index]


def _as_tuple_name(axis_name):
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)


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
    axes = tuple(sorted(axes))
    sdtype = stats_dtype(x.dtype, dtype)
    x = x.astype(sdtype)

    if mask is None:
        count = jnp.asarray(math.prod(x.shape[a] for a in axes), jnp.float32)
        count = jnp.broadcast_to(count, _kept_shape(x.shape, axes))
        valid = None
    else:
        mask = jnp.broadcast_to(mask, x.shape)
        count = jnp.sum(mask, axis=axes, keepdims=True, dtype=jnp.float32)
        valid = mask

    def masked(values):
        return values if valid is None else jnp.where(valid, values, jnp.zeros((), values.dtype))

    def real_dtype_count(c):
        return c.astype(jnp.zeros((), sdtype).real.dtype)

    if not use_mean:
        shift = None
        s1 = None
        s2 = jnp.sum(masked(abs_sq(x)), axis=axes, keepdims=True)
    elif use_fast_variance:
        shift = None
        s1 = jnp.sum(masked(x), axis=axes, keepdims=True)
        s2 = jnp.sum(masked(abs_sq(x)), axis=axes, keepdims=True)
    else:
        if valid is None:
            shift = _first_element(x, axes)
        else:
            shift = jnp.sum(masked(x), axis=axes, keepdims=True) / jnp.maximum(real_dtype_count(count), 1)
        shift = jax.lax.stop_gradient(shift)
        centered = masked(x - shift)
        s1 = jnp.sum(centered, axis=axes, keepdims=True)
        s2 = jnp.sum(abs_sq(centered), axis=axes, keepdims=True)

    if axis_name is not None:
        count, shift, s1, s2 = _combine_across_devices(
            count, shift, s1, s2, axis_name, axis_index_groups
        )

    n = jnp.maximum(real_dtype_count(count), 1)
    var = s2 / n
    if s1 is None:
        delta = None
    else:
        delta = s1 / n
        # E[|x-k|^2] - |E[x-k]|^2 can round below zero.
        var = jnp.maximum(var - abs_sq(delta), 0)
    return Moments(shift=shift, delta=delta, var=var, count=None if mask is None else count)


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


def _combine_across_devices(count, shift, s1, s2, axis_name, axis_index_groups):
    """Exact global sums over the named axis with a single collective."""
    if shift is None:
        parts = [count.astype(s2.dtype)] + ([s1] if s1 is not None else []) + [s2]
        if any(jnp.iscomplexobj(p) for p in parts):
            parts = [p.astype(jnp.result_type(*parts)) for p in parts]
        stacked = jax.lax.psum(jnp.stack(parts), axis_name, axis_index_groups=axis_index_groups)
        count = stacked[0].real.astype(jnp.float32)
        s2 = stacked[-1].real.astype(s2.dtype) if not jnp.iscomplexobj(s2) else stacked[-1]
        if s1 is not None:
            s1 = stacked[1].astype(s1.dtype)
        return count, shift, s1, s2

    common = jnp.result_type(s1, shift)
    parts = jnp.stack([count.astype(common), shift.astype(common), s1.astype(common), s2.astype(common)])
    gathered = parts
    for name in _as_tuple_name(axis_name):
        gathered = _gather(gathered, name, axis_index_groups)
        gathered = gathered.reshape((-1,) + parts.shape)
    n_i = gathered[:, 0].real
    k_i = gathered[:, 1]
    s1_i = gathered[:, 2]
    s2_i = gathered[:, 3].real
    total = jnp.sum(n_i, axis=0)
    # A common shift inside the data: the count-weighted mean of the local shifts.
    k = jnp.sum(n_i * k_i, axis=0) / jnp.maximum(total, 1)
    k = jax.lax.stop_gradient(k)
    e_i = jax.lax.stop_gradient(k_i - k)
    s1 = jnp.sum(s1_i + n_i * e_i, axis=0)
    s2 = jnp.sum(s2_i + 2 * jnp.real(jnp.conj(e_i) * s1_i) + n_i * abs_sq(e_i), axis=0)
    return total.astype(jnp.float32), k.astype(shift.dtype), s1.astype(shift.dtype), s2.astype(jnp.real(shift).dtype)


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
