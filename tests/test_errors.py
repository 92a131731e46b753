"""Errors: construction options, call-time inputs and masks, the functional API, atomicity.

SPEC §3: bad options fail at construction with ValueError/TypeError whose
message names the layer (or function) and the option; an input whose
trailing shape is not ``in_size`` raises ValueError naming the layer, the
expected trailing shape and the shape received; a floating mask raises
TypeError and a non-broadcastable one ValueError, both naming ``mask``; a
call that raises writes nothing (every state bit-identical afterwards).
"""

from __future__ import annotations

import math
import re

import brainstate
import brainunit as u
import jax
import numpy as np
import pytest

import brainnorm
from brainnorm import functional as F


def named(*words):
    """Regex matching a message that contains every word, in this order."""
    return "(?s)" + ".*".join(re.escape(w) for w in words)


# --- construction ------------------------------------------------------------------------------

# name -> factory(in_size, **kwargs), a valid in_size
LAYERS = {
    "BatchNorm0d": (lambda s, **kw: brainnorm.BatchNorm0d(s, **kw), (3,)),
    "BatchNorm1d": (lambda s, **kw: brainnorm.BatchNorm1d(s, **kw), (4, 3)),
    "BatchNorm2d": (lambda s, **kw: brainnorm.BatchNorm2d(s, **kw), (2, 2, 3)),
    "BatchNorm3d": (lambda s, **kw: brainnorm.BatchNorm3d(s, **kw), (2, 2, 2, 3)),
    "LayerNorm": (lambda s, **kw: brainnorm.LayerNorm(s, **kw), (4, 3)),
    "RMSNorm": (lambda s, **kw: brainnorm.RMSNorm(s, **kw), (4, 3)),
    "GroupNorm": (lambda s, **kw: brainnorm.GroupNorm(s, num_groups=kw.pop("num_groups", 1), **kw), (4, 6)),
    "InstanceNorm": (lambda s, **kw: brainnorm.InstanceNorm(s, **kw), (4, 3)),
    "LocalResponseNorm": (lambda s, **kw: brainnorm.LocalResponseNorm(s, 3, **kw), (4, 3)),
    "BatchNormThroughTime": (lambda s, **kw: brainnorm.BatchNormThroughTime(s, 5, **kw), (4, 3)),
    "ThresholdDependentBatchNorm": (lambda s, **kw: brainnorm.ThresholdDependentBatchNorm(s, **kw), (4, 3)),
    "TemporalEffectiveBatchNorm": (lambda s, **kw: brainnorm.TemporalEffectiveBatchNorm(s, 5, **kw), (4, 3)),
}
WITH_EPSILON = [n for n in LAYERS if n != "LocalResponseNorm"]
WITH_MOMENTUM = [n for n in LAYERS if "Batch" in n or n == "InstanceNorm"]


def build(name, in_size=None, **kwargs):
    factory, default = LAYERS[name]
    return factory(default if in_size is None else in_size, **kwargs)


@pytest.mark.parametrize("name", LAYERS)
def test_valid_construction(name):
    layer = build(name)
    assert layer.in_size == LAYERS[name][1]


@pytest.mark.parametrize("epsilon", [0.0, -1e-5, math.inf, -math.inf, math.nan], ids=["zero", "negative", "inf", "-inf", "nan"])
@pytest.mark.parametrize("name", WITH_EPSILON)
def test_bad_epsilon(name, epsilon):
    with pytest.raises(ValueError, match=named(name, "epsilon")):
        build(name, epsilon=epsilon)


@pytest.mark.parametrize("name", WITH_EPSILON)
def test_non_numeric_epsilon(name):
    with pytest.raises(TypeError, match=named(name, "epsilon")):
        build(name, epsilon="small")


@pytest.mark.parametrize("momentum", [-0.1, 1.5, math.nan, math.inf], ids=["negative", "above_one", "nan", "inf"])
@pytest.mark.parametrize("name", WITH_MOMENTUM)
def test_bad_momentum(name, momentum):
    with pytest.raises(ValueError, match=named(name, "momentum")):
        build(name, momentum=momentum)


@pytest.mark.parametrize("momentum", [0.0, 1.0, None])
@pytest.mark.parametrize("name", ["BatchNorm0d", "InstanceNorm"])
def test_momentum_bounds_accepted(name, momentum):
    build(name, momentum=momentum)


