"""Local response normalization across neighbouring channels."""

from __future__ import annotations

from . import _units
from . import functional as F
from ._base import _Normalization
from ._validation import check_dtype, check_positive_int, check_real

__all__ = ["LocalResponseNorm"]


class LocalResponseNorm(_Normalization):
    r"""Local response normalization (Krizhevsky et al., 2012), PyTorch semantics.

    .. math::

        b_c = a_c \left(k + \frac{\alpha}{n}
        \sum_{c' = c - \lfloor n/2 \rfloor}^{c + \lfloor (n-1)/2 \rfloor} a_{c'}^2\right)^{-\beta}

    over a window of ``n = size`` channels, zero-padded ``size // 2`` before
    and ``(size - 1) // 2`` after. Statistics never cross positions, so the
    layer has no parameters and no running state.

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape without batch axes.
    size : int
        Number of channels in the window.
    alpha, beta, k : float
        Defaults 1e-4, 0.75, 1.0.
    feature_axis : int
        Channel axis counted within ``in_size``.
    name : str, optional

    References
    ----------
    Krizhevsky, Sutskever, Hinton. ImageNet Classification with Deep
    Convolutional Neural Networks. NeurIPS 2012.

    Examples
    --------
    >>> import jax.numpy as jnp, brainnorm
    >>> lrn = brainnorm.LocalResponseNorm(2, size=1, alpha=1.0, beta=1.0, k=0.0)
    >>> lrn(jnp.array([1.0, 2.0])).tolist()
    [1.0, 0.5]
    """

    def __init__(self, in_size, size, *, alpha=1e-4, beta=0.75, k=1.0, feature_axis=-1, dtype=None, name=None):
        super().__init__(in_size, name=name)
        self.size = check_positive_int(self._owner, "size", size)
        self.alpha = check_real(self._owner, "alpha", alpha)
        self.beta = check_real(self._owner, "beta", beta)
        self.k = check_real(self._owner, "k", k)
        feature = self._sample_axes("feature_axis", feature_axis)
        if len(feature) != 1:
            raise ValueError(f"{self._owner}: feature_axis must name one axis, got {feature_axis!r}.")
        self.feature_axes = feature
        self.dtype = check_dtype(self._owner, "dtype", dtype)

    def update(self, x, mask=None):
        """Normalize ``x`` of shape ``(*batch, *in_size)``.

        Parameters
        ----------
        x : array_like or Quantity
            A Quantity keeps its unit (``alpha`` is read in its inverse square).
        mask : array_like of bool, optional
            Positions where it is False are left out of the window sums (read
            as 0); a ``(B, T, 1)`` padding mask leaves valid positions unchanged.

        Returns
        -------
        Array or Quantity
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
