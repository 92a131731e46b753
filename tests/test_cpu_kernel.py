"""The fused CPU kernel (brainnorm/_cpu): outputs, statistics and gradients against float64.

Every test lowers the kernel for small arrays (``MIN_ELEMENTS = 0``) and
checks that the compiled program really calls it, so a silent fall-back to
the pure-JAX core fails here. The references are the float64 NumPy formulas of
tests/reference*.py; where a quantity has no closed-form reference (running
statistics, gradients of BatchNorm), the pure-JAX core is the comparison, with
the kernel switched off.
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainnorm
from brainnorm import _cpu
from brainnorm import functional as F

from . import reference as ref
from . import reference_training as reft

pytestmark = pytest.mark.skipif(not _cpu.available(), reason="the CPU kernel could not be compiled here")

FWD, BWD = _cpu._TARGET, _cpu._BWD_TARGET


@pytest.fixture(autouse=True)
def kernel_for_small_arrays(monkeypatch):
    monkeypatch.setattr(_cpu, "MIN_ELEMENTS", 0)
    yield
    jax.clear_caches()  # no trace made with the kernel forced on outlives the test


@pytest.fixture
def core_only(monkeypatch):
    """Switch the kernel off (the pure-JAX core runs)."""

    def use_core():
        monkeypatch.setattr(_cpu, "available", lambda: False)
        jax.clear_caches()  # a function jitted before would reuse its kernel trace

    yield use_core
    jax.clear_caches()


def hlo(fn, *args):
    return jax.jit(fn).lower(*args).as_text()


def calls_kernel(jitted, *args, target=FWD):
    """Whether the program of an already jitted function calls the kernel."""
    return target in jitted.lower(*args).as_text()


def max_error(actual, expected):
    return float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))))


def data(rng, shape, offset):
    return (offset + rng.standard_normal(shape)).astype(np.float32)


OFFSETS = [0.5, 1e4]


def test_kernel_is_used_forward_and_backward(rng):
    x = data(rng, (8, 32), 0.0)
    assert FWD in hlo(lambda v: F.layer_norm(v), x)
    assert BWD in hlo(jax.grad(lambda v: jnp.sum(F.layer_norm(v) ** 2)), x)


def test_kernel_threshold_and_exclusions(rng, monkeypatch):
    monkeypatch.setattr(_cpu, "MIN_ELEMENTS", 1 << 16)
    assert FWD not in hlo(lambda v: F.layer_norm(v), data(rng, (8, 32), 0.0))
    assert FWD in hlo(lambda v: F.layer_norm(v), data(rng, (64, 1024), 0.0))
    monkeypatch.setattr(_cpu, "MIN_ELEMENTS", 0)
    x = data(rng, (8, 32), 0.0)
    assert FWD not in hlo(lambda v: F.layer_norm(v, use_fast_variance=True), x)  # one-pass formula asked for
    assert FWD not in hlo(lambda v: F.layer_norm(v.astype(jnp.bfloat16)), x)  # float32 only
    # channels-first BatchNorm reduces (0, 2): not one block of axes
    assert FWD not in hlo(lambda v: F.batch_norm(v, jnp.zeros(4), jnp.ones(4), training=True, feature_axes=1)[0],
                          data(rng, (8, 4, 16), 0.0))


def batchnorm_case(c):
    """Channels-last BatchNorm training over (10, 7, 9, c), one mask value per (n, h)."""
    return (
        lambda x, m, s, b: F.batch_norm(x, jnp.zeros(c), jnp.ones(c), s, b, training=True, mask=m)[0],
        lambda x, m, s, b: ref.normalize(x, (0, 1, 2), m, 1e-5, s, b),
        (10, 7, 9, c), (c,), (10, 7, 1, 1),
    )


def instance_norm_case(n, length, c):
    """InstanceNorm over (n, length, c), one mask value per (n, position)."""
    return (
        lambda x, m, s, b: F.instance_norm(x, s, b, mask=m),
        lambda x, m, s, b: ref.normalize(x, (1,), m, 1e-5, s, b),
        (n, length, c), (c,), (n, length, 1),
    )


# name -> (call(x, mask, scale, bias), reference(x, mask, scale, bias), shape, param shape, mask shape)
CASES = {
    "LayerNorm": (
        lambda x, m, s, b: F.layer_norm(x, s, b, mask=m),
        lambda x, m, s, b: ref.normalize(x, -1, m, 1e-6, s, b),
        (6, 5, 48), (48,), (6, 5, 48),
    ),
    "LayerNorm two axes": (
        lambda x, m, s, b: F.layer_norm(x, s, b, reduction_axes=(-2, -1), mask=m),
        lambda x, m, s, b: ref.normalize(x, (-2, -1), m, 1e-6, s, b),
        (6, 5, 16), (5, 16), (6, 5, 1),
    ),
    "LayerNorm bias only": (
        lambda x, m, s, b: F.layer_norm(x, None, b, mask=m),
        lambda x, m, s, b: ref.normalize(x, -1, m, 1e-6, None, b),
        (6, 48), (48,), (6, 48),
    ),
    "RMSNorm": (
        lambda x, m, s, b: F.rms_norm(x, s, mask=m),
        lambda x, m, s, b: ref.normalize(x, -1, m, 1e-6, s, None, use_mean=False),
        (6, 5, 48), (48,), (6, 5, 48),
    ),
    "BatchNorm channels-last": batchnorm_case(12),
    "InstanceNorm": instance_norm_case(4, 40, 6),
    # channel counts that are multiples of 16 take the register tiles of the
    # unmasked column sums (80 = 64 + 16 over two chunks of rows, 48 in one tile)
    "BatchNorm channels-last, 80 channels": batchnorm_case(80),
    "InstanceNorm, 48 channels": instance_norm_case(3, 70, 48),
}


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("name", list(CASES))
def test_outputs_match_float64(rng, name, offset, masked):
    call, reference, shape, pshape, mshape = CASES[name]
    x = data(rng, shape, offset)
    scale = (1 + 0.3 * rng.standard_normal(pshape)).astype(np.float32)
    bias = rng.standard_normal(pshape).astype(np.float32)
    mask = rng.random(mshape) < 0.7 if masked else None
    fn = lambda v, m: call(v, m, scale, bias)
    assert FWD in hlo(fn, x, mask)
    y = jax.jit(fn)(x, mask)
    expected = reference(x, None if mask is None else np.broadcast_to(mask, shape), scale, bias)
    # float32 output of values up to ~5 in magnitude: a few ulps
    assert max_error(y, expected) < 5e-6


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("offset", OFFSETS)
def test_layernorm_gradients_match_float64(rng, offset, masked):
    x = data(rng, (12, 64), offset)
    w = rng.standard_normal(x.shape).astype(np.float32)
    scale = (1 + 0.3 * rng.standard_normal(64)).astype(np.float32)
    bias = rng.standard_normal(64).astype(np.float32)
    mask = None
    if masked:
        mask = rng.random(x.shape) < 0.7
        mask[3] = False  # a row without valid elements
    loss = lambda v, s, b: jnp.sum(F.layer_norm(v, s, b, mask=mask) * w)
    assert BWD in hlo(jax.grad(loss, argnums=(0, 1, 2)), x, scale, bias)
    dx, ds, db = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)
    r_dx, g_xhat = reft.normalize_vjp(x, w, (-1,), 1e-6, scale, mask)
    assert max_error(dx, r_dx) < 1e-4
    assert max_error(ds, g_xhat.sum(0)) < 1e-4
    assert max_error(db, w.sum(0)) < 1e-4


def test_rmsnorm_gradient_matches_finite_differences_in_float64(rng):
    x = data(rng, (4, 32), 0.5)
    w = rng.standard_normal(x.shape).astype(np.float32)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(F.rms_norm(v) * w)))
    assert calls_kernel(grad, x) and calls_kernel(grad, x, target=BWD)
    dx = grad(x)
    x64 = x.astype(np.float64)

    def f(v):
        return np.sum(v / np.sqrt(np.mean(v * v, -1, keepdims=True) + 1e-6) * w)

    fd = np.zeros_like(x64)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x64)
        e[idx] = 1e-6
        fd[idx] = (f(x64 + e) - f(x64 - e)) / 2e-6
    assert max_error(dx, fd) < 1e-4


# 80 channels take the register tiles of the backward's column sums (64 + 16)
@pytest.mark.parametrize("channels", [12, 80])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("offset", OFFSETS)
def test_batchnorm_gradients_and_running_stats_match_the_core(rng, core_only, offset, masked, channels):
    x = data(rng, (10, 7, 9, channels), offset)
    w = rng.standard_normal(x.shape).astype(np.float32)
    mask = rng.random((10, 7, 1, 1)) < 0.7 if masked else None
    scale = (1 + 0.3 * rng.standard_normal(channels)).astype(np.float32)
    bias = rng.standard_normal(channels).astype(np.float32)
    rm, rv = jnp.full(channels, offset, jnp.float32), jnp.ones(channels, jnp.float32)

    def loss(v, s, b):
        y, new_mean, new_var = F.batch_norm(v, rm, rv, s, b, training=True, momentum=0.9, mask=mask)
        # the statistics' cotangents reach x too
        return jnp.sum(y * w) + jnp.sum(new_mean * 3.0) + jnp.sum(new_var * 0.5), (new_mean, new_var)

    grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
    assert BWD in hlo(grad, x, scale, bias)
    got, stats = jax.jit(grad)(x, scale, bias)
    core_only()
    assert BWD not in hlo(grad, x, scale, bias)
    want, want_stats = jax.jit(grad)(x, scale, bias)
    for a, b in zip(stats, want_stats):
        assert max_error(a, b) < 1e-6 * max(1.0, offset)
    assert max_error(got[0], want[0]) < 1e-4
    assert max_error(got[1], want[1]) < 1e-3
    assert max_error(got[2], want[2]) < 1e-3


def test_layers_use_the_kernel_and_match_the_core(rng, core_only, monkeypatch):
    """LayerNorm, RMSNorm, BatchNorm2d (training, running statistics), InstanceNorm (tracking)."""
    x = data(rng, (6, 8, 8, 16), 3.0)
    layers = {
        "LayerNorm": lambda: brainnorm.LayerNorm(16),
        "RMSNorm": lambda: brainnorm.RMSNorm(16),
        "BatchNorm2d": lambda: brainnorm.BatchNorm2d((8, 8, 16), momentum=0.9),
        "InstanceNorm": lambda: brainnorm.InstanceNorm((8, 8, 16), track_running_stats=True, momentum=0.8),
    }
    traced = []
    fused = _cpu._fused

    def counting(*args):
        traced.append(args[0].shape)
        return fused(*args)

    monkeypatch.setattr(_cpu, "_fused", counting)
    results = {}
    for mode in ("kernel", "core"):
        if mode == "core":
            core_only()
        for name, make in layers.items():
            layer = make()
            count_before = len(traced)
            traces = []
            with brainstate.environ.context(fit=True):
                step = brainstate.transform.jit(lambda v: (traces.append(1), layer(v))[1])
                step(x)
                y = step(x + 1.0)
            assert traces, name  # traced in this mode, not reused from the other
            assert (len(traced) > count_before) == (mode == "kernel"), name
            states = [np.asarray(v.value) for v in layer.states().values() if not isinstance(v, brainstate.ParamState)]
            results[(mode, name)] = [np.asarray(y)] + states
    for name in layers:
        assert len(results[("kernel", name)]) == len(results[("core", name)])
        for a, b in zip(results[("kernel", name)], results[("core", name)]):
            assert max_error(a, b) < 1e-5, name


@pytest.mark.parametrize("per_example_params", [False, True])
def test_vmap_forward_and_gradients(rng, per_example_params):
    xs = data(rng, (3, 5, 40), 2.0)
    ws = rng.standard_normal(xs.shape).astype(np.float32)
    scale = (1 + 0.3 * rng.standard_normal((3, 40) if per_example_params else (40,))).astype(np.float32)
    bias = rng.standard_normal(scale.shape).astype(np.float32)
    in_axes = (0, 0, 0 if per_example_params else None, 0 if per_example_params else None)

    def loss(v, w, s, b):
        return jnp.sum(F.layer_norm(v, s, b) * w)

    forward = jax.jit(jax.vmap(lambda v, w, s, b: F.layer_norm(v, s, b), in_axes=in_axes))
    backward = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 2, 3)), in_axes=in_axes))
    assert calls_kernel(forward, xs, ws, scale, bias) and calls_kernel(backward, xs, ws, scale, bias, target=BWD)
    ys = forward(xs, ws, scale, bias)
    grads = backward(xs, ws, scale, bias)
    for i in range(3):
        s = scale[i] if per_example_params else scale
        b = bias[i] if per_example_params else bias
        assert max_error(ys[i], ref.normalize(xs[i], -1, None, 1e-6, s, b)) < 5e-6
        r_dx, g_xhat = reft.normalize_vjp(xs[i], ws[i], (-1,), 1e-6, s)
        assert max_error(grads[0][i], r_dx) < 1e-4
        assert max_error(grads[1][i], g_xhat.sum(0)) < 1e-4
        assert max_error(grads[2][i], ws[i].sum(0)) < 1e-4
    # gradient of the sum over the batch w.r.t. shared parameters
    if not per_example_params:
        total = lambda s, b: jnp.sum(jax.vmap(lambda v, w: loss(v, w, s, b))(xs, ws))
        ds, db = jax.jit(jax.grad(total, argnums=(0, 1)))(scale, bias)
        r_ds = sum(reft.normalize_vjp(xs[i], ws[i], (-1,), 1e-6, scale)[1].sum(0) for i in range(3))
        assert max_error(ds, r_ds) < 1e-4
        assert max_error(db, ws.sum((0, 1))) < 1e-4


def test_scan_loop_matches_per_step_calls(rng):
    xs = data(rng, (7, 4, 32), 1.0)
    layer = brainnorm.LayerNorm(32)
    assert FWD in hlo(lambda v: brainstate.transform.for_loop(layer, v), xs)
    ys = brainstate.transform.jit(lambda v: brainstate.transform.for_loop(layer, v))(xs)
    for t in range(7):
        assert max_error(ys[t], ref.normalize(xs[t], -1, None, 1e-6)) < 5e-6


@pytest.mark.parametrize("value", [0.0, 1e-30, 1e4, -3e17, 1e4 + 0.1])
def test_constant_groups_give_the_bias_exactly(value):
    x = np.full((4, 64), value, np.float32)
    bias = np.arange(64, dtype=np.float32)
    ln = jax.jit(lambda v: F.layer_norm(v, None, bias))
    assert calls_kernel(ln, x)
    np.testing.assert_array_equal(np.asarray(ln(x)), np.broadcast_to(bias, x.shape))
    # the column layout (BatchNorm channels-last), 64 channels in one register tile
    columns = np.full((50, 64), value, np.float32)
    y = jax.jit(lambda v: F.batch_norm(v, jnp.zeros(64), jnp.ones(64), None, bias, training=True)[0])(columns)
    assert FWD in hlo(lambda v: F.batch_norm(v, jnp.zeros(64), jnp.ones(64), None, bias, training=True)[0], columns)
    np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(bias, columns.shape))
    grad = jax.jit(jax.grad(lambda v: jnp.sum(F.layer_norm(v) * v)))
    assert calls_kernel(grad, x, target=BWD)
    assert np.all(np.isfinite(np.asarray(grad(x))))


def test_padding_never_enters_the_statistics(rng):
    x = data(rng, (64, 6), 1.0)
    mask = rng.random(x.shape) < 0.6
    mask[:, 2] = False  # a channel without valid elements
    poisoned = np.where(mask, x, np.float32(np.nan))
    poisoned[~mask[:, 4], 4] = np.inf
    zeros, ones = jnp.zeros(6), jnp.ones(6)
    bn = jax.jit(lambda v: F.batch_norm(v, zeros, ones, training=True, momentum=0.0, mask=mask))
    assert calls_kernel(bn, poisoned)
    y, mean, var = bn(poisoned)
    expected = ref.normalize(x, 0, mask, 1e-5)
    assert max_error(np.where(mask, y, 0), np.where(mask, expected, 0)) < 5e-6
    r_mean, r_var, _ = ref.moments(x, 0, mask)
    valid = mask.any(0)
    assert max_error(np.asarray(mean)[valid], r_mean.ravel()[valid]) < 1e-5
    assert max_error(np.asarray(var)[valid], r_var.ravel()[valid]) < 1e-5
    # the empty channel keeps its running statistics
    assert float(mean[2]) == 0.0 and float(var[2]) == 1.0


def test_results_do_not_depend_on_the_run(rng):
    x = data(rng, (256, 300), 5.0)  # several tasks per call
    f = jax.jit(lambda v: F.layer_norm(v))
    g = jax.jit(jax.grad(lambda v: jnp.sum(F.layer_norm(v) ** 3)))
    assert calls_kernel(f, x) and calls_kernel(g, x, target=BWD)
    np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(f(x)))
    np.testing.assert_array_equal(np.asarray(g(x)), np.asarray(g(x)))


def test_strided_results_do_not_depend_on_the_run(rng):
    # 8192 rows of 16 channels: four statistics tasks and four output tasks,
    # shared between threads differently from call to call
    x = data(rng, (8, 32, 32, 16), 1e4)
    zeros, ones = jnp.zeros(16), jnp.ones(16)
    f = jax.jit(lambda v: F.batch_norm(v, zeros, ones, training=True))
    g = jax.jit(jax.grad(lambda v: jnp.sum(F.batch_norm(v, zeros, ones, training=True)[0] ** 3)))
    assert calls_kernel(f, x) and calls_kernel(g, x, target=BWD)
    first = [np.asarray(a) for a in f(x)]
    grad = np.asarray(g(x))
    for _ in range(5):
        for a, b in zip(first, f(x)):
            np.testing.assert_array_equal(a, np.asarray(b))
        np.testing.assert_array_equal(grad, np.asarray(g(x)))
    assert max_error(first[0], ref.normalize(x, (0, 1, 2), None, 1e-5)) < 5e-6


def test_switch_off_and_compiler_failure_fall_back(monkeypatch, tmp_path):
    monkeypatch.setenv("BRAINNORM_CPU_KERNEL", "0")
    assert _cpu.available.__wrapped__() is False
    monkeypatch.delenv("BRAINNORM_CPU_KERNEL")
    monkeypatch.setenv("BRAINNORM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert _cpu._compile() is None
    assert list(tmp_path.glob("*.so")) == []


def test_numpy_epsilon(rng):
    x = data(rng, (4, 64), 2.0)
    fn = lambda v: F.layer_norm(v, epsilon=np.float32(1e-5))
    assert FWD in hlo(fn, x)
    assert max_error(jax.jit(fn)(x), ref.normalize(x, -1, None, 1e-5)) < 5e-6