def _replace(in_size, index, value):
    s = list(in_size)
    s[index] = value
    return tuple(s)


@pytest.mark.parametrize("bad", [0, -2], ids=["zero", "negative"])
@pytest.mark.parametrize("name", LAYERS)
def test_in_size_non_positive(name, bad):
    in_size = _replace(LAYERS[name][1], 0, bad)
    with pytest.raises(ValueError, match=named(name, "in_size")):
        build(name, in_size)


@pytest.mark.parametrize("bad", [3.0, "3", None, True], ids=["float", "str", "none", "bool"])
@pytest.mark.parametrize("name", LAYERS)
def test_in_size_non_int_entry(name, bad):
    in_size = _replace(LAYERS[name][1], 0, bad)
    with pytest.raises(TypeError, match=named(name, "in_size")):
        build(name, in_size)


@pytest.mark.parametrize("bad", ["", "43", b""], ids=["empty_str", "str", "bytes"])
@pytest.mark.parametrize("name", LAYERS)
def test_in_size_string(name, bad):
    # a string iterates, but is not a shape: '' used to pass as the empty shape and fail later
    # with a message about reduction_axes
    with pytest.raises(TypeError, match=named(name, "in_size")):
        build(name, bad)


@pytest.mark.parametrize("name", ["LayerNorm", "BatchNorm0d"])
def test_in_size_not_a_sequence(name):
    with pytest.raises(TypeError, match=named(name, "in_size")):
        build(name, 3.5)


def test_in_size_numpy_int_accepted():
    assert brainnorm.BatchNorm0d(np.int64(3)).in_size == (3,)
    assert brainnorm.LayerNorm((np.int32(4), 3)).in_size == (4, 3)


@pytest.mark.parametrize(
    "cls,in_size",
    [
        (brainnorm.BatchNorm0d, (4, 3)),
        (brainnorm.BatchNorm1d, (3,)),
        (brainnorm.BatchNorm1d, (2, 4, 3)),
        (brainnorm.BatchNorm2d, (4, 3)),
        (brainnorm.BatchNorm2d, (2, 2, 2, 3)),
        (brainnorm.BatchNorm3d, (2, 2, 3)),
    ],
    ids=["0d_rank2", "1d_rank1", "1d_rank3", "2d_rank2", "2d_rank4", "3d_rank3"],
)
def test_batchnorm_wrong_in_size_rank(cls, in_size):
    with pytest.raises(ValueError, match=named(cls.__name__, "in_size")):
        cls(in_size)


@pytest.mark.parametrize(
    "name,option,value",
    [
        ("LayerNorm", "reduction_axes", 2),
        ("LayerNorm", "reduction_axes", -3),
        ("LayerNorm", "feature_axes", 5),
        ("RMSNorm", "reduction_axes", (0, 2)),
        ("RMSNorm", "feature_axes", -3),
        ("BatchNorm0d", "feature_axis", 1),
        ("BatchNorm1d", "feature_axis", 2),
        ("BatchNorm2d", "feature_axis", -4),
        ("BatchNorm3d", "feature_axis", 4),
        ("GroupNorm", "feature_axis", 2),
        ("GroupNorm", "reduction_axes", (1, 2)),
        ("InstanceNorm", "feature_axis", -3),
        ("LocalResponseNorm", "feature_axis", 2),
        ("BatchNormThroughTime", "feature_axis", 2),
        ("ThresholdDependentBatchNorm", "feature_axis", -3),
        ("TemporalEffectiveBatchNorm", "feature_axis", 3),
    ],
)
def test_axis_out_of_range(name, option, value):
    with pytest.raises(ValueError, match=named(name, option)):
        build(name, **{option: value})


@pytest.mark.parametrize(
    "name,option,value",
    [
        ("LayerNorm", "reduction_axes", (1, -1)),
        ("LayerNorm", "feature_axes", (0, 0)),
        ("RMSNorm", "reduction_axes", (0, -2)),
        ("BatchNorm2d", "feature_axis", (0, -3)),
        ("GroupNorm", "reduction_axes", (1, 1)),
        ("InstanceNorm", "feature_axis", (1, -1)),
        ("BatchNormThroughTime", "feature_axis", (-1, 1)),
    ],
)
def test_repeated_axes(name, option, value):
    with pytest.raises(ValueError, match=named(name, option)):
        build(name, **{option: value})


