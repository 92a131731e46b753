"""brainnorm.functional against the float64 NumPy references of tests/reference.py.

Tolerance: outputs and statistics of float32 inputs with well-conditioned data
(offset 0 to a few units, standard deviation about 1, every group with
several valid elements) must agree with the float64 reference within
ATOL = 1e-5 absolute. Outputs at masked-out positions can be a few units
large (they are transformed with the statistics of the valid elements), so
RTOL = 1e-5 is allowed on top of that.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from brainnorm import functional as F

from . import reference as ref

ATOL = 1e-5
RTOL = 1e-5


def _is_array(a):
    return isinstance(a, (np.ndarray, jax.Array))


def jit_call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` under ``jax.jit``: arrays traced, everything else static.

    One compilation per case is much cheaper than the per-primitive compilations
    of an eager call on a new shape.
    """
    dyn_pos = [i for i, a in enumerate(args) if _is_array(a)]
    dyn_kw = {k: v for k, v in kwargs.items() if _is_array(v)}
    static_kw = {k: v for k, v in kwargs.items() if not _is_array(v)}

    def inner(pos, kw):
        full = list(args)
        for i, a in zip(dyn_pos, pos):
            full[i] = a
        return fn(*full, **kw, **static_kw)

    return jax.jit(inner)([args[i] for i in dyn_pos], dyn_kw)


def assert_close(actual, expected, atol=ATOL, rtol=RTOL):
    actual = np.asarray(actual)
    wide = np.complex128 if np.iscomplexobj(actual) or np.iscomplexobj(expected) else np.float64
    expected = np.asarray(expected, wide)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual.astype(wide), expected, atol=atol, rtol=rtol)


def random_x(rng, shape, offset=1.5):
    return (offset + rng.standard_normal(shape)).astype(np.float32)


def random_mask(rng, shape, p=0.75):
    if shape is None:
        return None
    return rng.random(shape) < p


def with_first_valid(mask):
    """Make sure every reduction group has valid elements: the first slot is always valid."""
    mask = np.array(mask)
    mask.reshape(-1)[0] = True
    return mask


# (x shape, reduction axes on x, mask shape or None)
MOMENT_CASES = [
    ((6, 8), -1, None),
    ((6, 8), 0, (6, 8)),
    ((6, 8), (0, 1), (6, 1)),
    ((4, 5, 6), (1, 2), (4, 5, 6)),
    ((4, 5, 6), (-2, -1), (4, 5, 1)),
    ((4, 5, 6), 1, None),
    ((4, 5, 6), (0, 2), (1, 5, 6)),
    ((3, 4, 5, 6), (1, 2), (3, 4, 5, 6)),
    ((3, 4, 5, 6), (-3, -1), (3, 4, 1, 1)),
    ((3, 4, 5, 6), (0, 1, 2, 3), None),
]


def _case_id(case):
    shape, axes, mask_shape = case
    return f"x{shape}-axes{axes}-mask{mask_shape}"


# ---------------------------------------------------------------------------
# moments
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [False, True], ids=["robust", "fast"])
@pytest.mark.parametrize("case", MOMENT_CASES, ids=_case_id)
def test_moments_mean_var(rng, case, fast):
    shape, axes, mask_shape = case
    x = random_x(rng, shape)
    mask = random_mask(rng, mask_shape)
    mean, var = jit_call(F.moments, x, axes, mask=mask, use_fast_variance=fast)
    r_mean, r_var, _ = ref.moments(x, axes, mask)
    assert_close(mean, r_mean)
    assert_close(var, r_var)


@pytest.mark.parametrize("case", MOMENT_CASES, ids=_case_id)
def test_moments_rms(rng, case):
    shape, axes, mask_shape = case
    x = random_x(rng, shape)
    mask = random_mask(rng, mask_shape)
    mean, var = jit_call(F.moments, x, axes, mask=mask, use_mean=False)
    r_mean, r_var, _ = ref.moments(x, axes, mask, use_mean=False)
    assert_close(mean, r_mean)
    assert_close(var, r_var)
    assert np.all(np.asarray(mean) == 0)


# A few checks run eagerly (no jit), the way the functions are often called.


