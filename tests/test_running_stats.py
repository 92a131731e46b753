"""Running statistics of BatchNorm and InstanceNorm over several training steps.

Every trajectory is compared step by step with float64 NumPy references
(tests/reference.py ``running_update`` and tests/reference_training.py),
never with brainnorm's own output. Conventions under test (SPEC §3 "Train
and eval", §4 BatchNorm/InstanceNorm):

* ``new = momentum * old + (1 - momentum) * batch``; ``momentum=None`` is the
  cumulative average of all batches (PyTorch), so after ``t`` steps the
  running mean is the plain average of the ``t`` batch means;
* ``unbiased_running_var=True`` scales the batch variance by ``n / (n - 1)``,
  ``n`` the valid count; normalization always uses the biased variance;
* masked positions are left out; a channel without valid entry keeps its
  running statistics; ``num_batches_tracked`` counts every training step;
* mode: ``update(use_running_average=)`` > constructor > ``environ['fit']``
  > training; evaluation normalizes with the running statistics and writes
  nothing.

Tolerance: float32 data with offsets of a few units and unit spread; running
statistics and outputs within 2e-5 absolute (+1e-5 relative) of float64.
"""

from __future__ import annotations

import brainstate
import jax
import numpy as np
import pytest

import brainnorm

from . import reference as ref
from . import reference_training as reft

ATOL = 2e-5
RTOL = 1e-5
EPS = 1e-5


def close(actual, expected, atol=ATOL, rtol=RTOL):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), atol=atol, rtol=rtol)


def snapshot(layer):
    """Copies of every state value (leaves), keyed by state path."""
    return {path: [np.array(leaf) for leaf in jax.tree_util.tree_leaves(state.value)]
            for path, state in layer.states().items()}


def assert_identical(before, after):
    assert before.keys() == after.keys()
    for path in before:
        for a, b in zip(before[path], after[path]):
            assert a.dtype == b.dtype and a.shape == b.shape, path
            assert np.array_equal(a, b), f"state {path} changed"


def make_batches(rng, steps, shape, feature_axis_x):
    """``steps`` float32 batches whose channel offsets and spreads drift over time."""
    channels = shape[feature_axis_x]
    bshape = [1] * len(shape)
    bshape[feature_axis_x] = channels
    offsets = rng.uniform(-2.0, 2.0, channels).reshape(bshape)
    spreads = rng.uniform(0.5, 2.0, channels).reshape(bshape)
    return [((offsets + 0.4 * t) + spreads * (1 + 0.1 * t) * rng.standard_normal(shape)).astype(np.float32)
            for t in range(steps)]


def feature_shape(in_size, feature_axis):
    fa = feature_axis % len(in_size)
    return tuple(d if i == fa else 1 for i, d in enumerate(in_size))


def affine_values(channels):
    scale = np.linspace(0.5, 1.5, channels).astype(np.float32)
    bias = np.linspace(-0.3, 0.4, channels).astype(np.float32)
    return scale, bias


# name, class, in_size, feature_axis, batch shape
BN_CASES = [
    ("bn0d", brainnorm.BatchNorm0d, (3,), -1, (8,)),
    ("bn1d", brainnorm.BatchNorm1d, (5, 3), -1, (4,)),
    ("bn1d_channels_first", brainnorm.BatchNorm1d, (3, 5), 0, (4,)),
    ("bn1d_time_major", brainnorm.BatchNorm1d, (5, 3), -1, (2, 3)),
    ("bn2d", brainnorm.BatchNorm2d, (3, 3, 2), -1, (2,)),
]


def bn_setup(cls, in_size, feature_axis, batch, **kwargs):
    fshape = feature_shape(in_size, feature_axis)
    channels = in_size[feature_axis % len(in_size)]
    scale, bias = affine_values(channels)
    layer = cls(in_size, feature_axis, scale_initializer=scale.reshape(fshape),
                bias_initializer=bias.reshape(fshape), **kwargs)
    fa_x = len(batch) + feature_axis % len(in_size)
    ndim = len(batch) + len(in_size)
    axes = tuple(a for a in range(ndim) if a != fa_x)
    return layer, fshape, scale.reshape(fshape), bias.reshape(fshape), fa_x, axes