@pytest.mark.parametrize("name,option", [("LayerNorm", "reduction_axes"), ("GroupNorm", "feature_axis")])
def test_non_int_axis(name, option):
    with pytest.raises(TypeError, match=named(name, option)):
        build(name, **{option: 1.0})


@pytest.mark.parametrize("num_groups", [4, 5, 12], ids=["4_of_6", "5_of_6", "12_of_6"])
def test_groupnorm_num_groups_not_dividing(num_groups):
    with pytest.raises(ValueError, match=named("GroupNorm", "num_groups")):
        brainnorm.GroupNorm((4, 6), num_groups=num_groups)


@pytest.mark.parametrize("num_groups", [0, -2])
def test_groupnorm_num_groups_non_positive(num_groups):
    with pytest.raises(ValueError, match=named("GroupNorm", "num_groups")):
        brainnorm.GroupNorm((4, 6), num_groups=num_groups)


@pytest.mark.parametrize("group_size", [4, 0])
def test_groupnorm_bad_group_size(group_size):
    with pytest.raises(ValueError, match=named("GroupNorm", "group_size")):
        brainnorm.GroupNorm((4, 6), num_groups=None, group_size=group_size)


def test_groupnorm_both_num_groups_and_group_size():
    with pytest.raises(ValueError, match=r"GroupNorm.*(num_groups.*group_size|group_size.*num_groups)"):
        brainnorm.GroupNorm((4, 6), num_groups=2, group_size=3)


def test_groupnorm_neither_num_groups_nor_group_size():
    with pytest.raises(ValueError, match=r"GroupNorm.*(num_groups.*group_size|group_size.*num_groups)"):
        brainnorm.GroupNorm((4, 6), num_groups=None)


def test_groupnorm_group_size_alone_accepted():
    gn = brainnorm.GroupNorm((4, 6), num_groups=None, group_size=3)
    assert (gn.num_groups, gn.group_size) == (2, 3)


@pytest.mark.parametrize("reduction_axes", [0, (0,), -2])
def test_groupnorm_reduction_axes_without_feature_axis(reduction_axes):
    with pytest.raises(ValueError, match=named("GroupNorm", "reduction_axes")):
        brainnorm.GroupNorm((4, 6), num_groups=2, reduction_axes=reduction_axes)


@pytest.mark.parametrize("in_size,feature_axis", [((3,), -1), ((4, 3), (0, 1))])
def test_instancenorm_without_non_feature_axis(in_size, feature_axis):
    with pytest.raises(ValueError, match=named("InstanceNorm", "in_size")):
        brainnorm.InstanceNorm(in_size, feature_axis)


@pytest.mark.parametrize("size", [0, -1])
def test_lrn_bad_size(size):
    with pytest.raises(ValueError, match=named("LocalResponseNorm", "size")):
        brainnorm.LocalResponseNorm((4, 3), size)


@pytest.mark.parametrize("name", ["BatchNormThroughTime", "TemporalEffectiveBatchNorm"])
def test_temporal_bad_num_steps(name):
    cls = getattr(brainnorm, name)
    with pytest.raises(ValueError, match=named(name, "num_steps")):
        cls((4, 3), 0)


@pytest.mark.parametrize("name", ["BatchNormThroughTime", "ThresholdDependentBatchNorm", "TemporalEffectiveBatchNorm"])
def test_temporal_bad_step_mode(name):
    with pytest.raises(ValueError, match=named(name, "step_mode")):
        build(name, step_mode="both")


@pytest.mark.parametrize("name", ["BatchNorm1d", "InstanceNorm"])
def test_mean_type_must_not_be_param_state(name):
    with pytest.raises(TypeError, match=named(name, "mean_type")):
        build(name, mean_type=brainstate.ParamState, track_running_stats=True)


def test_weight_wrappers_bad_options():
    with pytest.raises(ValueError, match=named("WeightNorm", "epsilon")):
        brainnorm.WeightNorm(brainstate.nn.Linear(4, 3), epsilon=-1.0)
    with pytest.raises(ValueError, match=named("SpectralNorm", "epsilon")):
        brainnorm.SpectralNorm(brainstate.nn.Linear(4, 3), epsilon=0.0)
    with pytest.raises(ValueError, match=named("SpectralNorm", "n_steps")):
        brainnorm.SpectralNorm(brainstate.nn.Linear(4, 3), n_steps=0)
    with pytest.raises(TypeError, match=named("WeightNorm", "layer")):
        brainnorm.WeightNorm(np.ones((3, 4)))


