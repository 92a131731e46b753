"""Helpers shared by the conformance tests.

``check`` compares a brainnorm result with a peer's, records the largest
deviation per (peer, layer, quantity) and asserts the tolerance. The
deviation is absolute, ``max |actual - expected|``; for comparisons with a
relative tolerance (gradients) it is divided by ``max(1, max |expected|)``.
The table of recorded deviations is printed at the end of the run (see
``conftest.py``).
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

#: (peer, layer, quantity) -> largest absolute deviation seen.
DEVIATIONS: dict[tuple[str, str, str], float] = {}


def check(peer, layer, quantity, actual, expected, *, atol, rtol=0.0):
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` and record the deviation."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (
        f"{peer} {layer} {quantity}: shape {actual.shape} != {expected.shape}"
    )
    deviation = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    if rtol and actual.size:
        deviation /= max(1.0, float(np.max(np.abs(expected))))
    key = (peer, layer, quantity)
    DEVIATIONS[key] = max(DEVIATIONS.get(key, 0.0), deviation)
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol, err_msg=f"{peer} {layer} {quantity}")


def random_mask(rng, shape, reduce_axes, p=0.7):
    """Random boolean mask of ``shape`` in which every group over ``reduce_axes`` has a valid element."""
    mask = rng.random(shape) < p
    first = [slice(None)] * len(shape)
    for a in reduce_axes:
        first[a] = 0
    mask[tuple(first)] = True
    return mask


def sample(rng, shape, offset=0.5, spread=1.5, dtype=np.float32):
    """Well-conditioned data: ``offset + spread * N(0, 1)``."""
    return (offset + spread * rng.standard_normal(shape)).astype(dtype)


_GRAD_FNS: dict = {}


def brainnorm_grads(module, x, cotangent, mask=None, **static_kwargs):
    """Output of ``module(x, mask=mask)`` and the gradients of ``sum(y * cotangent)``.

    Returns ``(y, dx, dparams)`` where ``dparams`` maps the state path (a
    tuple) of every ``ParamState`` of ``module`` to its gradient. Running
    statistics are updated exactly as by a plain call. The jitted gradient
    function is cached per module, ``environ['fit']`` value, presence of a
    mask and static keyword arguments (the mode is read at trace time).
    """
    fit = brainstate.environ.get("fit", None)
    key = (id(module), fit, mask is None, tuple(sorted(static_kwargs.items())))
    if key not in _GRAD_FNS:
        states = module.states(brainstate.ParamState)

        def loss(x, cot, mask):
            y = module(x, **static_kwargs) if mask is None else module(x, mask=mask, **static_kwargs)
            return jnp.sum(y * cot), y

        if len(states) == 0:
            grad = brainstate.transform.grad(loss, argnums=0, has_aux=True)

            def fn(x, cot, mask):
                dx, y = grad(x, cot, mask)
                return ({}, dx), y
        else:
            fn = brainstate.transform.grad(loss, grad_states=states, argnums=0, has_aux=True)
        _GRAD_FNS[key] = (module, brainstate.transform.jit(fn))
    mask = None if mask is None else jnp.asarray(mask)
    (dparams, dx), y = _GRAD_FNS[key][1](jnp.asarray(x), jnp.asarray(cotangent), mask)
    return np.asarray(y), np.asarray(dx), dict(dparams)


def sgd(module, dparams, lr):
    """One plain SGD step on the ParamStates of ``module`` (same step as the peers take)."""
    states = module.states(brainstate.ParamState)
    for path, grad in dparams.items():
        states[path].value = jax.tree.map(lambda p, g: p - lr * g, states[path].value, grad)
