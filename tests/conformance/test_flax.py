"""brainnorm against flax.nnx: same inputs, same parameters, same options.

Compared: outputs and gradients of ``sum(y * c)`` (``c`` a fixed random
cotangent) with respect to the input and every parameter, for LayerNorm,
RMSNorm, GroupNorm, InstanceNorm and BatchNorm, with and without masks and
with ``use_fast_variance`` both ways (brainnorm's option against flax's
same-named one); for BatchNorm also the running statistics over ``STEPS``
training steps (each followed by the same SGD update on both sides) and
evaluation. Inputs are well conditioned and every masked group keeps a valid
element: the inputs on which flax is correct.

The inputs on which flax is wrong (SPEC section 6: item 2, a fully masked
row gives NaN; item 4, GroupNorm statistics repeated along axis 1, wrong for
per-step statistics of ``(B, T, C)`` input and failing for unbatched input)
are documented differences at the end of the file: brainnorm is asserted
against the float64 NumPy reference of ``tests/reference.py``, and separate
``test_flax_defect_*`` tests show the flax behaviour; they skip, rather than
fail, if a future flax no longer has the defect.

Tolerances (float32):
- outputs and running statistics: ``ATOL = 1e-5`` absolute;
- gradients: ``GRAD_TOL = 1e-4`` relative plus absolute;
- brainnorm against the float64 reference: ``REF_ATOL = 1e-5`` absolute.
"""

from __future__ import annotations

import brainstate
import jax.numpy as jnp
import numpy as np
import pytest

import brainnorm
from tests import reference as R

from ._common import brainnorm_grads, check, random_mask, sample, sgd

nnx = pytest.importorskip("flax.nnx", reason="flax is needed for the flax.nnx conformance tests")

ATOL = 1e-5
GRAD_TOL = 1e-4
REF_ATOL = 1e-5
STEPS = 5
LR = 0.01
PEER = "flax.nnx"


# --------------------------------------------------------------------------- helpers


def _loss(model, x, cot, mask, use_running_average):
    kwargs = {} if mask is None else {"mask": mask}
    if use_running_average is not None:
        kwargs["use_running_average"] = use_running_average
    y = model(x, **kwargs)
    return jnp.sum(y * cot), y


_flax_grad = nnx.jit(nnx.grad(_loss, argnums=(0, 1), has_aux=True), static_argnums=(4,))


def flax_grads(model, x, cot, mask=None, use_running_average=None):
    """``(y, dx, {parameter name: grad})``; running statistics are updated as by a plain call."""
    mask = None if mask is None else jnp.asarray(mask)
    (dmodel, dx), y = _flax_grad(model, jnp.asarray(x), jnp.asarray(cot), mask, use_running_average)
    return np.asarray(y), np.asarray(dx), {k: np.asarray(v) for k, v in nnx.to_pure_dict(dmodel).items()}


def flax_sgd(model, grads, lr):
    for name, g in grads.items():
        param = getattr(model, name)
        param[...] = param[...] - lr * g


def set_flax(model, name, value):
    param = getattr(model, name)
    param[...] = jnp.asarray(np.reshape(value, param[...].shape), jnp.float32)


def compare(name, ours, peer, x, cot, mask, *, flax_kwargs=None, fit=None, param_attr="weight", atol=ATOL,
            grad_tol=GRAD_TOL):
    """One forward/backward on both sides; returns the two gradient dicts."""
    y_f, dx_f, dp_f = flax_grads(peer, x, cot, mask, **(flax_kwargs or {}))
    if fit is None:
        y, dx, dp = brainnorm_grads(ours, x, cot, mask)
    else:
        with brainstate.environ.context(fit=fit):
            y, dx, dp = brainnorm_grads(ours, x, cot, mask)
    check(PEER, name, "output", y, y_f, atol=atol)
    check(PEER, name, "grad x", dx, dx_f, atol=grad_tol, rtol=grad_tol)
    ours_dp = dp.get((param_attr,), {})
    assert set(ours_dp) == set(dp_f), (set(ours_dp), set(dp_f))
    for key in dp_f:
        check(PEER, name, "grad params", np.ravel(ours_dp[key]), np.ravel(dp_f[key]), atol=grad_tol, rtol=grad_tol)
    return dp, dp_f


