"""ANN-to-SNN conversion by data-based normalization: ``normalize_for_conversion`` and ``record_activations``.

The rescaled weights are checked against a float64 NumPy restatement of
``W_l' = W_l lam_{l-1} / lam_l``, ``b_l' = b_l / lam_l`` with ``lam_l`` NumPy's
percentile of the recorded activations; the rescaled ReLU network against the
original one divided by the last scale (positive homogeneity); and the example
``examples/ann_to_snn.py --quick`` runs as a script.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainnorm

ROOT = Path(__file__).resolve().parents[1]


def _linear_net(seed, bias=True):
    brainstate.random.seed(seed)
    b_init = braintools.init.Normal(0.0, 0.1) if bias else None
    return [
        brainstate.nn.Linear(6, 16, b_init=b_init),
        brainstate.nn.Linear(16, 12, b_init=b_init),
        brainstate.nn.Linear(12, 4, b_init=b_init),
    ]


def _conv_net(seed, bias=True, channel_first=False):
    brainstate.random.seed(seed)
    b_init = braintools.init.Normal(0.0, 0.1) if bias else None
    first_size = (3, 7, 7) if channel_first else (7, 7, 3)
    first = brainstate.nn.Conv2d(first_size, 5, 3, b_init=b_init, channel_first=channel_first)
    second = brainstate.nn.Conv2d(first.out_size, 4, 3, padding="VALID", b_init=b_init, channel_first=channel_first)
    return [first, second]


def _inputs(layers, batch=32, seed=1):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(0.0, 1.0, size=(batch,) + tuple(layers[0].in_size)).astype(np.float32))


def _params64(layer):
    params = layer.weight.value
    weight = np.asarray(params["weight"], np.float64)
    bias = None if "bias" not in params else np.asarray(params["bias"], np.float64)
    return weight, bias


def _reference(layers, activations, percentile, input_scale):
    """Float64 restatement of SPEC §14: ``(W', b')`` per layer."""
    expected = []
    previous = float(input_scale)
    for layer, act in zip(layers, activations, strict=True):
        scale = float(np.percentile(np.asarray(act, np.float64), percentile))
        weight, bias = _params64(layer)
        expected.append((weight * previous / scale, None if bias is None else bias / scale))
        previous = scale
    return expected


def _relu_net(layers, x):
    for layer in layers:
        x = jax.nn.relu(layer(x))
    return x


@pytest.mark.parametrize("percentile", [100.0, 99.99, 90.0])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv2d_channel_first"])
def test_matches_float64_formula(kind, bias, percentile):
    if kind == "linear":
        layers = _linear_net(0, bias)
    else:
        layers = _conv_net(0, bias, channel_first=kind.endswith("first"))
    x = _inputs(layers)
    acts = brainnorm.record_activations(layers, x)
    input_scale = 0.5
    normalized = brainnorm.normalize_for_conversion(layers, acts, percentile=percentile, input_scale=input_scale)
    expected = _reference(layers, acts, percentile, input_scale)
    assert len(normalized) == len(layers)
    for new, old, (weight, bias_ref) in zip(normalized, layers, expected, strict=True):
        assert type(new) is type(old) and new is not old
        new_weight, new_bias = _params64(new)
        assert new.weight.value["weight"].dtype == old.weight.value["weight"].dtype
        np.testing.assert_allclose(new_weight, weight, rtol=2e-6, atol=1e-7)
        if bias_ref is None:
            assert new_bias is None  # a layer without bias stays without
        else:
            assert new_bias is not None and new_bias.shape == bias_ref.shape
            np.testing.assert_allclose(new_bias, bias_ref, rtol=2e-6, atol=1e-7)


def test_percentile_100_is_the_maximum():
    layers = _linear_net(3)
    acts = brainnorm.record_activations(layers, _inputs(layers))
    normalized = brainnorm.normalize_for_conversion(layers, acts, percentile=100)
    # last layer: W_L' = W_L * max(a_{L-1}) / max(a_L)
    ratio = float(np.max(np.asarray(acts[1], np.float64)) / np.max(np.asarray(acts[2], np.float64)))
    np.testing.assert_allclose(_params64(normalized[2])[0], _params64(layers[2])[0] * ratio, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("percentile", [100.0, 99.0])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_positive_homogeneity(kind, percentile):
    """The rescaled ReLU network computes the original's output divided by the last scale."""
    layers = _linear_net(1) if kind == "linear" else _conv_net(1)
    x = _inputs(layers, seed=2)
    acts = brainnorm.record_activations(layers, x)
    input_scale = 2.0
    normalized = brainnorm.normalize_for_conversion(layers, acts, percentile=percentile, input_scale=input_scale)
    last_scale = np.percentile(np.asarray(acts[-1], np.float64), percentile)
    expected = np.asarray(_relu_net(layers, x), np.float64) / last_scale
    got = np.asarray(_relu_net(normalized, x / input_scale), np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # and every layer's activations: a_l / lam_l, mostly in [0, 1]
    for act, new_act in zip(acts, brainnorm.record_activations(normalized, x / input_scale), strict=True):
        scale = np.percentile(np.asarray(act, np.float64), percentile)
        np.testing.assert_allclose(np.asarray(new_act), np.asarray(act) / scale, rtol=1e-4, atol=1e-5)
    if percentile == 100.0:
        assert float(np.max(got)) == pytest.approx(1.0, rel=1e-5)


def test_record_activations_runs_the_relu_network():
    layers = _linear_net(2)
    x = _inputs(layers)
    acts = brainnorm.record_activations(layers, x)
    h1 = np.maximum(np.asarray(x, np.float64) @ _params64(layers[0])[0] + _params64(layers[0])[1], 0)
    h2 = np.maximum(h1 @ _params64(layers[1])[0] + _params64(layers[1])[1], 0)
    np.testing.assert_allclose(np.asarray(acts[0]), h1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(acts[1]), h2, rtol=1e-5, atol=1e-5)
    assert acts[2].shape == (32, 4)


@pytest.mark.parametrize("percentile", [100.0, 99.99])
def test_scales_from_record_activations_give_the_same_layers(percentile):
    """``record_activations(..., percentile=p)`` returns scales that stand in for the activations."""
    layers = _conv_net(4)
    x = _inputs(layers)
    acts = brainnorm.record_activations(layers, x)
    scales = brainnorm.record_activations(layers, x, percentile=percentile)
    for scale, act in zip(scales, acts, strict=True):
        assert np.shape(scale) == ()
        assert float(scale) == pytest.approx(np.percentile(np.asarray(act, np.float64), percentile), rel=1e-12)
    from_scales = brainnorm.normalize_for_conversion(layers, scales, percentile=percentile)
    from_acts = brainnorm.normalize_for_conversion(layers, acts, percentile=percentile)
    for first, second in zip(from_scales, from_acts, strict=True):
        np.testing.assert_array_equal(first.weight.value["weight"], second.weight.value["weight"])
        np.testing.assert_array_equal(first.weight.value["bias"], second.weight.value["bias"])


def test_generator_is_consumed_one_layer_at_a_time():
    layers = _linear_net(5)
    x = _inputs(layers)
    acts = brainnorm.record_activations(layers, x)
    consumed = []

    def lazily():
        for index, act in enumerate(acts):
            consumed.append(index)
            yield act

    normalized = brainnorm.normalize_for_conversion(layers, lazily(), percentile=99.0)
    assert consumed == [0, 1, 2]
    expected = brainnorm.normalize_for_conversion(layers, acts, percentile=99.0)
    for first, second in zip(normalized, expected, strict=True):
        np.testing.assert_array_equal(first.weight.value["weight"], second.weight.value["weight"])


def test_inputs_left_unchanged_and_options_kept():
    brainstate.random.seed(6)
    mask = (np.arange(6 * 5).reshape(6, 5) % 3 != 0).astype(np.float32)
    layers = [brainstate.nn.Linear(6, 5, w_mask=mask), brainstate.nn.Linear(5, 3, b_init=None)]
    before = [jax.tree.map(np.array, dict(layer.weight.value)) for layer in layers]
    x = _inputs(layers)
    x_before = np.array(x)
    acts = brainnorm.record_activations(layers, x)
    acts_before = [np.array(a) for a in acts]
    normalized = brainnorm.normalize_for_conversion(layers, acts)
    for layer, saved in zip(layers, before, strict=True):
        assert set(layer.weight.value) == set(saved)
        for key, value in saved.items():
            np.testing.assert_array_equal(np.asarray(layer.weight.value[key]), value)
    np.testing.assert_array_equal(np.asarray(x), x_before)
    for act, saved in zip(acts, acts_before, strict=True):
        np.testing.assert_array_equal(np.asarray(act), saved)
    np.testing.assert_array_equal(np.asarray(normalized[0].w_mask), mask)
    assert "bias" not in normalized[1].weight.value
    assert normalized[0].weight is not layers[0].weight
    # the copies do not share states: changing one leaves the original alone
    normalized[0].weight.value = {key: value * 0 for key, value in normalized[0].weight.value.items()}
    np.testing.assert_array_equal(np.asarray(layers[0].weight.value["weight"]), before[0]["weight"])


def _check_error(error, match, call, layers):
    before = [jax.tree.map(np.array, dict(layer.weight.value)) for layer in layers]
    with pytest.raises(error, match=match):
        call()
    for layer, saved in zip(layers, before, strict=True):
        for key, value in saved.items():
            np.testing.assert_array_equal(np.asarray(layer.weight.value[key]), value)


def test_bad_input_errors():
    layers = _linear_net(7)
    acts = brainnorm.record_activations(layers, _inputs(layers))
    f = brainnorm.normalize_for_conversion
    name = "normalize_for_conversion"
    cases = [
        (
            TypeError,
            rf"{name}: layers\[1\] must be a brainstate.nn.Linear.*got ReLU",
            lambda: f([layers[0], brainstate.nn.ReLU(), layers[2]], acts),
        ),
        (TypeError, rf"{name}: layers\[0\] must be .*got LayerNorm", lambda: f([brainnorm.LayerNorm(6)], acts[:1])),
        (TypeError, rf"{name}: layers must be a sequence", lambda: f(layers[0], acts[:1])),
        (ValueError, rf"{name}: layers must hold at least one", lambda: f([], [])),
        (ValueError, rf"{name}: activations must hold one entry per layer \(3\), got 2", lambda: f(layers, acts[:2])),
        (
            ValueError,
            rf"{name}: activations must hold one entry per layer \(3\), got 4",
            lambda: f(layers, acts + [acts[0]]),
        ),
        (TypeError, rf"{name}: activations must be a sequence", lambda: f(layers, acts[0])),
        (TypeError, rf"{name}: activations\[1\] must be a non-empty array", lambda: f(layers, [acts[0], "a", acts[2]])),
        (TypeError, rf"{name}: activations\[0\] must be a non-empty array", lambda: f(layers, [[], acts[1], acts[2]])),
        (
            ValueError,
            rf"{name}: activations\[2\] must be finite",
            lambda: f(layers, [acts[0], acts[1], acts[2] * np.nan]),
        ),
        (ValueError, rf"{name}: percentile must be in \(0, 100\].*got 0", lambda: f(layers, acts, percentile=0)),
        (
            ValueError,
            rf"{name}: percentile must be in \(0, 100\].*got 100.5",
            lambda: f(layers, acts, percentile=100.5),
        ),
        (ValueError, rf"{name}: percentile must be a finite", lambda: f(layers, acts, percentile=float("nan"))),
        (
            TypeError,
            rf"{name}: percentile must be a finite real number, got str",
            lambda: f(layers, acts, percentile="max"),
        ),
        (ValueError, rf"{name}: input_scale must be a positive", lambda: f(layers, acts, input_scale=0.0)),
        (ValueError, rf"{name}: input_scale must be a positive", lambda: f(layers, acts, input_scale=-1.0)),
        (TypeError, rf"{name}: input_scale must be a positive", lambda: f(layers, acts, input_scale=None)),
    ]
    for error, match, call in cases:
        _check_error(error, match, call, layers)


def test_all_zero_activations_are_refused():
    layers = _linear_net(8)
    acts = brainnorm.record_activations(layers, _inputs(layers))
    zero = [acts[0], jnp.zeros_like(acts[1]), acts[2]]
    _check_error(
        ValueError,
        r"normalize_for_conversion: activations\[1\] must have a positive 99.99-th percentile.*all zero",
        lambda: brainnorm.normalize_for_conversion(layers, zero),
        layers,
    )
    # mostly zero: the median is 0 while the maximum is not
    sparse = np.zeros((100,), np.float32)
    sparse[-1] = 1.0
    _check_error(
        ValueError,
        r"activations\[0\] must have a positive 50-th percentile.*mostly zero",
        lambda: brainnorm.normalize_for_conversion(layers[:1], [sparse], percentile=50),
        layers,
    )
    assert brainnorm.normalize_for_conversion(layers[:1], [sparse], percentile=100)[0] is not layers[0]


def test_traced_activations_are_refused():
    layers = _linear_net(9)
    acts = brainnorm.record_activations(layers, _inputs(layers))

    @jax.jit
    def inside(a0, a1, a2):
        brainnorm.normalize_for_conversion(layers, [a0, a1, a2])
        return a0

    with pytest.raises(TypeError, match=r"activations\[0\] must hold concrete values.*outside jit"):
        inside(*acts)


def test_record_activations_bad_input():
    layers = _linear_net(10)
    with pytest.raises(TypeError, match=r"record_activations: layers\[0\] must be"):
        brainnorm.record_activations([brainstate.nn.ReLU()], _inputs(layers))
    with pytest.raises(ValueError, match=r"record_activations: percentile must be in \(0, 100\]"):
        brainnorm.record_activations(layers, _inputs(layers), percentile=0)
    with pytest.raises(
        TypeError, match=r"record_activations: x must be an array of numbers \(or a Quantity\), got str"
    ):
        brainnorm.record_activations(layers, "pixels")


def test_example_quick(tmp_path):
    out, results_file = tmp_path / "ann_to_snn.png", tmp_path / "results.json"
    env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "ann_to_snn.py"),
            "--quick",
            "--out",
            str(out),
            "--json",
            str(results_file),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert out.is_file() and out.stat().st_size > 0
    assert "SNN max" in proc.stdout and "SNN p99.99" in proc.stdout
    report = json.loads(results_file.read_text())
    t_max = str(max(report["steps"]))
    for result in report["results"]:
        ann = result["ann_acc"]
        assert ann > 0.8, f"ANN test accuracy {ann} (chance is 0.1)"
        assert result["folded_same_prediction"] > 0.98
        for percentile, accuracies in result["snn"].items():
            assert accuracies[t_max] > 0.5, f"{percentile}: SNN accuracy {accuracies[t_max]} at T={t_max}"
        # the percentile-normalized SNN approaches the ANN by the largest T of the quick setting
        assert abs(result["snn"]["99.99"][t_max] - ann) < 0.03, (result["snn"]["99.99"], ann)


