"""Folding normalizations away for deployment: ``fold_batch_norm`` and ``fold_threshold``.

``fold_batch_norm(layer, norm)`` must equal ``norm(layer(x))`` with ``norm`` in
evaluation mode within 1e-5 relative (max abs difference over max abs value);
``fold_threshold`` must give identical spikes on 10^5 random membrane
potentials, for positive, negative and zero scales, with units.
"""

import brainstate
import brainunit as u
import jax.numpy as jnp
import numpy as np
import pytest

import brainnorm
from brainnorm import TemporalAccumulatedBatchNorm, fold_batch_norm, fold_threshold

RTOL = 1e-5
SCALES = np.array([1.3, -0.7, 0.0, 0.4], np.float32)  # positive, negative and zero
BIASES = np.array([0.2, -0.5, 1.5, 0.0], np.float32)


def _cases():
    linear = lambda **kw: brainstate.nn.Linear(5, 4, **kw)  # noqa: E731
    return {
        "linear-bn0d": (lambda: linear(), lambda: brainnorm.BatchNorm0d(4), (16, 5)),
        "linear-seq-bn1d": (lambda: brainstate.nn.Linear((3, 5), (3, 4)), lambda: brainnorm.BatchNorm1d((3, 4)),
                            (8, 3, 5)),
        "conv1d-bn1d": (lambda: brainstate.nn.Conv1d((7, 3), 4, 3), lambda: brainnorm.BatchNorm1d((7, 4)), (8, 7, 3)),
        "conv2d-bn2d": (lambda: brainstate.nn.Conv2d((5, 5, 3), 4, 3, padding="VALID"),
                        lambda: brainnorm.BatchNorm2d((3, 3, 4)), (8, 5, 5, 3)),
        "conv2d-channels-first": (lambda: brainstate.nn.Conv2d((3, 5, 5), 4, 3, channel_first=True),
                                  lambda: brainnorm.BatchNorm2d((4, 5, 5), 0), (8, 3, 5, 5)),
        "conv3d-bn3d": (lambda: brainstate.nn.Conv3d((4, 4, 4, 2), 4, 2, stride=2),
                        lambda: brainnorm.BatchNorm3d((2, 2, 2, 4)), (6, 4, 4, 4, 2)),
        "linear-batchrenorm": (lambda: linear(b_init=None), lambda: brainnorm.BatchRenorm(4, warmup_steps=0),
                               (16, 5)),
        "conv2d-batchrenorm": (lambda: brainstate.nn.Conv2d((5, 5, 3), 4, 3, padding="VALID"),
                               lambda: brainnorm.BatchRenorm((3, 3, 4), r_max=1.5), (8, 5, 5, 3)),
        "linear-tdbn": (lambda: linear(), lambda: brainnorm.ThresholdDependentBatchNorm(4, alpha=0.7, v_th=0.5),
                        (16, 5)),
        "conv2d-tdbn": (lambda: brainstate.nn.Conv2d((5, 5, 3), 4, 3),
                        lambda: brainnorm.ThresholdDependentBatchNorm((5, 5, 4), v_th=0.3), (8, 5, 5, 3)),
    }


def _trained(norm, z):
    """``norm`` with the statistics of ``z`` (scaled, offset) as running statistics, and scales of every sign."""
    offset = 3.0 * z.unit if isinstance(z, u.Quantity) else 3.0
    norm.momentum = 0.0  # one training call sets the running statistics to the batch's
    with brainstate.environ.context(fit=True):
        norm(z * 2.0 + offset)
    shape = norm.weight.value["scale"].shape
    norm.weight.value = {"scale": jnp.asarray(SCALES).reshape(shape), "bias": jnp.asarray(BIASES).reshape(shape)}
    return norm


@pytest.mark.parametrize("case", list(_cases()))
def test_fold_batch_norm_equals_norm_of_layer_in_eval(case):
    make_layer, make_norm, x_shape = _cases()[case]
    brainstate.random.seed(1)
    layer = make_layer()
    x = brainstate.random.normal(size=x_shape)
    norm = _trained(make_norm(), layer(x))
    had_bias = "bias" in layer.weight.value
    folded = fold_batch_norm(layer, norm)
    expected = np.asarray(norm(layer(x), use_running_average=True))
    y = np.asarray(folded(x))
    assert type(folded) is type(layer) and y.shape == expected.shape
    assert np.abs(y - expected).max() <= RTOL * np.abs(expected).max()
    assert "bias" in folded.weight.value  # a layer without bias gains one
    assert ("bias" in layer.weight.value) == had_bias  # the original is unchanged


