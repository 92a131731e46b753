"""Reliability of the spiking and temporal layers (issue 24): padding in gradients, units, validation.

* TAB with nan (or inf, or huge) padding: a loss that reads only the valid
  outputs has, at every valid position and for every parameter, the gradient
  of zero padding, and a float64 restatement's (docs/guides/masks.rst), in
  single- and multi-step mode; 0 at padded positions.
* NeuNorm with Quantity input: the state takes the input's unit; another
  unit of the same dimension converts it, another dimension raises naming the
  layer and writes nothing.
* Options fail when the layer is built, naming the layer and the option
  (SPEC §3): array momentum, LocalResponseNorm's alpha/beta/k, tdBN's alpha
  and v_th beyond float32, step_mode, TEBN's options, and the options nobody
  checked (name, affine, unused initializers, mean_type, unit, NeuNorm's).
* Functions: ``neu_norm`` checks its weight's shape.
"""

from __future__ import annotations

import inspect
import re

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainnorm
from brainnorm import functional as F

T, B, C = 3, 5, 2
EPS = 1e-5


def named(*words):
    """Regex matching a message that contains every word, in this order."""
    return "(?s)" + ".*".join(re.escape(w) for w in words)


def _leaves(tree):
    return [np.asarray(u.get_mantissa(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]


def _snapshot(layer):
    return {path: _leaves(state.value) for path, state in layer.states().items()}


def _assert_unchanged(before, after):
    assert before.keys() == after.keys()
    for path in before:
        for b, a in zip(before[path], after[path], strict=True):
            np.testing.assert_array_equal(b, a, err_msg=str(path))


# --- 1. TAB: padding never reaches a gradient ----------------------------------------------------


def _tab_data(seed=0):
    rng = np.random.default_rng(seed)
    x = (1.0 + rng.standard_normal((T, B, C))).astype(np.float32)
    mask = rng.random((T, B, 1)) < 0.7
    mask[:, 0] = True  # every step has a valid sample
    mask[1, 1:] = False  # a step with a single valid sample
    weights = rng.standard_normal((T, B, C)).astype(np.float32)  # a loss whose gradient is not 0
    gamma = rng.uniform(0.5, 1.5, (T, C)).astype(np.float32)
    beta = rng.uniform(-0.5, 0.5, (T, C)).astype(np.float32)
    p = rng.uniform(0.6, 1.4, (T,)).astype(np.float32)
    return x, mask, weights, gamma, beta, p


def _tab(gamma, beta, p, step_mode):
    layer = brainnorm.TemporalAccumulatedBatchNorm(C, num_steps=T, step_mode=step_mode)
    layer.weight.value = {"scale": jnp.asarray(gamma), "bias": jnp.asarray(beta)}
    layer.p.value = jnp.asarray(p)
    return layer


def _tab_step(layer, xs, mask, weights, step_mode, training=True):
    """Gradients (params, x) of ``sum(where(mask, y, 0) * weights)``, the valid outputs and the states after."""
    params = layer.states(brainstate.ParamState)

    def loss(v):
        with brainstate.environ.context(fit=training):
            if step_mode == "multi":
                y = layer(v, mask)
            else:
                y = jnp.stack([layer(v[t], mask[t], t=t) for t in range(T)])
        return jnp.sum(jnp.where(mask, y, 0.0) * weights), y

    (g_params, g_x), y = brainstate.transform.grad(loss, grad_states=params, argnums=0, has_aux=True)(jnp.asarray(xs))
    return g_params, np.asarray(g_x), np.asarray(y), _snapshot(layer)


def _tab_reference_loss(x, mask, weights, gamma, beta, p):
    """float64 TAB (statistics of steps 0..t over the valid elements) and the loss over the valid outputs."""
    valid = jnp.broadcast_to(mask, x.shape)
    outputs = []
    for t in range(T):
        window, window_valid = x[: t + 1], valid[: t + 1]
        n = jnp.sum(window_valid, axis=(0, 1))
        mean = jnp.sum(jnp.where(window_valid, window, 0.0), axis=(0, 1)) / n
        var = jnp.sum(jnp.where(window_valid, (window - mean) ** 2, 0.0), axis=(0, 1)) / n
        outputs.append(p[t] ** 2 * (gamma[t] * (x[t] - mean) / jnp.sqrt(var + EPS) + beta[t]))
    return jnp.sum(jnp.where(valid, jnp.stack(outputs), 0.0) * weights)


def _float64_gradients(x, mask, weights, gamma, beta, p):
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(a, np.float64)) for a in (np.where(mask, x, 0.0), weights, gamma, beta, p)]
        grads = jax.grad(
            lambda x_, g_, b_, p_: _tab_reference_loss(x_, jnp.asarray(mask), args[1], g_, b_, p_),
            argnums=(0, 1, 2, 3),
        )(args[0], args[2], args[3], args[4])
        return [np.asarray(g) for g in grads]