# --- call time: input shape and mask ------------------------------------------------------------

CALL_LAYERS = {
    "BatchNorm0d": lambda: brainnorm.BatchNorm0d(3),
    "BatchNorm1d": lambda: brainnorm.BatchNorm1d((4, 3)),
    "BatchNorm2d": lambda: brainnorm.BatchNorm2d((2, 2, 3)),
    "LayerNorm": lambda: brainnorm.LayerNorm((4, 3)),
    "RMSNorm": lambda: brainnorm.RMSNorm((4, 3)),
    "GroupNorm": lambda: brainnorm.GroupNorm((4, 6), num_groups=2),
    "InstanceNorm": lambda: brainnorm.InstanceNorm((4, 3)),
    "InstanceNorm_tracking": lambda: brainnorm.InstanceNorm((4, 3), track_running_stats=True),
    "LocalResponseNorm": lambda: brainnorm.LocalResponseNorm((4, 3), 3),
    "BatchNormThroughTime": lambda: brainnorm.BatchNormThroughTime((4, 3), 5, step_mode="multi"),
    "ThresholdDependentBatchNorm": lambda: brainnorm.ThresholdDependentBatchNorm((4, 3), step_mode="multi"),
    "TemporalEffectiveBatchNorm": lambda: brainnorm.TemporalEffectiveBatchNorm((4, 3), 5, step_mode="multi"),
}


def class_name(key):
    return key.split("_")[0]


def good_input(layer, batch=(2, 3)):
    rng = np.random.default_rng(1)
    return (1.0 + rng.standard_normal(batch + layer.in_size)).astype(np.float32)


def bad_shapes(in_size):
    wrong_last = in_size[:-1] + (in_size[-1] + 1,)
    shapes = [(2,) + wrong_last, (2,) + in_size[::-1] + (1,), in_size[1:]]
    if len(in_size) > 1:
        shapes.append((2,) + in_size[::-1])
    return [s for s in shapes if s[len(s) - len(in_size):] != in_size]


@pytest.mark.parametrize("key", CALL_LAYERS)
def test_wrong_trailing_shape(key):
    layer = CALL_LAYERS[key]()
    for shape in bad_shapes(layer.in_size):
        x = np.ones(shape, np.float32)
        with pytest.raises(ValueError, match=named(class_name(key), str(layer.in_size), str(shape))):
            layer(x)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.complex64])
@pytest.mark.parametrize("key", CALL_LAYERS)
def test_floating_mask_is_type_error(key, dtype):
    layer = CALL_LAYERS[key]()
    x = good_input(layer)
    mask = np.ones(x.shape, dtype)
    with pytest.raises(TypeError, match=named(class_name(key), "mask")):
        layer(x, mask)


@pytest.mark.parametrize("key", CALL_LAYERS)
def test_non_broadcastable_mask_is_value_error(key):
    layer = CALL_LAYERS[key]()
    x = good_input(layer)
    too_big = np.ones((2,) + x.shape, bool)     # broadcasts, but to a larger shape than x
    wrong_axis = np.ones(x.shape[:-1] + (x.shape[-1] + 1,), bool)
    for mask in (wrong_axis, too_big):
        with pytest.raises(ValueError, match=named(class_name(key), "mask")):
            layer(x, mask)


@pytest.mark.parametrize("key", ["BatchNorm1d", "LayerNorm", "GroupNorm"])
def test_integer_mask_is_read_as_nonzero(key):
    x = good_input(CALL_LAYERS[key]())
    rng = np.random.default_rng(2)
    int_mask = rng.integers(0, 3, x.shape).astype(np.int32)
    y_int = np.asarray(CALL_LAYERS[key]()(x, int_mask))
    y_bool = np.asarray(CALL_LAYERS[key]()(x, int_mask != 0))
    np.testing.assert_array_equal(y_int, y_bool)


def test_temporal_single_step_without_time_index():
    layer = brainnorm.BatchNormThroughTime((4, 3), 5)
    with pytest.raises(ValueError, match=named("BatchNormThroughTime", "t")):
        layer(good_input(layer))


