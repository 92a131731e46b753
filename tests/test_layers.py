"""Every layer against the float64 NumPy references of tests/reference.py.

Inputs are unbatched (``x.shape == in_size``), batched ``(B, *in_size)`` and
time-major ``(T, B, *in_size)``; axes given to a layer are counted within
``in_size``, so the reference axes are shifted by the number of batch axes.
Scale and bias are set to random values, masks are random booleans of the full
shape or sequence masks ``x.shape[:-1] + (1,)`` (a ``(B, T, 1)`` padding mask).

Tolerance: ATOL = 1e-5 absolute for float32 well-conditioned inputs, plus
RTOL = 1e-5 for the few-unit outputs at masked-out positions.
"""

from __future__ import annotations

import brainstate
import numpy as np
import pytest

import brainnorm

from . import reference as ref

ATOL = 1e-5
RTOL = 1e-5

# (batch shape, mask kind): unbatched, (B, ...) and (T, B, ...) inputs, each with
# and without masks, without compiling every combination.
SETTINGS = [
    ((), None),
    ((), "full"),
    ((3,), "seq"),
    ((3,), "full"),
    ((2, 3), None),
    ((2, 3), "seq"),
]


def assert_close(actual, expected, atol=ATOL, rtol=RTOL):
    actual = np.asarray(actual)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual.astype(np.float64), expected, atol=atol, rtol=rtol)


def random_x(rng, shape, offset=1.5):
    return (offset + rng.standard_normal(shape)).astype(np.float32)


def make_mask(rng, shape, kind):
    """None, a full-shape random mask, or a sequence mask broadcasting over the last axis."""
    if kind is None:
        return None
    mshape = tuple(shape) if kind == "full" else tuple(shape[:-1]) + (1,)
    mask = rng.random(mshape) < 0.75
    mask.reshape(-1)[0] = True
    return mask


def run(layer, x, mask=None, **kwargs):
    """``layer(x, mask, **kwargs)`` under ``brainstate.transform.jit`` (one compilation per case)."""
    return brainstate.transform.jit(lambda x, m: layer(x, m, **kwargs))(x, mask)


def randomize_affine(layer, rng, attr="weight"):
    """Give the layer's parameter state random values of the stored shapes; return them."""
    state = getattr(layer, attr)
    values = {}
    for key, value in state.value.items():
        shape = np.shape(value)
        if key == "scale":
            values[key] = (1 + 0.5 * rng.standard_normal(shape)).astype(np.float32)
        else:
            values[key] = rng.standard_normal(shape).astype(np.float32)
    state.value = values
    return values.get("scale"), values.get("bias")


def feature_shape(in_size, feature_axes):
    feature = {a % len(in_size) for a in feature_axes}
    return tuple(d if i in feature else 1 for i, d in enumerate(in_size))


def shifted(axes, in_rank, n_batch):
    """Axes counted within in_size, as axes of an input with n_batch leading batch axes."""
    return tuple(n_batch + (a % in_rank) for a in np.atleast_1d(axes))


def _ids(value):
    return str(value).replace(" ", "")


# ---------------------------------------------------------------------------
# LayerNorm and RMSNorm
# ---------------------------------------------------------------------------

# (in_size, reduction_axes, feature_axes)
AXIS_CASES = [
    ((8,), -1, -1),
    ((5, 6), (0, 1), -1),
    ((5, 6), 0, -1),
    ((5, 6), (0, 1), (0, 1)),
    ((3, 4, 5), (1, 2), (1, 2)),
    ((3, 4, 5), (-3, -1), 0),
]


@pytest.mark.parametrize("batch,mask_kind", SETTINGS, ids=_ids)
@pytest.mark.parametrize("case", AXIS_CASES, ids=_ids)
def test_layer_norm(rng, case, batch, mask_kind):
    in_size, red, feat = case
    layer = brainnorm.LayerNorm(in_size, reduction_axes=red, feature_axes=feat, epsilon=1e-5)
    pshape = feature_shape(in_size, np.atleast_1d(feat))
    assert layer.weight.value["scale"].shape == pshape
    assert layer.weight.value["bias"].shape == pshape
    scale, bias = randomize_affine(layer, rng)
    x = random_x(rng, batch + in_size)
    mask = make_mask(rng, x.shape, mask_kind)
    y = run(layer, x, mask)
    axes = shifted(red, len(in_size), len(batch))
    assert_close(y, ref.normalize(x, axes, mask, 1e-5, scale, bias))


