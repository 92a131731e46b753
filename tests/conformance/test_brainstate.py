"""brainnorm against brainstate.nn 0.5.4, the library it is a drop-in for.

Every normalization class of ``brainstate.nn`` (BatchNorm0d/1d/2d/3d,
LayerNorm, RMSNorm, GroupNorm) is constructed with the same keyword
arguments on both sides, brainstate-only ones included (``affine``,
``bias_initializer``, ``scale_initializer``, ``mean_type``, ``param_type``,
``name``, ``dtype``), and compared on the same inputs: outputs, gradients of
``sum(y * c)`` with respect to the input and every parameter, attribute
names and state types, and for BatchNorm the running statistics over
``STEPS`` training steps (``environ.context(fit=True)``, each step followed
by the same SGD update on both sides) and evaluation (``fit=False``).
``use_fast_variance`` is passed explicitly, both ways (brainstate defaults to
True, brainnorm to False). brainstate counts LayerNorm/RMSNorm
``reduction_axes`` on ``x`` and brainnorm within ``in_size``: negative axes
mean the same on both sides and are used here.

The documented exceptions (SPEC section 6) are at the end: brainnorm is
asserted against the float64 NumPy reference of ``tests/reference.py``, and
separate ``test_brainstate_defect_*`` tests show brainstate's behaviour; they
skip, rather than fail, if a future brainstate no longer has the defect.

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

ATOL = 1e-5
GRAD_TOL = 1e-4
REF_ATOL = 1e-5
STEPS = 5
LR = 0.01
PEER = "brainstate"

NORMALIZATION_CLASSES = {"BatchNorm0d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "RMSNorm",
                         "GroupNorm"}


class TraceParam(brainnorm.NormalizationParamState):
    """A user ParamState subclass (as eligibility-trace tools pass): honoured on both sides."""


def test_every_brainstate_normalization_class_has_a_counterpart():
    """The classes compared here are all of brainstate.nn's normalization layers."""
    found = {name for name in brainstate.nn.__all__
             if name.endswith("Norm") or "BatchNorm" in name or name.endswith("Norm0d")}
    found = {n for n in found if isinstance(getattr(brainstate.nn, n), type)
             and issubclass(getattr(brainstate.nn, n), brainstate.nn.Module)}
    assert found == NORMALIZATION_CLASSES, found
    for name in found:
        assert issubclass(getattr(brainnorm, name), brainstate.nn.Module)


def _compare_call(name, ours, peer, x, cot, mask, *, param_attr="weight", fit=None, same_param_shape=True,
                  conditioning=1.0):
    """``conditioning``: see :func:`_one_pass_conditioning`; its rounding bound is added to each tolerance."""

    def slack(reference):  # float32 rounding amplified by the one-pass variance's conditioning
        eps = float(np.finfo(np.float32).eps)
        return 8 * eps * (conditioning - 1.0) * float(np.max(np.abs(reference), initial=1.0))

    """One forward/backward through both; parameter gradients compared entry by entry."""
    if fit is None:
        y_p, dx_p, dp_p = brainnorm_grads(peer, x, cot, mask)
        y, dx, dp = brainnorm_grads(ours, x, cot, mask)
    else:
        with brainstate.environ.context(fit=fit):
            y_p, dx_p, dp_p = brainnorm_grads(peer, x, cot, mask)
            y, dx, dp = brainnorm_grads(ours, x, cot, mask)
    check(PEER, name, "output", y, y_p, atol=ATOL + slack(y_p))
    check(PEER, name, "grad x", dx, dx_p, atol=GRAD_TOL + slack(dx_p), rtol=GRAD_TOL)
    assert set(dp) == set(dp_p), (set(dp), set(dp_p))
    for path in dp_p:
        assert set(dp[path]) == set(dp_p[path])
        for key in dp_p[path]:
            if same_param_shape:
                assert dp[path][key].shape == dp_p[path][key].shape
            check(PEER, name, "grad params", np.ravel(dp[path][key]), np.ravel(dp_p[path][key]),
                  atol=GRAD_TOL + slack(dp_p[path][key]), rtol=GRAD_TOL)
    sgd(ours, dp, LR)
    sgd(peer, dp_p, LR)
    for key, value in getattr(peer, param_attr).value.items():
        check(PEER, name, "params", np.ravel(getattr(ours, param_attr).value[key]), np.ravel(value),
              atol=ATOL + slack(value))


