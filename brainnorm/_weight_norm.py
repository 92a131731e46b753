"""Weight reparametrizations that wrap a layer: WeightNorm and SpectralNorm.

Both compute a weight from their own states at every call and run the wrapped
layer with it. The wrapped layer's weight state is swapped for the call and
restored afterwards, so its stored value is never overwritten (flax's
WeightNorm writes the normalized kernel into the wrapped module).

WeightNorm's trainable parameters are ``g`` and ``v``: it takes the wrapped
weight out of the layer's ``ParamState`` so that an optimizer over
``states(brainstate.ParamState)`` neither keeps moments for nor decays a
weight that is never used. SpectralNorm trains the wrapped weight itself
(``W / sigma(W)``), so there it stays a ``ParamState``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

from . import _units
from . import functional as F
from ._base import _RunningStatistics
from ._typing import Array
from ._validation import canonical_axes, check_epsilon, check_flag, check_name, check_positive_int

__all__ = ["WeightNorm", "SpectralNorm"]


def _find_weight(owner, layer, weight_name):
    """``(attribute, key)`` locating the wrapped weight state.

    brainstate layers keep ``{'weight': w, 'bias': b}`` in one ParamState named
    ``weight``; a layer may also hold the array directly in a ParamState
    attribute called ``weight_name`` (then ``key`` is None).
    """
    if not isinstance(layer, brainstate.nn.Module):
        raise TypeError(f"{owner}: layer must be a brainstate.nn.Module, got {type(layer).__name__}.")
    if not isinstance(weight_name, str):
        raise TypeError(
            f"{owner}: weight_name must be a str (an entry of layer.weight.value or a ParamState attribute of "
            f"the layer), got {type(weight_name).__name__} {weight_name!r:.80}."
        )
    for attr in ("weight", weight_name):
        state = getattr(layer, attr, None)
        if isinstance(state, brainstate.ParamState):
            value = state.value
            if isinstance(value, dict) and weight_name in value:
                return attr, weight_name
            if attr == weight_name and not isinstance(value, dict):
                return attr, None
    raise ValueError(
        f"{owner}: weight_name must name the layer's weight, got {weight_name!r}: layer {type(layer).__name__} "
        f"has no ParamState holding it (expected layer.weight.value[{weight_name!r}] or a ParamState attribute "
        f"{weight_name!r})."
    )


def _check_weight_epsilon(owner, epsilon):
    """A positive finite epsilon without a unit: it bounds a norm of the wrapped weight, which has none."""
    return check_epsilon(owner, _units.in_unit(owner, "epsilon", epsilon, None))


class _WeightWrapper(brainstate.nn.Module):
    """Runs ``layer`` with a weight computed by :meth:`_weight`."""

    def __init__(self, layer, weight_name, name=None):
        super().__init__(name=check_name(type(self).__name__, name))
        self._owner = type(self).__name__
        self.layer = layer
        self.weight_name = weight_name
        # Keep the attribute name, not the state: the state stays reachable only
        # through ``self.layer``, under its own path.
        self._attr, self._key = _find_weight(self._owner, layer, weight_name)
        # brainstate's Module rejects ``in_size = None``: copy only the sizes the layer has.
        for attr in ("in_size", "out_size"):
            size = getattr(layer, attr, None)
            if size is not None:
                setattr(self, attr, size)

    @property
    def _state(self):
        return getattr(self.layer, self._attr)

    def _stored_weight(self):
        value = self._state.value
        return value if self._key is None else value[self._key]

    @contextmanager
    def _weight_in_layer(self, weight):
        original = self._state.value
        # The slot may lack the weight entry (WeightNorm removes it), so the
        # value written for the call can differ in tree structure from the
        # stored one; the stored value is restored whatever happens.
        value = weight if self._key is None else {**original, self._key: weight}
        with brainstate.check_state_value_tree(False):
            self._state.value = value
        try:
            yield
        finally:
            with brainstate.check_state_value_tree(False):
                self._state.value = original

    def _detach_weight(self):
        """Take the wrapped weight out of the layer's trainable states.

        A dict slot (``layer.weight.value = {'weight': w, 'bias': b}``) keeps its
        other entries in the same ``ParamState``, at the same path; a slot left
        with no trainable entry, or one holding the weight array alone, becomes a
        non-trainable ``brainstate.State`` (holding ``{}``, or the weight at
        construction). The weight is put back in the slot for each call.
        """
        state = self._state
        value = state.value
        if self._key is not None:
            value = {k: v for k, v in value.items() if k != self._key}
            if value:
                with brainstate.check_state_value_tree(False):
                    state.value = value
                return
        setattr(self.layer, self._attr, brainstate.State(value))

    def _weight(self, use_running_average):
        """``(weight, writes)``: the weight to use and the state writes to commit
        once the wrapped call has succeeded (a call that raises writes nothing)."""
        raise NotImplementedError

    def normalized_weight(self) -> Array:
        """The weight the wrapped layer computes with, without updating any state.

        Returns
        -------
        Array
            Same shape as the wrapped weight.
        """
        return self._weight(True)[0]

    def update(self, *args: Any, use_running_average: bool | None = None, **kwargs: Any) -> Any:
        """Call the wrapped layer with the reparametrized weight; ``wrapper(x, ...)`` calls this.

        Parameters
        ----------
        *args : Any
            Positional arguments of the wrapped layer's call (its input).
        use_running_average : bool, optional
            SpectralNorm: True uses the stored power-iteration vectors
            (evaluation), False runs ``n_steps`` more iterations and stores
            them; None defers to the constructor, then ``environ['fit']``,
            else trains. WeightNorm accepts and ignores it.
        **kwargs : Any
            Keyword arguments of the wrapped layer's call.

        Returns
        -------
        Any
            The wrapped layer's output, computed with the normalized weight.
        """
        weight, writes = self._weight(use_running_average)
        with self._weight_in_layer(weight):
            output = self.layer(*args, **kwargs)
        for state, value in writes:
            state.value = value
        return output

    if TYPE_CHECKING:  # brainstate's Module.__call__ (untyped) forwards to update: its types, for checkers

        def __call__(self, *args: Any, use_running_average: bool | None = None, **kwargs: Any) -> Any: ...


class WeightNorm(_WeightWrapper):
    r"""Weight normalization (Salimans and Kingma, 2016).

    .. math:: w = g \, \frac{v}{\max(\lVert v \rVert, \epsilon)}

    with the norm over every axis of the weight but the output ``axis``,
    formed as :func:`brainnorm.functional.lp_normalize` forms it (on values
    rescaled by a power of two, so no square overflows at any float32
    magnitude). ``g`` starts at :math:`\lVert v \rVert` and ``v`` at the
    wrapped weight, so the wrapped layer computes the same function at
    construction (PyTorch and equinox; flax starts ``g`` at 1). ``g`` and
    ``v`` are trainable ``ParamState``\ s and replace the wrapped weight,
    which is taken out of the layer's ``ParamState``:
    ``wrapper.states(brainstate.ParamState)`` holds exactly ``g``, ``v`` and
    the layer's other parameters (the bias, still at
    ``layer.weight.value['bias']``), so an optimizer keeps no moments for, and
    applies no weight decay to, a weight that is never used. A slot left with
    no trainable entry (a layer without bias, or a weight held in its own
    ``ParamState``) becomes a non-trainable ``brainstate.State``. The wrapped
    layer is meant to be called through the wrapper, which puts the
    normalized weight in the slot for each call: ``wrapper(x, ...)`` takes
    the wrapped layer's own arguments (see :meth:`update`).

    Parameters
    ----------
    layer : brainstate.nn.Module
        A layer whose weight lives in a ParamState: ``brainstate.nn.Linear``
        (weight ``(in, out)``), ``Conv1d/2d/3d`` (kernel ``(*k, in, out)``), ...
    weight_name : str
        Entry of ``layer.weight.value`` (or name of a ParamState attribute of
        the layer) to reparametrize. Default ``'weight'``.
    axis : int or sequence of int
        Output axis of the weight, kept by the norm (brainstate's layout: -1,
        the counterpart of PyTorch's ``dim=0``). Default ``-1``.
    epsilon : float
        Lower bound of the norm, which keeps a zero ``v`` finite. Default
        1e-12.
    name : str, optional
        Module name reported by brainstate.

    Attributes
    ----------
    g : brainstate.ParamState
        Magnitude, shape of the weight with 1 on every non-output axis.
    v : brainstate.ParamState
        Direction, shape of the weight.

    References
    ----------
    Salimans, Kingma. Weight Normalization: A Simple Reparameterization to
    Accelerate Training of Deep Neural Networks. NeurIPS 2016.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, brainnorm
    >>> linear = brainstate.nn.Linear(3, 2)
    >>> x = jnp.ones((4, 3))
    >>> y = linear(x)
    >>> wn = brainnorm.WeightNorm(linear)
    >>> bool(jnp.allclose(wn(x), y, atol=1e-6))
    True
    >>> sorted(wn.states(brainstate.ParamState).keys())   # trainable: g, v and the bias
    [('g',), ('layer', 'weight'), ('v',)]
    >>> list(linear.weight.value)
    ['bias']
    """

    g: brainstate.ParamState
    v: brainstate.ParamState

    def __init__(
        self,
        layer: brainstate.nn.Module,
        *,
        weight_name: str = "weight",
        axis: int | Sequence[int] = -1,
        epsilon: float = 1e-12,
        name: str | None = None,
    ) -> None:
        super().__init__(layer, weight_name, name=name)
        weight = jnp.asarray(self._stored_weight())
        self.axis = canonical_axes(self._owner, "axis", axis, weight.ndim)
        self.epsilon = _check_weight_epsilon(self._owner, epsilon)
        self._norm_axes = tuple(a for a in range(weight.ndim) if a not in self.axis)
        self.v = brainstate.ParamState(weight)
        # ||v|| recovered from the core's direction d = v / ||v|| at the largest entry, |v_k| / |d_k|: no sum
        # of squares here, so no overflow where ||v|| itself is representable (a zero column gives 0)
        tiny = float(jnp.finfo(jnp.promote_types(weight.dtype, jnp.float32)).tiny)
        largest = jnp.max(jnp.abs(self._direction(weight, tiny)), axis=self._norm_axes, keepdims=True)
        magnitude = jnp.max(jnp.abs(weight), axis=self._norm_axes, keepdims=True)
        norm = jnp.where(largest > 0, magnitude / jnp.where(largest > 0, largest, 1), 0)
        self.g = brainstate.ParamState(norm.astype(weight.dtype))
        self._detach_weight()

    def _direction(self, v, epsilon):
        """``v / max(||v||, epsilon)`` over the norm axes.

        ``lp_normalize`` forms the norm on values rescaled by a power of two,
        so no square overflows (weights of magnitude 1e20 and up) and the
        gradient is finite at a zero column. The size-1 axis appended makes
        an empty set of norm axes (every axis an output axis) a norm over one
        element.
        """
        return F.lp_normalize(v[..., None], 2, axis=self._norm_axes + (-1,), epsilon=epsilon)[..., 0]

    def _weight(self, use_running_average):
        return self.g.value * self._direction(self.v.value, self.epsilon), ()


class SpectralNorm(_RunningStatistics, _WeightWrapper):
    r"""Spectral normalization (Miyato et al., 2018).

    .. math:: w = \frac{W}{\sigma(W)}, \qquad \sigma(W) \approx u^\top W v

    with :math:`u, v` from power iteration on the matrix view of the weight:
    the output ``axis`` moved first and the remaining axes flattened, so a
    brainstate conv kernel ``(*k, in, out)`` becomes ``(out, prod(k) * in)``
    (PyTorch flattens ``(out, in, *k)``; the order of the columns does not
    change :math:`\sigma`). As in PyTorch, ``u`` and ``v`` start from normal
    draws refined by 15 iterations at construction; each training call runs
    ``n_steps`` more (without gradient through them) and stores them in
    ``ShortTermState``\ s; evaluation uses the stored vectors and leaves them
    untouched. The mode follows the BatchNorm rules (``use_running_average=``,
    constructor, ``environ['fit']``, training). :math:`\sigma` is bounded
    below by ``epsilon``, so an all-zero weight stays finite. Call the
    wrapper as ``wrapper(x, ..., use_running_average=None)`` with the wrapped
    layer's own arguments (see :meth:`update`).

    Parameters
    ----------
    layer : brainstate.nn.Module
        Layer whose weight lives in a ParamState (``Linear``, ``Conv1d/2d/3d``).
    weight_name : str
        Entry of ``layer.weight.value`` (or name of a ParamState attribute of
        the layer) to normalize. Default ``'weight'``.
    n_steps : int
        Power iterations per training call. Default 1.
    epsilon : float
        Lower bound of the norms of ``u`` and ``v`` and of :math:`\sigma`.
        Default 1e-12.
    axis : int
        Output axis of the weight, the rows of the matrix view. Default
        ``-1``.
    use_running_average : bool, optional
        A fixed mode for every call: True evaluates (no iteration), False
        trains. None: decided per call.
    name : str, optional
        Module name reported by brainstate.

    Attributes
    ----------
    u : brainstate.ShortTermState
        Left power-iteration vector, shape ``(out,)``.
    v : brainstate.ShortTermState
        Right power-iteration vector, shape ``(weight.size // out,)``.

    References
    ----------
    Miyato, Kataoka, Koyama, Yoshida. Spectral Normalization for Generative
    Adversarial Networks. ICLR 2018.

    Examples
    --------
    >>> import brainstate, jax.numpy as jnp, brainnorm
    >>> sn = brainnorm.SpectralNorm(brainstate.nn.Linear(4, 3), n_steps=5)
    >>> with brainstate.environ.context(fit=True):
    ...     y = sn(jnp.ones((2, 4)))
    >>> sigma = jnp.linalg.svd(sn.normalized_weight(), compute_uv=False)[0]
    >>> bool(abs(sigma - 1.0) < 1e-2)   # largest singular value of the used weight
    True
    """

    u: brainstate.ShortTermState
    v: brainstate.ShortTermState

    def __init__(
        self,
        layer: brainstate.nn.Module,
        *,
        weight_name: str = "weight",
        n_steps: int = 1,
        epsilon: float = 1e-12,
        axis: int = -1,
        use_running_average: bool | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(layer, weight_name, name=name)
        weight = jnp.asarray(self._stored_weight())
        if weight.ndim < 2:
            raise ValueError(f"{self._owner}: the weight must have at least 2 axes, got shape {weight.shape}.")
        if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
            raise TypeError(f"{self._owner}: axis must be an int (the output axis of the weight), got {axis!r}.")
        self.axis = canonical_axes(self._owner, "axis", axis, weight.ndim)[0]
        self.n_steps = check_positive_int(self._owner, "n_steps", n_steps)
        self.epsilon = _check_weight_epsilon(self._owner, epsilon)
        self.use_running_average = check_flag(self._owner, "use_running_average", use_running_average, allow_none=True)
        matrix = jax.lax.stop_gradient(self._matrix(weight))
        rows, cols = matrix.shape
        u = self._unit(brainstate.random.normal(size=(rows,)).astype(matrix.dtype))
        v = self._unit(brainstate.random.normal(size=(cols,)).astype(matrix.dtype))
        u, v = self._power_iteration(matrix, u, v, 15)
        self.u = brainstate.ShortTermState(u)
        self.v = brainstate.ShortTermState(v)

    def _matrix(self, weight):
        rows = weight.shape[self.axis]
        return jnp.moveaxis(weight, self.axis, 0).reshape(rows, math.prod(weight.shape) // rows)

    def _unit(self, vector):
        """``vector / max(||vector||, epsilon)``; scale-safe (``lp_normalize``), so a weight of magnitude 1e20
        and up, whose squares overflow, still gives unit vectors and its sigma."""
        return F.lp_normalize(vector, 2, axis=0, epsilon=self.epsilon)

    def _power_iteration(self, matrix, u, v, steps):
        for _ in range(steps):
            u = self._unit(matrix @ v)
            v = self._unit(matrix.T @ u)
        return u, v

    def _weight(self, use_running_average):
        weight = self._stored_weight()
        matrix = self._matrix(weight)
        u, v = self.u.value, self.v.value
        writes = ()
        if self._is_training(use_running_average):
            u, v = self._power_iteration(jax.lax.stop_gradient(matrix), u, v, self.n_steps)
            writes = ((self.u, u), (self.v, v))
        sigma = jnp.dot(u, matrix @ v)
        return weight / jnp.maximum(sigma, self.epsilon), writes
