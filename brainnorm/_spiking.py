"""Spiking-network normalizations: TAB and NeuNorm.

:class:`TemporalAccumulatedBatchNorm` shares the input layouts, step index
rules, running statistics, masks and units of the temporal layers of
:mod:`brainnorm._temporal` (BNTT, tdBN, TEBN); :class:`NeuNorm` is a dynamics
module with a ``brainstate.HiddenState``. The arithmetic of both is in
:mod:`brainnorm._spiking_functional`.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Literal

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np

from . import _units
from ._base import _affine_values, _Normalization, _resolve_init
from ._spiking_functional import _temporal_accumulated_batch_norm
from ._states import NormalizationParamState
from ._temporal import _reshape_q, _set_step, _set_steps, _temporal_doc, _TemporalBatchNorm, _time_slice
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
    Output,
    Size,
    StateType,
    Unit,
)
from ._validation import check_choice, check_dtype, check_flag, check_initializer
from .functional import AccumulatedSums, neu_norm

__all__ = ["TemporalAccumulatedBatchNorm", "NeuNorm"]


_TAB_DOC = r"""Temporal accumulated batch normalization, TAB (Jiang et al., ICLR 2024).

    The statistics of step ``t`` are taken over the steps ``0..t`` together
    (causal accumulation), over the batch axes and the non-feature axes of
    ``in_size``; each step has its own :math:`\gamma_t, \beta_t` and running
    statistics, and a trainable :math:`p_t` weights the output:

    .. math::

        y_t = p_t^2 \left(\gamma_t \frac{x_t - \mu_{0..t}}{\sqrt{\sigma^2_{0..t} + \epsilon}} + \beta_t\right)

    In training the running statistics of step ``t`` are updated with
    :math:`\mu_{0..t}, \sigma^2_{0..t}` (``unbiased_running_var=True``
    corrects with every valid element of steps ``0..t``); evaluation
    normalizes step ``t`` with them. With ``momentum = 1 - m`` and
    ``unbiased_running_var=True`` this is the authors' ``TAB_Layer`` (one
    PyTorch ``BatchNorm`` of momentum ``m`` per step, applied to the steps so
    far).

    ``step_mode='multi'`` takes ``(T, *batch, *in_size)``. ``'single'`` takes
    one step ``(*batch, *in_size)`` per call with its index from ``t=`` (or
    ``brainstate.environ['i']``); the sums of the current sequence live in the
    short-term state ``accumulated``, and a call with ``t == 0`` starts a new
    sequence. Both modes give the same outputs and running statistics. Steps
    at or past ``num_steps`` keep accumulating but reuse the last step's
    parameters and running statistics (updated once per step, in order).

    Call the layer as ``layer(x, mask=None, *, t=None, use_running_average=None)``
    (see :meth:`update`).

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape without time and batch axes.
    num_steps : int
        Number of steps with their own parameters and statistics; later steps
        reuse the last step's.
    feature_axis : int or sequence of int
        Channel axis counted within ``in_size``. Default ``-1``.
    p_init : initializer, array or None
        Initial :math:`p`, of shape ``(num_steps,)``: an initializer, a
        callable taking the shape, or an array. None: ones.
    {parameters}

    Attributes
    ----------
    weight : NormalizationParamState
        ``{'scale', 'bias'}`` of shape ``(num_steps, *feature_shape)``.
    p : brainstate.ParamState
        Trainable output weights :math:`p_t` (used squared), shape
        ``(num_steps,)``.
    running_mean : brainstate.ShortTermState
        Running mean per step, shape ``(num_steps, *feature_shape)``.
    running_var : brainstate.ShortTermState
        Running variance per step, same shape.
    num_batches_tracked : brainstate.ShortTermState
        Training steps per time step, shape ``(num_steps,)``.
    accumulated : brainstate.ShortTermState
        Single-step mode: the sums of the current sequence
        (:class:`~brainnorm._spiking_functional.AccumulatedSums` fields
        ``count``, ``shift``, ``total``, ``total_sq``, ``scale``, in the unit
        of the running statistics, else of the input).

    References
    ----------
    Jiang, Zoonekynd, De Masi, Ballester. TAB: Temporal Accumulated Batch
    Normalization in Spiking Neural Networks. ICLR 2024.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp
    >>> from brainnorm._spiking import TemporalAccumulatedBatchNorm
    >>> tab = TemporalAccumulatedBatchNorm(3, num_steps=4, step_mode='multi')
    >>> with brainstate.environ.context(fit=True):
    ...     y = tab(jnp.arange(96.0).reshape(4, 8, 3))      # (T, B, C)
    >>> tab.running_mean.value.shape, tab.p.value.shape
    ((4, 3), (4,))
    """


class TemporalAccumulatedBatchNorm(_TemporalBatchNorm):
    __doc__ = _temporal_doc(
        _TAB_DOC,
        scale_note=" Each step has its own :math:`\\gamma_t`, of shape ``(num_steps, *feature_shape)``. Default True.",
        bias_note=" Each step has its own :math:`\\beta_t`. Default True.",
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
        use_bias: bool = True,
        scale_init: Initializer | None = None,
        bias_init: Initializer | None = None,
        p_init: Initializer | None = None,
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
        dtype = brainstate.environ.dftype() if param_dtype is None else param_dtype
        p_init = (
            brainstate.nn.init.Constant(1.0) if p_init is None else check_initializer(self._owner, "p_init", p_init)
        )
        self.p = brainstate.ParamState(_resolve_init(self._owner, "p_init", p_init, (self.num_steps,), dtype))
        feature_shape = self._feature_shape(self.feature_axes)
        stats_dtype = jnp.promote_types(dtype, jnp.float32)
        self.accumulated = brainstate.ShortTermState(
            {
                name: (jnp.ones if name == "scale" else jnp.zeros)(feature_shape, stats_dtype)
                for name in AccumulatedSums._fields
            }
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
            left out of the accumulated sums.
        t : int or Array, optional
            Time index of a single-step call (default ``brainstate.environ``
            key ``'i'``); ``t == 0`` starts a new sequence. Ignored in
            multi-step mode.
        use_running_average : bool, optional
            True evaluates with the running statistics, False trains; None
            defers to the constructor, then ``environ['fit']``, else trains.

        Returns
        -------
        jax.Array
            Same shape as ``x``; dimensionless unless the scale or bias carry
            units.
        """
        x_m, unit, mask, _ = self._check_input(x, mask)
        training, stats_unit = self._mode_and_unit(x_m, unit, use_running_average)
        x_q = _units.attach(x_m, unit)
        if self.step_mode == "single":
            raw = self._raw_index(t)
            slot = self._step_index(raw)
            accumulated = self._stored_sums(raw)
            y, written = self._steps(
                x_q[None],
                None if mask is None else _time_slice(mask, x_m.ndim + 1, 0, 1),
                slot,
                1,
                training,
                accumulated,
            )
            self._commit(written, keep_sums=True)
            return _squeeze_time(y)
        steps = x_m.shape[0]
        head = min(steps, self.num_steps)
        y, written = self._steps(
            x_q[:head], None if mask is None else _time_slice(mask, x_m.ndim, 0, head), 0, head, training, None
        )
        outputs = [_units.split(y)[0]]
        for step in range(head, steps):  # past num_steps: the last slot, in order
            step_mask = None if mask is None else _time_slice(mask, x_m.ndim, step, step + 1)
            y_t, written = self._steps(
                x_q[step : step + 1], step_mask, self.num_steps - 1, 1, training, written["accumulated"], written
            )
            outputs.append(_units.split(y_t)[0])
        self._commit(written, keep_sums=False)
        if len(outputs) == 1:
            return y
        return _units.attach(jnp.concatenate(outputs, axis=0), _units.split(y)[1])

    # -- helpers ------------------------------------------------------------

    def _raw_index(self, t):
        if t is None:
            t = brainstate.environ.get("i", None)
        self._step_index(t)  # raises for a missing or negative index
        return t

    def _stored_sums(self, raw):
        """The sums of the current sequence; None at a (static) ``t == 0``."""
        if isinstance(raw, (numbers.Integral, np.integer)) or (
            hasattr(raw, "shape") and not isinstance(raw, jax.core.Tracer)
        ):
            if int(np.asarray(raw)) == 0:
                return None
            return AccumulatedSums(**self.accumulated.value)
        # a traced index: zero counts start a new sequence inside the core
        start = jnp.asarray(raw) == 0
        count = jnp.where(start, jnp.zeros_like(self.accumulated.value["count"]), self.accumulated.value["count"])
        return AccumulatedSums(**self.accumulated.value)._replace(count=count)

    def _steps(self, x_q, mask, first, steps, training, accumulated, pending=None):
        """Steps ``first..first+steps-1`` (slots) of one sequence through the core.

        ``first`` is a slot index (int or traced); ``pending`` holds values
        computed but not yet written (the tail of a multi-step call).
        """
        x_m = _units.split(x_q)[0]
        n_batch = x_m.ndim - len(self.in_size) - 1
        broadcast = (steps,) + (1,) * n_batch + self._feature_shape(self.feature_axes)
        slots = _slots(first, steps)
        scale, bias = _affine_values(self.weight)
        scale = None if scale is None else _reshape_q(_take(scale, slots), broadcast)
        bias = None if bias is None else _reshape_q(_take(bias, slots), broadcast)
        p = _take(self.p.value, slots)
        running_mean = running_var = None
        momentum = 1.0
        state = pending or {}
        if self.track_running_stats:
            full_mean = state.get("running_mean", self.running_mean.value)
            full_var = state.get("running_var", self.running_var.value)
            tracked = state.get("num_batches_tracked", self.num_batches_tracked.value)
            running_mean = _reshape_q(_take(full_mean, slots), broadcast)
            running_var = _reshape_q(_take(full_var, slots), broadcast)
            momentum = self._step_momentum(_take(tracked, slots), len(broadcast))
        y, new_mean, new_var, sums = _temporal_accumulated_batch_norm(
            self._owner,
            x_q,
            running_mean,
            running_var,
            scale,
            bias,
            p,
            training=training,
            feature_axes=self._x_axes(self.feature_axes, x_m.ndim),
            momentum=momentum,
            epsilon=self.epsilon,
            mask=mask,
            unbiased_running_var=self.unbiased_running_var,
            accumulated=accumulated,
            return_accumulated=True,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            use_fast_variance=self.use_fast_variance,
            dtype=self.dtype,
        )
        written = dict(state)
        written["accumulated"] = sums
        if self.track_running_stats and training:
            shape = (steps,) + self.running_mean.value.shape[1:]
            written["running_mean"] = _put(full_mean, slots, _reshape_q(new_mean, shape))
            written["running_var"] = _put(full_var, slots, _reshape_q(new_var, shape))
            written["num_batches_tracked"] = _put(tracked, slots, _take(tracked, slots) + 1)
        return y, written

    def _commit(self, written, keep_sums):
        """Write everything computed by this call (nothing is written before it succeeded)."""
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if name in written:
                getattr(self, name).value = written[name]
        sums = written.get("accumulated")
        if keep_sums and sums is not None:
            stored = self.accumulated.value
            self.accumulated.value = {
                name: jnp.reshape(jnp.asarray(value), stored[name].shape).astype(stored[name].dtype)
                for name, value in zip(AccumulatedSums._fields, sums, strict=True)
            }