def test_fold_batch_norm_with_units():
    brainstate.random.seed(2)
    layer = brainstate.nn.Linear(5, 4)
    x = brainstate.random.normal(size=(32, 5)) * u.mV
    norm = _trained(brainnorm.BatchNorm0d(4), layer(x))
    assert norm.running_mean.value.unit == u.mV
    folded = fold_batch_norm(layer, norm)
    expected = np.asarray(norm(layer(x), use_running_average=True))
    y = folded(x)
    assert not isinstance(y, u.Quantity)  # dimensionless, as the normalized output
    assert np.abs(np.asarray(y) - expected).max() <= RTOL * np.abs(expected).max()


def test_fold_batch_norm_errors():
    layer = brainstate.nn.Linear(5, 4)
    with pytest.raises(ValueError, match="fold_batch_norm: norm must normalize the 4 output channels"):
        fold_batch_norm(layer, brainnorm.BatchNorm0d(3))
    with pytest.raises(ValueError, match="in_size"):
        fold_batch_norm(brainstate.nn.Conv1d((7, 3), 4, 3), brainnorm.BatchNorm1d((6, 4)))
    with pytest.raises(ValueError, match="track_running_stats"):
        fold_batch_norm(layer, brainnorm.BatchNorm0d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="per-step"):
        fold_batch_norm(layer, brainnorm.BatchNormThroughTime(4, num_steps=3))
    with pytest.raises(ValueError, match="per-step"):
        fold_batch_norm(layer, TemporalAccumulatedBatchNorm(4, num_steps=3))
    with pytest.raises(ValueError, match="per-step weights p"):
        fold_batch_norm(layer, brainnorm.TemporalEffectiveBatchNorm(4, num_steps=3))
    with pytest.raises(TypeError, match="fold_batch_norm: layer must be"):
        fold_batch_norm(brainnorm.LayerNorm(4), brainnorm.BatchNorm0d(4))
    with pytest.raises(TypeError, match="fold_batch_norm: norm must be a BatchNorm-family layer"):
        fold_batch_norm(layer, brainnorm.LayerNorm(4))


@pytest.mark.parametrize("kind", ["bn0d", "tdbn"])
def test_fold_threshold_gives_identical_spikes_with_units(kind, rng):
    v_th = 0.5
    if kind == "bn0d":
        norm = brainnorm.BatchNorm0d(4)
    else:
        norm = brainnorm.ThresholdDependentBatchNorm(4, alpha=0.8, v_th=1.2)
    potentials = (-65.0 + 5.0 * rng.standard_normal((64, 4))).astype(np.float32) * u.mV
    _trained(norm, potentials)
    threshold, sign = fold_threshold(norm, v_th)
    assert threshold.unit == u.mV and threshold.shape == (4,)
    np.testing.assert_array_equal(sign, [1.0, -1.0, 1.0, 1.0])
    # the zero-scale channel: beta = 1.5 >= v_th, so it always fires
    assert np.isneginf(u.get_mantissa(threshold)[2])
    u_test = (-65.0 + 30.0 * rng.standard_normal((100_000, 4))).astype(np.float32) * u.mV
    normalized = norm(u_test, use_running_average=True)
    spikes = np.asarray(normalized - v_th >= 0)
    folded = np.asarray(sign * u.get_mantissa((u_test - threshold).to(u.mV)) >= 0)
    np.testing.assert_array_equal(folded, spikes)
    assert 0 < spikes[:, [0, 1, 3]].mean() < 1  # both sides of the threshold were drawn
    # a potential given in volts gives the same spikes
    folded_v = np.asarray(sign * u.get_mantissa((u_test.to(u.volt) - threshold).to(u.mV)) >= 0)
    np.testing.assert_array_equal(folded_v, spikes)


def test_fold_threshold_zero_scale_below_threshold_never_fires():
    norm = brainnorm.BatchNorm0d(2)
    norm.weight.value = {"scale": jnp.zeros(2), "bias": jnp.array([0.2, 0.9])}
    threshold, sign = fold_threshold(norm, jnp.array([0.5, 0.5]))
    np.testing.assert_array_equal(np.asarray(threshold), [np.inf, -np.inf])
    np.testing.assert_array_equal(sign, [1.0, 1.0])
    with pytest.raises(ValueError, match="v_th must broadcast"):
        fold_threshold(norm, jnp.ones(3))
