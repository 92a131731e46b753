"""The non-finite hazard matrix: every layer x every numerical hazard.

SPEC §3 "Masks" (a group with no valid element normalizes to 0, outputs and
gradients finite, running statistics of that channel unchanged), §3
"Statistics" (robust variance for large offsets) and §6 item 2 (peers
write NaN into running statistics and parameter gradients).

For every layer and hazard, one training step under ``jit``:

* the output is finite and, for float32 input, equals the float64
  reference (tests/reference.py) within a tolerance that suits the hazard;
* ``brainstate.transform.grad`` of ``sum(w * y)`` w.r.t. the input and every
  ``ParamState`` of the layer (scale, bias, TEBN's ``p``, the wrappers'
  ``g``/``v``) is finite;
* the running statistics (BatchNorm, InstanceNorm with tracking, BNTT,
  tdBN, TEBN) and SpectralNorm's power-iteration vectors are finite.

Hazards: constant input (zero variance), tiny (1e-30) and huge (1e17, and
1e19 whose squares overflow float32) magnitudes, offsets 1e4 + N(0, 1) and 1e6 + N(0, 1), a fully masked group
(a sample and a channel without valid entries), a fully masked batch (mask
all False), bfloat16 and float16 inputs (with a fully masked group); and for
the weight wrappers an all-zero weight. Masks do not apply to the wrappers.

One function is compiled per layer, mask presence and dtype; the layer's
states are reset to their initial values before each hazard.
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainnorm

from . import reference as ref

C = 3  # channels of every layer (last axis)
SCALE = np.linspace(0.5, 1.5, C).astype(np.float32)
BIAS = np.linspace(-0.3, 0.4, C).astype(np.float32)


def _affine(**extra):
    return dict(scale_init=SCALE, bias_init=BIAS, **extra)


def _bn_ref(x, mask):
    return ref.normalize(x, tuple(range(x.ndim - 1)), mask, 1e-5, SCALE, BIAS)


def _bntt_ref(x, mask):
    scale = np.linspace(0.5, 1.5, 4 * C).reshape(4, C)
    full = None if mask is None else np.broadcast_to(mask, x.shape)
    return np.stack([ref.normalize(x[t], (0,), None if full is None else full[t], 1e-5, scale[t])
                     for t in range(x.shape[0])])


def _linear(weight=None):
    linear = brainstate.nn.Linear(6, C)
    w = np.linspace(-1.0, 1.0, 6 * C).reshape(6, C).astype(np.float32) if weight is None else weight
    linear.weight.value = {"weight": jnp.asarray(w), "bias": jnp.asarray(BIAS)}
    return linear


def _linear_ref(x, mask, normalize_by=None):
    w = np.linspace(-1.0, 1.0, 6 * C).reshape(6, C).astype(np.float32).astype(np.float64)
    if normalize_by == "sigma":
        w = w / np.linalg.svd(w, compute_uv=False)[0]
    return x @ w + BIAS


# name -> (factory, input shape, float64 reference(x, mask) or None, stateful)
LAYERS = {
    "BatchNorm0d": (lambda: brainnorm.BatchNorm0d(C, **_affine()), (8, C), _bn_ref),
    "BatchNorm1d": (lambda: brainnorm.BatchNorm1d((5, C), **_affine()), (4, 5, C), _bn_ref),
    "BatchNorm2d": (lambda: brainnorm.BatchNorm2d((3, 3, C), **_affine()), (2, 3, 3, C), _bn_ref),
    "BatchNorm3d": (lambda: brainnorm.BatchNorm3d((2, 2, 2, C), **_affine()), (2, 2, 2, 2, C), _bn_ref),
    "LayerNorm": (lambda: brainnorm.LayerNorm((5, C), reduction_axes=(0, 1), **_affine()), (4, 5, C),
                  lambda x, m: ref.normalize(x, (1, 2), m, 1e-6, SCALE, BIAS)),
    "RMSNorm": (lambda: brainnorm.RMSNorm((5, C), scale_init=SCALE), (4, 5, C),
                lambda x, m: ref.normalize(x, (2,), m, 1e-6, SCALE, use_mean=False)),
    "GroupNorm": (lambda: brainnorm.GroupNorm((5, 2 * C), num_groups=C, scale_init=np.repeat(SCALE, 2),
                                              bias_init=np.repeat(BIAS, 2)), (4, 5, 2 * C),
                  lambda x, m: ref.group_normalize(x, C, -1, (1, 2), m, 1e-6, np.repeat(SCALE, 2),
                                                   np.repeat(BIAS, 2))),
    "InstanceNorm": (lambda: brainnorm.InstanceNorm((5, C), **_affine()), (4, 5, C),
                     lambda x, m: ref.normalize(x, (1,), m, 1e-5, SCALE, BIAS)),
    "InstanceNorm-tracked": (lambda: brainnorm.InstanceNorm((5, C), track_running_stats=True, **_affine()),
                             (4, 5, C), lambda x, m: ref.normalize(x, (1,), m, 1e-5, SCALE, BIAS)),
    "LocalResponseNorm": (lambda: brainnorm.LocalResponseNorm((5, C), 2, alpha=0.5), (4, 5, C),
                          lambda x, m: ref.local_response_norm(x, 2, 0.5) if m is None
                          else ref.masked_local_response_norm(x, 2, m, 0.5)),
    "BatchNormThroughTime": (lambda: brainnorm.BatchNormThroughTime(
        C, 4, step_mode="multi", scale_init=np.linspace(0.5, 1.5, 4 * C).reshape(4, C)), (4, 6, C), _bntt_ref),
    "ThresholdDependentBatchNorm": (lambda: brainnorm.ThresholdDependentBatchNorm(
        C, step_mode="multi", **_affine()), (4, 6, C), _bn_ref),
    "TemporalEffectiveBatchNorm": (lambda: brainnorm.TemporalEffectiveBatchNorm(
        C, 4, step_mode="multi", **_affine()), (4, 6, C), _bn_ref),
    "WeightNorm": (lambda: brainnorm.WeightNorm(_linear()), (5, 6), _linear_ref),
    "SpectralNorm": (lambda: brainnorm.SpectralNorm(_linear(), n_steps=10), (5, 6),
                     lambda x, m: _linear_ref(x, m, "sigma")),
}
WRAPPERS = ("WeightNorm", "SpectralNorm")

# name -> (value factory(rng, shape), masked, dtype, output tolerance (atol, rtol) against the reference or None)
HAZARDS = {
    "constant": (lambda rng, s: np.full(s, 3.0), False, np.float32, (1e-5, 1e-5)),
    "tiny_1e-30": (lambda rng, s: 1e-30 * rng.standard_normal(s), False, np.float32, (1e-5, 1e-5)),
    "huge_1e17": (lambda rng, s: 1e17 * rng.standard_normal(s), False, np.float32, (1e-4, 1e-4)),
    # sums of squares overflow float32; the variances (at most 1e38 / 3) stay representable
    "huge_1e19": (lambda rng, s: 1e19 * rng.uniform(-1, 1, s), False, np.float32, (1e-4, 1e-4)),
    "offset_1e4": (lambda rng, s: 1e4 + rng.standard_normal(s), False, np.float32, (1e-4, 1e-5)),
    "offset_1e6": (lambda rng, s: 1e6 + rng.standard_normal(s), False, np.float32, (1e-3, 1e-5)),
    "masked_group": (lambda rng, s: 1.0 + rng.standard_normal(s), True, np.float32, (1e-4, 1e-5)),
    "all_masked": (lambda rng, s: 1.0 + rng.standard_normal(s), "none_valid", np.float32, (1e-5, 1e-5)),
    "bfloat16": (lambda rng, s: 1.0 + rng.standard_normal(s), True, jnp.bfloat16, None),
    "float16": (lambda rng, s: 1.0 + rng.standard_normal(s), True, np.float16, None),
    "zero_weight": (lambda rng, s: 1.0 + rng.standard_normal(s), False, np.float32, None),
}
MASK_HAZARDS = {h for h, spec in HAZARDS.items() if spec[1]}


def matrix():
    for layer in LAYERS:
        for hazard in HAZARDS:
            if layer in WRAPPERS and hazard in MASK_HAZARDS:
                continue  # the wrapped Linear takes no mask
            if hazard == "zero_weight" and layer not in WRAPPERS:
                continue
            yield layer, hazard


MATRIX = list(matrix())


def hazard_mask(shape, kind, rng):
    """A sample (index 0 of the first axis) and the last channel without any valid entry."""
    if kind == "none_valid":
        return np.zeros(shape, bool)
    mask = rng.random(shape) < 0.7
    mask[0] = False
    mask[..., -1] = False
    return mask


def finite_leaves(tree):
    return all(bool(np.all(np.isfinite(np.asarray(jnp.asarray(leaf, jnp.float32)))))
               for leaf in jax.tree_util.tree_leaves(tree))


class Harness:
    """One layer, its initial states, and a compiled training step per (masked, dtype)."""

    def __init__(self, name, zero_weight=False):
        factory, self.shape, self.reference = LAYERS[name]
        if zero_weight:
            wrapper = brainnorm.WeightNorm if name == "WeightNorm" else brainnorm.SpectralNorm
            self.layer = wrapper(_linear(np.zeros((6, C), np.float32)))
        else:
            self.layer = factory()
        self.name = name
        self.initial = {path: state.value for path, state in self.layer.states().items()}
        out_shape = self.shape[:-1] + (C,) if name in WRAPPERS else self.shape
        self.weights = np.random.default_rng(1).standard_normal(out_shape).astype(np.float32)
        self.compiled = {}

    def reset(self):
        states = self.layer.states()
        for path, value in self.initial.items():
            states[path].value = value

    def step(self, x, mask):
        key = (mask is not None, jnp.dtype(x.dtype))
        if key not in self.compiled:
            layer = self.layer
            params = layer.states(brainstate.ParamState)
            weights = jnp.asarray(self.weights)

            def loss(v, m):
                with brainstate.environ.context(fit=True):
                    y = layer(v) if m is None else layer(v, m)
                return jnp.sum(jnp.asarray(y, jnp.float32) * weights), y

            grad = brainstate.transform.grad(loss, grad_states=params, argnums=0, has_aux=True)
            self.compiled[key] = brainstate.transform.jit(lambda v, m: grad(v, m))
        grads, y = self.compiled[key](x, mask)
        if not self.layer.states(brainstate.ParamState):
            return y, {}, grads  # without parameters, grad returns the input gradient alone
        g_params, g_x = grads
        return y, g_params, g_x

    def valid_step(self, x, mask):
        """A training step whose loss reads the valid outputs only: ``(y, parameter grads, input grad)``."""
        if "valid" not in self.compiled:
            layer = self.layer
            params = layer.states(brainstate.ParamState)
            weights = jnp.asarray(self.weights)

            def loss(v, m):
                with brainstate.environ.context(fit=True):
                    y = layer(v, m)
                return jnp.sum(jnp.where(m, jnp.asarray(y, jnp.float32), 0) * weights), y

            grad = brainstate.transform.grad(loss, grad_states=params, argnums=0, has_aux=True)
            self.compiled["valid"] = brainstate.transform.jit(grad)
        grads, y = self.compiled["valid"](x, mask)
        if not self.layer.states(brainstate.ParamState):
            return y, {}, grads
        g_params, g_x = grads
        return y, g_params, g_x

    def forward(self, x, mask):
        """A training step without gradients."""
        if "forward" not in self.compiled:
            layer = self.layer

            def train(v, m):
                with brainstate.environ.context(fit=True):
                    return layer(v, m)

            self.compiled["forward"] = brainstate.transform.jit(train)
        return self.compiled["forward"](x, mask)


_HARNESSES = {}


def harness(name, zero_weight=False):
    key = (name, zero_weight)
    if key not in _HARNESSES:
        _HARNESSES[key] = Harness(name, zero_weight)
    return _HARNESSES[key]


@pytest.mark.parametrize("layer_name,hazard", MATRIX, ids=[f"{a}-{b}" for a, b in MATRIX])
def test_hazard(layer_name, hazard):
    make, masked, dtype, tol = HAZARDS[hazard]
    h = harness(layer_name, zero_weight=hazard == "zero_weight")
    h.reset()
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.asarray(make(rng, h.shape), np.float32), dtype)
    mask = hazard_mask(h.shape, masked, rng) if masked else None

    y, g_params, g_x = h.step(x, mask)

    assert y.shape == x.shape[:-1] + (y.shape[-1],)
    assert finite_leaves(y), f"{layer_name}/{hazard}: non-finite output"
    assert finite_leaves(g_x), f"{layer_name}/{hazard}: non-finite input gradient"
    # Every layer but LocalResponseNorm has trainable parameters that must receive gradients.
    assert g_params or layer_name == "LocalResponseNorm", "no parameter gradients"
    for path, grad in g_params.items():
        assert finite_leaves(grad), f"{layer_name}/{hazard}: non-finite gradient of {path}"
    for path, state in h.layer.states().items():
        assert finite_leaves(state.value), f"{layer_name}/{hazard}: state {path} became non-finite"

    if tol is not None:
        x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
        expected = h.reference(x64, mask)
        atol = tol[0]
        if layer_name in WRAPPERS:  # a float32 matmul of 6 terms of size |x|: its rounding, not normalization
            atol = max(atol, 1e-6 * 6 * np.abs(x64).max())
        np.testing.assert_allclose(np.asarray(y, np.float64), expected, atol=atol, rtol=tol[1],
                                   err_msg=f"{layer_name}/{hazard}")


def _numeric_grad(f, x, h=1e-6):
    """Central differences of the float64 function ``f`` at ``x``."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        g[i] = (f(x + e) - f(x - e)) / (2 * h)
    return g