def _param_grads(g_params):
    flat = {}
    for path, value in g_params.items():
        if isinstance(value, dict):
            for key, leaf in value.items():
                flat[key] = np.asarray(leaf)
        else:
            flat[path[-1]] = np.asarray(value)
    return flat


@pytest.mark.parametrize("step_mode", ["multi", "single"])
def test_tab_nan_padding_gradient_equals_float64_reference(step_mode):
    """The reproducer of issue 24, on a larger case: nan padding, gradients at valid positions and of the parameters."""
    x, mask, weights, gamma, beta, p = _tab_data()
    layer = _tab(gamma, beta, p, step_mode)
    g_params, g_x, _, _ = _tab_step(layer, np.where(mask, x, np.nan).astype(np.float32), mask, weights, step_mode)
    assert np.all(np.isfinite(g_x)), f"non-finite input gradient: {g_x}"
    expected_x, expected_gamma, expected_beta, expected_p = _float64_gradients(x, mask, weights, gamma, beta, p)
    valid = np.broadcast_to(mask, x.shape)
    np.testing.assert_allclose(g_x[valid], expected_x[valid], rtol=2e-4, atol=2e-5)
    assert np.all(g_x[~valid] == 0), "padded positions must have a zero gradient"
    grads = _param_grads(g_params)
    np.testing.assert_allclose(grads["scale"], expected_gamma, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(grads["bias"], expected_beta, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(grads["p"], expected_p, rtol=2e-4, atol=2e-5)


def test_tab_issue_reproducer_is_finite():
    """The exact reproducer of issue 24 (num_steps=1, a padded sample), multi- and single-step."""
    xs = jnp.array([[[1.0, 2.0], [3.0, 5.0], [jnp.nan, jnp.nan]]])
    mk = jnp.array([[[True], [True], [False]]])
    for step_mode in ("multi", "single"):
        tab = brainnorm.TemporalAccumulatedBatchNorm(2, num_steps=1, step_mode=step_mode)

        def loss(v, tab=tab, step_mode=step_mode):
            with brainstate.environ.context(fit=True):
                y = tab(v, mk) if step_mode == "multi" else tab(v[0], mk[0], t=0)[None]
                return jnp.sum(jnp.where(mk, y, 0.0) * jnp.arange(3.0)[:, None])

        grad = np.asarray(brainstate.transform.grad(loss)(xs))
        assert np.all(np.isfinite(grad)), f"{step_mode}: {grad}"
        assert np.all(grad[0, 2] == 0)


@pytest.mark.parametrize("pad", ["nan", "inf", "-inf", "1e30"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("step_mode", ["multi", "single"])
def test_tab_padding_gradients_equal_zero_padding(step_mode, training, pad):
    """Any padding: valid outputs, input and parameter gradients and states equal those of zero padding."""
    x, mask, weights, gamma, beta, p = _tab_data(1)
    runs = []
    for fill in (0.0, float(pad)):
        layer = _tab(gamma, beta, p, step_mode)
        if not training:  # running statistics that are not the batch's
            layer.running_mean.value = jnp.full((T, C), 0.3)
            layer.running_var.value = jnp.full((T, C), 1.7)
        runs.append(_tab_step(layer, np.where(mask, x, fill).astype(np.float32), mask, weights, step_mode, training))
    (p0, g0, y0, s0), (p1, g1, y1, s1) = runs
    valid = np.broadcast_to(mask, x.shape)
    np.testing.assert_allclose(y1[valid], y0[valid], rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(g1)), f"non-finite input gradient with {pad} padding"
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-6)
    assert np.all(g1[~valid] == 0)
    grads0, grads1 = _param_grads(p0), _param_grads(p1)
    for name in grads0:
        np.testing.assert_allclose(grads1[name], grads0[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for path in s0:
        for a, b in zip(s0[path], s1[path], strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=str(path))


def test_tab_function_nan_padding_gradient_under_jit():
    """The functional form: jit(grad) with a padding mask that is constant along the batch (a padded step)."""
    x, _, weights, gamma, beta, p = _tab_data(2)
    mask = np.ones((T, 1, 1), bool)
    mask[1] = False  # a whole step is padding: the statistics of step 1 are those of step 0
    padded = jnp.asarray(np.where(mask, x, np.nan).astype(np.float32))

    def loss(v, scale, q):
        y, _, _ = F.temporal_accumulated_batch_norm(
            v, scale=scale[:, None], bias=jnp.asarray(beta)[:, None], p=q, training=True, mask=mask
        )
        return jnp.sum(jnp.where(mask, y, 0.0) * weights)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(padded, jnp.asarray(gamma), jnp.asarray(p))
    zero = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(jnp.where(mask, padded, 0.0), jnp.asarray(gamma), jnp.asarray(p))
    for g, g0 in zip(grads, zero, strict=True):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(grads[0])[1] == 0)


def test_tab_nan_padding_keeps_nan_output_at_padding():
    """The outputs at nan-padded positions are still the padding transformed (nan), as for every layer."""
    x, mask, _, gamma, beta, p = _tab_data()
    layer = _tab(gamma, beta, p, "multi")
    with brainstate.environ.context(fit=True):
        y = np.asarray(layer(jnp.asarray(np.where(mask, x, np.nan).astype(np.float32)), mask))
    valid = np.broadcast_to(mask, x.shape)
    assert np.all(np.isnan(y[~valid])) and np.all(np.isfinite(y[valid]))


@pytest.mark.parametrize("step_mode", ["multi", "single"])
def test_tab_huge_values_keep_finite_running_statistics(step_mode):
    """|x| ~ 1e19: squares overflow float32, the variance (~5e37) does not; count * variance would (old sums)."""
    rng = np.random.default_rng(3)
    x = (7e18 * rng.standard_normal((T, B, C))).astype(np.float32)
    layer = brainnorm.TemporalAccumulatedBatchNorm(C, T, step_mode=step_mode, momentum=0.0, epsilon=1e-5)
    with brainstate.environ.context(fit=True):
        if step_mode == "multi":
            y = np.asarray(layer(jnp.asarray(x)))
        else:
            y = np.stack([np.asarray(layer(jnp.asarray(x[t]), t=t)) for t in range(T)])
    x64 = x.astype(np.float64)
    for t in range(T):
        window = x64[: t + 1].reshape(-1, C)
        mean, var = window.mean(0), window.var(0)
        np.testing.assert_allclose(np.asarray(layer.running_mean.value)[t], mean, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(layer.running_var.value)[t], var, rtol=1e-4)
        np.testing.assert_allclose(y[t], (x64[t] - mean) / np.sqrt(var), atol=1e-4)


# --- 2. NeuNorm with Quantity input --------------------------------------------------------------


def _neunorm(step_mode="single", **kwargs):
    return brainnorm.NeuNorm(3, k=0.5, w_init=jnp.array([1.0, 2.0, 3.0]), step_mode=step_mode, **kwargs)


def test_neunorm_accepts_quantity_input():
    """The reproducer of issue 24: NeuNorm(3), init_state(2), a call in mV."""
    n = brainnorm.NeuNorm(3)
    n.init_state(2)
    y = n(jnp.ones((2, 3)) * u.mV)
    assert isinstance(y, u.Quantity) and y.unit == u.mV
    assert n.activity_unit == u.mV and n.activity.value.unit == u.mV


@pytest.mark.parametrize("step_mode", ["single", "multi"])
def test_neunorm_quantity_equals_plain_computation(step_mode):
    spikes = np.random.default_rng(0).random((4, 2, 3)).astype(np.float32)
    plain, quantity = _neunorm(step_mode), _neunorm(step_mode)
    plain.init_state(2)
    quantity.init_state(2)
    if step_mode == "multi":
        expected, got = plain(spikes), quantity(spikes * u.mV)
    else:
        expected = jnp.stack([plain(s) for s in spikes])
        got = u.math.stack([quantity(s * u.mV) for s in spikes])
    assert got.unit == u.mV and quantity.activity_unit == u.mV
    np.testing.assert_allclose(got.mantissa, expected, rtol=1e-6)
    np.testing.assert_allclose(quantity.activity.value.to_decimal(u.mV), plain.activity.value, rtol=1e-6)


def test_neunorm_declared_unit_works_under_jit_and_survives_reset():
    layer = _neunorm(unit=u.mV)
    layer.init_state(2)
    assert layer.activity.value.unit == u.mV
    step = brainstate.transform.jit(lambda v: layer(v))
    step(jnp.ones((2, 3)) * u.mV)
    second = step(jnp.ones((2, 3)) * u.mV)
    # a = 0.5 * a + 0.5 / 9 * 3 per sample: 1/6, then 1/4
    assert second.unit == u.mV
    np.testing.assert_allclose(second.mantissa, np.broadcast_to(1.0 - np.array([1.0, 2.0, 3.0]) / 4, (2, 3)), rtol=1e-6)
    layer.reset_state(2)
    assert layer.activity_unit == u.mV and np.all(layer.activity.value.mantissa == 0)


def test_neunorm_first_quantity_under_jit_says_how_to_fix_it():
    layer = _neunorm()
    layer.init_state(2)
    before = _snapshot(layer)
    with pytest.raises(brainnorm._units.UnitError, match=named("NeuNorm", "traced", "unit=mV")):
        brainstate.transform.jit(lambda v: layer(v))(jnp.ones((2, 3)) * u.mV)
    _assert_unchanged(before, _snapshot(layer))


def test_neunorm_compatible_unit_is_converted():
    """V for a state in mV: the output is in V, the state stays in mV, the physics is that of mV input."""
    in_mv, mixed = _neunorm(), _neunorm()
    in_mv.init_state(2)
    mixed.init_state(2)
    x = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    in_mv(x * u.mV)
    mixed(x * u.mV)
    expected = in_mv(2 * x * u.mV)
    got = mixed(2e-3 * x * u.volt)
    assert got.unit == u.volt and mixed.activity_unit == u.mV
    np.testing.assert_allclose(got.to_decimal(u.mV), expected.to_decimal(u.mV), rtol=1e-5)
    np.testing.assert_allclose(mixed.activity.value.mantissa, in_mv.activity.value.mantissa, rtol=1e-5)


@pytest.mark.parametrize("first, second", [("mV", "nA"), ("mV", "plain"), ("plain", "mV"), ("plain", "nA")])
def test_neunorm_unit_change_raises_naming_the_layer_and_writes_nothing(first, second):
    units = {"mV": u.mV, "nA": u.nA, "plain": None}

    def call(layer, which):
        x = jnp.ones((2, 3))
        return layer(x if units[which] is None else x * units[which])

    layer = _neunorm()
    layer.init_state(2)
    call(layer, first)
    before = _snapshot(layer)
    with pytest.raises(brainnorm._units.UnitError, match=named("NeuNorm", "unit")):
        call(layer, second)
    _assert_unchanged(before, _snapshot(layer))
    assert layer.activity_unit == units[first]
    layer.reset_state(2)
    if first == "plain":  # a fresh plain state takes the next input's unit
        assert call(layer, second).shape == (2, 3) and layer.activity_unit == units[second]
    else:  # a settled unit is kept by reset_state
        with pytest.raises(brainnorm._units.UnitError, match=named("NeuNorm", "unit")):
            call(layer, second)
        assert call(layer, first).shape == (2, 3)


def test_neu_norm_function_converts_a_quantity_state():
    x = jnp.ones((2, 3))
    y_mv, a_mv = F.neu_norm(x * u.mV, jnp.ones(3), jnp.full((2, 1), 2.0) * u.mV, k=0.5)
    y_v, a_v = F.neu_norm(x * u.mV, jnp.ones(3), jnp.full((2, 1), 2e-3) * u.volt, k=0.5)
    np.testing.assert_allclose(y_v.to_decimal(u.mV), y_mv.to_decimal(u.mV), rtol=1e-5)
    np.testing.assert_allclose(a_v.to_decimal(u.mV), a_mv.to_decimal(u.mV), rtol=1e-5)


# --- 3. Raw errors and silent acceptance ---------------------------------------------------------


def test_neu_norm_weight_shape_is_checked():
    with pytest.raises(ValueError, match=named("neu_norm", "weight", "(2, 3)", "(4,)")):
        F.neu_norm(jnp.ones((2, 3)), jnp.ones(4))
    with pytest.raises(ValueError, match=named("neu_norm", "weight", "(2, 3)", "(2, 2, 3)")):
        F.neu_norm(jnp.ones((5, 2, 3)), jnp.ones((2, 2, 3)), multi_step=True)
    with pytest.raises(TypeError, match=named("neu_norm", "weight")):
        F.neu_norm(jnp.ones((2, 3)), "ones")
    with pytest.raises(TypeError, match=named("neu_norm", "multi_step")):
        F.neu_norm(jnp.ones((2, 3)), jnp.ones(3), multi_step="yes")
    y, _ = F.neu_norm(jnp.ones((5, 2, 3)), jnp.ones((2, 3)), multi_step=True)  # one step's shape fits
    assert y.shape == (5, 2, 3)


MOMENTUM_LAYERS = {
    "BatchNorm0d": lambda **kw: brainnorm.BatchNorm0d(C, **kw),
    "BatchNorm1d": lambda **kw: brainnorm.BatchNorm1d((4, C), **kw),
    "BatchNorm2d": lambda **kw: brainnorm.BatchNorm2d((2, 2, C), **kw),
    "BatchRenorm": lambda **kw: brainnorm.BatchRenorm((4, C), **kw),
    "BatchNormThroughTime": lambda **kw: brainnorm.BatchNormThroughTime(C, T, **kw),
    "ThresholdDependentBatchNorm": lambda **kw: brainnorm.ThresholdDependentBatchNorm(C, **kw),
    "TemporalEffectiveBatchNorm": lambda **kw: brainnorm.TemporalEffectiveBatchNorm(C, T, **kw),
    "TemporalAccumulatedBatchNorm": lambda **kw: brainnorm.TemporalAccumulatedBatchNorm(C, T, **kw),
}


@pytest.mark.parametrize("name", MOMENTUM_LAYERS)
def test_array_momentum_of_another_shape_fails_at_construction(name):
    with pytest.raises(ValueError, match=named(name, "momentum", "feature shape", "got shape (3,)")):
        MOMENTUM_LAYERS[name](momentum=jnp.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match=named(name, "momentum", "(4, 2)")):
        MOMENTUM_LAYERS[name](momentum=np.full((4, C), 0.5))


TEMPORAL = (
    "BatchNormThroughTime",
    "ThresholdDependentBatchNorm",
    "TemporalEffectiveBatchNorm",
    "TemporalAccumulatedBatchNorm",
)


@pytest.mark.parametrize(
    ("name", "step_mode"),
    [(name, "single") for name in MOMENTUM_LAYERS] + [(name, "multi") for name in MOMENTUM_LAYERS if name in TEMPORAL],
)
def test_per_channel_momentum_updates_each_channel_with_its_own(name, step_mode):
    """One momentum per channel: every layer (per-step ones included) updates channel c with momentum[c]."""
    momentum = np.array([0.25, 0.75], np.float32)
    kwargs = dict(momentum=jnp.asarray(momentum))
    if name in TEMPORAL:
        kwargs["step_mode"] = step_mode
    layer = MOMENTUM_LAYERS[name](**kwargs)
    rng = np.random.default_rng(0)
    if name in TEMPORAL and step_mode == "multi":
        x = rng.standard_normal((T, B, C)).astype(np.float32) + 2.0
        # per-step layers: slot 0 holds the statistics of step 0; tdBN/TEBN: of the whole sequence
        batch_mean = (
            x[0].mean(0)
            if name in ("BatchNormThroughTime", "TemporalAccumulatedBatchNorm")
            else x.reshape(-1, C).mean(0)
        )
        call = dict()
    else:
        x = rng.standard_normal((B,) + layer.in_size).astype(np.float32) + 2.0
        batch_mean = x.reshape(-1, C).mean(0)
        call = dict(t=0) if name in TEMPORAL and name != "ThresholdDependentBatchNorm" else dict()
    with brainstate.environ.context(fit=True):
        layer(jnp.asarray(x), **call)
    mean = np.asarray(layer.running_mean.value).reshape(-1, C)[0]
    np.testing.assert_allclose(mean, (1 - momentum) * batch_mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(alpha=-1.0), "alpha"),
        (dict(k=-1.0), "k"),
        (dict(k=0.0, beta=0.75), "k"),
        (dict(alpha=1e39), "alpha"),
        (dict(k=1e39), "k"),
        (dict(beta=-1e39), "beta"),
    ],
)
def test_local_response_norm_rejects_a_base_that_can_vanish_or_go_negative(kwargs, option):
    with pytest.raises(ValueError, match=named("LocalResponseNorm", option)):
        brainnorm.LocalResponseNorm(4, 3, **kwargs)
    with pytest.raises(ValueError, match=named("local_response_norm", option)):
        F.local_response_norm(jnp.ones((2, 4)), 3, **kwargs)


def test_local_response_norm_accepted_edges_stay_finite():
    x = jnp.array([[0.0, 0.0, 0.0, 0.0], [3.0, -2.0, 0.0, 1e3]])
    for kwargs in (dict(alpha=0.0), dict(k=0.0, beta=0.0), dict(k=0.0, beta=-0.5), dict(beta=-0.5), dict(k=1e-3)):
        y = brainnorm.LocalResponseNorm(4, 3, **kwargs)(x)
        assert np.all(np.isfinite(np.asarray(y))), kwargs


def test_local_response_norm_negative_alpha_was_nan_in_the_issue():
    with pytest.raises(ValueError, match=named("LocalResponseNorm", "alpha", "non-negative", "-1.0")):
        brainnorm.LocalResponseNorm(4, 3, alpha=-1.0)


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(alpha=1e300), "alpha"),
        (dict(v_th=1e39), "v_th"),
        (dict(alpha=-1e39), "alpha"),
        (dict(alpha=1e20, v_th=1e20), "alpha * v_th"),
    ],
)
def test_tdbn_alpha_and_v_th_must_fit_float32(kwargs, option):
    with pytest.raises(ValueError, match=named("ThresholdDependentBatchNorm", option, "float32")):
        brainnorm.ThresholdDependentBatchNorm(C, **kwargs)


