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

import brainstate
import jax.numpy as jnp
import numpy as np

from . import _units
from ._base import _affine_values, _Normalization, _RunningStatistics
from ._states import NormalizationParamState
from ._validation import check_choice, check_positive_int, check_real, check_representable, check_time_index

__all__ = ["BatchNormThroughTime", "ThresholdDependentBatchNorm", "TemporalEffectiveBatchNorm"]


class _TemporalBatchNorm(_RunningStatistics, _Normalization):
    """Shared construction and input handling of the temporal layers."""

    _per_step_statistics = False

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


class BatchNormThroughTime(_TemporalBatchNorm):
    r"""Batch normalization through time, BNTT (Kim and Panda, 2021).

    Each time step ``t`` has its own scale :math:`\gamma_t` (no bias, as in
    the paper) and its own running statistics:

    .. math:: y_t = \gamma_t \frac{x_t - \mu_t}{\sqrt{\sigma_t^2 + \epsilon}}

    with :math:`\mu_t, \sigma_t^2` over the batch and the non-feature axes of
    step ``t``. Multi-step and single-step runs over the same data give the
    same outputs and running statistics.

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape without time and batch axes.
    num_steps : int
        Number of time steps with their own parameters and statistics; later
        steps reuse the last.
    feature_axis : int or sequence of int
        Channel axis counted within ``in_size``.
    epsilon, momentum, track_running_stats, unbiased_running_var, use_running_average
        As for :class:`BatchNorm1d` (momentum: weight of the old value).
    use_scale : bool
        Learn :math:`\gamma_t` (shape ``(num_steps, *feature_shape)``).
    use_bias : bool
        Default False (BNTT has none); True adds a per-step bias.
    scale_init, bias_init : callable or array
    axis_name, axis_index_groups : optional
    step_mode : {'single', 'multi'}
        ``'multi'``: input ``(T, *batch, *in_size)``; ``'single'``: one step,
        index from ``t=`` or ``environ['i']``.
    dtype, param_dtype, param_type, mean_type, unit, name
        As for :class:`BatchNorm1d`.

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

    _per_step_statistics = True

    def __init__(
        self,
        in_size,
        num_steps,
        feature_axis=-1,
        *,
        epsilon=1e-5,
        momentum=0.99,
        use_scale=True,
        use_bias=False,
        scale_init=None,
        bias_init=None,
        track_running_stats=True,
        unbiased_running_var=False,
        use_running_average=None,
        axis_name=None,
        axis_index_groups=None,
        use_fast_variance=False,
        step_mode="single",
        dtype=None,
        param_dtype=None,
        param_type=NormalizationParamState,
        mean_type=brainstate.ShortTermState,
        unit=None,
        name=None,
    ):
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

    def update(self, x, mask=None, *, t=None, use_running_average=None):
        """Normalize one step (single) or a whole sequence (multi).

        Parameters
        ----------
        x : array_like or Quantity
            ``(*batch, *in_size)`` or ``(T, *batch, *in_size)``.
        mask : array_like of bool, optional
        t : int or Array, optional
            Time index of a single-step call (default ``environ['i']``).
        use_running_average : bool, optional

        Returns
        -------
        Array
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


