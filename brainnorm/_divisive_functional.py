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
"""

from __future__ import annotations

import math
import numbers

import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np

from . import _units
from ._stats import output_dtype, stats_dtype
from ._validation import canonical_axes, check_mask

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


def _check_real(owner, option, value):
    kind = jnp.result_type(value).kind
    if kind not in "biuf":
        raise TypeError(f"{owner}: {option} must be real, got dtype {jnp.result_type(value)}.")


def check_per_channel(owner, option, value, channels, *, minimum=None, strict=False):
    """A scalar or a ``(C,)`` array of ``option``; values checked when concrete."""
    value = jnp.asarray(value)
    _check_real(owner, option, value)
    if value.shape not in ((), (channels,), (1,)):
        raise ValueError(
            f"{owner}: {option} must be a scalar or have shape ({channels},) (one value per "
            f"channel), got shape {value.shape}."
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
    matrix = jnp.asarray(matrix)
    _check_real(owner, option, matrix)
    if matrix.shape != (channels, channels):
        raise ValueError(
            f"{owner}: {option} must have shape ({channels}, {channels}) (one row per channel), "
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
    x_m = jnp.asarray(x_m)
    _check_real(owner, "x", x_m)
    axis = _feature_axis(owner, feature_axis, x_m.ndim)
    mask = check_mask(owner, mask, x_m.shape)
    return x_m, unit, axis, mask


def _masked(x, mask):
    """Padding set to 0 before any arithmetic, so that non-finite padding never enters it."""
    return x if mask is None else jnp.where(mask, x, 0)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def divisive_normalization(
    x,
    *,
    exponent: float = 2.0,
    sigma=1.0,
    gain=1.0,
    weights=None,
    feature_axis: int = -1,
    mask=None,
    dtype=None,
):
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
        Output dtype; default the input's floating dtype. The arithmetic runs
        in at least float32.

    Returns
    -------
    Array or Quantity
        Same shape as ``x``, in the unit of ``gain``.

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
    owner = "divisive_normalization"
    x_m, x_c, axis, mask, exponent, sigma_n, pool = _pooled(owner, x, exponent, sigma, weights, feature_axis, mask)
    gain_m, gain_unit = _units.split(gain)
    gain_m = check_per_channel(owner, "gain", gain_m, x_m.shape[axis])
    gain_c = _along(gain_m.astype(x_c.dtype), axis, x_c.ndim)
    response = _masked(gain_c * _signed_power(x_c, exponent) / (sigma_n + pool), mask)
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
):
    r"""The drive and the normalization signal of :func:`divisive_normalization`, relative to :math:`\sigma^n`.

    .. math::

        d_i = \frac{\operatorname{sign}(x_i) |x_i|^n}{\sigma_i^n}, \qquad
        p_i = \frac{\sum_j w_{ij} |x_j|^n}{\sigma_i^n},
        \qquad\text{so that}\qquad R_i = g_i \frac{d_i}{1 + p_i}.

    Both are dimensionless. A dynamical circuit that divides its drive by a
    conductance following :math:`p` (see
    :class:`~brainnorm.DynamicDivisiveNormalization`) is built from them.
    Parameters, masks and errors as in :func:`divisive_normalization`.

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
    """
    owner = "divisive_normalization_terms"
    x_m, x_c, _axis, mask, exponent, sigma_n, pool = _pooled(owner, x, exponent, sigma, weights, feature_axis, mask)
    out_dtype = output_dtype(x_m.dtype, dtype)
    drive = _masked(_signed_power(x_c, exponent) / sigma_n, mask)
    return drive.astype(out_dtype), _masked(pool / sigma_n, mask).astype(out_dtype)


def _pooled(owner, x, exponent, sigma, weights, feature_axis, mask):
    r"""Validated options and the pool :math:`\sum_j w_{ij} |x_j|^n` in the computation dtype.

    Returns ``(x_m, x_c, axis, mask, exponent, sigma_n, pool)``: the input's
    mantissa, its masked copy in at least float32, the feature axis, the mask,
    the exponent, :math:`\sigma^n` shaped to broadcast, and the pool.
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
    compute = stats_dtype(x_m.dtype)
    x_c = _masked(x_m, mask).astype(compute)
    energy = _safe_power(jnp.abs(x_c), exponent)
    sigma_n = _safe_power(_along(sigma_m.astype(compute), axis, x_c.ndim), exponent)
    return x_m, x_c, axis, mask, exponent, sigma_n, _pool(energy, matrix.astype(compute), axis)


def gdn(x, beta, gamma, *, inverse: bool = False, feature_axis: int = -1, mask=None, dtype=None):
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
        Output dtype; default the input's floating dtype.

    Returns
    -------
    Array or Quantity
        Same shape as ``x``: dimensionless for GDN; for IGDN in the squared
        unit of ``x`` when ``x`` has one.

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
    owner = "gdn"
    x_m, unit, axis, mask = _prepare(owner, x, feature_axis, mask)
    channels = x_m.shape[axis]
    squared = None if unit is None else unit**2
    beta_m = check_per_channel(
        owner, "beta", _in_unit(owner, "beta", beta, squared), channels, minimum=0.0, strict=True
    )
    gamma_m = check_pool_matrix(owner, "gamma", gamma, channels)

    compute = stats_dtype(x_m.dtype)
    x_c = _masked(x_m, mask).astype(compute)
    norm = _along(beta_m.astype(compute), axis, x_c.ndim) + _pool(jnp.square(x_c), gamma_m.astype(compute), axis)
    y = x_c * jnp.sqrt(norm) if inverse else x_c * jax.lax.rsqrt(norm)
    y = _masked(y, mask)
    out_unit = squared if inverse else None
    return _units.attach(y.astype(output_dtype(x_m.dtype, dtype)), out_unit)