def check_bn_trajectory(layer, xs, masks, axes, fshape, scale, bias, momentum, unbiased=False):
    """Train ``layer`` on ``xs`` and compare every step with the reference; return the final reference stats."""
    channels = int(np.prod(fshape))
    r_mean = np.zeros(channels)
    r_var = np.ones(channels)
    for t, (x, m) in enumerate(zip(xs, masks), start=1):
        mom = (t - 1) / t if momentum is None else momentum
        r_mean, r_var = ref.running_update(r_mean, r_var, x, axes, mom, mask=m, unbiased=unbiased)
        y = layer(x) if m is None else layer(x, m)
        close(y, ref.normalize(x, axes, m, EPS, scale, bias))
        assert layer.running_mean.value.shape == fshape
        assert layer.running_var.value.shape == fshape
        close(np.ravel(layer.running_mean.value), r_mean)
        close(np.ravel(layer.running_var.value), r_var)
        assert int(layer.num_batches_tracked.value) == t
    return r_mean, r_var


@pytest.mark.parametrize("name,cls,in_size,feature_axis,batch", BN_CASES, ids=[c[0] for c in BN_CASES])
def test_batchnorm_momentum_trajectory(rng, name, cls, in_size, feature_axis, batch):
    layer, fshape, scale, bias, fa_x, axes = bn_setup(cls, in_size, feature_axis, batch, momentum=0.9)
    xs = make_batches(rng, 6, batch + in_size, fa_x)
    check_bn_trajectory(layer, xs, [None] * 6, axes, fshape, scale, bias, 0.9)


def test_batchnorm_default_momentum_is_0_99(rng):
    layer = brainnorm.BatchNorm0d(3)
    x = make_batches(rng, 1, (16, 3), 1)[0]
    layer(x)
    mean, var, _ = reft.batch_moments(x, (0,))
    close(layer.running_mean.value, 0.01 * mean)
    close(layer.running_var.value, 0.99 + 0.01 * var)


@pytest.mark.parametrize("name,cls,in_size,feature_axis,batch", BN_CASES[:3], ids=[c[0] for c in BN_CASES[:3]])
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_batchnorm_cumulative_average(rng, name, cls, in_size, feature_axis, batch, unbiased):
    layer, fshape, scale, bias, fa_x, axes = bn_setup(cls, in_size, feature_axis, batch, momentum=None,
                                                      unbiased_running_var=unbiased)
    xs = make_batches(rng, 5, batch + in_size, fa_x)
    check_bn_trajectory(layer, xs, [None] * 5, axes, fshape, scale, bias, None, unbiased)
    # The cumulative average is the plain average of the batch statistics (init fully replaced).
    stats = [reft.batch_moments(x, axes) for x in xs]
    means = np.mean([s[0] for s in stats], axis=0)
    var_factor = [s[2] / (s[2] - 1) if unbiased else 1.0 for s in stats]
    variances = np.mean([s[1] * f for s, f in zip(stats, var_factor)], axis=0)
    close(np.ravel(layer.running_mean.value), means)
    close(np.ravel(layer.running_var.value), variances)


def test_batchnorm_cumulative_first_step_replaces_init(rng):
    layer = brainnorm.BatchNorm0d(3, momentum=None)
    x = make_batches(rng, 1, (10, 3), 1)[0]
    layer(x)
    mean, var, _ = reft.batch_moments(x, (0,))
    close(layer.running_mean.value, mean)
    close(layer.running_var.value, var)


@pytest.mark.parametrize("name,cls,in_size,feature_axis,batch", BN_CASES, ids=[c[0] for c in BN_CASES])
def test_batchnorm_unbiased_running_var(rng, name, cls, in_size, feature_axis, batch):
    layer, fshape, scale, bias, fa_x, axes = bn_setup(cls, in_size, feature_axis, batch, momentum=0.9,
                                                      unbiased_running_var=True)
    xs = make_batches(rng, 5, batch + in_size, fa_x)
    # Output still uses the biased variance: check_bn_trajectory compares with ref.normalize.
    check_bn_trajectory(layer, xs, [None] * 5, axes, fshape, scale, bias, 0.9, unbiased=True)