def random_params(rng, shape):
    return 1.0 + 0.3 * rng.standard_normal(shape), 0.2 * rng.standard_normal(shape)


# --------------------------------------------------------------------------- LayerNorm / RMSNorm

AXIS_CASES = [
    # (x shape, brainnorm in_size, reduction axes, feature axes, mask shape or None)
    ((4, 6, 8), (8,), -1, -1, None),
    ((4, 6, 8), (6, 8), -1, -1, (4, 6, 8)),
    ((4, 6, 8), (6, 8), (-2, -1), (-2, -1), (4, 6, 1)),
    ((4, 6, 8), (6, 8), (-2, -1), -1, (4, 6, 8)),
    ((3, 2, 5, 4), (5, 4), (-2, -1), -1, (3, 2, 5, 4)),
]
RMS_CASES = [AXIS_CASES[1], AXIS_CASES[2], AXIS_CASES[4]]


def _features(in_size, feature_axes):
    axes = (feature_axes,) if isinstance(feature_axes, int) else feature_axes
    shape = tuple(in_size[a] for a in axes)
    return shape, int(np.prod(shape))


@pytest.mark.parametrize("fast", [False, True], ids=["two-pass", "fast-variance"])
@pytest.mark.parametrize("shape, in_size, red, feat, mask_shape", AXIS_CASES)
def test_layer_norm(shape, in_size, red, feat, mask_shape, fast, rng):
    feature_shape, num_features = _features(in_size, feat)
    scale, bias = random_params(rng, feature_shape)
    peer = nnx.LayerNorm(num_features, reduction_axes=red, feature_axes=feat, epsilon=1e-5,
                         use_fast_variance=fast, rngs=nnx.Rngs(0))
    set_flax(peer, "scale", scale)
    set_flax(peer, "bias", bias)
    ours = brainnorm.LayerNorm(in_size, reduction_axes=red, feature_axes=feat, epsilon=1e-5, use_fast_variance=fast,
                               scale_init=scale, bias_init=bias)
    red_x = tuple(a % len(shape) for a in np.atleast_1d(red))
    cot = sample(rng, shape, 0.0, 1.0)
    for step in range(2):
        x = sample(rng, shape, 0.5 + step, 1.5)
        mask = None if mask_shape is None else random_mask(rng, mask_shape, [a for a in red_x])
        dp, dp_f = compare("LayerNorm", ours, peer, x, cot, mask)
        sgd(ours, dp, LR)
        flax_sgd(peer, dp_f, LR)


@pytest.mark.parametrize("fast", [False, True], ids=["two-pass", "fast-variance"])
@pytest.mark.parametrize("shape, in_size, red, feat, mask_shape", RMS_CASES)
def test_rms_norm(shape, in_size, red, feat, mask_shape, fast, rng):
    feature_shape, num_features = _features(in_size, feat)
    scale, _ = random_params(rng, feature_shape)
    peer = nnx.RMSNorm(num_features, reduction_axes=red, feature_axes=feat, epsilon=1e-5, use_fast_variance=fast,
                       rngs=nnx.Rngs(0))
    set_flax(peer, "scale", scale)
    ours = brainnorm.RMSNorm(in_size, reduction_axes=red, feature_axes=feat, epsilon=1e-5, use_fast_variance=fast,
                             scale_init=scale)
    red_x = tuple(a % len(shape) for a in np.atleast_1d(red))
    cot = sample(rng, shape, 0.0, 1.0)
    for step in range(2):
        x = sample(rng, shape, 0.5 + step, 1.5)
        mask = None if mask_shape is None else random_mask(rng, mask_shape, list(red_x))
        dp, dp_f = compare("RMSNorm", ours, peer, x, cot, mask, param_attr="scale")
        sgd(ours, dp, LR)
        flax_sgd(peer, dp_f, LR)