def _feature_params(rng, in_size, feature_axes):
    axes = {a % len(in_size) for a in np.atleast_1d(feature_axes)}
    shape = tuple(d if i in axes else 1 for i, d in enumerate(in_size))
    scale = (1.0 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    bias = (0.2 * rng.standard_normal(shape)).astype(np.float32)
    return jnp.asarray(scale), jnp.asarray(bias)


# --------------------------------------------------------------------------- BatchNorm

BN_CASES = [
    # (class, in_size, feature_axis, batch (None: unbatched input), masked, mean_type, use_fast_variance)
    ("BatchNorm0d", (5,), -1, 8, False, brainstate.BatchState, True),
    ("BatchNorm0d", (5,), -1, 8, True, brainstate.ShortTermState, False),
    ("BatchNorm1d", (6, 3), -1, 4, False, brainstate.ShortTermState, False),
    ("BatchNorm1d", (3, 6), 0, 4, True, brainstate.BatchState, True),
    ("BatchNorm2d", (4, 5, 3), -1, 3, False, brainstate.BatchState, False),
    ("BatchNorm2d", (4, 5, 3), -1, None, False, brainstate.ShortTermState, True),
    ("BatchNorm2d", (3, 4, 5), 0, 3, True, brainstate.ShortTermState, False),
    ("BatchNorm3d", (3, 2, 4, 2), -1, 2, False, brainstate.BatchState, True),
    ("BatchNorm3d", (2, 3, 2, 3), 0, 2, True, brainstate.BatchState, False),
]


@pytest.mark.parametrize("cls, in_size, feature_axis, batch, masked, mean_type, fast", BN_CASES)
def test_batch_norm(cls, in_size, feature_axis, batch, masked, mean_type, fast, rng):
    scale, bias = _feature_params(rng, in_size, feature_axis)
    kwargs = dict(track_running_stats=True, epsilon=1e-4, momentum=0.8, affine=True, bias_initializer=bias,
                  scale_initializer=scale, axis_name=None, axis_index_groups=None, use_fast_variance=fast,
                  name="bn", dtype=jnp.float32, param_type=TraceParam, mean_type=mean_type)
    peer = getattr(brainstate.nn, cls)(in_size, feature_axis, **kwargs)
    ours = getattr(brainnorm, cls)(in_size, feature_axis, **kwargs)
    assert ours.name == peer.name == "bn"
    assert type(ours.weight) is type(peer.weight) is TraceParam
    assert type(ours.running_mean) is type(peer.running_mean) is mean_type
    assert type(ours.running_var) is type(peer.running_var) is mean_type
    shape = in_size if batch is None else (batch,) + in_size
    feature_x = (feature_axis % len(in_size)) + len(shape) - len(in_size)
    reduce_axes = [a for a in range(len(shape)) if a != feature_x]
    cot = sample(rng, shape, 0.0, 1.0)
    for step in range(STEPS):
        x = sample(rng, shape, 0.5 + 0.4 * step, 1.0 + 0.2 * step)
        mask = random_mask(rng, shape, reduce_axes) if masked else None
        _compare_call(cls, ours, peer, x, cot, mask, fit=True)
        for stat in ("running_mean", "running_var"):
            check(PEER, cls, stat, np.ravel(getattr(ours, stat).value),
                  _brainstate_running(getattr(peer, stat).value, in_size, feature_axis), atol=ATOL)
    running = np.asarray(ours.running_mean.value), np.asarray(ours.running_var.value)
    x = sample(rng, shape, 1.0, 1.3)
    if peer.running_mean.value.shape == ours.running_mean.value.shape:
        _compare_call(cls, ours, peer, x, cot, None, fit=False)
    else:  # brainstate cannot evaluate (see the defect below): brainnorm against the reference
        with brainstate.environ.context(fit=False):
            y = np.asarray(ours(jnp.asarray(x)))
        expected = R.apply_stats(x, running[0], running[1], 1e-4, ours.weight.value["scale"],
                                 ours.weight.value["bias"])
        check("reference", f"{cls} channels first, eval", "output", y, expected, atol=REF_ATOL)
    np.testing.assert_array_equal(ours.running_mean.value, running[0])
    np.testing.assert_array_equal(ours.running_var.value, running[1])


def _brainstate_running(value, in_size, feature_axis):
    """brainstate's running statistic as a vector of channels.

    brainstate 0.5.4 adds batch statistics of shape ``(C,)`` to a running
    state of shape ``in_size`` with 1 at non-feature axes; when the feature
    axis is not the last one the state broadcasts to a larger shape, e.g.
    ``(C, 1) + (C,) -> (C, C)``, in which each channel's correct value sits on
    the diagonal of (feature axis, last axis); see
    ``test_brainstate_defect_channels_first_running_stats``.
    """
    value = np.asarray(value)
    k = feature_axis % len(in_size)
    if k == len(in_size) - 1 or value.size == in_size[k]:
        return np.ravel(value)
    return np.ravel(np.diagonal(value, axis1=k, axis2=-1))


# --------------------------------------------------------------------------- LayerNorm / RMSNorm

AXIS_CASES = [
    # (in_size, reduction_axes, feature_axes, x shape, mask shape or None, use_fast_variance)
    ((6, 8), -1, -1, (4, 6, 8), None, True),
    ((6, 8), -1, -1, (4, 6, 8), (4, 6, 8), False),
    ((6, 8), -1, -1, (4, 6, 8), (4, 6, 8), True),
    ((6, 8), (-2, -1), (-2, -1), (4, 6, 8), (4, 6, 1), False),
    ((6, 8), (-2, -1), (-2, -1), (4, 6, 8), (4, 6, 1), True),
    ((6, 8), (-2, -1), -1, (6, 8), None, False),  # unbatched
    ((3, 4, 5), (-3, -2, -1), -1, (2, 3, 4, 5), (2, 3, 4, 5), True),
]
# (use_bias, use_scale): all on every case, the other combinations on one.
LN_CASES = [case + (True, True) for case in AXIS_CASES] + [
    AXIS_CASES[1] + (False, True),
    AXIS_CASES[4] + (True, False),
    AXIS_CASES[0] + (False, False),
]


@pytest.mark.parametrize("in_size, red, feat, shape, mask_shape, fast, use_bias, use_scale", LN_CASES)
def test_layer_norm(in_size, red, feat, shape, mask_shape, fast, use_bias, use_scale, rng):
    scale, bias = _feature_params(rng, in_size, feat)
    kwargs = dict(reduction_axes=red, feature_axes=feat, epsilon=1e-5, use_bias=use_bias, use_scale=use_scale,
                  bias_init=bias, scale_init=scale, axis_name=None, axis_index_groups=None, use_fast_variance=fast,
                  dtype=jnp.float32, param_type=TraceParam)
    peer = brainstate.nn.LayerNorm(in_size, **kwargs)
    ours = brainnorm.LayerNorm(in_size, **kwargs)
    if use_bias or use_scale:
        assert type(ours.weight) is type(peer.weight) is TraceParam
        assert set(ours.weight.value) == set(peer.weight.value)
    red_x = [a % len(shape) for a in np.atleast_1d(red)]
    cot = sample(rng, shape, 0.0, 1.0)
    for step in range(2):
        x = sample(rng, shape, 0.5 + step, 1.5)
        mask = None if mask_shape is None else random_mask(rng, mask_shape, red_x)
        if use_bias or use_scale:
            _compare_call("LayerNorm", ours, peer, x, cot, mask)
        else:
            assert ours.weight is None and peer.weight is None
            _compare_call_no_params("LayerNorm", ours, peer, x, cot, mask)


RMS_CASES = [case + (True,) for case in AXIS_CASES[::2] + AXIS_CASES[3:4]] + [AXIS_CASES[1] + (False,)]


@pytest.mark.parametrize("in_size, red, feat, shape, mask_shape, fast, use_scale", RMS_CASES)
def test_rms_norm(in_size, red, feat, shape, mask_shape, fast, use_scale, rng):
    scale, _ = _feature_params(rng, in_size, feat)
    kwargs = dict(reduction_axes=red, feature_axes=feat, epsilon=1e-5, use_scale=use_scale, scale_init=scale,
                  axis_name=None, axis_index_groups=None, use_fast_variance=fast, dtype=jnp.float32,
                  param_type=TraceParam)
    peer = brainstate.nn.RMSNorm(in_size, **kwargs)
    ours = brainnorm.RMSNorm(in_size, **kwargs)
    # brainstate keeps RMSNorm's parameter in ``scale`` (a dict with 'scale').
    if use_scale:
        assert type(ours.scale) is type(peer.scale) is TraceParam
        assert set(ours.scale.value) == set(peer.scale.value) == {"scale"}
    else:
        assert ours.scale is None and peer.scale is None
    red_x = [a % len(shape) for a in np.atleast_1d(red)]
    cot = sample(rng, shape, 0.0, 1.0)
    for step in range(2):
        x = sample(rng, shape, 0.5 + step, 1.5)
        mask = None if mask_shape is None else random_mask(rng, mask_shape, red_x)
        if use_scale:
            _compare_call("RMSNorm", ours, peer, x, cot, mask, param_attr="scale")
        else:
            _compare_call_no_params("RMSNorm", ours, peer, x, cot, mask)


def _compare_call_no_params(name, ours, peer, x, cot, mask):
    y_p, dx_p, _ = brainnorm_grads(peer, x, cot, mask)
    y, dx, _ = brainnorm_grads(ours, x, cot, mask)
    check(PEER, name, "output", y, y_p, atol=ATOL)
    check(PEER, name, "grad x", dx, dx_p, atol=GRAD_TOL, rtol=GRAD_TOL)


# --------------------------------------------------------------------------- GroupNorm

GN_CASES = [
    # (channels, num_groups, group_size, batch shape, masked, use_fast_variance)
    (6, 3, None, (5,), False, True),
    (6, 3, None, (5,), False, False),
    (6, None, 3, (5,), True, False),
    (8, 2, None, (4,), True, True),
    (8, 8, None, (4,), False, False),
]


@pytest.mark.parametrize("channels, groups, group_size, batch, masked, fast", GN_CASES)
def test_group_norm(channels, groups, group_size, batch, masked, fast, rng):
    in_size = (channels,)
    scale, bias = _feature_params(rng, in_size, -1)
    kwargs = dict(group_size=group_size, epsilon=1e-5, use_bias=True, use_scale=True, bias_init=bias,
                  scale_init=scale, reduction_axes=None, axis_name=None, axis_index_groups=None,
                  use_fast_variance=fast, dtype=jnp.float32, param_type=TraceParam)
    peer = brainstate.nn.GroupNorm(in_size, -1, groups, **kwargs)
    ours = brainnorm.GroupNorm(in_size, -1, groups, **kwargs)
    assert (ours.num_groups, ours.group_size) == (peer.num_groups, peer.group_size)
    shape = batch + in_size
    cot = sample(rng, shape, 0.0, 1.0)
    for step in range(2):
        x = sample(rng, shape, 0.5 + step, 1.5)
        mask = None
        if masked:  # every (sample, group) keeps its first two channels
            mask = rng.random(shape) < 0.7
            mask[..., :: ours.group_size] = True
            mask[..., 1:: ours.group_size] = True
        conditioning = _one_pass_conditioning(x, mask, ours.num_groups) if fast else 1.0
        _compare_call("GroupNorm", ours, peer, x, cot, mask, conditioning=conditioning)


def _one_pass_conditioning(x, mask, num_groups):
    """``max(1, E[x^2] / Var[x])`` over the groups (float64, valid elements only).

    The one-pass variance ``E[x^2] - E[x]^2`` (``use_fast_variance=True``,
    on both sides) loses this factor in relative accuracy, so two correct
    implementations differ by up to it times their rounding (1 for the
    default, shifted statistics: no slack).
    """
    x = np.asarray(x, np.float64).reshape(x.shape[:-1] + (num_groups, -1))
    w = np.ones(x.shape) if mask is None else np.asarray(mask, np.float64).reshape(x.shape)
    n = np.maximum(w.sum(-1), 1)
    second = (w * x * x).sum(-1) / n
    var = second - ((w * x).sum(-1) / n) ** 2
    return float(max(1.0, np.max(second / np.maximum(var, 1e-12))))


def test_group_norm_sequence_input_equivalence(rng):
    """brainstate GroupNorm((C,)) on (B, T, C) reduces over T as well: brainnorm GroupNorm((T, C))."""
    scale, bias = _feature_params(rng, (6,), -1)
    kwargs = dict(epsilon=1e-5, bias_init=bias, scale_init=scale, use_fast_variance=False)
    peer = brainstate.nn.GroupNorm((6,), -1, 3, **kwargs)
    ours = brainnorm.GroupNorm((5, 6), -1, 3, **kwargs)
    x = sample(rng, (4, 5, 6), 0.5, 1.5)
    # Parameters: brainnorm (1, C) (in_size with 1 at non-feature axes), brainstate (C,).
    _compare_call("GroupNorm (B, T, C) over T", ours, peer, x, sample(rng, x.shape, 0.0, 1.0), None,
                  same_param_shape=False)


# --------------------------------------------------------------------------- documented exceptions
#
# SPEC section 6, item 5. brainstate BatchNorm: track_running_stats=False
# returns the input unchanged; affine=True requires track_running_stats; a
# call without environ['fit'] raises KeyError; positive axes change meaning
# with the batch rank. brainnorm normalizes with batch statistics, accepts
# affine without tracking, trains when 'fit' is unset, and counts axes within
# in_size.


def _bn_data(rng):
    return sample(rng, (6, 4, 3), 0.5, 1.5)  # (B, L, C), BatchNorm1d((4, 3))


def test_track_running_stats_false_brainnorm_normalizes(rng):
    x = _bn_data(rng)
    expected = R.normalize(x, (0, 1), eps=1e-5)
    for fit in (True, False):
        with brainstate.environ.context(fit=fit):
            bn = brainnorm.BatchNorm1d((4, 3), track_running_stats=False, affine=False)
            y = np.asarray(bn(jnp.asarray(x)))
        check("reference", "BatchNorm1d track_running_stats=False", "output", y, expected, atol=REF_ATOL)
        assert bn.running_mean is None and bn.running_var is None


# The defect tests below assert the peer's defect and brainnorm's correct value on the same input: each fails
# if brainnorm is wrong, and also if a new brainstate no longer has the defect (then SPEC section 6 and these
# tests are to be revised), instead of skipping.


def test_brainstate_defect_track_running_stats_false_returns_input(rng):
    x = _bn_data(rng)
    expected = R.normalize(x, (0, 1), eps=1e-5)
    peer = brainstate.nn.BatchNorm1d((4, 3), track_running_stats=False, affine=False)
    ours = brainnorm.BatchNorm1d((4, 3), track_running_stats=False, affine=False)
    with brainstate.environ.context(fit=True):
        y_peer = np.asarray(peer(jnp.asarray(x)))
        y_ours = np.asarray(ours(jnp.asarray(x)))
    np.testing.assert_array_equal(y_peer, x)  # the defect: the input comes back unchanged
    check("reference", "BatchNorm1d track_running_stats=False", "output (vs defect)", y_ours, expected,
          atol=REF_ATOL)
    assert not np.allclose(y_ours, x, atol=1e-2)


def test_affine_without_tracking_brainnorm(rng):
    x = _bn_data(rng)
    scale, bias = _feature_params(rng, (4, 3), -1)
    bn = brainnorm.BatchNorm1d((4, 3), track_running_stats=False, affine=True, scale_initializer=scale,
                               bias_initializer=bias)
    with brainstate.environ.context(fit=False):
        y = np.asarray(bn(jnp.asarray(x)))
    expected = R.normalize(x, (0, 1), eps=1e-5, scale=scale, bias=bias)
    check("reference", "BatchNorm1d affine, no tracking", "output", y, expected, atol=REF_ATOL)


def test_brainstate_defect_affine_requires_tracking(rng):
    with pytest.raises(AssertionError):
        brainstate.nn.BatchNorm1d((4, 3), track_running_stats=False, affine=True)
    ours = brainnorm.BatchNorm1d((4, 3), track_running_stats=False, affine=True)
    x = _bn_data(rng)
    with brainstate.environ.context(fit=True):
        y = np.asarray(ours(jnp.asarray(x)))
    check("reference", "BatchNorm1d affine, no tracking", "output (vs defect)", y, R.normalize(x, (0, 1), eps=1e-5),
          atol=REF_ATOL)


def _without_fit():
    """Remove a globally set environ['fit'] for this test (restored by the caller's finalizer)."""
    if brainstate.environ.get("fit", None) is None:
        return None
    return brainstate.environ.pop("fit")


@pytest.fixture
def no_fit():
    saved = _without_fit()
    assert brainstate.environ.get("fit", None) is None
    yield
    if saved is not None:
        brainstate.environ.set(fit=saved)


def test_brainnorm_trains_without_fit(rng, no_fit):
    x = _bn_data(rng)
    bn = brainnorm.BatchNorm1d((4, 3), momentum=0.9)
    y = np.asarray(bn(jnp.asarray(x)))
    check("reference", "BatchNorm1d without fit", "output", y, R.normalize(x, (0, 1), eps=1e-5), atol=REF_ATOL)
    mean, var = R.running_update(np.zeros(3), np.ones(3), x, (0, 1), 0.9)
    check("reference", "BatchNorm1d without fit", "running_mean", np.ravel(bn.running_mean.value), mean,
          atol=REF_ATOL)
    check("reference", "BatchNorm1d without fit", "running_var", np.ravel(bn.running_var.value), var, atol=REF_ATOL)
    assert int(bn.num_batches_tracked.value) == 1


def test_brainstate_defect_keyerror_without_fit(rng, no_fit):
    x = _bn_data(rng)
    peer = brainstate.nn.BatchNorm1d((4, 3), momentum=0.9)
    with pytest.raises(KeyError):
        peer(jnp.asarray(x))
    ours = brainnorm.BatchNorm1d((4, 3), momentum=0.9)
    check("reference", "BatchNorm1d without fit", "output (vs defect)", np.asarray(ours(jnp.asarray(x))),
          R.normalize(x, (0, 1), eps=1e-5), atol=REF_ATOL)


def test_positive_axes_count_within_in_size(rng):
    """brainnorm LayerNorm((6, 8), reduction_axes=1): the 8-axis, batched or not."""
    x = sample(rng, (4, 6, 8), 0.5, 1.5)
    ours = brainnorm.LayerNorm((6, 8), reduction_axes=1, feature_axes=1, epsilon=1e-5)
    expected = R.normalize(x, -1, eps=1e-5)
    check("reference", "LayerNorm positive axis", "output (batched)", np.asarray(ours(jnp.asarray(x))), expected,
          atol=REF_ATOL)
    check("reference", "LayerNorm positive axis", "output (unbatched)", np.asarray(ours(jnp.asarray(x[0]))),
          expected[0], atol=REF_ATOL)


def test_brainstate_defect_positive_axes_follow_batch_rank(rng):
    x = sample(rng, (4, 6, 8), 0.5, 1.5)
    peer = brainstate.nn.LayerNorm((6, 8), reduction_axes=1, feature_axes=-1, epsilon=1e-5, use_fast_variance=False)
    batched = np.asarray(peer(jnp.asarray(x)))[0]
    unbatched = np.asarray(peer(jnp.asarray(x[0])))
    assert not np.allclose(batched, unbatched, atol=1e-2)  # the defect: one call, two meanings of axis 1
    ours = brainnorm.LayerNorm((6, 8), reduction_axes=1, feature_axes=1, epsilon=1e-5)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x)))[0], np.asarray(ours(jnp.asarray(x[0]))),
                               atol=ATOL)
    # Batched: axis 1 of x is the 6-axis; unbatched: axis 1 of x is the 8-axis.
    check(PEER, "LayerNorm positive axis (defect)", "batched", batched, R.normalize(x, 1, eps=1e-5)[0], atol=ATOL)
    check(PEER, "LayerNorm positive axis (defect)", "unbatched", unbatched, R.normalize(x[0], 1, eps=1e-5),
          atol=ATOL)