def _slots(first, steps):
    """Slot indices ``first, ..., first + steps - 1`` (a slice for a static start)."""
    if isinstance(first, int):
        return slice(first, first + steps)
    return first  # a traced single slot


def _take(value, slots):
    """Entries ``slots`` of a per-step array (Quantity or plain), time axis kept."""
    value_m, unit = _units.split(value)
    if isinstance(slots, slice):
        return _units.attach(value_m[slots], unit)
    return _units.attach(jax.lax.dynamic_slice_in_dim(value_m, slots, 1, axis=0), unit)


def _put(full, slots, values):
    """``full`` with ``slots`` replaced by ``values`` (in the unit of ``values``)."""
    if isinstance(slots, slice):
        if slots.start == 0:
            return _set_steps(full, values)
        full_m = _units.split(full)[0]
        values_m, unit = _units.split(values)
        return _units.attach(full_m.at[slots].set(values_m.astype(full_m.dtype)), unit)
    return _set_step(full, slots, _reshape_q(values, _units.split(values)[0].shape[1:]))


def _squeeze_time(y):
    y_m, unit = _units.split(y)
    return _units.attach(y_m[0], unit)


class NeuNorm(_Normalization):
    r"""NeuNorm (Wu et al., AAAI 2019): auxiliary neurons that subtract the recent population activity.

    With input spikes :math:`s_t` of ``C`` channels (the entries of the
    feature axes), per sample and non-feature position:

    .. math::

        a_t = k\, a_{t-1} + \frac{1 - k}{C^2} \sum_c s_t[c], \qquad y_t = s_t - w\, a_t

    with a trainable ``w`` of the shape of ``in_size`` (feature axes of size 1
    when ``shared_across_channels``). Equal to spikingjelly 2.0's
    ``layer.NeuNorm(C, H, W, k, shared_across_channels)`` given the same
    ``w`` (spikingjelly is channels first: ``in_size=(C, H, W),
    feature_axis=0``), placed after the spiking neurons of a convolution.

    :math:`a` lives in the ``brainstate.HiddenState`` ``activity`` of shape
    ``(*batch, *in_size)`` with 1 at the feature axes: ``init_state`` /
    ``reset_state(batch_size)`` set it to 0 (as ``brainstate.nn.init_all_states``
    and ``reset_all_states`` do). ``step_mode='single'`` takes one step
    ``(*batch, *in_size)`` per call; ``'multi'`` takes ``(T, *batch,
    *in_size)`` and steps through it in order.

    Units: :math:`a` is a sum of inputs, so it has the input's unit, and the
    output ``x - w a`` too. The state's unit is settled as for the running
    statistics of :class:`BatchNorm1d`: given at construction (``unit=``), or
    taken from the first input with a unit when the state is fresh (no call
    since construction, ``init_state`` or ``reset_state``) and the call is
    eager; from then on ``activity`` is a Quantity in that unit, which
    ``init_state`` and ``reset_state`` keep. A later input in another unit of
    the same dimension (V for a state in mV) is converted: the output is in the
    input's unit, the state stays in its own. An input of another dimension
    (nA), a plain input to a state with a unit, or an input with a unit to a
    state of plain numbers that has seen data, raises
    :class:`~brainnorm._units.UnitError` naming the layer and writes nothing.
    Inside ``jit``/``for_loop`` a state cannot take a unit (brainstate refuses
    to change its tree structure there): construct the layer with ``unit=``
    (or call it once outside the transform).

    Parameters
    ----------
    in_size : int or sequence of int
        Per-sample shape, e.g. ``(H, W, C)`` or ``(C, H, W)``.
    feature_axis : int or sequence of int
        Channel axes counted within ``in_size``.
    k : float
        Decay of :math:`a` (:math:`k_{\tau 2}` of the paper), in [0, 1].
    shared_across_channels : bool
        One ``w`` for every channel instead of one per channel. Default
        False.
    w_init : initializer, array or None
        Initial ``w``; default uniform in :math:`\pm 1/\sqrt{n}` with ``n``
        the number of non-feature positions (spikingjelly's
        ``kaiming_uniform_(a=sqrt(5))``).
    step_mode : {'single', 'multi'}
        ``'single'`` (default): one step ``(*batch, *in_size)`` per call,
        carrying :math:`a` in :attr:`activity` between calls. ``'multi'``: a
        whole sequence ``(T, *batch, *in_size)`` per call.
    param_dtype : dtype, optional
        Floating dtype of ``w`` and of the state.
    param_type : type
        ``brainstate.ParamState`` subclass that holds ``w``. Default
        ``brainstate.ParamState``.
    unit : brainunit.Unit, optional
        Unit of the state (of the inputs), for a layer first called inside a
        transform; without it the first eager call with a Quantity sets it.
    name : str, optional
        Module name reported by brainstate.

    Attributes
    ----------
    w : brainstate.ParamState
        Trainable weight of the subtracted activity, one per non-feature
        position (and per channel unless ``shared_across_channels``).
    activity : brainstate.HiddenState
        :math:`a`, a Quantity once the state has a unit.
    activity_unit : brainunit.Unit or None
        The state's unit (None: plain numbers, or not settled yet).

    Raises
    ------
    ValueError
        ``k`` outside [0, 1], an unknown ``step_mode``, axes out of range, a
        ``w_init`` array of another size; at call time an input whose trailing
        shape is not ``in_size`` or a state of another batch shape.
    TypeError
        An option of the wrong type (``shared_across_channels='yes'``,
        ``param_dtype=jnp.int32``, ``unit='mV'``, ``step_mode=None``).
    UnitError
        At call time, an input whose unit does not fit the state's.

    References
    ----------
    Wu, Deng, Li, Zhu, Xie, Shi. Direct Training for Spiking Neural Networks:
    Faster, Larger, Better. AAAI 2019.

    Examples
    --------
    >>> import jax.numpy as jnp, brainunit as u
    >>> from brainnorm._spiking import NeuNorm
    >>> norm = NeuNorm((4, 4, 2), w_init=jnp.ones((4, 4, 2)))
    >>> norm.init_state(batch_size=3)
    >>> y = norm(jnp.ones((3, 4, 4, 2)))               # a = 0.1 / 4 * 2
    >>> round(float(y[0, 0, 0, 0]), 4), norm.activity.value.shape
    (0.95, (3, 4, 4, 1))
    >>> currents = NeuNorm(2, w_init=jnp.ones(2))
    >>> currents.init_state(batch_size=1)
    >>> y = currents(jnp.ones((1, 2)) * u.nA)          # the state takes the input's unit
    >>> y.unit == u.nA, currents.activity_unit == u.nA, round(float(y.mantissa[0, 0]), 4)
    (True, True, 0.95)
    """

    w: brainstate.ParamState
    activity: brainstate.HiddenState

    def __init__(
        self,
        in_size: Size,
        feature_axis: Axes = -1,
        *,
        k: float = 0.9,
        shared_across_channels: bool = False,
        w_init: Initializer | None = None,
        step_mode: Literal["single", "multi"] = "single",
        param_dtype: DTypeLike | None = None,
        param_type: type[brainstate.ParamState] = brainstate.ParamState,
        unit: Unit | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(in_size, name=name)
        owner = self._owner
        self.feature_axes = self._sample_axes("feature_axis", feature_axis)
        self.k = _check_unit_interval(owner, "k", k)
        self.shared_across_channels = check_flag(owner, "shared_across_channels", shared_across_channels)
        self.step_mode = check_choice(owner, "step_mode", step_mode, ("single", "multi"))
        self.param_dtype = check_dtype(owner, "param_dtype", param_dtype, parameter=True)
        if not (isinstance(param_type, type) and issubclass(param_type, brainstate.ParamState)):
            raise TypeError(f"{owner}: param_type must be a brainstate.ParamState subclass, got {param_type!r}.")
        if w_init is not None:
            check_initializer(owner, "w_init", w_init)
        unit = _units.check_unit(owner, unit)
        self.state_shape = tuple(1 if i in self.feature_axes else d for i, d in enumerate(self._size))
        w_shape = self.state_shape if self.shared_across_channels else self.in_size
        dtype = brainstate.environ.dftype() if param_dtype is None else param_dtype
        if w_init is None:
            bound = 1.0 / math.sqrt(math.prod(self.state_shape))
            w_init = brainstate.nn.init.Uniform(-bound, bound)
        self.w = param_type(_resolve_init(owner, "w_init", w_init, w_shape, dtype))
        self.activity = brainstate.HiddenState(_units.attach(jnp.zeros(self.state_shape, dtype), unit))
        self._fresh = True

    @property
    def activity_unit(self):
        """The unit of the state :math:`a` (None: plain numbers, or not settled yet)."""
        return _units.split(self.activity.value)[1]

    def _zeros(self, batch_size):
        """A fresh state ``a = 0`` in the state's dtype and unit."""
        if batch_size is None:
            batch = ()
        elif isinstance(batch_size, (numbers.Integral, np.integer)) and not isinstance(batch_size, bool):
            batch = (int(batch_size),)
        else:
            batch = tuple(int(b) for b in batch_size)
        dtype = brainstate.environ.dftype() if self.param_dtype is None else self.param_dtype
        self._fresh = True
        return _units.attach(jnp.zeros(batch + self.state_shape, dtype), self.activity_unit)

    def init_state(self, batch_size=None, **kwargs):
        """Create the state :math:`a = 0` for ``batch_size`` samples (None: one unbatched sample), in its unit."""
        self.activity = brainstate.HiddenState(self._zeros(batch_size))

    def reset_state(self, batch_size=None, **kwargs):
        """Set :math:`a` back to 0 (a new sequence), for ``batch_size`` samples, in its unit."""
        self.activity.value = self._zeros(batch_size)

    def _state_unit(self, x_m, unit):
        """The unit the state has after this call: its own, or the input's where a fresh plain state adopts it.

        Raises before anything is written when the input's unit does not fit.
        """
        stored = self.activity_unit
        if stored is not None:
            if unit is None:
                raise _units.UnitError(
                    f"{self._owner}: the state is in {stored} but the input has no unit; pass a Quantity in a "
                    f"unit convertible to {stored}."
                )
            if not u.have_same_dim(unit, stored):
                raise _units.UnitError(
                    f"{self._owner}: input unit {unit} is not convertible to the unit {stored} of the state."
                )
            return stored
        if unit is None:
            return None
        if not self._fresh:
            raise _units.UnitError(
                f"{self._owner}: input in {unit} reached a state of plain numbers that has seen data; pass input "
                f"without a unit, or call reset_state() (or init_state()) to start a new sequence in {unit}."
            )
        if isinstance(x_m, jax.core.Tracer):
            raise _units.UnitError(
                f"{self._owner}: input in {unit} reached a layer whose state has no unit yet, inside a traced "
                f"function (jit/vmap/grad/for_loop), where a state cannot take a unit. Construct the layer "
                f"with unit={unit} (or call it once outside the transform)."
            )
        return unit

    if TYPE_CHECKING:  # brainstate's Module.__call__ (untyped) forwards to update: its types, for checkers

        def __call__(self, x: Input) -> Output: ...

    def update(self, x: Input) -> Output:
        """One step ``(*batch, *in_size)`` or a sequence ``(T, *batch, *in_size)`` (multi).

        ``layer(x)`` calls this.

        Parameters
        ----------
        x : array_like or Quantity
            Input spikes.

        Returns
        -------
        jax.Array or Quantity
            ``x - w * a`` of the same shape, in the unit of ``x``.

        Raises
        ------
        ValueError
            Input whose trailing shape is not ``in_size``, no time axis in
            multi-step mode, or a state whose batch shape does not fit the
            input (call ``reset_state(batch_size)``).
        UnitError
            An input whose unit does not fit the state's (see the class);
            nothing is written.
        """
        x_m, unit, _, n_batch = self._prepare_input(x, None)
        multi = self.step_mode == "multi"
        if multi and n_batch < 1:
            raise ValueError(
                f"{self._owner}: step_mode='multi' expects input (T, *batch, *in_size) with "
                f"in_size={self.in_size}, got shape {x_m.shape} (no time axis)."
            )
        step_batch = x_m.shape[1 if multi else 0 : n_batch]
        expected = tuple(step_batch) + self.state_shape
        state_m = _units.split(self.activity.value)[0]
        if tuple(jnp.shape(state_m)) != expected:
            raise ValueError(
                f"{self._owner}: the state has shape {tuple(jnp.shape(state_m))} but the input needs "
                f"{expected}; call reset_state(batch_size={step_batch[0] if len(step_batch) == 1 else step_batch}) "
                f"(or init_state) first."
            )
        state_unit = self._state_unit(x_m, unit)
        offset = x_m.ndim - len(self._size) - (1 if multi else 0)
        y, activity = neu_norm(
            _units.attach(x_m, unit),
            self.w.value,
            # a fresh plain state adopting the input's unit is 0 in any unit
            _units.attach(state_m, state_unit),
            k=self.k,
            feature_axes=tuple(offset + a for a in self.feature_axes),
            multi_step=multi,
        )
        # the state keeps its unit (its tree structure): the new value is expressed in it
        activity_m = _units.in_unit(self._owner, "state", activity, state_unit)
        self.activity.value = _units.attach(jnp.asarray(activity_m).astype(jnp.result_type(state_m)), state_unit)
        self._fresh = False
        return y


def _check_unit_interval(owner, option, value):
    if isinstance(value, (bool, str, bytes)) or np.ndim(value) != 0 or np.asarray(value).dtype.kind not in "iuf":
        raise TypeError(f"{owner}: {option} must be a number in [0, 1], got {type(value).__name__} {value!r}.")
    as_float = float(np.asarray(value))
    if not 0.0 <= as_float <= 1.0:
        raise ValueError(f"{owner}: {option} must be a number in [0, 1], got {value!r}.")
    return as_float
