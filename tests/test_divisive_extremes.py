"""The divisive family and Lp normalization at float32's extremes, and in half precision (issue 24).

Every reference is the formula restated here in float64 (NumPy, or
``jax.numpy`` under ``jax.enable_x64`` for gradients), computed from the very
float32 (or half) values the implementation receives:

* divisive normalization: ``R_i = g sign(x_i)|x_i|^n / (sigma_i^n + sum_j w_ij |x_j|^n)``;
* GDN: ``y_i = x_i / sqrt(beta_i + sum_j gamma_ij x_j^2)``, IGDN multiplies;
* the dynamic circuit: its exponential-Euler map, ``c <- p + (c - p) e^{-dt/tau_p}``,
  ``R <- R_inf + (R - R_inf) e^{-dt (1 + c)/tau}`` with ``R_inf = g d / (1 + c)``;
* Lp normalization: ``x / max(||x||_p, epsilon)`` (``torch.nn.functional.normalize``).

Inputs run from 1e-30 to 1e30, where ``|x|^n`` leaves float32's range
(``(1e20)^2`` overflows, ``(1e-20)^2`` is flushed to 0 by XLA's CPU backend)
although every response is an ordinary number.
"""

from __future__ import annotations

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brainnorm import GDN, DivisiveNormalization, DynamicDivisiveNormalization
from brainnorm.functional import divisive_normalization, gdn, lp_normalize

RTOL = 2e-5  # float32 arithmetic against float64, responses of order 1
GRAD_RTOL = 1e-4  # gradients, relative to the largest entry of the reference
HALF_TOL = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3}  # one rounding of the output to half precision
SCALES = [1e-30, 1e-20, 1e20, 1e30]
# (exponent, scale of x and sigma) where |x|^n or the pool leaves float32's range
DIVISIVE_CASES = [(1.0, 1e38)] + [
    (n, scale) for n in (1.5, 2.0, 3.0) for scale in SCALES if n * abs(np.log10(scale)) > 38
]


def f64(value):
    return np.asarray(value, np.float64)


# ---------------------------------------------------------------------------
# float64 restatements of the formulas (channels on the last axis)
# ---------------------------------------------------------------------------


def divisive_ref(x, exponent=2.0, sigma=1.0, gain=1.0, weights=None, mask=None):
    x = f64(x)
    if mask is not None:
        x = np.where(mask, x, 0.0)
    channels = x.shape[-1]
    w = np.full((channels, channels), 1.0 / channels) if weights is None else f64(weights)
    energy = np.abs(x) ** exponent
    r = f64(gain) * np.sign(x) * energy / (f64(sigma) ** exponent + energy @ w.T)
    return r if mask is None else np.where(mask, r, 0.0)


def gdn_ref(x, beta, gamma, inverse=False):
    x = f64(x)
    norm = f64(beta) + (x**2) @ f64(gamma).T
    return x * np.sqrt(norm) if inverse else x / np.sqrt(norm)


def lp_ref(x, p=2.0, epsilon=1e-12):
    x = f64(x)
    norm = (
        np.max(np.abs(x), axis=-1, keepdims=True)
        if p == np.inf
        else np.sum(np.abs(x) ** p, -1, keepdims=True) ** (1 / p)
    )
    return x / np.maximum(norm, epsilon)


def circuit_ref(x, steps, dt, tau, tau_pool, exponent=2.0, sigma=1.0, gain=1.0, weights=None):
    """The response after each step of the exponential-Euler map, from rest (float64)."""
    x = f64(x)
    channels = x.shape[-1]
    w = np.full((channels, channels), 1.0 / channels) if weights is None else f64(weights)
    energy = np.abs(x) ** exponent
    drive = np.sign(x) * energy / f64(sigma) ** exponent
    pool = energy @ w.T / f64(sigma) ** exponent
    c, r, trace = np.zeros_like(x), np.zeros_like(x), []
    for _ in range(steps):
        c = pool + (c - pool) * np.exp(-dt / tau_pool)
        target = gain * drive / (1 + c)
        r = target + (r - target) * np.exp(-dt * (1 + c) / tau)
        trace.append(r)
    return np.stack(trace)


def close(actual, expected, rtol=RTOL, atol=1e-6):
    np.testing.assert_allclose(f64(actual), expected, rtol=rtol, atol=atol)


def grad_close(actual, expected, rtol=GRAD_RTOL):
    actual, expected = f64(actual), f64(expected)
    assert np.all(np.isfinite(actual)), actual
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.max(np.abs(expected)))


