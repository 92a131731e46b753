r"""Normalization in neuroscience: divisive normalization, GDN and a dynamic normalization circuit.

The layers validate their options, hold parameters and states, and call the
pure functions of :mod:`brainnorm._divisive_functional`
(:func:`~brainnorm.functional.divisive_normalization`,
:func:`~brainnorm.functional.gdn`).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import TYPE_CHECKING

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np

from . import _divisive_functional as DF
from . import _units
from ._base import _check_state_type, _Normalization
from ._states import NormalizationParamState
from ._typing import ArrayLike, DTypeLike, Input, Output, Size, Value
from ._validation import (
    canonical_in_size,
    check_dtype,
    check_epsilon,
    check_flag,
    check_real,
    check_representable,
)

__all__ = ["GDN", "DivisiveNormalization", "DynamicDivisiveNormalization"]


# ---------------------------------------------------------------------------
# nonnegative reparameterization (Ballé's, as CompressAI applies it)
# ---------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _lower_bound(x, bound):
    """``max(x, bound)`` whose gradient also flows below the bound when it points upwards.

    A plain maximum has zero gradient below the bound, so a parameter pushed
    there could never come back; here the gradient passes wherever ``x`` is at
    or above the bound or where descent would raise ``x`` (negative gradient).
    """
    return jnp.maximum(x, bound)


def _lower_bound_fwd(x, bound):
    return jnp.maximum(x, bound), x


def _lower_bound_bwd(bound, x, grad):
    passes = (x >= bound) | (grad < 0)
    return (jnp.where(passes, grad, jnp.zeros_like(grad)),)


_lower_bound.defvjp(_lower_bound_fwd, _lower_bound_bwd)


class _NonNegative:
    r"""``value = max(raw, sqrt(minimum + p)) ** 2 - p`` with the pedestal ``p = offset ** 2``.

    Squaring keeps the value nonnegative (at least ``minimum``); the pedestal
    keeps the gradient of the square away from 0 near ``value = 0``.
    ``raw(value) = sqrt(max(value + p, p))`` inverts it for ``value >= minimum``.
    """

    def __init__(self, minimum=0.0, offset=2.0**-18):
        self.minimum = float(minimum)
        self.pedestal = float(offset) ** 2
        self.bound = (self.minimum + self.pedestal) ** 0.5

    def raw(self, value):
        return jnp.sqrt(jnp.maximum(value + self.pedestal, self.pedestal))

    def value(self, raw):
        return _lower_bound(raw, self.bound) ** 2 - self.pedestal


def _check_nonnegative_number(owner, option, value, dtype, *, strict=False):
    """A nonnegative (positive with ``strict``) finite number that stays finite in ``dtype``; as a float."""
    return check_real(owner, option, value, positive=strict, nonnegative=not strict, dtype=dtype)


def _check_reparam_offset(owner, offset, dtype, minimum, minimum_option):
    """A positive ``reparam_offset`` whose square (the pedestal) stays finite in ``dtype`` and small enough
    that the lower bound ``minimum`` survives ``(minimum + pedestal) - pedestal`` there."""
    offset = _check_nonnegative_number(owner, "reparam_offset", offset, dtype, strict=True)
    pedestal = offset * offset
    check_representable(owner, "reparam_offset", pedestal, dtype)
    real = jnp.dtype(jnp.zeros((), dtype).real.dtype)
    with np.errstate(over="ignore"):
        kept = float(np.asarray(np.asarray(minimum + pedestal, real) - np.asarray(pedestal, real), real))
    if not kept >= 0.5 * minimum:
        raise ValueError(
            f"{owner}: reparam_offset must be small enough that {minimum_option}={minimum!r} survives the "
            f"pedestal reparam_offset ** 2 in {real.name} (CompressAI uses 2 ** -18), got {offset!r}."
        )
    return offset


def _check_fits(owner, option, value, dtype):
    """The values of ``option`` (concrete) must stay finite in the parameter dtype ``dtype``."""
    values = np.asarray(value, np.float64)
    if values.size:
        check_representable(owner, option, float(np.max(np.abs(values))), dtype)


def _param_dtype(param_dtype):
    return brainstate.environ.dftype() if param_dtype is None else param_dtype


_MAX_SIZE = 2**31 - 1


def _check_in_size(owner, in_size):
    """``in_size`` of a channel layer: at least one axis (the feature axis), sizes that an index can hold."""
    size = canonical_in_size(owner, in_size)
    if not size:
        raise ValueError(f"{owner}: in_size must have at least one axis (the feature axis), got {in_size!r}.")
    if any(d > _MAX_SIZE for d in size):
        raise ValueError(f"{owner}: in_size must contain sizes of at most {_MAX_SIZE}, got {size!r}.")
    return size


class _ChannelLayer(_Normalization):
    """A layer that pools over the channels of one feature axis of ``in_size``."""

    def _setup_channels(self, feature_axis):
        feature = self._sample_axes("feature_axis", feature_axis)
        if len(feature) != 1:
            raise ValueError(f"{self._owner}: feature_axis must name one axis, got {feature_axis!r}.")
        self.feature_axes = feature
        self.num_channels = self.in_size[feature[0]]

    def _call_axis(self, ndim):
        return self._x_axes(self.feature_axes, ndim)[0]

    def _prepare_real_input(self, x, mask):
        """``(mantissa, unit, mask)`` of a real input (any floating dtype), checked in this layer's name."""
        x_m, unit, mask, _ = self._prepare_input(x, mask)
        DF.check_real(self._owner, "x", x_m)
        return x_m, unit, mask


