"""Batch normalization layers (BatchNorm0d/1d/2d/3d) and batch renormalization (BatchRenorm)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import brainstate
import numpy as np

from . import _units
from . import functional as F
from ._base import _affine_values, _Normalization, _pick, _RunningStatistics
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
from ._validation import check_flag, check_real

__all__ = ["BatchNorm0d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchRenorm"]


class _BatchNorm(_RunningStatistics, _Normalization):
    """Shared construction and call of the batch-statistics layers; ``num_spatial_dims`` None: any rank 1-4."""

    num_spatial_dims: int | None = None
    weight: NormalizationParamState
    running_mean: brainstate.ShortTermState
    running_var: brainstate.ShortTermState
    num_batches_tracked: brainstate.ShortTermState

    def __init__(
        self,
        in_size: Size,
        feature_axis: Axes = -1,
        *,
        track_running_stats: bool = True,
        epsilon: Epsilon = 1e-5,
        momentum: Momentum | None = 0.99,
        affine: bool = True,
        use_scale: bool | None = None,
        use_bias: bool | None = None,
        bias_initializer: Initializer | None = None,
        scale_initializer: Initializer | None = None,
        bias_init: Initializer | None = None,
        scale_init: Initializer | None = None,
        axis_name: AxisName | None = None,
        axis_index_groups: AxisIndexGroups | None = None,
        use_fast_variance: bool = False,
        unbiased_running_var: bool = False,
        use_running_average: bool | None = None,
        name: str | None = None,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike | None = None,
        param_type: type[NormalizationParamState] = NormalizationParamState,
        mean_type: StateType = brainstate.ShortTermState,
        unit: Unit | None = None,
    ) -> None:
        super().__init__(in_size, name=name)
        owner = self._owner
        if self.num_spatial_dims is None:
            if not 1 <= len(self._size) <= 4:
                raise ValueError(
                    f"{owner}: in_size must have 1 to 4 entries (up to 3 spatial dims and the channels), "
                    f"got {self.in_size}."
                )
        elif len(self._size) != self.num_spatial_dims + 1:
            raise ValueError(
                f"{owner}: in_size must have {self.num_spatial_dims + 1} entries (spatial dims and channels), "
                f"got {self.in_size}."
            )
        self.affine = check_flag(owner, "affine", affine)
        self._setup_statistics(
            feature_axis=feature_axis,
            epsilon=epsilon,
            momentum=momentum,
            use_scale=self.affine if use_scale is None else use_scale,
            use_bias=self.affine if use_bias is None else use_bias,
            scale_init=_pick(
                owner,
                "scale_initializer",
                scale_initializer,
                "scale_init",
                scale_init,
                brainstate.nn.init.Constant(1.0),
            ),
            bias_init=_pick(
                owner, "bias_initializer", bias_initializer, "bias_init", bias_init, brainstate.nn.init.Constant(0.0)
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

        In training, normalizes with the batch statistics and updates the
        running statistics (when tracked); in evaluation, normalizes with the
        running statistics and writes nothing.

        Parameters
        ----------
        x : array_like or Quantity
            Input whose trailing axes are ``in_size``; every leading axis (zero
            or more) is a batch axis pooled into the statistics.
        mask : array_like of bool, optional
            Valid positions, broadcastable to ``x`` (e.g. ``(B, T, 1)``);
            masked-out entries are left out of the statistics and of the
            running-statistic update.
        use_running_average : bool, optional
            True evaluates with the running statistics, False trains; None
            defers to the constructor's ``use_running_average``, then to
            ``brainstate.environ`` key ``fit``, else trains.
        scale : array_like or Quantity, optional
            Conditional normalization (FiLM): a gain given at call time,
            broadcastable to ``x`` (e.g. ``(B, 1, C)`` per sample); only for a
            layer built with ``use_scale=False`` (or ``affine=False``), else
            ``ValueError``.
        bias : array_like or Quantity, optional
            An offset given at call time, likewise; only for a layer built
            with ``use_bias=False`` (or ``affine=False``).

        Returns
        -------
        jax.Array
            Same shape as ``x``; dimensionless unless the scale or bias carry
            units.
        """
        x_m, unit, mask, n_batch = self._prepare_input(x, mask)
        training = self._is_training(use_running_average)
        scale, bias = self._call_affine(x_m.shape, _affine_values(self.weight), scale, bias)
        running = None
        if self.track_running_stats:
            self._stats_unit(x_m, unit)  # clear errors for units that do not fit, before anything runs
            running = (self.running_mean.value, self.running_var.value)
        y, new_mean, new_var = self._normalize_batch(
            x_m, unit, mask, self._x_axes(self.feature_axes, x_m.ndim), training, scale, bias, running
        )
        if running is not None and training:
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

    def _normalize_batch(self, x_m, unit, mask, feature_axes, training, scale, bias, running):
        return self._batch_norm(x_m, unit, mask, feature_axes, training, scale, bias, running)


