r"""Conversion of trained ReLU networks to spiking networks by data-based normalization.

A ReLU network's layer :math:`a_l = \max(0, W_l a_{l-1} + b_l)` becomes a
layer of integrate-and-fire neurons (threshold 1, reset by subtraction) whose
firing rates approximate :math:`a_l / \lambda_l` once every layer's weights
are rescaled by the recorded activation scales :math:`\lambda_l` (Diehl et
al., IJCNN 2015; Rueckauer et al., Front. Neurosci. 2017):

.. math::

    W_l' = W_l\,\frac{\lambda_{l-1}}{\lambda_l}, \qquad b_l' = \frac{b_l}{\lambda_l},
    \qquad \lambda_0 = \text{input scale}.

Because ReLU is positively homogeneous, the rescaled ReLU network computes
:math:`a_l / \lambda_l` exactly; the rates of the spiking network are capped
at one spike per step, so :math:`\lambda_l` must be (nearly) the largest
activation: the maximum (Diehl et al.) or a high percentile (Rueckauer et
al.'s robust normalization, which ignores a few outliers that would
otherwise slow every other neuron down).

* :func:`record_activations` runs the ReLU network on data and returns each
  layer's post-ReLU activations, or directly each layer's scale;
* :func:`normalize_for_conversion` computes the scales and returns the
  rescaled layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from . import _units
from ._validation import check_real

__all__ = ["normalize_for_conversion", "record_activations"]

_WEIGHT_LAYERS = (brainstate.nn.Linear, brainstate.nn.Conv1d, brainstate.nn.Conv2d, brainstate.nn.Conv3d)
_EXPECTED_LAYER = "a brainstate.nn.Linear, Conv1d, Conv2d or Conv3d (a layer with a weight)"


def _check_layers(owner: str, layers: Any) -> list:
    """``layers`` as a list of weight layers, refused with the position of the first that is not one."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable) or isinstance(layers, _WEIGHT_LAYERS):
        raise TypeError(
            f"{owner}: layers must be a sequence of weight layers ({_EXPECTED_LAYER} each), "
            f"got {type(layers).__name__}."
        )
    try:
        layers = list(layers)
    except TypeError:  # a 0-d array or Quantity is Iterable by its class but cannot be iterated
        raise TypeError(
            f"{owner}: layers must be a sequence of weight layers ({_EXPECTED_LAYER} each), "
            f"got {type(layers).__name__}."
        ) from None
    if not layers:
        raise ValueError(f"{owner}: layers must hold at least one weight layer, got an empty sequence.")
    for index, layer in enumerate(layers):
        # a Linear or Conv subclass that transforms its weight (weight standardization) would not be
        # rescaled by a rescaled weight: only these classes, whose output is linear in the weight
        params = getattr(getattr(layer, "weight", None), "value", None)
        if type(layer) not in _WEIGHT_LAYERS or not isinstance(params, dict) or "weight" not in params:
            raise TypeError(f"{owner}: layers[{index}] must be {_EXPECTED_LAYER}, got {type(layer).__name__}.")
    return layers


def _check_percentile(owner: str, percentile: Any) -> float:
    number = check_real(owner, "percentile", percentile)
    if not 0 < number <= 100:
        raise ValueError(f"{owner}: percentile must be in (0, 100] (100 is the maximum), got {percentile!r}.")
    return number


def _scale(owner: str, index: int, activations: Any, percentile: float):
    """``lam`` of one layer: the ``percentile``-th percentile of ``activations`` (float64 on the host)."""
    what = f"activations[{index}]"
    if isinstance(activations, Tracer) or isinstance(getattr(activations, "mantissa", None), Tracer):
        raise TypeError(
            f"{owner}: {what} must hold concrete values (the scales are computed on the host), got a traced "
            f"array: call {owner} outside jit/vmap/grad."
        )
    mantissa, unit = _units.split(activations)
    try:
        values = np.asarray(mantissa)
    except (TypeError, ValueError):  # ragged nesting
        values = np.asarray(None)
    if values.dtype.kind not in "iuf" or values.size == 0:
        raise TypeError(
            f"{owner}: {what} must be a non-empty array of real numbers (the post-ReLU activations of "
            f"layers[{index}], or its scale), got {type(activations).__name__} with "
            f"{'no values' if values.dtype.kind in 'iuf' else f'dtype {values.dtype}'}."
        )
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{owner}: {what} must be finite, got NaN or inf among its {values.size} values.")
    scale = float(np.percentile(values, percentile))
    if not scale > 0:
        # a zero scale would divide by zero: the layer never activates on the data, and no rescaling
        # can make its neurons fire; the data (or the network) does not fit conversion
        raise ValueError(
            f"{owner}: {what} must have a positive {percentile:g}-th percentile (the scale of layers[{index}]), "
            f"got {scale!r}: the layer's post-ReLU activations are {'mostly' if np.any(values) else 'all'} zero "
            f"on the data. Record them on more data, or use a higher percentile."
        )
    return _units.attach(scale, unit)