class _DivisiveOptions(_ChannelLayer):
    """``exponent``, ``sigma``, ``gain`` and ``weights`` of the divisive normalization layers."""

    def _setup_divisive(self, exponent, sigma, gain, weights):
        owner, channels = self._owner, self.num_channels
        self.exponent = DF.check_exponent(owner, exponent)
        sigma_m, self.sigma_unit = _units.split(sigma)
        sigma_m = DF.check_per_channel(owner, "sigma", sigma_m, channels, minimum=0.0, strict=True)
        gain_m, self.gain_unit = _units.split(gain)
        gain_m = DF.check_per_channel(owner, "gain", gain_m, channels)
        if weights is None:
            weights = jnp.full((channels, channels), 1.0 / channels)
        weights = DF.check_pool_matrix(owner, "weights", weights, channels)
        return sigma_m, gain_m, weights

    def _sigma_in(self, unit):
        """``sigma`` in the unit of the input (a plain ``sigma`` is read in it), checked in this layer's name."""
        sigma = self.sigma
        return _units.in_unit(self._owner, "sigma", sigma, unit) if isinstance(sigma, u.Quantity) else sigma


# ---------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------


class DivisiveNormalization(_DivisiveOptions):
    r"""Divisive normalization, the canonical neural computation (Heeger 1992; Carandini & Heeger 2012).

    .. math::

        R_i = g_i \, \frac{\operatorname{sign}(x_i)\, |x_i|^n}{\sigma_i^n + \sum_j w_{ij} |x_j|^n}

    over the ``C`` channels of ``feature_axis``, at every position and batch
    element. With a nonnegative drive and a uniform pool one channel alone
    follows the contrast-response function :math:`g c^n / (\sigma^n + c^n /
    C)`; with ``weights=eye(C)`` it is :math:`g c^n / (\sigma^n + c^n)`, half
    of its maximum at :math:`c = \sigma` (semi-saturation).

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape without batch axes.
    feature_axis : int
        Channel axis within ``in_size`` (the pool runs over it). Default
        ``-1``.
    exponent : float
        The exponent :math:`n > 0` applied to the input magnitude in the
        numerator and in the pool. Default 2.
    sigma : float, array_like or Quantity
        Semi-saturation constant, positive, a scalar or one value per channel,
        in the unit of the input (a plain number is read in it).
    gain : float, array_like or Quantity
        A scalar or one value per channel; the output has its unit
        (``gain=100 * u.Hz``: firing rates).
    weights : array_like, optional
        Nonnegative ``(C, C)`` pool, row ``i`` for channel ``i``; default
        uniform ``1 / C``.
    learnable : bool
        False (default): ``sigma``, ``gain`` and ``weights`` are constants.
        True: they are trained, held in ``self.weight``, a ``param_type``
        with the entries ``'weights'``, ``'sigma'`` (both reparameterized to
        stay nonnegative as in :class:`GDN`; ``sigma`` at least
        ``sigma_min``) and ``'gain'``; units stay on the layer
        (``sigma_unit``, ``gain_unit``).
    sigma_min : float
        Lower bound of a learned ``sigma`` (in its unit). Default 1e-6.
    reparam_offset : float
        Offset of the nonnegative reparameterization (CompressAI's default,
        ``2 ** -18``).
    dtype : dtype, optional
        Output dtype; default the input's floating dtype.
    param_dtype : dtype, optional
        Dtype of learned parameters (default ``brainstate.environ.dftype()``).
    param_type : type
        ``brainstate.ParamState`` subclass holding the learned parameters as
        :attr:`weight`. Default :class:`NormalizationParamState`.
    name : str, optional
        Module name reported by brainstate.

    Raises
    ------
    ValueError
        Non-positive ``sigma`` or ``exponent``, negative or non-``(C, C)``
        ``weights``, ``sigma``/``gain`` of a shape other than ``()`` or
        ``(C,)``; at call time a wrong input shape or a mask that does not
        broadcast.
    TypeError
        ``sigma`` in a unit that does not fit the input, a floating mask.

    References
    ----------
    Heeger. Normalization of cell responses in cat striate cortex. Visual
    Neuroscience 9:181-197 (1992).
    Carandini, Heeger. Normalization as a canonical neural computation.
    Nature Reviews Neuroscience 13:51-62 (2012).

    Examples
    --------
    >>> import jax.numpy as jnp, brainunit as u, brainnorm
    >>> dn = brainnorm.DivisiveNormalization(2, sigma=10 * u.mV, gain=100 * u.Hz, weights=jnp.eye(2))
    >>> r = dn(jnp.array([10.0, 30.0]) * u.mV)       # 100 Hz * c^2 / (sigma^2 + c^2)
    >>> [round(v, 3) for v in r.to_decimal(u.Hz).tolist()]
    [50.0, 90.0]
    """

    weight: NormalizationParamState | None

    def __init__(
        self,
        in_size: Size,
        feature_axis: int = -1,
        *,
        exponent: float = 2.0,
        sigma: Value = 1.0,
        gain: Value = 1.0,
        weights: ArrayLike | None = None,
        learnable: bool = False,
        sigma_min: float = 1e-6,
        reparam_offset: float = 2.0**-18,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike | None = None,
        param_type: type[NormalizationParamState] = NormalizationParamState,
        name: str | None = None,
    ) -> None:
        super().__init__(_check_in_size(type(self).__name__, in_size), name=name)
        owner = self._owner
        self._setup_channels(feature_axis)
        sigma_m, gain_m, pool = self._setup_divisive(exponent, sigma, gain, weights)
        self.learnable = bool(check_flag(owner, "learnable", learnable))
        self.dtype = check_dtype(owner, "dtype", dtype)
        self.param_dtype = check_dtype(owner, "param_dtype", param_dtype, parameter=True)
        dtype_p = _param_dtype(self.param_dtype)
        self.sigma_min = _check_nonnegative_number(owner, "sigma_min", sigma_min, dtype_p, strict=True)
        offset = _check_reparam_offset(owner, reparam_offset, dtype_p, self.sigma_min, "sigma_min")
        self._weights_reparam = _NonNegative(0.0, offset)
        self._sigma_reparam = _NonNegative(self.sigma_min, offset)
        if self.learnable:
            if np.any(np.asarray(sigma_m) < self.sigma_min):
                raise ValueError(
                    f"{owner}: sigma must be at least sigma_min={self.sigma_min} when learnable, "
                    f"got {np.asarray(sigma_m)!r}."
                )
            _check_state_type(owner, "param_type", param_type, trainable=True)
            for option, value in (("sigma", sigma_m), ("gain", gain_m), ("weights", pool)):
                _check_fits(owner, option, value, dtype_p)
            self.weight = param_type(
                {
                    "weights": self._weights_reparam.raw(pool.astype(dtype_p)),
                    "sigma": self._sigma_reparam.raw(sigma_m.astype(dtype_p)),
                    "gain": gain_m.astype(dtype_p),
                }
            )
            self._constants = None
        else:
            self.weight = None
            self._constants = (sigma_m, gain_m, pool)

    @property
    def sigma(self):
        """The semi-saturation constant in use (reparameterized when learned)."""
        sigma_m = self._sigma_reparam.value(self.weight.value["sigma"]) if self.learnable else self._constants[0]
        return _units.attach(sigma_m, self.sigma_unit)

    @property
    def gain(self):
        """The gain in use, in its unit."""
        return _units.attach(self.weight.value["gain"] if self.learnable else self._constants[1], self.gain_unit)

    @property
    def weights(self):
        """The nonnegative ``(C, C)`` pool in use (reparameterized when learned)."""
        return self._weights_reparam.value(self.weight.value["weights"]) if self.learnable else self._constants[2]

    if TYPE_CHECKING:  # brainstate's Module.__call__ (untyped) forwards to update: its types, for checkers

        def __call__(self, x: Input, mask: ArrayLike | None = None) -> Output: ...

    def update(self, x: Input, mask: ArrayLike | None = None) -> Output:
        """Normalize ``x`` of shape ``(*batch, *in_size)``; ``layer(x, ...)`` calls this.

        Parameters
        ----------
        x : array_like or Quantity
            In the unit of ``sigma`` (or one convertible to it).
        mask : array_like of bool, optional
            Broadcastable to ``x``; masked-out positions are left out of every
            pool and their output is 0.

        Returns
        -------
        jax.Array or Quantity
            Same shape as ``x``, in the unit of ``gain``.
        """
        x_m, unit, mask = self._prepare_real_input(x, mask)
        return DF._divisive_normalization(
            self._owner,
            x_m,
            self.exponent,
            self._sigma_in(unit),
            self.gain,
            self.weights,
            self._call_axis(x_m.ndim),
            mask,
            self.dtype,
        )


