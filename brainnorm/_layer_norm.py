"""Per-sample normalization over chosen axes: LayerNorm and RMSNorm."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _units
from . import functional as F
from ._base import _affine_values, _default_init, _Normalization
from ._states import NormalizationParamState
from ._typing import Array, ArrayLike, Axes, AxisIndexGroups, AxisName, DTypeLike, Epsilon, Initializer, Input, Size
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


_UPDATE_DOC = """Normalize ``x`` of shape ``(*batch, *in_size)``; ``layer(x, ...)`` calls this.

        Parameters
        ----------
        x : array_like or Quantity
            Input whose trailing axes are ``in_size``; every leading axis (zero
            or more) is a batch axis, normalized independently.
        mask : array_like of bool, optional
            Valid positions, broadcastable to ``x`` (e.g. ``(B, T, 1)`` for
            padded sequences). Masked-out positions are left out of the
            statistics and still transformed with them.
        scale{bias_name} : array_like or Quantity, optional
            Conditional normalization (AdaLN, FiLM): {what} given at call time,
            broadcastable to ``x`` (e.g. ``(B, 1, C)`` per sample), used in place
            of {the_parameter}; only for a layer built without it
            ({flags}), else ``ValueError``.

        Returns
        -------
        jax.Array
            Same shape as ``x``; dimensionless (a plain array) unless the scale
            or bias carry units, in which case it has theirs.
        """


class LayerNorm(_AxisNorm):
    r"""Layer normalization (Ba et al., 2016).

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}\gamma + \beta

    with statistics per sample over ``reduction_axes``; flax and brainstate
    semantics, with the robust shifted two-pass variance by default. The
    first three parameters are positional in brainstate's order,
    ``LayerNorm(in_size, reduction_axes, feature_axes)``; the rest are
    keyword-only. Call the layer as ``layer(x, mask=None, *, scale=None,
    bias=None)`` (see :meth:`update`).

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape without batch axes (an int ``n`` means ``(n,)``).
    reduction_axes : int or sequence of int
        Axes of ``in_size`` whose entries share one mean and variance per
        sample (negative counts from the end). Default ``-1``, the last axis.
    feature_axes : int or sequence of int
        Axes of ``in_size`` along which scale and bias have one entry per
        position; the parameters have size 1 on every other axis. Default
        ``-1``.
    epsilon : float, Quantity or None
        Positive constant added to the variance before the square root.
        None selects PyTorch's default, the machine epsilon of float32 for
        half and single precision inputs, of float64 for double. Default
        1e-6.
    use_bias : bool
        Whether the layer owns a trainable additive offset :math:`\beta`.
        Without it, a bias can still be given per call. Default True.
    use_scale : bool
        Whether the layer owns a trainable multiplicative gain
        :math:`\gamma`. Without it, a scale can still be given per call.
        Default True.
    bias_init : initializer, array or None
        Initial value of :math:`\beta`: a ``braintools.init`` (or
        ``brainstate.nn.init``) initializer, any callable taking the shape,
        or an array. None: zeros.
    scale_init : initializer, array or None
        Initial value of :math:`\gamma`, in the same forms. None: ones.
    axis_name : hashable or tuple of hashable, optional
        Name of a mapped axis (``vmap``, ``pmap``, ``shard_map``) whose
        members pool their statistics, as one larger sample would.
    axis_index_groups : sequence of sequence of int, optional
        Subgroups of ``axis_name``'s members that pool separately; needs
        ``axis_name``.
    use_fast_variance : bool
        Use the one-pass :math:`\mathrm{E}[x^2] - \mathrm{E}[x]^2` (flax and
        brainstate's formula) instead of the robust shifted two-pass.
        Default False.
    dtype : dtype, optional
        Dtype of the output; default the input's floating dtype.
    param_dtype : dtype, optional
        Dtype of scale and bias; default ``brainstate.environ.dftype()``.
    param_type : type
        ``brainstate.ParamState`` subclass that holds ``{'scale', 'bias'}``
        as :attr:`weight`. Default :class:`NormalizationParamState`.
    name : str, optional
        Module name reported by brainstate.

    Attributes
    ----------
    weight : NormalizationParamState
        Trainable ``{'scale': ..., 'bias': ...}`` (the entries enabled), of
        shape ``in_size`` with 1 at non-feature axes; None when neither
        ``use_scale`` nor ``use_bias`` is set.

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
    >>> brainnorm.LayerNorm((4, 8), (-2, -1)).weight.value['scale'].shape   # brainstate's positions
    (1, 8)
    """

    weight: NormalizationParamState

    def __init__(
        self,
        in_size: Size,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        *,
        epsilon: Epsilon | None = 1e-6,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer | None = None,
        scale_init: Initializer | None = None,
        axis_name: AxisName | None = None,
        axis_index_groups: AxisIndexGroups | None = None,
        use_fast_variance: bool = False,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike | None = None,
        param_type: type[NormalizationParamState] = NormalizationParamState,
        name: str | None = None,
    ) -> None:
        super().__init__(in_size, name=name)
        feature_shape = self._setup_axes(
            reduction_axes, feature_axes, epsilon, axis_name, axis_index_groups, use_fast_variance, dtype, param_dtype
        )
        self.use_bias = check_flag(self._owner, "use_bias", use_bias)
        self.use_scale = check_flag(self._owner, "use_scale", use_scale)
        self.bias_init = bias_init = _default_init(bias_init, 0.0)
        self.scale_init = scale_init = _default_init(scale_init, 1.0)
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

    def update(
        self, x: Input, mask: ArrayLike | None = None, *, scale: Input | None = None, bias: Input | None = None
    ) -> Array:
        return self._normalize_call(x, mask, scale, bias)

    update.__doc__ = _UPDATE_DOC.format(
        bias_name=", bias",
        what="``scale`` and ``bias``",
        the_parameter="the learned parameter of that kind",
        flags="``use_scale=False`` / ``use_bias=False``",
    )

    if TYPE_CHECKING:  # brainstate's Module.__call__ (untyped) forwards to update: its types, for checkers

        def __call__(
            self, x: Input, mask: ArrayLike | None = None, *, scale: Input | None = None, bias: Input | None = None
        ) -> Array: ...


class RMSNorm(_AxisNorm):
    r"""Root-mean-square layer normalization (Zhang and Sennrich, 2019).

    .. math:: y = \frac{x}{\sqrt{\mathrm{E}[|x|^2] + \epsilon}}\gamma

    No re-centering and no bias. Equal to PyTorch ``RMSNorm(normalized_shape)``
    when the reduction and feature axes are the trailing
    ``len(normalized_shape)`` axes, and to penzai's ``RMSLayerNorm``. As in
    brainstate, only ``in_size`` is positional. Call the layer as
    ``layer(x, mask=None, *, scale=None)`` (see :meth:`update`).

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape without batch axes (an int ``n`` means ``(n,)``).
    epsilon : float, Quantity or None
        Positive constant added to the mean square before the square root.
        None selects PyTorch's default, the machine epsilon of the input's
        precision (float32 for half inputs). Default 1e-6.
    use_scale : bool
        Whether the layer owns a trainable gain :math:`\gamma`. Without it, a
        scale can still be given per call. Default True.
    scale_init : initializer, array or None
        Initial value of :math:`\gamma`: a ``braintools.init`` initializer,
        any callable taking the shape, or an array. None: ones.
    reduction_axes : int or sequence of int
        Axes of ``in_size`` whose mean square is taken per sample. Default
        ``-1``.
    feature_axes : int or sequence of int
        Axes of ``in_size`` along which the scale has one entry per position.
        Default ``-1``.
    axis_name : hashable or tuple of hashable, optional
        Name of a mapped axis whose members pool their statistics.
    axis_index_groups : sequence of sequence of int, optional
        Subgroups of ``axis_name``'s members that pool separately.
    use_fast_variance : bool
        Accepted for brainstate compatibility and ignored: a mean square has
        a single form.
    dtype : dtype, optional
        Dtype of the output; default the input's floating dtype.
    param_dtype : dtype, optional
        Dtype of the scale; default ``brainstate.environ.dftype()``.
    param_type : type
        ``brainstate.ParamState`` subclass holding ``{'scale'}`` as
        :attr:`scale` (brainstate's attribute name). Default
        :class:`NormalizationParamState`.
    name : str, optional
        Module name reported by brainstate.

    Attributes
    ----------
    scale : NormalizationParamState
        Trainable ``{'scale': ...}``; None when ``use_scale=False``.

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
    scale: NormalizationParamState

    def __init__(
        self,
        in_size: Size,
        *,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        epsilon: Epsilon | None = 1e-6,
        use_scale: bool = True,
        scale_init: Initializer | None = None,
        axis_name: AxisName | None = None,
        axis_index_groups: AxisIndexGroups | None = None,
        use_fast_variance: bool = False,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike | None = None,
        param_type: type[NormalizationParamState] = NormalizationParamState,
        name: str | None = None,
    ) -> None:
        super().__init__(in_size, name=name)
        feature_shape = self._setup_axes(
            reduction_axes, feature_axes, epsilon, axis_name, axis_index_groups, use_fast_variance, dtype, param_dtype
        )
        self.use_scale = check_flag(self._owner, "use_scale", use_scale)
        self.scale_init = scale_init = _default_init(scale_init, 1.0)
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

    def update(self, x: Input, mask: ArrayLike | None = None, *, scale: Input | None = None) -> Array:
        return self._normalize_call(x, mask, scale, None)

    update.__doc__ = _UPDATE_DOC.format(
        bias_name="", what="a ``scale``", the_parameter="the learned scale", flags="``use_scale=False``"
    )

    if TYPE_CHECKING:  # brainstate's Module.__call__ (untyped) forwards to update: its types, for checkers

        def __call__(self, x: Input, mask: ArrayLike | None = None, *, scale: Input | None = None) -> Array: ...
