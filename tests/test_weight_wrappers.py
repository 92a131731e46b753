"""The weight wrappers expose exactly their trainable parameters.

WeightNorm trains ``g`` and ``v`` in place of the wrapped weight: the wrapped
weight must not stay a ``ParamState``, or an optimizer over
``states(brainstate.ParamState)`` keeps moments for it and weight decay acts
on a weight that is never used. SpectralNorm trains the wrapped weight itself.
"""

from __future__ import annotations

import ast

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainnorm


def _leaf_paths(states):
    """``path/key`` of every array held by the given states (dict entries spelled out)."""
    paths = set()
    for path, state in states.items():
        path = ast.literal_eval(path) if isinstance(path, str) else path  # optimizers key by str(path)
        value = state.value
        if isinstance(value, dict):
            paths |= {"/".join(path + (key,)) for key in value}
        else:
            paths.add("/".join(path))
    return paths


def _linear(bias=True):
    rng = np.random.default_rng(0)
    linear = brainstate.nn.Linear(4, 3) if bias else brainstate.nn.Linear(4, 3, b_init=None)
    value = {"weight": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}
    if bias:
        value["bias"] = jnp.asarray(rng.standard_normal(3), jnp.float32)
    linear.weight.value = value
    return linear


def test_weight_norm_linear_exposes_exactly_g_v_and_bias():
    wn = brainnorm.WeightNorm(_linear())
    assert _leaf_paths(wn.states(brainstate.ParamState)) == {"g", "v", "layer/weight/bias"}
    # The original weight is not trainable anywhere in the wrapper.
    every = _leaf_paths(wn.states())
    assert "layer/weight/weight" not in every


def test_weight_norm_without_bias_exposes_exactly_g_and_v():
    linear = _linear(bias=False)
    wn = brainnorm.WeightNorm(linear)
    assert _leaf_paths(wn.states(brainstate.ParamState)) == {"g", "v"}
    assert not isinstance(linear.weight, brainstate.ParamState)


def test_weight_norm_conv_exposes_exactly_g_v_and_bias():
    conv = brainstate.nn.Conv2d((5, 5, 2), 3, 3)
    conv.weight.value = {**conv.weight.value, "bias": jnp.zeros(3)}
    wn = brainnorm.WeightNorm(conv)
    assert _leaf_paths(wn.states(brainstate.ParamState)) == {"g", "v", "layer/weight/bias"}
    assert wn(jnp.ones((1, 5, 5, 2))).shape == (1, 5, 5, 3)


def test_weight_norm_keeps_the_function_and_trains_under_jit():
    linear = _linear()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 4)), jnp.float32)
    w0, b0 = linear.weight.value["weight"], linear.weight.value["bias"]
    wn = brainnorm.WeightNorm(linear)
    np.testing.assert_allclose(wn(x), x @ w0 + b0, atol=1e-5)
    np.testing.assert_allclose(wn.normalized_weight(), w0, atol=1e-6)

    params = wn.states(brainstate.ParamState)

    @brainstate.transform.jit
    def step(x):
        grads, loss = brainstate.transform.grad(lambda: jnp.sum(wn(x) ** 2), params, return_value=True)()
        for path, grad in grads.items():
            params[path].value = jax.tree.map(lambda p, g: p - 0.01 * g, params[path].value, grad)
        return loss

    losses = [float(step(x)) for _ in range(5)]
    assert losses[-1] < losses[0]
    # Only the bias entry is left in the layer's slot between calls.
    assert list(linear.weight.value) == ["bias"]
    v, g = wn.v.value, wn.g.value
    w = g * v / jnp.linalg.norm(v, axis=0, keepdims=True)
    np.testing.assert_allclose(wn(x), x @ w + linear.weight.value["bias"], atol=1e-5)


def test_weight_norm_with_an_optimizer_sees_only_trainable_parameters():
    optim = pytest.importorskip("braintools.optim")
    wn = brainnorm.WeightNorm(_linear())
    optimizer = optim.Adam(lr=1e-2)
    optimizer.register_trainable_weights(wn.states(brainstate.ParamState))
    x = jnp.ones((2, 4))
    grads = brainstate.transform.grad(lambda: jnp.sum(wn(x)), wn.states(brainstate.ParamState))()
    optimizer.update(grads)
    assert _leaf_paths(optimizer.param_states.to_dict()) == {"g", "v", "layer/weight/bias"}


def test_weight_norm_array_slot_becomes_non_trainable():
    class Dense(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = brainstate.ParamState(jnp.eye(3))

        def update(self, x):
            return x @ self.kernel.value

    dense = Dense()
    wn = brainnorm.WeightNorm(dense, weight_name="kernel")
    assert _leaf_paths(wn.states(brainstate.ParamState)) == {"g", "v"}
    assert not isinstance(dense.kernel, brainstate.ParamState)
    np.testing.assert_allclose(wn(jnp.ones((2, 3))), jnp.ones((2, 3)), atol=1e-6)


def test_spectral_norm_trains_the_wrapped_weight_and_keeps_u_v_out():
    linear = _linear()
    sn = brainnorm.SpectralNorm(linear)
    # W / sigma(W): the wrapped weight is the parameter; u and v are power-iteration buffers.
    assert _leaf_paths(sn.states(brainstate.ParamState)) == {"layer/weight/weight", "layer/weight/bias"}
    assert not isinstance(sn.u, brainstate.ParamState) and not isinstance(sn.v, brainstate.ParamState)


@pytest.mark.parametrize("wrapper", [brainnorm.WeightNorm, brainnorm.SpectralNorm])
def test_a_failing_call_restores_the_slot(wrapper):
    linear = _linear()
    wrapped = wrapper(linear)
    before = dict(linear.weight.value)
    with pytest.raises(Exception):
        wrapped(jnp.ones((2, 5)))  # wrong input size
    assert linear.weight.value.keys() == before.keys()
    for key in before:
        assert np.array_equal(linear.weight.value[key], before[key])
