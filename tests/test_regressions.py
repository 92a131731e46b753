"""Defects of the peer libraries (SPEC section 6, items 1, 2, 4 and 5) that brainnorm must not have.

Each test is named after the defect it guards against and compares against the
float64 NumPy references of tests/reference.py.
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainnorm
from brainnorm import _stats
from brainnorm import functional as F

from . import reference as ref

ATOL = 1e-5


def assert_close(actual, expected, atol=ATOL, rtol=1e-5):
    actual = np.asarray(actual)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual.astype(np.float64), expected, atol=atol, rtol=rtol)


def random_x(rng, shape, offset=1.5):
    return (offset + rng.standard_normal(shape)).astype(np.float32)


def jitted(layer):
    """The layer's call under brainstate.transform.jit (one compilation instead of many eager ones)."""
    return brainstate.transform.jit(lambda x, mask=None: layer(x, mask))


def max_error(actual, expected):
    return float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))))


# ---------------------------------------------------------------------------
# 1. Fast (one-pass) variance by default
# ---------------------------------------------------------------------------


@pytest.fixture(params=["element", "mean"])
def core_path(request, monkeypatch):
    """Both shifts of the core: one of the group's elements (unmasked data), or
    the group's mean from a first pass (masks, empty groups, reduced axes
    sharded along an explicit mesh axis), forced here for unmasked data too.
    The choice is made at trace time."""
    if request.param == "mean":
        monkeypatch.setattr(_stats, "_element_shift_possible", lambda x, axes: False)
    jax.clear_caches()  # traces made under the other setting must not be reused
    yield request.param
    jax.clear_caches()


@pytest.fixture(scope="module")
def offset_data():
    """float32 ``1e4 + N(0, 1)`` of shape (64, 512) and a random mask of the same shape."""
    rng = np.random.default_rng(1)
    x = (1e4 + rng.standard_normal((64, 512))).astype(np.float32)
    mask = rng.random((64, 512)) < 0.7
    return x, mask


def _offset_cases():
    # name -> (layer factory, input reshape, reference(x, mask)); RMSNorm has no mean to be robust about.
    return {
        "LayerNorm": (
            lambda: brainnorm.LayerNorm(512),
            (64, 512),
            lambda x, m: ref.normalize(x, -1, m, 1e-6),
        ),
        "BatchNorm0d-training": (
            lambda: brainnorm.BatchNorm0d(512, use_running_average=False),
            (64, 512),
            lambda x, m: ref.normalize(x, 0, m, 1e-5),
        ),
        "GroupNorm": (
            lambda: brainnorm.GroupNorm(512, num_groups=8),
            (64, 512),
            lambda x, m: ref.group_normalize(x, 8, -1, (1,), m, 1e-6),
        ),
        "InstanceNorm": (
            lambda: brainnorm.InstanceNorm((8, 512)),
            (8, 8, 512),
            lambda x, m: ref.normalize(x, (1,), m, 1e-5),
        ),
    }


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("name", list(_offset_cases()))
def test_layernorm_large_offset_default_is_robust(core_path, offset_data, name, masked):
    """Default statistics of every layer stay accurate for |mean| / std = 1e4 in float32."""
    factory, shape, reference = _offset_cases()[name]
    x, mask = offset_data
    x = x.reshape(shape)
    mask = mask.reshape(shape) if masked else None
    layer = factory()
    y = layer(x, mask)
    tolerance = 2e-3 if masked else 1e-4
    assert max_error(y, reference(x, mask)) < tolerance


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_layernorm_large_offset_functional_is_robust(core_path, offset_data, masked):
    x, mask = offset_data
    mask = mask if masked else None
    y = F.layer_norm(x, mask=mask)
    assert max_error(y, ref.normalize(x, -1, mask, 1e-6)) < (2e-3 if masked else 1e-4)
    mean, var = F.moments(x, -1, mask=mask)
    r_mean, r_var, _ = ref.moments(x, -1, mask)
    assert max_error(mean, r_mean) < 1e-3
    assert max_error(var, r_var) < 1e-3


