"""Per-sample normalization over chosen axes: LayerNorm and RMSNorm."""

from __future__ import annotations

import brainstate

from . import _units
from . import functional as F
from ._base import _affine_values, _Normalization
from ._states import NormalizationParamState
from ._validation import check_epsilon, check_flag

__all__ = ["LayerNorm", "RMSNorm"]


class _AxisNorm(_Normalization):
    """Statistics over ``reduction_axes`` of each sample, parameters on ``feature_axes``."""

    _use_mean = True

    def _setup_axes(
        self, reduction_axes, feature_axes, epsilon, axis_name, axis_index_groups, use_fast_variance, dtype, param_dtype
    ):
        self.reduction_axes = self._sample_axes("reduction_axes", reduction_axes)
        self.feature_axes = self._sample_axes("feature_axes", feature_axes)
        self.epsilon = check_epsilon(self._owner, epsilon, allow_none=True)
        self._set_common_options(
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        return self._feature_shape(self.feature_axes)

    def _normalize_call(self, x, mask, scale, bias):
        x_m, unit, mask, _ = self._prepare_input(x, mask)
        scale, bias = self._call_affine(x_m.shape, self._params(), scale, bias)
        options = dict(
            reduction_axes=self._x_axes(self.reduction_axes, x_m.ndim),
            epsilon=self.epsilon,
            mask=mask,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            dtype=self.dtype,
        )
        x = _units.attach(x_m, unit)
        if self._use_mean:
            return F.layer_norm(x, scale, bias, use_fast_variance=self.use_fast_variance, **options)
        return F.rms_norm(x, scale, **options)


_UPDATE_DOC = """Normalize ``x`` of shape ``(*batch, *in_size)``.

        Parameters
        ----------
        x : array_like or Quantity
            Any number of leading batch axes (zero included).
        mask : array_like of bool, optional
            Valid positions, broadcastable to ``x`` (e.g. ``(B, T, 1)``).
        scale{bias_name} : array_like or Quantity, optional
            Conditional normalization (AdaLN, FiLM): {what} given at call time,
            broadcastable to ``x`` (e.g. ``(B, 1, C)`` per sample), used in place
            of {the_parameter}; only for a layer built without it
            ({flags}), else ``ValueError``.

        Returns
        -------
        Array
            Same shape as ``x``; dimensionless unless scale/bias carry units.
        """


class LayerNorm(_AxisNorm):
    r"""Layer normalization (Ba et al., 2016).

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}\gamma + \beta

    with statistics per sample over ``reduction_axes``; flax and brainstate
    semantics, with the robust shifted two-pass variance by default.

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape without batch axes.
    reduction_axes : int or sequence of int
        Axes of ``in_size`` to normalize over (negative from the end).
    feature_axes : int or sequence of int
        Axes of ``in_size`` that carry their own scale and bias.
    epsilon : float, Quantity or None
        Added to the variance. None: PyTorch's default, machine epsilon of
        float32 (half and single inputs) or float64.
    use_bias, use_scale : bool
        Learn a bias / a scale.
    bias_init, scale_init : callable or array
        Initial values (0 and 1).
    axis_name, axis_index_groups : optional
        Mapped axis to compute statistics over as well.
    use_fast_variance : bool
        One-pass variance (flax parity); default False.
    dtype : dtype, optional
        Output dtype (default: the input's floating dtype).
    param_dtype : dtype, optional
        Parameter dtype (default ``brainstate.environ.dftype()``).
    param_type : type
        State class of ``self.weight`` (dict with ``'scale'``/``'bias'``).
    name : str, optional

    Raises
    ------
    ValueError
        Axes out of range or repeated, bad epsilon; at call time, wrong input
        shape or a mask that does not broadcast.
    TypeError
        Floating mask.

    References
    ----------
    Ba, Kiros, Hinton. Layer Normalization. arXiv:1607.06450 (2016).

    Examples
    --------
    >>> import jax.numpy as jnp, brainnorm
    >>> ln = brainnorm.LayerNorm(3)
    >>> y = ln(jnp.array([[1e4, 1e4 + 1.0, 1e4 + 2.0]]))
    >>> [round(v, 3) for v in y.ravel().tolist()]
    [-1.225, 0.0, 1.225]
    """

    def __init__(
        self,
        in_size,
        *,
        reduction_axes=-1,
        feature_axes=-1,
        epsilon=1e-6,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init=brainstate.nn.init.ZeroInit(),
        scale_init=brainstate.nn.init.Constant(1.0),
        axis_name=None,
        axis_index_groups=None,
        use_fast_variance: bool = False,
        dtype=None,
        param_dtype=None,
        param_type=NormalizationParamState,
        name=None,
    ):
        super().__init__(in_size, name=name)
        feature_shape = self._setup_axes(
            reduction_axes, feature_axes, epsilon, axis_name, axis_index_groups, use_fast_variance, dtype, param_dtype
        )
        self.use_bias = check_flag(self._owner, "use_bias", use_bias)
        self.use_scale = check_flag(self._owner, "use_scale", use_scale)
        self.bias_init = bias_init
        self.scale_init = scale_init
        self.weight = self._affine_state(
            feature_shape,
            use_scale=self.use_scale,
            use_bias=self.use_bias,
            scale_init=scale_init,
            bias_init=bias_init,
            param_dtype=param_dtype,
            param_type=param_type,
        )

    def _params(self):
        return _affine_values(self.weight)

    def update(self, x, mask=None, *, scale=None, bias=None):
        return self._normalize_call(x, mask, scale, bias)

    update.__doc__ = _UPDATE_DOC.format(
        bias_name=", bias",
        what="``scale`` and ``bias``",
        the_parameter="the learned parameter of that kind",
        flags="``use_scale=False`` / ``use_bias=False``",
    )


class RMSNorm(_AxisNorm):
    r"""Root-mean-square layer normalization (Zhang and Sennrich, 2019).

    .. math:: y = \frac{x}{\sqrt{\mathrm{E}[|x|^2] + \epsilon}}\gamma

    No re-centering and no bias. Equal to PyTorch ``RMSNorm(normalized_shape)``
    when the reduction and feature axes are the trailing
    ``len(normalized_shape)`` axes, and to penzai's ``RMSLayerNorm``.

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape without batch axes.
    reduction_axes, feature_axes : int or sequence of int
        Counted within ``in_size``.
    epsilon : float, Quantity or None
        None: PyTorch's default, machine epsilon of the input's precision.
    use_scale : bool
    scale_init : callable or array
    axis_name, axis_index_groups : optional
    use_fast_variance : bool
        Accepted for brainstate compatibility (RMS statistics have a single
        form).
    dtype, param_dtype : dtype, optional
    param_type : type
        State class of ``self.scale`` (a dict with ``'scale'``, as brainstate).
    name : str, optional

    References
    ----------
    Zhang, Sennrich. Root Mean Square Layer Normalization. NeurIPS 2019.

    Examples
    --------
    >>> import jax.numpy as jnp, brainnorm
    >>> rms = brainnorm.RMSNorm(2, epsilon=1e-12)
    >>> y = rms(jnp.array([3.0, 4.0]))   # rms = sqrt(12.5)
    >>> [round(v, 4) for v in y.tolist()]
    [0.8485, 1.1314]
    """

    _use_mean = False

    def __init__(
        self,
        in_size,
        *,
        reduction_axes=-1,
        feature_axes=-1,
        epsilon=1e-6,
        use_scale: bool = True,
        scale_init=brainstate.nn.init.Constant(1.0),
        axis_name=None,
        axis_index_groups=None,
        use_fast_variance: bool = False,
        dtype=None,
        param_dtype=None,
        param_type=NormalizationParamState,
        name=None,
    ):
        super().__init__(in_size, name=name)
        feature_shape = self._setup_axes(
            reduction_axes, feature_axes, epsilon, axis_name, axis_index_groups, use_fast_variance, dtype, param_dtype
        )
        self.use_scale = check_flag(self._owner, "use_scale", use_scale)
        self.scale_init = scale_init
        self.scale = self._affine_state(
            feature_shape,
            use_scale=self.use_scale,
            use_bias=False,
            scale_init=scale_init,
            bias_init=None,
            param_dtype=param_dtype,
            param_type=param_type,
        )

    def _params(self):
        return _affine_values(self.scale)

    def update(self, x, mask=None, *, scale=None):
        return self._normalize_call(x, mask, scale, None)

    update.__doc__ = _UPDATE_DOC.format(
        bias_name="", what="a ``scale``", the_parameter="the learned scale", flags="``use_scale=False``"
    )