def grad64(fn, *args):
    """``jax.grad`` of ``fn`` (written with jax.numpy) at float64 copies of ``args``."""
    with jax.enable_x64(True):
        grads = jax.grad(fn, argnums=tuple(range(len(args))))(*(jnp.asarray(f64(a)) for a in args))
        return [np.asarray(g) for g in grads]


# ---------------------------------------------------------------------------
# 1. divisive normalization, GDN and the circuit: no overflow or underflow of |x|^n
# ---------------------------------------------------------------------------


def test_divisive_normalization_of_1e20_is_not_nan():
    x = jnp.array([1e20, 2e20])
    y = divisive_normalization(x, weights=jnp.eye(2))
    assert np.all(np.isfinite(np.asarray(y)))
    close(y, divisive_ref(x, weights=np.eye(2)))  # [1, 1]
    close(y, [1.0, 1.0])


def test_divisive_normalization_with_sigma_1e_minus_20_is_not_nan():
    x = jnp.array([1e-20, 3e-20])
    y = divisive_normalization(x, sigma=1e-20, weights=jnp.eye(2))
    expected = divisive_ref(x, sigma=np.float32(1e-20), weights=np.eye(2))  # x^2 / (sigma^2 + x^2), float32 inputs
    assert abs(expected[0] - 0.5) < 1e-12 and abs(expected[1] - 0.9) < 1e-6
    close(y, expected)


def test_gdn_of_1e20_is_not_zero():
    y = gdn(jnp.array([1e20]), 1.0, 0.1 * jnp.eye(1))
    close(y, gdn_ref(jnp.array([1e20]), 1.0, 0.1 * np.eye(1)))
    assert abs(float(y[0]) - 10**0.5) < 1e-5  # 1 / sqrt(0.1)


@pytest.mark.parametrize("weights", [np.eye(2), None], ids=["eye", "uniform"])
def test_dynamic_circuit_driven_by_1e20_stays_finite_and_follows_float64(weights):
    x = jnp.array([1e20, 2e20])
    circuit = DynamicDivisiveNormalization(2, tau=5 * u.ms, tau_pool=10 * u.ms, weights=weights)
    circuit.init_state()
    with brainstate.environ.context(dt=0.5 * u.ms):
        trace = brainstate.transform.for_loop(lambda _: circuit(x), jnp.arange(400))
    trace = f64(trace)
    assert np.all(np.isfinite(trace))
    assert np.all(np.isfinite(f64(circuit.conductance.value)))
    expected = circuit_ref(x, 400, 0.5, 5.0, 10.0, weights=weights)
    np.testing.assert_allclose(trace, expected, rtol=1e-4)
    close(trace[-1], divisive_ref(x, weights=weights), rtol=1e-4)  # [1, 1] or [0.4, 1.6]


