r"""Divisive normalization and generalized divisive normalization as pure functions.

Both divide each channel by a weighted pool over the channels of the same
position (the feature axis), with a ``(C, C)`` weight matrix:

* :func:`divisive_normalization`, the canonical neural computation (Heeger
  1992; Carandini & Heeger 2012)

  .. math:: R_i = g \, \frac{\operatorname{sign}(x_i) |x_i|^n}{\sigma^n + \sum_j w_{ij} |x_j|^n}

* :func:`gdn`, generalized divisive normalization (Ballé, Laparra &
  Simoncelli 2016)

  .. math:: y_i = \frac{x_i}{\sqrt{\beta_i + \sum_j \gamma_{ij} x_j^2}}

The pools are matrix products over the feature axis, not statistics: nothing
is averaged over batch or spatial positions. A mask leaves padded channels out
of every pool, and their own output is 0.

Range. :math:`|x|^n` and :math:`\sigma^n` leave float32's range long before
:math:`x` and :math:`\sigma` do (:math:`10^{20}` squared overflows,
:math:`10^{-20}` squared is flushed to 0 by XLA's CPU backend). Every
position is therefore computed on :math:`|x| s` and :math:`\sigma s`, with
:math:`s` a power of two that brings the largest of them near 1 (a factor
below 1 for large values, above 1 for small ones; the multiplication is
exact), and :math:`s^n` cancels in the ratio. :math:`s` is a constant under
differentiation, and the quotients are differentiated as
:math:`d(a/b) = (da - (a/b)\, db) / b`, never through :math:`b^{-2}`, which
leaves the range when :math:`b` is small.
"""

from __future__ import annotations

import math
import numbers

import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np

from . import _units
from ._stats import _magnitude_scale, output_dtype
from ._typing import ArrayLike, DTypeLike, Input, Output, Value
from ._validation import (
    canonical_axes,
    check_dtype,
    check_flag,
    check_input,
    check_mask,
    check_representable,
    widest_statistics_dtype,
)

__all__ = ["divisive_normalization", "gdn"]


# ---------------------------------------------------------------------------
# checks (static: Python values and shapes; values only when they are concrete)
# ---------------------------------------------------------------------------


def _is_concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


def check_exponent(owner, exponent) -> float:
    if isinstance(exponent, bool) or not isinstance(exponent, (numbers.Real, np.floating, np.integer)):
        raise TypeError(
            f"{owner}: exponent must be a positive finite number, got {type(exponent).__name__} {exponent!r}."
        )
    if not math.isfinite(float(exponent)) or exponent <= 0:
        raise ValueError(f"{owner}: exponent must be a positive finite number, got {exponent!r}.")
    return float(exponent)


def _feature_axis(owner, feature_axis, ndim) -> int:
    axes = canonical_axes(owner, "feature_axis", feature_axis, ndim)
    if len(axes) != 1:
        raise ValueError(f"{owner}: feature_axis must name one axis, got {feature_axis!r}.")
    return axes[0]


def check_real(owner, option, value):
    """Bool, integer or any real floating dtype of JAX (bfloat16, float16, 8-bit floats included)."""
    dtype = jnp.result_type(value)
    if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise TypeError(f"{owner}: {option} must be real (bool, integer or floating), got dtype {dtype}.")


def _real_array(owner, option, value):
    """``value`` as a real JAX array: numbers of a kind JAX holds (not strings, objects or huge ints)."""
    if isinstance(value, u.Quantity):
        raise TypeError(f"{owner}: {option} must be dimensionless here, got a Quantity in {value.unit}.")
    if not isinstance(value, jax.Array):
        try:
            kind = np.asarray(value).dtype.kind
        except Exception:
            kind = None
        if kind not in tuple("biuf"):
            raise TypeError(
                f"{owner}: {option} must be a real number or an array of real numbers, got "
                f"{type(value).__name__} {value!r:.80}."
            )
        if kind in tuple("iuf"):
            # values that are finite here but would turn to inf in the array dtype JAX gives them
            with np.errstate(over="ignore", invalid="ignore"):
                finite = np.abs(np.asarray(value, np.float64))
            finite = finite[np.isfinite(finite)]
            if finite.size:
                check_representable(owner, option, float(np.max(finite)), widest_statistics_dtype())
    try:
        value = jnp.asarray(value)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(
            f"{owner}: {option} must be a real number or an array of real numbers (of a dtype JAX holds), got "
            f"{type(value).__name__} {value!r:.80}."
        ) from None
    check_real(owner, option, value)
    return value


