"""Physical units (brainunit) through every layer and function.

Tolerance: 1e-5 absolute (float32).
"""

import brainstate
import brainunit as u
import numpy as np
import pytest

import brainnorm
from brainnorm import functional as F
from tests import reference as R

ATOL = 1e-5
SHAPE = (8, 3, 4)  # (B, L, C)


@pytest.fixture
def volts(rng):
    return (-65.0 + 5.0 * rng.standard_normal(SHAPE)).astype(np.float32)  # in mV


# name -> (factory, reduction axes of the reference on (B, L, C) input, has running statistics)
LAYERS = {
    "BatchNorm1d": (lambda: brainnorm.BatchNorm1d((3, 4)), (0, 1), True),
    "LayerNorm": (lambda: brainnorm.LayerNorm((3, 4), reduction_axes=(0, 1)), (1, 2), False),
    "GroupNorm": (lambda: brainnorm.GroupNorm((3, 4), num_groups=2), None, False),
    "InstanceNorm": (lambda: brainnorm.InstanceNorm((3, 4), track_running_stats=True), (1,), True),
    "BatchNormThroughTime": (lambda: brainnorm.BatchNormThroughTime((3, 4), num_steps=8, step_mode="multi"),
                             (1,), True),
    "ThresholdDependentBatchNorm": (lambda: brainnorm.ThresholdDependentBatchNorm((3, 4), step_mode="multi"),
                                    (0, 1), True),
}
EPS = {"BatchNorm1d": 1e-5, "InstanceNorm": 1e-5, "BatchNormThroughTime": 1e-5,
       "ThresholdDependentBatchNorm": 1e-5}


def _reference(name, x):
    axes = LAYERS[name][1]
    eps = EPS.get(name, 1e-6)
    if name == "GroupNorm":
        return R.group_normalize(x, 2, -1, (1, 2), eps=eps)
    return R.normalize(x, axes, eps=eps)


def _train(layer, x):
    with brainstate.environ.context(fit=True):
        return layer(x)


@pytest.mark.parametrize("name", list(LAYERS))
def test_quantity_input_normalizes_to_plain_array(name, volts):
    y = _train(LAYERS[name][0](), volts * u.mV)
    assert not isinstance(y, u.Quantity)
    np.testing.assert_allclose(np.asarray(y), _reference(name, volts), atol=ATOL)


@pytest.mark.parametrize("name", [n for n, spec in LAYERS.items() if spec[2]])
def test_running_statistics_keep_the_unit_and_volts_equal_millivolts(name, volts):
    layer = LAYERS[name][0]()
    y_mv = _train(layer, volts * u.mV)
    assert layer.running_mean.value.unit == u.mV
    assert layer.running_var.value.unit == u.mV ** 2
    twin = LAYERS[name][0]()
    _train(twin, volts * u.mV)
    y_v = _train(twin, (volts / 1000.0) * u.volt)  # same data in volts, second step on both
    y_mv2 = _train(layer, volts * u.mV)
    np.testing.assert_allclose(np.asarray(y_v), np.asarray(y_mv2), atol=ATOL)
    np.testing.assert_allclose(u.get_mantissa(twin.running_mean.value), u.get_mantissa(layer.running_mean.value),
                               atol=1e-4)
    assert np.asarray(y_mv).shape == volts.shape


@pytest.mark.parametrize("name", [n for n, spec in LAYERS.items() if spec[2]])
@pytest.mark.parametrize("bad", ["nA", "plain"])
def test_incompatible_or_missing_unit_raises_and_writes_nothing(name, bad, volts):
    layer = LAYERS[name][0]()
    _train(layer, volts * u.mV)
    before = {k: np.asarray(u.get_mantissa(s.value)) for k, s in layer.states().items()}
    x = volts * u.nA if bad == "nA" else volts
    with pytest.raises(u.UnitMismatchError, match=type(layer).__name__):
        _train(layer, x)
    for k, s in layer.states().items():
        np.testing.assert_array_equal(before[k], np.asarray(u.get_mantissa(s.value)))


@pytest.mark.parametrize("name", ["LayerNorm", "GroupNorm", "BatchNorm1d"])
def test_scale_with_units_gives_output_with_units(name, volts):
    layer = LAYERS[name][0]()
    scale = layer.weight.value["scale"]
    layer.weight.value = {"scale": scale * 2.0 * u.mV, "bias": layer.weight.value["bias"] * u.mV}
    y = _train(layer, volts * u.mV)
    assert isinstance(y, u.Quantity) and y.unit == u.mV
    np.testing.assert_allclose(y.mantissa, 2.0 * _reference(name, volts), atol=2 * ATOL)


def test_rmsnorm_and_lrn_accept_quantities(volts):
    y = brainnorm.RMSNorm(4)(volts * u.mV)
    np.testing.assert_allclose(np.asarray(y), R.normalize(volts, (2,), eps=1e-6, use_mean=False), atol=ATOL)
    y = brainnorm.LocalResponseNorm(4, 3)(volts * u.mV)
    assert y.unit == u.mV
    np.testing.assert_allclose(y.mantissa, R.local_response_norm(volts, 3), rtol=1e-5)


def test_functional_moments_carry_units_and_epsilon_quantity(volts):
    mean, var = F.moments(volts * u.mV, axes=(0, 1))
    ref_mean, ref_var, _ = R.moments(volts, (0, 1))
    assert mean.unit == u.mV and var.unit == u.mV ** 2
    np.testing.assert_allclose(mean.mantissa, ref_mean, atol=1e-4)
    np.testing.assert_allclose(var.mantissa, ref_var, rtol=1e-5)
    y = F.layer_norm(volts * u.mV, epsilon=1e-6 * u.volt ** 2)  # = 1 mV^2
    np.testing.assert_allclose(np.asarray(y), R.normalize(volts, (2,), eps=1.0), atol=ATOL)


def test_unit_under_jit_needs_construction_unit(volts):
    layer = brainnorm.BatchNorm1d((3, 4))
    with pytest.raises(u.UnitMismatchError, match="unit="):
        brainstate.transform.jit(lambda x: _train(layer, x))(volts * u.mV)
    layer = brainnorm.BatchNorm1d((3, 4), unit=u.mV)
    y = brainstate.transform.jit(lambda x: _train(layer, x))(volts * u.mV)
    np.testing.assert_allclose(np.asarray(y), R.normalize(volts, (0, 1), eps=1e-5), atol=ATOL)
    assert layer.running_mean.value.unit == u.mV
