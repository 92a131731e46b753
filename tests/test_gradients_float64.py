"""Gradients of TAB, NeuNorm, BatchRenorm and the divisive family against float64 central differences.

Every case runs under ``jax.enable_x64(True)`` with float64 inputs and
parameters. The loss is ``sum(y * c)`` for a fixed random ``c``; its
gradient with respect to every argument (input and parameters) from
``jax.grad`` is compared with central differences of the same function,
one element at a time (``h = 1e-6``; in float64 their error is ~1e-9),
at 1e-5 relative to ``max(1, max |difference quotient|)``.

Where the function itself is not what the derivative differentiates
(BatchRenorm holds ``r`` and ``d`` constant by definition), the case either
clips ``r`` and ``d`` at their bounds, so that they are locally constant
and the difference quotient is the derivative, or compares with
``jax.grad`` of a float64 re-statement of the formula with ``r`` and ``d``
frozen.

Modes: TAB multi-step, TAB step by step (single-step calls chained through
the accumulated sums), with and without masks; NeuNorm single- and
multi-step; the divisive family with masks.
"""

from __future__ import annotations

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainnorm
from brainnorm import functional as F

H = 1e-6
RTOL = 1e-5


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _f64(a):
    return jnp.asarray(np.asarray(a, np.float64))


def central_differences(loss, args, argnum):
    """d loss / d args[argnum], every element by a central difference (vectorized over the elements)."""
    base = args[argnum]
    size = base.size
    basis = jnp.eye(size, dtype=base.dtype).reshape((size,) + base.shape)

    def at(e):
        plus = list(args)
        minus = list(args)
        plus[argnum] = base + H * e
        minus[argnum] = base - H * e
        return (loss(*plus) - loss(*minus)) / (2 * H)

    return jax.jit(jax.vmap(at))(basis).reshape(base.shape)


def assert_gradients_match(loss, *args, skip=()):
    """jax.grad of ``loss`` with respect to every argument equals its central differences (1e-5)."""
    args = tuple(_f64(a) for a in args)
    assert float(loss(*args)) == pytest.approx(float(jax.jit(loss)(*args)), rel=1e-12, abs=1e-12)
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)
    for i, g in enumerate(grads):
        if i in skip:
            continue
        assert g.dtype == jnp.float64
        expected = np.asarray(central_differences(loss, args, i))
        scale = max(1.0, float(np.max(np.abs(expected))))
        np.testing.assert_allclose(np.asarray(g), expected, rtol=RTOL, atol=RTOL * scale,
                                   err_msg=f"gradient of argument {i}")


def _readout(rng, shape):
    return _f64(rng.standard_normal(shape))


# --- TAB ------------------------------------------------------------------------------------------------------

T, B, C = 3, 4, 2


def _tab_data(rng, masked):
    x = rng.standard_normal((T, B, C)) * np.array([1.0, 2.5]) + np.array([0.5, -1.0])
    mask = None
    if masked:
        mask = rng.random((T, B, 1)) > 0.35
        mask[:, 0] = True
    return x, mask


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("fast", [False, True], ids=["two-pass", "fast"])
def test_tab_multi_step_gradients(rng, masked, fast):
    x, mask = _tab_data(rng, masked)
    c = _readout(rng, x.shape)
    gamma = rng.uniform(0.5, 1.5, (T, 1, C))
    beta = rng.uniform(-0.5, 0.5, (T, 1, C))
    p = rng.uniform(0.5, 1.5, T)

    def loss(x, gamma, beta, p):
        y = F.temporal_accumulated_batch_norm(x, None, None, gamma, beta, p, training=True, mask=mask,
                                              use_fast_variance=fast, epsilon=1e-3)[0]
        return jnp.sum(y * c)

    assert_gradients_match(loss, x, gamma, beta, p)