@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
@pytest.mark.parametrize("name,cls,in_size,feature_axis,batch", BN_CASES, ids=[c[0] for c in BN_CASES])
def test_batchnorm_random_mask_trajectory(rng, name, cls, in_size, feature_axis, batch, unbiased):
    layer, fshape, scale, bias, fa_x, axes = bn_setup(cls, in_size, feature_axis, batch, momentum=0.9,
                                                      unbiased_running_var=unbiased)
    shape = batch + in_size
    xs = make_batches(rng, 5, shape, fa_x)
    masks = [rng.random(shape) < 0.6 for _ in xs]
    check_bn_trajectory(layer, xs, masks, axes, fshape, scale, bias, 0.9, unbiased)


@pytest.mark.parametrize("momentum", [0.9, None], ids=["m0.9", "cumulative"])
def test_batchnorm1d_padding_mask_btc(rng, momentum):
    """BatchNorm1d with in_size (T, C), input (B, T, C) and a (B, T, 1) padding mask."""
    B, T, C = 4, 6, 3
    layer, fshape, scale, bias, fa_x, axes = bn_setup(brainnorm.BatchNorm1d, (T, C), -1, (B,), momentum=momentum)
    xs = make_batches(rng, 5, (B, T, C), 2)
    masks = []
    for _ in xs:
        lengths = rng.integers(1, T + 1, B)
        masks.append((np.arange(T)[None, :] < lengths[:, None])[..., None])
    assert masks[0].shape == (B, T, 1)
    check_bn_trajectory(layer, xs, masks, axes, fshape, scale, bias, momentum)


def test_batchnorm_channel_without_valid_entry_keeps_running_stats(rng):
    layer, fshape, scale, bias, fa_x, axes = bn_setup(brainnorm.BatchNorm0d, (3,), -1, (6,), momentum=0.9)
    xs = make_batches(rng, 5, (6, 3), 1)
    masks = [None] * 5
    empty = np.ones((6, 3), bool)
    empty[:, 1] = False
    masks[2] = empty
    full_empty = np.zeros((6, 3), bool)
    masks[4] = full_empty
    r_mean, r_var = np.zeros(3), np.ones(3)
    for t, (x, m) in enumerate(zip(xs, masks), start=1):
        before_mean = np.array(layer.running_mean.value)
        before_var = np.array(layer.running_var.value)
        r_mean, r_var = ref.running_update(r_mean, r_var, x, axes, 0.9, mask=m)
        y = np.asarray(layer(x) if m is None else layer(x, m))
        assert np.all(np.isfinite(y))
        close(y, ref.normalize(x, axes, m, EPS, scale, bias))
        close(layer.running_mean.value, r_mean)
        close(layer.running_var.value, r_var)
        assert int(layer.num_batches_tracked.value) == t  # every training step counts
        if m is not None:
            empty_channels = ~np.asarray(m).any(axis=0)
            # bit-identical for the channels without data; output equals the bias there
            assert np.array_equal(np.asarray(layer.running_mean.value)[empty_channels], before_mean[empty_channels])
            assert np.array_equal(np.asarray(layer.running_var.value)[empty_channels], before_var[empty_channels])
            np.testing.assert_allclose(y[:, empty_channels], np.broadcast_to(bias[empty_channels], (6, empty_channels.sum())),
                                       atol=1e-6)
            if empty_channels.sum() < 3:
                assert not np.array_equal(np.asarray(layer.running_mean.value)[~empty_channels],
                                          before_mean[~empty_channels])


# --- evaluation -----------------------------------------------------------------------------------


def trained_bn(rng, **kwargs):
    layer, fshape, scale, bias, fa_x, axes = bn_setup(brainnorm.BatchNorm1d, (5, 3), -1, (4,), momentum=0.9, **kwargs)
    xs = make_batches(rng, 5, (4, 5, 3), 2)
    return layer, fshape, scale, bias, axes, xs


