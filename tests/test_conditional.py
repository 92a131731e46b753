"""Call-time scale and bias (conditional normalization: AdaLN, FiLM) and ``functional.lp_normalize``.

SPEC §9: ``update(x, mask=None, *, scale=None, bias=None)`` on LayerNorm, RMSNorm (scale only), GroupNorm,
InstanceNorm and the BatchNorm family; call-time values replace the learned parameter of that kind, only for a
layer built without it; equal to haiku's ``LayerNorm(create_scale=False, create_offset=False)(x, scale=...,
offset=...)``. ``lp_normalize`` equals ``torch.nn.functional.normalize``.
"""

from __future__ import annotations

import re

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainnorm
from brainnorm import functional as F

from . import reference as ref

B, T, C = 3, 4, 6
RNG = np.random.default_rng(0)
X = (RNG.standard_normal((B, T, C)) * 2 + 1).astype(np.float32)
SCALE = RNG.uniform(0.5, 2.0, (B, 1, C)).astype(np.float32)  # one (1, C) modulation per sample
BIAS = RNG.uniform(-1.0, 1.0, (B, 1, C)).astype(np.float32)

# name -> (layer without learned affine, float64 normalization of X (before the affine), takes a bias)
LAYERS = {
    "LayerNorm": (lambda: brainnorm.LayerNorm((T, C), use_scale=False, use_bias=False, epsilon=1e-5),
                  lambda x: ref.normalize(x, (2,), None, 1e-5), True),
    "RMSNorm": (lambda: brainnorm.RMSNorm((T, C), use_scale=False, epsilon=1e-5),
                lambda x: ref.normalize(x, (2,), None, 1e-5, use_mean=False), False),
    "GroupNorm": (lambda: brainnorm.GroupNorm((T, C), num_groups=2, use_scale=False, use_bias=False,
                                              epsilon=1e-5),
                  lambda x: ref.group_normalize(x, 2, -1, (1, 2), None, 1e-5), True),
    "InstanceNorm": (lambda: brainnorm.InstanceNorm((T, C), use_scale=False, use_bias=False),
                     lambda x: ref.normalize(x, (1,), None, 1e-5), True),
    "BatchNorm1d": (lambda: brainnorm.BatchNorm1d((T, C), affine=False),
                    lambda x: ref.normalize(x, (0, 1), None, 1e-5), True),
    # first step of a warm-up: batch normalization (the correction is tested in test_batch_renorm.py)
    "BatchRenorm": (lambda: brainnorm.BatchRenorm((T, C), affine=False, warmup_steps=1),
                    lambda x: ref.normalize(x, (0, 1), None, 1e-5), True),
}


@pytest.mark.parametrize("name", LAYERS)
def test_per_sample_scale_and_bias_match_float64(name):
    factory, normalized, has_bias = LAYERS[name]
    layer = factory()
    kwargs = dict(scale=jnp.asarray(SCALE), bias=jnp.asarray(BIAS)) if has_bias else dict(scale=jnp.asarray(SCALE))
    with brainstate.environ.context(fit=True):
        y = brainstate.transform.jit(lambda v: layer(v, **kwargs))(jnp.asarray(X))
    expected = normalized(X.astype(np.float64)) * SCALE + (BIAS if has_bias else 0)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", LAYERS)
def test_call_time_parameter_needs_a_layer_built_without_it(name):
    factory, _, has_bias = LAYERS[name]
    learned = {"RMSNorm": lambda: brainnorm.RMSNorm((T, C)),
               "GroupNorm": lambda: brainnorm.GroupNorm((T, C), num_groups=2),
               "LayerNorm": lambda: brainnorm.LayerNorm((T, C)),
               "InstanceNorm": lambda: brainnorm.InstanceNorm((T, C), use_scale=True, use_bias=True),
               "BatchNorm1d": lambda: brainnorm.BatchNorm1d((T, C)),
               "BatchRenorm": lambda: brainnorm.BatchRenorm((T, C))}[name]()
    with pytest.raises(ValueError, match=f"{name}: scale given at call time needs a layer built with "
                                         f"use_scale=False"):
        learned(jnp.asarray(X), scale=jnp.asarray(SCALE))
    if has_bias:
        with pytest.raises(ValueError, match=f"{name}: bias given at call time needs a layer built with "
                                             f"use_bias=False"):
            learned(jnp.asarray(X), bias=jnp.asarray(BIAS))
    with pytest.raises(ValueError, match=re.escape(f"{name}: scale of shape (2, 1, {C}) does not broadcast to the "
                                                   f"input shape {X.shape}")):
        factory()(jnp.asarray(X), scale=jnp.ones((2, 1, C)))


def test_rms_norm_takes_no_call_time_bias():
    with pytest.raises(TypeError, match="bias"):
        brainnorm.RMSNorm(C, use_scale=False)(jnp.asarray(X), bias=jnp.asarray(BIAS))


def test_equals_haiku_layer_norm_with_call_time_scale_and_offset():
    hk = pytest.importorskip("haiku")

    def forward(x, scale, offset):
        return hk.LayerNorm(axis=-1, create_scale=False, create_offset=False, eps=1e-5)(x, scale=scale,
                                                                                        offset=offset)

    peer = hk.without_apply_rng(hk.transform(forward))
    params = peer.init(None, X, SCALE, BIAS)
    expected = np.asarray(peer.apply(params, X, SCALE, BIAS), np.float64)
    layer = brainnorm.LayerNorm((T, C), use_scale=False, use_bias=False, epsilon=1e-5)
    y = np.asarray(layer(jnp.asarray(X), scale=jnp.asarray(SCALE), bias=jnp.asarray(BIAS)), np.float64)
    deviation = float(np.abs(y - expected).max())
    print(f"haiku LayerNorm: largest deviation {deviation:.2e}")
    assert deviation < 1e-5
    # and both equal the float64 formula
    np.testing.assert_allclose(y, ref.normalize(X.astype(np.float64), (2,), None, 1e-5) * SCALE + BIAS,
                               rtol=1e-5, atol=1e-5)


