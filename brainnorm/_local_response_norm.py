"""Local response normalization across neighbouring channels."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _units
from . import functional as F
from ._base import _Normalization
from ._typing import ArrayLike, DTypeLike, Input, Output, Size
from ._validation import check_dtype, check_local_response, check_positive_int

__all__ = ["LocalResponseNorm"]


class LocalResponseNorm(_Normalization):
    r"""Local response normalization (Krizhevsky et al., 2012), PyTorch semantics.

    .. math::

        b_c = a_c \left(k + \frac{\alpha}{n}
        \sum_{c' = c - \lfloor n/2 \rfloor}^{c + \lfloor (n-1)/2 \rfloor} a_{c'}^2\right)^{-\beta}

    over a window of ``n = size`` channels, zero-padded ``size // 2`` before
    and ``(size - 1) // 2`` after. Statistics never cross positions, so the
    layer has no parameters and no running state. Call the layer as
    ``layer(x, mask=None)`` (see :meth:`update`).

    ``alpha``, ``beta`` and ``k`` must be finite and representable in the
    statistics dtype (float32, float64 with ``jax_enable_x64``), so that the
    base ``k + alpha / n * sum`` stays positive: PyTorch accepts a negative ``alpha``
    or ``k`` and returns nan where the base turns negative, and with ``k =
    0`` an all-zero window (common after a ReLU) gives ``0 * 0^(-beta)``,
    nan. The gain ``(k + alpha / n * sum)^(-beta)`` must be representable
    in the statistics dtype for every window of inputs in [-1, 1]: with
    ``beta > 0`` its largest value is ``k^(-beta)`` (an all-zero window),
    which overflows for ``k < 1`` and a large ``beta`` (``k=0.5,
    beta=200`` in float32); then the output is at most ``|x| * max(1,
    k^(-beta))`` in magnitude, finite for any moderate input. A negative
    ``beta`` amplifies ``x`` by a power of its window's energy, ``(k +
    alpha)^(-beta)`` for a window of ones, which must be representable
    (``beta=-6e16`` is refused); the gain still grows without bound with
    the input, so large inputs can overflow.

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape without batch axes.
    size : int
        Number of channels in the window.
    alpha : float
        Multiplier of the window's mean square, ``>= 0``. Default 1e-4.
    beta : float
        Exponent of the divisor; negative values (allowed, as in PyTorch)
        amplify instead. Default 0.75.
    k : float
        Additive constant of the divisor's base, ``>= 0`` and ``> 0`` when
        ``beta > 0``. Default 1.0.
    feature_axis : int
        Channel axis counted within ``in_size``, along which the window runs.
        Default ``-1``.
    dtype : dtype, optional
        Dtype of the output; default the input's floating dtype.
    name : str, optional
        Module name reported by brainstate.

    Raises
    ------
    ValueError
        ``size`` not positive, ``alpha`` or ``k`` negative, ``k == 0`` with
        ``beta > 0``, a gain ``k^(-beta)`` or ``(k + alpha)^(-beta)`` that
        overflows the statistics dtype, a value that is not finite or
        overflows float32, ``in_size`` empty,
        ``feature_axis`` out of range or naming several axes.
    TypeError
        An option of the wrong type (``alpha='big'``, ``size=2.0``).

    References
    ----------
    Krizhevsky, Sutskever, Hinton. ImageNet Classification with Deep
    Convolutional Neural Networks. NeurIPS 2012.

    Examples
    --------
    >>> import jax.numpy as jnp, brainnorm
    >>> lrn = brainnorm.LocalResponseNorm(2, size=1, alpha=3.0, beta=0.5, k=1.0)
    >>> lrn(jnp.array([0.0, 1.0])).tolist()          # 1 / sqrt(1 + 3 * 1^2)
    [0.0, 0.5]
    """

    def __init__(
        self,
        in_size: Size,
        size: int,
        *,
        alpha: float = 1e-4,
        beta: float = 0.75,
        k: float = 1.0,
        feature_axis: int = -1,
        dtype: DTypeLike | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(in_size, name=name)
        if not self.in_size:
            raise ValueError(
                f"{self._owner}: in_size must have at least one entry (the channel axis that the window "
                f"runs along), got {in_size!r}."
            )
        self.size = check_positive_int(self._owner, "size", size)
        self.alpha, self.beta, self.k = check_local_response(self._owner, alpha, beta, k)
        feature = self._sample_axes("feature_axis", feature_axis)
        if len(feature) != 1:
            raise ValueError(f"{self._owner}: feature_axis must name one axis, got {feature_axis!r}.")
        self.feature_axes = feature
        self.dtype = check_dtype(self._owner, "dtype", dtype)

    if TYPE_CHECKING:  # brainstate's Module.__call__ (untyped) forwards to update: its types, for checkers

        def __call__(self, x: Input, mask: ArrayLike | None = None) -> Output: ...

    def update(self, x: Input, mask: ArrayLike | None = None) -> Output:
        """Normalize ``x`` of shape ``(*batch, *in_size)``; ``layer(x, ...)`` calls this.

        Parameters
        ----------
        x : array_like or Quantity
            A Quantity keeps its unit (``alpha`` is read in its inverse square).
        mask : array_like of bool, optional
            Positions where it is False are left out of the window sums (read
            as 0); a ``(B, T, 1)`` padding mask leaves valid positions unchanged.

        Returns
        -------
        jax.Array or Quantity
            Same shape as ``x``, in the unit of ``x``.
        """
        x_m, unit, mask, _ = self._prepare_input(x, mask)
        feature = self._x_axes(self.feature_axes, x_m.ndim)[0]
        return F.local_response_norm(
            _units.attach(x_m, unit),
            self.size,
            alpha=self.alpha,
            beta=self.beta,
            k=self.k,
            feature_axis=feature,
            mask=mask,
            dtype=self.dtype,
        )