@pytest.mark.parametrize("batch,mask_kind", SETTINGS, ids=_ids)
@pytest.mark.parametrize("case", AXIS_CASES, ids=_ids)
def test_rms_norm(rng, case, batch, mask_kind):
    in_size, red, feat = case
    layer = brainnorm.RMSNorm(in_size, reduction_axes=red, feature_axes=feat, epsilon=1e-5)
    pshape = feature_shape(in_size, np.atleast_1d(feat))
    assert set(layer.scale.value) == {"scale"}
    assert layer.scale.value["scale"].shape == pshape
    scale, _ = randomize_affine(layer, rng, "scale")
    x = random_x(rng, batch + in_size, offset=0.5)
    mask = make_mask(rng, x.shape, mask_kind)
    y = run(layer, x, mask)
    axes = shifted(red, len(in_size), len(batch))
    assert_close(y, ref.normalize(x, axes, mask, 1e-5, scale, None, use_mean=False))


def test_layer_norm_reduction_axis_zero_is_first_axis_of_in_size(rng):
    """reduction_axes=0 means the first axis of in_size for any batch rank (eager calls)."""
    layer = brainnorm.LayerNorm((4, 3), reduction_axes=0)
    scale, bias = randomize_affine(layer, rng)
    sample = random_x(rng, (4, 3))
    batch = random_x(rng, (2, 4, 3))
    seq = random_x(rng, (2, 2, 4, 3))
    assert_close(layer(sample), ref.normalize(sample, 0, None, 1e-6, scale, bias))
    assert_close(layer(batch), ref.normalize(batch, 1, None, 1e-6, scale, bias))
    assert_close(layer(seq), ref.normalize(seq, 2, None, 1e-6, scale, bias))


def test_layer_norm_sequence_mask_eager(rng):
    layer = brainnorm.LayerNorm((5, 4), reduction_axes=(0, 1))
    scale, bias = randomize_affine(layer, rng)
    x = random_x(rng, (3, 5, 4))
    mask = rng.random((3, 5, 1)) < 0.6
    mask[:, 0] = True
    assert_close(layer(x, mask), ref.normalize(x, (1, 2), mask, 1e-6, scale, bias))


def test_layer_norm_without_scale_or_bias(rng):
    layer = brainnorm.LayerNorm(6, use_scale=False, use_bias=True)
    assert set(layer.weight.value) == {"bias"}
    bias = rng.standard_normal((6,)).astype(np.float32)
    layer.weight.value = {"bias": bias}
    x = random_x(rng, (4, 6))
    assert_close(run(layer, x), ref.normalize(x, -1, None, 1e-6, None, bias))
    bare = brainnorm.LayerNorm(6, use_scale=False, use_bias=False)
    assert len(bare.states(brainstate.ParamState)) == 0
    assert_close(run(bare, x), ref.normalize(x, -1, None, 1e-6))


# ---------------------------------------------------------------------------
# BatchNorm
# ---------------------------------------------------------------------------

# (class, in_size, feature_axis)
BN_CASES = [
    (brainnorm.BatchNorm0d, (4,), -1),
    (brainnorm.BatchNorm1d, (6, 3), -1),
    (brainnorm.BatchNorm1d, (3, 6), 0),
    (brainnorm.BatchNorm2d, (4, 5, 3), -1),
    (brainnorm.BatchNorm2d, (3, 4, 5), 0),
    (brainnorm.BatchNorm3d, (2, 3, 4, 3), -1),
]


def _bn_id(case):
    cls, in_size, feat = case
    return f"{cls.__name__}-{in_size}-feat{feat}".replace(" ", "")