def _check_input_scale(owner: str, input_scale: Any):
    mantissa, unit = _units.split(input_scale)
    number = check_real(owner, "input_scale", mantissa, positive=True)
    return _units.attach(number, unit)


def _rescaled(owner: str, what: str, value: Any, factor: Any, scales: list):
    """``value * factor`` in ``value``'s dtype; a dimensionless result is a plain array.

    Refused when the product leaves the dtype's range (an input scale near float32's largest number, or
    scales that differ by as much): the spiking network would be driven by inf.
    """
    dtype = jnp.result_type(_units.split(value)[0])
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, with its cause
        mantissa, unit = _units.split(value * factor)
        rescaled = jnp.asarray(mantissa, dtype=dtype)
    if not bool(jnp.all(jnp.isfinite(rescaled))) and bool(jnp.all(jnp.isfinite(_units.split(value)[0]))):
        raise ValueError(
            f"{owner}: input_scale and the activation scales (their percentile) must keep the rescaled {what} within "
            f"{jnp.dtype(dtype).name}'s range, got scales {[str(scale) for scale in scales]} (input_scale first), "
            f"which overflow it."
        )
    return _units.attach(rescaled, unit)


def normalize_for_conversion(
    layers: Sequence[brainstate.nn.Module],
    activations: Iterable[Any],
    *,
    percentile: float = 99.99,
    input_scale: float | u.Quantity = 1.0,
) -> list[brainstate.nn.Module]:
    r"""Rescale the weight layers of a trained ReLU network for conversion to a spiking network.

    With :math:`\lambda_l` the ``percentile``-th percentile of layer ``l``'s
    post-ReLU activations (``percentile=100``: the maximum) and
    :math:`\lambda_0` = ``input_scale``, every layer ``l = 1..L`` becomes

    .. math:: W_l' = W_l\,\frac{\lambda_{l-1}}{\lambda_l}, \qquad b_l' = \frac{b_l}{\lambda_l}.

    The rescaled ReLU network computes :math:`a_l / \lambda_l` (ReLU is
    positively homogeneous), so with inputs divided by ``input_scale`` its
    activations are mostly in [0, 1]: the firing rates (spikes per step) of
    integrate-and-fire neurons with threshold 1 and reset by subtraction
    driven by the rescaled layers approach them as the simulation time grows
    (Diehl et al. 2015 with the maximum; Rueckauer et al. 2017's robust
    normalization with the 99.9th or 99.99th percentile).

    Parameters
    ----------
    layers : sequence of brainstate.nn.Linear, Conv1d, Conv2d or Conv3d
        The weight layers in order, each followed by ReLU in the trained
        network. Fold BatchNorm first (:func:`fold_batch_norm`).
    activations : iterable of arrays
        One entry per layer: its post-ReLU activations on (training) data,
        any shape (:func:`record_activations` returns them). The iterable is
        consumed one layer at a time, so a generator that computes each
        layer's activations when asked never holds more than one layer's.
        An entry may also be a layer's scale itself (a scalar, e.g. from
        ``record_activations(..., percentile=p)``): the percentile of one
        value is that value. Quantities are accepted; the scales then carry
        their units into the weights.
    percentile : float, optional
        In (0, 100]; 99.99 by default (NumPy's linear interpolation between
        the closest values).
    input_scale : float or Quantity, optional
        :math:`\lambda_0`, the largest input (1 for pixels in [0, 1]).

    Returns
    -------
    list of layers
        New layers of the same classes, options and weight masks (copies with
        :math:`W'` and :math:`b'` in the weights' dtypes; a layer without
        bias stays without). ``layers`` are left unchanged.

    Raises
    ------
    TypeError
        A layer that is not a Linear or Conv1d-3d (one without a weight), an
        entry of ``activations`` that is not an array of real numbers or is
        traced (the scales are computed on the host: call outside ``jit``),
        a percentile or input scale that is not a real number.
    ValueError
        A number of activation entries other than the number of layers, a
        percentile outside (0, 100], a non-positive input scale, NaN or inf
        in an activation, or a layer whose scale is 0 (its activations are
        all, or above the percentile, zero on the data: its neurons could
        never fire, so conversion refuses rather than divide by zero).

    References
    ----------
    Diehl, Neil, Binas, Cook, Liu, Pfeiffer. Fast-classifying, high-accuracy
    spiking deep networks through weight and threshold balancing. IJCNN 2015.

    Rueckauer, Lungu, Hu, Pfeiffer, Liu. Conversion of continuous-valued deep
    networks to efficient event-driven networks for image classification.
    Frontiers in Neuroscience 11:682, 2017.

    Examples
    --------
    >>> import brainstate, jax, jax.numpy as jnp, brainnorm
    >>> layers = [brainstate.nn.Linear(4, 8), brainstate.nn.Linear(8, 3)]
    >>> x = brainstate.random.uniform(size=(32, 4))
    >>> acts = brainnorm.record_activations(layers, x)
    >>> normalized = brainnorm.normalize_for_conversion(layers, acts, percentile=100)
    >>> scale = jnp.max(acts[-1])
    >>> out = jax.nn.relu(normalized[1](jax.nn.relu(normalized[0](x))))
    >>> bool(jnp.allclose(out, acts[-1] / scale, atol=1e-5))
    True
    """
    owner = "normalize_for_conversion"
    layers = _check_layers(owner, layers)
    percentile = _check_percentile(owner, percentile)
    previous = _check_input_scale(owner, input_scale)
    if isinstance(activations, (str, bytes)) or not isinstance(activations, Iterable) or hasattr(activations, "shape"):
        raise TypeError(
            f"{owner}: activations must be a sequence (or iterable) of arrays, one per layer "
            f"({len(layers)}), got {type(activations).__name__}."
        )
    scales = []
    count = 0
    for index, entry in enumerate(activations):
        count = index + 1
        if index < len(layers):
            scales.append(_scale(owner, index, entry, percentile))  # the entry is dropped here
    if count != len(layers):
        raise ValueError(f"{owner}: activations must hold one entry per layer ({len(layers)}), got {count}.")
    all_scales = [previous, *scales]
    normalized = []
    for index, (layer, scale) in enumerate(zip(layers, scales, strict=True)):
        params = dict(layer.weight.value)
        params["weight"] = _rescaled(
            owner, f"weight of layers[{index}]", params["weight"], previous / scale, all_scales
        )
        if "bias" in params:
            params["bias"] = _rescaled(owner, f"bias of layers[{index}]", params["bias"], 1 / scale, all_scales)
        copy = brainstate.graph.clone(layer)
        copy.weight.value = params
        normalized.append(copy)
        previous = scale
    return normalized