def test_tdbn_large_representable_factor_is_accepted_and_finite():
    layer = brainnorm.ThresholdDependentBatchNorm(C, alpha=1e10, v_th=1e10, step_mode="multi")
    with brainstate.environ.context(fit=True):
        y = layer(jnp.asarray(np.random.default_rng(0).standard_normal((T, B, C)).astype(np.float32)))
    assert np.all(np.isfinite(np.asarray(y)))


STEP_MODE_LAYERS = {
    "BatchNormThroughTime": lambda **kw: brainnorm.BatchNormThroughTime(C, T, **kw),
    "ThresholdDependentBatchNorm": lambda **kw: brainnorm.ThresholdDependentBatchNorm(C, **kw),
    "TemporalEffectiveBatchNorm": lambda **kw: brainnorm.TemporalEffectiveBatchNorm(C, T, **kw),
    "TemporalAccumulatedBatchNorm": lambda **kw: brainnorm.TemporalAccumulatedBatchNorm(C, T, **kw),
    "NeuNorm": lambda **kw: brainnorm.NeuNorm(C, **kw),
}


@pytest.mark.parametrize(
    "bad", [np.array(["single", "multi"]), jnp.array([1, 2]), None, 1], ids=["strs", "ints", "none", "int"]
)
@pytest.mark.parametrize("name", STEP_MODE_LAYERS)
def test_step_mode_of_the_wrong_type_is_a_clear_type_error(name, bad):
    with pytest.raises(TypeError, match=named(name, "step_mode", "('single', 'multi')")):
        STEP_MODE_LAYERS[name](step_mode=bad)