_CALL_DOC = """Call the layer as ``layer(x, mask=None, *, use_running_average=None, scale=None, bias=None)``
    (brainstate's ``Module.__call__`` runs :meth:`update`): ``x`` has shape
    ``(*batch, *in_size)`` with any number of batch axes, ``mask`` marks the
    valid entries, ``use_running_average`` picks the mode of this call, and
    ``scale``/``bias`` are call-time affine values for a layer built without
    its own."""

# The options every batch-statistics layer shares, after ``in_size`` and ``feature_axis``; each in its own words,
# rendered on every page that lists them (BatchNorm0d-3d and BatchRenorm).
_SHARED_PARAMETERS = r"""track_running_stats : bool
        Keep running statistics (mean, variance, batch counter) and use them
        in evaluation. False: batch statistics in training and evaluation
        alike, nothing stored. Default True.
    epsilon : float or Quantity
        Positive constant added to the variance before the square root, in
        the squared unit of the statistics for Quantity inputs. Default 1e-5.
    momentum : float, array or None
        Weight of the old running value in the update ``running = momentum *
        running + (1 - momentum) * batch`` (PyTorch's momentum is ``1 -
        momentum`` here), in [0, 1]. An array gives one value per channel and
        must broadcast to the feature shape. None: the cumulative average of
        every batch seen, as PyTorch's ``momentum=None``. Default 0.99.
    affine : bool
        brainstate's switch for both trainable affine parameters, the gain
        :math:`\gamma` and the offset :math:`\beta`. Default True.
    use_scale : bool, optional
        Own a trainable gain :math:`\gamma` or not, overriding ``affine`` for
        the gain alone; None follows ``affine``.
    use_bias : bool, optional
        Own a trainable offset :math:`\beta` or not, overriding ``affine`` for
        the offset alone; None follows ``affine``.
    bias_initializer : initializer, array or None
        Initial offset (brainstate's keyword): a ``braintools.init``
        initializer, any callable taking the shape, or an array. None: zeros.
    scale_initializer : initializer, array or None
        Initial gain (brainstate's keyword), in the same forms. None: ones.
    bias_init : initializer, array or None
        flax's spelling of ``bias_initializer``; give at most one of the two.
    scale_init : initializer, array or None
        flax's spelling of ``scale_initializer``; give at most one of the two.
    axis_name : hashable or tuple of hashable, optional
        Name of a mapped axis (``vmap``, ``pmap``, ``shard_map``) whose
        members pool their statistics exactly: sums and valid counts are
        combined across it, so unequal masks are weighted correctly.
    axis_index_groups : sequence of sequence of int, optional
        Subgroups of ``axis_name``'s members that pool separately; needs
        ``axis_name``.
    use_fast_variance : bool
        Use the one-pass :math:`\mathrm{E}[x^2] - \mathrm{E}[x]^2` (flax and
        brainstate's formula) instead of the robust shifted two-pass.
        Default False.
    unbiased_running_var : bool
        Fold the unbiased batch variance, times ``n / (n - 1)``, into the
        running variance, as PyTorch does; the normalization itself always
        uses the biased variance. Default False.
    use_running_average : bool, optional
        A fixed mode for every call: True evaluates with the running
        statistics, False trains. None: decided per call by ``update``'s
        argument, then ``brainstate.environ`` key ``fit``, else training.
    name : str, optional
        Module name reported by brainstate.
    dtype : dtype, optional
        Dtype of the output; default the input's floating dtype.
    param_dtype : dtype, optional
        Dtype of the parameters and running statistics; default
        ``brainstate.environ.dftype()``.
    param_type : type
        ``brainstate.ParamState`` subclass holding ``{'scale', 'bias'}`` as
        :attr:`weight`. Default :class:`NormalizationParamState`.
    mean_type : type
        ``brainstate.State`` subclass, not a ``ParamState``, holding the
        running statistics. Default ``brainstate.ShortTermState``.
    unit : brainunit.Unit, optional
        Unit of the running mean (the variance takes its square), declared up
        front for layers that first see Quantities inside ``jit``. Without it,
        the first eager training call with a Quantity sets the unit."""

