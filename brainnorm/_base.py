"""What every brainnorm layer shares: in_size, axes, parameters, modes, inputs."""

from __future__ import annotations

import math
from typing import cast

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp

from . import _units
from . import functional as F
from ._validation import (
    canonical_axes,
    canonical_in_size,
    check_axis_name,
    check_broadcasts,
    check_dtype,
    check_epsilon,
    check_flag,
    check_initializer,
    check_input,
    check_mask,
    check_momentum,
    check_momentum_shape,
    check_name,
    check_trailing_shape,
)

__all__: list[str] = []


def _resolve_init(owner, option, init, shape, dtype):
    """Materialize an initializer (callable or array) as an array of ``shape``."""
    if callable(init):
        value = init(shape)
    else:
        value = init
    value_m, unit = _units.split(value)
    value_m = jnp.asarray(value_m)
    if value_m.shape != tuple(shape):
        if value_m.size == math.prod(shape):
            value_m = value_m.reshape(shape)
        elif value_m.ndim == 0:
            value_m = jnp.broadcast_to(value_m, shape)
        else:
            raise ValueError(
                f"{owner}: {option} must give an array of shape {tuple(shape)} (or of the same "
                f"size), got shape {value_m.shape}."
            )
    return _units.attach(value_m.astype(dtype), unit)


def _default_init(init, value):
    """``init``, or ``brainstate.nn.init.Constant(value)`` for None (the documented standard initializer).

    A default of None prints short in signatures and API pages; the layer
    stores the resolved initializer.
    """
    return brainstate.nn.init.Constant(value) if init is None else init


def _check_state_type(owner, option, state_type, *, trainable):
    if not (isinstance(state_type, type) and issubclass(state_type, brainstate.State)):
        raise TypeError(f"{owner}: {option} must be a brainstate.State subclass, got {state_type!r}.")
    if not trainable and issubclass(state_type, brainstate.ParamState):
        raise TypeError(
            f"{owner}: {option} must not be a ParamState subclass (running statistics are not "
            f"trained), got {state_type.__name__}."
        )
    return state_type


class _Normalization(brainstate.nn.Module):
    """Base of every layer: ``in_size`` handling, axis mapping, input checks.

    Axes given to a layer are counted within ``in_size``; ``_x_axes`` maps
    them onto an input with any number of leading batch axes.
    """

    def __init__(self, in_size, *, name=None):
        super().__init__(name=check_name(type(self).__name__, name))
        self.in_size = canonical_in_size(type(self).__name__, in_size)
        self.out_size = self.in_size

    @property
    def _size(self) -> tuple[int, ...]:
        """``in_size``, which this base always stores as a tuple of ints (brainstate types it more loosely)."""
        return cast(tuple[int, ...], self.in_size)

    @property
    def _owner(self) -> str:
        return type(self).__name__

    def _sample_axes(self, option, axes):
        return canonical_axes(self._owner, option, axes, len(self.in_size))

    def _feature_shape(self, feature_axes):
        return tuple(d if i in feature_axes else 1 for i, d in enumerate(self.in_size))

    def _x_axes(self, axes, ndim):
        offset = ndim - len(self.in_size)
        return tuple(offset + a for a in axes)

    def _set_common_options(
        self, *, axis_name=None, axis_index_groups=None, use_fast_variance=False, dtype=None, param_dtype=None
    ):
        """Validate and store the options every statistics layer shares."""
        owner = self._owner
        self.axis_name, self.axis_index_groups = check_axis_name(owner, axis_name, axis_index_groups)
        self.use_fast_variance = check_flag(owner, "use_fast_variance", use_fast_variance)
        self.dtype = check_dtype(owner, "dtype", dtype)
        self.param_dtype = check_dtype(owner, "param_dtype", param_dtype, parameter=True)

    def _prepare_input(self, x, mask):
        """``(mantissa, unit, mask, number of batch axes)`` after validation."""
        x_m, unit = _units.split(x)
        x_m = check_input(self._owner, x_m)
        n_batch = check_trailing_shape(self._owner, x_m.shape, self.in_size)
        mask = check_mask(self._owner, mask, x_m.shape)
        return x_m, unit, mask, n_batch

    def _call_affine(self, shape, learned, scale=None, bias=None):
        """``(scale, bias)`` for this call: the learned parameters, or values given at call time.

        Conditional normalization (AdaLN, FiLM): a call-time ``scale`` or
        ``bias`` (broadcastable to the input, e.g. ``(B, 1, C)`` per sample)
        takes the place of a parameter the layer was built without
        (``use_scale=False`` / ``use_bias=False``); giving one the layer
        learns is an error. ``learned`` is the layer's own ``(scale, bias)``.
        """
        result = []
        for option, given, own in zip(("scale", "bias"), (scale, bias), learned, strict=True):
            if given is None:
                result.append(own)
                continue
            if own is not None:
                raise ValueError(
                    f"{self._owner}: {option} given at call time needs a layer built with use_{option}=False "
                    f"(this layer learns its own {option}), got {option} of shape "
                    f"{tuple(jnp.shape(getattr(given, 'mantissa', given)))}."
                )
            check_broadcasts(self._owner, option, given, shape)
            result.append(given)
        return tuple(result)

    def _affine_state(self, feature_shape, *, use_scale, use_bias, scale_init, bias_init, param_dtype, param_type):
        """A ``param_type`` holding ``{'scale', 'bias'}`` as requested (None if neither)."""
        _check_state_type(self._owner, "param_type", param_type, trainable=True)
        dtype = brainstate.environ.dftype() if param_dtype is None else param_dtype
        values = {}
        # a given initializer is checked even when unused: a wrong one is a mistake whether or not
        # use_scale is on
        if use_scale or scale_init is not None:
            check_initializer(self._owner, "scale_init", scale_init)
        if use_bias or bias_init is not None:
            check_initializer(self._owner, "bias_init", bias_init)
        if use_scale:
            values["scale"] = _resolve_init(self._owner, "scale_init", scale_init, feature_shape, dtype)
        if use_bias:
            values["bias"] = _resolve_init(self._owner, "bias_init", bias_init, feature_shape, dtype)
        if use_scale and use_bias:
            _check_affine_units(self._owner, values["scale"], values["bias"])
        return param_type(values) if values else None