def test_temporal_negative_time_index():
    layer = brainnorm.BatchNormThroughTime((4, 3), 5)
    with pytest.raises(ValueError, match=named("BatchNormThroughTime", "t")):
        layer(good_input(layer), t=-1)


def test_temporal_multi_step_needs_time_axis():
    layer = brainnorm.BatchNormThroughTime((4, 3), 5, step_mode="multi")
    with pytest.raises(ValueError, match=named("BatchNormThroughTime", "step_mode")):
        layer(np.ones((4, 3), np.float32))


# --- functional API ------------------------------------------------------------------------------

X2 = np.random.default_rng(3).standard_normal((4, 6)).astype(np.float32)
X3 = np.random.default_rng(4).standard_normal((2, 5, 6)).astype(np.float32)


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: F.moments(X2, axes=2), ValueError, ("moments", "axes")),
        (lambda: F.moments(X2, axes=(0, -2)), ValueError, ("moments", "axes")),
        (lambda: F.moments(X2, axes=1.0), TypeError, ("moments", "axes")),
        (lambda: F.moments(X2, axes=-1, mask=np.ones((4, 6), np.float32)), TypeError, ("moments", "mask")),
        (lambda: F.moments(X2, axes=-1, mask=np.ones((3, 6), bool)), ValueError, ("moments", "mask")),
        (lambda: F.normalize(X2, 0.0, 1.0, epsilon=0.0), ValueError, ("normalize", "epsilon")),
        (lambda: F.normalize(X2, 0.0, 1.0, epsilon=math.nan), ValueError, ("normalize", "epsilon")),
        (lambda: F.layer_norm(X2, reduction_axes=2), ValueError, ("layer_norm", "reduction_axes")),
        (lambda: F.layer_norm(X2, reduction_axes=-3), ValueError, ("layer_norm", "reduction_axes")),
        (lambda: F.layer_norm(X2, reduction_axes=(1, -1)), ValueError, ("layer_norm", "reduction_axes")),
        (lambda: F.layer_norm(X2, epsilon=-1e-6), ValueError, ("layer_norm", "epsilon")),
        (lambda: F.layer_norm(X2, epsilon=math.inf), ValueError, ("layer_norm", "epsilon")),
        (lambda: F.layer_norm(X2, mask=np.ones((4, 6), np.float64)), TypeError, ("layer_norm", "mask")),
        (lambda: F.layer_norm(X2, mask=np.ones((4, 5), bool)), ValueError, ("layer_norm", "mask")),
        (lambda: F.layer_norm(X2, mask=np.ones((2, 4, 6), bool)), ValueError, ("layer_norm", "mask")),
        (lambda: F.rms_norm(X2, reduction_axes=3), ValueError, ("rms_norm", "reduction_axes")),
        (lambda: F.rms_norm(X2, epsilon=0.0), ValueError, ("rms_norm", "epsilon")),
        (lambda: F.rms_norm(X2, mask=np.ones((4, 6), np.float32)), TypeError, ("rms_norm", "mask")),
        (lambda: F.rms_norm(X2, mask=np.ones((6, 4), bool)), ValueError, ("rms_norm", "mask")),
        (lambda: F.batch_norm(X2, np.zeros(6), np.ones(6), training=True, momentum=1.5), ValueError,
         ("batch_norm", "momentum")),
        (lambda: F.batch_norm(X2, np.zeros(6), np.ones(6), training=True, momentum=-0.5), ValueError,
         ("batch_norm", "momentum")),
        (lambda: F.batch_norm(X2, np.zeros(6), np.ones(6), training=True, epsilon=0.0), ValueError,
         ("batch_norm", "epsilon")),
        (lambda: F.batch_norm(X2, np.zeros(6), np.ones(6), training=True, feature_axes=2), ValueError,
         ("batch_norm", "feature_axes")),
        (lambda: F.batch_norm(X2, np.zeros(6), np.ones(6), training=True, mask=np.ones((4, 6), np.float32)),
         TypeError, ("batch_norm", "mask")),
        (lambda: F.batch_norm(X2, np.zeros(6), np.ones(6), training=True, mask=np.ones((5, 6), bool)),
         ValueError, ("batch_norm", "mask")),
        (lambda: F.group_norm(X3, 4), ValueError, ("group_norm", "num_groups")),
        (lambda: F.group_norm(X3, 0), ValueError, ("group_norm", "num_groups")),
        (lambda: F.group_norm(X3, 2, feature_axis=0), ValueError, ("group_norm", "feature_axis")),
        (lambda: F.group_norm(X3, 2, feature_axis=3), ValueError, ("group_norm", "feature_axis")),
        (lambda: F.group_norm(X3, 2, reduction_axes=(0, 1, 2)), ValueError, ("group_norm", "reduction_axes")),
        (lambda: F.group_norm(X3, 2, reduction_axes=1), ValueError, ("group_norm", "reduction_axes")),
        (lambda: F.group_norm(X3, 2, epsilon=-1.0), ValueError, ("group_norm", "epsilon")),
        (lambda: F.group_norm(X3[0, 0], 2), ValueError, ("group_norm", "shape")),
        (lambda: F.group_norm(X3, 2, mask=np.ones(X3.shape, np.float32)), TypeError, ("group_norm", "mask")),
        (lambda: F.group_norm(X3, 2, mask=np.ones((2, 4, 6), bool)), ValueError, ("group_norm", "mask")),
        (lambda: F.instance_norm(X3, feature_axis=0), ValueError, ("instance_norm", "feature_axis")),
        (lambda: F.instance_norm(X3, epsilon=0.0), ValueError, ("instance_norm", "epsilon")),
        (lambda: F.instance_norm(X3[0, 0]), ValueError, ("instance_norm", "shape")),
        (lambda: F.instance_norm(X3, mask=np.ones(X3.shape, np.float16)), TypeError, ("instance_norm", "mask")),
        (lambda: F.instance_norm(X3, mask=np.ones((3, 5, 6), bool)), ValueError, ("instance_norm", "mask")),
        (lambda: F.local_response_norm(X2, 0), ValueError, ("local_response_norm", "size")),
        (lambda: F.local_response_norm(X2, 3, feature_axis=2), ValueError, ("local_response_norm", "feature_axis")),
        (lambda: F.weight_standardization(X2, eps=0.0), ValueError, ("weight_standardization", "eps")),
        (lambda: F.weight_standardization(X2, out_axis=2), ValueError, ("weight_standardization", "out_axis")),
    ],
)
def test_functional_errors(call, exc, words):
    with pytest.raises(exc, match=named(*words)):
        call()


