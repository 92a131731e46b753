"""Layers under brainstate transforms: jit, grad, vmap (axis_name), for_loop/scan, checkpoint.

SPEC §3 "Transforms and loops": outputs, running statistics and gradients
under each transform agree with float64 NumPy references (tests/reference.py,
tests/reference_training.py: the gradient reference is the closed-form VJP
of normalization), and with the untransformed computation.

Tolerance: outputs and running statistics 2e-5 absolute (+1e-5 relative);
gradients 1e-4 absolute (+1e-4 relative), float32 with O(1) data.
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
from . import reference_training as reft

ATOL = 2e-5
RTOL = 1e-5
GATOL = 1e-4
GRTOL = 1e-4


def close(actual, expected, atol=ATOL, rtol=RTOL):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


def gclose(actual, expected):
    close(actual, expected, GATOL, GRTOL)


def gclose_param(actual, expected, shape):
    """A parameter gradient: parameter shape (in_size with 1 at non-feature axes), then values."""
    assert np.shape(actual) == shape, (np.shape(actual), shape)
    gclose(np.reshape(actual, np.shape(expected)), expected)


def data(rng, shape, offset=1.0):
    return (offset + rng.standard_normal(shape)).astype(np.float32)


def affine(channels):
    return np.linspace(0.5, 1.5, channels).astype(np.float32), np.linspace(-0.3, 0.4, channels).astype(np.float32)


def bn_trajectory(xs, axes, momentum, masks=None, unbiased=False):
    """Reference running mean/var after each step (flat channel vectors)."""
    masks = [None] * len(xs) if masks is None else masks
    channels = np.asarray(xs[0]).shape[-1]
    mean, var = np.zeros(channels), np.ones(channels)
    out = []
    for x, m in zip(xs, masks):
        mean, var = ref.running_update(mean, var, x, axes, momentum, mask=m, unbiased=unbiased)
        out.append((mean, var))
    return out


# --- jit ---------------------------------------------------------------------------------------


def _layers_and_references():
    s3, b3 = affine(3)
    s6, b6 = affine(6)
    return {
        "LayerNorm": (lambda: brainnorm.LayerNorm((5, 3), scale_init=s3, bias_init=b3), (2, 5, 3),
                      lambda x, m: ref.normalize(x, (-1,), m, 1e-6, s3, b3)),
        "LayerNorm_2axes": (lambda: brainnorm.LayerNorm((5, 3), reduction_axes=(0, 1)), (2, 5, 3),
                            lambda x, m: ref.normalize(x, (1, 2), m, 1e-6)),
        "RMSNorm": (lambda: brainnorm.RMSNorm((5, 3), scale_init=s3), (2, 5, 3),
                    lambda x, m: ref.normalize(x, (-1,), m, 1e-6, s3, use_mean=False)),
        "GroupNorm": (lambda: brainnorm.GroupNorm((5, 6), num_groups=2, scale_init=s6, bias_init=b6), (2, 5, 6),
                      lambda x, m: ref.group_normalize(x, 2, -1, (1, 2), m, 1e-6, s6, b6)),
        "InstanceNorm": (lambda: brainnorm.InstanceNorm((5, 3), scale_init=s3, bias_init=b3), (2, 5, 3),
                         lambda x, m: ref.normalize(x, (1,), m, 1e-5, s3, b3)),
        "BatchNorm1d": (lambda: brainnorm.BatchNorm1d((5, 3), scale_initializer=s3, bias_initializer=b3),
                        (2, 5, 3), lambda x, m: ref.normalize(x, (0, 1), m, 1e-5, s3, b3)),
        "LocalResponseNorm": (lambda: brainnorm.LocalResponseNorm((5, 3), 2, alpha=0.5), (2, 5, 3),
                              lambda x, m: ref.local_response_norm(x, 2, alpha=0.5)),
    }


JIT_CASES = _layers_and_references()


@pytest.mark.parametrize("key", JIT_CASES)
def test_jit_matches_reference_and_eager(rng, key):
    factory, shape, expected = JIT_CASES[key]
    x = data(rng, shape)
    mask = rng.random(shape) < 0.7 if key != "LocalResponseNorm" else None
    eager_layer, jit_layer = factory(), factory()
    call = (lambda v: jit_layer(v)) if mask is None else (lambda v, m: jit_layer(v, m))
    jitted = brainstate.transform.jit(call)
    args = (x,) if mask is None else (x, mask)
    y_jit = jitted(*args)
    close(y_jit, expected(x, mask))
    close(y_jit, eager_layer(*args), atol=1e-6, rtol=1e-6)


def test_jit_batchnorm_updates_running_stats(rng):
    C = 3
    scale, bias = affine(C)
    bn = brainnorm.BatchNorm1d((5, C), momentum=0.9, scale_initializer=scale, bias_initializer=bias)
    train = brainstate.transform.jit(lambda v, m: bn(v, m))
    evaluate = brainstate.transform.jit(lambda v: bn(v, use_running_average=True))
    xs = [data(rng, (4, 5, C), 1.0 + 0.5 * t) for t in range(4)]
    masks = [rng.random((4, 5, 1)) < 0.7 for _ in xs]
    expected = bn_trajectory(xs, (0, 1), 0.9, masks)
    for t, (x, m) in enumerate(zip(xs, masks)):
        y = train(x, m)
        close(y, ref.normalize(x, (0, 1), m, 1e-5, scale, bias))
        close(np.ravel(bn.running_mean.value), expected[t][0])
        close(np.ravel(bn.running_var.value), expected[t][1])
        assert int(bn.num_batches_tracked.value) == t + 1
    x_eval = data(rng, (3, 5, C), 2.0)
    before = [np.array(v) for v in (bn.running_mean.value, bn.running_var.value, bn.num_batches_tracked.value)]
    y = evaluate(x_eval)
    close(y, reft.apply_stats(x_eval, expected[-1][0], expected[-1][1], 1e-5, scale, bias))
    after = [np.array(v) for v in (bn.running_mean.value, bn.running_var.value, bn.num_batches_tracked.value)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_jit_instancenorm_tracking(rng):
    layer = brainnorm.InstanceNorm((6, 2), track_running_stats=True, momentum=0.8, unbiased_running_var=True)
    step = brainstate.transform.jit(lambda v: layer(v))
    mean, var = np.zeros(2), np.ones(2)
    for t in range(3):
        x = data(rng, (3, 6, 2), t)
        mean, var = reft.instance_running_update(mean, var, x, (1,), (0,), 0.8, unbiased=True)
        close(step(x), ref.normalize(x, (1,), None, 1e-5))
    close(np.ravel(layer.running_mean.value), mean)
    close(np.ravel(layer.running_var.value), var)
    assert int(layer.num_batches_tracked.value) == 3


# --- grad --------------------------------------------------------------------------------------


def test_grad_signature_used_here():
    import inspect

    params = inspect.signature(brainstate.transform.grad).parameters
    assert "grad_states" in params and "argnums" in params


def grads_of(layer, x, weights, mask=None, **call_kwargs):
    """(parameter grads dict, input grad) of sum(weights * layer(x))."""

    def loss(v):
        y = layer(v, **call_kwargs) if mask is None else layer(v, mask, **call_kwargs)
        return jnp.sum(y * weights)

    param_states = layer.states(brainstate.ParamState)
    g_params, g_x = brainstate.transform.grad(loss, grad_states=param_states, argnums=0)(jnp.asarray(x))
    return g_params, g_x


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_grad_layernorm(rng, masked):
    C = 4
    scale, bias = affine(C)
    layer = brainnorm.LayerNorm((3, C), scale_init=scale, bias_init=bias)
    x = data(rng, (2, 3, C))
    w = rng.standard_normal(x.shape).astype(np.float32)
    mask = None
    if masked:
        mask = rng.random((2, 3, 1)) < 0.6
        mask[0, 1] = False  # a fully padded row: no valid element
    g_params, g_x = grads_of(layer, x, w, mask)
    dx, g_xhat = reft.normalize_vjp(x, w, (-1,), 1e-6, scale, mask)
    gclose(g_x, dx)
    gclose_param(g_params[("weight",)]["scale"], g_xhat.sum(axis=(0, 1)), (1, C))
    gclose_param(g_params[("weight",)]["bias"], w.sum(axis=(0, 1)), (1, C))
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree_util.tree_leaves((g_params, g_x)))
    # same input gradient from jax.grad of the functional API
    g_fun = jax.grad(lambda v: jnp.sum(F.layer_norm(v, scale, bias, mask=mask) * w))(jnp.asarray(x))
    gclose(g_fun, dx)


def test_grad_rmsnorm(rng):
    C = 5
    scale, _ = affine(C)
    layer = brainnorm.RMSNorm(C, scale_init=scale)
    x = data(rng, (3, C), 0.5)
    w = rng.standard_normal(x.shape).astype(np.float32)
    g_params, g_x = grads_of(layer, x, w)
    x64 = x.astype(np.float64)
    r = 1 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6)
    h = w * scale
    dx = r * h - x64 * r**3 / C * (h * x64).sum(-1, keepdims=True)
    gclose(g_x, dx)
    gclose(g_params[("scale",)]["scale"], (w * x64 * r).sum(0))


def test_grad_groupnorm(rng):
    B, T, G, S = 2, 3, 2, 3
    scale, bias = affine(G * S)
    layer = brainnorm.GroupNorm((T, G * S), num_groups=G, scale_init=scale, bias_init=bias)
    x = data(rng, (B, T, G * S))
    w = rng.standard_normal(x.shape).astype(np.float32)
    g_params, g_x = grads_of(layer, x, w)
    dx, g_xhat = reft.normalize_vjp(x.reshape(B, T, G, S), w.reshape(B, T, G, S), (1, 3), 1e-6,
                                    scale.reshape(G, S))
    gclose(g_x, dx.reshape(x.shape))
    gclose_param(g_params[("weight",)]["scale"], g_xhat.reshape(x.shape).sum(axis=(0, 1)), (1, G * S))


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_grad_batchnorm_training(rng, masked):
    C = 3
    scale, bias = affine(C)
    bn = brainnorm.BatchNorm1d((4, C), momentum=0.9, scale_initializer=scale, bias_initializer=bias)
    x = data(rng, (3, 4, C))
    w = rng.standard_normal(x.shape).astype(np.float32)
    mask = None
    if masked:
        mask = rng.random(x.shape) < 0.7
        mask[..., 2] = False  # channel without valid entry
    g_params, g_x = grads_of(bn, x, w, mask)
    dx, g_xhat = reft.normalize_vjp(x, w, (0, 1), 1e-5, scale, mask)
    gclose(g_x, dx)
    gclose_param(g_params[("weight",)]["scale"], g_xhat.sum(axis=(0, 1)), (1, C))
    gclose_param(g_params[("weight",)]["bias"], w.sum(axis=(0, 1)), (1, C))
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree_util.tree_leaves((g_params, g_x)))
    # gradients go to the parameters only, and the training step under grad is written once
    assert set(g_params) == {("weight",)}
    mean, var = ref.running_update(np.zeros(C), np.ones(C), x, (0, 1), 0.9, mask=mask)
    close(np.ravel(bn.running_mean.value), mean)
    close(np.ravel(bn.running_var.value), var)
    assert int(bn.num_batches_tracked.value) == 1


def test_grad_batchnorm_eval(rng):
    C = 3
    scale, bias = affine(C)
    bn = brainnorm.BatchNorm0d(C, scale_initializer=scale, bias_initializer=bias)
    bn.running_mean.value = jnp.asarray([0.5, -1.0, 2.0], jnp.float32)
    bn.running_var.value = jnp.asarray([0.25, 4.0, 1.5], jnp.float32)
    x = data(rng, (5, C))
    w = rng.standard_normal(x.shape).astype(np.float32)
    g_params, g_x = grads_of(bn, x, w, use_running_average=True)
    inv = 1 / np.sqrt(np.array([0.25, 4.0, 1.5]) + 1e-5)
    gclose(g_x, w * scale * inv)
    gclose_param(g_params[("weight",)]["scale"], (w * (x - np.array([0.5, -1.0, 2.0])) * inv).sum(0), (C,))
    assert int(bn.num_batches_tracked.value) == 0


def test_grad_instancenorm(rng):
    C = 2
    scale, bias = affine(C)
    layer = brainnorm.InstanceNorm((5, C), scale_init=scale, bias_init=bias, track_running_stats=True)
    x = data(rng, (3, 5, C))
    w = rng.standard_normal(x.shape).astype(np.float32)
    g_params, g_x = grads_of(layer, x, w)
    dx, g_xhat = reft.normalize_vjp(x, w, (1,), 1e-5, scale)
    gclose(g_x, dx)
    gclose_param(g_params[("weight",)]["scale"], g_xhat.sum(axis=(0, 1)), (1, C))
    assert int(layer.num_batches_tracked.value) == 1


# --- vmap with axis_name -----------------------------------------------------------------------


def vmapped(layer, with_mask):
    if with_mask:
        return brainstate.transform.vmap(lambda v, m: layer(v, m), axis_name="batch")
    return brainstate.transform.vmap(lambda v: layer(v), axis_name="batch")


@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_vmap_batchnorm0d_equals_batched_call(rng, masked, unbiased):
    B, C = 6, 3
    scale, bias = affine(C)
    kwargs = dict(momentum=0.9, unbiased_running_var=unbiased, scale_initializer=scale, bias_initializer=bias)
    bn_v = brainnorm.BatchNorm0d(C, axis_name="batch", **kwargs)
    bn_b = brainnorm.BatchNorm0d(C, **kwargs)
    f = vmapped(bn_v, masked)
    xs = [data(rng, (B, C), 1.0 + t) for t in range(3)]
    masks = None
    if masked:
        masks = [rng.random((B, C)) < 0.6 for _ in xs]
        masks[1][:, 0] = False  # channel without valid entry at step 2
        masks[2][:, 1] = False
        masks[2][0, 1] = True   # a single valid entry: n / (n - 1) must not blow up
    expected = bn_trajectory(xs, (0,), 0.9, masks, unbiased)
    with brainstate.environ.context(fit=True):
        for t, x in enumerate(xs):
            m = None if masks is None else masks[t]
            y_v = f(x) if m is None else f(x, m)
            y_b = bn_b(x) if m is None else bn_b(x, m)
            close(y_v, ref.normalize(x, (0,), m, 1e-5, scale, bias))
            close(y_v, y_b, atol=1e-5, rtol=1e-5)
            close(bn_v.running_mean.value, expected[t][0])
            close(bn_v.running_var.value, expected[t][1])
            close(bn_v.running_mean.value, bn_b.running_mean.value, atol=1e-6, rtol=1e-6)
            close(bn_v.running_var.value, bn_b.running_var.value, atol=1e-6, rtol=1e-6)
            assert int(bn_v.num_batches_tracked.value) == t + 1


def test_vmap_batchnorm1d_padding_mask(rng):
    """(B, T, C) sequences vmapped over B, each sample with its (T, 1) padding mask."""
    B, T, C = 4, 5, 3
    bn = brainnorm.BatchNorm1d((T, C), momentum=0.8, axis_name="batch", unbiased_running_var=True)
    f = vmapped(bn, True)
    x = data(rng, (B, T, C))
    lengths = np.array([5, 2, 0, 3])
    mask = (np.arange(T)[None, :] < lengths[:, None])[..., None]
    y = f(x, mask)
    close(y, ref.normalize(x, (0, 1), mask, 1e-5))
    mean, var = ref.running_update(np.zeros(C), np.ones(C), x, (0, 1), 0.8, mask=mask, unbiased=True)
    close(np.ravel(bn.running_mean.value), mean)
    close(np.ravel(bn.running_var.value), var)


def test_vmap_batchnorm_eval_uses_running_stats(rng):
    C = 3
    bn = brainnorm.BatchNorm0d(C, axis_name="batch", momentum=0.5)
    x = data(rng, (6, C))
    vmapped(bn, False)(x)
    mean, var = ref.running_update(np.zeros(C), np.ones(C), x, (0,), 0.5)
    x2 = data(rng, (4, C), 3.0)
    with brainstate.environ.context(fit=False):
        y = vmapped(bn, False)(x2)
    close(y, reft.apply_stats(x2, mean, var, 1e-5))
    assert int(bn.num_batches_tracked.value) == 1


def test_jit_of_vmap_batchnorm(rng):
    B, C = 6, 3
    bn = brainnorm.BatchNorm0d(C, axis_name="batch", momentum=0.9)
    f = brainstate.transform.jit(vmapped(bn, True))
    xs = [data(rng, (B, C), t) for t in range(3)]
    masks = [rng.random((B, C)) < 0.7 for _ in xs]
    expected = bn_trajectory(xs, (0,), 0.9, masks)
    for t, (x, m) in enumerate(zip(xs, masks)):
        close(f(x, m), ref.normalize(x, (0,), m, 1e-5))
    close(bn.running_mean.value, expected[-1][0])
    close(bn.running_var.value, expected[-1][1])
    assert int(bn.num_batches_tracked.value) == 3


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_vmap_layernorm_axis_name(rng, masked):
    """Statistics over the named batch axis and the reduction axes together."""
    B, C = 5, 4
    layer = brainnorm.LayerNorm(C, axis_name="batch")
    x = data(rng, (B, C))
    mask = rng.random((B, C)) < 0.6 if masked else None
    y = vmapped(layer, masked)(*((x,) if mask is None else (x, mask)))
    close(y, ref.normalize(x, (0, 1), mask, 1e-6))


def test_vmap_instancenorm_running_stats_over_named_batch(rng):
    B, L, C = 4, 5, 2
    layer = brainnorm.InstanceNorm((L, C), track_running_stats=True, momentum=0.7, axis_name="batch")
    x = data(rng, (B, L, C))
    mask = (np.arange(L)[None, :] < np.array([5, 3, 0, 4])[:, None])[..., None]
    y = vmapped(layer, True)(x, mask)
    close(y, ref.normalize(x, (1,), mask, 1e-5))
    mean, var = reft.instance_running_update(np.zeros(C), np.ones(C), x, (1,), (0,), 0.7, mask)
    close(np.ravel(layer.running_mean.value), mean)
    close(np.ravel(layer.running_var.value), var)


# --- for_loop and scan -------------------------------------------------------------------------


def _model(C):
    scale, bias = affine(C)
    ln = brainnorm.LayerNorm(C, scale_init=scale[::-1].copy())
    bn = brainnorm.BatchNorm0d(C, momentum=0.9, bias_initializer=bias)
    return ln, bn, scale[::-1].copy(), bias


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
def test_for_loop_layernorm_batchnorm(rng, masked):
    T, B, C = 6, 4, 3
    xs = np.stack([data(rng, (B, C), 0.5 * t) for t in range(T)])
    ms = rng.random((T, B, C)) < 0.7 if masked else None
    if masked:
        ms[2, :, 1] = False

    ln_l, bn_l, ln_scale, bn_bias = _model(C)
    if masked:
        ys = brainstate.transform.for_loop(lambda x, m: bn_l(ln_l(x, m), m), xs, ms)
    else:
        ys = brainstate.transform.for_loop(lambda x: bn_l(ln_l(x)), xs)

    ln_p, bn_p, _, _ = _model(C)
    python = []
    for t in range(T):
        m = None if ms is None else ms[t]
        python.append(np.asarray(bn_p(ln_p(xs[t], m), m)))

    mean, var = np.zeros(C), np.ones(C)
    for t in range(T):
        m = None if ms is None else ms[t]
        h = ref.normalize(xs[t], (-1,), m, 1e-6, ln_scale)
        mean, var = ref.running_update(mean, var, h, (0,), 0.9, mask=m)
        close(ys[t], ref.normalize(h, (0,), m, 1e-5, None, bn_bias), atol=1e-4, rtol=1e-4)
    close(ys, np.stack(python), atol=1e-5, rtol=1e-5)
    close(bn_l.running_mean.value, mean, atol=1e-4, rtol=1e-4)
    close(bn_l.running_var.value, var, atol=1e-4, rtol=1e-4)
    close(bn_l.running_mean.value, bn_p.running_mean.value, atol=1e-6, rtol=1e-6)
    close(bn_l.running_var.value, bn_p.running_var.value, atol=1e-6, rtol=1e-6)
    assert int(bn_l.num_batches_tracked.value) == T


def test_scan_batchnorm_with_carry(rng):
    T, B, C = 5, 4, 2
    bn = brainnorm.BatchNorm0d(C, momentum=None)
    xs = np.stack([data(rng, (B, C), t) for t in range(T)])

    def step(carry, x):
        y = bn(x)
        return carry + jnp.sum(y**2), y

    total, ys = brainstate.transform.scan(step, jnp.zeros(()), xs)
    expected = np.stack([ref.normalize(x, (0,), None, 1e-5) for x in xs])
    close(ys, expected)
    close(total, (expected**2).sum(), atol=1e-3, rtol=1e-5)
    # cumulative average over the T steps
    close(bn.running_mean.value, xs.astype(np.float64).mean(axis=1).mean(axis=0))
    assert int(bn.num_batches_tracked.value) == T


def test_for_loop_bntt_single_step_with_traced_index(rng):
    """BNTT single-step inside for_loop, time index from the loop: per-step statistics."""
    T, B, C = 4, 5, 2
    layer = brainnorm.BatchNormThroughTime(C, num_steps=T, momentum=0.5)
    xs = np.stack([data(rng, (B, C), t) for t in range(T)])
    ys = brainstate.transform.for_loop(lambda t, x: layer(x, t=t), np.arange(T), xs)
    for t in range(T):
        close(ys[t], ref.normalize(xs[t], (0,), None, 1e-5))
        mean, var = ref.running_update(np.zeros(C), np.ones(C), xs[t], (0,), 0.5)
        close(np.asarray(layer.running_mean.value)[t], mean)
        close(np.asarray(layer.running_var.value)[t], var)
    np.testing.assert_array_equal(np.asarray(layer.num_batches_tracked.value), np.ones(T))


# --- checkpoint / remat ------------------------------------------------------------------------


@pytest.mark.parametrize("transform", ["checkpoint", "remat"])
def test_checkpoint_batchnorm_forward_and_grad(rng, transform):
    C = 3
    scale, bias = affine(C)
    bn = brainnorm.BatchNorm1d((4, C), momentum=0.9, scale_initializer=scale, bias_initializer=bias)
    ckpt = getattr(brainstate.transform, transform)
    x = data(rng, (2, 4, C))
    w = rng.standard_normal(x.shape).astype(np.float32)
    mask = rng.random((2, 4, 1)) < 0.7
    f = ckpt(lambda v, m: bn(v, m))

    def loss(v):
        return jnp.sum(f(v, mask) * w)

    g_params, g_x = brainstate.transform.grad(loss, grad_states=bn.states(brainstate.ParamState), argnums=0)(
        jnp.asarray(x))
    dx, g_xhat = reft.normalize_vjp(x, w, (0, 1), 1e-5, scale, mask)
    gclose(g_x, dx)
    gclose_param(g_params[("weight",)]["scale"], g_xhat.sum(axis=(0, 1)), (1, C))
    mean, var = ref.running_update(np.zeros(C), np.ones(C), x, (0, 1), 0.9, mask=mask)
    close(np.ravel(bn.running_mean.value), mean)
    close(np.ravel(bn.running_var.value), var)
    assert int(bn.num_batches_tracked.value) == 1
    # forward only
    y = f(x, mask)
    close(y, ref.normalize(x, (0, 1), mask, 1e-5, scale, bias))
    assert int(bn.num_batches_tracked.value) == 2


def test_checkpoint_layernorm_grad(rng):
    layer = brainnorm.LayerNorm((3, 4), reduction_axes=(0, 1), feature_axes=(0, 1))
    x = data(rng, (2, 3, 4))
    w = rng.standard_normal(x.shape).astype(np.float32)
    f = brainstate.transform.checkpoint(lambda v: layer(v))
    g_params, g_x = brainstate.transform.grad(lambda v: jnp.sum(f(v) * w),
                                              grad_states=layer.states(brainstate.ParamState), argnums=0)(
        jnp.asarray(x))
    dx, g_xhat = reft.normalize_vjp(x, w, (1, 2), 1e-6)
    gclose(g_x, dx)
    gclose_param(g_params[("weight",)]["scale"], g_xhat.sum(0), (3, 4))


def test_jax_checkpoint_functional_grad(rng):
    x = data(rng, (3, 5))
    w = rng.standard_normal(x.shape).astype(np.float32)
    mask = rng.random(x.shape) < 0.7
    g = jax.grad(lambda v: jnp.sum(jax.checkpoint(lambda u: F.layer_norm(u, mask=mask))(v) * w))(jnp.asarray(x))
    gclose(g, reft.normalize_vjp(x, w, (-1,), 1e-6, None, mask)[0])