@pytest.mark.parametrize("use_mean", [True, False])
def test_moments_integer_mask_reads_nonzero(rng, use_mean):
    x = random_x(rng, (5, 7, 3))
    int_mask = rng.integers(-2, 3, size=(5, 7, 3)).astype(np.int32)
    mean, var = F.moments(x, (1, 2), mask=int_mask, use_mean=use_mean)
    r_mean, r_var, _ = ref.moments(x, (1, 2), int_mask != 0, use_mean=use_mean)
    assert_close(mean, r_mean)
    assert_close(var, r_var)


def test_moments_empty_group_gives_zero(rng):
    x = random_x(rng, (3, 4))
    mask = np.ones((3, 4), bool)
    mask[1] = False
    mean, var = F.moments(x, -1, mask=mask)
    assert np.all(np.isfinite(np.asarray(mean))) and np.all(np.isfinite(np.asarray(var)))
    r_mean, r_var, _ = ref.moments(x, -1, mask)
    assert_close(mean, r_mean)
    assert_close(var, r_var)
    assert float(np.asarray(mean)[1, 0]) == 0.0 and float(np.asarray(var)[1, 0]) == 0.0


# ---------------------------------------------------------------------------
# normalize
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,stat_shape",
    [((6, 8), (8,)), ((4, 5, 6), (4, 1, 6)), ((3, 4, 5, 6), (1, 4, 1, 1))],
)
@pytest.mark.parametrize("affine", [False, True])
def test_normalize_with_given_statistics(rng, shape, stat_shape, affine):
    x = random_x(rng, shape)
    mean = rng.standard_normal(stat_shape).astype(np.float32)
    var = (0.2 + rng.random(stat_shape)).astype(np.float32)
    scale = bias = None
    if affine:
        scale = (1 + 0.5 * rng.standard_normal(stat_shape)).astype(np.float32)
        bias = rng.standard_normal(stat_shape).astype(np.float32)
    y = jit_call(F.normalize, x, mean, var, scale=scale, bias=bias, epsilon=1e-3)
    assert_close(y, ref.apply_stats(x, mean, var, 1e-3, scale, bias))


# ---------------------------------------------------------------------------
# layer_norm and rms_norm
# ---------------------------------------------------------------------------

# (x shape, reduction axes, parameter shape, mask shape)
NORM_CASES = [
    ((6, 8), -1, (8,), None),
    ((6, 8), 1, (8,), (6, 8)),
    ((4, 5, 6), (1, 2), (5, 6), (4, 5, 6)),
    ((4, 5, 6), (-2, -1), (1, 6), (4, 5, 1)),
    ((4, 5, 6), 1, (1, 5, 1), (4, 5, 1)),
    ((3, 4, 5, 6), (1, 2), (1, 4, 5, 1), (3, 4, 5, 6)),
    ((3, 4, 5, 6), (-3, -2, -1), (6,), (3, 4, 1, 1)),
    ((3, 4, 5, 6), (2, 3), (5, 6), None),
]


def _norm_id(case):
    shape, axes, pshape, mshape = case
    return f"x{shape}-axes{axes}-p{pshape}-mask{mshape}"


def _affine(rng, pshape):
    scale = (1 + 0.5 * rng.standard_normal(pshape)).astype(np.float32)
    bias = rng.standard_normal(pshape).astype(np.float32)
    return scale, bias


