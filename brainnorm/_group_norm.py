"""Per-sample normalization over channel groups: GroupNorm and InstanceNorm."""

from __future__ import annotations

from typing import TYPE_CHECKING

import brainstate

from . import _units
from . import functional as F
from ._base import _affine_values, _default_init, _Normalization, _pick, _RunningStatistics
from ._states import NormalizationParamState
from ._typing import (
    Array,
    ArrayLike,
    Axes,
    AxisIndexGroups,
    AxisName,
    DTypeLike,
    Epsilon,
    Initializer,
    Input,
    Momentum,
    Size,
    StateType,
    Unit,
)
from ._validation import check_epsilon, check_flag, check_groups

__all__ = ["GroupNorm", "InstanceNorm"]


class GroupNorm(_Normalization):
    r"""Group normalization (Wu and He, 2018).

    The channels along ``feature_axis`` are split into ``num_groups`` groups of
    ``group_size`` channels;

    .. math::

        y = \frac{x - \mathrm{E}_g[x]}{\sqrt{\mathrm{Var}_g[x] + \epsilon}}\gamma + \beta

    with statistics per sample and group over the group's channels and every
    other axis of ``in_size`` (or over ``reduction_axes``). Every leading axis
    of the input is a batch axis, so ``(B, T, C)`` sequences and unbatched
    samples are normalized per sample (flax.nnx and brainstate 0.5.4 repeat
    the statistics along axis 1, which is wrong for such inputs). Equal to
    PyTorch ``GroupNorm`` after moving channels.

    The first four parameters are positional in brainstate's order,
    ``GroupNorm(in_size, feature_axis, num_groups, group_size)``. Call the
    layer as ``layer(x, mask=None, *, scale=None, bias=None)`` (see
    :meth:`update`).

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape without batch axes, of any rank (e.g. ``(H, W, C)``).
    feature_axis : int
        Channel axis counted within ``in_size``, the one split into groups.
        Default ``-1``.
    num_groups : int or None
        Number of channel groups; must divide the number of channels. None
        when the groups are given by ``group_size`` instead. Default 32.
    group_size : int or None
        Number of channels per group, the alternative to ``num_groups`` (give
        exactly one of the two). Default None.
    epsilon : float or Quantity
        Positive constant added to each group's variance before the square
        root. Default 1e-6.
    use_bias : bool
        Whether the layer owns a trainable per-channel offset :math:`\beta`.
        Default True.
    use_scale : bool
        Whether the layer owns a trainable per-channel gain :math:`\gamma`.
        Default True.
    bias_init : initializer, array or None
        Initial offset: a ``braintools.init`` initializer, any callable taking
        the shape, or an array. None: zeros.
    scale_init : initializer, array or None
        Initial gain, in the same forms. None: ones.
    reduction_axes : int or sequence of int, optional
        Axes of ``in_size`` each group's statistics run over; must include
        ``feature_axis``. None: every axis of ``in_size``.
    axis_name : hashable or tuple of hashable, optional
        Name of a mapped axis whose members pool their group statistics.
    axis_index_groups : sequence of sequence of int, optional
        Subgroups of ``axis_name``'s members that pool separately.
    use_fast_variance : bool
        Use the one-pass :math:`\mathrm{E}[x^2] - \mathrm{E}[x]^2` (flax and
        brainstate's formula) instead of the robust shifted two-pass.
        Default False.
    dtype : dtype, optional
        Dtype of the output; default the input's floating dtype.
    param_dtype : dtype, optional
        Dtype of scale and bias; default ``brainstate.environ.dftype()``.
    param_type : type
        ``brainstate.ParamState`` subclass holding ``{'scale', 'bias'}`` as
        :attr:`weight`. Default :class:`NormalizationParamState`.
    name : str, optional
        Module name reported by brainstate.

    Attributes
    ----------
    weight : NormalizationParamState
        Trainable ``{'scale': ..., 'bias': ...}`` with one entry per channel;
        None when neither is learned.

    Raises
    ------
    ValueError
        Both or neither of ``num_groups``/``group_size``, a group count that
        does not divide the channels, axes out of range, a ``reduction_axes``
        without the feature axis.

    References
    ----------
    Wu, He. Group Normalization. ECCV 2018.

    Examples
    --------
    >>> import jax.numpy as jnp, brainnorm
    >>> gn = brainnorm.GroupNorm((5, 4), num_groups=2)
    >>> gn(jnp.ones((3, 5, 4))).shape   # (B, T, C) sequences
    (3, 5, 4)
    """

    weight: NormalizationParamState

    def __init__(
        self,
        in_size: Size,
        feature_axis: int = -1,
        num_groups: int | None = 32,
        group_size: int | None = None,
        *,
        epsilon: Epsilon = 1e-6,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer | None = None,
        scale_init: Initializer | None = None,
        reduction_axes: Axes | None = None,
        axis_name: AxisName | None = None,
        axis_index_groups: AxisIndexGroups | None = None,
        use_fast_variance: bool = False,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike | None = None,
        param_type: type[NormalizationParamState] = NormalizationParamState,
        name: str | None = None,
    ) -> None:
        super().__init__(in_size, name=name)
        owner = self._owner
        feature = self._sample_axes("feature_axis", feature_axis)
        if len(feature) != 1:
            raise ValueError(f"{owner}: feature_axis must name one axis, got {feature_axis!r}.")
        self.feature_axes = feature
        self.feature_axis = feature[0]
        if reduction_axes is None:
            self.reduction_axes = tuple(range(len(self._size)))
        else:
            self.reduction_axes = self._sample_axes("reduction_axes", reduction_axes)
            if self.feature_axis not in self.reduction_axes:
                raise ValueError(
                    f"{owner}: reduction_axes must include feature_axis={feature_axis!r} (the group's "
                    f"channels), got {reduction_axes!r}."
                )
        self.num_groups, self.group_size = check_groups(owner, self._size[self.feature_axis], num_groups, group_size)
        self.epsilon = check_epsilon(owner, epsilon)
        self._set_common_options(
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.use_bias = check_flag(owner, "use_bias", use_bias)
        self.use_scale = check_flag(owner, "use_scale", use_scale)
        self.bias_init = bias_init = _default_init(bias_init, 0.0)
        self.scale_init = scale_init = _default_init(scale_init, 1.0)
        self.weight = self._affine_state(
            self._feature_shape(self.feature_axes),
            use_scale=self.use_scale,
            use_bias=self.use_bias,
            scale_init=scale_init,
            bias_init=bias_init,
            param_dtype=param_dtype,
            param_type=param_type,
        )

    def update(
        self, x: Input, mask: ArrayLike | None = None, *, scale: Input | None = None, bias: Input | None = None
    ) -> Array:
        """Normalize ``x`` of shape ``(*batch, *in_size)``; ``layer(x, ...)`` calls this.

        Parameters
        ----------
        x : array_like or Quantity
            Input whose trailing axes are ``in_size``; every leading axis (zero
            or more) is a batch axis, each sample normalized on its own.
        mask : array_like of bool, optional
            Valid positions, broadcastable to ``x``; a ``(B, T, 1)`` mask works
            for ``(B, T, C)``. Masked-out entries are left out of the
            statistics and still transformed with them.
        scale : array_like or Quantity, optional
            Conditional normalization (AdaLN, FiLM): a gain given at call time,
            broadcastable to ``x`` (e.g. ``(B, 1, C)`` per sample); only for a
            layer built with ``use_scale=False``, else ``ValueError``.
        bias : array_like or Quantity, optional
            An offset given at call time, likewise; only for a layer built
            with ``use_bias=False``.

        Returns
        -------
        jax.Array
            Same shape as ``x``; dimensionless unless the scale or bias carry
            units.
        """
        x_m, unit, mask, _ = self._prepare_input(x, mask)
        scale, bias = self._call_affine(x_m.shape, _affine_values(self.weight), scale, bias)
        n_batch = x_m.ndim - len(self._size)
        return F.group_norm(
            _units.attach(x_m, unit),
            self.num_groups,
            scale,
            bias,
            feature_axis=self._x_axes(self.feature_axes, x_m.ndim)[0],
            reduction_axes=self._x_axes(self.reduction_axes, x_m.ndim),
            epsilon=self.epsilon,
            mask=mask,
            batch_axes=tuple(range(n_batch)),
            use_fast_variance=self.use_fast_variance,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            dtype=self.dtype,
        )

    if TYPE_CHECKING:  # brainstate's Module.__call__ (untyped) forwards to update: its types, for checkers

        def __call__(
            self, x: Input, mask: ArrayLike | None = None, *, scale: Input | None = None, bias: Input | None = None
        ) -> Array: ...


class InstanceNorm(_RunningStatistics, _Normalization):
    r"""Instance normalization (Ulyanov et al., 2016).

    .. math::

        y = \frac{x - \mathrm{E}_{s,c}[x]}{\sqrt{\mathrm{Var}_{s,c}[x] + \epsilon}}\gamma + \beta

    with statistics per sample ``s`` and channel ``c`` over every non-feature
    axis of ``in_size``; equal to ``GroupNorm(group_size=1)``.

    With ``track_running_stats=True`` (PyTorch semantics) training also
    updates running statistics with the batch average of the instance
    statistics (instances without any valid element are left out), and
    evaluation normalizes with them. ``momentum`` and ``unbiased_running_var``
    are as for :class:`BatchNorm1d` (PyTorch's InstanceNorm uses the unbiased
    instance variance: pass ``unbiased_running_var=True`` for parity).

    Call the layer as ``layer(x, mask=None, *, use_running_average=None,
    scale=None, bias=None)`` (see :meth:`update`).

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape without batch axes; needs at least one axis besides
        the feature axis.
    feature_axis : int or sequence of int
        Channel axis counted within ``in_size``; each channel of each sample
        gets its own statistics. Default ``-1``.
    epsilon : float or Quantity
        Positive constant added to the variance before the square root.
        Default 1e-5.
    use_scale : bool
        Whether the layer owns a trainable per-channel gain :math:`\gamma`.
        Default True.
    use_bias : bool
        Whether the layer owns a trainable per-channel offset :math:`\beta`.
        Default True.
    scale_init : initializer, array or None
        Initial gain: a ``braintools.init`` initializer, any callable taking
        the shape, or an array. None: ones.
    bias_init : initializer, array or None
        Initial offset, in the same forms. None: zeros.
    scale_initializer : initializer, array or None
        brainstate's spelling of ``scale_init``; give at most one of the two.
    bias_initializer : initializer, array or None
        brainstate's spelling of ``bias_init``; give at most one of the two.
    track_running_stats : bool
        Keep running averages of the instance statistics and normalize with
        them in evaluation (PyTorch's option). Default False.
    momentum : float, array or None
        Weight of the old running value in ``running = momentum * running +
        (1 - momentum) * batch``, in [0, 1]; None: cumulative average.
        Default 0.99.
    unbiased_running_var : bool
        Fold the unbiased instance variance into the running variance
        (PyTorch's InstanceNorm does). Default False.
    use_running_average : bool, optional
        A fixed mode: True evaluates with the running statistics, False
        trains; None decides per call.
    axis_name : hashable or tuple of hashable, optional
        Name of a mapped batch axis over which the running statistics are
        averaged (the instance statistics themselves are per sample).
    axis_index_groups : sequence of sequence of int, optional
        Subgroups of ``axis_name``'s members that average separately.
    use_fast_variance : bool
        Use the one-pass variance formula instead of the robust shifted
        two-pass. Default False.
    dtype : dtype, optional
        Dtype of the output; default the input's floating dtype.
    param_dtype : dtype, optional
        Dtype of parameters and running statistics; default
        ``brainstate.environ.dftype()``.
    param_type : type
        ``brainstate.ParamState`` subclass holding ``{'scale', 'bias'}`` as
        :attr:`weight`. Default :class:`NormalizationParamState`.
    mean_type : type
        ``brainstate.State`` subclass, not a ``ParamState``, holding the
        running statistics. Default ``brainstate.ShortTermState``.
    unit : brainunit.Unit, optional
        Unit of the running mean (the variance takes its square), declared up
        front for layers that first see Quantities inside ``jit``.
    name : str, optional
        Module name reported by brainstate.

    Attributes
    ----------
    weight : NormalizationParamState
        Trainable ``{'scale': ..., 'bias': ...}``, one entry per channel.
    running_mean : brainstate.ShortTermState
        Running mean per channel; None unless ``track_running_stats``.
    running_var : brainstate.ShortTermState
        Running variance per channel; None unless ``track_running_stats``.

    References
    ----------
    Ulyanov, Vedaldi, Lempitsky. Instance Normalization: The Missing
    Ingredient for Fast Stylization. arXiv:1607.08022 (2016).

    Examples
    --------
    >>> import jax.numpy as jnp, brainnorm
    >>> norm = brainnorm.InstanceNorm((2, 2), epsilon=1e-12)
    >>> norm(jnp.array([[[1., 10.], [3., 30.]]])).round(3).tolist()
    [[[-1.0, -1.0], [1.0, 1.0]]]
    """

    weight: NormalizationParamState
    running_mean: brainstate.ShortTermState
    running_var: brainstate.ShortTermState
    num_batches_tracked: brainstate.ShortTermState

    def __init__(
        self,
        in_size: Size,
        feature_axis: Axes = -1,
        *,
        epsilon: Epsilon = 1e-5,
        use_scale: bool = True,
        use_bias: bool = True,
        scale_init: Initializer | None = None,
        bias_init: Initializer | None = None,
        scale_initializer: Initializer | None = None,
        bias_initializer: Initializer | None = None,
        track_running_stats: bool = False,
        momentum: Momentum | None = 0.99,
        unbiased_running_var: bool = False,
        use_running_average: bool | None = None,
        axis_name: AxisName | None = None,
        axis_index_groups: AxisIndexGroups | None = None,
        use_fast_variance: bool = False,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike | None = None,
        param_type: type[NormalizationParamState] = NormalizationParamState,
        mean_type: StateType = brainstate.ShortTermState,
        unit: Unit | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(in_size, name=name)
        owner = self._owner
        self._setup_statistics(
            feature_axis=feature_axis,
            epsilon=epsilon,
            momentum=momentum,
            use_scale=use_scale,
            use_bias=use_bias,
            scale_init=_pick(
                owner,
                "scale_init",
                scale_init,
                "scale_initializer",
                scale_initializer,
                brainstate.nn.init.Constant(1.0),
            ),
            bias_init=_pick(
                owner, "bias_init", bias_init, "bias_initializer", bias_initializer, brainstate.nn.init.Constant(0.0)
            ),
            track_running_stats=track_running_stats,
            unbiased_running_var=unbiased_running_var,
            use_running_average=use_running_average,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            dtype=dtype,
            param_dtype=param_dtype,
            param_type=param_type,
            mean_type=mean_type,
            unit=unit,
        )
        self.reduction_axes = tuple(a for a in range(len(self._size)) if a not in self.feature_axes)
        if not self.reduction_axes:
            raise ValueError(
                f"{owner}: in_size must have an axis besides feature_axis to compute instance "
                f"statistics over, got in_size={self.in_size} with feature_axis={feature_axis!r}."
            )

    def update(
        self,
        x: Input,
        mask: ArrayLike | None = None,
        *,
        use_running_average: bool | None = None,
        scale: Input | None = None,
        bias: Input | None = None,
    ) -> Array:
        """Normalize ``x`` of shape ``(*batch, *in_size)``; ``layer(x, ...)`` calls this.

        Parameters
        ----------
        x : array_like or Quantity
            Input whose trailing axes are ``in_size``; every leading axis is a
            batch axis.
        mask : array_like of bool, optional
            Valid positions, broadcastable to ``x``.
        use_running_average : bool, optional
            True normalizes with the running statistics, False with the
            instance statistics (updating the running ones); only meaningful
            with ``track_running_stats=True``.
        scale : array_like or Quantity, optional
            A gain given at call time, broadcastable to ``x``; only for a layer
            built with ``use_scale=False``, else ``ValueError``.
        bias : array_like or Quantity, optional
            An offset given at call time; only for a layer built with
            ``use_bias=False``.

        Returns
        -------
        jax.Array
            Same shape as ``x``.
        """
        x_m, unit, mask, n_batch = self._prepare_input(x, mask)
        scale, bias = self._call_affine(x_m.shape, _affine_values(self.weight), scale, bias)
        training = self._is_training(use_running_average)
        options = dict(
            feature_axis=self._x_axes(self.feature_axes, x_m.ndim),
            epsilon=self.epsilon,
            mask=mask,
            batch_axes=tuple(range(n_batch)),
            use_fast_variance=self.use_fast_variance,
            dtype=self.dtype,
        )
        if not self.track_running_stats:
            return F.instance_norm(_units.attach(x_m, unit), scale, bias, **options)
        self._stats_unit(x_m, unit)  # clear errors for units that do not fit, before anything runs
        y, new_mean, new_var = F.instance_norm(
            _units.attach(x_m, unit),
            scale,
            bias,
            running_mean=self.running_mean.value,
            running_var=self.running_var.value,
            training=training,
            momentum=self._effective_momentum(),
            unbiased_running_var=self.unbiased_running_var,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            **options,
        )
        if training:
            self.running_mean.value = new_mean
            self.running_var.value = new_var
            self.num_batches_tracked.value = self.num_batches_tracked.value + 1
        return y

    if TYPE_CHECKING:  # brainstate's Module.__call__ (untyped) forwards to update: its types, for checkers

        def __call__(
            self,
            x: Input,
            mask: ArrayLike | None = None,
            *,
            use_running_average: bool | None = None,
            scale: Input | None = None,
            bias: Input | None = None,
        ) -> Array: ...