# --------------------------------------------------------------------------- GroupNorm / InstanceNorm

GN_CASES = [
    # (x shape, groups, group_size, masked); flax's default reduction: every axis but the first
    ((4, 5, 6), 3, None, False),
    ((4, 5, 6), None, 2, True),
    ((3, 4, 4, 6), 3, None, True),
    ((5, 8), 4, None, True),
]


@pytest.mark.parametrize("fast", [False, True], ids=["two-pass", "fast-variance"])
@pytest.mark.parametrize("shape, groups, group_size, masked", GN_CASES)
def test_group_norm(shape, groups, group_size, masked, fast, rng):
    channels = shape[-1]
    scale, bias = random_params(rng, channels)
    peer = nnx.GroupNorm(channels, num_groups=groups, group_size=group_size, epsilon=1e-5, use_fast_variance=fast,
                         rngs=nnx.Rngs(0))
    set_flax(peer, "scale", scale)
    set_flax(peer, "bias", bias)
    ours = brainnorm.GroupNorm(shape[1:], -1, groups, group_size=group_size, epsilon=1e-5, use_fast_variance=fast,
                               scale_init=scale, bias_init=bias)
    cot = sample(rng, shape, 0.0, 1.0)
    for step in range(2):
        # Both sides run the one-pass variance E[x^2] - E[x]^2 when fast. With an offset, masked groups of two
        # channels with few valid elements lose the variance to cancellation (E[x]^2 >> var), and each side's
        # rounding (which depends on the summation order: brainnorm sums per channel, then per group) shows
        # in the output and, through rsqrt(var + 1e-5), in the gradients by a few percent: a comparison of
        # rounding, not of the layers. Fast and masked, the data are centred, so that the one-pass variance
        # is well conditioned and outputs and gradients are compared at the same ATOL and GRAD_TOL as every other
        # case.
        offset = 0.0 if (fast and masked) else 0.5 + step
        x = sample(rng, shape, offset, 1.5)
        mask = None
        if masked:  # every (sample, group) keeps its first element
            mask = rng.random(shape) < 0.7
            mask[(slice(None),) + (0,) * (len(shape) - 2) + (slice(None),)] = True
        dp, dp_f = compare("GroupNorm", ours, peer, x, cot, mask, atol=ATOL, grad_tol=GRAD_TOL)
        sgd(ours, dp, LR)
        flax_sgd(peer, dp_f, LR)


IN_CASES = [
    # (x shape, masked, affine)
    ((4, 7, 3), False, True),
    ((3, 4, 5, 2), True, True),
    ((3, 4, 5, 2), False, False),
]


@pytest.mark.parametrize("fast", [False, True], ids=["two-pass", "fast-variance"])
@pytest.mark.parametrize("shape, masked, affine", IN_CASES)
def test_instance_norm(shape, masked, affine, fast, rng):
    channels = shape[-1]
    scale, bias = random_params(rng, channels)
    peer = nnx.InstanceNorm(channels, epsilon=1e-5, use_scale=affine, use_bias=affine, use_fast_variance=fast,
                            rngs=nnx.Rngs(0))
    ours = brainnorm.InstanceNorm(shape[1:], epsilon=1e-5, use_scale=affine, use_bias=affine, use_fast_variance=fast,
                                  scale_init=scale, bias_init=bias)
    if affine:
        set_flax(peer, "scale", scale)
        set_flax(peer, "bias", bias)
    cot = sample(rng, shape, 0.0, 1.0)
    for step in range(2):
        x = sample(rng, shape, 0.5 + step, 1.5)
        mask = random_mask(rng, shape, range(1, len(shape) - 1)) if masked else None
        dp, dp_f = compare("InstanceNorm", ours, peer, x, cot, mask)
        if affine:
            sgd(ours, dp, LR)
            flax_sgd(peer, dp_f, LR)