@pytest.mark.parametrize("how", ["environ_fit_false", "update_argument", "constructor"])
def test_batchnorm_eval_uses_running_stats_and_writes_nothing(rng, how):
    ctor = dict(use_running_average=True) if how == "constructor" else {}
    layer, fshape, scale, bias, axes, xs = trained_bn(rng, **ctor)
    r_mean, r_var = np.zeros(3), np.ones(3)
    for t, x in enumerate(xs, start=1):
        r_mean, r_var = ref.running_update(r_mean, r_var, x, axes, 0.9)
        if how == "constructor":
            layer(x, use_running_average=False)  # argument beats constructor
        else:
            layer(x)
    assert int(layer.num_batches_tracked.value) == 5
    close(np.ravel(layer.running_mean.value), r_mean)

    x_eval = (3.0 + 2.0 * rng.standard_normal((7, 5, 3))).astype(np.float32)
    before = snapshot(layer)
    if how == "environ_fit_false":
        with brainstate.environ.context(fit=False):
            y = layer(x_eval)
    elif how == "update_argument":
        y = layer(x_eval, use_running_average=True)
    else:
        y = layer(x_eval)
    expected = reft.apply_stats(x_eval, r_mean.reshape(fshape), r_var.reshape(fshape), EPS, scale, bias)
    close(y, expected)
    assert_identical(before, snapshot(layer))
    # Evaluation ignores the batch: one sample gives the same rows.
    if how == "update_argument":
        y0 = layer(x_eval[:1], use_running_average=True)
        close(y0, expected[:1])
        assert_identical(before, snapshot(layer))


@pytest.mark.parametrize(
    "argument,constructor,fit,training",
    [
        (None, None, None, True),
        (None, None, True, True),
        (None, None, False, False),
        (None, True, None, False),
        (None, True, True, False),     # constructor beats environ
        (None, False, False, True),    # constructor beats environ
        (True, None, True, False),     # argument beats environ
        (False, None, False, True),
        (True, False, True, False),    # argument beats constructor and environ
        (False, True, False, True),
    ],
)
def test_mode_resolution_order(rng, argument, constructor, fit, training):
    layer = brainnorm.BatchNorm0d(3, momentum=0.9, use_running_average=constructor)
    x = make_batches(rng, 1, (8, 3), 1)[0]
    kwargs = {} if argument is None else dict(use_running_average=argument)
    before = snapshot(layer)
    if fit is None:
        y = layer(x, **kwargs)
    else:
        with brainstate.environ.context(fit=fit):
            y = layer(x, **kwargs)
    if training:
        close(y, ref.normalize(x, (0,), None, EPS))
        assert int(layer.num_batches_tracked.value) == 1
        close(layer.running_mean.value, ref.running_update(np.zeros(3), np.ones(3), x, (0,), 0.9)[0])
    else:
        close(y, reft.apply_stats(x, 0.0, 1.0, EPS))
        assert_identical(before, snapshot(layer))


def test_running_stats_are_not_parameters():
    layer = brainnorm.BatchNorm2d((2, 2, 3), momentum=0.9)
    params = layer.states(brainstate.ParamState)
    assert set(params.keys()) == {("weight",)}
    for state in (layer.running_mean, layer.running_var, layer.num_batches_tracked):
        assert isinstance(state, brainstate.ShortTermState)
        assert not isinstance(state, brainstate.ParamState)
    np.testing.assert_array_equal(layer.running_mean.value, np.zeros((1, 1, 3)))
    np.testing.assert_array_equal(layer.running_var.value, np.ones((1, 1, 3)))
    assert int(layer.num_batches_tracked.value) == 0


# --- track_running_stats=False -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["training", "environ_fit_false", "update_argument", "constructor"])
def test_batchnorm_without_tracking_uses_batch_stats_everywhere(rng, how):
    ctor = dict(use_running_average=True) if how == "constructor" else {}
    layer, fshape, scale, bias, fa_x, axes = bn_setup(brainnorm.BatchNorm1d, (5, 3), -1, (4,), momentum=0.9,
                                                      track_running_stats=False, **ctor)
    assert layer.running_mean is None and layer.running_var is None and layer.num_batches_tracked is None
    assert set(layer.states().keys()) == {("weight",)}
    x = make_batches(rng, 1, (4, 5, 3), 2)[0]
    mask = rng.random((4, 5, 3)) < 0.7
    for m in (None, mask):
        if how == "environ_fit_false":
            with brainstate.environ.context(fit=False):
                y = layer(x, m)
        elif how == "update_argument":
            y = layer(x, m, use_running_average=True)
        else:
            y = layer(x, m)
        close(y, ref.normalize(x, axes, m, EPS, scale, bias))