_SHARED_ATTRIBUTES = """weight : NormalizationParamState
        Trainable ``{'scale': ..., 'bias': ...}`` (the entries enabled), of the
        feature shape: ``in_size`` with 1 at the non-feature axes. None when
        neither a scale nor a bias is learned.
    running_mean : brainstate.ShortTermState
        Running mean, of the feature shape; a Quantity once the layer has a
        unit (input in another compatible unit is converted to it; an
        incompatible or missing unit raises and writes nothing). None when
        ``track_running_stats=False``.
    running_var : brainstate.ShortTermState
        Running variance, of the feature shape, in the squared unit. None
        when ``track_running_stats=False``.
    num_batches_tracked : brainstate.ShortTermState
        Number of training steps taken (an int32 scalar)."""

_BATCH_NORM_DOC = r"""{rank} batch normalization (Ioffe and Szegedy, 2015).

    .. math::

        y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}}\gamma + \beta

    Statistics per channel over every batch axis and every non-feature axis of
    ``in_size``. In training the running statistics are updated as
    ``running = momentum * running + (1 - momentum) * batch`` (brainstate and
    flax convention; PyTorch's ``momentum`` is ``1 - momentum`` here). The
    mode is chosen per call: ``update(use_running_average=...)``, then the
    constructor's ``use_running_average``, then ``brainstate.environ`` key
    ``fit`` (True: training), else training.

    {call}

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape without batch axes, {in_rank} entries ({layout}).
    feature_axis : int or sequence of int
        Channel axis counted within ``in_size`` (``0``: channels first);
        statistics and parameters are per position along it. Default ``-1``.
    {shared}

    Attributes
    ----------
    {attributes}

    Raises
    ------
    ValueError
        Wrong ``in_size`` rank, axes out of range, bad epsilon, momentum out of
        [0, 1] or an array momentum that does not broadcast to the feature
        shape; at call time, input whose trailing shape is not ``in_size``, or
        a mask that does not broadcast.
    TypeError
        An option of the wrong type (``affine='False'``, ``unit='mV'``, a
        ``mean_type`` that is a ``ParamState``); at call time a floating mask.

    References
    ----------
    Ioffe, Szegedy. Batch Normalization: Accelerating Deep Network Training by
    Reducing Internal Covariate Shift. ICML 2015.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, brainnorm
    >>> bn = brainnorm.{name}({example_size})
    >>> x = jnp.arange(2 * {example_numel}, dtype=jnp.float32).reshape((2,) + bn.in_size)
    >>> with brainstate.environ.context(fit=True):
    ...     y = bn(x)
    >>> y.shape == x.shape, int(bn.num_batches_tracked.value)
    (True, 1)
    """