@pytest.mark.parametrize("fast", [False, True], ids=["robust", "fast"])
@pytest.mark.parametrize("case", NORM_CASES, ids=_norm_id)
def test_layer_norm(rng, case, fast):
    shape, axes, pshape, mshape = case
    x = random_x(rng, shape)
    mask = random_mask(rng, mshape)
    scale, bias = _affine(rng, pshape)
    y = jit_call(F.layer_norm, x, scale, bias, reduction_axes=axes, epsilon=1e-5, mask=mask, use_fast_variance=fast)
    # The one-pass variance E[x^2] - E[x]^2 (flax parity) loses about mean^2 * ulp; for groups of
    # one or two valid elements, whose variance is near 0, that shows at 1e-5 after dividing by
    # sqrt(var + 1e-5). The robust default keeps the tight tolerance.
    tolerance = 1e-4 if fast else ATOL
    assert_close(y, ref.normalize(x, axes, mask, 1e-5, scale, bias), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("case", NORM_CASES[:3], ids=_norm_id)
def test_layer_norm_without_affine(rng, case):
    shape, axes, _, mshape = case
    x = random_x(rng, shape)
    mask = random_mask(rng, mshape)
    y = jit_call(F.layer_norm, x, reduction_axes=axes, mask=mask)
    assert_close(y, ref.normalize(x, axes, mask, 1e-6))


def test_layer_norm_integer_mask(rng):
    x = random_x(rng, (4, 5, 6))
    int_mask = rng.integers(0, 4, size=(4, 5, 6)).astype(np.int8)
    y = F.layer_norm(x, reduction_axes=(1, 2), mask=int_mask)
    assert_close(y, ref.normalize(x, (1, 2), int_mask != 0, 1e-6))


@pytest.mark.parametrize("case", NORM_CASES, ids=_norm_id)
def test_rms_norm(rng, case):
    shape, axes, pshape, mshape = case
    x = random_x(rng, shape, offset=0.5)
    mask = random_mask(rng, mshape)
    scale, _ = _affine(rng, pshape)
    y = jit_call(F.rms_norm, x, scale, reduction_axes=axes, epsilon=1e-5, mask=mask)
    assert_close(y, ref.normalize(x, axes, mask, 1e-5, scale, None, use_mean=False))


def test_rms_norm_default_epsilon_and_no_scale(rng):
    x = random_x(rng, (3, 4, 5), offset=0.0)
    y = jit_call(F.rms_norm, x, reduction_axes=(0, -1))
    assert_close(y, ref.normalize(x, (0, 2), None, 1e-6, use_mean=False))


# ---------------------------------------------------------------------------
# batch_norm
# ---------------------------------------------------------------------------

# (x shape, feature axes on x, running-statistics shape, mask shape)
BN_CASES = [
    ((16, 5), -1, (5,), None),
    ((16, 5), 1, (5,), (16, 5)),
    ((6, 4, 3), -1, (3,), (6, 4, 1)),
    ((6, 3, 4), 1, (3, 1), (6, 3, 4)),
    ((4, 3, 5, 2), 1, (3, 1, 1), None),
    ((4, 5, 2, 3), (-1,), (3,), (4, 5, 2, 3)),
    ((4, 5, 2, 3), (1, 3), (5, 1, 3), (4, 1, 1, 1)),
]


def _bn_id(case):
    shape, feat, sshape, mshape = case
    return f"x{shape}-feat{feat}-mask{mshape}"


def _non_feature_axes(ndim, feature_axes):
    feature = {a % ndim for a in np.atleast_1d(feature_axes)}
    return tuple(a for a in range(ndim) if a not in feature)


@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
@pytest.mark.parametrize("case", BN_CASES, ids=_bn_id)
def test_batch_norm_training(rng, case, unbiased):
    shape, feat, sshape, mshape = case
    x = random_x(rng, shape)
    mask = random_mask(rng, mshape)
    if mask is not None:
        mask = with_first_valid(mask)
    scale, bias = _affine(rng, sshape)
    old_mean = rng.standard_normal(sshape).astype(np.float32)
    old_var = (0.5 + rng.random(sshape)).astype(np.float32)
    y, new_mean, new_var = jit_call(
        F.batch_norm, x, old_mean, old_var, scale, bias, training=True, feature_axes=feat, momentum=0.8,
        epsilon=1e-5, mask=mask, unbiased_running_var=unbiased,
    )
    axes = _non_feature_axes(len(shape), feat)
    assert_close(y, ref.normalize(x, axes, mask, 1e-5, scale, bias))
    squeezed = tuple(d for a, d in enumerate(shape) if a not in axes)
    r_mean, r_var = ref.running_update(
        old_mean.reshape(squeezed), old_var.reshape(squeezed), x, axes, 0.8, mask, unbiased
    )
    assert_close(new_mean, np.reshape(r_mean, sshape))
    assert_close(new_var, np.reshape(r_var, sshape))


@pytest.mark.parametrize("case", BN_CASES, ids=_bn_id)
def test_batch_norm_eval_uses_running_statistics(rng, case):
    shape, feat, sshape, mshape = case
    x = random_x(rng, shape)
    mask = random_mask(rng, mshape)
    scale, bias = _affine(rng, sshape)
    old_mean = rng.standard_normal(sshape).astype(np.float32)
    old_var = (0.5 + rng.random(sshape)).astype(np.float32)
    y, new_mean, new_var = jit_call(
        F.batch_norm, x, old_mean, old_var, scale, bias, training=False, feature_axes=feat, momentum=0.8,
        epsilon=1e-3, mask=mask,
    )
    assert_close(y, ref.apply_stats(x, old_mean, old_var, 1e-3, scale, bias))
    np.testing.assert_array_equal(np.asarray(new_mean), old_mean)
    np.testing.assert_array_equal(np.asarray(new_var), old_var)


def test_batch_norm_momentum_extremes(rng):
    x = random_x(rng, (10, 4))
    old_mean = rng.standard_normal(4).astype(np.float32)
    old_var = (0.5 + rng.random(4)).astype(np.float32)
    r_mean, r_var, _ = ref.moments(x, 0)
    _, m0, v0 = jit_call(F.batch_norm, x, old_mean, old_var, training=True, momentum=0.0)
    assert_close(m0, r_mean.ravel())
    assert_close(v0, r_var.ravel())
    _, m1, v1 = jit_call(F.batch_norm, x, old_mean, old_var, training=True, momentum=1.0)
    assert_close(m1, old_mean)
    assert_close(v1, old_var)


# ---------------------------------------------------------------------------
# group_norm and instance_norm
# ---------------------------------------------------------------------------

# (x shape, num_groups, feature axis on x, reduction axes or None, param shape, mask shape)
GN_CASES = [
    ((5, 8), 2, -1, None, (8,), None),
    ((5, 8), 4, 1, None, (8,), (5, 8)),
    ((3, 4, 6), 3, -1, None, (6,), (3, 4, 1)),
    ((3, 4, 6), 2, -1, (2,), (6,), (3, 4, 6)),
    ((3, 6, 4), 2, 1, None, (6, 1), (3, 6, 4)),
    ((2, 3, 4, 6), 2, -1, None, (6,), (2, 3, 4, 1)),
    ((2, 3, 4, 6), 3, 3, (2, 3), (6,), (2, 3, 4, 6)),
    ((2, 6, 3, 4), 3, 1, None, (6, 1, 1), None),
    ((2, 4, 3, 5), 1, 1, (1, 3), (4, 1, 1), (2, 1, 3, 5)),
]


def _gn_id(case):
    shape, groups, feat, axes, pshape, mshape = case
    return f"x{shape}-g{groups}-feat{feat}-axes{axes}-mask{mshape}"


@pytest.mark.parametrize("case", GN_CASES, ids=_gn_id)
def test_group_norm(rng, case):
    shape, groups, feat, red, pshape, mshape = case
    x = random_x(rng, shape)
    mask = random_mask(rng, mshape)
    scale, bias = _affine(rng, pshape)
    y = jit_call(F.group_norm, x, groups, scale, bias, feature_axis=feat, reduction_axes=red, epsilon=1e-5, mask=mask)
    axes = tuple(range(1, len(shape))) if red is None else red
    assert_close(y, ref.group_normalize(x, groups, feat, axes, mask, 1e-5, scale, bias))


def test_group_norm_without_affine_default_epsilon(rng):
    x = random_x(rng, (3, 5, 6))
    y = jit_call(F.group_norm, x, 3)
    assert_close(y, ref.group_normalize(x, 3, -1, (1, 2), None, 1e-6))


# (x shape, feature axis on x, param shape, mask shape)
IN_CASES = [
    ((4, 7, 3), -1, (3,), None),
    ((4, 7, 3), 2, (3,), (4, 7, 1)),
    ((4, 3, 7), 1, (3, 1), (4, 3, 7)),
    ((2, 4, 5, 3), -1, (3,), (2, 4, 5, 3)),
    ((2, 3, 4, 5), 1, (3, 1, 1), (2, 1, 4, 5)),
]


@pytest.mark.parametrize("case", IN_CASES, ids=lambda c: f"x{c[0]}-feat{c[1]}-mask{c[3]}")
def test_instance_norm(rng, case):
    shape, feat, pshape, mshape = case
    x = random_x(rng, shape)
    mask = random_mask(rng, mshape)
    scale, bias = _affine(rng, pshape)
    y = jit_call(F.instance_norm, x, scale, bias, feature_axis=feat, mask=mask)
    axes = tuple(a for a in range(1, len(shape)) if a != feat % len(shape))
    assert_close(y, ref.normalize(x, axes, mask, 1e-5, scale, bias))


def test_instance_norm_equals_group_norm_with_one_channel_per_group(rng):
    x = random_x(rng, (3, 5, 4))
    y = jit_call(F.instance_norm, x, epsilon=1e-6)
    assert_close(y, ref.group_normalize(x, 4, -1, (1, 2), None, 1e-6))


# ---------------------------------------------------------------------------
# local_response_norm
# ---------------------------------------------------------------------------

LRN_CASES = [
    ((4, 7), 3, -1),
    ((4, 7), 4, 1),
    ((3, 6, 5), 5, 1),
    ((3, 5, 6), 2, -1),
    ((2, 3, 4, 6), 1, -1),
    ((2, 6, 3, 4), 4, 1),
    ((2, 3, 4, 6), 7, 3),
]


@pytest.mark.parametrize("shape,size,feat", LRN_CASES)
def test_local_response_norm(rng, shape, size, feat):
    x = (2 * rng.standard_normal(shape)).astype(np.float32)
    y = jit_call(F.local_response_norm, x, size, alpha=0.3, beta=0.6, k=1.5, feature_axis=feat)
    assert_close(y, ref.local_response_norm(x, size, 0.3, 0.6, 1.5, feat))


@pytest.mark.parametrize("size", [1, 2, 5])
def test_local_response_norm_defaults(rng, size):
    x = (10 * rng.standard_normal((3, 8))).astype(np.float32)
    y = F.local_response_norm(x, size)
    assert_close(y, ref.local_response_norm(x, size))


# ---------------------------------------------------------------------------
# weight_standardization
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,out_axis",
    [((6, 4), -1), ((6, 4), 0), ((3, 5, 4), -1), ((3, 3, 4, 8), -1), ((8, 4, 3, 3), 0), ((3, 8, 3, 4), 1)],
)
@pytest.mark.parametrize("with_gain", [False, True])
def test_weight_standardization(rng, shape, out_axis, with_gain):
    w = random_x(rng, shape, offset=0.3)
    gain = None
    if with_gain:
        gshape = [1] * len(shape)
        gshape[out_axis] = shape[out_axis]
        gain = (1 + rng.standard_normal(gshape)).astype(np.float32)
    y = jit_call(F.weight_standardization, w, gain=gain, out_axis=out_axis)
    assert_close(y, ref.weight_standardization(w, 1e-4, gain, out_axis))


