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
    if isinstance(in_size, (str, bytes)):  # iterable, but not a shape: '' would pass as the empty shape
        raise TypeError(
            f"{owner}: in_size must be an int or a sequence of ints, got {type(in_size).__name__} {in_size!r}."
        )
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
        # a dtype class (jnp.int32) or a dtype is a kind of number, not a number
        if isinstance(momentum, (str, bytes, bool, type, np.dtype)):
            raise TypeError
        kind = jnp.result_type(momentum).kind
        if kind not in "iuf":
            raise TypeError
    except (TypeError, ValueError):
        raise TypeError(f"{owner}: momentum must be {expected}, got {type(momentum).__name__} {momentum!r}.") from None
    if isinstance(momentum, jax.core.Tracer):
        return momentum
    try:
        values = np.asarray(momentum, np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{owner}: momentum must be {expected}, got {type(momentum).__name__} {momentum!r}.") from None
    if not np.all((values >= 0.0) & (values <= 1.0)):
        raise ValueError(f"{owner}: momentum must be in [0, 1] or None, got {momentum!r}.")
    if values.ndim == 0 and not isinstance(momentum, jax.Array):
        return float(values)
    return jnp.asarray(momentum, jnp.result_type(float))


def check_momentum_shape(owner: str, momentum, stat_shape, target: str = "the running statistics' shape") -> None:
    """An array momentum must broadcast to ``stat_shape`` (described by ``target``) without changing it."""
    shape = tuple(np.shape(momentum))
    try:
        fits = np.broadcast_shapes(shape, tuple(stat_shape)) == tuple(stat_shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"{owner}: momentum must be a number or an array that broadcasts to {target} "
            f"{tuple(stat_shape)}, got shape {shape}."
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
    """One of ``choices`` (strings): another type is a ``TypeError``, another string a ``ValueError``.

    The type is checked first, so an array is refused without asking for its
    truth value (``array in choices`` is ambiguous).
    """
    if not isinstance(value, str):
        raise TypeError(f"{owner}: {option} must be one of {choices!r}, got {type(value).__name__} {value!r:.80}.")
    if value not in choices:
        raise ValueError(f"{owner}: {option} must be one of {choices!r}, got {value!r}.")
    return value


def check_name(owner: str, name):
    """A module name: None or a string (brainstate asserts this with a bare ``AssertionError``)."""
    if name is not None and not isinstance(name, str):
        raise TypeError(f"{owner}: name must be a str or None, got {type(name).__name__} {name!r:.80}.")
    return name


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


def check_real(
    owner: str, option: str, value, *, positive: bool = False, nonnegative: bool = False, dtype=None
) -> float:
    """A finite real number (Python or NumPy scalar, or a 0-d array); returned as a float.

    With ``dtype`` the number must also stay finite when cast to it (1e300 is
    finite in Python but ``inf`` in float32, where it would turn outputs into
    ``inf`` or ``nan``).
    """
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
    if dtype is not None:
        check_representable(owner, option, number, dtype)
    return number


def check_representable(owner: str, option: str, number: float, dtype) -> None:
    """``number`` must not overflow when cast to the floating ``dtype``."""
    real = jnp.zeros((), dtype).real.dtype
    with np.errstate(over="ignore"):
        finite = bool(np.isfinite(np.asarray(number, real)))
    if not finite:
        largest = float(jnp.finfo(real).max)
        raise ValueError(
            f"{owner}: {option} must be representable in {jnp.dtype(real).name} (magnitude at most "
            f"{largest:.8g}), got {number!r}."
        )


def widest_statistics_dtype():
    """float64 when ``jax_enable_x64`` is on, else float32: the widest dtype statistics are computed in."""
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def check_local_response(owner: str, alpha, beta, k, dtype=None) -> tuple[float, float, float]:
    """``(alpha, beta, k)`` of local response normalization, ``x * (k + alpha / n * sum x^2)^(-beta)``.

    The base ``k + alpha / n * sum`` must stay positive wherever ``beta > 0``
    (else ``(negative)^(-beta)`` is nan and ``0^(-beta)`` is inf, times a zero
    input nan): ``alpha >= 0`` and ``k >= 0``, and ``k > 0`` unless ``beta ==
    0`` (an all-zero window, common after a ReLU, has a zero base when
    ``k == 0``). The gain ``(k + alpha / n * sum)^(-beta)`` must be
    representable in ``dtype`` for every window of inputs in [-1, 1]: at its
    largest ``k^(-beta)`` (an all-zero window) when ``beta > 0``, which
    overflows for ``k < 1`` with a large beta, and ``(k + alpha)^(-beta)`` (a
    window of ones) when ``beta < 0``, which amplifies ``x`` by a growing
    power of its window's energy. PyTorch accepts all of these values and
    returns nan or inf. ``dtype`` is the statistics dtype the values must fit
    in (default: the widest in use).
    """
    dtype = widest_statistics_dtype() if dtype is None else dtype
    alpha = check_real(owner, "alpha", alpha, dtype=dtype)
    beta = check_real(owner, "beta", beta, dtype=dtype)
    k = check_real(owner, "k", k, dtype=dtype)
    if alpha < 0:
        raise ValueError(
            f"{owner}: alpha must be a non-negative finite real number (a negative alpha makes the base "
            f"k + alpha / size * sum(x^2) negative for large inputs, and its power nan), got {alpha!r}."
        )
    if k < 0:
        raise ValueError(
            f"{owner}: k must be a non-negative finite real number (a negative k makes the base "
            f"k + alpha / size * sum(x^2) negative for small inputs, and its power nan), got {k!r}."
        )
    real = jnp.zeros((), dtype).real.dtype
    # a k that rounds to 0 in the statistics dtype is 0 there
    if beta > 0 and float(np.asarray(k, real)) == 0:
        raise ValueError(
            f"{owner}: k must be positive (and not round to 0 in {jnp.dtype(real).name}) when beta > 0 (with "
            f"k = 0 an all-zero window has base 0, and 0 * 0^(-beta) is nan), got k={k!r} with beta={beta!r}."
        )
    # the gain (k + alpha / n * sum(x^2))^(-beta) must be finite for every window of inputs in [-1, 1]
    # (sum(x^2) / n in [0, 1]): at its largest, k^(-beta) for beta > 0 (an all-zero window) and
    # (k + alpha)^(-beta) for beta < 0 (a window of ones); a larger gain overflows to inf
    log_max = math.log(float(jnp.finfo(real).max))
    if 0 < k < 1 and beta > 0 and beta * math.log(1.0 / k) >= log_max:
        raise ValueError(
            f"{owner}: beta must be small enough that the largest gain k^(-beta) is representable in "
            f"{jnp.dtype(real).name} (k < 1 raised to a large -beta overflows to inf), got beta={beta!r} "
            f"with k={k!r}."
        )
    if beta < 0 and k + alpha > 1 and -beta * math.log(k + alpha) >= log_max:
        raise ValueError(
            f"{owner}: beta must be small enough in magnitude that the gain (k + alpha)^(-beta) of a window of "
            f"ones is representable in {jnp.dtype(real).name} (a negative beta amplifies x by a power of its "
            f"window's energy), got beta={beta!r} with k={k!r}, alpha={alpha!r}."
        )
    return alpha, beta, k


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
            # an int (or bool) is refused: JAX reads an int axis as a positional axis, not a mapped name
            if name is None or isinstance(name, (bool, np.bool_, numbers.Number, np.generic)):
                raise TypeError(
                    f"{owner}: axis_name must be a hashable name (e.g. 'batch') or a tuple of names, got "
                    f"{type(axis_name).__name__} {axis_name!r}."
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