@pytest.mark.parametrize("dt", [1e-3, 0.5, 1e6], ids=["dt1e-3", "dt0.5", "dt1e6"])
@pytest.mark.parametrize("scale", [3e38, 1e30, 1e20], ids=["max", "1e30", "1e20"])
def test_dynamic_circuit_stays_bounded_for_any_finite_input_at_any_dt(scale, dt):
    weights = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.2, 0.2]])
    x = jnp.asarray(np.array([1.0, -0.5, 0.25]) * scale, jnp.float32)
    circuit = DynamicDivisiveNormalization(3, tau=5 * u.ms, tau_pool=10 * u.ms, sigma=1.0, gain=100.0, weights=weights)
    circuit.init_state()
    with brainstate.environ.context(dt=dt * u.ms):
        trace = f64(brainstate.transform.for_loop(lambda _: circuit(x), jnp.arange(50)))
    assert np.all(np.isfinite(trace))
    assert np.all(np.isfinite(f64(circuit.conductance.value))) and np.all(f64(circuit.conductance.value) >= 0)
    if dt == 1e6:  # one step reaches the fixed point: the static response
        close(trace[-1], divisive_ref(x, sigma=1.0, gain=100.0, weights=weights), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("exponent, scale", DIVISIVE_CASES)
def test_divisive_normalization_at_float32_extremes_matches_float64(rng, exponent, scale):
    """x and sigma scaled together: the response does not depend on the scale."""
    channels = 5
    weights = rng.uniform(0.0, 1.0, (channels, channels)) * (rng.random((channels, channels)) < 0.7)
    x = jnp.asarray(rng.uniform(-2.0, 2.0, (2, 3, channels)) * scale, jnp.float32)
    sigma = jnp.asarray(rng.uniform(0.5, 1.5, channels) * scale, jnp.float32)
    gain = rng.uniform(0.5, 2.0, channels)
    mask = rng.random((2, 3, channels)) < 0.8
    # channels on axis 1 of the input (feature_axis=1), on the last axis of the reference
    moved = jnp.moveaxis(x, -1, 1)
    for fn in (divisive_normalization, jax.jit(divisive_normalization, static_argnames=("exponent", "feature_axis"))):
        y = fn(
            moved,
            exponent=exponent,
            sigma=sigma,
            gain=gain,
            weights=weights,
            feature_axis=1,
            mask=jnp.moveaxis(jnp.asarray(mask), -1, 1),
        )
        close(jnp.moveaxis(y, 1, -1), divisive_ref(x, exponent, sigma, gain, weights, mask))


def test_divisive_normalization_mixes_1e_minus_30_and_1e30_in_one_pool(rng):
    """A positive pool holds the largest value: nothing the response needs leaves the range."""
    x = jnp.array([[1e30, -1e-30, 1e10, -3e20], [1e-30, 2e-30, -1e-25, 0.0]], jnp.float32)
    weights = rng.uniform(0.1, 1.0, (4, 4))
    for exponent in (1.0, 2.0, 3.0):
        for sigma in (1.0, 1e-30, 1e30):
            y = divisive_normalization(x, exponent=exponent, sigma=sigma, weights=weights)
            close(y, divisive_ref(x, exponent, np.float32(sigma), 1.0, weights), atol=1e-6)


@pytest.mark.parametrize("exponent, scale", [(1.0, 1e-30)] + [case for case in DIVISIVE_CASES if case[1] < 1e38])
def test_divisive_normalization_gradients_at_extremes_match_float64(rng, exponent, scale):
    channels = 4
    weights = rng.uniform(0.0, 1.0, (channels, channels)) * (rng.random((channels, channels)) < 0.7)
    x = jnp.asarray(rng.uniform(0.2, 2.0, (3, channels)) * rng.choice([-1, 1], (3, channels)) * scale, jnp.float32)
    sigma = jnp.asarray(rng.uniform(0.5, 1.5, channels) * scale, jnp.float32)
    cotangent = rng.standard_normal((3, channels))

    def loss32(v, s):
        return jnp.sum(cotangent * divisive_normalization(v, exponent=exponent, sigma=s, weights=weights))

    def loss64(v, s):
        energy = jnp.abs(v) ** exponent
        return jnp.sum(cotangent * jnp.sign(v) * energy / (s**exponent + energy @ jnp.asarray(weights).T))

    dx, ds = jax.jit(jax.grad(loss32, argnums=(0, 1)))(x, sigma)
    dx64, ds64 = grad64(loss64, x, sigma)
    grad_close(dx, dx64)
    grad_close(ds, ds64)
    # forward mode agrees with reverse mode
    jac_fwd = jax.jacfwd(lambda v: divisive_normalization(v, exponent=exponent, sigma=sigma, weights=weights))(x[0])
    jac_rev = jax.jacrev(lambda v: divisive_normalization(v, exponent=exponent, sigma=sigma, weights=weights))(x[0])
    np.testing.assert_allclose(f64(jac_fwd), f64(jac_rev), rtol=1e-5, atol=1e-6 * np.max(np.abs(f64(jac_rev))))


@pytest.mark.parametrize("exponent", [1.0, 2.0, 3.0])
def test_divisive_gradient_is_finite_where_a_pool_is_small(exponent):
    """A zero channel whose pool is sigma^n alone: JAX's d(a/b) goes through b^-2, which overflows, times a = 0."""
    sigma = 1e-20

    def grad(x):
        def loss(v):
            return jnp.sum(divisive_normalization(v, exponent=exponent, sigma=sigma, weights=jnp.eye(2)))

        return f64(jax.jit(jax.grad(loss))(jnp.asarray(x, jnp.float32)))

    # each channel alone: d/dx [x^n / (sigma^n + |x|^n)] is n sigma^n x^(n-1) / (sigma^n + x^n)^2,
    # at x = 0: 1 / sigma for n = 1, else 0
    at_zero = 1 / sigma if exponent == 1.0 else 0.0
    # channel 1's pool far below the largest value (channel 0's) of the position
    g = grad([1.0, 0.0])
    assert np.all(np.isfinite(g)), g
    assert g[1] == pytest.approx(at_zero, rel=1e-5)
    assert abs(g[0]) < 1e-6  # exponent * 1e-20^n, lost to rounding next to 1 in float32
    # both channels at the scale of sigma
    g = grad([1e-20, 0.0])
    assert np.all(np.isfinite(g)), g
    assert g[1] == pytest.approx(at_zero, rel=1e-5)
    assert g[0] == pytest.approx(exponent / (4 * sigma), rel=1e-5)  # at x = sigma


GDN_CASES = [  # (scale of x, beta): responses of order 1, where x^2 leaves float32's range
    (1e30, 1.0),
    (1e30, 1e38),
    (1e25, 1e30),
    (1e20, 1e-6),
    (1e-20, 1e-37),
]


@pytest.mark.parametrize("scale, beta", GDN_CASES)
def test_gdn_at_float32_extremes_matches_float64(rng, scale, beta):
    channels = 4
    sparse = rng.random((channels, channels)) < 0.7
    gamma = rng.uniform(0.0, 0.5, (channels, channels)) * sparse + 0.1 * np.eye(channels)
    x = jnp.asarray(rng.uniform(-2.0, 2.0, (3, channels)) * scale, jnp.float32)
    beta = jnp.full((channels,), beta, jnp.float32)
    expected = gdn_ref(x, beta, gamma)
    for fn in (gdn, jax.jit(gdn)):
        close(fn(x, beta, gamma), expected, atol=1e-6 * np.max(np.abs(expected)))


def test_igdn_where_its_output_is_in_range_matches_float64(rng):
    """IGDN's output has the unit of x^2: compared wherever float64 gives a float32 number."""
    gamma = rng.uniform(0.0, 0.5, (3, 3)) + 0.1 * np.eye(3)
    finfo = np.finfo(np.float32)
    for x, beta in [
        ([1e15, -2e15, 5e14], 1e30),
        ([1e-15, -2e-15, 5e-16], 1e-30),
        ([1e-10, 3e-11, 0.0], 1e-37),
        ([1e20, 1.0, -0.5], 1.0),
        ([3e19, -1e10, 2.0], 1e-6),
    ]:
        x = jnp.asarray(x, jnp.float32)
        expected = gdn_ref(x, np.float32(beta), gamma, inverse=True)
        in_range = np.abs(expected) < finfo.max
        for fn in (gdn, jax.jit(gdn, static_argnames=("inverse",))):
            y = f64(fn(x, beta, gamma, inverse=True))
            close(y[in_range], expected[in_range], atol=1e-6 * np.max(np.abs(expected[in_range])))
            assert np.all(np.isinf(y[~in_range]))  # beyond float32, as in float64


@pytest.mark.parametrize("scale, beta", [(1e30, 1.0), (1e20, 1e-6), (1e-15, 1e-30), (1e-30, 1e-37)])
def test_gdn_gradients_at_extremes_match_float64(rng, scale, beta):
    channels = 4
    gamma = rng.uniform(0.0, 0.5, (channels, channels)) + 0.1 * np.eye(channels)
    x = jnp.asarray(rng.uniform(0.2, 2.0, (3, channels)) * rng.choice([-1, 1], (3, channels)) * scale, jnp.float32)
    cotangent = rng.standard_normal((3, channels))

    def loss32(v):
        return jnp.sum(cotangent * gdn(v, beta, gamma))

    def loss64(v):
        return jnp.sum(cotangent * v / jnp.sqrt(beta + (v**2) @ jnp.asarray(gamma).T))

    grad_close(jax.jit(jax.grad(loss32))(x), grad64(loss64, x)[0])


# ---------------------------------------------------------------------------
# 2. Lp normalization: tiny inputs are scaled up too
# ---------------------------------------------------------------------------


def test_lp_normalize_of_3e_minus_20_is_not_3e10():
    x = jnp.array([3e-20, 4e-20])
    y = lp_normalize(x, epsilon=1e-30)
    close(y, lp_ref(x, 2.0, 1e-30))
    close(y, [0.6, 0.8], rtol=1e-6)


def test_lp_normalize_p8_of_1e_minus_5_is_exact():
    x = jnp.array([1e-5, 2e-5])
    y = lp_normalize(x, p=8)
    expected = lp_ref(x, 8.0)
    assert abs(expected[0] - 0.49976) < 1e-5 and abs(expected[1] - 0.99951) < 1e-5
    close(y, expected)


@pytest.mark.parametrize("p", [1.5, 2.0, 3.0, 8.0], ids=lambda p: f"p{p}")
def test_lp_normalize_at_float32_extremes_matches_float64(rng, p):
    for scale in SCALES:  # small inputs were not scaled up before, large ones were scaled down
        x = jnp.asarray(rng.uniform(-2.0, 2.0, (4, 6)) * scale, jnp.float32)
        expected = lp_ref(x, p, 1e-37)  # epsilon below every norm
        close(lp_normalize(x, p, epsilon=1e-37), expected)
        close(jax.jit(lambda v: lp_normalize(v, p, epsilon=1e-37))(x), expected)


@pytest.mark.parametrize("p", [1.5, 2.0, 3.0], ids=lambda p: f"p{p}")
def test_lp_normalize_compares_epsilon_with_the_norm_in_the_unit_of_x(p):
    x = jnp.array([3e-30, -4e-30])
    for epsilon in (1e-31, 2e-29, 1e-20):  # below the norm, above it, far above it
        close(lp_normalize(x, p, epsilon=epsilon), lp_ref(x, p, epsilon), rtol=1e-6, atol=1e-12)
    x = jnp.array([3e30, -4e30])
    for epsilon in (1e29, 1e31, 1e34):
        close(lp_normalize(x, p, epsilon=epsilon), lp_ref(x, p, epsilon), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 8.0, np.inf], ids=lambda p: f"p{p}")