# --- atomicity: a call that raises writes nothing -----------------------------------------------

STATEFUL = {
    "BatchNorm0d": lambda: brainnorm.BatchNorm0d(3, momentum=0.9),
    "BatchNorm1d": lambda: brainnorm.BatchNorm1d((4, 3), momentum=0.9),
    "BatchNorm2d": lambda: brainnorm.BatchNorm2d((2, 2, 3), momentum=0.9),
    "BatchNorm3d": lambda: brainnorm.BatchNorm3d((2, 2, 2, 3), momentum=None),
    "InstanceNorm": lambda: brainnorm.InstanceNorm((4, 3), track_running_stats=True, momentum=0.9),
    "BatchNormThroughTime": lambda: brainnorm.BatchNormThroughTime((4, 3), 5, step_mode="multi", momentum=0.9),
    "ThresholdDependentBatchNorm": lambda: brainnorm.ThresholdDependentBatchNorm((4, 3), step_mode="multi"),
    "TemporalEffectiveBatchNorm": lambda: brainnorm.TemporalEffectiveBatchNorm((4, 3), 5, step_mode="multi"),
}


def snapshot(module):
    return {path: [np.array(leaf) for leaf in jax.tree_util.tree_leaves(state.value)]
            for path, state in module.states().items()}


def assert_identical(before, after):
    assert before.keys() == after.keys()
    for path in before:
        assert len(before[path]) == len(after[path]), path
        for a, b in zip(before[path], after[path]):
            assert a.dtype == b.dtype and a.shape == b.shape, path
            assert np.array_equal(a, b), f"state {path} was written by a call that raised"


def bad_calls(layer, x):
    """(description, callable, exception) triples that must raise."""
    in_size = layer.in_size
    wrong = np.ones((2,) + in_size[:-1] + (in_size[-1] + 1,), np.float32)
    return [
        ("wrong trailing shape", lambda: layer(wrong), ValueError),
        ("too few axes", lambda: layer(np.ones(in_size[1:], np.float32)), ValueError),
        ("float mask", lambda: layer(x, np.ones(x.shape, np.float32)), TypeError),
        ("non-broadcastable mask", lambda: layer(x, np.ones(x.shape[:-1] + (7,), bool)), ValueError),
        ("mask broadcasting to a larger shape", lambda: layer(x, np.ones((3,) + x.shape, bool)), ValueError),
    ]