def check_per_channel(owner, option, value, channels, *, minimum=None, strict=False):
    """A scalar or a ``(C,)`` array of ``option``; values checked when concrete."""
    value = _real_array(owner, option, value)
    if value.shape not in ((), (channels,), (1,)):
        raise ValueError(
            f"{owner}: {option} must be a scalar or have shape ({channels},) (one value per "
            f"channel of x along feature_axis), got shape {value.shape}."
        )
    if minimum is not None and _is_concrete(value):
        values = np.asarray(value, np.float64)
        bad = ~np.isfinite(values) | ((values <= minimum) if strict else (values < minimum))
        if np.any(bad):
            expected = "positive" if strict else "nonnegative"
            raise ValueError(f"{owner}: {option} must be {expected} and finite, got {np.asarray(value)!r}.")
    return value


def check_pool_matrix(owner, option, matrix, channels):
    """A nonnegative, dimensionless ``(C, C)`` matrix (values checked when concrete)."""
    matrix, matrix_unit = _units.split(matrix)
    if matrix_unit is not None:
        raise TypeError(f"{owner}: {option} must be dimensionless, got a Quantity in {matrix_unit}.")
    matrix = _real_array(owner, option, matrix)
    if matrix.shape != (channels, channels):
        raise ValueError(
            f"{owner}: {option} must have shape ({channels}, {channels}) (one row per channel of x along "
            f"feature_axis), "
            f"got shape {matrix.shape}."
        )
    if _is_concrete(matrix):
        values = np.asarray(matrix, np.float64)
        if not np.all(np.isfinite(values) & (values >= 0)):
            raise ValueError(f"{owner}: {option} must be nonnegative and finite, got {np.asarray(matrix)!r}.")
    return matrix


def _in_unit(owner, option, value, unit):
    """Mantissa of ``value`` in ``unit``; a plain number is read in ``unit`` already."""
    if isinstance(value, u.Quantity):
        return _units.in_unit(owner, option, value, unit)
    return value


# ---------------------------------------------------------------------------
# shared steps
# ---------------------------------------------------------------------------


def _along(value, axis, ndim):
    """Reshape a scalar or ``(C,)`` array so that it broadcasts along ``axis`` of a rank-``ndim`` array."""
    if value.ndim == 0 or value.shape == (1,):
        return value.reshape(())
    shape = [1] * ndim
    shape[axis] = value.shape[0]
    return value.reshape(shape)


def _compute_dtype(x_dtype, dtype=None):
    """float32, or float64 where ``x`` or ``dtype`` is float64: half and 8-bit floats are computed in float32.

    (8-bit floats have no implicit promotion in JAX, so the wide dtype is chosen explicitly.)
    """
    wide = [
        d for d in (x_dtype, dtype) if d is not None and jnp.issubdtype(d, jnp.floating) and jnp.dtype(d).itemsize >= 4
    ]
    return jnp.result_type(jnp.float32, *wide)


def _unit_scale(magnitude):
    """A power of two ``s`` with ``magnitude * s`` in ``[1/2, 1]``, a constant under differentiation.

    :func:`~brainnorm._stats._magnitude_scale` only ever shrinks (it gives
    the factor for magnitudes of 1 and above); below 1 the factor is the
    reciprocal of its factor for ``1 / magnitude``, halved: above 1, so that
    small values are scaled up out of the subnormal range that XLA's CPU
    backend flushes to 0. Both are powers of two between ``2^-126`` and
    ``2^125`` (float32), so multiplying by ``s`` is exact.
    """
    magnitude = jax.lax.stop_gradient(magnitude)
    up = 0.5 / _magnitude_scale(1 / magnitude)  # 1 / 0 = inf gives 2^125
    return jax.lax.stop_gradient(jnp.where(magnitude < 1, up, _magnitude_scale(magnitude)))