def test_lp_normalize_gradients_at_extremes_match_float64(rng, scale, p):
    x = jnp.asarray(rng.uniform(0.2, 2.0, (3, 5)) * rng.choice([-1, 1], (3, 5)) * scale, jnp.float32)
    cotangent = rng.standard_normal((3, 5))

    def loss32(v):
        return jnp.sum(cotangent * lp_normalize(v, p, epsilon=1e-37))

    def loss64(v):
        if p == np.inf:
            norm = jnp.max(jnp.abs(v), axis=-1, keepdims=True)
        else:
            norm = jnp.sum(jnp.abs(v) ** p, axis=-1, keepdims=True) ** (1 / p)
        return jnp.sum(cotangent * v / jnp.maximum(norm, 1e-37))

    grad_close(jax.jit(jax.grad(loss32))(x), grad64(loss64, x)[0])


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, np.inf], ids=lambda p: f"p{p}")
def test_lp_normalize_gradient_of_a_zero_and_of_a_tiny_vector(p):
    """At 0 the norm (below epsilon) has PyTorch's subgradient 0; at 5e-30 the norm is no longer lost."""
    for epsilon in (1e-12, 1e-25):  # y = x / epsilon
        grad = f64(jax.grad(lambda v, epsilon=epsilon: lp_normalize(v, p, epsilon=epsilon)[0])(jnp.zeros(3)))
        np.testing.assert_allclose(grad, [1 / epsilon, 0.0, 0.0], rtol=1e-6)
    x = jnp.array([3e-30, -4e-30, 0.0])

    def loss64(v):
        norm = jnp.max(jnp.abs(v)) if p == np.inf else jnp.sum(jnp.abs(v) ** p) ** (1 / p)
        return v[0] / jnp.maximum(norm, 1e-35)

    grad = jax.grad(lambda v: lp_normalize(v, p, epsilon=1e-35)[0])(x)
    # at x_2 = 0 the float64 restatement has |v|^p's derivative 0 for p > 1, as the implementation
    grad_close(grad, grad64(loss64, x)[0])


