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
            f"{owner}: in_size must be an int or a sequence of ints, got {type(in_size).__name__} {in_size!r}."
        ) from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (numbers.Integral, np.integer)):
            raise TypeError(f"{owner}: in_size must contain ints, got {type(d).__name__} {d!r} in in_size={in_size!r}.")
        if d <= 0:
            raise ValueError(f"{owner}: in_size must contain positive sizes, got {tuple(in_size)!r}.")
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
            f"{owner}: {option} must be an int or a sequence of ints, got {type(axes).__name__} {axes!r}."
        ) from None
    result = []
    for a in given:
        if isinstance(a, bool) or not isinstance(a, (numbers.Integral, np.integer)):
            raise TypeError(f"{owner}: {option} must contain ints, got {type(a).__name__} {a!r}.")
        if not -ndim <= int(a) < ndim:
            raise ValueError(f"{owner}: {option} must be in [-{ndim}, {ndim}) for a rank-{ndim} shape, got {given!r}.")
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
            f"{owner}: {option} must be a positive finite number, got {type(epsilon).__name__} {epsilon!r}."
        ) from None
    if not math.isfinite(as_float) or as_float <= 0:
        raise ValueError(f"{owner}: {option} must be a positive finite number, got {epsilon!r}.")
    check_epsilon_range(owner, epsilon, None, option)
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
            raise ValueError(f"{owner}: group_size must divide the number of channels {channels}, got {group_size}.")
        return channels // group_size, group_size
    num_groups = check_positive_int(owner, "num_groups", num_groups)
    if channels % num_groups:
        raise ValueError(f"{owner}: num_groups must divide the number of channels {channels}, got {num_groups}.")
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
    if len(shape) < n or shape[len(shape) - n :] != in_size:
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
    mask = check_input(owner, mask, "mask")
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
        raise ValueError(f"{owner}: mask of shape {mask.shape} does not broadcast to the input shape {shape}.")
    if mask.dtype != jnp.bool_:
        mask = mask != 0
    return mask


def check_choice(owner: str, option: str, value, choices):
    if value not in choices:
        raise ValueError(f"{owner}: {option} must be one of {choices!r}, got {value!r}.")
    return value


def smallest_epsilon(dtype=None) -> float:
    """The smallest epsilon that does not round to 0 in the statistics dtype.

    ``dtype`` None means the widest statistics dtype in use: float64 when
    ``jax_enable_x64`` is on, else float32. XLA flushes subnormal numbers to
    zero, so the smallest normal number is the limit.
    """
    if dtype is None:
        dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
    return float(jnp.finfo(jnp.zeros((), dtype).real.dtype).tiny)


def check_epsilon_range(owner: str, epsilon, dtype, option: str = "epsilon") -> None:
    """A Python-number epsilon must not round to 0 in the statistics dtype ``dtype``."""
    value = getattr(epsilon, "mantissa", epsilon)
    if isinstance(value, jax.core.Tracer) or np.ndim(value) != 0:
        return
    limit = smallest_epsilon(dtype)
    if 0 < float(np.asarray(value)) < limit:
        raise ValueError(
            f"{owner}: {option} must be at least {limit:.8g} (the smallest normal "
            f"{jnp.dtype(jnp.zeros((), dtype).real.dtype).name}, the statistics dtype; smaller values round to 0), "
            f"got {epsilon!r}."
        )