@jax.custom_jvp
def quotient(numerator, denominator):
    """``numerator / denominator`` differentiated as ``(dn - ratio * dd) / denominator``.

    JAX differentiates ``a / b`` through ``b^-2``, which overflows for
    ``b < 2^-63`` in float32 (and then gives ``0 * inf = nan`` where ``a`` is
    0) and underflows for ``b > 2^63``; this form only divides by ``b`` again.
    """
    return numerator / denominator


@quotient.defjvp
def _quotient_jvp(primals, tangents):
    numerator, denominator = primals
    d_numerator, d_denominator = tangents
    ratio = quotient(numerator, denominator)
    return ratio, quotient(d_numerator - ratio * d_denominator, denominator)


def _tiny(dtype):
    """The smallest normal number of ``dtype``: a floor that keeps quotients away from ``0 / 0``."""
    return jnp.asarray(jnp.finfo(dtype).tiny, dtype)


def _safe_power(magnitude, exponent):
    """``magnitude ** exponent`` for ``magnitude >= 0``, 0 at 0, with a finite derivative at 0.

    ``a ** n`` has an infinite derivative at 0 for ``n < 1``, and ``0 * inf``
    is NaN where it is multiplied by a zero tangent; the ``where`` keeps the
    power off 0, so the derivative there is 0 (exact for ``n > 1``, a
    subgradient otherwise).
    """
    positive = magnitude > 0
    safe = jnp.where(positive, magnitude, 1)
    return jnp.where(positive, safe**exponent, 0)


def _signed_power(x, exponent):
    """``sign(x) |x| ** n``, differentiable at 0 (derivative 1 for ``n == 1``, 0 for ``n > 1``)."""
    if exponent == 1.0:
        return x
    if exponent > 1.0:
        return x * _safe_power(jnp.abs(x), exponent - 1.0)
    return jnp.sign(x) * _safe_power(jnp.abs(x), exponent)