def _doc(name, dims, layout, example_size, example_numel):
    return _BATCH_NORM_DOC.format(
        rank=f"{dims}-D" if dims else "0-D (feature vector)",
        in_rank=dims + 1,
        layout=layout,
        name=name,
        example_size=example_size,
        example_numel=example_numel,
        call=_CALL_DOC,
        shared=_SHARED_PARAMETERS,
        attributes=_SHARED_ATTRIBUTES,
    )


class BatchNorm0d(_BatchNorm):
    __doc__ = _doc("BatchNorm0d", 0, "``(C,)``", "3", 3)
    num_spatial_dims = 0


class BatchNorm1d(_BatchNorm):
    __doc__ = _doc("BatchNorm1d", 1, "``(L, C)`` channels last", "(4, 3)", 12)
    num_spatial_dims = 1


class BatchNorm2d(_BatchNorm):
    __doc__ = _doc("BatchNorm2d", 2, "``(H, W, C)`` channels last", "(2, 2, 3)", 12)
    num_spatial_dims = 2


class BatchNorm3d(_BatchNorm):
    __doc__ = _doc("BatchNorm3d", 3, "``(D, H, W, C)`` channels last", "(2, 2, 2, 3)", 24)
    num_spatial_dims = 3


_BATCH_RENORM_DOC = r"""Batch renormalization (Ioffe, 2017) for any rank of ``in_size``.

    In training, with the batch statistics :math:`\mu_B, \sigma_B^2`,
    :math:`s_B = \sqrt{\sigma_B^2 + \epsilon}` and
    :math:`s = \sqrt{\hat\sigma^2 + \epsilon}` of the running variance:

    .. math::

        r = \mathrm{clip}(s_B / s, 1/r_{max}, r_{max}), \quad
        d = \mathrm{clip}((\mu_B - \hat\mu) / s, -d_{max}, d_{max}), \quad
        y = \gamma \left(\frac{x - \mu_B}{s_B} r + d\right) + \beta

    with ``r`` and ``d`` held constant under differentiation (the gradient is
    that of a batch normalization with a fixed affine correction). While
    ``num_batches_tracked < warmup_steps`` (counted before this step),
    ``r = 1`` and ``d = 0``: batch normalization. The running statistics are
    updated as in :class:`BatchNorm1d`; evaluation normalizes with them.
    Channels without a valid entry normalize to the bias.

    {call}

    One class for every rank (``in_size`` of 1 to 4 entries, channels last by
    default), with every option of the BatchNorm layers (masks,
    ``axis_name``, units, ``unbiased_running_var``, ``momentum=None``, ...).
    It equals torchrl's ``BatchRenorm1d(smooth=False)`` with ``momentum = 1 -
    torchrl_momentum`` and ``unbiased_running_var=True`` during torchrl's
    first ``2 * warmup_steps`` steps; torchrl's warm-up factor
    ``num_batches_tracked // warmup_steps`` keeps growing after that (its
    counter is never clamped) and scales the correction by 2, 3, ...; here it
    stays 1.

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape without batch axes: ``(C,)``, ``(L, C)``, ``(H, W, C)``
        or ``(D, H, W, C)``.
    feature_axis : int or sequence of int
        Channel axis counted within ``in_size`` (``0``: channels first);
        statistics and parameters are per position along it. Default ``-1``.
    r_max : float
        Largest correction of the scale, ``>= 1``: ``r`` is clipped to
        ``[1/r_max, r_max]``. Default 3.
    d_max : float
        Largest correction of the shift, ``>= 0``: ``d`` is clipped to
        ``[-d_max, d_max]``. Default 5.
    warmup_steps : int
        Number of training steps of plain batch normalization (``r = 1``,
        ``d = 0``) before the corrections start. Default 0.
    {shared}

    Attributes
    ----------
    {attributes}

    References
    ----------
    Ioffe. Batch Renormalization: Towards Reducing Minibatch Dependence in
    Batch-Normalized Models. NeurIPS 2017.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, brainnorm
    >>> brn = brainnorm.BatchRenorm(3, warmup_steps=100)
    >>> with brainstate.environ.context(fit=True):
    ...     y = brn(jnp.arange(12.0).reshape(4, 3))
    >>> y.shape, int(brn.num_batches_tracked.value)
    ((4, 3), 1)
    """