def test_tab_gradient_reaches_every_earlier_step(rng):
    """Step t's statistics are over steps 0..t: the output of the last step depends on the first step's input."""
    x, _ = _tab_data(rng, False)
    c = np.zeros(x.shape)
    c[-1] = rng.standard_normal((B, C))

    def loss(x):
        return jnp.sum(F.temporal_accumulated_batch_norm(x, training=True, epsilon=1e-3)[0] * c)

    assert_gradients_match(loss, x)
    g = np.asarray(jax.grad(loss)(_f64(x)))
    assert np.all(np.abs(g[0]) > 1e-6)  # through the accumulated mean and variance


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_tab_step_by_step_gradients_and_equality_with_multi_step(rng, masked):
    """Single-step calls chained through ``accumulated``: the same outputs and the exact gradient."""
    x, mask = _tab_data(rng, masked)
    c = _readout(rng, x.shape)
    gamma = rng.uniform(0.5, 1.5, (T, 1, C))

    def step_by_step(x, gamma):
        accumulated, ys = None, []
        for t in range(T):
            y, _, _, accumulated = F.temporal_accumulated_batch_norm(
                x[t : t + 1], None, None, gamma[t : t + 1], training=True, epsilon=1e-3,
                mask=None if mask is None else mask[t : t + 1], accumulated=accumulated, return_accumulated=True)
            ys.append(y)
        return jnp.concatenate(ys)

    def multi(x, gamma):
        return F.temporal_accumulated_batch_norm(x, None, None, gamma, training=True, epsilon=1e-3, mask=mask)[0]

    np.testing.assert_allclose(np.asarray(step_by_step(_f64(x), _f64(gamma))),
                               np.asarray(multi(_f64(x), _f64(gamma))), rtol=1e-12, atol=1e-12)
    assert_gradients_match(lambda x, g: jnp.sum(step_by_step(x, g) * c), x, gamma)


def test_tab_eval_mode_gradients(rng):
    x, mask = _tab_data(rng, True)
    c = _readout(rng, x.shape)
    mean = rng.standard_normal((T, 1, C))
    var = rng.uniform(0.5, 2.0, (T, 1, C))

    def loss(x, mean, var):
        return jnp.sum(F.temporal_accumulated_batch_norm(x, mean, var, training=False, mask=mask)[0] * c)

    assert_gradients_match(loss, x, mean, var)


def test_tab_layer_gradients_single_and_multi_step(rng):
    """The layer in both step modes: d sum(y * c) / dx by central differences (fresh layer per evaluation)."""
    x, _ = _tab_data(rng, False)
    c = _readout(rng, x.shape)

    def run(mode, x):
        with brainstate.environ.context(fit=True, precision=64):
            layer = brainnorm.TemporalAccumulatedBatchNorm((C,), num_steps=T, step_mode=mode, epsilon=1e-3)
            if mode == "multi":
                return layer(x)
            return jnp.stack([layer(x[t], t=t) for t in range(T)])

    for mode in ("multi", "single"):
        def loss(x, mode=mode):
            return jnp.sum(run(mode, x) * c)

        g = np.asarray(jax.grad(loss)(_f64(x)))
        expected = np.asarray(central_differences(loss, (_f64(x),), 0))
        np.testing.assert_allclose(g, expected, rtol=RTOL, atol=RTOL * max(1.0, np.abs(expected).max()),
                                   err_msg=mode)


# --- NeuNorm --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("multi_step", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("k", [0.0, 0.7])
def test_neu_norm_gradients(rng, multi_step, k):
    shape = (T, B, 2, C) if multi_step else (B, 2, C)
    spikes = (rng.random(shape) < 0.4).astype(np.float64) + 0.1 * rng.standard_normal(shape)
    weight = rng.uniform(0.5, 1.5, (2, C))
    state = rng.uniform(0.0, 0.3, (B, 2, 1))
    c = _readout(rng, shape)

    def loss(x, w, a):
        y, new = F.neu_norm(x, w, a, k=k, multi_step=multi_step)
        return jnp.sum(y * c) + 0.5 * jnp.sum(new)

    assert_gradients_match(loss, spikes, weight, state)