# --- InstanceNorm --------------------------------------------------------------------------------

# name, in_size, feature_axis, batch shape
IN_CASES = [
    ("seq", (6, 3), -1, (4,)),
    ("image", (4, 4, 2), -1, (3,)),
    ("channels_first", (2, 6), 0, (3,)),
    ("time_major", (5, 2), -1, (2, 3)),
    ("unbatched", (6, 3), -1, ()),
]


def in_setup(in_size, feature_axis, batch, **kwargs):
    fshape = feature_shape(in_size, feature_axis)
    channels = in_size[feature_axis % len(in_size)]
    scale, bias = affine_values(channels)
    layer = brainnorm.InstanceNorm(in_size, feature_axis, scale_init=scale.reshape(fshape),
                                   bias_init=bias.reshape(fshape), **kwargs)
    nb = len(batch)
    fa = feature_axis % len(in_size)
    inst_axes = tuple(nb + a for a in range(len(in_size)) if a != fa)
    batch_axes = tuple(range(nb))
    return layer, fshape, scale.reshape(fshape), bias.reshape(fshape), nb + fa, inst_axes, batch_axes


def check_in_trajectory(layer, xs, masks, inst_axes, batch_axes, fshape, scale, bias, momentum, unbiased=False):
    channels = int(np.prod(fshape))
    r_mean, r_var = np.zeros(channels), np.ones(channels)
    for t, (x, m) in enumerate(zip(xs, masks), start=1):
        mom = (t - 1) / t if momentum is None else momentum
        r_mean, r_var = reft.instance_running_update(r_mean, r_var, x, inst_axes, batch_axes, mom, m, unbiased)
        y = layer(x) if m is None else layer(x, m)
        close(y, ref.normalize(x, inst_axes, m, EPS, scale, bias))
        assert layer.running_mean.value.shape == fshape
        close(np.ravel(layer.running_mean.value), r_mean)
        close(np.ravel(layer.running_var.value), r_var)
        assert int(layer.num_batches_tracked.value) == t
    return r_mean, r_var


@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
@pytest.mark.parametrize("name,in_size,feature_axis,batch", IN_CASES, ids=[c[0] for c in IN_CASES])
def test_instancenorm_running_trajectory(rng, name, in_size, feature_axis, batch, unbiased):
    layer, fshape, scale, bias, fa_x, inst_axes, batch_axes = in_setup(
        in_size, feature_axis, batch, track_running_stats=True, momentum=0.9, unbiased_running_var=unbiased)
    xs = make_batches(rng, 5, batch + in_size, fa_x)
    check_in_trajectory(layer, xs, [None] * 5, inst_axes, batch_axes, fshape, scale, bias, 0.9, unbiased)


def test_instancenorm_running_var_is_mean_of_instance_variances(rng):
    """Not the variance of the whole batch: instances with different offsets do not add variance."""
    layer = brainnorm.InstanceNorm((8, 1), track_running_stats=True, momentum=0.0)
    x = np.stack([np.arange(8.0), np.arange(8.0) + 100.0])[..., None].astype(np.float32)  # (2, 8, 1)
    layer(x)
    close(layer.running_mean.value, [[53.5]])
    close(layer.running_var.value, [[np.var(np.arange(8.0))]])  # 5.25, the batch variance would be ~2505
    layer2 = brainnorm.InstanceNorm((8, 1), track_running_stats=True, momentum=0.0, unbiased_running_var=True)
    layer2(x)
    close(layer2.running_var.value, [[np.var(np.arange(8.0), ddof=1)]])


def test_instancenorm_cumulative_average(rng):
    layer, fshape, scale, bias, fa_x, inst_axes, batch_axes = in_setup(
        (6, 3), -1, (4,), track_running_stats=True, momentum=None)
    xs = make_batches(rng, 5, (4, 6, 3), 2)
    check_in_trajectory(layer, xs, [None] * 5, inst_axes, batch_axes, fshape, scale, bias, None)
    means = np.mean([x.astype(np.float64).mean(axis=(0, 1)) for x in xs], axis=0)
    close(np.ravel(layer.running_mean.value), means)