def _check_affine_units(owner, scale, bias):
    """The bias is added to the scaled output, in the scale's unit: the two initial values must agree.

    Checked at construction so that, for example, a scale in ms with the
    default plain zero bias fails here, naming the layer, rather than at the
    first call.
    """
    scale_unit = _units.split(scale)[1]
    bias_unit = _units.split(bias)[1]
    if scale_unit is None and bias_unit is None:
        return
    if scale_unit is not None and bias_unit is not None and u.have_same_dim(scale_unit, bias_unit):
        return
    expected = "a plain number" if scale_unit is None else f"a Quantity in a unit convertible to {scale_unit}"
    given = "a plain number" if bias_unit is None else f"a Quantity in {bias_unit}"
    fix = (
        f"e.g. bias_init=brainstate.nn.init.Constant(0.0 * {scale_unit}), or scale_init without a unit"
        if scale_unit is not None
        else "give scale_init in the bias's unit too"
    )
    raise _units.UnitError(
        f"{owner}: bias_init must be {expected} like scale_init (the bias is added to the scaled output, in the "
        f"scale's unit; {fix}), got {given}."
    )


def _affine_values(state):
    """``(scale, bias)`` from a parameter state (None where absent)."""
    if state is None:
        return None, None
    value = state.value
    return value.get("scale"), value.get("bias")


def _pick(owner, primary_name, primary, alias_name, alias, default):
    """Resolve two spellings of one option (brainstate's and flax's)."""
    if primary is not None and alias is not None:
        raise TypeError(f"{owner}: give only one of {primary_name} and {alias_name}.")
    if primary is not None:
        return primary
    if alias is not None:
        return alias
    return default


