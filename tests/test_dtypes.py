"""Dtype contract (SPEC section 3, Dtypes and Statistics) against the float64 references.

* bfloat16 / float16 inputs give bfloat16 / float16 outputs whose only error is
  the final rounding (the statistics are float32): compared with the reference
  computed from the same half-precision values upcast, within HALF_TOL.
* float64 inputs (under ``jax.enable_x64``) stay float64, with float64 accuracy.
* integer and bool inputs are promoted to ``brainstate.environ.dftype()``.
* ``dtype=`` sets the output dtype, ``param_dtype=`` the parameter dtype.
* ``epsilon=None`` (LayerNorm, RMSNorm) is ``finfo(float32).eps`` for half and
  single inputs and ``finfo(float64).eps`` for double inputs.
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainnorm
from brainnorm import functional as F

from . import reference as ref

# Relative and absolute tolerance of one rounding to the output dtype (outputs of order 1).
HALF_TOL = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3}
ATOL32 = 1e-5
EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)


def as_f64(a):
    """Exact float64 copy of an array of any floating dtype (bf16 and fp16 included)."""
    return np.asarray(a).astype(np.float64)


def assert_close(actual, expected, tol):
    actual = as_f64(actual)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol)


def jitted(layer, **kwargs):
    return brainstate.transform.jit(lambda x, mask=None: layer(x, mask, **kwargs))


# name -> (layer factory, per-sample shape, reference(x64) with the layer's defaults)
LAYERS = {
    "LayerNorm": (lambda **kw: brainnorm.LayerNorm(64, **kw), (64,), lambda x: ref.normalize(x, -1, None, 1e-6)),
    "RMSNorm": (
        lambda **kw: brainnorm.RMSNorm(64, **kw), (64,), lambda x: ref.normalize(x, -1, None, 1e-6, use_mean=False)
    ),
    "BatchNorm1d": (
        lambda **kw: brainnorm.BatchNorm1d((4, 16), use_running_average=False, **kw),
        (4, 16),
        lambda x: ref.normalize(x, (0, 1), None, 1e-5),
    ),
    "GroupNorm": (
        lambda **kw: brainnorm.GroupNorm((4, 16), num_groups=4, **kw),
        (4, 16),
        lambda x: ref.group_normalize(x, 4, -1, (1, 2), None, 1e-6),
    ),
    "InstanceNorm": (
        lambda **kw: brainnorm.InstanceNorm((8, 8), **kw), (8, 8), lambda x: ref.normalize(x, (1,), None, 1e-5)
    ),
    "LocalResponseNorm": (
        lambda **kw: brainnorm.LocalResponseNorm(64, 5, alpha=0.5, **kw),
        (64,),
        lambda x: ref.local_response_norm(x, 5, 0.5),
    ),
}


# ---------------------------------------------------------------------------
# half precision in, half precision out, float32 statistics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_half_precision_layers(rng, name, dtype):
    factory, sample, reference = LAYERS[name]
    # An offset of 8 makes half-precision statistics visibly wrong (the mean alone
    # would be rounded to 1/32 in bf16) while float32 statistics are exact.
    x = jnp.asarray(8.0 + rng.standard_normal((6,) + sample), dtype)
    layer = factory()
    y = jitted(layer)(x)
    assert y.dtype == dtype
    assert_close(y, reference(as_f64(x)), HALF_TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def test_half_precision_statistics_are_float32(rng, dtype):
    x = jnp.asarray(8.0 + rng.standard_normal((4, 128)), dtype)
    x64 = as_f64(x)
    for fast in (False, True):
        mean, var = F.moments(x, -1, use_fast_variance=fast)
        assert mean.dtype == jnp.float32 and var.dtype == jnp.float32
        r_mean, r_var, _ = ref.moments(x64, -1)
        np.testing.assert_allclose(np.asarray(mean), r_mean, rtol=0, atol=ATOL32)
        np.testing.assert_allclose(np.asarray(var), r_var, rtol=0, atol=1e-4)
    # BatchNorm's running statistics (float32 parameters) come from float32 batch statistics.
    bn = brainnorm.BatchNorm0d(128, momentum=0.0)
    y = jitted(bn, use_running_average=False)(x)
    assert y.dtype == dtype
    assert bn.running_mean.value.dtype == jnp.float32
    r_mean, r_var, _ = ref.moments(x64, 0)
    np.testing.assert_allclose(np.ravel(bn.running_mean.value), r_mean.ravel(), rtol=0, atol=ATOL32)
    np.testing.assert_allclose(np.ravel(bn.running_var.value), r_var.ravel(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def test_half_precision_functional(rng, dtype):
    x = jnp.asarray(8.0 + rng.standard_normal((3, 4, 16)), dtype)
    x64 = as_f64(x)
    tol = HALF_TOL[dtype]
    scale = (1 + 0.5 * rng.standard_normal(16)).astype(np.float32)
    bias = rng.standard_normal(16).astype(np.float32)
    mask = rng.random((3, 4, 1)) < 0.7
    mask[:, 0] = True
    cases = [
        (F.layer_norm(x, scale, bias, reduction_axes=(1, 2), mask=mask),
         ref.normalize(x64, (1, 2), mask, 1e-6, scale, bias)),
        (F.rms_norm(x, scale), ref.normalize(x64, -1, None, 1e-6, scale, use_mean=False)),
        (F.group_norm(x, 4, scale, bias, mask=mask), ref.group_normalize(x64, 4, -1, (1, 2), mask, 1e-6, scale, bias)),
        (F.instance_norm(x, scale, bias), ref.normalize(x64, (1,), None, 1e-5, scale, bias)),
        (F.batch_norm(x, jnp.zeros(16), jnp.ones(16), scale, bias, training=True)[0],
         ref.normalize(x64, (0, 1), None, 1e-5, scale, bias)),
        (F.local_response_norm(x, 3, alpha=0.5), ref.local_response_norm(x64, 3, 0.5)),
    ]
    for y, expected in cases:
        assert y.dtype == dtype
        assert_close(y, expected, tol)


# ---------------------------------------------------------------------------
# float64 stays float64
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LAYERS))
def test_float64_layers_stay_float64(name):
    factory, sample, reference = LAYERS[name]
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        x = jnp.asarray(1e4 + rng.standard_normal((6,) + sample), jnp.float64)
        assert x.dtype == jnp.float64
        y = jitted(factory())(x)
        assert y.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(y), reference(np.asarray(x)), rtol=1e-10, atol=1e-10)


def test_float64_statistics_keep_double_precision():
    """Data that float32 cannot tell apart (1 + 1e-9 * N) is normalized exactly in float64."""
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        x = jnp.asarray(1.0 + 1e-9 * rng.standard_normal((3, 32)), jnp.float64)
        mean, var = F.moments(x, -1)
        assert mean.dtype == jnp.float64 and var.dtype == jnp.float64
        r_mean, r_var, _ = ref.moments(np.asarray(x), -1)
        np.testing.assert_allclose(np.asarray(mean), r_mean, rtol=1e-15)
        np.testing.assert_allclose(np.asarray(var), r_var, rtol=1e-5)
        y = F.layer_norm(x, epsilon=1e-30)
        assert y.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(y), ref.normalize(np.asarray(x), -1, None, 1e-30), atol=1e-5)
        assert float(jnp.std(y)) > 0.9


# ---------------------------------------------------------------------------
# integer and bool inputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["int32", "bool"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_integer_and_bool_inputs_promote_to_default_float(rng, name, kind):
    factory, sample, reference = LAYERS[name]
    shape = (6,) + sample
    if kind == "int32":
        x = jnp.asarray(rng.integers(-5, 6, size=shape), jnp.int32)
    else:
        x = jnp.asarray(rng.random(shape) < 0.5)
    y = jitted(factory())(x)
    assert y.dtype == jnp.dtype(brainstate.environ.dftype())
    assert_close(y, reference(np.asarray(x, np.float64)), ATOL32)


def test_integer_input_functional(rng):
    x = jnp.asarray(rng.integers(0, 10, size=(4, 5, 6)), jnp.int32)
    x64 = np.asarray(x, np.float64)
    default = jnp.dtype(brainstate.environ.dftype())
    mean, var = F.moments(x, (1, 2))
    assert mean.dtype == default
    assert_close(mean, ref.moments(x64, (1, 2))[0], ATOL32)
    for y, expected in [
        (F.layer_norm(x), ref.normalize(x64, -1, None, 1e-6)),
        (F.rms_norm(x), ref.normalize(x64, -1, None, 1e-6, use_mean=False)),
        (F.group_norm(x, 3), ref.group_normalize(x64, 3, -1, (1, 2), None, 1e-6)),
    ]:
        assert y.dtype == default
        assert_close(y, expected, ATOL32)


# ---------------------------------------------------------------------------
# dtype= and param_dtype=
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_dtype_argument_sets_output_dtype(rng, name, out_dtype):
    factory, sample, reference = LAYERS[name]
    x = (3.0 + rng.standard_normal((6,) + sample)).astype(np.float32)
    y = jitted(factory(dtype=out_dtype))(x)
    assert y.dtype == out_dtype
    assert_close(y, reference(x), HALF_TOL[out_dtype])


@pytest.mark.parametrize("name", ["LayerNorm", "GroupNorm", "BatchNorm1d"])
def test_dtype_float32_on_half_input_gives_float32_output(rng, name):
    factory, sample, reference = LAYERS[name]
    x = jnp.asarray(8.0 + rng.standard_normal((6,) + sample), jnp.bfloat16)
    y = jitted(factory(dtype=jnp.float32))(x)
    assert y.dtype == jnp.float32
    assert_close(y, reference(as_f64(x)), 1e-4)


@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm", "BatchNorm1d", "GroupNorm", "InstanceNorm"])
def test_param_dtype_sets_parameter_dtype(rng, name, param_dtype):
    factory, sample, reference = LAYERS[name]
    layer = factory(param_dtype=param_dtype)
    state = layer.scale if name == "RMSNorm" else layer.weight
    for value in state.value.values():
        assert value.dtype == param_dtype
    x = (3.0 + rng.standard_normal((6,) + sample)).astype(np.float32)
    y = jitted(layer)(x)
    assert y.dtype == jnp.float32  # the input's dtype, not the parameters'
    assert_close(y, reference(x), ATOL32)


def test_default_param_dtype_is_environ_default():
    default = jnp.dtype(brainstate.environ.dftype())
    for name in ["LayerNorm", "BatchNorm1d", "GroupNorm", "InstanceNorm"]:
        layer = LAYERS[name][0]()
        assert all(v.dtype == default for v in layer.weight.value.values())
    assert brainnorm.RMSNorm(4).scale.value["scale"].dtype == default


# ---------------------------------------------------------------------------
# epsilon=None follows PyTorch
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("use_mean", [True, False], ids=["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=["fp32", "bf16", "fp16"])
def test_epsilon_none_is_float32_eps_for_single_and_half(rng, use_mean, dtype):
    # Tiny values: the variance (about scale^2) is comparable to finfo(float32).eps.
    scale = 1e-3 if dtype == jnp.float16 else 1e-4
    x = jnp.asarray(scale * rng.standard_normal((4, 32)), dtype)
    x64 = as_f64(x)
    cls = brainnorm.LayerNorm if use_mean else brainnorm.RMSNorm
    y = jitted(cls(32, epsilon=None))(x)
    assert y.dtype == dtype
    expected = ref.normalize(x64, -1, None, EPS32, use_mean=use_mean)
    tol = ATOL32 if dtype == jnp.float32 else HALF_TOL[dtype]
    assert_close(y, expected, tol)
    # The choice of epsilon is visible at this scale.
    for other in (1e-6, EPS64, float(jnp.finfo(dtype).eps)):
        if other != EPS32:
            assert np.max(np.abs(ref.normalize(x64, -1, None, other, use_mean=use_mean) - expected)) > 5 * tol
    fn = F.layer_norm if use_mean else F.rms_norm
    assert_close(fn(x, epsilon=None), expected, tol)


@pytest.mark.parametrize("use_mean", [True, False], ids=["LayerNorm", "RMSNorm"])
def test_epsilon_none_is_float64_eps_for_double(use_mean):
    rng = np.random.default_rng(6)
    with jax.enable_x64(True):
        x = jnp.asarray(1e-4 * rng.standard_normal((4, 32)), jnp.float64)
        cls = brainnorm.LayerNorm if use_mean else brainnorm.RMSNorm
        y = jitted(cls(32, epsilon=None))(x)
        assert y.dtype == jnp.float64
        expected = ref.normalize(np.asarray(x), -1, None, EPS64, use_mean=use_mean)
        np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-10, atol=1e-10)
        wrong = ref.normalize(np.asarray(x), -1, None, EPS32, use_mean=use_mean)
        assert np.max(np.abs(wrong - expected)) > 1e-3