class GDN(_ChannelLayer):
    r"""Generalized divisive normalization (Ballé, Laparra & Simoncelli, 2016); IGDN with ``inverse=True``.

    .. math::

        y_i = \frac{x_i}{\sqrt{\beta_i + \sum_j \gamma_{ij}\, x_j^2}}
        \qquad\text{or, inverse,}\qquad
        y_i = x_i \sqrt{\beta_i + \sum_j \gamma_{ij}\, x_j^2}

    over the channels of ``feature_axis``. ``beta`` (``(C,)``) and ``gamma``
    (``(C, C)``) are trained through a nonnegative reparameterization, as
    CompressAI trains them:
    :math:`\beta = \max(b, \sqrt{\beta_{min} + p})^2 - p`,
    :math:`\gamma = \max(c, \sqrt{p})^2 - p` with the pedestal
    :math:`p = \mathrm{offset}^2`, where the gradient of the bound also flows
    below it when it points upwards (CompressAI's ``LowerBound``). The raw
    ``b`` and ``c`` are the entries ``'beta'`` and ``'gamma'`` of
    ``self.weight``; :attr:`beta` and :attr:`gamma` give the values in use.
    Initialized as CompressAI does: :math:`\beta = 1`,
    :math:`\gamma = \mathrm{gamma\_init}\cdot I`. The output equals
    ``compressai.layers.GDN(C, inverse, beta_min, gamma_init)`` given the same
    raw parameters (with channels moved to ``feature_axis``).

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape without batch axes (e.g. ``(H, W, C)``).
    feature_axis : int
        Channel axis within ``in_size``, the one the pool runs over. Default
        ``-1``.
    inverse : bool
        IGDN: multiply by the norm instead of dividing. Default False.
    beta_min : float
        Positive lower bound of ``beta``. Default 1e-6.
    gamma_init : float
        Nonnegative diagonal of the initial ``gamma``. Default 0.1.
    reparam_offset : float
        Offset of the reparameterization (CompressAI: ``2 ** -18``).
    dtype : dtype, optional
        Output dtype; default the input's floating dtype.
    param_dtype : dtype, optional
        Dtype of ``beta`` and ``gamma``; default
        ``brainstate.environ.dftype()``.
    param_type : type
        ``brainstate.ParamState`` subclass holding ``{'beta', 'gamma'}`` as
        :attr:`weight`. Default :class:`NormalizationParamState`.
    name : str, optional
        Module name reported by brainstate.

    Notes
    -----
    The bound's gradient rule is a reverse-mode rule (it looks at the sign of
    the cotangent): differentiate with respect to ``self.weight`` with
    ``grad``/``vjp``; forward mode (``jvp``, ``jacfwd``) works with respect to
    the input. A Quantity input ``x`` reads ``beta`` in its squared unit; GDN
    output is dimensionless, IGDN output is in the squared unit.

    References
    ----------
    Ballé, Laparra, Simoncelli. Density Modeling of Images using a Generalized
    Normalization Transformation. ICLR 2016.
    Bégaint, Racapé, Feltman, Pushparaja. CompressAI: a PyTorch library and
    evaluation platform for end-to-end compression research.
    arXiv:2011.03029 (2020).

    Examples
    --------
    >>> import jax.numpy as jnp, brainnorm
    >>> gdn = brainnorm.GDN(2)                      # beta = 1, gamma = 0.1 I
    >>> y = gdn(jnp.array([3.0, 0.0]))              # 3 / sqrt(1 + 0.1 * 9)
    >>> [round(v, 4) for v in y.tolist()]
    [2.1764, 0.0]
    >>> igdn = brainnorm.GDN(2, inverse=True)
    >>> [round(v, 4) for v in igdn(y).tolist()]     # y * sqrt(1 + 0.1 y^2): near 3, not an exact inverse
    [2.6421, 0.0]
    """

    def __init__(
        self,
        in_size: Size,
        feature_axis: int = -1,
        *,
        inverse: bool = False,
        beta_min: float = 1e-6,
        gamma_init: float = 0.1,
        reparam_offset: float = 2.0**-18,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike | None = None,
        param_type: type[NormalizationParamState] = NormalizationParamState,
        name: str | None = None,
    ) -> None:
        super().__init__(_check_in_size(type(self).__name__, in_size), name=name)
        owner = self._owner
        self._setup_channels(feature_axis)
        self.inverse = bool(check_flag(owner, "inverse", inverse))
        self.dtype = check_dtype(owner, "dtype", dtype)
        self.param_dtype = check_dtype(owner, "param_dtype", param_dtype, parameter=True)
        dtype_p = _param_dtype(self.param_dtype)
        if isinstance(beta_min, u.Quantity):
            raise TypeError(
                f"{owner}: beta_min must be a positive finite number (in the squared unit of the input), "
                f"got a Quantity {beta_min!r}."
            )
        self.beta_min = _check_nonnegative_number(owner, "beta_min", beta_min, dtype_p, strict=True)
        check_epsilon(owner, self.beta_min, option="beta_min")
        self.gamma_init = _check_nonnegative_number(owner, "gamma_init", gamma_init, dtype_p)
        self.reparam_offset = _check_reparam_offset(owner, reparam_offset, dtype_p, self.beta_min, "beta_min")
        self._beta_reparam = _NonNegative(self.beta_min, self.reparam_offset)
        self._gamma_reparam = _NonNegative(0.0, self.reparam_offset)
        _check_state_type(owner, "param_type", param_type, trainable=True)
        channels = self.num_channels
        self.weight = param_type(
            {
                "beta": self._beta_reparam.raw(jnp.ones((channels,), dtype_p)),
                "gamma": self._gamma_reparam.raw(self.gamma_init * jnp.eye(channels, dtype=dtype_p)),
            }
        )

    @property
    def beta(self):
        """``(C,)`` values of beta in use (at least ``beta_min``)."""
        return self._beta_reparam.value(self.weight.value["beta"])

    @property
    def gamma(self):
        """``(C, C)`` nonnegative values of gamma in use; ``gamma[i, j]`` weighs channel ``j`` into ``i``."""
        return self._gamma_reparam.value(self.weight.value["gamma"])

    if TYPE_CHECKING:  # brainstate's Module.__call__ (untyped) forwards to update: its types, for checkers

        def __call__(self, x: Input, mask: ArrayLike | None = None) -> Output: ...

    def update(self, x: Input, mask: ArrayLike | None = None) -> Output:
        """Normalize ``x`` of shape ``(*batch, *in_size)``; ``layer(x, ...)`` calls this.

        Parameters
        ----------
        x : array_like or Quantity
            Input whose trailing axes are ``in_size``; every leading axis is a
            batch axis.
        mask : array_like of bool, optional
            Masked-out positions are left out of every pool; their output is 0.

        Returns
        -------
        jax.Array or Quantity
            Same shape as ``x``, in its unit.
        """
        x_m, unit, mask = self._prepare_real_input(x, mask)
        return DF._gdn(
            self._owner,
            _units.attach(x_m, unit),
            self.beta,
            self.gamma,
            self.inverse,
            self._call_axis(x_m.ndim),
            mask,
            self.dtype,
        )