def _bn_axes(in_size, feat, n_batch):
    f = n_batch + feat % len(in_size)
    return tuple(a for a in range(n_batch + len(in_size)) if a != f)


@pytest.mark.parametrize("batch,mask_kind", SETTINGS, ids=_ids)
@pytest.mark.parametrize("case", BN_CASES, ids=_bn_id)
def test_batch_norm_train_then_eval(rng, case, batch, mask_kind):
    cls, in_size, feat = case
    # Mode through brainstate.environ['fit'] or through the call argument, alternately.
    style = "environ" if (BN_CASES.index(case) + SETTINGS.index((batch, mask_kind))) % 2 else "argument"
    layer = cls(in_size, feat, momentum=0.7, epsilon=1e-4)
    pshape = feature_shape(in_size, [feat])
    assert layer.weight.value["scale"].shape == pshape
    assert layer.running_mean.value.shape == pshape
    assert layer.running_var.value.shape == pshape
    scale, bias = randomize_affine(layer, rng)
    x = random_x(rng, batch + in_size)
    mask = make_mask(rng, x.shape, mask_kind)
    axes = _bn_axes(in_size, feat, len(batch))

    if style == "environ":
        with brainstate.environ.context(fit=True):
            y = run(layer, x, mask)
    else:
        y = run(layer, x, mask, use_running_average=False)
    assert_close(y, ref.normalize(x, axes, mask, 1e-4, scale, bias))

    r_mean, r_var = ref.running_update(np.zeros(in_size[feat]), np.ones(in_size[feat]), x, axes, 0.7, mask)
    assert_close(layer.running_mean.value, np.reshape(r_mean, pshape))
    assert_close(layer.running_var.value, np.reshape(r_var, pshape))
    assert int(layer.num_batches_tracked.value) == 1

    x2 = random_x(rng, batch + in_size)
    if style == "environ":
        with brainstate.environ.context(fit=False):
            y2 = run(layer, x2, mask)
    else:
        y2 = run(layer, x2, mask, use_running_average=True)
    assert_close(y2, ref.apply_stats(x2, np.reshape(r_mean, pshape), np.reshape(r_var, pshape), 1e-4, scale, bias))
    # Evaluation writes nothing.
    assert_close(layer.running_mean.value, np.reshape(r_mean, pshape))
    assert int(layer.num_batches_tracked.value) == 1


@pytest.mark.parametrize("case", BN_CASES[1:3], ids=_bn_id)
def test_batch_norm_running_stats_over_steps_eager(rng, case):
    cls, in_size, feat = case
    layer = cls(in_size, feat, momentum=0.9, unbiased_running_var=True)
    axes = _bn_axes(in_size, feat, 1)
    pshape = feature_shape(in_size, [feat])
    mean, var = np.zeros(in_size[feat]), np.ones(in_size[feat])
    for step in range(3):
        x = random_x(rng, (5,) + in_size, offset=step)
        mask = make_mask(rng, x.shape, "seq")
        with brainstate.environ.context(fit=True):
            y = layer(x, mask)
        assert_close(y, ref.normalize(x, axes, mask, 1e-5))
        mean, var = ref.running_update(mean, var, x, axes, 0.9, mask, unbiased=True)
        assert_close(layer.running_mean.value, np.reshape(mean, pshape))
        assert_close(layer.running_var.value, np.reshape(var, pshape))
    assert int(layer.num_batches_tracked.value) == 3


def test_batch_norm_constructor_use_running_average(rng):
    layer = brainnorm.BatchNorm1d((4, 3), use_running_average=True)
    mean = rng.standard_normal((1, 3)).astype(np.float32)
    var = (0.5 + rng.random((1, 3))).astype(np.float32)
    layer.running_mean.value = mean
    layer.running_var.value = var
    x = random_x(rng, (2, 4, 3))
    with brainstate.environ.context(fit=True):  # the constructor's choice wins over environ
        y = run(layer, x)
    assert_close(y, ref.apply_stats(x, mean, var, 1e-5))
    # The call argument wins over the constructor.
    y = run(layer, x, use_running_average=False)
    assert_close(y, ref.normalize(x, (0, 1), None, 1e-5))