# --------------------------------------------------------------------------- BatchNorm

BN_CASES = [
    # (x shape, brainnorm class, feature_axis within in_size, flax axis, masked)
    ((8, 3), "BatchNorm0d", -1, -1, True),
    ((4, 5, 3), "BatchNorm1d", -1, -1, True),
    ((4, 3, 5), "BatchNorm1d", 0, 1, False),
    ((3, 4, 4, 2), "BatchNorm2d", -1, -1, True),
    ((2, 3, 2, 3, 2), "BatchNorm3d", -1, -1, False),
]


@pytest.mark.parametrize("fast", [False, True], ids=["two-pass", "fast-variance"])
@pytest.mark.parametrize("shape, cls, feature_axis, flax_axis, masked", BN_CASES)
def test_batch_norm(shape, cls, feature_axis, flax_axis, masked, fast, rng):
    channels = shape[flax_axis]
    scale, bias = random_params(rng, channels)
    peer = nnx.BatchNorm(channels, axis=flax_axis, momentum=0.9, epsilon=1e-5, use_running_average=False,
                         use_fast_variance=fast, rngs=nnx.Rngs(0))
    set_flax(peer, "scale", scale)
    set_flax(peer, "bias", bias)
    ours = getattr(brainnorm, cls)(shape[1:], feature_axis, momentum=0.9, epsilon=1e-5, use_fast_variance=fast,
                                   scale_initializer=scale, bias_initializer=bias)
    reduce_axes = [a for a in range(len(shape)) if a != flax_axis % len(shape)]
    cot = sample(rng, shape, 0.0, 1.0)
    for step in range(STEPS):
        x = sample(rng, shape, 0.5 + 0.4 * step, 1.0 + 0.2 * step)
        mask = random_mask(rng, shape, reduce_axes) if masked else None
        dp, dp_f = compare(cls, ours, peer, x, cot, mask, flax_kwargs={"use_running_average": False}, fit=True)
        sgd(ours, dp, LR)
        flax_sgd(peer, dp_f, LR)
        check(PEER, cls, "running_mean", np.ravel(ours.running_mean.value), peer.mean[...], atol=ATOL)
        check(PEER, cls, "running_var", np.ravel(ours.running_var.value), peer.var[...], atol=ATOL)
    x = sample(rng, shape, 1.0, 1.3)
    compare(cls, ours, peer, x, cot, None, flax_kwargs={"use_running_average": True}, fit=False)
    assert int(ours.num_batches_tracked.value) == STEPS


# --------------------------------------------------------------------------- documented differences
#
# SPEC section 6, item 2: a row whose mask is all False. brainnorm: normalized
# value 0 (output = bias), finite gradients. flax: 0 / 0 = NaN.


def _fully_masked_row_case(rng):
    x = sample(rng, (4, 6), 0.5, 1.5)
    mask = random_mask(rng, (4, 6), [1])
    mask[2] = False  # row 2 has no valid element
    scale, bias = random_params(rng, 6)
    return x, mask, scale, bias


def test_fully_masked_row_brainnorm_matches_reference(rng):
    x, mask, scale, bias = _fully_masked_row_case(rng)
    ln = brainnorm.LayerNorm(6, epsilon=1e-5, scale_init=scale, bias_init=bias)
    y, dx, dp = brainnorm_grads(ln, x, np.ones_like(x), mask)
    expected = R.normalize(x, -1, mask, eps=1e-5, scale=scale, bias=bias)
    check("reference", "LayerNorm fully masked row", "output", y, expected, atol=REF_ATOL)
    np.testing.assert_allclose(y[2], bias, atol=REF_ATOL)
    assert np.isfinite(dx).all()
    assert all(np.isfinite(g).all() for g in dp[("weight",)].values())

    rms = brainnorm.RMSNorm(6, epsilon=1e-5, scale_init=scale)
    y, dx, dp = brainnorm_grads(rms, x, np.ones_like(x), mask)
    expected = R.normalize(x, -1, mask, eps=1e-5, scale=scale, use_mean=False)
    check("reference", "RMSNorm fully masked row", "output", y, expected, atol=REF_ATOL)
    assert np.isfinite(dx).all() and np.isfinite(dp[("scale",)]["scale"]).all()


