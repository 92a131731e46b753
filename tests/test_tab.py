"""TemporalAccumulatedBatchNorm (TAB) against a float64 restatement of the authors' ``TAB_Layer``.

The authors' layer (repository HaiyanJiang/SNN-TAB, ``models.py``) keeps one
PyTorch ``BatchNorm`` per step ``t`` and applies it to the steps ``0..t`` of
the input, keeping step ``t`` of its output, then multiplies by ``p_t ** 2``.
:class:`TabReference` restates that in float64 NumPy (PyTorch semantics:
biased variance for the normalization, unbiased for the running variance,
``running = (1 - m) * running + m * batch``), with masks leaving elements out
of the statistics. brainnorm runs with ``momentum = 1 - m`` and
``unbiased_running_var=True``.

Tolerance: 1e-5 absolute on float32 outputs and running statistics of order 1.
"""

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brainnorm import TemporalAccumulatedBatchNorm
from brainnorm.functional import temporal_accumulated_batch_norm

ATOL = 1e-5
T, B, L, C = 4, 6, 3, 2
TORCH_MOMENTUM = 0.1


class TabReference:
    """``TAB_Layer`` in float64, channels last: one BatchNorm per step over the steps so far."""

    def __init__(self, num_steps, channels, *, gamma, beta, p, momentum=TORCH_MOMENTUM, eps=1e-5):
        self.running_mean = np.zeros((num_steps, channels))
        self.running_var = np.ones((num_steps, channels))
        self.gamma, self.beta, self.p = (np.asarray(a, np.float64) for a in (gamma, beta, p))
        self.momentum, self.eps = momentum, eps

    def __call__(self, x, *, training, mask=None):
        x = np.asarray(x, np.float64)
        valid = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape)
        axes = tuple(range(x.ndim - 1))
        outputs = []
        for t in range(x.shape[0]):
            if training:
                window, window_valid = x[: t + 1], valid[: t + 1]
                n = window_valid.sum(axis=axes)
                mean = np.where(window_valid, window, 0).sum(axis=axes) / n
                var = np.where(window_valid, (window - mean) ** 2, 0).sum(axis=axes) / n
                m = self.momentum
                self.running_mean[t] = (1 - m) * self.running_mean[t] + m * mean
                self.running_var[t] = (1 - m) * self.running_var[t] + m * var * n / (n - 1)
            else:
                mean, var = self.running_mean[t], self.running_var[t]
            x_hat = (x[t] - mean) / np.sqrt(var + self.eps)
            outputs.append(self.p[t] ** 2 * (self.gamma[t] * x_hat + self.beta[t]))
        return np.stack(outputs)


def _parameters(rng, steps=T, channels=C):
    gamma = rng.uniform(0.5, 1.5, (steps, channels)).astype(np.float32)
    beta = rng.uniform(-0.5, 0.5, (steps, channels)).astype(np.float32)
    p = rng.uniform(0.6, 1.4, (steps,)).astype(np.float32)
    return gamma, beta, p


def _layer(gamma, beta, p, in_size=(L, C), feature_axis=-1, **kwargs):
    kwargs = {"momentum": 1 - TORCH_MOMENTUM, "unbiased_running_var": True, **kwargs}
    layer = TemporalAccumulatedBatchNorm(in_size, gamma.shape[0], feature_axis, **kwargs)
    shape = layer.weight.value["scale"].shape
    layer.weight.value = {"scale": jnp.asarray(gamma).reshape(shape), "bias": jnp.asarray(beta).reshape(shape)}
    layer.p.value = jnp.asarray(p)
    return layer


def _flat(stats):
    return np.asarray(stats).reshape(stats.shape[0], -1)


@pytest.fixture
def xs(rng):
    # a drift over time, so that accumulated and per-step statistics differ
    drift = np.linspace(0.0, 3.0, T)[:, None, None, None]
    return (1.0 + drift + rng.standard_normal((T, B, L, C)) * (1 + drift)).astype(np.float32)


def test_multi_step_equals_the_authors_layer_in_training_and_eval(xs, rng):
    gamma, beta, p = _parameters(rng)
    reference = TabReference(T, C, gamma=gamma, beta=beta, p=p)
    layer = _layer(gamma, beta, p, step_mode="multi")
    for call in range(3):  # running statistics over several training calls
        batch = xs + call
        with brainstate.environ.context(fit=True):
            y = np.asarray(layer(batch))
        np.testing.assert_allclose(y, reference(batch, training=True), atol=ATOL)
        np.testing.assert_allclose(_flat(layer.running_mean.value), reference.running_mean, atol=ATOL)
        np.testing.assert_allclose(_flat(layer.running_var.value), reference.running_var, atol=ATOL)
    y_eval = np.asarray(layer(xs, use_running_average=True))
    np.testing.assert_allclose(y_eval, reference(xs, training=False), atol=ATOL)
    np.testing.assert_array_equal(layer.num_batches_tracked.value, [3] * T)