# --- BatchRenorm ----------------------------------------------------------------------------------------------


def _renorm_data(rng, masked):
    x = rng.standard_normal((6, 3)) * np.array([0.5, 2.0, 1.0]) + np.array([1.0, -0.5, 0.0])
    mask = None
    if masked:
        mask = rng.random((6, 1)) > 0.3
        mask[:2] = True
    return x, mask


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_batch_renorm_gradients_with_r_and_d_clipped(rng, masked):
    """Running statistics far from the batch's: r and d sit at their bounds, so they are locally constant."""
    x, mask = _renorm_data(rng, masked)
    c = _readout(rng, x.shape)
    running_mean, running_var = np.full(3, 20.0), np.full(3, 1e-3)

    def loss(x, gamma, beta):
        y = F.batch_renorm(x, _f64(running_mean), _f64(running_var), gamma, beta, training=True, r_max=1.5,
                           d_max=0.5, mask=mask)[0]
        return jnp.sum(y * c)

    assert_gradients_match(loss, x, rng.uniform(0.5, 1.5, 3), rng.uniform(-1, 1, 3))


def test_batch_renorm_warm_up_is_batch_norm_with_its_gradient(rng):
    x, mask = _renorm_data(rng, True)
    c = _readout(rng, x.shape)

    def loss(x, gamma):
        y = F.batch_renorm(x, _f64(np.zeros(3)), _f64(np.ones(3)), gamma, training=True, renormalize=False,
                           mask=mask)[0]
        return jnp.sum(y * c)

    assert_gradients_match(loss, x, rng.uniform(0.5, 1.5, 3))


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_batch_renorm_gradient_equals_a_float64_restatement(rng, masked):
    """r and d inside their bounds and held constant: jax.grad of the formula re-stated here."""
    x, mask = _renorm_data(rng, masked)
    c = _readout(rng, x.shape)
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.uniform(-1, 1, 3)
    eps, r_max, d_max = 1e-5, 3.0, 5.0
    valid = np.ones((6, 1)) if mask is None else mask.astype(np.float64)
    rows = x[np.broadcast_to(valid, x.shape) > 0].reshape(-1, 3)
    # running statistics near the batch's, so that r and d are inside their bounds
    running_mean, running_var = rows.mean(0) + np.array([0.3, -0.2, 0.1]), rows.var(0) * np.array([1.3, 0.6, 2.0])

    def restated(x, gamma, beta):
        n = jnp.sum(valid)
        mu = jnp.sum(x * valid, axis=0) / n
        var = jnp.sum(jnp.square(x - mu) * valid, axis=0) / n
        s_batch = jnp.sqrt(var + eps)
        s = jnp.sqrt(_f64(running_var) + eps)
        r = jax.lax.stop_gradient(jnp.clip(s_batch / s, 1 / r_max, r_max))
        d = jax.lax.stop_gradient(jnp.clip((mu - _f64(running_mean)) / s, -d_max, d_max))
        return jnp.sum((gamma * ((x - mu) / s_batch * r + d) + beta) * c)

    def ours(x, gamma, beta):
        y = F.batch_renorm(x, _f64(running_mean), _f64(running_var), gamma, beta, training=True, r_max=r_max,
                           d_max=d_max, epsilon=eps, mask=mask)[0]
        return jnp.sum(y * c)

    args = (_f64(x), _f64(gamma), _f64(beta))
    # r and d are inside their bounds here (else the restatement would not test the stop-gradient)
    r = np.sqrt(rows.var(0) + eps) / np.sqrt(running_var + eps)
    assert np.all((r > 1 / r_max) & (r < r_max))
    np.testing.assert_allclose(float(ours(*args)), float(restated(*args)), rtol=1e-12)
    for g, e in zip(jax.grad(ours, argnums=(0, 1, 2))(*args), jax.grad(restated, argnums=(0, 1, 2))(*args),
                    strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-10, atol=1e-10)
    # and the stop-gradient matters: the full derivative of the function differs from it
    fd = np.asarray(central_differences(ours, args, 0))
    assert not np.allclose(np.asarray(jax.grad(ours)(*args)), fd, rtol=1e-3, atol=1e-3)