def record_activations(
    layers: Sequence[brainstate.nn.Module],
    x: Any,
    *,
    percentile: float | None = None,
) -> list[Any]:
    r"""Post-ReLU activations of each layer of the ReLU network ``relu(layer_L(...relu(layer_1(x))))``.

    Parameters
    ----------
    layers : sequence of brainstate.nn.Linear, Conv1d, Conv2d or Conv3d
        The weight layers in order (BatchNorm folded), each followed by ReLU.
    x : array
        A batch of inputs of the first layer (e.g. the training data).
    percentile : float, optional
        None (default): return the activations. A number in (0, 100]: return
        each layer's scale instead (the ``percentile``-th percentile of its
        activations, as a 0-d float64 NumPy array), computed while the
        network runs, so that no more than one layer's activations (and the
        next layer's input, the same array) are held at a time. Pass the
        scales to :func:`normalize_for_conversion` as its ``activations``:
        the percentile of one value is that value.

    Returns
    -------
    list
        One entry per layer: the activations :math:`a_l` (of the layer's
        output shape with the batch axes of ``x``), or the scales.

    Raises
    ------
    TypeError, ValueError
        As for :func:`normalize_for_conversion`: a layer without a weight, a
        percentile outside (0, 100]; also an ``x`` that is not an array of
        numbers or that the first layer refuses.

    Examples
    --------
    >>> import brainstate, brainnorm
    >>> layers = [brainstate.nn.Linear(4, 8), brainstate.nn.Linear(8, 3)]
    >>> x = brainstate.random.uniform(size=(32, 4))
    >>> [a.shape for a in brainnorm.record_activations(layers, x)]
    [(32, 8), (32, 3)]
    >>> scales = brainnorm.record_activations(layers, x, percentile=99.99)
    >>> normalized = brainnorm.normalize_for_conversion(layers, scales)
    """
    owner = "record_activations"
    layers = _check_layers(owner, layers)
    if percentile is not None:
        percentile = _check_percentile(owner, percentile)
    mantissa, _ = _units.split(x)
    try:
        kind = mantissa.dtype.kind if isinstance(mantissa, jax.Array) else np.asarray(mantissa).dtype.kind
    except (TypeError, ValueError):  # ragged nesting
        kind = "O"
    if isinstance(mantissa, (str, bytes)) or kind not in "iufb":
        raise TypeError(f"{owner}: x must be an array of numbers (or a Quantity), got {type(x).__name__}.")
    in_size = tuple(layers[0].in_size)
    shape = tuple(np.shape(mantissa))
    if shape[len(shape) - len(in_size) :] != in_size:
        raise ValueError(
            f"{owner}: x must be a batch of inputs of layers[0], of shape (..., {', '.join(map(str, in_size))}), "
            f"got shape {shape}."
        )
    records = []
    signal = x
    for index, layer in enumerate(layers):
        output, unit = _units.split(layer(signal))
        signal = _units.attach(jax.nn.relu(output), unit)
        if percentile is None:
            records.append(signal)
        else:
            scale = _scale(owner, index, signal, percentile)
            scale_m, scale_unit = _units.split(scale)
            records.append(_units.attach(np.asarray(scale_m, dtype=np.float64), scale_unit))
    return records
