"""Per-sample normalization over channel groups: GroupNorm and InstanceNorm."""

from __future__ import annotations

import brainstate

from . import _units
from . import functional as F
from ._base import _affine_values, _Normalization, _pick, _RunningStatistics
from ._states import NormalizationParamState
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

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape without batch axes, of any rank (e.g. ``(H, W, C)``).
    feature_axis : int
        Channel axis counted within ``in_size``.
    num_groups : int or None
        Number of groups; must divide the channels. Pass None to give
        ``group_size`` instead.
    group_size : int, optional
        Channels per group.
    epsilon : float or Quantity
        Default 1e-6.
    use_bias, use_scale : bool
    bias_init, scale_init : callable or array
    reduction_axes : int or sequence of int, optional
        Axes of ``in_size`` to reduce; must include ``feature_axis``. Default:
        all of them.
    axis_name, axis_index_groups : optional
    use_fast_variance : bool
    dtype, param_dtype : dtype, optional
    param_type : type
        State class of ``self.weight``.
    name : str, optional

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

    def __init__(
        self,
        in_size,
        feature_axis=-1,
        num_groups=32,
        *,
        group_size=None,
        epsilon=1e-6,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init=brainstate.nn.init.ZeroInit(),
        scale_init=brainstate.nn.init.Constant(1.0),
        reduction_axes=None,
        axis_name=None,
        axis_index_groups=None,
        use_fast_variance: bool = False,
        dtype=None,
        param_dtype=None,
        param_type=NormalizationParamState,
        name=None,
    ):
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
        self.bias_init = bias_init
        self.scale_init = scale_init
        self.weight = self._affine_state(
            self._feature_shape(self.feature_axes),
            use_scale=self.use_scale,
            use_bias=self.use_bias,
            scale_init=scale_init,
            bias_init=bias_init,
            param_dtype=param_dtype,
            param_type=param_type,
        )

    def update(self, x, mask=None, *, scale=None, bias=None):
        """Normalize ``x`` of shape ``(*batch, *in_size)``.

        Parameters
        ----------
        x : array_like or Quantity
        mask : array_like of bool, optional
            Broadcastable to ``x``; a ``(B, T, 1)`` mask works for ``(B, T, C)``.
        scale, bias : array_like or Quantity, optional
            Conditional normalization (AdaLN, FiLM): values given at call time,
            broadcastable to ``x`` (e.g. ``(B, 1, C)`` per sample), used in place
            of the learned parameter of that kind; only for a layer built
            without it (``use_scale=False`` / ``use_bias=False``), else
            ``ValueError``.

        Returns
        -------
        Array
        """
        x_m, unit, mask, _ = self._prepare_input(x, mask)
        scale, bias = self._call_affine(x_m.shape, _affine_values(self.weight), scale, bias)
        n_batch = x_m.ndim - len(self.in_size)
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

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape; needs at least one non-feature axis.
    feature_axis : int or sequence of int
        Channel axis counted within ``in_size``.
    epsilon : float or Quantity
        Default 1e-5.
    use_scale, use_bias : bool
        Default True.
    scale_init, bias_init : callable or array
    track_running_stats : bool
        Default False.
    momentum : float or None
        Default 0.99 (flax convention); None: cumulative average.
    unbiased_running_var : bool
    use_running_average : bool, optional
    axis_name, axis_index_groups : optional
        Mapped batch axis over which the running statistics are averaged
        (instance statistics themselves are per sample).
    dtype, param_dtype : dtype, optional
    param_type, mean_type : type
    unit : brainunit.Unit, optional
        Unit of the running mean (as for :class:`BatchNorm1d`).
    name : str, optional

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

    def __init__(
        self,
        in_size,
        feature_axis=-1,
        *,
        epsilon=1e-5,
        use_scale: bool = True,
        use_bias: bool = True,
        scale_init=None,
        bias_init=None,
        scale_initializer=None,
        bias_initializer=None,
        track_running_stats: bool = False,
        momentum=0.99,
        unbiased_running_var: bool = False,
        use_running_average=None,
        axis_name=None,
        axis_index_groups=None,
        use_fast_variance: bool = False,
        dtype=None,
        param_dtype=None,
        param_type=NormalizationParamState,
        mean_type=brainstate.ShortTermState,
        unit=None,
        name=None,
    ):
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

    def update(self, x, mask=None, *, use_running_average=None, scale=None, bias=None):
        """Normalize ``x`` of shape ``(*batch, *in_size)``.

        Parameters
        ----------
        x : array_like or Quantity
        mask : array_like of bool, optional
        use_running_average : bool, optional
            Only meaningful with ``track_running_stats=True``.
        scale, bias : array_like or Quantity, optional
            Conditional normalization (AdaLN, FiLM): values given at call time,
            broadcastable to ``x`` (e.g. ``(B, 1, C)`` per sample), used in place
            of the learned parameter of that kind; only for a layer built
            without it (``use_scale=False`` / ``use_bias=False``), else
            ``ValueError``.

        Returns
        -------
        Array
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