def test_flax_defect_fully_masked_row_gives_nan(rng):
    """flax.nnx LayerNorm: NaN output and NaN parameter gradients for a fully masked row."""
    x, mask, scale, bias = _fully_masked_row_case(rng)
    peer = nnx.LayerNorm(6, epsilon=1e-5, rngs=nnx.Rngs(0))
    set_flax(peer, "scale", scale)
    set_flax(peer, "bias", bias)
    y_f, _, dp_f = flax_grads(peer, x, np.ones_like(x), mask)
    if np.isfinite(y_f[2]).all():
        pytest.skip("this flax no longer gives NaN for a fully masked row (SPEC section 6, item 2)")
    assert np.isnan(y_f[2]).all()
    assert np.isnan(dp_f["scale"]).any() or np.isnan(dp_f["bias"]).any()
    # The other rows agree with brainnorm.
    ln = brainnorm.LayerNorm(6, epsilon=1e-5, scale_init=scale, bias_init=bias)
    y = np.asarray(ln(jnp.asarray(x), mask=jnp.asarray(mask)))
    rows = [0, 1, 3]
    check(PEER, "LayerNorm fully masked row", "output (valid rows)", y[rows], y_f[rows], atol=ATOL)


# SPEC section 6, item 4: GroupNorm per-step statistics on (B, T, C) input
# (brainnorm GroupNorm(in_size=(C,)): B and T are batch axes). flax.nnx with
# reduction_axes=-1 computes per-(b, t) statistics of shape (B, T, G) and then
# repeats them along axis 1 (time) instead of the group axis, silently.
# Unbatched (C,) input fails in flax.


def _per_step_group_case(rng):
    return sample(rng, (2, 3, 6), 0.5, 1.5), 3


def test_group_norm_per_step_brainnorm_matches_reference(rng):
    x, groups = _per_step_group_case(rng)
    gn = brainnorm.GroupNorm(6, -1, groups, epsilon=1e-5)
    y = np.asarray(gn(jnp.asarray(x)))
    check("reference", "GroupNorm (B, T, C) per step", "output", y,
          R.group_normalize(x, groups, -1, (-1,), eps=1e-5), atol=REF_ATOL)
    # Unbatched sample.
    y1 = np.asarray(gn(jnp.asarray(x[0, 0])))
    check("reference", "GroupNorm unbatched", "output", y1,
          R.group_normalize(x[0, 0][None], groups, -1, (-1,), eps=1e-5)[0], atol=REF_ATOL)


def test_flax_defect_group_norm_repeats_statistics_along_axis_1(rng):
    x, groups = _per_step_group_case(rng)
    expected = R.group_normalize(x, groups, -1, (-1,), eps=1e-5)
    peer = nnx.GroupNorm(6, num_groups=groups, reduction_axes=-1, epsilon=1e-5, rngs=nnx.Rngs(0))
    y_f = np.asarray(peer(jnp.asarray(x)))
    if np.allclose(y_f, expected, atol=1e-3):
        pytest.skip("this flax computes per-step GroupNorm statistics correctly (SPEC section 6, item 4)")
    assert np.max(np.abs(y_f - expected)) > 1e-2
    with pytest.raises(ValueError, match="axis 1"):  # unbatched input: jnp.repeat along a missing axis 1
        peer(jnp.asarray(x[0, 0]))