def test_fast_variance_large_offset_is_inaccurate(offset_data):
    """The one-pass formula (use_fast_variance=True, flax/brainstate parity) breaks down at 1e4.

    This documents why the robust default matters: the same data that the
    default path handles within 1e-4 is off by more than 1 with the fast path.
    """
    x, _ = offset_data
    reference = ref.normalize(x, -1, None, 1e-6)
    fast = brainnorm.LayerNorm(512, use_fast_variance=True)(x)
    robust = brainnorm.LayerNorm(512)(x)
    assert max_error(fast, reference) > 1.0
    assert max_error(robust, reference) < 1e-4


def _relative_variance_error(x, mask=None):
    _, var = jax.jit(lambda v, m: F.moments(v, -1, mask=m))(x, mask)
    _, r_var, _ = ref.moments(x, -1, mask)
    return float(np.max(np.abs(np.asarray(var, np.float64) - r_var) / r_var))


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.9, 2.1, 8.0, 1e3])
def test_default_variance_is_accurate_at_every_offset(core_path, rng, ratio, masked):
    """|mean| / std from 0 to 1e3: the variance of either shift stays within 2e-6 relative."""
    z = rng.standard_normal((256, 1024))
    z = (z - z.mean(-1, keepdims=True)) / z.std(-1, keepdims=True)
    x = (3.0 * ratio + 3.0 * z).astype(np.float32)
    mask = rng.random(x.shape) < 0.8 if masked else None
    assert _relative_variance_error(x, mask) < 2e-6


def test_empty_groups_keep_their_reduced_axes(core_path):
    """A batch of zero examples: zero groups, or groups of zero elements (regression)."""
    empty = np.zeros((0, 16), np.float32)
    assert jax.jit(lambda v: F.layer_norm(v))(empty).shape == (0, 16)
    mean, var = F.moments(empty, -1)
    assert mean.shape == (0, 1) and var.shape == (0, 1)
    mean, var = F.moments(empty, 0)
    assert mean.shape == (1, 16) and var.shape == (1, 16)
    assert float(jnp.abs(mean).max()) == 0.0 and float(jnp.abs(var).max()) == 0.0


def test_one_ill_conditioned_group_makes_every_group_exact(core_path, rng):
    """One offset row among well-conditioned ones: every row is exact."""
    x = rng.standard_normal((32, 256)).astype(np.float32)
    x[7] += 1e4
    y = jax.jit(lambda v: F.layer_norm(v))(x)
    assert max_error(y, ref.normalize(x, -1, None, 1e-6)) < 1e-4


def test_vmap_matches_reference_at_every_offset(core_path, rng):
    """Under vmap every example stays exact, whatever its offset."""
    x = rng.standard_normal((4, 16, 128)).astype(np.float32)
    x[1] += 1e4
    x[3] += 5.0
    y = jax.jit(jax.vmap(lambda v: F.layer_norm(v)))(x)
    assert max_error(y, ref.normalize(x, -1, None, 1e-6)) < 1e-4


@pytest.mark.parametrize("shape", [(64, 128), (512, 256)], ids=["small", "large"])
def test_one_program_at_every_size(shape):
    """Small and large inputs compile to the same kind of program: no branch, no custom call."""
    program = jax.jit(lambda v: F.layer_norm(v)).lower(jnp.ones(shape, jnp.float32)).compile().as_text()
    assert "conditional" not in program
    assert "custom-call" not in program


def test_shift_is_one_of_the_groups_values(rng):
    """The unmasked shift is a stored value of each group, so a constant group is centred exactly."""
    x = (1e4 + rng.standard_normal((8, 3, 5))).astype(np.float32)
    for axes in [(-1,), (1, 2), (0, 2)]:
        shift, _ = _stats._group_element(jnp.asarray(x), tuple(a % 3 for a in axes))
        members = np.moveaxis(x, [a % 3 for a in axes], list(range(-len(axes), 0)))
        members = members.reshape(members.shape[:3 - len(axes)] + (-1,))
        flat = np.asarray(shift).reshape(members.shape[:-1] + (1,))
        assert np.all(np.any(members == flat, axis=-1))
    constant = np.full((4, 96), 1e4 + 0.1, np.float32)
    y = F.layer_norm(constant, bias=jnp.full((96,), 0.25, jnp.float32))
    assert np.all(np.asarray(y) == np.float32(0.25))


