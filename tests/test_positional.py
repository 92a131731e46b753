"""brainstate 0.5's positional constructor arguments, in the same positions and with the same names.

For every class that brainstate.nn also has, the parameters that brainstate
takes positionally come first in brainnorm's signature, in the same order and
with the same names, and calls made positionally give brainstate's outputs.
brainnorm's keyword names that brainstate lacks keep working (flax aliases).
"""

from __future__ import annotations

import inspect

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainnorm

# brainstate.nn classes of the same name (checked below to be found by the scan, so a renaming in either
# library fails here instead of shrinking the comparison silently)
EXPECTED_SHARED = {"BatchNorm0d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "RMSNorm", "GroupNorm"}
SHARED = sorted(
    name
    for name in brainnorm.__all__
    if isinstance(getattr(brainnorm, name), type) and isinstance(getattr(brainstate.nn, name, None), type)
)

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _positional(parameters):
    return [p.name for p in parameters if p.kind in _POSITIONAL]


def _brainstate_parameters(name):
    """Parameters of brainstate's ``__init__`` without ``self`` (its metaclass hides them from the class)."""
    return list(inspect.signature(getattr(brainstate.nn, name).__init__).parameters.values())[1:]


def test_every_shared_class_is_compared():
    assert EXPECTED_SHARED <= set(SHARED), f"brainstate.nn classes also in brainnorm: {SHARED}"


@pytest.mark.parametrize("name", SHARED)
def test_positional_parameters_match_brainstate(name):
    expected = _positional(_brainstate_parameters(name))
    ours = list(inspect.signature(getattr(brainnorm, name)).parameters.values())
    assert _positional(ours)[: len(expected)] == expected, (
        f"{name}: brainstate takes {expected} positionally, brainnorm {_positional(ours)}"
    )
    # nothing positional beyond brainstate's: a later positional argument would mean something else there
    assert _positional(ours) == expected


@pytest.mark.parametrize("name", SHARED)
def test_every_brainstate_keyword_is_accepted(name):
    ours = inspect.signature(getattr(brainnorm, name)).parameters
    missing = [p.name for p in _brainstate_parameters(name) if p.name not in ours]
    assert not missing, f"{name}: brainstate's keywords {missing} are not accepted"


def _random(shape, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32) * 2.0 + 0.5


def _close(a, b, atol=2e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=atol)


def _group_reference(x, groups, epsilon):
    """Group normalization of ``(B, C)`` in float64, from the same float32 values."""
    x = np.asarray(x, np.float64)
    grouped = x.reshape(x.shape[0], groups, -1)
    mean = grouped.mean(-1, keepdims=True)
    var = grouped.var(-1, keepdims=True)
    return ((grouped - mean) / np.sqrt(var + epsilon)).reshape(x.shape)


def test_layer_norm_positional_reduction_axes_equals_brainstate():
    x = _random((4, 32))
    ours = brainnorm.LayerNorm(32, -1)
    theirs = brainstate.nn.LayerNorm(32, -1)
    assert ours.reduction_axes == (0,) and ours.feature_axes == (0,)
    _close(ours(x), theirs(x))


def test_layer_norm_positional_two_axes_equals_brainstate():
    x = _random((3, 4, 8), seed=1)
    ours = brainnorm.LayerNorm((4, 8), (-2, -1), -1)
    theirs = brainstate.nn.LayerNorm((4, 8), (-2, -1), -1)
    assert ours.weight.value["scale"].shape == theirs.weight.value["scale"].shape == (1, 8)
    _close(ours(x), theirs(x))


def test_group_norm_positional_num_groups_equals_brainstate():
    x = _random((5, 8), seed=2)
    ours = brainnorm.GroupNorm(8, -1, 4)
    theirs = brainstate.nn.GroupNorm(8, -1, 4)
    assert (ours.num_groups, ours.group_size) == (4, 2)
    # groups of two channels with close values: brainstate's one-pass variance loses about 6e-5 here, the
    # robust default does not; so ours is compared with brainstate within that rounding, and with float64
    _close(ours(x), theirs(x), atol=1e-4)
    reference = _group_reference(x, 4, 1e-6)
    assert np.max(np.abs(np.asarray(ours(x)) - reference)) < 1e-6
    # with brainstate's formula the outputs agree to float32 rounding
    _close(brainnorm.GroupNorm(8, -1, 4, use_fast_variance=True)(x), theirs(x), atol=1e-6)


def test_group_norm_positional_group_size_equals_brainstate():
    x = _random((5, 8), seed=3)
    ours = brainnorm.GroupNorm(8, -1, None, 2)
    theirs = brainstate.nn.GroupNorm(8, -1, None, 2)
    assert (ours.num_groups, ours.group_size) == (4, 2)
    _close(ours(x), theirs(x))


@pytest.mark.parametrize(
    ("name", "in_size", "feature_axis"),
    [
        ("BatchNorm0d", (6,), -1),
        ("BatchNorm1d", (5, 3), -1),
        ("BatchNorm1d", (3, 5), 0),
        ("BatchNorm2d", (4, 4, 3), -1),
        ("BatchNorm3d", (2, 3, 3, 2), -1),
    ],
)
def test_batch_norm_positional_feature_axis_equals_brainstate(name, in_size, feature_axis):
    x = _random((8,) + in_size, seed=4)
    ours = getattr(brainnorm, name)(in_size, feature_axis)
    theirs = getattr(brainstate.nn, name)(in_size, feature_axis)
    with brainstate.environ.context(fit=True):
        _close(ours(x), theirs(x))
    channels = in_size[feature_axis]
    for mine, other in ((ours.running_mean, theirs.running_mean), (ours.running_var, theirs.running_var)):
        if feature_axis == -1:
            assert mine.value.shape == other.value.shape
        # channels first: brainstate 0.5.4 stores its statistics as (C, C) (each row the C channel values),
        # brainnorm as in_size with 1 at the non-feature axes, (C, 1); the per-channel values agree
        _close(np.ravel(mine.value), np.reshape(other.value, (-1, channels))[0])
    if feature_axis == -1:  # brainstate 0.5.4 cannot evaluate channels first from its (C, C) statistics
        with brainstate.environ.context(fit=False):
            _close(ours(x), theirs(x))


def test_rms_norm_equals_brainstate():
    x = _random((4, 32), seed=5)
    _close(brainnorm.RMSNorm(32)(x), brainstate.nn.RMSNorm(32)(x))


def test_keywords_still_work():
    """brainnorm's keyword spellings, and keywords given where brainstate has positions."""
    x = _random((2, 4, 8), seed=6)
    by_keyword = brainnorm.LayerNorm((4, 8), reduction_axes=(-2, -1), feature_axes=-1)
    by_position = brainnorm.LayerNorm((4, 8), (-2, -1), -1)
    _close(by_keyword(x), by_position(x))
    gn = brainnorm.GroupNorm(8, feature_axis=-1, num_groups=None, group_size=4)
    assert (gn.num_groups, gn.group_size) == (2, 4)
    bn = brainnorm.BatchNorm1d((4, 3), feature_axis=-1, scale_init=jnp.full((1, 3), 2.0))
    assert float(bn.weight.value["scale"][0, 0]) == 2.0
    with pytest.raises(TypeError):
        brainnorm.LayerNorm((4, 8), (-2, -1), -1, 1e-5)  # epsilon is keyword-only, as in brainstate