@pytest.mark.parametrize("key", STATEFUL)
def test_failed_call_writes_nothing(key):
    layer = STATEFUL[key]()
    x = good_input(layer)
    layer(x)  # one real step, so that every state holds a non-initial value
    layer(x + 1.0)
    before = snapshot(layer)
    for desc, call, exc in bad_calls(layer, x):
        with pytest.raises(exc):
            call()
        assert_identical(before, snapshot(layer))
    # the layer still trains afterwards
    layer(x)
    assert not np.array_equal(np.asarray(layer.num_batches_tracked.value), before[("num_batches_tracked",)][0])


@pytest.mark.parametrize("key", ["BatchNorm1d", "InstanceNorm"])
def test_failed_call_in_eval_mode_writes_nothing(key):
    layer = STATEFUL[key]()
    x = good_input(layer)
    layer(x)
    before = snapshot(layer)
    for desc, call, exc in bad_calls(layer, x):
        with brainstate.environ.context(fit=False):
            with pytest.raises(exc):
                call()
        assert_identical(before, snapshot(layer))


@pytest.mark.parametrize("key", ["BatchNorm0d", "BatchNorm2d", "InstanceNorm"])
def test_failed_call_under_jit_writes_nothing(key):
    layer = STATEFUL[key]()
    x = good_input(layer)
    step = brainstate.transform.jit(lambda v: layer(v))
    step(x)
    before = snapshot(layer)
    wrong = np.ones((2,) + layer.in_size[:-1] + (layer.in_size[-1] + 1,), np.float32)
    with pytest.raises(ValueError, match=named(type(layer).__name__, str(layer.in_size))):
        step(wrong)
    assert_identical(before, snapshot(layer))
    for state in layer.states().values():  # no tracer left behind
        for leaf in jax.tree_util.tree_leaves(state.value):
            assert not isinstance(leaf, jax.core.Tracer)
    step(x)
    assert int(layer.num_batches_tracked.value) == 2


@pytest.mark.parametrize("key", ["BatchNormThroughTime", "TemporalEffectiveBatchNorm"])
def test_failed_single_step_call_writes_nothing(key):
    layer = brainnorm.BatchNormThroughTime((4, 3), 5) if key == "BatchNormThroughTime" else \
        brainnorm.TemporalEffectiveBatchNorm((4, 3), 5)
    x = good_input(layer, batch=(2,))
    layer(x, t=0)
    before = snapshot(layer)
    with pytest.raises(ValueError):
        layer(x, t=-1)
    assert_identical(before, snapshot(layer))
    with pytest.raises(ValueError):
        layer(x)  # no time index anywhere
    assert_identical(before, snapshot(layer))


@pytest.mark.parametrize("key", ["BatchNorm1d", "InstanceNorm"])
def test_unit_mismatch_writes_nothing(key):
    layer = STATEFUL[key]()
    x = good_input(layer)
    layer(x * u.mV)
    before = snapshot(layer)
    with pytest.raises((TypeError, ValueError)):
        layer(x * u.nA)
    assert_identical(before, snapshot(layer))
    with pytest.raises((TypeError, ValueError)):
        layer(x)  # unitless input to a layer whose statistics are in mV
    assert_identical(before, snapshot(layer))


def test_spectral_norm_failed_call_writes_nothing():
    """The wrapped layer raises on a bad input: the power-iteration vectors must be untouched."""
    sn = brainnorm.SpectralNorm(brainstate.nn.Linear(4, 3), n_steps=1)
    x = np.random.default_rng(5).standard_normal((2, 4)).astype(np.float32)
    sn(x)
    # vectors far from converged, so that any power iteration visibly moves them
    sn.u.value = np.full(3, 1 / np.sqrt(3), np.float32)
    sn.v.value = np.full(4, 0.5, np.float32)
    before = snapshot(sn)
    with pytest.raises(Exception):
        sn(np.ones((2, 5), np.float32))
    assert_identical(before, snapshot(sn))