# ---------------------------------------------------------------------------
# GroupNorm
# ---------------------------------------------------------------------------

# (in_size, feature_axis, num_groups, group_size, reduction_axes)
GN_CASES = [
    ((8,), -1, 4, None, None),
    ((5, 6), -1, 3, None, None),
    ((5, 6), -1, None, 2, (1,)),
    ((3, 4, 6), -1, 2, None, None),
    ((6, 3, 4), 0, 3, None, None),
    ((3, 4, 6), -1, 3, None, (0, 2)),
    ((3, 4, 6), 2, None, 6, (-2, -1)),
]


@pytest.mark.parametrize("batch,mask_kind", SETTINGS, ids=_ids)
@pytest.mark.parametrize("case", GN_CASES, ids=_ids)
def test_group_norm(rng, case, batch, mask_kind):
    in_size, feat, groups, gsize, red = case
    layer = brainnorm.GroupNorm(in_size, feat, groups, group_size=gsize, reduction_axes=red, epsilon=1e-5)
    channels = in_size[feat]
    n_groups = groups if groups is not None else channels // gsize
    assert layer.num_groups == n_groups and layer.group_size == channels // n_groups
    pshape = feature_shape(in_size, [feat])
    assert layer.weight.value["scale"].shape == pshape
    scale, bias = randomize_affine(layer, rng)
    x = random_x(rng, batch + in_size)
    mask = make_mask(rng, x.shape, mask_kind)
    y = run(layer, x, mask)
    n = len(batch)
    axes = shifted(range(len(in_size)) if red is None else red, len(in_size), n)
    expected = ref.group_normalize(x, n_groups, n + feat % len(in_size), axes, mask, 1e-5, scale, bias)
    assert_close(y, expected)


def test_group_norm_sequence_mask_eager(rng):
    layer = brainnorm.GroupNorm((5, 6), num_groups=2)
    scale, bias = randomize_affine(layer, rng)
    x = random_x(rng, (3, 5, 6))
    mask = rng.random((3, 5, 1)) < 0.6
    mask[:, 0] = True
    assert_close(layer(x, mask), ref.group_normalize(x, 2, -1, (1, 2), mask, 1e-6, scale, bias))


# ---------------------------------------------------------------------------
# InstanceNorm
# ---------------------------------------------------------------------------

IN_CASES = [((6, 3), -1), ((3, 6), 0), ((3, 4, 2), -1), ((2, 3, 4), 0)]


@pytest.mark.parametrize("batch,mask_kind", SETTINGS, ids=_ids)
@pytest.mark.parametrize("case", IN_CASES, ids=_ids)
def test_instance_norm(rng, case, batch, mask_kind):
    in_size, feat = case
    layer = brainnorm.InstanceNorm(in_size, feat)
    pshape = feature_shape(in_size, [feat])
    assert layer.weight.value["scale"].shape == pshape
    scale, bias = randomize_affine(layer, rng)
    x = random_x(rng, batch + in_size)
    mask = make_mask(rng, x.shape, mask_kind)
    f = feat % len(in_size)
    axes = tuple(len(batch) + a for a in range(len(in_size)) if a != f)
    assert_close(run(layer, x, mask), ref.normalize(x, axes, mask, 1e-5, scale, bias))


@pytest.mark.parametrize("case", IN_CASES[:2], ids=_ids)
def test_instance_norm_tracked_running_stats(rng, case):
    in_size, feat = case
    layer = brainnorm.InstanceNorm(in_size, feat, track_running_stats=True, momentum=0.6)
    pshape = feature_shape(in_size, [feat])
    assert layer.running_mean.value.shape == pshape
    x = random_x(rng, (4,) + in_size)
    f = 1 + feat % len(in_size)
    axes = tuple(a for a in range(1, x.ndim) if a != f)
    y = run(layer, x, use_running_average=False)
    assert_close(y, ref.normalize(x, axes, None, 1e-5))
    # PyTorch semantics: the batch average of the per-instance statistics.
    inst_mean, inst_var, _ = ref.moments(x, axes)
    batch_mean = inst_mean.mean(axis=0).reshape(pshape)
    batch_var = inst_var.mean(axis=0).reshape(pshape)
    assert_close(layer.running_mean.value, 0.4 * batch_mean)
    assert_close(layer.running_var.value, 0.6 + 0.4 * batch_var)
    x2 = random_x(rng, (2,) + in_size)
    y2 = run(layer, x2, use_running_average=True)
    assert_close(y2, ref.apply_stats(x2, 0.4 * batch_mean, 0.6 + 0.4 * batch_var, 1e-5))


