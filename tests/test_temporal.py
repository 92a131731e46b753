"""Temporal layers (BNTT, tdBN, TEBN) against float64 references of their formulas.

Tolerance: 1e-5 absolute on float32 outputs and running statistics.
"""

import brainstate
import jax.numpy as jnp
import numpy as np
import pytest

import brainnorm
from tests import reference as R

ATOL = 1e-5
T, B, L, C = 5, 6, 3, 4


@pytest.fixture
def xs(rng):
    return (2.0 + rng.standard_normal((T, B, L, C))).astype(np.float32)


def _train(layer, *args, **kwargs):
    with brainstate.environ.context(fit=True):
        return np.asarray(layer(*args, **kwargs))


def test_bntt_per_step_statistics_and_scale(xs, rng):
    layer = brainnorm.BatchNormThroughTime((L, C), num_steps=T, step_mode="multi", momentum=0.9)
    gamma = rng.uniform(0.5, 1.5, (T, 1, C)).astype(np.float32)
    layer.weight.value = {"scale": jnp.asarray(gamma)}
    y = _train(layer, xs)
    expected = R.normalize(xs, (1, 2), eps=1e-5) * gamma[:, None]
    np.testing.assert_allclose(y, expected, atol=ATOL)
    mean, var, _ = R.moments(xs, (1, 2))
    np.testing.assert_allclose(layer.running_mean.value, 0.1 * mean[:, 0], atol=ATOL)
    np.testing.assert_allclose(layer.running_var.value, 0.9 + 0.1 * var[:, 0], atol=ATOL)


@pytest.mark.parametrize("momentum", [0.9, None])
@pytest.mark.parametrize("steps", [T, T + 2])  # T + 2: steps past num_steps reuse the last slot
def test_bntt_multi_step_equals_single_step(rng, momentum, steps):
    xs = (1.0 + rng.standard_normal((steps, B, L, C))).astype(np.float32)
    multi = brainnorm.BatchNormThroughTime((L, C), num_steps=T, step_mode="multi", momentum=momentum)
    single = brainnorm.BatchNormThroughTime((L, C), num_steps=T, momentum=momentum)
    for _ in range(2):
        y_multi = _train(multi, xs)
        y_single = np.stack([_train(single, xs[t], t=t) for t in range(steps)])
    np.testing.assert_allclose(y_multi, y_single, atol=ATOL)
    np.testing.assert_allclose(multi.running_mean.value, single.running_mean.value, atol=ATOL)
    np.testing.assert_allclose(multi.running_var.value, single.running_var.value, atol=ATOL)
    np.testing.assert_array_equal(multi.num_batches_tracked.value, single.num_batches_tracked.value)


def test_bntt_single_step_in_jitted_for_loop_with_environ_index(xs):
    looped = brainnorm.BatchNormThroughTime((L, C), num_steps=T)
    python = brainnorm.BatchNormThroughTime((L, C), num_steps=T)

    def step(i, x):
        with brainstate.environ.context(i=i, fit=True):
            return looped(x)

    run = brainstate.transform.jit(lambda xs: brainstate.transform.for_loop(step, jnp.arange(T), xs))
    y_loop = np.asarray(run(jnp.asarray(xs)))
    y_python = np.stack([_train(python, xs[t], t=t) for t in range(T)])
    np.testing.assert_allclose(y_loop, y_python, atol=ATOL)
    np.testing.assert_allclose(looped.running_mean.value, python.running_mean.value, atol=ATOL)
    np.testing.assert_allclose(looped.running_var.value, python.running_var.value, atol=ATOL)


def test_bntt_eval_uses_per_step_running_statistics(xs):
    layer = brainnorm.BatchNormThroughTime((L, C), num_steps=T, step_mode="multi", momentum=0.5)
    _train(layer, xs)
    mean = np.asarray(layer.running_mean.value)[:, None]  # (T, 1, 1, C)
    var = np.asarray(layer.running_var.value)[:, None]
    before = [np.asarray(s.value) for s in layer.states().values()]
    y = np.asarray(layer(xs, use_running_average=True))
    np.testing.assert_allclose(y, (xs - mean) / np.sqrt(var + 1e-5), atol=ATOL)
    for b, s in zip(before, layer.states().values()):
        np.testing.assert_array_equal(b, np.asarray(s.value))


@pytest.mark.parametrize("alpha, v_th", [(1.0, 1.0), (0.5 ** 0.5, 0.3)])
def test_tdbn_multi_step_statistics_over_time_and_batch(xs, rng, alpha, v_th):
    layer = brainnorm.ThresholdDependentBatchNorm((L, C), alpha=alpha, v_th=v_th, step_mode="multi")
    gamma = rng.uniform(0.5, 1.5, (1, C)).astype(np.float32)
    beta = rng.uniform(-0.5, 0.5, (1, C)).astype(np.float32)
    layer.weight.value = {"scale": jnp.asarray(gamma), "bias": jnp.asarray(beta)}
    y = _train(layer, xs)
    expected = alpha * v_th * gamma * R.normalize(xs, (0, 1, 2), eps=1e-5) + beta
    np.testing.assert_allclose(y, expected, atol=ATOL)


def test_tdbn_single_step_statistics_over_batch_of_the_step(xs):
    layer = brainnorm.ThresholdDependentBatchNorm((L, C), v_th=0.5)
    y = _train(layer, xs[2])
    np.testing.assert_allclose(y, 0.5 * R.normalize(xs[2], (0, 1), eps=1e-5), atol=ATOL)


def test_tebn_per_step_weight(xs):
    layer = brainnorm.TemporalEffectiveBatchNorm((L, C), num_steps=T, step_mode="multi")
    p = np.linspace(0.5, 1.5, T).astype(np.float32)
    layer.p.value = jnp.asarray(p)
    y = _train(layer, xs)
    np.testing.assert_allclose(y, p[:, None, None, None] * R.normalize(xs, (0, 1, 2), eps=1e-5), atol=ATOL)
    assert isinstance(layer.p, brainstate.ParamState) and layer.p.value.shape == (T,)


def test_tebn_single_step_uses_p_of_the_step_and_last_past_the_end(xs):
    layer = brainnorm.TemporalEffectiveBatchNorm((L, C), num_steps=T)
    layer.p.value = jnp.arange(1.0, T + 1.0)
    for t, expected_p in ((1, 2.0), (T + 3, float(T))):
        y = _train(layer, xs[0], t=t)
        np.testing.assert_allclose(y, expected_p * R.normalize(xs[0], (0, 1), eps=1e-5), atol=ATOL)


def test_temporal_masks_leave_padding_out(xs, rng):
    mask = rng.random((T, B, 1, 1)) > 0.3
    layer = brainnorm.BatchNormThroughTime((L, C), num_steps=T, step_mode="multi")
    garbage = np.where(mask, xs, 1e6).astype(np.float32)
    y = _train(layer, garbage, mask)
    expected = R.normalize(garbage, (1, 2), mask=mask, eps=1e-5)
    valid = np.broadcast_to(mask, xs.shape)
    np.testing.assert_allclose(y[valid], expected[valid], atol=ATOL)