# SPEC section 6, item 2: a BatchNorm channel without any valid element.
# brainnorm: finite output, running statistics of that channel unchanged.
# brainstate: NaN written into the running statistics.


def _empty_channel_case(rng):
    x = _bn_data(rng)
    mask = random_mask(rng, x.shape, [0, 1])
    mask[..., 1] = False  # channel 1 has no valid element in the batch
    return x, mask


def test_empty_channel_brainnorm_keeps_running_stats(rng):
    x, mask = _empty_channel_case(rng)
    bn = brainnorm.BatchNorm1d((4, 3), momentum=0.9)
    with brainstate.environ.context(fit=True):
        y, dx, dp = brainnorm_grads(bn, x, np.ones_like(x), mask)
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    assert all(np.isfinite(g).all() for g in dp[("weight",)].values())
    mean, var = R.running_update(np.zeros(3), np.ones(3), x, (0, 1), 0.9, mask=mask)
    check("reference", "BatchNorm1d empty channel", "running_mean", np.ravel(bn.running_mean.value), mean,
          atol=REF_ATOL)
    check("reference", "BatchNorm1d empty channel", "running_var", np.ravel(bn.running_var.value), var,
          atol=REF_ATOL)
    assert float(np.ravel(bn.running_mean.value)[1]) == 0.0 and float(np.ravel(bn.running_var.value)[1]) == 1.0