def test_call_time_units_gradients_and_masks():
    """A scale in Hz gives an output in Hz; gradients reach the call-time scale; padding stays out."""
    layer = brainnorm.LayerNorm((T, C), use_scale=False, use_bias=False, epsilon=1e-5)
    y = layer(jnp.asarray(X) * u.mV, scale=jnp.asarray(SCALE) * u.Hz, bias=jnp.asarray(BIAS) * u.Hz)
    assert isinstance(y, u.Quantity) and y.unit == u.Hz
    expected = ref.normalize(X.astype(np.float64), (2,), None, 1e-5) * SCALE + BIAS
    np.testing.assert_allclose(np.asarray(y.mantissa, np.float64), expected, rtol=1e-5, atol=1e-5)

    def loss(scale):
        return jnp.sum(layer(jnp.asarray(X), scale=scale) ** 2)

    grad = jax.grad(loss)(jnp.asarray(SCALE))
    xhat = ref.normalize(X.astype(np.float64), (2,), None, 1e-5)
    np.testing.assert_allclose(np.asarray(grad), (2 * xhat**2 * SCALE).sum(1, keepdims=True), rtol=1e-4)

    mask = np.ones((B, T, 1), bool)
    mask[:, -1] = False
    padded = np.where(mask, X, np.nan).astype(np.float32)
    y = layer(jnp.asarray(padded), jnp.asarray(mask), scale=jnp.asarray(SCALE), bias=jnp.asarray(BIAS))
    valid = np.broadcast_to(mask, X.shape)
    np.testing.assert_allclose(np.asarray(y)[valid], expected[valid], rtol=1e-5, atol=1e-5)


# --- lp_normalize ------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 0.5, float("inf")])
@pytest.mark.parametrize("axis", [-1, 0, (1, 2)])
def test_lp_normalize_equals_torch(p, axis):
    torch = pytest.importorskip("torch")
    x = RNG.standard_normal((3, 4, 5)).astype(np.float32)
    x[0, 0] = 0.0  # a zero vector along the last axis: the epsilon floor
    y = np.asarray(F.lp_normalize(x, p, axis=axis), np.float64)
    expected = torch.nn.functional.normalize(torch.tensor(x, dtype=torch.float64), p, dim=axis).numpy()
    np.testing.assert_allclose(y, expected, rtol=2e-6, atol=1e-7)
    # the float64 formula too
    norm = np.max(np.abs(x.astype(np.float64)), axis=axis, keepdims=True) if p == float("inf") else \
        np.sum(np.abs(x.astype(np.float64)) ** p, axis=axis, keepdims=True) ** (1 / p)
    np.testing.assert_allclose(y, x / np.maximum(norm, 1e-12), rtol=2e-6, atol=1e-7)


def test_lp_normalize_masks_units_extremes_and_gradients():
    x = RNG.standard_normal((2, 5)).astype(np.float32)
    mask = np.array([[True, True, False, True, False], [False] * 5])
    y = np.asarray(F.lp_normalize(np.where(mask, x, np.nan), mask=mask))
    kept = np.where(mask, x, 0.0).astype(np.float64)
    expected = kept / np.maximum(np.linalg.norm(kept, axis=-1, keepdims=True), 1e-12)
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-7)
    assert np.all(y[~mask] == 0)

    y = F.lp_normalize(jnp.asarray(x) * u.mV, epsilon=1e-12 * u.volt)
    assert not isinstance(y, u.Quantity)
    np.testing.assert_allclose(np.asarray(y), np.asarray(F.lp_normalize(x)), rtol=1e-6)

    for magnitude in (1e-6, 1e20, 1e37):  # no overflow of |x|^2 (norms below epsilon are floored, as in torch)
        np.testing.assert_allclose(np.asarray(F.lp_normalize(x * np.float32(magnitude))),
                                   np.asarray(F.lp_normalize(x)), rtol=1e-5, atol=1e-6)

    for p in (0.5, 1.0, 2.0, 3.0):
        grad = jax.grad(lambda v: jnp.sum(F.lp_normalize(v, p) * jnp.arange(3.0)))(jnp.zeros(3))
        assert np.all(np.isfinite(np.asarray(grad))), (p, grad)
    grad = jax.grad(lambda v: jnp.sum(F.lp_normalize(v, mask=jnp.asarray(mask))))(jnp.asarray(
        np.where(mask, x, np.nan)))
    assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(p=0), ValueError, ["lp_normalize", "p", "positive"]),
    (dict(p=-1.0), ValueError, ["lp_normalize", "p"]),
    (dict(p="2"), TypeError, ["lp_normalize", "p", "'2'"]),
    (dict(epsilon=0.0), ValueError, ["lp_normalize", "epsilon"]),
    (dict(axis=3), ValueError, ["lp_normalize", "axis"]),
    (dict(mask=np.ones((3,), float)), TypeError, ["lp_normalize", "mask"]),
])
def test_lp_normalize_errors(kwargs, error, words):
    with pytest.raises(error, match="(?s)" + ".*".join(re.escape(w) for w in words)):
        F.lp_normalize(np.ones((2, 3), np.float32), **kwargs)