def test_rescaled_weights_beyond_the_dtype_are_refused():
    layers = _linear_net(11)
    acts = brainnorm.record_activations(layers, _inputs(layers))
    _check_error(
        ValueError,
        r"normalize_for_conversion: input_scale .* within float32's range",
        lambda: brainnorm.normalize_for_conversion(layers, [acts[0] * 1e-3, *acts[1:]], input_scale=3e38),
        layers,
    )


def test_record_activations_refuses_x_of_another_shape():
    layers = _conv_net(12)
    with pytest.raises(
        ValueError,
        match=r"record_activations: x must be a batch of inputs of layers\[0\], of shape "
        r"\(\.\.\., 7, 7, 3\), got shape \(2, 7, 7, 4\)",
    ):
        brainnorm.record_activations(layers, np.ones((2, 7, 7, 4), np.float32))


def test_quantities_carry_their_units_into_the_scales():
    """Input in mV, activations in mV: the scales cancel the unit and the rescaled weights are plain."""
    layers = _linear_net(13, bias=False)
    x = _inputs(layers)
    acts = brainnorm.record_activations(layers, x * u.mV)
    assert all(isinstance(a, u.Quantity) and a.unit == u.mV for a in acts)
    with_units = brainnorm.normalize_for_conversion(layers, acts, input_scale=2.0 * u.mV)
    plain = brainnorm.normalize_for_conversion(layers, [a.mantissa for a in acts], input_scale=2.0)
    for first, second in zip(with_units, plain, strict=True):
        weight = first.weight.value["weight"]
        assert not isinstance(weight, u.Quantity) or weight.unit.is_unitless
        np.testing.assert_allclose(
            np.asarray(u.get_mantissa(weight)), np.asarray(second.weight.value["weight"]), rtol=1e-6
        )
