"""Static checks shared by every layer and function.

Every check runs on Python values and static shapes only, so it is free under
``jit`` and never needs a host round trip. Messages follow one pattern:
``"<owner>: <option> must be <expected>, got <given>."``
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__: list[str] = []


def canonical_in_size(owner: str, in_size) -> tuple[int, ...]:
    """Return ``in_size`` as a tuple of positive ints (an int means ``(int,)``)."""
    if isinstance(in_size, (numbers.Integral, np.integer)) and not isinstance(in_size, bool):
        in_size = (int(in_size),)
    try:
        dims = tuple(in_size)
    except TypeError:
        raise TypeError(
            f"{owner}: in_size must be an int or a sequence of ints, "
            f"got {type(in_size).__name__} {in_size!r}."
        ) from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (numbers.Integral, np.integer)):
            raise TypeError(
                f"{owner}: in_size must contain ints, got {type(d).__name__} {d!r} "
                f"in in_size={in_size!r}."
            )
        if d <= 0:
            raise ValueError(
                f"{owner}: in_size must contain positive sizes, got {tuple(in_size)!r}."
            )
    return tuple(int(d) for d in dims)


def canonical_axes(owner: str, option: str, axes, ndim: int, *, allow_empty: bool = False) -> tuple[int, ...]:
    """Normalize ``axes`` (int or sequence) counted within a rank-``ndim`` shape.

    Negative entries count from the end. Returns sorted non-negative axes.
    """
    if isinstance(axes, (numbers.Integral, np.integer)) and not isinstance(axes, bool):
        axes = (int(axes),)
    try:
        given = tuple(axes)
    except TypeError:
        raise TypeError(
            f"{owner}: {option} must be an int or a sequence of ints, got "
            f"{type(axes).__name__} {axes!r}."
        ) from None
    result = []
    for a in given:
        if isinstance(a, bool) or not isinstance(a, (numbers.Integral, np.integer)):
            raise TypeError(
                f"{owner}: {option} must contain ints, got {type(a).__name__} {a!r}."
            )
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{owner}: {option} must be in [-{ndim}, {ndim}) for a rank-{ndim} "
                f"shape, got {given!r}."
            )
        result.append(int(a) % ndim)
    if len(set(result)) != len(result):
        raise ValueError(f"{owner}: {option} must not repeat an axis, got {given!r}.")
    if not result and not allow_empty:
        raise ValueError(f"{owner}: {option} must name at least one axis, got {given!r}.")
    return tuple(sorted(result))


def check_epsilon(owner: str, epsilon, *, allow_none: bool = False, option: str = "epsilon"):
    """A positive finite number (or a Quantity with such a mantissa)."""
    if epsilon is None:
        if allow_none:
            return None
        raise TypeError(f"{owner}: {option} must be a positive finite number, got None.")
    value = getattr(epsilon, "mantissa", epsilon)
    try:
        if isinstance(value, (str, bytes)) or np.asarray(value).dtype.kind not in "iuf":
            raise TypeError
        as_float = float(np.asarray(value))
    except (TypeError, ValueError):
        raise TypeError(
            f"{owner}: {option} must be a positive finite number, got "
            f"{type(epsilon).__name__} {epsilon!r}."
        ) from None
    if not math.isfinite(as_float) or as_float <= 0:
        raise ValueError(f"{owner}: {option} must be a positive finite number, got {epsilon!r}.")
    return epsilon


def check_momentum(owner: str, momentum, *, allow_none: bool = True):
    """A number in [0, 1] (None: cumulative average, where allowed), or an array of such numbers.

    An array momentum (one value per running statistic, for example per time
    step, or a cumulative average's ``1 - 1 / (n + 1)`` computed from a traced
    counter) is returned as a JAX array; its range is checked when its values
    are known (not under a trace).
    """
    if momentum is None:
        if allow_none:
            return None
        raise TypeError(f"{owner}: momentum must be a number in [0, 1], got None.")
    expected = "a number in [0, 1]" + (" or None" if allow_none else "") + " (or an array of such numbers)"
    try:
        if isinstance(momentum, (str, bytes, bool)):
            raise TypeError
        kind = jnp.result_type(momentum).kind
        if kind not in "iuf":
            raise TypeError
    except (TypeError, ValueError):
        raise TypeError(f"{owner}: momentum must be {expected}, got {type(momentum).__name__} {momentum!r}.") from None
    if isinstance(momentum, jax.core.Tracer):
        return momentum
    values = np.asarray(momentum, np.float64)
    if not np.all((values >= 0.0) & (values <= 1.0)):
        raise ValueError(f"{owner}: momentum must be in [0, 1] or None, got {momentum!r}.")
    if values.ndim == 0 and not isinstance(momentum, jax.Array):
        return float(values)
    return jnp.asarray(momentum, jnp.result_type(float))


def check_momentum_shape(owner: str, momentum, stat_shape) -> None:
    """An array momentum must broadcast to the running statistics without changing their shape."""
    shape = tuple(np.shape(momentum))
    try:
        fits = np.broadcast_shapes(shape, tuple(stat_shape)) == tuple(stat_shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"{owner}: momentum must be a number or an array that broadcasts to the running statistics' "
            f"shape {tuple(stat_shape)}, got shape {shape}."
        )


def check_groups(owner: str, channels: int, num_groups, group_size) -> tuple[int, int]:
    """Resolve ``(num_groups, group_size)``: exactly one given, dividing ``channels``."""
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            f"{owner}: exactly one of num_groups and group_size must be given, got "
            f"num_groups={num_groups!r}, group_size={group_size!r} (pass num_groups=None "
            f"to use group_size)."
        )
    if group_size is not None:
        group_size = check_positive_int(owner, "group_size", group_size)
        if channels % group_size:
            raise ValueError(
                f"{owner}: group_size must divide the number of channels {channels}, got {group_size}."
            )
        return channels // group_size, group_size
    num_groups = check_positive_int(owner, "num_groups", num_groups)
    if channels % num_groups:
        raise ValueError(
            f"{owner}: num_groups must divide the number of channels {channels}, got {num_groups}."
        )
    return num_groups, channels // num_groups


def check_running_statistics(owner: str, running_mean, running_var, kept_shape) -> None:
    """Both or neither given, each with one entry per statistic and broadcastable to it."""
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            f"{owner}: give both running_mean and running_var or neither, got "
            f"running_mean={'None' if running_mean is None else 'an array'}, "
            f"running_var={'None' if running_var is None else 'an array'}."
        )
    if running_mean is None:
        return
    size = math.prod(kept_shape)
    for option, value in (("running_mean", running_mean), ("running_var", running_var)):
        shape = tuple(np.shape(getattr(value, "mantissa", value)))
        try:
            fits = np.broadcast_shapes(shape, kept_shape) == tuple(kept_shape)
        except ValueError:
            fits = False
        if not fits or math.prod(shape) != size:
            raise ValueError(
                f"{owner}: {option} must have one entry per statistic (shape {tuple(kept_shape)} or "
                f"one that broadcasts to it with {size} entries), got shape {shape}."
            )


def check_positive_int(owner: str, option: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{owner}: {option} must be a positive int, got {type(value).__name__} {value!r}.")
    if value <= 0:
        raise ValueError(f"{owner}: {option} must be a positive int, got {value!r}.")
    return int(value)


def check_trailing_shape(owner: str, shape: Sequence[int], in_size: tuple[int, ...]) -> int:
    """Check that ``shape`` ends with ``in_size``; return the number of batch axes."""
    shape = tuple(shape)
    n = len(in_size)
    if len(shape) < n or shape[len(shape) - n:] != in_size:
        raise ValueError(
            f"{owner}: expected an input whose trailing shape is in_size={in_size} "
            f"(with any number of leading batch axes), got shape {shape}."
        )
    return len(shape) - n


def check_mask(owner: str, mask, shape: Sequence[int]):
    """Return ``mask`` as a boolean array that broadcasts to ``shape`` (or None).

    Integer masks are read as ``mask != 0``; floating masks are refused because
    a soft weight is not a valid/invalid decision.
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if jnp.issubdtype(mask.dtype, jnp.floating) or jnp.issubdtype(mask.dtype, jnp.complexfloating):
        raise TypeError(
            f"{owner}: mask must be boolean (or integer, read as mask != 0), got dtype "
            f"{mask.dtype}. Use mask > 0.5 or mask.astype(bool) for a 0/1 float mask."
        )
    shape = tuple(shape)
    try:
        broadcast = np.broadcast_shapes(mask.shape, shape)
    except ValueError:
        broadcast = None
    if broadcast != shape:
        raise ValueError(
            f"{owner}: mask of shape {mask.shape} does not broadcast to the input "
            f"shape {shape}."
        )
    if mask.dtype != jnp.bool_:
        mask = mask != 0
    return mask


def check_choice(owner: str, option: str, value, choices):
    if value not in choices:
        raise ValueError(f"{owner}: {option} must be one of {choices!r}, got {value!r}.")
    return value