@pytest.mark.parametrize("offset", [0.0, 1e3], ids=["centred", "offset"])
def test_layernorm_gradients_at_every_offset(core_path, rng, offset):
    from . import reference_training as reft

    x = (offset + rng.standard_normal((8, 64))).astype(np.float32)
    w = rng.standard_normal(x.shape).astype(np.float32)
    dx = jax.grad(lambda v: jnp.sum(F.layer_norm(v) * w))(jnp.asarray(x))
    expected, _ = reft.normalize_vjp(x, w, (-1,), 1e-6)
    assert max_error(dx, expected) < 1e-4


# ---------------------------------------------------------------------------
# 2. Fully masked rows: NaN outputs and NaN gradients
# ---------------------------------------------------------------------------


def _assert_all_finite(tree):
    for leaf in jax.tree_util.tree_leaves(tree):
        assert np.all(np.isfinite(np.asarray(leaf))), leaf


def _fully_masked_cases(rng):
    """name -> (function(x, scale, bias, mask), x, scale, bias, mask, empty positions, reference)."""
    cases = {}

    # LayerNorm: row 1 of a (B, T, C) input has no valid element.
    x = random_x(rng, (3, 4, 5))
    mask = rng.random((3, 4, 5)) < 0.7
    mask[:, 0, 0] = True
    mask[1] = False
    scale = (1 + 0.5 * rng.standard_normal(5)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    empty = np.zeros(x.shape, bool)
    empty[1] = True
    cases["LayerNorm"] = (
        lambda x, s, b, m: F.layer_norm(x, s, b, reduction_axes=(1, 2), mask=m),
        x, scale, bias, mask, empty, ref.normalize(x, (1, 2), mask, 1e-6, scale, bias),
    )

    # GroupNorm: sample 0 has no valid step at all (a (B, T, 1) padding mask), and
    # sample 2 has no valid entry in group 1 (channels 2, 3).
    x = random_x(rng, (3, 4, 6))
    mask = np.ones((3, 4, 6), bool)
    mask[0] = False
    mask[2, :, 2:4] = False
    scale = (1 + 0.5 * rng.standard_normal(6)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    empty = ~mask
    cases["GroupNorm"] = (
        lambda x, s, b, m: F.group_norm(x, 3, s, b, mask=m),
        x, scale, bias, mask, empty, ref.group_normalize(x, 3, -1, (1, 2), mask, 1e-6, scale, bias),
    )

    # InstanceNorm: channel 2 of sample 1 has no valid step.
    x = random_x(rng, (3, 5, 4))
    mask = rng.random((3, 5, 4)) < 0.8
    mask[:, 0] = True
    mask[1, :, 2] = False
    scale = (1 + 0.5 * rng.standard_normal(4)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    empty = np.zeros(x.shape, bool)
    empty[1, :, 2] = True
    cases["InstanceNorm"] = (
        lambda x, s, b, m: F.instance_norm(x, s, b, mask=m),
        x, scale, bias, mask, empty, ref.normalize(x, (1,), mask, 1e-5, scale, bias),
    )

    # BatchNorm (training): channel 0 has no valid entry in the whole batch.
    x = random_x(rng, (4, 3, 5))
    mask = rng.random((4, 3, 5)) < 0.8
    mask[0, 0] = True
    mask[..., 0] = False
    scale = (1 + 0.5 * rng.standard_normal(5)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    empty = np.zeros(x.shape, bool)
    empty[..., 0] = True
    cases["BatchNorm"] = (
        lambda x, s, b, m: F.batch_norm(x, jnp.zeros(5), jnp.ones(5), s, b, training=True, mask=m)[0],
        x, scale, bias, mask, empty, ref.normalize(x, (0, 1), mask, 1e-5, scale, bias),
    )
    return cases


@pytest.mark.parametrize("name", ["LayerNorm", "GroupNorm", "InstanceNorm", "BatchNorm"])
def test_fully_masked_row_is_finite_and_equals_bias(name):
    fn, x, scale, bias, mask, empty, expected = _fully_masked_cases(np.random.default_rng(2))[name]
    y = np.asarray(jax.jit(fn)(x, scale, bias, mask))
    assert np.all(np.isfinite(y))
    # No valid element: the normalized value is 0, the output is the bias.
    np.testing.assert_allclose(y[empty], np.broadcast_to(bias, x.shape)[empty], rtol=0, atol=1e-6)
    assert_close(y, expected)

    weights = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)

    def loss(x, s, b):
        return jnp.sum(weights * fn(x, s, b, mask) ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
    _assert_all_finite(grads)
    # The bias gradient is the exact sum of dL/dy over the reduced axes, from masked positions too.
    dy = 2 * weights * np.asarray(expected)
    reduce_axes = tuple(range(x.ndim - 1))
    np.testing.assert_allclose(np.asarray(grads[2]), dy.sum(axis=reduce_axes), rtol=1e-4, atol=1e-4)


def test_fully_masked_row_rms_norm_is_zero_with_finite_gradients(rng):
    x = random_x(rng, (3, 6))
    mask = np.ones((3, 6), bool)
    mask[2] = False
    scale = (1 + rng.standard_normal(6)).astype(np.float32)
    y = np.asarray(F.rms_norm(x, scale, mask=mask))
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[2], 0.0)
    grads = jax.jit(jax.grad(lambda x, s: jnp.sum(F.rms_norm(x, s, mask=mask) ** 3), argnums=(0, 1)))(x, scale)
    _assert_all_finite(grads)


@pytest.mark.parametrize("fast", [False, True], ids=["robust", "fast"])
def test_fully_masked_row_layers_gradients_reach_params(rng, fast):
    """Through the layers and brainstate.transform.grad: finite gradients for input, scale and bias."""
    layers = [
        brainnorm.LayerNorm((4, 6), reduction_axes=(0, 1), use_fast_variance=fast),
        brainnorm.GroupNorm((4, 6), num_groups=2, use_fast_variance=fast),
        brainnorm.InstanceNorm((4, 6), use_fast_variance=fast),
        brainnorm.BatchNorm1d((4, 6), use_running_average=False, use_fast_variance=fast),
    ]
    for layer in layers:
        layer.weight.value = {
            "scale": (1 + 0.5 * rng.standard_normal(layer.weight.value["scale"].shape)).astype(np.float32),
            "bias": rng.standard_normal(layer.weight.value["bias"].shape).astype(np.float32),
        }
    x = random_x(rng, (3, 4, 6))
    mask = np.ones((3, 4, 1), bool)
    mask[1] = False  # sample 1 is all padding
    mask_bn = np.ones((3, 4, 6), bool)
    mask_bn[..., 3] = False  # channel 3 has no valid entry in the batch

    for layer in layers:
        m = mask_bn if isinstance(layer, brainnorm.BatchNorm1d) else mask
        params = layer.states(brainstate.ParamState)

        def loss(x):
            return jnp.sum(jnp.sin(layer(x, m)))

        grad_fn = brainstate.transform.grad(loss, grad_states=params, argnums=0)
        grad_params, grad_x = brainstate.transform.jit(grad_fn)(jnp.asarray(x))
        _assert_all_finite(grad_params)
        _assert_all_finite(grad_x)
        y = np.asarray(brainstate.transform.jit(layer)(x, m))
        bias = np.broadcast_to(np.asarray(layer.weight.value["bias"]), x.shape)
        empty = ~np.broadcast_to(m, x.shape)
        np.testing.assert_allclose(y[empty], bias[empty], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------
# BatchNorm running statistics with an empty channel
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.8, None], ids=["momentum0.8", "cumulative"])
def test_batchnorm_fully_masked_channel_keeps_running_stats(rng, momentum):
    layer = brainnorm.BatchNorm1d((3, 4), momentum=momentum)
    old_mean = rng.standard_normal((1, 4)).astype(np.float32)
    old_var = (0.5 + rng.random((1, 4))).astype(np.float32)
    layer.running_mean.value = old_mean
    layer.running_var.value = old_var
    x = random_x(rng, (5, 3, 4))
    mask = rng.random((5, 3, 4)) < 0.8
    mask[0, 0] = True
    mask[..., 2] = False
    with brainstate.environ.context(fit=True):
        y = layer(x, mask)
    assert np.all(np.isfinite(np.asarray(y)))
    new_mean = np.asarray(layer.running_mean.value)
    new_var = np.asarray(layer.running_var.value)
    assert np.all(np.isfinite(new_mean)) and np.all(np.isfinite(new_var))
    np.testing.assert_array_equal(new_mean[..., 2], old_mean[..., 2])
    np.testing.assert_array_equal(new_var[..., 2], old_var[..., 2])
    m = 0.0 if momentum is None else momentum  # the first cumulative step takes the batch value
    r_mean, r_var = ref.running_update(old_mean.ravel(), old_var.ravel(), x, (0, 1), m, mask)
    assert_close(new_mean.ravel(), r_mean)
    assert_close(new_var.ravel(), r_var)
    assert int(layer.num_batches_tracked.value) == 1


def test_batchnorm_fully_masked_channel_functional_returns_old_stats(rng):
    x = random_x(rng, (6, 3))
    mask = np.ones((6, 3), bool)
    mask[:, 1] = False
    old_mean = np.array([0.5, -2.0, 1.0], np.float32)
    old_var = np.array([2.0, 3.0, 0.5], np.float32)
    _, new_mean, new_var = F.batch_norm(x, old_mean, old_var, training=True, momentum=0.5, mask=mask)
    np.testing.assert_array_equal(np.asarray(new_mean)[1], old_mean[1])
    np.testing.assert_array_equal(np.asarray(new_var)[1], old_var[1])
    r_mean, r_var = ref.running_update(old_mean, old_var, x, (0,), 0.5, mask)
    assert_close(new_mean, r_mean)
    assert_close(new_var, r_var)


# ---------------------------------------------------------------------------
# 4. GroupNorm statistics repeated along axis 1
# ---------------------------------------------------------------------------


def test_groupnorm_sequence_input(rng):
    """(B, T, C) into GroupNorm(C): statistics per (b, t) and group, not shared along T."""
    layer = brainnorm.GroupNorm(6, num_groups=3)
    x = random_x(rng, (2, 5, 6))
    x[:, 3] += 10.0  # a step with very different statistics
    assert_close(jitted(layer)(x), ref.group_normalize(x, 3, -1, (2,), None, 1e-6))
    mask = rng.random((2, 5, 6)) < 0.8
    mask[..., ::2] = True
    assert_close(jitted(layer)(x, mask), ref.group_normalize(x, 3, -1, (2,), mask, 1e-6))

    # GroupNorm((T, C)) on the same data: per b, over T and the group's channels.
    seq_layer = brainnorm.GroupNorm((5, 6), num_groups=3)
    assert_close(jitted(seq_layer)(x), ref.group_normalize(x, 3, -1, (1, 2), None, 1e-6))
    padding = np.ones((2, 5, 1), bool)
    padding[0, 3:] = False
    assert_close(jitted(seq_layer)(x, padding), ref.group_normalize(x, 3, -1, (1, 2), padding, 1e-6))


def test_groupnorm_unbatched_input(rng):
    layer = brainnorm.GroupNorm((5, 6), num_groups=2)
    scale = (1 + 0.5 * rng.standard_normal((1, 6))).astype(np.float32)
    bias = rng.standard_normal((1, 6)).astype(np.float32)
    layer.weight.value = {"scale": scale, "bias": bias}
    x = random_x(rng, (5, 6))
    y = layer(x)  # eager
    assert np.shape(y) == (5, 6)
    assert_close(y, ref.group_normalize(x, 2, -1, (0, 1), None, 1e-6, scale, bias))
    assert_close(jitted(layer)(x[None])[0], ref.group_normalize(x, 2, -1, (0, 1), None, 1e-6, scale, bias))
    vector = brainnorm.GroupNorm(6, num_groups=3)
    v = random_x(rng, (6,))
    assert_close(jitted(vector)(v), ref.group_normalize(v, 3, 0, (0,), None, 1e-6))


def test_groupnorm_rank3_in_size(rng):
    x = random_x(rng, (2, 3, 4, 8))
    layer = brainnorm.GroupNorm((3, 4, 8), num_groups=4)
    assert layer.weight.value["scale"].shape == (1, 1, 8)
    assert_close(jitted(layer)(x), ref.group_normalize(x, 4, -1, (1, 2, 3), None, 1e-6))
    channels_first = brainnorm.GroupNorm((8, 3, 4), 0, 2)
    xc = np.moveaxis(x, -1, 1).copy()
    assert channels_first.weight.value["scale"].shape == (8, 1, 1)
    assert_close(jitted(channels_first)(xc), ref.group_normalize(xc, 2, 1, (1, 2, 3), None, 1e-6))
    # With a time-major batch (T, B, H, W, C).
    xt = random_x(rng, (2, 2, 3, 4, 8))
    assert_close(jitted(layer)(xt), ref.group_normalize(xt, 4, -1, (2, 3, 4), None, 1e-6))


# ---------------------------------------------------------------------------
# 5. brainstate BatchNorm defects
# ---------------------------------------------------------------------------


def test_batchnorm_no_track_running_stats_normalizes(rng):
    layer = brainnorm.BatchNorm2d((3, 4, 5), track_running_stats=False, affine=True)
    assert len(layer.states(brainstate.ShortTermState)) == 0
    scale = (1 + 0.5 * rng.standard_normal((1, 1, 5))).astype(np.float32)
    bias = rng.standard_normal((1, 1, 5)).astype(np.float32)
    layer.weight.value = {"scale": scale, "bias": bias}
    x = random_x(rng, (4, 3, 4, 5), offset=3.0)
    expected = ref.normalize(x, (0, 1, 2), None, 1e-5, scale, bias)
    with brainstate.environ.context(fit=True):
        assert_close(layer(x), expected)
    with brainstate.environ.context(fit=False):
        assert_close(layer(x), expected)
    assert_close(layer(x, use_running_average=True), expected)
    assert_close(layer(x), expected)

    bare = brainnorm.BatchNorm1d((4, 5), track_running_stats=False, affine=False)
    assert len(bare.states()) == 0
    x1 = random_x(rng, (3, 4, 5), offset=-2.0)
    with brainstate.environ.context(fit=False):
        assert_close(bare(x1), ref.normalize(x1, (0, 1), None, 1e-5))


def test_batchnorm_works_when_fit_unset(rng):
    assert brainstate.environ.get("fit", None) is None
    layer = brainnorm.BatchNorm1d((3, 4), momentum=0.9)
    x = random_x(rng, (5, 3, 4))
    y = layer(x)  # no environ context at all: training
    assert_close(y, ref.normalize(x, (0, 1), None, 1e-5))
    r_mean, r_var = ref.running_update(np.zeros(4), np.ones(4), x, (0, 1), 0.9)
    assert_close(np.ravel(layer.running_mean.value), r_mean)
    assert_close(np.ravel(layer.running_var.value), r_var)
    assert int(layer.num_batches_tracked.value) == 1


def test_batchnorm_positive_axis_meaning_is_batch_rank_independent(rng):
    """feature_axis=0 is the first axis of in_size (channels first) for 0, 1 and 2 batch axes."""
    in_size = (4, 6)  # (C, L)
    x = random_x(rng, (2, 3) + in_size)
    x += np.arange(4, dtype=np.float32)[:, None] * 5  # channels with clearly different means
    results = {}
    for batch_shape in [(), (6,), (2, 3)]:
        layer = brainnorm.BatchNorm1d(in_size, 0, momentum=0.5)
        assert layer.running_mean.value.shape == (4, 1)
        xb = x.reshape(batch_shape + (-1,) + in_size)[0] if batch_shape == () else x.reshape(batch_shape + in_size)
        with brainstate.environ.context(fit=True):
            y = layer(xb)
        n = len(batch_shape)
        axes = tuple(a for a in range(xb.ndim) if a != n)
        assert_close(y, ref.normalize(xb, axes, None, 1e-5))
        r_mean, r_var = ref.running_update(np.zeros(4), np.ones(4), xb, axes, 0.5)
        assert_close(np.ravel(layer.running_mean.value), r_mean)
        assert_close(np.ravel(layer.running_var.value), r_var)
        results[batch_shape] = (np.asarray(y), np.asarray(layer.running_mean.value))
    # (6, C, L) and (2, 3, C, L) hold the same samples: identical statistics and outputs.
    np.testing.assert_allclose(results[(6,)][0], results[(2, 3)][0].reshape(6, 4, 6), atol=1e-5)
    np.testing.assert_allclose(results[(6,)][1], results[(2, 3)][1], atol=1e-6)
