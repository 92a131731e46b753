"""Temporal batch normalization for spiking networks: BNTT, tdBN, TEBN.

Input layouts
-------------
``step_mode='multi'``: ``(T, *batch, *in_size)``, time-major, as
``brainstate.transform.for_loop`` stacks its outputs.

``step_mode='single'`` (default): ``(*batch, *in_size)``, one call per time
step inside a simulation loop. Layers that depend on the step take its index
from ``update(x, t=...)``, else from ``brainstate.environ.get('i')``. The
loops of brainstate do not set ``'i'`` themselves: wrap the loop body in
``brainstate.environ.context(i=i)`` (``i`` may be traced) or pass ``t=``.

Steps at or past ``num_steps`` reuse the last step's parameters and
statistics. A negative Python index raises ``ValueError``; a traced index is
clipped to ``[0, num_steps - 1]`` (it cannot be checked without a host round
trip).

All three layers share the BatchNorm machinery of
:func:`brainnorm.functional.batch_norm` (running statistics, masks, units,
``axis_name``, train/eval resolution).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import brainstate
import jax.numpy as jnp
import numpy as np

from . import _units
from ._base import _affine_values, _Normalization, _RunningStatistics
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
from ._validation import check_choice, check_positive_int, check_real, check_representable, check_time_index

__all__ = ["BatchNormThroughTime", "ThresholdDependentBatchNorm", "TemporalEffectiveBatchNorm"]


# The options the temporal layers share, each in its own words (rendered on every page that lists them).
_TEMPORAL_PARAMETERS = r"""epsilon : float or Quantity
        Positive constant added to the variance before the square root.
        Default 1e-5.
    momentum : float, array or None
        Weight of the old running value in ``running = momentum * running +
        (1 - momentum) * batch`` (PyTorch's momentum is ``1 - momentum``
        here), in [0, 1]; an array gives one value per channel. None: the
        cumulative average of every batch seen. Default 0.99.
    use_scale : bool
        Whether the layer owns a trainable gain :math:`\gamma`.{scale_note}
    use_bias : bool
        Whether the layer owns a trainable offset :math:`\beta`.{bias_note}
    scale_init : initializer, array or None
        Initial gain: a ``braintools.init`` initializer, any callable taking
        the shape, or an array. None: ones.
    bias_init : initializer, array or None
        Initial offset, in the same forms. None: zeros.
    track_running_stats : bool
        Keep running statistics and use them in evaluation. False: batch
        statistics in training and evaluation alike. Default True.
    unbiased_running_var : bool
        Fold the unbiased batch variance into the running variance, as
        PyTorch does; the normalization uses the biased one. Default False.
    use_running_average : bool, optional
        A fixed mode for every call: True evaluates with the running
        statistics, False trains. None: decided per call by ``update``'s
        argument, then ``brainstate.environ`` key ``fit``, else training.
    axis_name : hashable or tuple of hashable, optional
        Name of a mapped axis whose members pool their statistics exactly.
    axis_index_groups : sequence of sequence of int, optional
        Subgroups of ``axis_name``'s members that pool separately.
    use_fast_variance : bool
        Use the one-pass variance formula (flax and brainstate's) instead of
        the robust shifted two-pass. Default False.
    step_mode : {{'single', 'multi'}}
        ``'multi'``: the input is a whole sequence ``(T, *batch, *in_size)``,
        time-major. ``'single'`` (default): one time step ``(*batch,
        *in_size)`` per call{step_note}.
    dtype : dtype, optional
        Dtype of the output; default the input's floating dtype.
    param_dtype : dtype, optional
        Dtype of parameters and running statistics; default
        ``brainstate.environ.dftype()``.
    param_type : type
        ``brainstate.ParamState`` subclass holding ``{{'scale', 'bias'}}`` as
        :attr:`weight`. Default :class:`NormalizationParamState`.
    mean_type : type
        ``brainstate.State`` subclass, not a ``ParamState``, holding the
        running statistics. Default ``brainstate.ShortTermState``.
    unit : brainunit.Unit, optional
        Unit of the running mean (the variance takes its square), declared up
        front for layers that first see Quantities inside ``jit``.
    name : str, optional
        Module name reported by brainstate."""

_STEP_INDEX_NOTE = ", whose step index comes from ``update(x, t=...)`` or ``brainstate.environ`` key ``'i'``"


def _temporal_doc(doc, *, scale_note="", bias_note="", step_note=_STEP_INDEX_NOTE):
    return doc.replace(
        "{parameters}",
        _TEMPORAL_PARAMETERS.format(scale_note=scale_note, bias_note=bias_note, step_note=step_note),
    )


class _TemporalBatchNorm(_RunningStatistics, _Normalization):
    """Shared construction and input handling of the temporal layers."""

    _per_step_statistics = False
    weight: NormalizationParamState
    running_mean: brainstate.ShortTermState
    running_var: brainstate.ShortTermState
    num_batches_tracked: brainstate.ShortTermState

    def __init__(
        self,
        in_size,
        feature_axis,
        num_steps,
        *,
        epsilon,
        momentum,
        use_scale,
        use_bias,
        scale_init,
        bias_init,
        track_running_stats,
        unbiased_running_var,
        use_running_average,
        axis_name,
        axis_index_groups,
        use_fast_variance,
        step_mode,
        dtype,
        param_dtype,
        param_type,
        mean_type,
        unit,
        name,
    ):
        super().__init__(in_size, name=name)
        owner = self._owner
        if num_steps is None and self._per_step_statistics:
            raise TypeError(f"{owner}: num_steps must be a positive int (one set of statistics per step), got None.")
        self.num_steps = None if num_steps is None else check_positive_int(owner, "num_steps", num_steps)
        self.step_mode = check_choice(owner, "step_mode", step_mode, ("single", "multi"))
        self._setup_statistics(
            feature_axis=feature_axis,
            epsilon=epsilon,
            momentum=momentum,
            use_scale=use_scale,
            use_bias=use_bias,
            scale_init=scale_init,
            bias_init=bias_init,
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
            leading_shape=(self.num_steps,) if self._per_step_statistics else (),
        )

    # -- inputs -------------------------------------------------------------

    def _check_input(self, x, mask):
        x_m, unit, mask, n_batch = self._prepare_input(x, mask)
        if self.step_mode == "multi" and n_batch < 1:
            raise ValueError(
                f"{self._owner}: step_mode='multi' expects input (T, *batch, *in_size) with "
                f"in_size={self.in_size}, got shape {x_m.shape} (no time axis)."
            )
        return x_m, unit, mask, n_batch

    def _step_index(self, t):
        """The time index of a single-step call, clipped to the last step."""
        if t is None:
            t = brainstate.environ.get("i", None)
        if t is None:
            raise ValueError(
                f"{self._owner}: step_mode='single' needs the time index: pass update(x, t=...) or "
                f"wrap the step in brainstate.environ.context(i=step_index) (the loops of brainstate "
                f"do not set 'i' themselves)."
            )
        t = check_time_index(self._owner, t)
        if isinstance(t, int):
            return min(t, self.num_steps - 1)
        return jnp.clip(jnp.asarray(t, jnp.int32), 0, self.num_steps - 1)

    def _mode_and_unit(self, x_m, unit, use_running_average):
        training = self._is_training(use_running_average)
        stats_unit = self._stats_unit(x_m, unit) if self.track_running_stats else unit
        return training, stats_unit

    def _step_momentum(self, batches_tracked, rank):
        """Momentum for per-step statistics of rank ``rank``, ``(steps, ..., *feature_shape)``.

        The layer's own momentum (a number, or one value per channel, which
        broadcasts from the right) as given; ``momentum=None``: the cumulative
        average's ``1 - 1 / (n + 1)``, one value per step from the step's
        counter ``batches_tracked``.
        """
        if self.momentum is not None:
            return self.momentum
        momentum = self._effective_momentum(batches_tracked)
        return jnp.reshape(momentum, (-1,) + (1,) * (rank - 1))

    def _normalize(self, x_m, unit, mask, axes, training, scale, bias, running=None, momentum=None):
        """Batch-normalize ``x_m`` over ``axes``; ``running`` = (mean, var) to use and update."""
        feature = tuple(a for a in range(x_m.ndim) if a not in axes)
        return self._batch_norm(x_m, unit, mask, feature, training, scale, bias, running, momentum)

    def _write(self, new_mean, new_var, batches_tracked=None):
        self.running_mean.value = new_mean
        self.running_var.value = new_var
        if batches_tracked is None:
            batches_tracked = self.num_batches_tracked.value + 1
        self.num_batches_tracked.value = batches_tracked


_BNTT_DOC = r"""Batch normalization through time, BNTT (Kim and Panda, 2021).

    Each time step ``t`` has its own scale :math:`\gamma_t` (no bias, as in
    the paper) and its own running statistics:

    .. math:: y_t = \gamma_t \frac{x_t - \mu_t}{\sqrt{\sigma_t^2 + \epsilon}}

    with :math:`\mu_t, \sigma_t^2` over the batch and the non-feature axes of
    step ``t``. Multi-step and single-step runs over the same data give the
    same outputs and running statistics.

    Call the layer as ``layer(x, mask=None, *, t=None, use_running_average=None)``
    (see :meth:`update`).

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape without time and batch axes.
    num_steps : int
        Number of time steps with their own parameters and statistics; later
        steps reuse the last step's.
    feature_axis : int or sequence of int
        Channel axis counted within ``in_size``. Default ``-1``.
    {parameters}

    Attributes
    ----------
    weight : NormalizationParamState
        Per-step ``{'scale': ...}`` (and ``'bias'`` with ``use_bias``), of
        shape ``(num_steps, *feature_shape)``.
    running_mean : brainstate.ShortTermState
        Running mean per step and channel, ``(num_steps, *feature_shape)``.
    running_var : brainstate.ShortTermState
        Running variance per step and channel, same shape.
    num_batches_tracked : brainstate.ShortTermState
        Training batches seen per step, shape ``(num_steps,)``.

    References
    ----------
    Kim, Panda. Revisiting Batch Normalization for Training Low-Latency Deep
    Spiking Neural Networks From Scratch. Frontiers in Neuroscience (2021).

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, brainnorm
    >>> bntt = brainnorm.BatchNormThroughTime(3, num_steps=4, step_mode='multi')
    >>> with brainstate.environ.context(fit=True):
    ...     y = bntt(jnp.ones((4, 8, 3)))      # (T, B, C)
    >>> bntt.running_mean.value.shape
    (4, 3)
    """


class BatchNormThroughTime(_TemporalBatchNorm):
    __doc__ = _temporal_doc(
        _BNTT_DOC,
        scale_note=" Each step has its own :math:`\\gamma_t`, of shape ``(num_steps, *feature_shape)``. Default True.",
        bias_note=" Default False (BNTT has none); True adds a per-step offset.",
    )

    _per_step_statistics = True

    def __init__(
        self,
        in_size: Size,
        num_steps: int,
        feature_axis: Axes = -1,
        *,
        epsilon: Epsilon = 1e-5,
        momentum: Momentum | None = 0.99,
        use_scale: bool = True,
        use_bias: bool = False,
        scale_init: Initializer | None = None,
        bias_init: Initializer | None = None,
        track_running_stats: bool = True,
        unbiased_running_var: bool = False,
        use_running_average: bool | None = None,
        axis_name: AxisName | None = None,
        axis_index_groups: AxisIndexGroups | None = None,
        use_fast_variance: bool = False,
        step_mode: Literal["single", "multi"] = "single",
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike | None = None,
        param_type: type[NormalizationParamState] = NormalizationParamState,
        mean_type: StateType = brainstate.ShortTermState,
        unit: Unit | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(
            in_size,
            feature_axis,
            num_steps,
            epsilon=epsilon,
            momentum=momentum,
            use_scale=use_scale,
            use_bias=use_bias,
            scale_init=brainstate.nn.init.Constant(1.0) if scale_init is None else scale_init,
            bias_init=brainstate.nn.init.Constant(0.0) if bias_init is None else bias_init,
            track_running_stats=track_running_stats,
            unbiased_running_var=unbiased_running_var,
            use_running_average=use_running_average,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            step_mode=step_mode,
            dtype=dtype,
            param_dtype=param_dtype,
            param_type=param_type,
            mean_type=mean_type,
            unit=unit,
            name=name,
        )

    if TYPE_CHECKING:  # brainstate's Module.__call__ (untyped) forwards to update: its types, for checkers

        def __call__(
            self,
            x: Input,
            mask: ArrayLike | None = None,
            *,
            t: int | ArrayLike | None = None,
            use_running_average: bool | None = None,
        ) -> Array: ...

    def update(
        self,
        x: Input,
        mask: ArrayLike | None = None,
        *,
        t: int | ArrayLike | None = None,
        use_running_average: bool | None = None,
    ) -> Array:
        """Normalize one step (single) or a whole sequence (multi); ``layer(x, ...)`` calls this.

        Parameters
        ----------
        x : array_like or Quantity
            ``(*batch, *in_size)`` for ``step_mode='single'``, or
            ``(T, *batch, *in_size)`` for ``'multi'``.
        mask : array_like of bool, optional
            Valid positions, broadcastable to ``x``; masked-out entries are
            left out of the statistics and of the running-statistic update.
        t : int or Array, optional
            Time index of a single-step call, selecting the step's parameters
            and statistics (default ``brainstate.environ`` key ``'i'``); steps
            past ``num_steps`` use the last. Ignored in multi-step mode.
        use_running_average : bool, optional
            True evaluates with the running statistics, False trains; None
            defers to the constructor, then ``environ['fit']``, else trains.

        Returns
        -------
        jax.Array
            Same shape as ``x``.
        """
        x_m, unit, mask, n_batch = self._check_input(x, mask)
        training, stats_unit = self._mode_and_unit(x_m, unit, use_running_average)
        if self.step_mode == "single":
            return self._single_step(x_m, unit, mask, self._step_index(t), training, stats_unit)
        steps = x_m.shape[0]
        head = min(steps, self.num_steps)
        y_head = self._steps(
            x_m[:head], unit, None if mask is None else _time_slice(mask, x_m.ndim, 0, head), training, stats_unit
        )
        outputs = [y_head]
        for step in range(head, steps):  # past num_steps: the last step's slot, in order
            step_mask = None if mask is None else _time_slice(mask, x_m.ndim, step, step + 1)[0]
            y_t = self._single_step(x_m[step], unit, step_mask, self.num_steps - 1, training, stats_unit)
            outputs.append(_units.split(y_t)[0][None])
        if len(outputs) == 1:
            return y_head
        y_m, y_unit = _units.split(y_head)
        return _units.attach(jnp.concatenate([y_m] + outputs[1:], axis=0), y_unit)

    def _per_sample_axes_of(self, ndim):
        feature = self._x_axes(self.feature_axes, ndim)
        return tuple(a for a in range(ndim) if a not in feature)

    def _single_step(self, x_m, unit, mask, t, training, stats_unit):
        scale, bias = _affine_values(self.weight)
        scale = None if scale is None else scale[t]
        bias = None if bias is None else bias[t]
        axes = self._per_sample_axes_of(x_m.ndim)
        running = momentum = None
        if self.track_running_stats:
            running = (self.running_mean.value[t], self.running_var.value[t])
            momentum = self._effective_momentum(self.num_batches_tracked.value[t])
        y, new_mean, new_var = self._normalize(x_m, unit, mask, axes, training, scale, bias, running, momentum)
        if running is not None and training:
            self._write(
                _set_step(self.running_mean.value, t, new_mean),
                _set_step(self.running_var.value, t, new_var),
                self.num_batches_tracked.value.at[t].add(1),
            )
        return y

    def _steps(self, x_m, unit, mask, training, stats_unit):
        """Steps ``0..T-1`` (``T <= num_steps``) at once: statistics per step."""
        steps = x_m.shape[0]
        n_batch = x_m.ndim - len(self.in_size) - 1
        broadcast = (steps,) + (1,) * n_batch + self._feature_shape(self.feature_axes)
        scale, bias = _affine_values(self.weight)
        scale = None if scale is None else _reshape_q(scale[:steps], broadcast)
        bias = None if bias is None else _reshape_q(bias[:steps], broadcast)
        axes = tuple(a for a in self._per_sample_axes_of(x_m.ndim) if a != 0)
        running = momentum = None
        if self.track_running_stats:
            running = (
                _reshape_q(self.running_mean.value[:steps], broadcast),
                _reshape_q(self.running_var.value[:steps], broadcast),
            )
            momentum = self._step_momentum(self.num_batches_tracked.value[:steps], len(broadcast))
        y, new_mean, new_var = self._normalize(x_m, unit, mask, axes, training, scale, bias, running, momentum)
        if running is not None and training:
            shape = self.running_mean.value.shape[1:]
            # One call trains every step once.
            self._write(
                _set_steps(self.running_mean.value, _reshape_q(new_mean, (steps,) + shape)),
                _set_steps(self.running_var.value, _reshape_q(new_var, (steps,) + shape)),
                self.num_batches_tracked.value.at[:steps].add(1),
            )
        return y


_TDBN_DOC = r"""Threshold-dependent batch normalization, tdBN (Zheng et al., 2021).

    .. math::

        y = \alpha V_{th} \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    In multi-step mode :math:`\mu, \sigma^2` are taken over time, batch and
    the non-feature axes together. In single-step mode they are taken over the
    batch at the current step only (documented difference: the statistics of
    one step, not of the whole window), and the running statistics are
    updated at every step.

    The scale is a learned :math:`\gamma` (initialized to 1) times the fixed
    :math:`\alpha V_{th}`, as in the paper; spikingjelly learns the product
    instead (see the porting guide for the consequence for training). Call
    the layer as ``layer(x, mask=None, *, use_running_average=None)`` (see
    :meth:`update`).

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape without time and batch axes.
    feature_axis : int or sequence of int
        Channel axis counted within ``in_size``. Default ``-1``.
    alpha : float
        Network-dependent factor of the scale (the paper uses 1, or
        :math:`1/\sqrt{2}` before residual additions). Default 1.
    v_th : float
        Firing threshold of the neurons that follow. ``alpha``, ``v_th`` and
        their product must be finite and representable in ``param_dtype``
        (else the scale, and the output, would be ``inf``). Default 1.
    {parameters}

    Attributes
    ----------
    weight : NormalizationParamState
        Trainable ``{'scale': ..., 'bias': ...}`` of the feature shape; the
        scale is :math:`\gamma`, used times ``alpha * v_th``.
    running_mean : brainstate.ShortTermState
        Running mean per channel.
    running_var : brainstate.ShortTermState
        Running variance per channel.
    num_batches_tracked : brainstate.ShortTermState
        Number of training calls taken.

    References
    ----------
    Zheng, Wu, Deng, Hu, Li. Going Deeper With Directly-Trained Larger Spiking
    Neural Networks. AAAI 2021.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, brainnorm
    >>> tdbn = brainnorm.ThresholdDependentBatchNorm(3, v_th=0.5, step_mode='multi')
    >>> x = jnp.arange(24.0).reshape(4, 2, 3)     # (T, B, C)
    >>> with brainstate.environ.context(fit=True):
    ...     y = tdbn(x)
    >>> round(float(y.std()), 3)    # alpha * v_th * unit variance
    0.5
    """


class ThresholdDependentBatchNorm(_TemporalBatchNorm):
    __doc__ = _temporal_doc(
        _TDBN_DOC,
        scale_note=" It multiplies ``alpha * v_th``. Default True.",
        bias_note=" Default True.",
        step_note=" (statistics of the current step's batch; no step index is needed)",
    )

    def __init__(
        self,
        in_size: Size,
        feature_axis: Axes = -1,
        *,
        alpha: float = 1.0,
        v_th: float = 1.0,
        epsilon: Epsilon = 1e-5,
        momentum: Momentum | None = 0.99,
        use_scale: bool = True,
        use_bias: bool = True,
        scale_init: Initializer | None = None,
        bias_init: Initializer | None = None,
        track_running_stats: bool = True,
        unbiased_running_var: bool = False,
        use_running_average: bool | None = None,
        axis_name: AxisName | None = None,
        axis_index_groups: AxisIndexGroups | None = None,
        use_fast_variance: bool = False,
        step_mode: Literal["single", "multi"] = "single",
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike | None = None,
        param_type: type[NormalizationParamState] = NormalizationParamState,
        mean_type: StateType = brainstate.ShortTermState,
        unit: Unit | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(
            in_size,
            feature_axis,
            None,
            epsilon=epsilon,
            momentum=momentum,
            use_scale=use_scale,
            use_bias=use_bias,
            scale_init=brainstate.nn.init.Constant(1.0) if scale_init is None else scale_init,
            bias_init=brainstate.nn.init.Constant(0.0) if bias_init is None else bias_init,
            track_running_stats=track_running_stats,
            unbiased_running_var=unbiased_running_var,
            use_running_average=use_running_average,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            step_mode=step_mode,
            dtype=dtype,
            param_dtype=param_dtype,
            param_type=param_type,
            mean_type=mean_type,
            unit=unit,
            name=name,
        )
        owner = self._owner
        # alpha * v_th multiplies the scale in the parameters' dtype: each and their product must fit it
        dtype = brainstate.environ.dftype() if self.param_dtype is None else self.param_dtype
        self.alpha = check_real(owner, "alpha", alpha, dtype=dtype)
        self.v_th = check_real(owner, "v_th", v_th, dtype=dtype)
        check_representable(owner, "alpha * v_th", self.alpha * self.v_th, dtype)

    def _shared_statistics(self, x, mask, use_running_average, step_weight=None):
        """tdBN normalization ``w * (alpha * v_th * gamma * x_hat + beta)`` over every non-feature axis.

        ``step_weight(x_m)`` gives an output weight ``w`` (TEBN's ``p_t``, broadcastable to ``x``), folded
        into the scale and bias so that the core forms the product (and keeps padding out of its gradient).
        """
        x_m, unit, mask, _ = self._check_input(x, mask)
        training, stats_unit = self._mode_and_unit(x_m, unit, use_running_average)
        feature = self._x_axes(self.feature_axes, x_m.ndim)
        axes = tuple(a for a in range(x_m.ndim) if a not in feature)
        scale, bias = _affine_values(self.weight)
        factor = self.alpha * self.v_th
        scale = factor if scale is None else scale * factor
        if step_weight is not None:
            weight = step_weight(x_m)
            scale = scale * weight
            bias = None if bias is None else _units.attach(_units.split(bias)[0] * weight, _units.split(bias)[1])
        running = (self.running_mean.value, self.running_var.value) if self.track_running_stats else None
        y, new_mean, new_var = self._normalize(x_m, unit, mask, axes, training, scale, bias, running)
        if running is not None and training:
            self._write(new_mean, new_var)
        return y, x_m

    if TYPE_CHECKING:  # brainstate's Module.__call__ (untyped) forwards to update: its types, for checkers

        def __call__(
            self, x: Input, mask: ArrayLike | None = None, *, use_running_average: bool | None = None
        ) -> Array: ...

    def update(self, x: Input, mask: ArrayLike | None = None, *, use_running_average: bool | None = None) -> Array:
        """Normalize ``x``: ``(T, *batch, *in_size)`` (multi) or ``(*batch, *in_size)`` (single).

        ``layer(x, ...)`` calls this.

        Parameters
        ----------
        x : array_like or Quantity
            A whole sequence, time-major, in multi-step mode; one step in
            single-step mode (no time index is needed: the statistics are
            shared by every step).
        mask : array_like of bool, optional
            Valid positions, broadcastable to ``x``.
        use_running_average : bool, optional
            True evaluates with the running statistics, False trains; None
            defers to the constructor, then ``environ['fit']``, else trains.

        Returns
        -------
        jax.Array
            Same shape as ``x``.
        """
        return self._shared_statistics(x, mask, use_running_average)[0]


_TEBN_DOC = r"""Temporal effective batch normalization, TEBN (Duan et al., 2022).

    tdBN statistics shared over time, then a trainable per-step weight:

    .. math:: y_t = p_t \left(\gamma \frac{x_t - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta\right)

    ``p`` has shape ``(num_steps,)``, starts at 1 and is a trainable
    ``brainstate.ParamState``. In single-step mode the statistics are those of
    the current step's batch (as for tdBN) and ``p_t`` is taken at the step
    index from ``t=`` or ``environ['i']``.

    Call the layer as ``layer(x, mask=None, *, t=None, use_running_average=None)``
    (see :meth:`update`). TEBN has no ``alpha`` or ``v_th`` (both are 1).

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape without time and batch axes.
    num_steps : int
        Length of ``p``; steps past it reuse the last step's weight.
    feature_axis : int or sequence of int
        Channel axis counted within ``in_size``. Default ``-1``.
    {parameters}

    Attributes
    ----------
    p : brainstate.ParamState
        Per-step weights, shape ``(num_steps,)``.
    weight : NormalizationParamState
        Trainable ``{'scale': ..., 'bias': ...}`` of the feature shape.
    running_mean : brainstate.ShortTermState
        Running mean per channel, shared by every step.
    running_var : brainstate.ShortTermState
        Running variance per channel, shared by every step.

    References
    ----------
    Duan, Ding, Chen, Yu, Huang. Temporal Effective Batch Normalization in
    Spiking Neural Networks. NeurIPS 2022.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, brainnorm
    >>> tebn = brainnorm.TemporalEffectiveBatchNorm(3, num_steps=4, step_mode='multi')
    >>> tebn.p.value.tolist()
    [1.0, 1.0, 1.0, 1.0]
    """


class TemporalEffectiveBatchNorm(ThresholdDependentBatchNorm):
    __doc__ = _temporal_doc(_TEBN_DOC, scale_note=" Default True.", bias_note=" Default True.")

    def __init__(
        self,
        in_size: Size,
        num_steps: int,
        feature_axis: Axes = -1,
        *,
        epsilon: Epsilon = 1e-5,
        momentum: Momentum | None = 0.99,
        use_scale: bool = True,
        use_bias: bool = True,
        scale_init: Initializer | None = None,
        bias_init: Initializer | None = None,
        track_running_stats: bool = True,
        unbiased_running_var: bool = False,
        use_running_average: bool | None = None,
        axis_name: AxisName | None = None,
        axis_index_groups: AxisIndexGroups | None = None,
        use_fast_variance: bool = False,
        step_mode: Literal["single", "multi"] = "single",
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike | None = None,
        param_type: type[NormalizationParamState] = NormalizationParamState,
        mean_type: StateType = brainstate.ShortTermState,
        unit: Unit | None = None,
        name: str | None = None,
    ) -> None:
        # explicit keywords (no **kwargs): an unknown or misspelt option fails with this class's name
        num_steps = check_positive_int(type(self).__name__, "num_steps", num_steps)
        super().__init__(
            in_size,
            feature_axis,
            epsilon=epsilon,
            momentum=momentum,
            use_scale=use_scale,
            use_bias=use_bias,
            scale_init=scale_init,
            bias_init=bias_init,
            track_running_stats=track_running_stats,
            unbiased_running_var=unbiased_running_var,
            use_running_average=use_running_average,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            step_mode=step_mode,
            dtype=dtype,
            param_dtype=param_dtype,
            param_type=param_type,
            mean_type=mean_type,
            unit=unit,
            name=name,
        )
        self.num_steps = num_steps
        dtype = brainstate.environ.dftype() if self.param_dtype is None else self.param_dtype
        self.p = brainstate.ParamState(jnp.ones((self.num_steps,), dtype))

    if TYPE_CHECKING:  # brainstate's Module.__call__ (untyped) forwards to update: its types, for checkers

        def __call__(
            self,
            x: Input,
            mask: ArrayLike | None = None,
            *,
            t: int | ArrayLike | None = None,
            use_running_average: bool | None = None,
        ) -> Array: ...

    def update(
        self,
        x: Input,
        mask: ArrayLike | None = None,
        *,
        t: int | ArrayLike | None = None,
        use_running_average: bool | None = None,
    ) -> Array:
        """Normalize one step (single) or a whole sequence (multi), then weight by ``p_t``.

        ``layer(x, ...)`` calls this.

        Parameters
        ----------
        x : array_like or Quantity
            ``(*batch, *in_size)`` for ``step_mode='single'``, or
            ``(T, *batch, *in_size)`` for ``'multi'``.
        mask : array_like of bool, optional
            Valid positions, broadcastable to ``x``.
        t : int or Array, optional
            Time index of a single-step call, selecting ``p_t`` (default
            ``brainstate.environ`` key ``'i'``); ignored in multi-step mode.
        use_running_average : bool, optional
            True evaluates with the running statistics, False trains; None
            defers to the constructor, then ``environ['fit']``, else trains.

        Returns
        -------
        jax.Array
            Same shape as ``x``.
        """
        step = self._step_index(t) if self.step_mode == "single" else None

        def step_weight(x_m):
            if step is not None:
                return self.p.value[step]
            steps = x_m.shape[0]
            index = np.minimum(np.arange(steps), self.num_steps - 1)
            return self.p.value[index].reshape((steps,) + (1,) * (x_m.ndim - 1))

        return self._shared_statistics(x, mask, use_running_average, step_weight)[0]


def _time_slice(mask, ndim, start, stop):
    """Steps ``start:stop`` of a mask broadcastable to a ``(T, ...)`` input of rank ``ndim``."""
    mask = jnp.reshape(mask, (1,) * (ndim - mask.ndim) + mask.shape)
    return mask if mask.shape[0] == 1 else mask[start:stop]


def _reshape_q(value, shape):
    value_m, unit = _units.split(value)
    return _units.attach(jnp.reshape(value_m, shape), unit)


def _set_step(full, t, value):
    """``full`` with slot ``t`` replaced, in the unit of ``value`` (adopted on a first call with units)."""
    full_m = _units.split(full)[0]
    value_m, unit = _units.split(value)
    return _units.attach(full_m.at[t].set(jnp.reshape(value_m, full_m.shape[1:])), unit)


def _set_steps(full, values):
    """``full`` with its first ``len(values)`` slots replaced, in the unit of ``values``."""
    full_m = _units.split(full)[0]
    values_m, unit = _units.split(values)
    return _units.attach(full_m.at[: values_m.shape[0]].set(values_m), unit)