class ThresholdDependentBatchNorm(_TemporalBatchNorm):
    r"""Threshold-dependent batch normalization, tdBN (Zheng et al., 2021).

    .. math::

        y = \alpha V_{th} \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    In multi-step mode :math:`\mu, \sigma^2` are taken over time, batch and
    the non-feature axes together. In single-step mode they are taken over the
    batch at the current step only (documented difference: the statistics of
    one step, not of the whole window), and the running statistics are
    updated at every step.

    Parameters
    ----------
    in_size : int or sequence of int
    feature_axis : int or sequence of int
    alpha : float
        Scale factor (the paper uses 1, or 1/sqrt(2) before residual additions).
    v_th : float
        Firing threshold of the following neurons.

        ``alpha``, ``v_th`` and ``alpha * v_th`` must be finite and
        representable in ``param_dtype`` (float32 by default): a larger value
        would turn the scale, and the output, into ``inf``.
    step_mode : {'single', 'multi'}
        As for :class:`BatchNormThroughTime` (no time index is needed).
    **options
        ``epsilon``, ``momentum``, ``use_scale``, ``use_bias``, ``scale_init``,
        ``bias_init``, ``track_running_stats``, ``unbiased_running_var``,
        ``use_running_average``, ``axis_name``, ``axis_index_groups``,
        ``use_fast_variance``, ``dtype``, ``param_dtype``, ``param_type``,
        ``mean_type``, ``unit``, ``name``: as for :class:`BatchNorm1d`.

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

    def __init__(
        self,
        in_size,
        feature_axis=-1,
        *,
        alpha=1.0,
        v_th=1.0,
        epsilon=1e-5,
        momentum=0.99,
        use_scale=True,
        use_bias=True,
        scale_init=None,
        bias_init=None,
        track_running_stats=True,
        unbiased_running_var=False,
        use_running_average=None,
        axis_name=None,
        axis_index_groups=None,
        use_fast_variance=False,
        step_mode="single",
        dtype=None,
        param_dtype=None,
        param_type=NormalizationParamState,
        mean_type=brainstate.ShortTermState,
        unit=None,
        name=None,
    ):
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

    def update(self, x, mask=None, *, use_running_average=None):
        """Normalize ``x``: ``(T, *batch, *in_size)`` (multi) or ``(*batch, *in_size)`` (single).

        Parameters
        ----------
        x : array_like or Quantity
        mask : array_like of bool, optional
        use_running_average : bool, optional

        Returns
        -------
        Array
        """
        return self._shared_statistics(x, mask, use_running_average)[0]


class TemporalEffectiveBatchNorm(ThresholdDependentBatchNorm):
    r"""Temporal effective batch normalization, TEBN (Duan et al., 2022).

    tdBN statistics shared over time, then a trainable per-step weight:

    .. math:: y_t = p_t \left(\gamma \frac{x_t - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta\right)

    ``p`` has shape ``(num_steps,)``, starts at 1 and is a trainable
    ``brainstate.ParamState``. In single-step mode the statistics are those of
    the current step's batch (as for tdBN) and ``p_t`` is taken at the step
    index from ``t=`` or ``environ['i']``.

    Parameters
    ----------
    in_size : int or sequence of int
    num_steps : int
        Length of ``p``; later steps reuse ``p`` of the last step.
    feature_axis : int or sequence of int
    epsilon, momentum, use_scale, use_bias, scale_init, bias_init : optional
    track_running_stats, unbiased_running_var, use_running_average : optional
    axis_name, axis_index_groups, use_fast_variance, step_mode : optional
    dtype, param_dtype, param_type, mean_type, unit, name : optional
        As for :class:`ThresholdDependentBatchNorm`, validated when the layer
        is built (messages name ``TemporalEffectiveBatchNorm``). TEBN has no
        ``alpha`` or ``v_th`` (``alpha = v_th = 1``).

    Attributes
    ----------
    p : brainstate.ParamState
        Per-step weights, shape ``(num_steps,)``.

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

    def __init__(
        self,
        in_size,
        num_steps,
        feature_axis=-1,
        *,
        epsilon=1e-5,
        momentum=0.99,
        use_scale=True,
        use_bias=True,
        scale_init=None,
        bias_init=None,
        track_running_stats=True,
        unbiased_running_var=False,
        use_running_average=None,
        axis_name=None,
        axis_index_groups=None,
        use_fast_variance=False,
        step_mode="single",
        dtype=None,
        param_dtype=None,
        param_type=NormalizationParamState,
        mean_type=brainstate.ShortTermState,
        unit=None,
        name=None,
    ):
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

    def update(self, x, mask=None, *, t=None, use_running_average=None):
        """Normalize one step (single) or a whole sequence (multi), then weight by ``p_t``.

        Parameters
        ----------
        x : array_like or Quantity
        mask : array_like of bool, optional
        t : int or Array, optional
            Time index of a single-step call (default ``environ['i']``).
        use_running_average : bool, optional

        Returns
        -------
        Array
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