def _pool(energy, matrix, axis):
    """``sum_j matrix[i, j] * energy[..., j, ...]`` along ``axis``.

    A matrix product over channels, never a reduction over positions.
    """
    moved = jnp.moveaxis(energy, axis, -1)
    pooled = jnp.matmul(moved, matrix.T.astype(moved.dtype), precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(pooled, -1, axis)


def _prepare(owner, x, feature_axis, mask):
    x_m, unit = _units.split(x)
    x_m = check_input(owner, x_m)
    check_real(owner, "x", x_m)
    if x_m.ndim == 0:
        raise ValueError(f"{owner}: x must have at least one axis (the feature axis), got a scalar.")
    axis = _feature_axis(owner, feature_axis, x_m.ndim)
    if x_m.shape[axis] == 0:
        raise ValueError(f"{owner}: x must have at least one channel along feature_axis, got shape {x_m.shape}.")
    mask = check_mask(owner, mask, x_m.shape)
    return x_m, unit, axis, mask


def _masked(x, mask):
    """Padding set to 0 before any arithmetic, so that non-finite padding never enters it."""
    return x if mask is None else jnp.where(mask, x, 0)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def divisive_normalization(
    x: Input,
    *,
    exponent: float = 2.0,
    sigma: Value = 1.0,
    gain: Value = 1.0,
    weights: ArrayLike | None = None,
    feature_axis: int = -1,
    mask: ArrayLike | None = None,
    dtype: DTypeLike | None = None,
) -> Output:
    r"""Divisive normalization over the feature axis (Heeger 1992; Carandini & Heeger 2012).

    .. math::

        R_i = g_i \, \frac{\operatorname{sign}(x_i)\, |x_i|^n}{\sigma_i^n + \sum_j w_{ij} |x_j|^n}

    for every position of ``x``, with ``i`` and ``j`` running over the ``C``
    channels of ``feature_axis``. For nonnegative drive and the default
    uniform pool this is the contrast-response (Naka-Rushton) function
    :math:`g\, c^n / (\sigma^n + c^n)` of a single channel, which reaches half
    its maximum at :math:`c = \sigma` (the semi-saturation constant).

    Parameters
    ----------
    x : array_like or Quantity
        Real input (e.g. linear drive of model neurons). Any shape.
    exponent : float
        :math:`n > 0`. Gradients are finite everywhere; at :math:`x = 0` the
        derivative of :math:`|x|^n` is taken as 0 (exact for :math:`n > 1`).
    sigma : float, array_like or Quantity
        Semi-saturation constant :math:`\sigma > 0`, a scalar or one value per
        channel, in the unit of ``x`` (a plain number is read in that unit).
    gain : float, array_like or Quantity
        :math:`g`, a scalar or one value per channel; the output has its unit
        (e.g. ``100 * u.Hz`` gives firing rates).
    weights : array_like, optional
        Nonnegative ``(C, C)`` pool: row ``i`` weighs the channels that
        normalize channel ``i``. Default: uniform ``1 / C``.
    feature_axis : int
        Channel axis of ``x``.
    mask : array_like of bool, optional
        Broadcastable to ``x``. Masked-out positions contribute nothing to
        any pool and their own output is 0.
    dtype : dtype, optional
        Output dtype; default the input's floating dtype (bfloat16, float16
        and 8-bit floats included). The arithmetic runs in at least float32.

    Returns
    -------
    Array or Quantity
        Same shape as ``x``, in the unit of ``gain``.

    Notes
    -----
    Each position is computed on :math:`|x| s` and :math:`\sigma s`, with a
    power of two :math:`s` that brings the largest of them near 1, and
    :math:`s^n` cancels: :math:`|x|^n` never overflows or underflows in
    float32, so ``x`` and ``sigma`` of magnitude :math:`10^{30}` or
    :math:`10^{-30}` give the response of magnitude 1, with finite, exact
    gradients. A channel whose whole pool (:math:`\sigma_i` included) lies
    more than about :math:`2^{126/n}` below the largest magnitude at its
    position is computed as if its :math:`\sigma_i` were raised to that level.

    Raises
    ------
    ValueError
        Non-positive ``sigma`` or ``exponent``, negative or misshapen
        ``weights``, ``sigma``/``gain`` of another shape than ``()`` or
        ``(C,)``, a mask that does not broadcast.
    TypeError
        ``sigma`` in a unit not convertible to that of ``x``, complex input, a
        floating mask.

    References
    ----------
    Heeger. Normalization of cell responses in cat striate cortex. Visual
    Neuroscience 9:181-197 (1992).
    Carandini, Heeger. Normalization as a canonical neural computation.
    Nature Reviews Neuroscience 13:51-62 (2012).

    Examples
    --------
    >>> import jax.numpy as jnp, brainunit as u
    >>> from brainnorm.functional import divisive_normalization
    >>> y = divisive_normalization(jnp.array([1.0, 3.0]), sigma=1.0, weights=jnp.eye(2))
    >>> [round(v, 4) for v in y.tolist()]          # x^2 / (1 + x^2)
    [0.5, 0.9]
    >>> r = divisive_normalization(jnp.array([2.0, 0.0]) * u.mV, sigma=2 * u.mV, gain=50 * u.Hz)
    >>> [round(v, 4) for v in r.to_decimal(u.Hz).tolist()]   # 50 Hz * 4 / (4 + (4 + 0) / 2)
    [33.3333, 0.0]
    """
    return _divisive_normalization(
        "divisive_normalization", x, exponent, sigma, gain, weights, feature_axis, mask, dtype
    )


def _divisive_normalization(owner, x, exponent, sigma, gain, weights, feature_axis, mask, dtype):
    """:func:`divisive_normalization` with its errors in the name of ``owner`` (a layer or the function)."""
    dtype = check_dtype(owner, "dtype", dtype)
    x_m, axis, mask, drive, sigma_n, pool = _scaled_terms(owner, x, exponent, sigma, weights, feature_axis, mask)
    gain_m, gain_unit = _units.split(gain)
    gain_m = check_per_channel(owner, "gain", gain_m, x_m.shape[axis])
    gain_c = _along(gain_m.astype(drive.dtype), axis, drive.ndim)
    # every term carries the factor s^n, which cancels here; the floor only acts where a
    # channel's whole pool lies so far below the position's largest value that it underflowed
    response = _masked(gain_c * quotient(drive, jnp.maximum(sigma_n + pool, _tiny(drive.dtype))), mask)
    return _units.attach(response.astype(output_dtype(x_m.dtype, dtype)), gain_unit)


def divisive_normalization_terms(
    x,
    *,
    exponent: float = 2.0,
    sigma=1.0,
    weights=None,
    feature_axis: int = -1,
    mask=None,
    dtype=None,
    bound=None,
):
    r"""The drive and the normalization signal of :func:`divisive_normalization`, relative to :math:`\sigma^n`.

    .. math::

        d_i = \frac{\operatorname{sign}(x_i) |x_i|^n}{\sigma_i^n}, \qquad
        p_i = \frac{\sum_j w_{ij} |x_j|^n}{\sigma_i^n},
        \qquad\text{so that}\qquad R_i = g_i \frac{d_i}{1 + p_i}.

    Both are dimensionless. A dynamical circuit that divides its drive by a
    conductance following :math:`p` (see
    :class:`~brainnorm.DynamicDivisiveNormalization`) is built from them.
    Parameters, masks and errors as in :func:`divisive_normalization`; the
    arithmetic runs in at least float32, and in ``dtype`` where that is
    float64.

    Unlike the response, :math:`d` and :math:`p` themselves leave float32's
    range for :math:`|x| \gg \sigma` (:math:`(10^{20}/1)^2`). Both are
    divided by one divisor, so their ratio, which fixes :math:`R_i` once
    :math:`p_i \gg 1`, is kept where the divisor is raised: as if
    :math:`\sigma_i` were raised just enough for that channel. That happens
    where :math:`\sigma_i` lies more than about :math:`2^{126/n}` below the
    largest magnitude at its position (:math:`\sigma_i^n` is then not
    representable next to it, see :func:`_scaled_terms`), and, with
    ``bound`` (a positive number at most a quarter of the dtype's largest
    value), where :math:`|d_i|` or :math:`p_i` would exceed ``bound``: the
    larger of them is then ``bound``.

    Returns
    -------
    (Array, Array)
        ``(drive, pool)``, each of the shape of ``x``; 0 at masked-out
        positions.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from brainnorm._divisive_functional import divisive_normalization_terms
    >>> drive, pool = divisive_normalization_terms(jnp.array([2.0, -2.0]), sigma=2.0)
    >>> drive.tolist(), pool.tolist()
    ([1.0, -1.0], [1.0, 1.0])
    >>> drive, pool = divisive_normalization_terms(jnp.array([1e20]), bound=1e30)
    >>> [round(v / 1e30, 4) for v in drive.tolist() + pool.tolist()]   # 1e40 each, divided by 1e10
    [1.0, 1.0]
    """
    return _divisive_normalization_terms(
        "divisive_normalization_terms", x, exponent, sigma, weights, feature_axis, mask, dtype, bound
    )


def _divisive_normalization_terms(owner, x, exponent, sigma, weights, feature_axis, mask, dtype, bound):
    """:func:`divisive_normalization_terms` with its errors in the name of ``owner``."""
    dtype = check_dtype(owner, "dtype", dtype)
    x_m, _axis, mask, drive, sigma_n, pool = _scaled_terms(
        owner, x, exponent, sigma, weights, feature_axis, mask, dtype
    )
    compute = drive.dtype
    divisor = jnp.maximum(sigma_n, _tiny(compute))
    if bound is not None:
        bound = jnp.asarray(bound, compute)
        larger = jnp.maximum(jnp.abs(drive), pool)
        # |d| or p above bound, compared without forming either (bound * divisor >= bound * tiny, near 1)
        over = larger > bound * divisor
        # both branches stay finite, so that the one not taken passes no 0 * inf into gradients
        capped = bound * quotient(jnp.where(over, drive, 0), jnp.where(over, larger, 1))
        drive = jnp.where(over, capped, quotient(jnp.where(over, 0, drive), divisor))
        capped = bound * quotient(jnp.where(over, pool, 0), jnp.where(over, larger, 1))
        pool = jnp.where(over, capped, quotient(jnp.where(over, 0, pool), divisor))
    else:
        drive, pool = quotient(drive, divisor), quotient(pool, divisor)
    out_dtype = output_dtype(x_m.dtype, dtype)
    return _masked(drive, mask).astype(out_dtype), _masked(pool, mask).astype(out_dtype)


def _scaled_terms(owner, x, exponent, sigma, weights, feature_axis, mask, dtype=None):
    r"""Validated options and the terms of the response, each multiplied by :math:`s^n`.

    Returns ``(x_m, axis, mask, drive, sigma_n, pool)``: the input's mantissa,
    the feature axis, the mask, and in the computation dtype
    :math:`\operatorname{sign}(x_i) (|x_i| s)^n`, :math:`(\sigma_i s)^n`
    (shaped to broadcast) and :math:`\sum_j w_{ij} (|x_j| s)^n`, where
    :math:`s` (one power of two per position, see the module docstring) brings
    the largest of :math:`|x_j|` and :math:`\sigma` near 1. Terms more than
    about :math:`2^{126/n}` below that largest value underflow to 0: a
    channel loses its pool only where the pool (its :math:`\sigma_i`
    included) holds nothing within that range of the largest value.
    """
    exponent = check_exponent(owner, exponent)
    x_m, unit, axis, mask = _prepare(owner, x, feature_axis, mask)
    channels = x_m.shape[axis]
    sigma_m = check_per_channel(
        owner, "sigma", _in_unit(owner, "sigma", sigma, unit), channels, minimum=0.0, strict=True
    )
    if weights is None:
        matrix = jnp.full((channels, channels), 1.0 / channels)
    else:
        matrix = check_pool_matrix(owner, "weights", weights, channels)
    compute = _compute_dtype(x_m.dtype, dtype)
    x_c = _masked(x_m, mask).astype(compute)
    sigma_c = _along(sigma_m.astype(compute), axis, x_c.ndim)
    scale = _unit_scale(jnp.maximum(jnp.max(jnp.abs(x_c), axis=axis, keepdims=True), jnp.max(sigma_c)))
    x_s = x_c * scale
    energy = _safe_power(jnp.abs(x_s), exponent)
    sigma_n = _safe_power(sigma_c * scale, exponent)
    pool = _pool(energy, matrix.astype(compute), axis)
    return x_m, axis, mask, _signed_power(x_s, exponent), sigma_n, pool


def gdn(
    x: Input,
    beta: ArrayLike,
    gamma: ArrayLike,
    *,
    inverse: bool = False,
    feature_axis: int = -1,
    mask: ArrayLike | None = None,
    dtype: DTypeLike | None = None,
) -> Output:
    r"""Generalized divisive normalization (Ballé, Laparra & Simoncelli, 2016) and its inverse.

    .. math::

        y_i = \frac{x_i}{\sqrt{\beta_i + \sum_j \gamma_{ij}\, x_j^2}}
        \qquad\text{(GDN)},\qquad
        y_i = x_i \sqrt{\beta_i + \sum_j \gamma_{ij}\, x_j^2}
        \qquad\text{(IGDN, ``inverse=True``)}

    over the channels of ``feature_axis`` at every position; the same
    arithmetic as CompressAI's ``compressai.layers.GDN`` forward, whose
    ``conv2d(x ** 2, gamma, beta)`` weighs channel ``j`` into channel ``i``
    with ``gamma[i, j]``.

    Parameters
    ----------
    x : array_like or Quantity
        Real input.
    beta : array_like or Quantity
        Positive, a scalar or one value per channel; in the squared unit of
        ``x`` (a plain number is read in it).
    gamma : array_like
        Nonnegative ``(C, C)`` matrix, dimensionless.
    inverse : bool
        Multiply instead of divide (IGDN).
    feature_axis : int
        Channel axis of ``x``.
    mask : array_like of bool, optional
        Masked-out positions are left out of every pool; their output is 0.
    dtype : dtype, optional
        Output dtype; default the input's floating dtype (bfloat16, float16
        and 8-bit floats included). The arithmetic runs in at least float32.

    Returns
    -------
    Array or Quantity
        Same shape as ``x``: dimensionless for GDN; for IGDN in the squared
        unit of ``x`` when ``x`` has one.

    Notes
    -----
    As in :func:`divisive_normalization`, each position is computed on
    :math:`x s` and :math:`\beta s^2` with a power of two :math:`s` that
    brings the largest of :math:`|x|` and :math:`\sqrt{\beta}` near 1, so
    :math:`x^2` neither overflows nor underflows in float32.

    Raises
    ------
    ValueError
        Non-positive ``beta``, negative or misshapen ``gamma``, a mask that
        does not broadcast.

    References
    ----------
    Ballé, Laparra, Simoncelli. Density Modeling of Images using a Generalized
    Normalization Transformation. ICLR 2016.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from brainnorm.functional import gdn
    >>> x = jnp.array([3.0, 4.0])
    >>> [round(v, 4) for v in gdn(x, jnp.ones(2), jnp.eye(2)).tolist()]     # x / sqrt(1 + x^2)
    [0.9487, 0.9701]
    >>> [round(v, 4) for v in gdn(gdn(x, 1.0, jnp.zeros((2, 2))), 1.0, jnp.zeros((2, 2)), inverse=True).tolist()]
    [3.0, 4.0]
    """
    return _gdn("gdn", x, beta, gamma, inverse, feature_axis, mask, dtype)


def _gdn(owner, x, beta, gamma, inverse, feature_axis, mask, dtype):
    """:func:`gdn` with its errors in the name of ``owner`` (a layer or the function)."""
    inverse = check_flag(owner, "inverse", inverse)
    dtype = check_dtype(owner, "dtype", dtype)
    x_m, unit, axis, mask = _prepare(owner, x, feature_axis, mask)
    channels = x_m.shape[axis]
    squared = None if unit is None else unit**2
    beta_m = check_per_channel(
        owner, "beta", _in_unit(owner, "beta", beta, squared), channels, minimum=0.0, strict=True
    )
    gamma_m = check_pool_matrix(owner, "gamma", gamma, channels)

    compute = _compute_dtype(x_m.dtype)
    x_c = _masked(x_m, mask).astype(compute)
    beta_c = _along(beta_m.astype(compute), axis, x_c.ndim)
    # beta is a squared magnitude: the scale comes from the largest of |x| and sqrt(beta)
    scale = _unit_scale(jnp.maximum(jnp.max(jnp.abs(x_c), axis=axis, keepdims=True), jnp.sqrt(jnp.max(beta_c))))
    x_s = x_c * scale
    # beta * s * s: s^2 alone may leave the range; beta * s stays below sqrt(beta)
    norm_s = beta_c * scale * scale + _pool(jnp.square(x_s), gamma_m.astype(compute), axis)
    # the floor acts only where a channel's whole pool underflowed (see _scaled_terms)
    root = jnp.sqrt(jnp.maximum(norm_s, _tiny(compute)))
    # IGDN: back to the unit of x^2 by two multiplications with 1 / s (exact); XLA rewrites
    # (v / s) / s into v / (s * s), and s * s may leave the range
    inverse_scale = 1 / scale
    y = x_s * root * inverse_scale * inverse_scale if inverse else quotient(x_s, root)
    y = _masked(y, mask)
    out_unit = squared if inverse else None
    return _units.attach(y.astype(output_dtype(x_m.dtype, dtype)), out_unit)