def test_tebn_step_mode_array_of_the_issue():
    with pytest.raises(TypeError, match=named("TemporalEffectiveBatchNorm", "step_mode", "ndarray")):
        brainnorm.TemporalEffectiveBatchNorm(C, T, step_mode=np.array(["single", "multi"]))


# --- 4. Validation at construction, naming the layer and the option ------------------------------


def test_tebn_signature_lists_its_options():
    parameters = inspect.signature(brainnorm.TemporalEffectiveBatchNorm).parameters
    assert inspect.Parameter.VAR_KEYWORD not in [p.kind for p in parameters.values()]
    assert {"epsilon", "momentum", "step_mode", "unit", "name", "param_dtype"} <= set(parameters)
    assert "alpha" not in parameters and "v_th" not in parameters


@pytest.mark.parametrize("keyword", ["alpha", "v_th", "epsilom"])
def test_tebn_unknown_keywords_name_tebn(keyword):
    with pytest.raises(TypeError, match=named("TemporalEffectiveBatchNorm", keyword)):
        brainnorm.TemporalEffectiveBatchNorm(C, T, **{keyword: 1.0})


@pytest.mark.parametrize(
    "kwargs, option, error",
    [
        (dict(epsilon=-1.0), "epsilon", ValueError),
        (dict(momentum=1.5), "momentum", ValueError),
        (dict(use_scale="yes"), "use_scale", TypeError),
        (dict(use_bias=1), "use_bias", TypeError),
        (dict(scale_init="ones"), "scale_init", TypeError),
        (dict(bias_init="zeros"), "bias_init", TypeError),
        (dict(track_running_stats="no"), "track_running_stats", TypeError),
        (dict(unbiased_running_var=None), "unbiased_running_var", TypeError),
        (dict(use_running_average="False"), "use_running_average", TypeError),
        (dict(axis_name=1.5), "axis_name", TypeError),
        (dict(axis_index_groups=[[0]]), "axis_index_groups", ValueError),
        (dict(use_fast_variance="no"), "use_fast_variance", TypeError),
        (dict(step_mode="both"), "step_mode", ValueError),
        (dict(dtype="foo"), "dtype", TypeError),
        (dict(param_dtype=jnp.int32), "param_dtype", TypeError),
        (dict(param_type=dict), "param_type", TypeError),
        (dict(mean_type=brainstate.ParamState), "mean_type", TypeError),
        (dict(unit="mV"), "unit", TypeError),
        (dict(name=5), "name", TypeError),
        (dict(feature_axis=3), "feature_axis", ValueError),
    ],
)
def test_tebn_forwarded_options_are_validated_with_the_tebn_name(kwargs, option, error):
    with pytest.raises(error, match=named("TemporalEffectiveBatchNorm", option)):
        brainnorm.TemporalEffectiveBatchNorm((4, C), T, **kwargs)