def test_channels_first_feature_axis(xs, rng):
    gamma, beta, p = _parameters(rng)
    reference = TabReference(T, C, gamma=gamma, beta=beta, p=p)
    layer = _layer(gamma, beta, p, in_size=(C, L), feature_axis=0, step_mode="multi")
    channels_first = np.moveaxis(xs, -1, 2)  # (T, B, C, L)
    with brainstate.environ.context(fit=True):
        y = np.asarray(layer(channels_first))
    np.testing.assert_allclose(np.moveaxis(y, 2, -1), reference(xs, training=True), atol=ATOL)
    np.testing.assert_allclose(_flat(layer.running_var.value), reference.running_var, atol=ATOL)


@pytest.mark.parametrize("momentum", [0.9, None])
@pytest.mark.parametrize("steps", [T, T + 2])  # T + 2: steps past num_steps use the last slot, in order
def test_single_step_equals_multi_step(rng, momentum, steps):
    xs = (2.0 + rng.standard_normal((steps, B, L, C))).astype(np.float32)
    gamma, beta, p = _parameters(rng)
    options = dict(momentum=momentum, unbiased_running_var=False)
    multi = _layer(gamma, beta, p, step_mode="multi", **options)
    single = _layer(gamma, beta, p, **options)
    for call in range(2):
        with brainstate.environ.context(fit=True):
            y_multi = np.asarray(multi(xs + call))
            y_single = np.stack([np.asarray(single(xs[t] + call, t=t)) for t in range(steps)])
        np.testing.assert_allclose(y_single, y_multi, atol=ATOL)
    for name in ("running_mean", "running_var"):
        np.testing.assert_allclose(getattr(single, name).value, getattr(multi, name).value, atol=ATOL)
    np.testing.assert_array_equal(single.num_batches_tracked.value, multi.num_batches_tracked.value)
    y_multi = np.asarray(multi(xs, use_running_average=True))
    y_single = np.stack([np.asarray(single(xs[t], t=t, use_running_average=True)) for t in range(steps)])
    np.testing.assert_allclose(y_single, y_multi, atol=ATOL)


def test_single_step_in_jitted_for_loop_with_environ_index(xs, rng):
    gamma, beta, p = _parameters(rng)
    reference = TabReference(T, C, gamma=gamma, beta=beta, p=p)
    looped = _layer(gamma, beta, p)

    def step(i, x):
        with brainstate.environ.context(i=i, fit=True):
            return looped(x)

    run = brainstate.transform.jit(lambda xs: brainstate.transform.for_loop(step, jnp.arange(T), xs))
    for call in range(2):  # the second sequence starts anew at t == 0
        y = np.asarray(run(jnp.asarray(xs + call)))
        np.testing.assert_allclose(y, reference(xs + call, training=True), atol=ATOL)
    np.testing.assert_allclose(_flat(looped.running_var.value), reference.running_var, atol=ATOL)


def test_masks_multi_and_single_step(xs, rng):
    gamma, beta, p = _parameters(rng)
    mask = rng.random((T, B, L, 1)) > 0.3
    garbage = np.where(mask, xs, 1e6).astype(np.float32)  # padding must not enter any statistic
    reference = TabReference(T, C, gamma=gamma, beta=beta, p=p)
    expected = reference(xs, training=True, mask=mask)
    multi = _layer(gamma, beta, p, step_mode="multi")
    single = _layer(gamma, beta, p)
    with brainstate.environ.context(fit=True):
        y_multi = np.asarray(multi(garbage, mask))
        y_single = np.stack([np.asarray(single(garbage[t], mask[t], t=t)) for t in range(T)])
    valid = np.broadcast_to(mask, xs.shape)
    for y in (y_multi, y_single):
        np.testing.assert_allclose(y[valid], expected[valid], atol=ATOL)
        assert np.all(np.isfinite(y))
    for layer in (multi, single):
        np.testing.assert_allclose(_flat(layer.running_mean.value), reference.running_mean, atol=ATOL)
        # the unbiased correction counts every valid element of steps 0..t
        np.testing.assert_allclose(_flat(layer.running_var.value), reference.running_var, atol=ATOL)


