"""Type aliases of brainnorm's public signatures.

They say what a parameter accepts, for readers and for static type checkers
(pyright, mypy); runtime validation is in :mod:`brainnorm._validation`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeAlias

import brainstate
import brainunit as u
import jax
from jax.typing import ArrayLike, DTypeLike

__all__ = [
    "Array",
    "ArrayLike",
    "AxisIndexGroups",
    "AxisName",
    "Axes",
    "DTypeLike",
    "Epsilon",
    "Initializer",
    "Input",
    "Momentum",
    "Output",
    "Size",
    "StateType",
    "Unit",
    "Value",
]

Array: TypeAlias = jax.Array
#: A per-sample shape: an int means ``(int,)``.
Size: TypeAlias = int | Sequence[int]
#: One axis or several, counted within ``in_size`` (layers) or on ``x`` (functions).
Axes: TypeAlias = int | Sequence[int]
#: An input: an array (or anything ``jnp.asarray`` takes) or a ``brainunit.Quantity``.
Input: TypeAlias = ArrayLike | u.Quantity | u.Unit
#: A number, array or Quantity (brainunit types ``10 * u.mV`` as ``Unit | Quantity``, so a Unit is accepted too).
Value: TypeAlias = ArrayLike | u.Quantity | u.Unit
#: What a layer or function returns when units can flow through (a Quantity where they do).
Output: TypeAlias = jax.Array | u.Quantity
#: An initializer: a ``braintools.init`` / ``brainstate.nn.init`` object or any callable taking the
#: shape, or the value itself (array, scalar or Quantity).
Initializer: TypeAlias = Callable[..., Any] | ArrayLike | u.Quantity | u.Unit
#: A positive epsilon, plain or in the squared unit of the statistics (brainunit types ``1e-5 * u.mV**2``
#: as ``Unit | Quantity``, so a Unit is accepted too).
Epsilon: TypeAlias = float | u.Quantity | u.Unit
#: Weight of the old running value in [0, 1] (a scalar, or an array with one value per channel).
Momentum: TypeAlias = float | ArrayLike
#: Name(s) of mapped axes (``vmap``/``pmap``/``shard_map``) to reduce statistics over.
AxisName: TypeAlias = Hashable | Sequence[Hashable]
AxisIndexGroups: TypeAlias = Sequence[Sequence[int]]
#: A unit of the running statistics.
Unit: TypeAlias = u.Unit
#: A ``brainstate.State`` subclass.
StateType: TypeAlias = type[brainstate.State]
