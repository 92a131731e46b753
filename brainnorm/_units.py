"""Physical units at the boundary of the statistics core.

The core works on plain arrays. Functions and layers split a
:class:`brainunit.Quantity` into mantissa and unit on the way in and attach
units on the way out: statistics carry the input's unit (variance its square),
the normalized value is dimensionless, and scale/bias may give it a unit.
"""

from __future__ import annotations

import brainunit as u
import jax.numpy as jnp

__all__: list[str] = []


class UnitError(u.UnitMismatchError, TypeError, ValueError):
    """A unit that does not fit: brainunit's ``UnitMismatchError``, catchable as
    ``TypeError`` or ``ValueError`` too."""


def check_unit(owner: str, unit):
    """A declared unit: None or a brainunit ``Unit``; a dimensionless unit is read as None."""
    if unit is not None and not isinstance(unit, u.Unit):
        raise TypeError(f"{owner}: unit must be a brainunit Unit (e.g. brainunit.mV), got {unit!r}.")
    return None if unit is None or unit.is_unitless else unit


def split(value):
    """``(mantissa, unit)``; unit is None for plain arrays and unitless Quantities."""
    if isinstance(value, u.Quantity):
        unit = value.unit
        return value.mantissa, (None if unit.is_unitless else unit)
    return value, None


def attach(array, unit):
    """Wrap ``array`` in ``unit`` (no-op for None)."""
    return array if unit is None else u.Quantity(array, unit=unit)


def in_unit(owner: str, option: str, value, unit):
    """Mantissa of ``value`` expressed in ``unit`` (None: must be unitless)."""
    if isinstance(value, u.Quantity):
        if unit is None:
            if value.unit.is_unitless:
                return value.mantissa
            raise UnitError(f"{owner}: {option} has unit {value.unit} but a dimensionless value was expected.")
        if not u.have_same_dim(value, unit):
            raise UnitError(f"{owner}: {option} has unit {value.unit}, which is not convertible to {unit}.")
        return value.to_decimal(unit)
    if unit is not None and option != "epsilon":
        raise UnitError(f"{owner}: {option} is a plain number but a Quantity in {unit} was expected.")
    return value


def affine_units(owner: str, scale, bias):
    """Mantissas of scale and bias and the unit of the affine output.

    The output unit is that of ``scale`` (or of ``bias`` when there is no
    scale); ``bias`` is converted to it.
    """
    scale_m, scale_unit = split(scale) if scale is not None else (None, None)
    if bias is None:
        return scale_m, None, scale_unit
    bias_unit = split(bias)[1]
    out_unit = scale_unit if scale is not None else bias_unit
    bias_m = in_unit(owner, "bias", bias, out_unit) if (out_unit or bias_unit) else split(bias)[0]
    return scale_m, bias_m, out_unit


def epsilon_value(owner: str, epsilon, unit):
    """Mantissa of ``epsilon`` in the squared statistics unit.

    A plain number is read in that unit already (the input's squared unit).
    """
    if isinstance(epsilon, u.Quantity):
        return in_unit(owner, "epsilon", epsilon, None if unit is None else unit**2)
    return epsilon


def as_array(x):
    """Plain ``jnp`` array of the mantissa of ``x``."""
    return jnp.asarray(split(x)[0])


def in_statistics_unit(owner, x, unit, running_mean, running_var):
    """Express ``x`` and the running statistics in one unit: theirs if they have one, else the input's.

    Returns ``(x, stats_unit, mean, var)`` with plain arrays (None for absent
    statistics).
    """
    mean_unit = split(running_mean)[1] if running_mean is not None else None
    stats_unit = mean_unit if mean_unit is not None else unit
    if unit != stats_unit:
        x = jnp.asarray(in_unit(owner, "x", attach(x, unit), stats_unit))
    if running_mean is None:
        return x, stats_unit, None, None
    var_unit = None if stats_unit is None else stats_unit**2
    if mean_unit is not None:
        mean = in_unit(owner, "running_mean", running_mean, stats_unit)
        var = in_unit(owner, "running_var", running_var, var_unit)
    else:
        # plain running statistics are read in the input's unit; a running
        # variance that has a unit must fit it
        mean = split(running_mean)[0]
        var = split(running_var)[0]
        if split(running_var)[1] is not None:
            var = in_unit(owner, "running_var", running_var, var_unit)
    return x, stats_unit, jnp.asarray(mean), jnp.asarray(var)