# ---------------------------------------------------------------------------
# 3. bfloat16 and float16 (and every other real floating dtype)
# ---------------------------------------------------------------------------

HALF = [jnp.bfloat16, jnp.float16]


def _half_input(rng, dtype, shape=(3, 4)):
    return jnp.asarray(rng.uniform(-3.0, 3.0, shape), dtype)


def test_functions_accept_bfloat16_as_they_accept_float16_and_return_it(rng):
    weights = rng.uniform(0.0, 1.0, (4, 4))
    for dtype in HALF:
        x = _half_input(rng, dtype)
        y = divisive_normalization(x, sigma=0.7, weights=weights)
        assert y.dtype == dtype
        close(y, divisive_ref(x, 2.0, 0.7, 1.0, weights), rtol=HALF_TOL[dtype], atol=HALF_TOL[dtype])
        for inverse in (False, True):
            y = gdn(x, 1.0, weights, inverse=inverse)
            assert y.dtype == dtype
            close(y, gdn_ref(x, 1.0, weights, inverse), rtol=HALF_TOL[dtype], atol=HALF_TOL[dtype])


def test_layers_accept_bfloat16_as_they_accept_float16_and_return_it(rng):
    weights = rng.uniform(0.0, 1.0, (4, 4))
    for dtype in HALF:
        x = _half_input(rng, dtype)
        y = DivisiveNormalization(4, sigma=0.7, weights=weights)(x)
        assert y.dtype == dtype
        close(y, divisive_ref(x, 2.0, 0.7, 1.0, weights), rtol=HALF_TOL[dtype], atol=HALF_TOL[dtype])
        layer = GDN(4)
        y = layer(x)
        assert y.dtype == dtype
        close(y, gdn_ref(x, f64(layer.beta), f64(layer.gamma)), rtol=HALF_TOL[dtype], atol=HALF_TOL[dtype])


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_dynamic_circuit_accepts_half_precision_and_computes_in_float32(rng, dtype):
    """States in their own dtype (float32 by default), as for float16 before; the drive is not rounded to half."""
    weights = rng.uniform(0.0, 1.0, (4, 4))
    x = jnp.abs(_half_input(rng, dtype))
    circuit = DynamicDivisiveNormalization(4, tau=5 * u.ms, tau_pool=10 * u.ms, sigma=0.7, weights=weights)
    circuit.init_state(3)
    with brainstate.environ.context(dt=0.5 * u.ms):
        trace = brainstate.transform.for_loop(lambda _: circuit(x), jnp.arange(400))
    assert trace.dtype == jnp.float32
    np.testing.assert_allclose(
        f64(trace), circuit_ref(x, 400, 0.5, 5.0, 10.0, 2.0, 0.7, 1.0, weights), rtol=1e-4, atol=1e-6
    )