def test_channel_without_valid_elements_keeps_running_statistics_and_gives_bias(xs, rng):
    gamma, beta, p = _parameters(rng)
    layer = _layer(gamma, beta, p, step_mode="multi")
    mask = np.ones((T, B, L, C), bool)
    mask[..., 1] = False
    with brainstate.environ.context(fit=True):
        y = np.asarray(layer(xs, mask))
    np.testing.assert_allclose(y[..., 1], np.broadcast_to((p**2 * beta[:, 1])[:, None, None], y[..., 1].shape),
                               atol=ATOL)
    np.testing.assert_array_equal(np.asarray(layer.running_mean.value)[..., 1], 0.0)
    np.testing.assert_array_equal(np.asarray(layer.running_var.value)[..., 1], 1.0)


def test_large_offset_is_accurate(rng):
    xs = (1e4 + rng.standard_normal((T, B, C))).astype(np.float32)
    y, _, _ = temporal_accumulated_batch_norm(xs, training=True)
    x64 = xs.astype(np.float64)
    expected = np.stack([(x64[t] - x64[: t + 1].mean((0, 1))) / np.sqrt(x64[: t + 1].var((0, 1)) + 1e-5)
                         for t in range(T)])
    np.testing.assert_allclose(np.asarray(y), expected, atol=1e-4)


def test_units_running_statistics_in_mv_and_inputs_in_v(xs):
    layer = TemporalAccumulatedBatchNorm((L, C), T, step_mode="multi")
    plain = TemporalAccumulatedBatchNorm((L, C), T, step_mode="multi")
    with brainstate.environ.context(fit=True):
        y_mv = layer(xs * u.mV)
        y_plain = plain(xs)
    np.testing.assert_allclose(np.asarray(y_mv), np.asarray(y_plain), atol=ATOL)
    assert layer.running_mean.value.unit == u.mV and layer.running_var.value.unit == u.mV**2
    with brainstate.environ.context(fit=True):
        y_v = layer(xs * 1e-3 * u.volt)
        plain(xs)
    np.testing.assert_allclose(np.asarray(y_v), np.asarray(plain(xs, use_running_average=False)), atol=1e-4)
    before = [np.asarray(u.get_mantissa(s.value)) for s in layer.states().values() if not isinstance(s.value, dict)]
    with pytest.raises(u.UnitMismatchError):
        layer(xs * u.nA)
    after = [np.asarray(u.get_mantissa(s.value)) for s in layer.states().values() if not isinstance(s.value, dict)]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(b, a)


# -- transformations ----------------------------------------------------------------


def test_jit_grad_vmap_jvp_and_eval_shape_of_the_function(xs, rng):
    gamma, beta, p = _parameters(rng)
    scale = jnp.asarray(gamma)[:, None, None]
    bias = jnp.asarray(beta)[:, None, None]

    def loss(x, scale, p):
        y = temporal_accumulated_batch_norm(x, None, None, scale, bias, p, training=True)[0]
        return jnp.sum(jnp.sin(y))

    x = jnp.asarray(xs)
    value = loss(x, scale, jnp.asarray(p))
    np.testing.assert_allclose(jax.jit(loss)(x, scale, jnp.asarray(p)), value, rtol=1e-5)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, jnp.asarray(p))
    assert all(np.all(np.isfinite(g)) for g in grads) and float(jnp.abs(grads[2]).max()) > 0
    # forward mode agrees with reverse mode
    tangent = jnp.asarray(rng.standard_normal(xs.shape).astype(np.float32))
    _, forward = jax.jit(lambda v, dv: jax.jvp(lambda w: loss(w, scale, jnp.asarray(p)), (v,), (dv,)))(x, tangent)
    np.testing.assert_allclose(forward, jnp.vdot(grads[0], tangent), rtol=1e-4)
    # a later step depends on the earlier ones (causal accumulation), never the other way round
    step_grad = jax.jit(jax.grad(lambda v: jnp.sum(temporal_accumulated_batch_norm(v, training=True)[0][1] ** 3)))(x)
    assert float(jnp.abs(step_grad[0]).max()) > 0 and float(jnp.abs(step_grad[2:]).max()) == 0
    # vmap over an extra leading axis equals a Python loop
    stacked = jnp.stack([x, x * 2 + 1])
    function = jax.jit(lambda v: temporal_accumulated_batch_norm(v, training=True)[0])
    batched = jax.jit(jax.vmap(function))(stacked)
    for i in range(2):
        np.testing.assert_allclose(batched[i], function(stacked[i]), atol=ATOL)
    shape = jax.eval_shape(lambda v: temporal_accumulated_batch_norm(v, jnp.zeros((T, 1, 1, C)),
                                                                     jnp.ones((T, 1, 1, C)), training=True), x)
    assert shape[0].shape == xs.shape and shape[1].shape == (T, 1, 1, C)