def check_real(owner: str, option: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    """A finite real number (Python or NumPy scalar, or a 0-d array); returned as a float."""
    expected = "a finite real number"
    if positive:
        expected = "a positive finite real number"
    elif nonnegative:
        expected = "a non-negative finite real number"
    if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
        raise TypeError(f"{owner}: {option} must be {expected}, got {type(value).__name__} {value!r}.")
    try:
        array = np.asarray(value)
    except Exception:
        array = None
    if array is None or array.ndim != 0 or array.dtype.kind not in "iuf":
        raise TypeError(f"{owner}: {option} must be {expected}, got {type(value).__name__} {value!r}.")
    number = float(array)
    if not math.isfinite(number) or (positive and number <= 0) or (nonnegative and number < 0):
        raise ValueError(f"{owner}: {option} must be {expected}, got {value!r}.")
    return number


def check_flag(owner: str, option: str, value, *, allow_none: bool = False) -> bool | None:
    """A bool (or None where allowed); strings and numbers are refused (``bool('False')`` is True)."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    expected = "a bool" + (" or None" if allow_none else "")
    raise TypeError(f"{owner}: {option} must be {expected}, got {type(value).__name__} {value!r}.")


def check_dtype(owner: str, option: str, value, *, parameter: bool = False):
    """None or a dtype that NumPy and JAX understand; parameter dtypes must be floating.

    Returns the dtype as given (None stays None).
    """
    if value is None:
        return None
    try:
        if isinstance(value, str) and not value:
            raise TypeError
        dtype = jnp.dtype(value)
    except Exception:
        raise TypeError(f"{owner}: {option} must be a dtype (e.g. jnp.float32) or None, got {value!r}.") from None
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating)):
        what = "parameters and running statistics" if parameter else "outputs"
        raise TypeError(f"{owner}: {option} must be a floating dtype ({what} are real numbers), got {dtype.name}.")
    return value


def check_axis_name(owner: str, axis_name, axis_index_groups):
    """``(axis_name, axis_index_groups)`` validated: a hashable name or a tuple of names; groups need a name.

    A list of names is read as a tuple (JAX names must be hashable).
    Returns the groups as a tuple of tuples of ints.
    """
    if isinstance(axis_name, list):
        axis_name = tuple(axis_name)
    if axis_name is not None:
        names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
        for name in names:
            try:
                hash(name)
            except TypeError:
                raise TypeError(
                    f"{owner}: axis_name must be a hashable name (e.g. 'batch') or a tuple of names, got {axis_name!r}."
                ) from None
            if name is None or isinstance(name, (bool, float, complex)):
                raise TypeError(
                    f"{owner}: axis_name must be a hashable name (e.g. 'batch') or a tuple of names, got {axis_name!r}."
                )
        if not names:
            raise ValueError(f"{owner}: axis_name must name at least one axis, got {axis_name!r}.")
    if axis_index_groups is None:
        return axis_name, None
    if axis_name is None:
        raise ValueError(
            f"{owner}: axis_index_groups needs axis_name (the groups partition a named axis), got "
            f"axis_index_groups={axis_index_groups!r} with axis_name=None."
        )
    try:
        groups = tuple(tuple(i for i in group) for group in axis_index_groups)
    except TypeError:
        groups = None
    if (
        not groups
        or any(not g for g in groups)
        or any(
            isinstance(i, bool) or not isinstance(i, (numbers.Integral, np.integer)) or i < 0 for g in groups for i in g
        )
    ):
        raise TypeError(
            f"{owner}: axis_index_groups must be a sequence of non-empty sequences of non-negative ints, got "
            f"{axis_index_groups!r}."
        )
    flat = [int(i) for g in groups for i in g]
    if len(set(flat)) != len(flat) or len({len(g) for g in groups}) != 1:
        raise ValueError(
            f"{owner}: axis_index_groups must be groups of equal size without repeated indices, got "
            f"{axis_index_groups!r}."
        )
    return axis_name, tuple(tuple(int(i) for i in g) for g in groups)


def check_initializer(owner: str, option: str, init):
    """A callable (a brainstate initializer) or a numeric array-like (or Quantity)."""
    if callable(init):
        return init
    value = getattr(init, "mantissa", init)
    kind = None
    if not isinstance(value, (str, bytes)) and value is not None:
        try:
            kind = np.asarray(value).dtype.kind
        except Exception:
            kind = None
    if kind not in tuple("biuf"):
        raise TypeError(
            f"{owner}: {option} must be an initializer (a callable such as brainstate.nn.init.Constant(1.0)) "
            f"or an array of numbers, got {type(init).__name__} {init!r}."
        )
    return init


def check_input(owner: str, x, option: str = "x"):
    """A numeric array (or array-like); returns it as a JAX array."""
    if isinstance(x, jax.Array):
        dtype = x.dtype
    elif x is None or isinstance(x, (str, bytes)):
        dtype = None
    else:
        try:
            dtype = np.asarray(x).dtype
        except Exception:
            dtype = None
    if dtype is None or not (dtype == np.bool_ or jnp.issubdtype(dtype, jnp.number)):
        expected = "a boolean array" if option == "mask" else "an array of numbers (or a brainunit Quantity)"
        raise TypeError(f"{owner}: {option} must be {expected}, got {type(x).__name__} {x!r:.80}.")
    return jnp.asarray(x)


def check_time_index(owner: str, t):
    """A time step: a non-negative Python/NumPy int or a scalar integer JAX array (traced allowed).

    Floats (``1.7``), bools and arrays of several steps are refused: a step
    index is never rounded. Concrete values must be >= 0.
    """
    expected = "a non-negative int or a scalar integer array"
    if isinstance(t, (bool, np.bool_)):
        raise TypeError(f"{owner}: t must be {expected}, got bool {t!r}.")
    if isinstance(t, (numbers.Integral, np.integer)):
        if int(t) < 0:
            raise ValueError(f"{owner}: t must be {expected}, got {t!r}.")
        return int(t)
    if isinstance(t, (jax.Array, np.ndarray)):
        if t.ndim != 0 or not jnp.issubdtype(t.dtype, jnp.integer):
            raise TypeError(
                f"{owner}: t must be {expected}, got an array of shape {tuple(t.shape)} and dtype {t.dtype}."
            )
        if not isinstance(t, jax.core.Tracer):
            value = int(t)
            if value < 0:
                raise ValueError(f"{owner}: t must be {expected}, got {value}.")
            return value
        return t
    raise TypeError(f"{owner}: t must be {expected}, got {type(t).__name__} {t!r}.")


def check_broadcasts(owner: str, option: str, value, shape) -> None:
    """``value`` (an array or Quantity) must broadcast to ``shape`` without enlarging it."""
    given = tuple(jnp.shape(check_input(owner, getattr(value, "mantissa", value), option)))
    try:
        fits = np.broadcast_shapes(given, tuple(shape)) == tuple(shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"{owner}: {option} of shape {given} does not broadcast to the input shape {tuple(shape)}.")
