"""State types of brainnorm layers.

Trainable scale and bias live in :class:`NormalizationParamState` (a
``brainstate.ParamState``), so ``model.states(brainstate.ParamState)`` is
exactly what an optimizer trains. Running statistics (means, variances,
counters, power-iteration vectors) live in ``brainstate.ShortTermState``.
"""

from __future__ import annotations

from typing import Any

import brainstate

from ._typing import Input, Output

__all__ = ["NormalizationParamState"]


class NormalizationParamState(brainstate.ParamState):
    r"""Trainable affine parameters of a normalization layer.

    Its value is a dict with the entries ``'scale'`` and/or ``'bias'``.
    :meth:`execute` applies them, for eligibility-trace tools that call it.

    .. math:: \mathrm{execute}(x) = x \cdot \mathrm{scale} + \mathrm{bias}

    Parameters
    ----------
    value : dict
        ``{'scale': array, 'bias': array}``, either entry optional; the arrays
        (or Quantities) have the layer's parameter shape.
    name : str, optional
        Name of the state, as for any ``brainstate.State``.
    **metadata
        Extra metadata stored with the state (brainstate's ``State`` keywords).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from brainnorm import NormalizationParamState
    >>> state = NormalizationParamState({'scale': jnp.array([2.0]), 'bias': jnp.array([1.0])})
    >>> state.execute(jnp.array([3.0])).tolist()
    [7.0]
    """

    def execute(self, x: Input) -> Output:
        """Return ``x * scale + bias`` for the entries present.

        Parameters
        ----------
        x : array_like
            Normalized input.

        Returns
        -------
        jax.Array or Quantity
            ``x`` scaled and shifted, in the unit of the parameters if they
            carry one.
        """
        params: Any = self.value
        y: Any = x
        if "scale" in params:
            y = y * params["scale"]
        if "bias" in params:
            y = y + params["bias"]
        return y