def test_layer_under_jit_and_grad_reaches_parameters_and_input(xs, rng):
    gamma, beta, p = _parameters(rng)
    layer = _layer(gamma, beta, p, step_mode="multi")
    eager = _layer(gamma, beta, p, step_mode="multi")
    params = layer.states(brainstate.ParamState)

    @brainstate.transform.jit
    def step(x):
        with brainstate.environ.context(fit=True):
            return brainstate.transform.grad(lambda v: jnp.sum(layer(v) ** 2), grad_states=params,
                                             argnums=0, return_value=True)(x)

    (param_grads, x_grad), value = step(jnp.asarray(xs))
    with brainstate.environ.context(fit=True):
        np.testing.assert_allclose(value, jnp.sum(eager(xs) ** 2), rtol=1e-5)
    np.testing.assert_allclose(layer.running_var.value, eager.running_var.value, atol=ATOL)
    leaves = jax.tree_util.tree_leaves(param_grads)
    assert len(leaves) == 3 and all(np.all(np.isfinite(g)) for g in leaves)
    assert x_grad.shape == xs.shape and np.all(np.isfinite(x_grad))


# -- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, option", [
    (dict(num_steps=0), "num_steps"),
    (dict(num_steps=T, momentum=1.5), "momentum"),
    (dict(num_steps=T, epsilon=-1.0), "epsilon"),
    (dict(num_steps=T, step_mode="both"), "step_mode"),
    (dict(num_steps=T, feature_axis=3), "feature_axis"),
    (dict(num_steps=T, p_init=jnp.ones(T + 1)), "p_init"),
])
def test_bad_options_are_named(kwargs, option):
    with pytest.raises((ValueError, TypeError)) as error:
        TemporalAccumulatedBatchNorm((L, C), **kwargs)
    assert "TemporalAccumulatedBatchNorm" in str(error.value) and option in str(error.value)


def _snapshot(layer):
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(
        [u.get_mantissa(s.value) if not isinstance(s.value, dict) else s.value for s in layer.states().values()])]


@pytest.mark.parametrize("call, error, words", [
    (lambda layer, x: layer(x[:, :, :1], t=1), ValueError, "trailing shape"),
    (lambda layer, x: layer(x, np.ones((B, L, C), np.float32), t=1), TypeError, "mask"),
    (lambda layer, x: layer(x, np.ones((B + 1, 1, 1), bool), t=1), ValueError, "mask"),
    (lambda layer, x: layer(x), ValueError, "time index"),
    (lambda layer, x: layer(x, t=-1), ValueError, "t must be"),
    (lambda layer, x: layer(u.get_mantissa(x), t=1), u.UnitMismatchError, "unit"),  # statistics in mV
    (lambda layer, x: layer(u.get_mantissa(x) * u.nA, t=1), u.UnitMismatchError, "unit"),
])
def test_a_failing_call_writes_nothing(xs, call, error, words):
    layer = TemporalAccumulatedBatchNorm((L, C), T)
    with brainstate.environ.context(fit=True):
        layer(xs[0] * u.mV, t=0)  # a sequence in progress
    before = _snapshot(layer)
    with brainstate.environ.context(fit=True), pytest.raises(error) as raised:
        call(layer, xs[1] * u.mV)
    assert words in str(raised.value)
    for b, a in zip(before, _snapshot(layer)):
        np.testing.assert_array_equal(b, a)


def test_function_errors_name_the_option(xs):
    with pytest.raises(ValueError, match="feature_axes must not include the time axis"):
        temporal_accumulated_batch_norm(xs, training=True, feature_axes=0)
    with pytest.raises(ValueError, match="p must have one entry per time step"):
        temporal_accumulated_batch_norm(xs, p=jnp.ones(T + 1), training=True)
    with pytest.raises(ValueError, match="running_mean must have one entry per statistic"):
        temporal_accumulated_batch_norm(xs, jnp.zeros((C,)), jnp.ones((C,)), training=True)
