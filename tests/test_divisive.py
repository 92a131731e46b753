"""Divisive normalization, GDN and the dynamic normalization circuit against float64 references.

References are written from the formulas in float64 NumPy:

* ``divisive_reference``: ``R_i = g sign(x_i)|x_i|^n / (sigma^n + sum_j w_ij |x_j|^n)``;
* ``gdn_reference``: CompressAI's ``compressai.layers.GDN`` forward restated,
  raw parameters included (``NonNegativeParametrizer``: ``max(raw, bound)^2 -
  pedestal``; ``conv2d(x^2, gamma, beta)`` weighs channel ``j`` into ``i``
  with ``gamma[i, j]``). CompressAI 1.2.8 installs next to the pinned torch
  without replacing it, but ``import compressai`` needs torchvision and
  torch_geometric (its dataset registry), which the test environment does not
  carry; so the restatement is the reference here, and the comparison with
  CompressAI itself runs only where ``compressai.layers`` imports.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brainnorm import GDN, DivisiveNormalization, DynamicDivisiveNormalization
from brainnorm._divisive_functional import divisive_normalization_terms
from brainnorm.functional import divisive_normalization, gdn

from ._compressai import load_compressai_gdn

ROOT = Path(__file__).resolve().parents[1]
RTOL = 2e-5  # float32 computation against a float64 reference
PEDESTAL = (2.0**-18) ** 2


# ---------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------


def divisive_reference(x, exponent, sigma, gain, weights, axis=-1, mask=None):
    """``sigma`` and ``gain``: scalars or one value per channel."""
    x = np.asarray(x, np.float64)
    if mask is not None:
        x = np.where(np.broadcast_to(mask, x.shape), x, 0.0)
    moved = np.moveaxis(x, axis, -1)
    channels = moved.shape[-1]
    w = np.full((channels, channels), 1.0 / channels) if weights is None else np.asarray(weights, np.float64)
    energy = np.abs(moved) ** exponent
    denominator = np.asarray(sigma, np.float64) ** exponent + energy @ w.T
    r = np.asarray(gain, np.float64) * np.sign(moved) * energy / denominator
    r = np.moveaxis(r, -1, axis)
    return r if mask is None else np.where(np.broadcast_to(mask, r.shape), r, 0.0)


def nonnegative(raw, minimum=0.0):
    """CompressAI's ``NonNegativeParametrizer`` forward."""
    bound = np.sqrt(minimum + PEDESTAL)
    return np.maximum(np.asarray(raw, np.float64), bound) ** 2 - PEDESTAL


def gdn_reference(x_nchw, raw_beta, raw_gamma, beta_min=1e-6, inverse=False):
    """CompressAI's ``GDN.forward`` on ``(N, C, H, W)`` input, restated in float64."""
    beta = nonnegative(raw_beta, beta_min)
    gamma = nonnegative(raw_gamma)
    x = np.asarray(x_nchw, np.float64)
    norm = np.einsum("ij,njhw->nihw", gamma, x**2) + beta[None, :, None, None]
    return x * np.sqrt(norm) if inverse else x / np.sqrt(norm)