class BatchRenorm(_BatchNorm):
    __doc__ = (
        _BATCH_RENORM_DOC.replace("{call}", _CALL_DOC)
        .replace("{shared}", _SHARED_PARAMETERS)
        .replace("{attributes}", _SHARED_ATTRIBUTES)
    )

    num_spatial_dims = None

    def __init__(
        self,
        in_size: Size,
        feature_axis: Axes = -1,
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 0,
        track_running_stats: bool = True,
        epsilon: Epsilon = 1e-5,
        momentum: Momentum | None = 0.99,
        affine: bool = True,
        use_scale: bool | None = None,
        use_bias: bool | None = None,
        bias_initializer: Initializer | None = None,
        scale_initializer: Initializer | None = None,
        bias_init: Initializer | None = None,
        scale_init: Initializer | None = None,
        axis_name: AxisName | None = None,
        axis_index_groups: AxisIndexGroups | None = None,
        use_fast_variance: bool = False,
        unbiased_running_var: bool = False,
        use_running_average: bool | None = None,
        name: str | None = None,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike | None = None,
        param_type: type[NormalizationParamState] = NormalizationParamState,
        mean_type: StateType = brainstate.ShortTermState,
        unit: Unit | None = None,
    ) -> None:
        super().__init__(
            in_size,
            feature_axis,
            track_running_stats=track_running_stats,
            epsilon=epsilon,
            momentum=momentum,
            affine=affine,
            use_scale=use_scale,
            use_bias=use_bias,
            bias_initializer=bias_initializer,
            scale_initializer=scale_initializer,
            bias_init=bias_init,
            scale_init=scale_init,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            unbiased_running_var=unbiased_running_var,
            use_running_average=use_running_average,
            name=name,
            dtype=dtype,
            param_dtype=param_dtype,
            param_type=param_type,
            mean_type=mean_type,
            unit=unit,
        )
        owner = self._owner
        self.r_max = check_real(owner, "r_max", r_max)
        if self.r_max < 1:
            raise ValueError(f"{owner}: r_max must be a finite real number >= 1, got {r_max!r}.")
        self.d_max = check_real(owner, "d_max", d_max)
        if self.d_max < 0:
            raise ValueError(f"{owner}: d_max must be a finite real number >= 0, got {d_max!r}.")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, np.integer)):
            raise TypeError(
                f"{owner}: warmup_steps must be a non-negative int, got {type(warmup_steps).__name__} {warmup_steps!r}."
            )
        if warmup_steps < 0:
            raise ValueError(f"{owner}: warmup_steps must be a non-negative int, got {warmup_steps!r}.")
        self.warmup_steps = int(warmup_steps)

    def _normalize_batch(self, x_m, unit, mask, feature_axes, training, scale, bias, running):
        if running is None:  # no running statistics: no correction, batch normalization
            return self._batch_norm(x_m, unit, mask, feature_axes, training, scale, bias, running)
        active = self.num_batches_tracked.value >= self.warmup_steps
        return F.batch_renorm(
            _units.attach(x_m, unit),
            running[0],
            running[1],
            scale,
            bias,
            training=training,
            r_max=self.r_max,
            d_max=self.d_max,
            renormalize=active,
            feature_axes=feature_axes,
            momentum=self._effective_momentum(),
            epsilon=self.epsilon,
            mask=mask,
            unbiased_running_var=self.unbiased_running_var,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            use_fast_variance=self.use_fast_variance,
            dtype=self.dtype,
        )