# ---------------------------------------------------------------------------
# LocalResponseNorm
# ---------------------------------------------------------------------------

# (in_size, size, feature_axis)
LRN_CASES = [((6,), 3, -1), ((5, 6), 2, -1), ((6, 3, 4), 4, 0), ((3, 4, 5), 5, -1), ((4, 5), 1, 0)]


@pytest.mark.parametrize("batch,mask_kind", SETTINGS, ids=_ids)
@pytest.mark.parametrize("case", LRN_CASES, ids=_ids)
def test_local_response_norm(rng, case, batch, mask_kind):
    in_size, size, feat = case
    layer = brainnorm.LocalResponseNorm(in_size, size, alpha=0.4, beta=0.7, k=1.2, feature_axis=feat)
    assert len(layer.states()) == 0
    x = (2 * rng.standard_normal(batch + in_size)).astype(np.float32)
    mask = make_mask(rng, x.shape, mask_kind)
    fx = len(batch) + feat % len(in_size)
    y = run(layer, x, mask)
    if mask is None:
        expected = ref.local_response_norm(x, size, 0.4, 0.7, 1.2, fx)
    else:
        expected = ref.masked_local_response_norm(x, size, mask, 0.4, 0.7, 1.2, fx)
    assert_close(y, expected)


def test_local_response_norm_sequence_mask_keeps_valid_positions(rng):
    """A padding mask constant over channels changes nothing at valid positions."""
    layer = brainnorm.LocalResponseNorm((5, 6), 3, alpha=0.5)
    x = (2 * rng.standard_normal((2, 5, 6))).astype(np.float32)
    mask = rng.random((2, 5, 1)) < 0.5
    y = np.asarray(layer(x, mask))
    expected = ref.local_response_norm(x, 3, 0.5)
    valid = np.broadcast_to(mask, x.shape)
    assert_close(y[valid], expected[valid])


# ---------------------------------------------------------------------------
# Attributes and state types
# ---------------------------------------------------------------------------

LAYER_FACTORIES = {
    "BatchNorm0d": lambda: brainnorm.BatchNorm0d(5),
    "BatchNorm1d": lambda: brainnorm.BatchNorm1d((4, 5)),
    "BatchNorm2d": lambda: brainnorm.BatchNorm2d((5, 3, 4), 0),
    "BatchNorm3d": lambda: brainnorm.BatchNorm3d((2, 3, 4, 5)),
    "LayerNorm": lambda: brainnorm.LayerNorm((3, 5)),
    "RMSNorm": lambda: brainnorm.RMSNorm((3, 5)),
    "GroupNorm": lambda: brainnorm.GroupNorm((3, 4, 6), num_groups=3),
    "InstanceNorm": lambda: brainnorm.InstanceNorm((3, 5), track_running_stats=True),
    "LocalResponseNorm": lambda: brainnorm.LocalResponseNorm((3, 5), 3),
}

EXPECTED_IN_SIZE = {
    "BatchNorm0d": (5,),
    "BatchNorm1d": (4, 5),
    "BatchNorm2d": (5, 3, 4),
    "BatchNorm3d": (2, 3, 4, 5),
    "LayerNorm": (3, 5),
    "RMSNorm": (3, 5),
    "GroupNorm": (3, 4, 6),
    "InstanceNorm": (3, 5),
    "LocalResponseNorm": (3, 5),
}