# --- the divisive family --------------------------------------------------------------------------------------

D = 4


def _divisive_data(rng, masked, shape=(3, D)):
    x = rng.choice([-1.0, 1.0], shape) * rng.uniform(0.3, 2.0, shape)
    mask = None
    if masked:
        mask = np.ones(shape, bool)
        mask[..., 1] = False  # a padded channel, left out of every pool
    return x, mask


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("exponent", [2.0, 1.5, 3.0])
def test_divisive_normalization_gradients(rng, masked, exponent):
    x, mask = _divisive_data(rng, masked)
    c = _readout(rng, x.shape)
    weights = rng.uniform(0.0, 1.0, (D, D))

    def loss(x, sigma, gain, weights):
        return jnp.sum(F.divisive_normalization(x, exponent=exponent, sigma=sigma, gain=gain, weights=weights,
                                                mask=mask) * c)

    assert_gradients_match(loss, x, rng.uniform(0.5, 1.5, D), rng.uniform(0.5, 2.0, D), weights)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("inverse", [False, True], ids=["GDN", "IGDN"])
def test_gdn_gradients(rng, masked, inverse):
    x, mask = _divisive_data(rng, masked)
    c = _readout(rng, x.shape)
    beta = rng.uniform(0.5, 1.5, D)
    gamma = rng.uniform(0.0, 0.3, (D, D))

    def loss(x, beta, gamma):
        return jnp.sum(F.gdn(x, beta, gamma, inverse=inverse, mask=mask) * c)

    assert_gradients_match(loss, x, beta, gamma)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_local_response_norm_gradients(rng, masked):
    x, mask = _divisive_data(rng, masked, (2, 5, D))
    c = _readout(rng, x.shape)

    def loss(x):
        return jnp.sum(F.local_response_norm(x, 3, alpha=0.3, beta=0.75, k=1.0, mask=mask) * c)

    assert_gradients_match(loss, x)


@pytest.mark.parametrize("p", [2.0, 3.0, 1.5])
def test_lp_normalize_gradients(rng, p):
    x, _ = _divisive_data(rng, False)
    c = _readout(rng, x.shape)
    assert_gradients_match(lambda x: jnp.sum(F.lp_normalize(x, p, axis=-1) * c), x)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_divisive_layers_gradients(rng, masked):
    """The layers (static GDN and divisive normalization, and three steps of the dynamic circuit)."""
    x, mask = _divisive_data(rng, masked)
    c = _readout(rng, x.shape)

    def dynamic(x):
        with brainstate.environ.context(dt=0.5 * u.ms):
            layer = brainnorm.DynamicDivisiveNormalization((D,), tau=2.0 * u.ms, tau_pool=3.0 * u.ms, sigma=0.7,
                                                           dtype=jnp.float64)
            layer.init_state(x.shape[0])
            y = None
            for _ in range(3):
                y = layer(x, mask)
            return jnp.sum(y * c)

    def static(x):
        layer = brainnorm.DivisiveNormalization((D,), exponent=2.0, sigma=0.7)
        return jnp.sum(layer(x, mask) * c)

    for loss in (dynamic, static):
        g = np.asarray(jax.grad(loss)(_f64(x)))
        expected = np.asarray(central_differences(loss, (_f64(x),), 0))
        np.testing.assert_allclose(g, expected, rtol=RTOL, atol=RTOL * max(1.0, np.abs(expected).max()),
                                   err_msg=loss.__name__)
        assert np.any(np.abs(g) > 1e-3)