def _check_time_constant(owner, option, value, *, allow_zero=False):
    """A nonnegative (positive unless ``allow_zero``) finite scalar Quantity of time; its value in ms."""
    expected = "a " + ("nonnegative" if allow_zero else "positive") + " time Quantity such as 10 * brainunit.ms"
    if not isinstance(value, u.Quantity):
        raise TypeError(f"{owner}: {option} must be {expected}, got {type(value).__name__} {value!r}.")
    if not u.have_same_dim(value, u.ms):
        raise TypeError(f"{owner}: {option} must be {expected}, got a Quantity in {value.unit}.")
    if np.ndim(value.mantissa) != 0:
        raise ValueError(f"{owner}: {option} must be a scalar, got shape {np.shape(value.mantissa)}.")
    ms = float(value.to_decimal(u.ms))
    if not math.isfinite(ms) or ms < 0 or (ms == 0 and not allow_zero):
        raise ValueError(f"{owner}: {option} must be {expected}, got {value}.")
    return ms


class DynamicDivisiveNormalization(_DivisiveOptions):
    r"""A shunting-inhibition circuit whose fixed point is divisive normalization.

    Each channel is a membrane whose excitatory drive is divided by a
    conductance set by the normalization pool: the mechanism by which
    Carandini & Heeger (1994) and Carandini, Heeger & Movshon (1997) proposed
    that cortical neurons normalize (shunting inhibition divides), written as
    the feed-forward shunting network of Grossberg (1973), whose equilibrium
    :math:`x_i = B I_i / (A + \sum_k I_k)` is divisive normalization. The pool
    reaches the conductance through a low-pass filter of its own time constant,
    as in the delayed normalization model of Zhou, Benson, Kay & Winawer
    (2019). With the drive :math:`d_i` and pool signal :math:`p_i` of the
    static layer,

    .. math::

        d_i = \frac{\operatorname{sign}(x_i)|x_i|^n}{\sigma_i^n}, \qquad
        p_i = \frac{\sum_j w_{ij} |x_j|^n}{\sigma_i^n},

    the state is the response :math:`R` (unit of ``gain``) and the
    normalization conductance :math:`c` (relative to the leak):

    .. math::

        \tau_p \frac{dc_i}{dt} = -c_i + p_i, \qquad
        \tau \frac{dR_i}{dt} = -(1 + c_i)\, R_i + g_i\, d_i .

    **Fixed point.** For a constant input, the first equation is linear with
    the unique stable fixed point :math:`c_i^* = p_i`; with :math:`c = c^*`
    the second is linear in :math:`R` with rate :math:`(1 + c_i^*)/\tau > 0`
    and the fixed point

    .. math::

        R_i^* = \frac{g_i d_i}{1 + p_i}
        = g_i \frac{\operatorname{sign}(x_i)|x_i|^n}{\sigma_i^n + \sum_j w_{ij}|x_j|^n},

    exactly :class:`DivisiveNormalization` with the same ``exponent``,
    ``sigma``, ``gain`` and ``weights``. The conductance raises the membrane's
    rate, so responses to high contrast rise faster (the latency decrease of
    V1 at high contrast), and the delayed pool gives an onset transient
    before the normalized steady state.

    **Integration.** One exponential-Euler step per :meth:`update`, with
    ``dt = brainstate.environ.get_dt()``: both equations are linear in their
    own state, so with :math:`c` held over a step

    .. math::

        c \leftarrow p + (c - p)\, e^{-\Delta t/\tau_p}, \qquad
        R \leftarrow R_\infty + (R - R_\infty)\, e^{-\Delta t (1 + c)/\tau},
        \quad R_\infty = \frac{g d}{1 + c}.

    The fixed point of the discrete map is the one above for every ``dt``
    (no discretization bias), and each step is a convex combination of the
    old state and its target, so for any input :math:`0 \le c \le \max_t p`
    and :math:`|R| \le \max(|R_0|, \max_t |g d|)`: the circuit stays bounded
    for any finite input, at any ``dt``.

    **Range.** :math:`d` and :math:`p` leave the range of the state dtype
    for :math:`|x| \gg \sigma` (:math:`p = 10^{40}` for :math:`x = 10^{20}`,
    :math:`\sigma = 1`, :math:`n = 2`) although :math:`R` does not. Both are
    formed with one divisor, so their ratio, which fixes :math:`R^*`, is kept
    where that divisor is raised (as if :math:`\sigma_i` were raised just
    enough for that channel): where :math:`|d_i|` or :math:`p_i` would exceed
    a quarter of the largest value of the state dtype (the larger is then
    that quarter, and :math:`c` stays finite), and where :math:`\sigma_i`
    lies more than about :math:`2^{126/n}` below the largest input magnitude
    at its position. The target :math:`g d / (1 + c)` is held within half the
    largest value, so the states are finite for any finite input and gain.

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape without batch axes.
    feature_axis : int
        Channel axis within ``in_size``, the one the pool runs over. Default
        ``-1``.
    tau : Quantity
        Membrane time constant :math:`\tau` (time, positive), e.g.
        ``10 * u.ms``.
    tau_pool : Quantity
        Time constant :math:`\tau_p` of the normalization conductance
        (nonnegative; ``0 * u.ms`` makes the conductance follow the pool
        instantly).
    exponent : float
        The exponent :math:`n > 0` of the drive in the target and the pool.
        Default 2.
    sigma : float, array_like or Quantity
        Semi-saturation constant, positive, a scalar or one value per
        channel, in the unit of the input (a plain number is read in it).
        Default 1.
    gain : float, array_like or Quantity
        Gain of the response, a scalar or one value per channel; the response
        has its unit. Default 1.
    weights : array_like, optional
        Nonnegative ``(C, C)`` pool, row ``i`` for channel ``i``; default
        uniform ``1 / C``.
    dtype : dtype, optional
        Dtype of the states (default ``brainstate.environ.dftype()``).
    name : str, optional
        Module name reported by brainstate.

    Notes
    -----
    brainstate's dynamics conventions: :meth:`init_state` creates the
    :class:`brainstate.HiddenState` s ``response`` and ``conductance``
    (zero: at rest), :meth:`reset_state` zeroes them, :meth:`update` advances
    one step. A plain ``dt`` (no unit) is read in ms.

    References
    ----------
    Grossberg. Contour enhancement, short term memory, and constancies in
    reverberating neural networks. Studies in Applied Mathematics 52:213-257
    (1973).
    Carandini, Heeger. Summation and division by neurons in primate visual
    cortex. Science 264:1333-1336 (1994).
    Carandini, Heeger, Movshon. Linearity and normalization in simple cells of
    the macaque primary visual cortex. Journal of Neuroscience 17:8621-8644
    (1997).
    Zhou, Benson, Kay, Winawer. Predicting neuronal dynamics with a delayed
    gain control model. PLoS Computational Biology 15:e1007484 (2019).

    Examples
    --------
    >>> import jax.numpy as jnp, brainunit as u, brainstate, brainnorm
    >>> circuit = brainnorm.DynamicDivisiveNormalization(2, tau=5 * u.ms, tau_pool=10 * u.ms, weights=jnp.eye(2))
    >>> circuit.init_state()
    >>> x = jnp.array([1.0, 3.0])
    >>> with brainstate.environ.context(dt=0.5 * u.ms):
    ...     r = brainstate.transform.for_loop(lambda i: circuit(x), jnp.arange(400))
    >>> [round(v, 4) for v in r[-1].tolist()]                 # the static x^2 / (1 + x^2)
    [0.5, 0.9]
    """

    def __init__(
        self,
        in_size: Size,
        feature_axis: int = -1,
        *,
        tau: Value = 10.0 * u.ms,  # type: ignore[attr-defined]  # brainunit creates its unit names at import
        tau_pool: Value = 20.0 * u.ms,  # type: ignore[attr-defined]
        exponent: float = 2.0,
        sigma: Value = 1.0,
        gain: Value = 1.0,
        weights: ArrayLike | None = None,
        dtype: DTypeLike | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(_check_in_size(type(self).__name__, in_size), name=name)
        owner = self._owner
        self._setup_channels(feature_axis)
        self.tau = tau
        self.tau_pool = tau_pool
        self._tau_ms = _check_time_constant(owner, "tau", tau)
        self._tau_pool_ms = _check_time_constant(owner, "tau_pool", tau_pool, allow_zero=True)
        sigma_m, gain_m, weights = self._setup_divisive(exponent, sigma, gain, weights)
        self.sigma = _units.attach(sigma_m, self.sigma_unit)
        self.gain = _units.attach(gain_m, self.gain_unit)
        self.weights = weights
        self.dtype = check_dtype(owner, "dtype", dtype, parameter=True)
        self.response = None
        self.conductance = None

    def _state_shape(self, batch_size):
        if batch_size is None:
            return self.in_size
        if isinstance(batch_size, (numbers.Integral, np.integer)) and not isinstance(batch_size, bool):
            batch_size = (batch_size,)
        try:
            batch = tuple(int(b) for b in batch_size)
        except TypeError:
            raise TypeError(
                f"{self._owner}: batch_size must be None, an int or a tuple of ints, "
                f"got {type(batch_size).__name__} {batch_size!r}."
            ) from None
        if any(b <= 0 for b in batch):
            raise ValueError(f"{self._owner}: batch_size must be positive, got {batch_size!r}.")
        return batch + self.in_size

    def _rest(self, shape):
        dtype = brainstate.environ.dftype() if self.dtype is None else self.dtype
        return _units.attach(jnp.zeros(shape, dtype), self.gain_unit), jnp.zeros(shape, dtype)

    def init_state(self, batch_size=None, **kwargs):
        """Create the states at rest: ``response`` (unit of ``gain``) and ``conductance``, both 0.

        Parameters
        ----------
        batch_size : int or tuple of int, optional
            Leading batch shape of the states (None: unbatched).
        """
        response, conductance = self._rest(self._state_shape(batch_size))
        self.response = brainstate.HiddenState(response)
        self.conductance = brainstate.HiddenState(conductance)

    def reset_state(self, batch_size=None, **kwargs):
        """Set the states back to rest (0), with a new batch shape if given."""
        shape = self._state_shape(batch_size)
        if self.response is None:
            self.init_state(batch_size)
            return
        self.response.value, self.conductance.value = self._rest(shape)

    def _decays(self):
        """``(exp(-dt / tau), exp(-dt / tau_pool))`` factors; ``dt`` from ``brainstate.environ``."""
        dt = brainstate.environ.get_dt()
        if isinstance(dt, u.Quantity):
            if not u.have_same_dim(dt, u.ms):
                raise TypeError(f"{self._owner}: dt must be a time (e.g. 0.1 * brainunit.ms), got {dt}.")
            dt_ms = dt.to_decimal(u.ms)
        else:
            dt_ms = dt
        pool_rate = 0.0 if self._tau_pool_ms == 0 else 1.0 / self._tau_pool_ms
        membrane_step = jnp.asarray(dt_ms) / self._tau_ms
        pool_decay = jnp.exp(-jnp.asarray(dt_ms) * pool_rate) if pool_rate else jnp.zeros(())
        return membrane_step, pool_decay

    if TYPE_CHECKING:  # brainstate's Module.__call__ (untyped) forwards to update: its types, for checkers

        def __call__(self, x: Input, mask: ArrayLike | None = None) -> Output: ...

    def update(self, x: Input, mask: ArrayLike | None = None) -> Output:
        """Advance the circuit by one step ``dt`` with input ``x``; return the response (``layer(x, ...)``).

        Parameters
        ----------
        x : array_like or Quantity
            Drive of shape ``(*batch, *in_size)`` that broadcasts to the states
            (in the unit of ``sigma``).
        mask : array_like of bool, optional
            Masked-out positions are left out of every pool, receive no drive
            (their state relaxes to rest) and output 0.

        Returns
        -------
        jax.Array or Quantity
            The response :math:`R` after the step, in the unit of ``gain``.
        """
        owner = self._owner
        if self.response is None:
            raise ValueError(
                f"{owner}: the states are not initialized; call init_state(batch_size) (or "
                f"brainstate.nn.init_all_states(model)) before update."
            )
        x_m, unit, mask = self._prepare_real_input(x, mask)
        state_shape = tuple(self.conductance.value.shape)
        try:
            fits = np.broadcast_shapes(x_m.shape, state_shape) == state_shape
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"{owner}: x must broadcast to the state shape {state_shape} (batch shape given to "
                f"init_state, then in_size), got shape {x_m.shape}."
            )
        membrane_step, pool_decay = self._decays()
        state_dtype = self.conductance.value.dtype
        largest = float(jnp.finfo(state_dtype).max)
        # drive and pool in at least float32 (the update runs in it); the states are
        # rounded to their dtype once, at the end
        compute = jnp.promote_types(state_dtype, jnp.float32)
        drive, pool = DF._divisive_normalization_terms(
            owner,
            x_m,
            self.exponent,
            self._sigma_in(unit),
            self.weights,
            self._call_axis(x_m.ndim),
            mask,
            compute,
            largest / 4,
        )
        gain = jnp.asarray(_units.split(self.gain)[0], compute)
        if gain.size == 1:
            gain = gain.reshape(())
        else:
            gain = gain.reshape(
                tuple(self.num_channels if i == self.feature_axes[0] else 1 for i in range(len(self.in_size)))
            )
        conductance = self.conductance.value.astype(compute)
        if self._tau_pool_ms == 0:
            conductance = pool  # (c - p) * 0 would be nan for an infinite c written by the user
        else:
            conductance = pool + (conductance - pool) * pool_decay
        # |drive / (1 + c)| <= bound; the gain may still carry it out of range: held within half
        # the largest value, so that response - target below cannot overflow
        target = jnp.clip(gain * DF.quotient(drive, 1 + conductance), -largest / 2, largest / 2)
        response = _units.split(self.response.value)[0].astype(compute)
        response = target + (response - target) * jnp.exp(-membrane_step * (1 + conductance))
        self.conductance.value = conductance.astype(state_dtype)
        self.response.value = _units.attach(response.astype(state_dtype), self.gain_unit)
        output = response if mask is None else jnp.where(mask, response, 0)
        return _units.attach(output.astype(state_dtype), self.gain_unit)