def test_brainstate_defect_empty_channel_writes_nan(rng):
    x, mask = _empty_channel_case(rng)
    peer = brainstate.nn.BatchNorm1d((4, 3), momentum=0.9)
    ours = brainnorm.BatchNorm1d((4, 3), momentum=0.9)
    with brainstate.environ.context(fit=True):
        peer(jnp.asarray(x), jnp.asarray(mask))
        ours(jnp.asarray(x), jnp.asarray(mask))
    assert np.isnan(np.ravel(peer.running_mean.value)[1])  # the defect
    mean, _ = R.running_update(np.zeros(3), np.ones(3), x, (0, 1), 0.9, mask=mask)
    check("reference", "BatchNorm1d empty channel", "running_mean (vs defect)", np.ravel(ours.running_mean.value),
          mean, atol=REF_ATOL)
    assert np.isfinite(np.asarray(ours.running_mean.value)).all()


# SPEC section 6, item 4: brainstate GroupNorm refuses an in_size of rank > 1.


def test_group_norm_rank2_in_size_brainnorm(rng):
    x = sample(rng, (3, 5, 6), 0.5, 1.5)
    gn = brainnorm.GroupNorm((5, 6), -1, 3, epsilon=1e-5)
    check("reference", "GroupNorm in_size (T, C)", "output", np.asarray(gn(jnp.asarray(x))),
          R.group_normalize(x, 3, -1, (1, 2), eps=1e-5), atol=REF_ATOL)