def test_weight_standardization_eps_floor(rng):
    # Var[w] * fan_in is about 1e-8 here, so eps=1e-4 is the denominator.
    w = (1e-5 * rng.standard_normal((5, 3))).astype(np.float32)
    y = jit_call(F.weight_standardization, w, eps=1e-4)
    assert_close(y, ref.weight_standardization(w, 1e-4), atol=1e-7, rtol=1e-5)
    assert float(np.max(np.abs(np.asarray(y)))) < 1e-2


def test_weight_standardization_is_exported_at_top_level(rng):
    import brainnorm

    w = random_x(rng, (3, 3, 2, 4))
    assert_close(brainnorm.weight_standardization(w, eps=1e-3), ref.weight_standardization(w, 1e-3))


# ---------------------------------------------------------------------------
# complex inputs: variance of |x - mean|^2
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [False, True], ids=["robust", "fast"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_complex_moments_and_layer_norm(rng, fast, masked):
    shape = (4, 3, 6)
    x = (1 - 2j + rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    mask = with_first_valid(random_mask(rng, shape)) if masked else None
    mean, var = jit_call(F.moments, x, (1, 2), mask=mask, use_fast_variance=fast)
    r_mean, r_var, _ = ref.moments(x, (1, 2), mask)
    assert np.iscomplexobj(np.asarray(mean))
    assert_close(mean, r_mean)
    assert_close(var, r_var)
    y = jit_call(F.layer_norm, x, reduction_axes=(1, 2), mask=mask, use_fast_variance=fast)
    assert_close(y, (x.astype(np.complex128) - r_mean) / np.sqrt(r_var + 1e-6))
    _, r_ms, _ = ref.moments(x, -1, mask, use_mean=False)
    y = jit_call(F.rms_norm, x, mask=mask)
    assert_close(y, x.astype(np.complex128) / np.sqrt(r_ms + 1e-6))


@pytest.mark.parametrize("use_mean,fast", [(True, False), (True, True), (False, False)], ids=["robust", "fast", "rms"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_complex_variance_is_real(rng, use_mean, fast, masked):
    """The variance of complex data, mean(|x - mean|^2), is real (float32 for complex64)."""
    shape = (3, 5)
    x = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    mask = with_first_valid(random_mask(rng, shape)) if masked else None
    _, var = F.moments(x, -1, mask=mask, use_mean=use_mean, use_fast_variance=fast)
    assert var.dtype == np.float32