EXPECTED_PARAM_SHAPE = {
    "BatchNorm0d": (5,),
    "BatchNorm1d": (1, 5),
    "BatchNorm2d": (5, 1, 1),
    "BatchNorm3d": (1, 1, 1, 5),
    "LayerNorm": (1, 5),
    "RMSNorm": (1, 5),
    "GroupNorm": (1, 1, 6),
    "InstanceNorm": (1, 5),
}

HAS_RUNNING = {"BatchNorm0d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm"}


@pytest.mark.parametrize("name", list(LAYER_FACTORIES))
def test_sizes_parameters_and_state_types(name):
    layer = LAYER_FACTORIES[name]()
    assert isinstance(layer, brainstate.nn.Module)
    assert tuple(layer.in_size) == EXPECTED_IN_SIZE[name]
    assert tuple(layer.out_size) == EXPECTED_IN_SIZE[name]
    params = layer.states(brainstate.ParamState)
    if name == "LocalResponseNorm":
        assert len(params) == 0
        assert len(layer.states()) == 0
        return
    assert len(params) == 1
    (state,) = params.values()
    assert isinstance(state, brainnorm.NormalizationParamState)
    assert isinstance(state, brainstate.ParamState)
    expected_keys = {"scale"} if name == "RMSNorm" else {"scale", "bias"}
    assert set(state.value) == expected_keys
    for value in state.value.values():
        assert tuple(np.shape(value)) == EXPECTED_PARAM_SHAPE[name]
    np.testing.assert_array_equal(np.asarray(state.value["scale"]), 1.0)
    if "bias" in state.value:
        np.testing.assert_array_equal(np.asarray(state.value["bias"]), 0.0)
    others = [s for s in layer.states().values() if s is not state]
    if name in HAS_RUNNING:
        assert {id(layer.running_mean), id(layer.running_var), id(layer.num_batches_tracked)} == {
            id(s) for s in others
        }
        for s in others:
            assert isinstance(s, brainstate.ShortTermState)
            assert not isinstance(s, brainstate.ParamState)
        assert tuple(np.shape(layer.running_mean.value)) == EXPECTED_PARAM_SHAPE[name]
    else:
        assert others == []


def test_model_param_states_are_exactly_scale_and_bias():
    class Model(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [factory() for factory in LAYER_FACTORIES.values()]

    model = Model()
    params = model.states(brainstate.ParamState)
    assert len(params) == len(LAYER_FACTORIES) - 1  # LocalResponseNorm has none
    for state in params.values():
        assert isinstance(state, brainnorm.NormalizationParamState)
        assert set(state.value) <= {"scale", "bias"}
    short = model.states(brainstate.ShortTermState)
    assert len(short) == 3 * len(HAS_RUNNING)


def test_int_in_size_means_one_axis():
    for layer in (brainnorm.LayerNorm(7), brainnorm.RMSNorm(7), brainnorm.BatchNorm0d(7),
                  brainnorm.GroupNorm(7, num_groups=7), brainnorm.LocalResponseNorm(7, 2)):
        assert tuple(layer.in_size) == (7,) and tuple(layer.out_size) == (7,)


@pytest.mark.parametrize(
    "factory,reference",
    [
        (lambda: brainnorm.GroupNorm((5, 6), num_groups=3),
         lambda x, m: ref.group_normalize(x, 3, -1, (1, 2), m, 1e-6)),
        (lambda: brainnorm.LayerNorm((5, 6), reduction_axes=(0, 1)), lambda x, m: ref.normalize(x, (1, 2), m, 1e-6)),
        (lambda: brainnorm.BatchNorm1d((5, 6), use_running_average=False),
         lambda x, m: ref.normalize(x, (0, 1), m, 1e-5)),
    ],
    ids=["GroupNorm", "LayerNorm", "BatchNorm1d"],
)
def test_integer_sequence_mask_reads_nonzero(rng, factory, reference):
    x = random_x(rng, (3, 5, 6))
    int_mask = rng.integers(0, 3, size=(3, 5, 1)).astype(np.int32)
    int_mask[:, 0] = 2
    y = run(factory(), x, int_mask)
    assert_close(y, reference(x, int_mask != 0))