def assert_close(actual, expected, rtol=RTOL, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def jit_call(layer, x, mask=None):
    return brainstate.transform.jit(lambda v, m: layer(v, m))(x, mask)


# ---------------------------------------------------------------------------
# DivisiveNormalization and divisive_normalization
# ---------------------------------------------------------------------------

# (in_size, feature_axis, batch shape, exponent)
STATIC_CASES = [
    ((6,), -1, (), 2.0),
    ((6,), -1, (3,), 1.0),
    ((4, 5), 0, (2,), 0.5),
    ((4, 5), -1, (2, 3), 3.0),
    ((3, 4, 5), 1, (2,), 2.5),
]


@pytest.mark.parametrize("case", STATIC_CASES, ids=str)
def test_static_layer_matches_closed_form(rng, case):
    in_size, axis, batch, exponent = case
    channels = in_size[axis]
    weights = rng.uniform(0.0, 1.0, (channels, channels)).astype(np.float32)
    sigma = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    x = rng.standard_normal(batch + in_size).astype(np.float32) * 2
    layer = DivisiveNormalization(in_size, axis, exponent=exponent, sigma=sigma, gain=3.0, weights=weights)
    x_axis = len(batch) + axis % len(in_size)
    expected = divisive_reference(x, exponent, sigma, 3.0, weights, x_axis)
    assert_close(jit_call(layer, x), expected)
    assert_close(divisive_normalization(x, exponent=exponent, sigma=sigma, gain=3.0, weights=weights,
                                        feature_axis=x_axis), expected)


def test_default_pool_is_uniform_and_contrast_response_half_saturates_at_sigma():
    x = jnp.array([[0.0, 1.0, 2.0, 3.0]], jnp.float32)
    assert_close(DivisiveNormalization(4, sigma=0.7)(x), divisive_reference(x, 2.0, 0.7, 1.0, None))
    one_channel = DivisiveNormalization(1, sigma=0.2, gain=40.0, exponent=2.5)
    assert_close(one_channel(jnp.array([0.2])), [20.0])  # half of the gain at c = sigma


def test_units_mv_in_hz_out():
    x = np.array([[1.0, 5.0, 20.0], [0.0, 2.0, 8.0]], np.float32)
    weights = np.array([[1.0, 0.5, 0.0], [0.2, 1.0, 0.2], [0.0, 0.5, 1.0]], np.float32)
    layer = DivisiveNormalization(3, sigma=5.0 * u.mV, gain=80.0 * u.Hz, weights=weights)
    r = jit_call(layer, x * u.mV)
    assert isinstance(r, u.Quantity) and u.have_same_dim(r, u.Hz)
    expected = divisive_reference(x, 2.0, 5.0, 80.0, weights)
    assert_close(r.to_decimal(u.Hz), expected)
    assert_close(layer(x * 1e-3 * u.volt).to_decimal(u.Hz), expected, rtol=1e-4)  # same data in V
    # the function: sigma in V converted to the input's mV, plain sigma read in the input's unit
    assert_close(divisive_normalization(x * u.mV, sigma=0.005 * u.volt, gain=80 * u.Hz, weights=weights)
                 .to_decimal(u.Hz), expected, rtol=1e-4)
    assert_close(divisive_normalization(x * u.mV, sigma=5.0, weights=weights), expected / 80.0)
    with pytest.raises(u.UnitMismatchError, match="sigma"):
        layer(x * u.nA)


def test_mask_leaves_padded_channels_out_of_every_pool(rng):
    x = rng.uniform(0.0, 3.0, (2, 5)).astype(np.float32)
    weights = rng.uniform(0.1, 1.0, (5, 5)).astype(np.float32)
    mask = np.array([[True, True, False, True, False], [True, False, True, True, True]])
    padded = np.where(mask, x, np.nan).astype(np.float32)  # padding never enters the arithmetic
    layer = DivisiveNormalization(5, sigma=0.5, weights=weights)
    r = np.asarray(jit_call(layer, padded, mask))
    assert np.all(np.isfinite(r)) and np.all(r[~mask] == 0)
    for b in range(2):  # equal to the same computation on the valid channels only
        keep = np.flatnonzero(mask[b])
        sub = divisive_reference(x[b, keep], 2.0, 0.5, 1.0, weights[np.ix_(keep, keep)])
        assert_close(r[b, keep], sub)
    # a (B, 1) mask pads whole rows; gradients stay finite
    row_mask = np.array([[True], [False]])
    row_padded = np.where(row_mask, x, np.nan).astype(np.float32)
    grad = jax.grad(lambda v: jnp.sum(divisive_normalization(v, mask=row_mask, exponent=0.5)))(row_padded)
    assert np.all(np.isfinite(np.asarray(grad)[0])) and np.all(np.asarray(grad)[1] == 0)


def test_learnable_parameters_are_trained_and_weights_stay_nonnegative(rng):
    weights = rng.uniform(0.0, 1.0, (4, 4)).astype(np.float32)
    fixed = DivisiveNormalization(4, sigma=0.8, gain=2.0, weights=weights)
    learned = DivisiveNormalization(4, sigma=0.8, gain=2.0, weights=weights, learnable=True)
    assert fixed.weight is None and set(learned.weight.value) == {"weights", "sigma", "gain"}
    x = rng.uniform(0.0, 2.0, (3, 4)).astype(np.float32)
    assert_close(learned(x), np.asarray(fixed(x)), rtol=1e-5)
    params = learned.states(brainstate.ParamState)

    @brainstate.transform.jit
    def step():
        grads = brainstate.transform.grad(lambda: -jnp.sum(learned(x)), params)()  # pushes the pool down
        for key, state in params.items():
            state.value = jax.tree.map(lambda p, g: p - 5.0 * g, state.value, grads[key])

    for _ in range(20):
        step()
    assert np.all(np.asarray(learned.weights) >= 0) and float(np.min(learned.weights)) < 1e-3
    assert float(jnp.min(learned.sigma)) >= 0.99e-6 and np.all(np.isfinite(np.asarray(learned(x))))


# ---------------------------------------------------------------------------
# GDN / IGDN
# ---------------------------------------------------------------------------


def _raw_parameters(rng, channels):
    raw_beta = rng.uniform(0.5, 1.5, channels)
    raw_gamma = rng.uniform(-0.05, 0.6, (channels, channels))  # some entries below the bound
    return raw_beta, raw_gamma


@pytest.mark.parametrize("inverse", [False, True])
def test_gdn_matches_compressai_forward_restated(rng, inverse):
    channels = 5
    layer = GDN((3, 4, channels), inverse=inverse)
    # CompressAI's initialization: beta = 1, gamma = 0.1 * I
    assert_close(layer.beta, np.ones(channels))
    assert_close(layer.gamma, 0.1 * np.eye(channels))
    raw_beta, raw_gamma = _raw_parameters(rng, channels)
    layer.weight.value = {"beta": jnp.asarray(raw_beta, jnp.float32), "gamma": jnp.asarray(raw_gamma, jnp.float32)}
    x_nchw = (2 * rng.standard_normal((2, channels, 3, 4))).astype(np.float32)
    expected = gdn_reference(x_nchw, raw_beta.astype(np.float32), raw_gamma.astype(np.float32), inverse=inverse)
    y = jit_call(layer, np.moveaxis(x_nchw, 1, -1))  # channels last
    assert_close(np.moveaxis(np.asarray(y), -1, 1), expected)
    # channels first, as CompressAI lays them out
    first = GDN((channels, 3, 4), 0, inverse=inverse)
    first.weight.value = layer.weight.value
    assert_close(jit_call(first, x_nchw), expected)


def test_gdn_matches_compressai(rng):
    # compressai/layers/gdn.py alone: the package's __init__ needs torchvision (see tests/_compressai.py)
    layers = load_compressai_gdn()
    torch = pytest.importorskip("torch")
    for inverse in (False, True):
        module = layers.GDN(4, inverse=inverse)
        raw_beta, raw_gamma = _raw_parameters(rng, 4)
        with torch.no_grad():
            module.beta.copy_(torch.tensor(raw_beta, dtype=torch.float32))
            module.gamma.copy_(torch.tensor(raw_gamma, dtype=torch.float32))
        x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
        expected = module(torch.from_numpy(x)).detach().numpy()
        layer = GDN((4, 3, 3), 0, inverse=inverse)
        layer.weight.value = {"beta": jnp.asarray(module.beta.detach().numpy()),
                              "gamma": jnp.asarray(module.gamma.detach().numpy())}
        assert_close(layer(x), expected, rtol=1e-5)
        # the input gradient of sum(y * c) too
        c = rng.standard_normal(x.shape).astype(np.float32)
        xt = torch.tensor(x, requires_grad=True)
        (module(xt) * torch.from_numpy(c)).sum().backward()
        dx = jax.grad(lambda v, layer=layer, c=c: jnp.sum(layer(v) * c))(jnp.asarray(x))
        assert_close(dx, xt.grad.numpy(), rtol=1e-5)
        assert_close(expected, gdn_reference(x, raw_beta.astype(np.float32), raw_gamma.astype(np.float32),
                                             inverse=inverse), rtol=1e-5)


def test_gdn_bound_gradient_flows_back_up_as_compressai_lower_bound():
    """Below the bound the gradient passes only where descent raises the raw value."""
    layer = GDN(2, gamma_init=0.0)  # raw gamma at the bound sqrt(pedestal)
    layer.weight.value = {"beta": layer.weight.value["beta"], "gamma": jnp.full((2, 2), -1.0)}
    params = layer.states(brainstate.ParamState)
    x = jnp.array([1.0, 2.0])
    up = brainstate.transform.grad(lambda: jnp.sum(layer(x)), params)()  # loss falls as gamma grows
    down = brainstate.transform.grad(lambda: -jnp.sum(layer(x)), params)()
    g_up = np.asarray(next(iter(up.values()))["gamma"])
    g_down = np.asarray(next(iter(down.values()))["gamma"])
    assert np.all(g_up < 0)  # passes: descent raises the raw value back above the bound
    assert np.all(g_down == 0)  # blocked: would push it further below


def test_gdn_units_and_mask():
    x = jnp.array([[3.0, 4.0], [1.0, 2.0]])
    y = gdn(x * u.mV, 1.0 * u.mV**2, jnp.eye(2))
    assert not isinstance(y, u.Quantity)
    assert_close(y, np.asarray(x) / np.sqrt(1 + np.asarray(x) ** 2))
    back = gdn(x * u.mV, 1.0, jnp.zeros((2, 2)), inverse=True)
    assert u.have_same_dim(back, u.mV**2)
    mask = jnp.array([[True, False], [True, True]])
    ym = gdn(x, 1.0, jnp.ones((2, 2)), mask=mask)
    assert_close(ym, [[3.0 / np.sqrt(10.0), 0.0], [1.0 / np.sqrt(6.0), 2.0 / np.sqrt(6.0)]])


# ---------------------------------------------------------------------------
# DynamicDivisiveNormalization
# ---------------------------------------------------------------------------


def run_circuit(circuit, x, steps, dt=0.5 * u.ms):
    with brainstate.environ.context(dt=dt):
        return brainstate.transform.for_loop(lambda _: circuit(x), jnp.arange(steps))


@pytest.mark.parametrize("exponent", [1.0, 2.0, 3.0])
def test_dynamic_circuit_converges_to_the_static_layer(rng, exponent):
    channels = 6
    weights = rng.uniform(0.0, 1.0, (channels, channels)).astype(np.float32)
    options = {"exponent": exponent, "sigma": 4.0 * u.mV, "gain": 60.0 * u.Hz, "weights": weights}
    circuit = DynamicDivisiveNormalization(channels, tau=5 * u.ms, tau_pool=15 * u.ms, **options)
    circuit.init_state(batch_size=3)
    x = rng.uniform(0.0, 12.0, (3, channels)).astype(np.float32) * u.mV
    trace = run_circuit(circuit, x, 600)  # 300 ms, 20 tau_pool
    static = DivisiveNormalization(channels, **options)(x)
    final, expected = trace[-1].to_decimal(u.Hz), static.to_decimal(u.Hz)
    relative = float(np.max(np.abs(np.asarray(final) - np.asarray(expected)) / np.abs(np.asarray(expected))))
    assert relative < 1e-4, relative
    assert trace.shape == (600, 3, channels)


def test_dynamic_circuit_stays_bounded_for_random_nonnegative_input(rng):
    circuit = DynamicDivisiveNormalization((2, 8), 0, tau=2 * u.ms, tau_pool=30 * u.ms, sigma=0.1, gain=10.0)
    circuit.init_state(4)
    inputs = jnp.asarray(rng.exponential(5.0, (3000, 4, 2, 8)) * (rng.random((3000, 1, 1, 1)) < 0.3))
    with brainstate.environ.context(dt=1.0 * u.ms):
        trace = brainstate.transform.for_loop(circuit, inputs)
    trace = np.asarray(trace)
    # each step is a convex combination of the old state and a target bounded by gain * x^n / sigma^n
    bound = 10.0 * float(jnp.max(inputs)) ** 2 / 0.1**2
    assert np.all(np.isfinite(trace)) and np.all(trace >= 0) and np.max(trace) <= bound
    assert np.all(np.asarray(circuit.conductance.value) >= 0)


def test_dynamic_circuit_gradient_through_time_under_jit():
    circuit = DynamicDivisiveNormalization(3, tau=4 * u.ms, tau_pool=8 * u.ms, sigma=0.5)
    circuit.init_state()

    def loss(x):
        circuit.reset_state()
        with brainstate.environ.context(dt=1.0 * u.ms):
            trace = brainstate.transform.for_loop(lambda _: circuit(x), jnp.arange(50))
        return jnp.sum(trace[-10:])

    x = jnp.array([0.0, 0.3, 1.2])  # x = 0 included
    grad = brainstate.transform.jit(brainstate.transform.grad(loss, argnums=0))(x)
    loss = brainstate.transform.jit(loss)
    assert np.all(np.isfinite(np.asarray(grad))) and float(jnp.abs(grad).max()) > 0
    eps = 1e-3
    numeric = (loss(x.at[1].add(eps)) - loss(x.at[1].add(-eps))) / (2 * eps)
    assert abs(float(grad[1]) - float(numeric)) < 1e-2 * abs(float(numeric)) + 1e-3


def test_dynamic_states_follow_brainstate_conventions():
    circuit = DynamicDivisiveNormalization((2, 3), tau=5 * u.ms, gain=2 * u.Hz)
    with pytest.raises(ValueError, match="DynamicDivisiveNormalization: .*init_state"):
        circuit(jnp.ones((2, 3)))
    brainstate.nn.init_all_states(circuit)
    assert isinstance(circuit.response, brainstate.HiddenState)
    assert isinstance(circuit.conductance, brainstate.HiddenState)
    assert circuit.response.value.shape == (2, 3) and u.have_same_dim(circuit.response.value, u.Hz)
    circuit.init_state((4, 2))
    assert circuit.conductance.value.shape == (4, 2, 2, 3)
    with brainstate.environ.context(dt=0.1):  # a plain dt is read in ms
        circuit(jnp.ones((2, 3)))  # broadcast over the batch
    assert float(jnp.max(circuit.conductance.value)) > 0
    circuit.reset_state()
    assert float(jnp.max(jnp.abs(circuit.conductance.value))) == 0.0 and circuit.conductance.value.shape == (2, 3)


def test_dynamic_call_that_raises_writes_no_state():
    circuit = DynamicDivisiveNormalization(3, sigma=1.0 * u.mV)
    circuit.init_state(2)
    with brainstate.environ.context(dt=1.0 * u.ms):
        circuit(jnp.ones((2, 3)) * u.mV)
        before = (np.asarray(circuit.response.value), np.asarray(circuit.conductance.value))
        for x, mask, error in [(jnp.ones((5, 3)) * u.mV, None, ValueError), (jnp.ones((2, 4)) * u.mV, None, ValueError),
                               (jnp.ones((2, 3)) * u.mV, jnp.ones((2, 3)), TypeError),
                               (jnp.ones((2, 3)) * u.nA, None, u.UnitMismatchError),
                               (jnp.ones((2, 3)), None, u.UnitMismatchError)]:
            with pytest.raises(error):
                circuit(x, mask)
    with pytest.raises(KeyError):  # no dt set
        circuit(jnp.ones((2, 3)) * u.mV)
    assert np.array_equal(np.asarray(circuit.response.value), before[0])
    assert np.array_equal(np.asarray(circuit.conductance.value), before[1])


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------

BAD_OPTIONS = [
    (DivisiveNormalization, {"sigma": -1.0}, ValueError, "sigma"),
    (DivisiveNormalization, {"sigma": 0.0}, ValueError, "sigma"),
    (DivisiveNormalization, {"sigma": np.ones(4)}, ValueError, "sigma"),
    (DivisiveNormalization, {"exponent": 0.0}, ValueError, "exponent"),
    (DivisiveNormalization, {"exponent": "2"}, TypeError, "exponent"),
    (DivisiveNormalization, {"weights": -np.eye(3)}, ValueError, "weights"),
    (DivisiveNormalization, {"weights": np.eye(4)}, ValueError, "weights"),
    (DivisiveNormalization, {"weights": np.eye(3) * u.mV}, TypeError, "weights"),
    (DivisiveNormalization, {"gain": np.ones((3, 3))}, ValueError, "gain"),
    (DivisiveNormalization, {"learnable": "yes"}, TypeError, "learnable"),
    (DivisiveNormalization, {"feature_axis": 3}, ValueError, "feature_axis"),
    (GDN, {"beta_min": 0.0}, ValueError, "beta_min"),
    (GDN, {"gamma_init": -0.1}, ValueError, "gamma_init"),
    (GDN, {"inverse": 1}, TypeError, "inverse"),
    (GDN, {"param_type": int}, TypeError, "param_type"),
    (DynamicDivisiveNormalization, {"tau": 10.0}, TypeError, "tau"),
    (DynamicDivisiveNormalization, {"tau": 10 * u.mV}, TypeError, "tau"),
    (DynamicDivisiveNormalization, {"tau": 0 * u.ms}, ValueError, "tau"),
    (DynamicDivisiveNormalization, {"tau_pool": -1 * u.ms}, ValueError, "tau_pool"),
    (DynamicDivisiveNormalization, {"weights": np.full((3, 3), -0.1)}, ValueError, "weights"),
    (DynamicDivisiveNormalization, {"sigma": -2 * u.mV}, ValueError, "sigma"),
]


@pytest.mark.parametrize("cls, options, error, option", BAD_OPTIONS,
                         ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_bad_options_name_the_layer_and_the_option(cls, options, error, option):
    with pytest.raises(error, match=rf"^{cls.__name__}: {option} "):
        cls(3, **options)


def test_call_errors_name_the_layer():
    layer = DivisiveNormalization(3)
    with pytest.raises(ValueError, match=r"^DivisiveNormalization: expected an input whose trailing shape"):
        layer(jnp.ones((2, 4)))
    with pytest.raises(TypeError, match=r"^GDN: mask"):
        GDN(3)(jnp.ones((2, 3)), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"^gdn: gamma must have shape \(3, 3\)"):
        gdn(jnp.ones(3), 1.0, jnp.ones((2, 2)))
    with pytest.raises(ValueError, match=r"^gdn: beta must be positive"):
        gdn(jnp.ones(3), 0.0, jnp.ones((3, 3)))


# ---------------------------------------------------------------------------
# transformations of the functions
# ---------------------------------------------------------------------------


def _every_transformation(fn):
    def transformed(v):
        return {
            "jit": fn(v), "vmap": jax.vmap(fn)(v), "grad": jax.grad(lambda w: jnp.sum(fn(w) ** 2))(v),
            "jacfwd": jax.jacfwd(fn)(v[0]), "jacrev": jax.jacrev(fn)(v[0]),
            "jvp": jax.jvp(fn, (v,), (jnp.ones_like(v),))[1], "vjp": jax.vjp(fn, v)[1](jnp.ones_like(v))[0],
        }

    return transformed


@pytest.mark.parametrize("exponent", [0.5, 1.0, 2.0])
def test_functions_compose_with_jax_transformations(rng, exponent):
    weights = jnp.asarray(rng.uniform(0.0, 1.0, (4, 4)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32).at[0, 1].set(0.0)  # a zero entry

    def f(v):
        return divisive_normalization(v, exponent=exponent, sigma=0.5, weights=weights)

    def g(v):
        return gdn(v, 1.0, weights)

    for fn in (f, g):
        y = fn(x)  # eager
        transformed = jax.jit(_every_transformation(fn))
        out = transformed(x)
        assert jax.eval_shape(fn, x).shape == x.shape
        assert_close(out["jit"], np.asarray(y), rtol=1e-6)
        assert_close(out["vmap"], np.asarray(y), rtol=1e-6)
        assert all(np.all(np.isfinite(np.asarray(value))) for value in out.values())
        np.testing.assert_allclose(np.asarray(out["jacrev"]), np.asarray(out["jacfwd"]), rtol=1e-4, atol=1e-5)
        jac = np.asarray(out["jacfwd"], np.float64)
        assert_close(out["jvp"][0], jac.sum(axis=1), rtol=1e-4)
        assert_close(out["vjp"][0], jac.sum(axis=0), rtol=1e-4)
    if exponent >= 1.0:  # derivative of the closed form at x = 0: 1/sigma^n (n = 1) or 0 (n > 1), for one channel
        d0 = jax.jit(jax.grad(lambda v: divisive_normalization(v, exponent=exponent, sigma=0.5)[0]))(jnp.zeros(1))
        assert_close(d0, [1 / 0.5 if exponent == 1.0 else 0.0])


def test_terms_recompose_the_static_output(rng):
    x = jnp.asarray(rng.uniform(-2.0, 2.0, (2, 5)), jnp.float32)
    drive, pool = divisive_normalization_terms(x, exponent=1.5, sigma=0.7)
    assert_close(3.0 * drive / (1 + pool), np.asarray(divisive_normalization(x, exponent=1.5, sigma=0.7, gain=3.0)))


# ---------------------------------------------------------------------------
# the example
# ---------------------------------------------------------------------------


def test_example_quick(tmp_path):
    out = tmp_path / "divisive.png"
    env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "divisive_normalization.py"), "--quick",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert out.is_file() and out.stat().st_size > 0
    values = dict(re.findall(r"^(\S+)\s+measured\s+[-0-9.e+]+\s+closed form\s+[-0-9.e+]+\s+deviation\s+([-0-9.e+]+)",
                             proc.stdout, re.MULTILINE))
    assert {"c50_static", "c50_dynamic", "suppression_static", "suppression_dynamic"} <= set(values), proc.stdout
    for name, deviation in values.items():
        assert float(deviation) < 1e-3, (name, proc.stdout)