# every public class of these files -> factory(**kwargs)
CLASSES = {
    "BatchNorm0d": lambda **kw: brainnorm.BatchNorm0d(C, **kw),
    "BatchNorm1d": lambda **kw: brainnorm.BatchNorm1d((4, C), **kw),
    "BatchNorm2d": lambda **kw: brainnorm.BatchNorm2d((2, 2, C), **kw),
    "BatchNorm3d": lambda **kw: brainnorm.BatchNorm3d((2, 2, 2, C), **kw),
    "BatchRenorm": lambda **kw: brainnorm.BatchRenorm((4, C), **kw),
    "BatchNormThroughTime": lambda **kw: brainnorm.BatchNormThroughTime((4, C), T, **kw),
    "ThresholdDependentBatchNorm": lambda **kw: brainnorm.ThresholdDependentBatchNorm((4, C), **kw),
    "TemporalEffectiveBatchNorm": lambda **kw: brainnorm.TemporalEffectiveBatchNorm((4, C), T, **kw),
    "TemporalAccumulatedBatchNorm": lambda **kw: brainnorm.TemporalAccumulatedBatchNorm((4, C), T, **kw),
    "LocalResponseNorm": lambda **kw: brainnorm.LocalResponseNorm((4, C), 3, **kw),
    "NeuNorm": lambda **kw: brainnorm.NeuNorm((4, C), **kw),
}
RUNNING = [n for n in CLASSES if n not in ("LocalResponseNorm", "NeuNorm")]


