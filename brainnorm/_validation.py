"""Static checks shared by every layer and function.

Every check runs on Python values and static shapes only, so it is free under
``jit`` and never needs a host round trip. Messages follow one pattern:
``"<owner>: <option> must be <expected>, got <given>."``
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

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
    """A number in [0, 1] (None: cumulative average, where allowed)."""
    if momentum is None:
        if allow_none:
            return None
        raise TypeError(f"{owner}: momentum must be a number in [0, 1], got None.")
    try:
        if isinstance(momentum, (str, bytes, bool)) or np.asarray(momentum).dtype.kind not in "iuf":
            raise TypeError
        as_float = float(momentum)
    except (TypeError, ValueError):
        raise TypeError(
            f"{owner}: momentum must be a number in [0, 1] or None, got "
            f"{type(momentum).__name__} {momentum!r}."
        ) from None
    if not 0.0 <= as_float <= 1.0:
        raise ValueError(f"{owner}: momentum must be in [0, 1] or None, got {momentum!r}.")
    return as_float


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