class _RunningStatistics:
    """Mixin for layers with running statistics: mode resolution and momentum."""

    def _is_training(self, use_running_average):
        """Call argument, then constructor, then ``environ['fit']``, then training."""
        use_running_average = check_flag(self._owner, "use_running_average", use_running_average, allow_none=True)
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            fit = brainstate.environ.get("fit", None)
            return True if fit is None else bool(fit)
        return not use_running_average

    def _setup_statistics(
        self,
        *,
        feature_axis,
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
        dtype,
        param_dtype,
        param_type,
        mean_type,
        unit,
        leading_shape=(),
    ):
        """Options, parameters and running statistics of a batch-statistics layer.

        ``leading_shape`` prefixes the parameter and statistics shapes (one
        slot per time step for BNTT, which then counts batches per step too).
        """
        owner = self._owner
        self.feature_axes = self._sample_axes("feature_axis", feature_axis)
        self.epsilon = check_epsilon(owner, epsilon)
        self.momentum = check_momentum(owner, momentum)
        if self.momentum is not None and jnp.ndim(self.momentum):
            # one value per channel: it must broadcast to the running statistics of every call (and of
            # every time step), whose trailing axes are the feature shape
            check_momentum_shape(owner, self.momentum, self._feature_shape(self.feature_axes), "the feature shape")
        self.use_scale = check_flag(owner, "use_scale", use_scale)
        self.use_bias = check_flag(owner, "use_bias", use_bias)
        self.track_running_stats = check_flag(owner, "track_running_stats", track_running_stats)
        self.unbiased_running_var = check_flag(owner, "unbiased_running_var", unbiased_running_var)
        self.use_running_average = check_flag(owner, "use_running_average", use_running_average, allow_none=True)
        self._set_common_options(
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            use_fast_variance=use_fast_variance,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.scale_init = scale_init
        self.bias_init = bias_init
        # checked even without running statistics (an unused wrong option is still a mistake)
        _check_state_type(owner, "mean_type", mean_type, trainable=False)
        _units.check_unit(owner, unit)
        stat_shape = tuple(leading_shape) + self._feature_shape(self.feature_axes)
        self.weight = self._affine_state(
            stat_shape,
            use_scale=self.use_scale,
            use_bias=self.use_bias,
            scale_init=scale_init,
            bias_init=bias_init,
            param_dtype=param_dtype,
            param_type=param_type,
        )
        if self.track_running_stats:
            self._init_running_stats(stat_shape, mean_type, param_dtype, unit, tuple(leading_shape))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def _init_running_stats(self, feature_shape, mean_type, param_dtype, unit=None, counter_shape=()):
        _check_state_type(self._owner, "mean_type", mean_type, trainable=False)
        dtype = brainstate.environ.dftype() if param_dtype is None else param_dtype
        unit = _units.check_unit(self._owner, unit)
        self.running_mean = mean_type(_units.attach(jnp.zeros(feature_shape, dtype), unit))
        self.running_var = mean_type(_units.attach(jnp.ones(feature_shape, dtype), None if unit is None else unit**2))
        self.num_batches_tracked = mean_type(jnp.zeros(counter_shape, jnp.int32))

    def _effective_momentum(self, batches_tracked=None):
        """Momentum of this step: ``1 - 1/(n+1)`` for the cumulative average (None).

        ``batches_tracked`` defaults to ``num_batches_tracked``; layers with a
        counter per time step pass the counts of the steps being updated.
        """
        if self.momentum is not None:
            return self.momentum
        if batches_tracked is None:
            batches_tracked = self.num_batches_tracked.value
        return 1.0 - 1.0 / (batches_tracked + 1).astype(jnp.float32)

    def _batch_norm(self, x_m, unit, mask, feature_axes, training, scale, bias, running=None, momentum=None):
        """:func:`brainnorm.functional.batch_norm` with this layer's options: ``(y, new_mean, new_var)``.

        ``running`` is ``(mean, var)`` to use and update, or None for batch
        statistics in every mode; ``momentum`` defaults to this layer's.
        """
        if running is None:
            running, momentum = (None, None), 1.0
        elif momentum is None:
            momentum = self._effective_momentum()
        return F.batch_norm(
            _units.attach(x_m, unit),
            running[0],
            running[1],
            scale,
            bias,
            training=training,
            feature_axes=feature_axes,
            momentum=momentum,
            epsilon=self.epsilon,
            mask=mask,
            unbiased_running_var=self.unbiased_running_var,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            use_fast_variance=self.use_fast_variance,
            dtype=self.dtype,
        )

    def _stats_unit(self, x_m, unit):
        """The unit of the running statistics for this call.

        Settled statistics (a Quantity) accept only inputs of a convertible
        unit. Plain statistics adopt the input's unit on the first eager call
        with units; under a trace that is impossible (a state cannot change its
        tree structure there), so it raises with the fix.
        """
        stats_unit = _units.split(self.running_mean.value)[1]
        if stats_unit is not None:
            if unit is None:
                raise _units.UnitError(
                    f"{self._owner}: the running statistics are in {stats_unit} but the input has no "
                    f"unit; pass a Quantity in a unit convertible to {stats_unit}."
                )
            if not u.have_same_dim(unit, stats_unit):
                raise _units.UnitError(
                    f"{self._owner}: input unit {unit} is not convertible to the unit {stats_unit} of "
                    f"the running statistics."
                )
            return stats_unit
        if unit is not None and isinstance(x_m, jax.core.Tracer):
            raise _units.UnitError(
                f"{self._owner}: input in {unit} reached a layer whose running statistics have no unit "
                f"yet, inside a traced function (jit/vmap/grad/for_loop), where a state cannot take a "
                f"unit. Construct the layer with unit={unit} (or call it once outside the transform)."
            )
        return unit