@pytest.mark.parametrize("name", CLASSES)
def test_name_must_be_a_string(name):
    with pytest.raises(TypeError, match=named(name, "name", "int 5")):
        CLASSES[name](name=5)
    assert CLASSES[name](name="norm").name == "norm"


@pytest.mark.parametrize("name", ["BatchNorm0d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchRenorm"])
def test_affine_must_be_a_bool(name):
    with pytest.raises(TypeError, match=named(name, "affine", "'False'")):
        CLASSES[name](affine="False")
    assert CLASSES[name](affine=False).weight is None


@pytest.mark.parametrize("name", RUNNING)
def test_options_unused_without_running_statistics_are_still_checked(name):
    with pytest.raises(TypeError, match=named(name, "mean_type")):
        CLASSES[name](track_running_stats=False, mean_type=int)
    with pytest.raises(TypeError, match=named(name, "unit")):
        CLASSES[name](track_running_stats=False, unit="mV")


@pytest.mark.parametrize("name", RUNNING)
def test_initializers_unused_without_the_parameter_are_still_checked(name):
    with pytest.raises(TypeError, match=named(name, "scale_init")):
        CLASSES[name](use_scale=False, scale_init="ones")
    with pytest.raises(TypeError, match=named(name, "bias_init")):
        CLASSES[name](use_bias=False, bias_init="zeros")