@pytest.mark.parametrize("how", ["functional-jax.jit", "layer-brainstate.grad"])
def test_local_response_norm_gradient_under_jit(how):
    """Reverse-mode gradient of LRN inside a trace, against central differences of the float64 reference."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5)).astype(np.float32)
    w = rng.standard_normal((2, 5))
    expected = _numeric_grad(lambda v: np.sum(ref.local_response_norm(v, 3, alpha=0.5) * w), x.astype(np.float64))
    if how == "functional-jax.jit":
        loss = lambda v: jnp.sum(brainnorm.functional.local_response_norm(v, 3, alpha=0.5) * w)  # noqa: E731
        g = jax.jit(jax.grad(loss))(x)
    else:
        lrn = brainnorm.LocalResponseNorm(5, 3, alpha=0.5)
        g = brainstate.transform.grad(lambda v: jnp.sum(lrn(v) * w), argnums=0)(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(g, np.float64), expected, atol=1e-4, rtol=1e-4)


def test_weight_norm_zero_column_gradient_is_finite():
    """A zero column of ``v`` (a dead unit): epsilon guards the norm, so the gradient of ``v`` stays finite."""
    w = np.ones((6, C), np.float32)
    w[:, 1] = 0.0
    wn = brainnorm.WeightNorm(_linear(w))
    x = jnp.ones((2, 6))
    grads = brainstate.transform.grad(lambda v: jnp.sum(wn(v)), grad_states=wn.states(brainstate.ParamState))(x)
    assert finite_leaves(grads[("v",)]), grads[("v",)]
    assert finite_leaves(grads[("g",)])


@pytest.mark.parametrize("layer_name", [n for n in LAYERS if n not in WRAPPERS])
def test_nan_and_inf_padding_stay_out_of_statistics(layer_name):
    """Masked positions holding NaN/inf: valid outputs equal the reference on the valid data, states finite.

    (Outputs at padded positions transform the padding, so they are not finite here, and neither is the
    gradient of a loss that reads them; only the valid outputs and the statistics are checked.)
    """
    h = harness(layer_name)
    h.reset()
    rng = np.random.default_rng(5)
    x = (1.0 + rng.standard_normal(h.shape)).astype(np.float32)
    mask = hazard_mask(h.shape, True, rng)
    padded = np.where(mask, x, np.where(rng.random(h.shape) < 0.5, np.nan, np.inf)).astype(np.float32)
    y = h.forward(jnp.asarray(padded), mask)
    valid = np.broadcast_to(mask, np.shape(y))
    expected = h.reference(x.astype(np.float64), mask)
    np.testing.assert_allclose(np.asarray(y, np.float64)[valid], expected[valid], atol=1e-4, rtol=1e-5)
    for path, state in h.layer.states().items():
        assert finite_leaves(state.value), f"{layer_name}: state {path} became non-finite"


PADDING = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "1e30": 1e30}


@pytest.mark.parametrize("pad", PADDING)
@pytest.mark.parametrize("layer_name", [n for n in LAYERS if n not in WRAPPERS])
def test_padding_never_reaches_valid_values_or_gradients(layer_name, pad):
    """Whatever the padding holds, a loss over the valid outputs has the values and gradients of zero padding.

    The gradient at padded positions is 0 (they enter no statistic and their outputs are not in the loss),
    and the parameter gradients are those of the zero-padded input; the running statistics too.
    """
    h = harness(layer_name)
    rng = np.random.default_rng(6)
    x = (1.0 + rng.standard_normal(h.shape)).astype(np.float32)
    mask = hazard_mask(h.shape, True, rng)
    mask[0] = rng.random(mask.shape[1:]) < 0.7  # keep some valid entries in every sample
    runs = []
    for fill in (0.0, PADDING[pad]):
        h.reset()
        y, g_params, g_x = h.valid_step(jnp.asarray(np.where(mask, x, fill).astype(np.float32)), mask)
        states = {path: state.value for path, state in h.layer.states().items()}
        runs.append((np.asarray(y), g_params, np.asarray(g_x), states))
    (y0, p0, g0, s0), (y1, p1, g1, s1) = runs
    valid = np.broadcast_to(mask, y0.shape)
    np.testing.assert_allclose(y1[valid], y0[valid], rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(g1)), f"{layer_name}/{pad}: non-finite input gradient"
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-6, err_msg=f"{layer_name}/{pad}: input gradient")
    assert np.all(g1[~np.broadcast_to(mask, g1.shape)] == 0), "padded positions have a non-zero gradient"
    for what, first, second in (("gradient of", p0, p1), ("state", s0, s1)):
        for path in first:
            for a, b in zip(jax.tree_util.tree_leaves(first[path]), jax.tree_util.tree_leaves(second[path])):
                np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6,
                                           err_msg=f"{layer_name}/{pad}: {what} {path}")


STATEFUL = ["BatchNorm0d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm-tracked",
            "BatchNormThroughTime", "ThresholdDependentBatchNorm", "TemporalEffectiveBatchNorm"]


@pytest.mark.parametrize("layer_name", STATEFUL)
def test_fully_masked_channel_keeps_running_statistics(layer_name):
    """The last channel has no valid entry: its running statistics are exactly the old ones."""
    h = harness(layer_name)
    h.reset()
    rng = np.random.default_rng(3)
    start = {}
    for stat, value in (("running_mean", 0.7), ("running_var", 1.3)):  # not the batch statistics' 0 and 1
        state = getattr(h.layer, stat)
        state.value = jnp.full(np.shape(state.value), value, jnp.asarray(state.value).dtype)
        start[stat] = np.asarray(state.value)
    x = jnp.asarray((1.0 + rng.standard_normal(h.shape)).astype(np.float32))
    h.step(x, hazard_mask(h.shape, True, rng))
    for stat in ("running_mean", "running_var"):
        old = start[stat]
        new = np.asarray(getattr(h.layer, stat).value)
        assert np.array_equal(new[..., -1], old[..., -1]), f"{stat} of the empty channel changed"
        assert not np.array_equal(new[..., 0], old[..., 0]), f"{stat} of a channel with data did not change"


def test_hazard_matrix_size():
    layers = {layer for layer, _ in MATRIX}
    hazards = {hazard for _, hazard in MATRIX}
    assert layers == set(LAYERS) and hazards == set(HAZARDS)
    # 13 normalization layers x 10 hazards + 2 wrappers x 7 (6 unmasked + zero weight)
    assert len(MATRIX) == 13 * 10 + 2 * 7 == 144
    print(f"hazard matrix: {len(layers)} layers x {len(hazards)} hazards, {len(MATRIX)} combinations")
