"""Reliability at the edges: data near float32's range, epsilon underflow, and every option validated.

* Scale invariance: a normalized output is the same for ``x`` and ``c * x``
  up to float32's largest value (the sums of squares of ``1e20`` overflow
  float32; the core forms them on values rescaled by a power of two).
* ``epsilon`` that rounds to 0 in the statistics dtype is refused, naming the
  smallest accepted value.
* Every option and call argument of the wrong kind, NaN, inf, negative or
  huge gives either success or a ``TypeError``/``ValueError`` naming the
  option (a catalogue of the cases a fuzzing run found, then a hypothesis
  test over every option of every public layer and function, derived from
  ``__all__`` and the signatures).

Padding that holds NaN or inf is in the hazard matrix (``test_hazards.py``).
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import brainnorm
from brainnorm import functional as F

from . import reference as ref

# --- scale invariance -------------------------------------------------------------------------

MAGNITUDES = [1e18, 1e20, 1e30, 1e37]


def _data(shape, magnitude, seed=0):
    rng = np.random.default_rng(seed)
    return (magnitude * rng.uniform(-1, 1, shape)).astype(np.float32)


FUNCTIONS = {
    # name -> (f(x, mask), reference(x64, mask)); x is (4, 6, 256), reductions over the last axis or more
    "layer_norm": (lambda x, m: F.layer_norm(x, mask=m, epsilon=1e-5),
                   lambda x, m: ref.normalize(x, (2,), m, 1e-5)),
    "rms_norm": (lambda x, m: F.rms_norm(x, mask=m, epsilon=1e-5),
                 lambda x, m: ref.normalize(x, (2,), m, 1e-5, use_mean=False)),
    "batch_norm": (lambda x, m: F.batch_norm(x, None, None, mask=m, epsilon=1e-5, training=True)[0],
                   lambda x, m: ref.normalize(x, (0, 1), m, 1e-5)),
    "group_norm": (lambda x, m: F.group_norm(x, 4, mask=m, epsilon=1e-5),
                   lambda x, m: ref.group_normalize(x, 4, -1, (1, 2), m, 1e-5)),
    "instance_norm": (lambda x, m: F.instance_norm(x, mask=m, epsilon=1e-5),
                      lambda x, m: ref.normalize(x, (1,), m, 1e-5)),
}


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("magnitude", MAGNITUDES)
@pytest.mark.parametrize("name", FUNCTIONS)
def test_output_is_scale_invariant_through_float32s_range(name, magnitude, masked):
    """Data of magnitude 1e18 .. 1e37 in float32 normalize like the float64 reference (1e-4)."""
    f, reference = FUNCTIONS[name]
    x = _data((4, 6, 256), magnitude)
    mask = None
    if masked:
        mask = np.random.default_rng(1).random((4, 6, 1)) < 0.7
        mask[0, 0] = True
    y = np.asarray(jax.jit(f)(jnp.asarray(x), None if mask is None else jnp.asarray(mask)), np.float64)
    expected = reference(x.astype(np.float64), mask)
    valid = np.ones(y.shape, bool) if mask is None else np.broadcast_to(mask, y.shape)
    assert np.all(np.isfinite(y[valid]))
    np.testing.assert_allclose(y[valid], expected[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("magnitude", [1e20, 1e30])
def test_gradient_is_scale_invariant(magnitude):
    """d y / d x scales as 1 / c: the gradient at c * x times c equals the gradient at x.

    (Up to epsilon's share of the variance at scale 1, 3e-5 here. At 1e37 the gradients themselves, about
    1e-37, fall below float32's smallest normal number.)
    """
    x = _data((4, 64), 1.0)
    w = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)

    def loss(v):
        return jnp.sum(F.layer_norm(v, epsilon=1e-5) * w)

    g1 = np.asarray(jax.grad(loss)(jnp.asarray(x)), np.float64)
    gc = np.asarray(jax.grad(loss)(jnp.asarray(x * np.float32(magnitude))), np.float64)
    assert np.all(np.isfinite(gc))
    np.testing.assert_allclose(gc * magnitude, g1, rtol=1e-3, atol=1e-4)


def test_layer_norm_of_1e18_over_1024_elements():
    """The fuzzing case: the old core was off by 3.2 here (its sums of squares overflowed)."""
    x = _data((4, 1024), 1e18)
    y = np.asarray(F.layer_norm(jnp.asarray(x), epsilon=1e-5), np.float64)
    np.testing.assert_allclose(y, ref.normalize(x.astype(np.float64), (1,), None, 1e-5), atol=1e-4)


def test_batch_statistics_of_huge_data_are_exact_where_representable():
    """Moments of 1e19-scale data (variance 3e37, squares overflow) match float64 to float32 rounding."""
    x = _data((64, 3), 1e19)
    mean, var = F.moments(jnp.asarray(x), axes=0)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(np.asarray(mean, np.float64).ravel(), x64.mean(0), rtol=1e-4, atol=1e14)
    np.testing.assert_allclose(np.asarray(var, np.float64).ravel(), x64.var(0), rtol=1e-5)


def test_constant_huge_group_normalizes_to_zero():
    """A constant group at 1e30: variance 0 and epsilon far below the data's scale: 0, not 0 * inf."""
    y = F.layer_norm(jnp.full((2, 8), 1e30, jnp.float32), epsilon=1e-5)
    assert np.array_equal(np.asarray(y), np.zeros((2, 8), np.float32))


# --- epsilon that rounds to 0 ---------------------------------------------------------------------

TINY32 = float(np.finfo(np.float32).tiny)


@pytest.mark.parametrize("epsilon", [1e-50, 1e-46, 1e-40])
def test_epsilon_below_the_smallest_float32_is_refused(epsilon):
    message = re.escape(f"{TINY32:.8g}")
    with pytest.raises(ValueError, match="LayerNorm: epsilon must be at least " + message):
        brainnorm.LayerNorm(3, epsilon=epsilon)
    with pytest.raises(ValueError, match="batch_norm: epsilon must be at least " + message):
        F.batch_norm(jnp.ones((4, 3)), None, None, epsilon=epsilon, training=True)


def test_smallest_epsilon_is_accepted_and_keeps_a_constant_input_finite():
    y = F.layer_norm(jnp.ones((2, 4)), epsilon=TINY32)
    assert np.array_equal(np.asarray(y), np.zeros((2, 4), np.float32))


# --- the catalogue: every case the fuzzing run found -----------------------------------------------

x3 = np.ones((4, 3), np.float32)


def _tdbn(**kw):
    return brainnorm.ThresholdDependentBatchNorm(3, **kw)


def _bntt_call(t):
    layer = brainnorm.BatchNormThroughTime(3, num_steps=4)
    return layer(x3, t=t)


# (id, call, exception type, words that the message contains in this order)
CATALOGUE = [
    ("tdbn-alpha-str", lambda: _tdbn(alpha="abc"), TypeError, ["ThresholdDependentBatchNorm", "alpha", "'abc'"]),
    ("tdbn-alpha-none", lambda: _tdbn(alpha=None), TypeError, ["ThresholdDependentBatchNorm", "alpha", "None"]),
    ("tdbn-alpha-complex", lambda: _tdbn(alpha=1j), TypeError, ["ThresholdDependentBatchNorm", "alpha", "1j"]),
    ("tdbn-v_th-none", lambda: _tdbn(v_th=None), TypeError, ["ThresholdDependentBatchNorm", "v_th", "None"]),
    ("tdbn-v_th-complex", lambda: _tdbn(v_th=1 + 1j), TypeError, ["ThresholdDependentBatchNorm", "v_th"]),
    ("tdbn-v_th-nan", lambda: _tdbn(v_th=math.nan), ValueError, ["ThresholdDependentBatchNorm", "v_th", "nan"]),
    ("lrn-alpha-str", lambda: brainnorm.LocalResponseNorm(3, 2, alpha="abc"), TypeError,
     ["LocalResponseNorm", "alpha", "'abc'"]),
    ("lrn-beta-none", lambda: brainnorm.LocalResponseNorm(3, 2, beta=None), TypeError,
     ["LocalResponseNorm", "beta", "None"]),
    ("lrn-k-str", lambda: brainnorm.LocalResponseNorm(3, 2, k="x"), TypeError, ["LocalResponseNorm", "k", "'x'"]),
    ("lrn-alpha-nan", lambda: brainnorm.LocalResponseNorm(3, 2, alpha=math.nan), ValueError,
     ["LocalResponseNorm", "alpha", "nan"]),
    ("F.lrn-alpha-str", lambda: F.local_response_norm(x3, 2, alpha="abc"), TypeError,
     ["local_response_norm", "alpha", "'abc'"]),
    ("F.lrn-k-nan", lambda: F.local_response_norm(x3, 2, k=math.nan), ValueError, ["local_response_norm", "k"]),
    ("bntt-num_steps-none", lambda: brainnorm.BatchNormThroughTime(3, num_steps=None), TypeError,
     ["BatchNormThroughTime", "num_steps", "None"]),
    ("scale_init-str", lambda: brainnorm.LayerNorm(3, scale_init="ones"), TypeError,
     ["LayerNorm", "scale_init", "'ones'"]),
    ("bias_init-str", lambda: brainnorm.GroupNorm(4, num_groups=2, bias_init="zeros"), TypeError,
     ["GroupNorm", "bias_init", "'zeros'"]),
    ("mask-str", lambda: brainnorm.LayerNorm(3)(x3, mask="abc"), TypeError, ["LayerNorm", "mask", "'abc'"]),
    ("x-none", lambda: brainnorm.LayerNorm(3)(None), TypeError, ["LayerNorm", "x", "None"]),
    ("x-str", lambda: brainnorm.LayerNorm(3)("abc"), TypeError, ["LayerNorm", "x", "'abc'"]),
    ("F.x-none", lambda: F.layer_norm(None), TypeError, ["layer_norm", "x", "None"]),
    ("t-str", lambda: _bntt_call("a"), TypeError, ["BatchNormThroughTime", "t", "'a'"]),
    ("t-array", lambda: _bntt_call(np.array([1, 2])), TypeError, ["BatchNormThroughTime", "t", "shape (2,)"]),
    ("t-float", lambda: _bntt_call(1.7), TypeError, ["BatchNormThroughTime", "t", "1.7"]),
    ("t-float-array", lambda: _bntt_call(jnp.array(2.9)), TypeError, ["BatchNormThroughTime", "t", "float32"]),
    ("t-bool", lambda: _bntt_call(True), TypeError, ["BatchNormThroughTime", "t", "True"]),
    ("t-negative", lambda: _bntt_call(-1), ValueError, ["BatchNormThroughTime", "t", "-1"]),
    ("F.bn-running-shape", lambda: F.batch_norm(x3, np.zeros(5), np.ones(5), training=True), ValueError,
     ["batch_norm", "running_mean", "(5,)"]),
    ("F.ln-scale-shape", lambda: F.layer_norm(x3, scale=np.ones(5)), ValueError, ["layer_norm", "scale", "(5,)"]),
    ("F.bn-bias-shape", lambda: F.batch_norm(x3, None, None, None, np.ones((2, 3)), training=True), ValueError,
     ["batch_norm", "bias", "(2, 3)"]),
    ("dtype-str", lambda: brainnorm.LayerNorm(3, dtype="foo"), TypeError, ["LayerNorm", "dtype", "'foo'"]),
    ("param_dtype-str", lambda: brainnorm.LayerNorm(3, param_dtype="foo"), TypeError,
     ["LayerNorm", "param_dtype", "'foo'"]),
    ("param_dtype-int", lambda: brainnorm.BatchNorm0d(3, param_dtype=jnp.int32), TypeError,
     ["BatchNorm0d", "param_dtype", "int32"]),
    ("F.dtype-str", lambda: F.layer_norm(x3, dtype="foo"), TypeError, ["layer_norm", "dtype", "'foo'"]),
    ("use_running_average-str", lambda: brainnorm.BatchNorm0d(3, use_running_average="False"), TypeError,
     ["BatchNorm0d", "use_running_average", "'False'"]),
    ("use_running_average-call-str", lambda: brainnorm.BatchNorm0d(3)(x3, use_running_average="no"), TypeError,
     ["BatchNorm0d", "use_running_average", "'no'"]),
    ("use_scale-str", lambda: brainnorm.LayerNorm(3, use_scale="False"), TypeError, ["LayerNorm", "use_scale"]),
    ("spectral-axis-tuple", lambda: brainnorm.SpectralNorm(brainstate.nn.Linear(3, 4), axis=(0, 1)), TypeError,
     ["SpectralNorm", "axis", "(0, 1)"]),
    ("axis_index_groups-without-name", lambda: brainnorm.BatchNorm0d(3, axis_index_groups=[[0, 1]]), ValueError,
     ["BatchNorm0d", "axis_index_groups", "axis_name"]),
    ("F.axis_index_groups-without-name", lambda: F.layer_norm(x3, axis_index_groups=[[0, 1]]), ValueError,
     ["layer_norm", "axis_index_groups", "axis_name"]),
    ("axis_index_groups-ragged", lambda: brainnorm.LayerNorm(3, axis_name="b", axis_index_groups=[[0, 1], [2]]),
     ValueError, ["LayerNorm", "axis_index_groups"]),
    ("axis_name-float", lambda: brainnorm.LayerNorm(3, axis_name=1.5), TypeError, ["LayerNorm", "axis_name"]),
    ("epsilon-underflow", lambda: brainnorm.BatchNorm0d(3, epsilon=1e-50), ValueError,
     ["BatchNorm0d", "epsilon", "at least", "1e-50"]),
    ("wrapper-name-nan", lambda: brainnorm.WeightNorm(brainstate.nn.Linear(3, 4), name=math.nan), TypeError,
     ["WeightNorm", "name", "nan"]),
    ("wrapper-weight_name-none", lambda: brainnorm.SpectralNorm(brainstate.nn.Linear(3, 4), weight_name=None),
     TypeError, ["SpectralNorm", "weight_name", "None"]),
    ("wrapper-weight_name-list", lambda: brainnorm.WeightNorm(brainstate.nn.Linear(3, 4), weight_name=[]),
     TypeError, ["WeightNorm", "weight_name", "[]"]),
    ("wrapper-weight_name-missing", lambda: brainnorm.WeightNorm(brainstate.nn.Linear(3, 4), weight_name="abc"),
     ValueError, ["WeightNorm", "weight_name", "'abc'"]),
    ("wrapper-epsilon-unit", lambda: brainnorm.SpectralNorm(brainstate.nn.Linear(3, 4), epsilon=1.0 * u.mV),
     TypeError, ["SpectralNorm", "epsilon", "mV"]),
    ("fold_threshold-v_th-nan", lambda: brainnorm.fold_threshold(brainnorm.BatchNorm0d(3), math.nan), ValueError,
     ["fold_threshold", "v_th", "nan"]),
    ("fold_threshold-v_th-huge-int", lambda: brainnorm.fold_threshold(brainnorm.BatchNorm0d(3), 10**30), TypeError,
     ["fold_threshold", "v_th", str(10**30)]),
    ("fold_threshold-v_th-str", lambda: brainnorm.fold_threshold(brainnorm.BatchNorm0d(3), "abc"), TypeError,
     ["fold_threshold", "v_th", "'abc'"]),
    ("fold_threshold-v_th-none", lambda: brainnorm.fold_threshold(brainnorm.BatchNorm0d(3), None), TypeError,
     ["fold_threshold", "v_th", "None"]),
]


@pytest.mark.parametrize("call, error, words", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_catalogue(call, error, words):
    with pytest.raises(error, match="(?s)" + ".*".join(re.escape(w) for w in words)):
        call()


def test_list_axis_name_is_read_as_a_tuple():
    """A list of axis names (unhashable) is accepted as the tuple of those names."""
    layer = brainnorm.LayerNorm(3, axis_name=["a", "b"])
    assert layer.axis_name == ("a", "b")


def test_a_refused_call_writes_nothing():
    layer = brainnorm.BatchNormThroughTime(3, num_steps=4)
    before = {path: np.asarray(state.value) for path, state in layer.states().items()}
    for t in (1.7, "a", True):
        with pytest.raises(TypeError):
            layer(x3, t=t)
    with pytest.raises(TypeError):
        layer(x3, t=0, use_running_average="yes")
    for path, state in layer.states().items():
        assert np.array_equal(np.asarray(state.value), before[path]), path


# --- fuzzing every option of every public layer and function ----------------------------------------
#
# The targets are derived from ``brainnorm.__all__`` and ``brainnorm.functional.__all__`` at run time, and
# the options from each target's signature: a public name or an option added later is fuzzed without an edit
# here. ``FUZZ_TARGETS`` gives each name valid arguments for its required parameters and the data to run it
# on; ``FUZZ_EXCLUDED`` lists the public names with nothing to fuzz, each with its reason;
# ``test_every_public_name_is_fuzzed`` fails for a name in neither.

x_seq = np.ones((4, 2, 3), np.float32)  # (T, B, C): the temporal functions and instance_norm


def _run(layer, x, batch_size=None):
    """Build-and-run: a layer that was built is also called once on valid input (training)."""
    if batch_size is not None:
        layer.init_state(batch_size)
    with brainstate.environ.context(fit=True, dt=0.1, i=0):  # i: the step index of single-step temporal layers
        return layer(x)


def _linear():
    return brainstate.nn.Linear(3, 4)


@dataclass(frozen=True)
class FuzzTarget:
    """``required``: valid values of the required parameters; ``run(built)`` runs what the call returned."""

    required: dict = field(default_factory=dict)
    run: object = None


_LAYER = FuzzTarget(dict(in_size=3), lambda layer: _run(layer, x3))
_STEPS = FuzzTarget(dict(in_size=3, num_steps=4), lambda layer: _run(layer, x3))
_STATEFUL = FuzzTarget(dict(in_size=3), lambda layer: _run(layer, x3, batch_size=4))
_WRAPPER = FuzzTarget(dict(layer=_linear), lambda wrapper: _run(wrapper, x3))

FUZZ_TARGETS = {
    "BatchNorm0d": _LAYER,
    "BatchNorm1d": FuzzTarget(dict(in_size=(2, 3)), lambda layer: _run(layer, x_seq)),
    "BatchNorm2d": FuzzTarget(dict(in_size=(2, 2, 3)), lambda layer: _run(layer, np.ones((2, 2, 2, 3), np.float32))),
    "BatchNorm3d": FuzzTarget(dict(in_size=(1, 2, 2, 3)),
                              lambda layer: _run(layer, np.ones((2, 1, 2, 2, 3), np.float32))),
    "BatchRenorm": _LAYER,
    "LayerNorm": FuzzTarget(dict(in_size=(2, 3)), lambda layer: _run(layer, x_seq)),
    "RMSNorm": FuzzTarget(dict(in_size=(2, 3)), lambda layer: _run(layer, x_seq)),
    "GroupNorm": FuzzTarget(dict(in_size=(2, 4), num_groups=2), lambda layer: _run(layer, np.ones((3, 2, 4)))),
    "InstanceNorm": FuzzTarget(dict(in_size=(2, 3)), lambda layer: _run(layer, x_seq)),
    "LocalResponseNorm": FuzzTarget(dict(in_size=3, size=2), lambda layer: _run(layer, x3)),
    "WeightNorm": _WRAPPER,
    "SpectralNorm": _WRAPPER,
    "BatchNormThroughTime": _STEPS,
    "ThresholdDependentBatchNorm": _LAYER,
    "TemporalEffectiveBatchNorm": _STEPS,
    "TemporalAccumulatedBatchNorm": _STEPS,
    "NeuNorm": _STATEFUL,
    "DivisiveNormalization": _LAYER,
    "GDN": _LAYER,
    "DynamicDivisiveNormalization": _STATEFUL,
    "fold_batch_norm": FuzzTarget(dict(layer=_linear, norm=lambda: brainnorm.BatchNorm0d(4)),
                                  lambda folded: folded(x3)),
    "fold_threshold": FuzzTarget(dict(norm=lambda: brainnorm.BatchNorm0d(3), v_th=1.0)),
    "normalize_for_conversion": FuzzTarget(dict(layers=lambda: [_linear()], activations=[np.linspace(0, 2, 8)]),
                                           lambda layers: layers[0](x3)),
    "record_activations": FuzzTarget(dict(layers=lambda: [_linear()], x=x3)),
    "weight_standardization": FuzzTarget(dict(w=x3)),
    "functional.moments": FuzzTarget(dict(x=x3, axes=0)),
    "functional.normalize": FuzzTarget(dict(x=x3, mean=np.zeros(3), var=np.ones(3))),
    "functional.layer_norm": FuzzTarget(dict(x=x3)),
    "functional.rms_norm": FuzzTarget(dict(x=x3)),
    "functional.batch_norm": FuzzTarget(dict(x=x3, training=True)),
    "functional.group_norm": FuzzTarget(dict(x=np.ones((4, 4), np.float32), num_groups=2)),
    "functional.instance_norm": FuzzTarget(dict(x=x_seq)),
    "functional.local_response_norm": FuzzTarget(dict(x=x3, size=2)),
    "functional.weight_standardization": FuzzTarget(dict(w=x3)),
    "functional.batch_renorm": FuzzTarget(dict(x=x3, running_mean=np.zeros(3), running_var=np.ones(3),
                                               training=True)),
    "functional.lp_normalize": FuzzTarget(dict(x=x3)),
    "functional.divisive_normalization": FuzzTarget(dict(x=x3)),
    "functional.gdn": FuzzTarget(dict(x=x3, beta=np.ones(3), gamma=0.1 * np.eye(3))),
    "functional.temporal_accumulated_batch_norm": FuzzTarget(dict(x=x_seq, training=True)),
    "functional.neu_norm": FuzzTarget(dict(x=x3, weight=np.ones(3))),
}

FUZZ_EXCLUDED = {
    "NormalizationParamState": "a brainstate.ParamState: it holds whatever value it is given, as its base does",
    "functional": "the module of functions; its names are fuzzed from functional.__all__",
    "backend_info": "takes no argument",
}


def _public(name):
    return getattr(F, name.split(".", 1)[1]) if name.startswith("functional.") else getattr(brainnorm, name)


def _owner(name):
    """The name that error messages start with: the class or the function."""
    return name.split(".", 1)[-1]


def fuzzed_options(name):
    """Every parameter of the target's signature (``**kwargs`` of a signature cannot be enumerated)."""
    return [p.name for p in inspect.signature(_public(name)).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def test_every_public_name_is_fuzzed():
    names = set(brainnorm.__all__) | {f"functional.{n}" for n in F.__all__}
    missing = sorted(names - set(FUZZ_TARGETS) - set(FUZZ_EXCLUDED))
    assert not missing, f"public names with no entry in FUZZ_TARGETS and no reason in FUZZ_EXCLUDED: {missing}"
    stale = sorted((set(FUZZ_TARGETS) | set(FUZZ_EXCLUDED)) - names)
    assert not stale, f"FUZZ_TARGETS or FUZZ_EXCLUDED name what is not public: {stale}"
    for name, target in FUZZ_TARGETS.items():
        options = fuzzed_options(name)
        assert set(target.required) <= set(options), f"{name}: required arguments {set(target.required) - set(options)}"
    total = sum(len(fuzzed_options(n)) for n in FUZZ_TARGETS)
    print(f"fuzz: {len(names)} public names, {len(FUZZ_TARGETS)} fuzzed ({total} options), "
          f"{len(FUZZ_EXCLUDED)} excluded")


BAD_VALUES = st.one_of(
    st.sampled_from([None, "abc", "", "False", "float32", math.nan, math.inf, -math.inf, -1, -1.5, 0, 0.0, 1e300,
                     -1e300, 10**30, True, False, 1j, 1 + 2j, [], [0], [[0, 1]], (0, 1), {}, {"a": 1}, object(),
                     np.float32(np.nan), np.array([1.0, 2.0]), np.array([1.0, 2.0, 3.0]), np.array(0.5),
                     np.array([[0.5]]), jnp.int32, jnp.float16, 1e-50, 1.0 * u.mV, np.ones(3) * u.ms]),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.integers(min_value=-1000, max_value=1000),  # sizes up to 1000: a (C, C) pool of 1e6 stays small
    st.text(max_size=4),
)

_REJECTED = set()

# arrays of data or of initial parameter values: for these, NaN in and NaN out is the right result
DATA = {"x", "w", "mean", "var", "running_mean", "running_var", "scale", "bias", "gain", "p", "weight", "state",
        "accumulated"}
# the named axis exists only under a transform that maps it, so a layer built with one is not run here
NEEDS_MAPPED_AXIS = {"axis_name", "axis_index_groups"}


def _is_data(option):
    return option in DATA or option.endswith(("_init", "_initializer"))


def _finite(tree):
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda a: isinstance(a, u.Quantity))
    return all(np.all(np.isfinite(np.asarray(u.get_mantissa(leaf), np.float64))) for leaf in leaves
               if np.issubdtype(np.asarray(u.get_mantissa(leaf)).dtype, np.number))


@pytest.mark.parametrize("name", sorted(FUZZ_TARGETS))
# a fixed sample (derandomize) of 25 draws per target; no shrinking: the drawn values are already plain
@settings(max_examples=25, deadline=None, derandomize=True, phases=(Phase.explicit, Phase.generate),
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_options_succeed_or_name_the_option(name, data):
    """Any value of any option: the call succeeds (a layer then also runs once, with finite output and
    states), or a TypeError/ValueError names the layer or function and the option."""
    target = FUZZ_TARGETS[name]
    option = data.draw(st.sampled_from(fuzzed_options(name)), label="option")
    value = data.draw(BAD_VALUES, label="value")
    arguments = {k: v() if callable(v) else v for k, v in target.required.items()}
    arguments[option] = value
    owner = _owner(name)
    try:
        built = _public(name)(**arguments)
        out = built if target.run is None or option in NEEDS_MAPPED_AXIS else target.run(built)
    except NameError as error:
        # a valid axis name, validated, then unbound outside the transform that maps it: the only way to run
        if option not in NEEDS_MAPPED_AXIS or "unbound axis name" not in str(error):
            pytest.fail(f"{name}({option}={value!r}) raised NameError: {error}")
        return
    except (TypeError, ValueError) as error:
        message = str(error)
        assert message.startswith(f"{owner}: "), f"{name}({option}={value!r}): {message}"
        assert option in message or _related(option) in message, f"{name}({option}={value!r}): {message}"
        _REJECTED.add((name, option, repr(value)))
        return
    except Exception as error:  # anything else is a defect
        pytest.fail(f"{name}({option}={value!r}) raised {type(error).__name__}: {error}")
    if _is_data(option):
        return
    states = built.states() if isinstance(built, brainstate.nn.Module) else {}
    assert _finite(out), f"{name}({option}={value!r}) was accepted and gave a non-finite output"
    for path, state in states.items():
        assert _finite(state.value), f"{name}({option}={value!r}) was accepted and made state {path} non-finite"


def _related(option):
    """Options whose refusal is reported through a companion option (axis_index_groups needs axis_name) or
    under the name that brainstate's alias stands for."""
    related = {"axis_index_groups": "axis_name", "bias_initializer": "bias_init", "scale_initializer": "scale_init",
               "batch_axes": "batch axis"}
    return related.get(option, option)


def test_fuzz_rejected_many_distinct_inputs():
    """Runs after the fuzz test (same module): it refused a broad set of inputs, not a handful."""
    if not _REJECTED:
        pytest.skip("the fuzz test did not run in this session")
    print(f"fuzz: {len(_REJECTED)} distinct rejected (name, option, value) inputs")
    assert len(_REJECTED) >= 30