def test_bfloat16_keeps_float32s_range():
    x = jnp.asarray([1e30, 2e30], jnp.bfloat16)
    y = divisive_normalization(x, sigma=1e30, weights=jnp.eye(2))
    assert y.dtype == jnp.bfloat16
    close(y, divisive_ref(x, 2.0, f64(jnp.asarray(1e30, jnp.bfloat16)), 1.0, np.eye(2)), rtol=1e-2)
    y = gdn(jnp.asarray([1e-30, -3e-30], jnp.bfloat16), 1e-37, jnp.eye(2))
    close(y, gdn_ref(f64(jnp.asarray([1e-30, -3e-30], jnp.bfloat16)), np.float32(1e-37), np.eye(2)), rtol=1e-2)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2], ids=["f8e4m3", "f8e5m2"])
def test_eight_bit_floats_are_accepted(dtype):
    x = jnp.asarray([1.0, 2.0, 0.5], dtype)
    y = divisive_normalization(x, weights=jnp.eye(3))
    assert y.dtype == dtype
    close(y, divisive_ref(x, weights=np.eye(3)), rtol=0.07)


def test_complex_input_error_names_the_public_function_or_layer():
    x = jnp.ones((2, 3), jnp.complex64)
    cases = [
        ("divisive_normalization", lambda: divisive_normalization(x)),
        ("gdn", lambda: gdn(x, 1.0, jnp.eye(3))),
        ("DivisiveNormalization", lambda: DivisiveNormalization(3)(x)),
        ("GDN", lambda: GDN(3)(x)),
    ]
    circuit = DynamicDivisiveNormalization(3)
    circuit.init_state(2)
    cases.append(("DynamicDivisiveNormalization", lambda: circuit(x)))
    for owner, call in cases:
        with brainstate.environ.context(dt=0.1 * u.ms), pytest.raises(TypeError, match=rf"^{owner}: x must be real"):
            call()


def test_sigma_unit_error_of_a_layer_names_the_layer():
    for cls in (DivisiveNormalization, DynamicDivisiveNormalization):
        layer = cls(3, sigma=1.0 * u.mV)
        if cls is DynamicDivisiveNormalization:
            layer.init_state()
        with (
            brainstate.environ.context(dt=0.1 * u.ms),
            pytest.raises(u.UnitMismatchError, match=rf"^{cls.__name__}: sigma"),
        ):
            layer(jnp.ones(3) * u.nA)