@pytest.mark.parametrize(
    "kwargs, option, error",
    [
        (dict(shared_across_channels="yes"), "shared_across_channels", TypeError),
        (dict(param_dtype=jnp.int32), "param_dtype", TypeError),
        (dict(param_dtype="foo"), "param_dtype", TypeError),
        (dict(w_init="uniform"), "w_init", TypeError),
        (dict(w_init=jnp.ones(5)), "w_init", ValueError),
        (dict(k=1.5), "k", ValueError),
        (dict(feature_axis=2), "feature_axis", ValueError),
        (dict(param_type=brainstate.ShortTermState), "param_type", TypeError),
        (dict(unit="mV"), "unit", TypeError),
    ],
)
def test_neunorm_options_are_checked(kwargs, option, error):
    with pytest.raises(error, match=named("NeuNorm", option)):
        brainnorm.NeuNorm((4, C), **kwargs)


def test_tab_p_init_is_checked():
    with pytest.raises(TypeError, match=named("TemporalAccumulatedBatchNorm", "p_init")):
        brainnorm.TemporalAccumulatedBatchNorm(C, T, p_init="ones")


@pytest.mark.parametrize("name", CLASSES)
def test_valid_defaults_still_build(name):
    layer = CLASSES[name]()
    assert isinstance(layer, brainstate.nn.Module)