@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_instancenorm_masked_trajectory(rng, unbiased):
    """(B, T, 1) padding masks, one fully padded instance at one step, a random mask at another."""
    B, T, C = 4, 6, 3
    layer, fshape, scale, bias, fa_x, inst_axes, batch_axes = in_setup(
        (T, C), -1, (B,), track_running_stats=True, momentum=0.9, unbiased_running_var=unbiased)
    xs = make_batches(rng, 5, (B, T, C), 2)
    masks = []
    for t in range(5):
        lengths = rng.integers(2, T + 1, B)
        if t == 1:
            lengths[2] = 0  # a fully padded instance: left out of the batch average
        masks.append((np.arange(T)[None, :] < lengths[:, None])[..., None])
    masks[3] = rng.random((B, T, C)) < 0.7
    check_in_trajectory(layer, xs, masks, inst_axes, batch_axes, fshape, scale, bias, 0.9, unbiased)


def test_instancenorm_channel_without_valid_entry_keeps_running_stats(rng):
    layer, fshape, scale, bias, fa_x, inst_axes, batch_axes = in_setup(
        (6, 3), -1, (4,), track_running_stats=True, momentum=0.9)
    xs = make_batches(rng, 2, (4, 6, 3), 2)
    layer(xs[0])
    before_mean = np.array(layer.running_mean.value)
    before_var = np.array(layer.running_var.value)
    mask = np.ones((4, 6, 3), bool)
    mask[..., 0] = False
    y = np.asarray(layer(xs[1], mask))
    assert np.all(np.isfinite(y))
    assert np.array_equal(np.asarray(layer.running_mean.value)[..., 0], before_mean[..., 0])
    assert np.array_equal(np.asarray(layer.running_var.value)[..., 0], before_var[..., 0])
    assert not np.array_equal(np.asarray(layer.running_mean.value)[..., 1:], before_mean[..., 1:])
    np.testing.assert_allclose(y[..., 0], np.full((4, 6), bias[..., 0]), atol=1e-6)
    assert int(layer.num_batches_tracked.value) == 2


@pytest.mark.parametrize("how", ["environ_fit_false", "update_argument", "constructor"])
def test_instancenorm_eval_uses_running_stats_and_writes_nothing(rng, how):
    ctor = dict(use_running_average=True) if how == "constructor" else {}
    layer, fshape, scale, bias, fa_x, inst_axes, batch_axes = in_setup(
        (6, 3), -1, (4,), track_running_stats=True, momentum=0.9, **ctor)
    xs = make_batches(rng, 5, (4, 6, 3), 2)
    r_mean, r_var = np.zeros(3), np.ones(3)
    for x in xs:
        r_mean, r_var = reft.instance_running_update(r_mean, r_var, x, inst_axes, batch_axes, 0.9)
        if how == "constructor":
            layer(x, use_running_average=False)
        else:
            layer(x)
    assert int(layer.num_batches_tracked.value) == 5
    x_eval = (1.0 + 3.0 * rng.standard_normal((3, 6, 3))).astype(np.float32)
    before = snapshot(layer)
    if how == "environ_fit_false":
        with brainstate.environ.context(fit=False):
            y = layer(x_eval)
    elif how == "update_argument":
        y = layer(x_eval, use_running_average=True)
    else:
        y = layer(x_eval)
    close(y, reft.apply_stats(x_eval, r_mean.reshape(fshape), r_var.reshape(fshape), EPS, scale, bias))
    assert_identical(before, snapshot(layer))


@pytest.mark.parametrize("how", ["training", "environ_fit_false", "update_argument"])
def test_instancenorm_without_tracking_uses_instance_stats(rng, how):
    layer, fshape, scale, bias, fa_x, inst_axes, batch_axes = in_setup((6, 3), -1, (4,))
    assert layer.running_mean is None and layer.running_var is None and layer.num_batches_tracked is None
    assert set(layer.states().keys()) == {("weight",)}
    x = make_batches(rng, 1, (4, 6, 3), 2)[0]
    if how == "environ_fit_false":
        with brainstate.environ.context(fit=False):
            y = layer(x)
    elif how == "update_argument":
        y = layer(x, use_running_average=True)
    else:
        y = layer(x)
    close(y, ref.normalize(x, inst_axes, None, EPS, scale, bias))