def test_brainstate_defect_group_norm_rank2_in_size(rng):
    with pytest.raises(AssertionError):
        brainstate.nn.GroupNorm((5, 6), -1, 3)
    x = sample(rng, (3, 5, 6), 0.5, 1.5)
    check("reference", "GroupNorm in_size (T, C)", "output (vs defect)",
          np.asarray(brainnorm.GroupNorm((5, 6), -1, 3, epsilon=1e-5)(jnp.asarray(x))),
          R.group_normalize(x, 3, -1, (1, 2), eps=1e-5), atol=REF_ATOL)


# Not in the SPEC list: brainstate BatchNorm with a feature axis other than
# the last (channels first) broadcasts its running statistics to a wrong
# shape in training, (C, 1) -> (C, C), and then fails in evaluation.
# brainnorm keeps the shape (compared above, channels-first cases).


def test_brainstate_defect_channels_first_running_stats(rng):
    x = sample(rng, (4, 3, 6), 0.5, 1.5)
    peer = brainstate.nn.BatchNorm1d((3, 6), 0, momentum=0.9)
    with brainstate.environ.context(fit=True):
        peer(jnp.asarray(x))
    assert peer.running_mean.value.shape == (3, 3)  # the defect: (C, 1) broadcast to (C, C)
    with brainstate.environ.context(fit=False), pytest.raises((TypeError, ValueError)):
        peer(jnp.asarray(x))
    ours = brainnorm.BatchNorm1d((3, 6), 0, momentum=0.9)
    with brainstate.environ.context(fit=True):
        ours(jnp.asarray(x))
    assert ours.running_mean.value.shape == (3, 1)
