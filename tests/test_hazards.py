"""The non-finite hazard matrix: every public layer and function x every numerical hazard.

SPEC §3 "Masks" (a group with no valid element normalizes to 0, outputs and
gradients finite, running statistics of that channel unchanged), §3
"Statistics" (robust variance for large offsets), §3 "Dtypes" and "Units",
and §6 item 2 (peers write NaN into running statistics and parameter
gradients).

The subjects are derived from ``brainnorm.__all__`` and
``brainnorm.functional.__all__`` at run time: ``SUBJECTS`` holds one builder
per layer or function, keyed by its public name (a function is wrapped in
:class:`_Function`, a module whose array arguments are states, so layers and
functions share one harness); ``EXCLUDED`` lists the public names that take
no data array, each with its reason; ``test_every_public_name_is_in_the_hazard_matrix``
fails for a public name in neither.

For every subject and hazard, one training step under ``jit``:

* the output is finite and, for float32 input, equals the float64
  reference within a tolerance that suits the hazard;
* ``brainstate.transform.grad`` of ``sum(w * y)`` w.r.t. the input and every
  ``ParamState`` of the subject (scale, bias, TEBN's and TAB's ``p``, the
  wrappers' ``g``/``v``, the divisive parameters) is finite;
* every state (running statistics, SpectralNorm's power-iteration vectors,
  NeuNorm's activity, the divisive circuit's response) is finite.

Hazards: constant input (zero variance), tiny (1e-30) and huge (1e17, and
1e19 whose squares overflow float32) magnitudes, offsets 1e4 + N(0, 1) and
1e6 + N(0, 1), a fully masked group (a sample and a channel without valid
entries), a fully masked batch (mask all False), bfloat16 and float16 inputs
(with a fully masked group where the subject takes a mask); and for the
weight wrappers an all-zero, a tiny (1e-30) and a huge (1e30) weight. Masks
do not apply to the wrappers, to NeuNorm, to normalize (given statistics)
and to weight standardization.

Beside the matrix, over the same builders: NaN/inf padding never reaches
valid outputs, gradients or statistics; an empty channel keeps its running
statistics; Quantity input normalizes like its mantissa. And: folding at
extreme running statistics, and the boundedness and finiteness that
docstrings promise, at float32's extremes.

One function is compiled per subject, mask presence and dtype (the loss
weights its outputs by an argument, so the padding tests reuse it); the
subject's states are reset to their initial values before each hazard.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainnorm
from brainnorm import functional as F

from . import reference as ref

C = 3  # channels of every subject (last axis)
T = 4  # time steps of the temporal subjects
SCALE = np.linspace(0.5, 1.5, C).astype(np.float32)
BIAS = np.linspace(-0.3, 0.4, C).astype(np.float32)
STEP_SCALE = np.linspace(0.5, 1.5, T * C).reshape(T, C).astype(np.float32)
STEP_BIAS = np.linspace(-0.3, 0.4, T * C).reshape(T, C).astype(np.float32)
STEP_P = np.linspace(0.8, 1.2, T).astype(np.float32)
GAMMA = (0.1 * np.eye(C) + 0.05 * (1 - np.eye(C))).astype(np.float32)  # GDN pool with cross-channel terms
POOL = np.full((C, C), 1.0 / C)  # the divisive layers' default pool
DT_MS, TAU_MS, TAU_POOL_MS = 1.0, 10.0, 20.0  # one step of the divisive circuit
WEIGHT = np.linspace(-1.0, 1.0, 6 * C).reshape(6, C).astype(np.float32)  # the wrapped Linear's weight


def _affine(**extra):
    return dict(scale_init=SCALE, bias_init=BIAS, **extra)


# ---------------------------------------------------------------------------
# float64 references (tests/reference.py for the shared statistics)
# ---------------------------------------------------------------------------


def _full(mask, shape):
    return np.ones(shape, bool) if mask is None else np.broadcast_to(mask, shape)


def _bn_ref(x, mask, eps=1e-5):
    return ref.normalize(x, tuple(range(x.ndim - 1)), mask, eps, SCALE, BIAS)


def _ln_ref(x, mask):
    return ref.normalize(x, (1, 2), mask, 1e-6, SCALE, BIAS)


def _rms_ref(x, mask):
    return ref.normalize(x, (2,), mask, 1e-6, SCALE, use_mean=False)


def _gn_ref(x, mask):
    return ref.group_normalize(x, C, -1, (1, 2), mask, 1e-6, np.repeat(SCALE, 2), np.repeat(BIAS, 2))


def _in_ref(x, mask):
    return ref.normalize(x, (1,), mask, 1e-5, SCALE, BIAS)


def _lrn_ref(x, mask):
    return ref.masked_local_response_norm(x, 2, _full(mask, x.shape), 0.5)


def _bntt_ref(x, mask):
    valid = _full(mask, x.shape)
    return np.stack([ref.normalize(x[t], (0,), valid[t], 1e-5, STEP_SCALE[t]) for t in range(x.shape[0])])


def _renorm_ref(x, mask, eps=1e-5, r_max=3.0, d_max=5.0):
    """Batch renormalization from the initial running statistics (mean 0, variance 1), no warm-up."""
    mean, var, count = ref.moments(x, tuple(range(x.ndim - 1)), mask)
    r = np.clip(np.sqrt(var + eps) / np.sqrt(1 + eps), 1 / r_max, r_max)
    d = np.clip(mean / np.sqrt(1 + eps), -d_max, d_max)
    return np.where(count > 0, (x - mean) / np.sqrt(var + eps) * r + d, 0.0) * SCALE + BIAS


def _tab_ref(x, mask, eps=1e-5):
    """TAB: step ``t`` normalized with the statistics of steps ``0..t``, its own scale and bias, times ``p_t^2``."""
    valid = _full(mask, x.shape)
    return np.stack([STEP_P[t] ** 2 * (ref.normalize(x[: t + 1], (0, 1), valid[: t + 1], eps)[t] * STEP_SCALE[t]
                                       + STEP_BIAS[t]) for t in range(x.shape[0])])


def _neunorm_ref(x, mask, k=0.9, with_activity=False):
    activity, outputs = np.zeros(x.shape[1:-1] + (1,)), []
    for spikes in x:
        activity = k * activity + (1 - k) / C**2 * spikes.sum(-1, keepdims=True)
        outputs.append(spikes - SCALE * activity)
    return (np.stack(outputs), activity) if with_activity else np.stack(outputs)


def _divisive_terms(x, mask, exponent=2.0, sigma=1.0, weights=POOL):
    """``(drive, pool)`` relative to ``sigma^n``; masked positions out of every pool."""
    x = np.where(_full(mask, x.shape), x, 0.0)
    energy = np.abs(x) ** exponent
    return np.sign(x) * energy / sigma**exponent, energy @ np.asarray(weights, np.float64).T / sigma**exponent


def _divisive_ref(x, mask, gain=SCALE):
    drive, pool = _divisive_terms(x, mask)
    return np.where(_full(mask, x.shape), gain * drive / (1 + pool), 0.0)


def _circuit_ref(x, mask):
    """One exponential-Euler step of the divisive circuit from rest."""
    drive, pool = _divisive_terms(x, mask)
    conductance = pool * (1 - np.exp(-DT_MS / TAU_POOL_MS))
    target = SCALE * drive / (1 + conductance)
    response = target * (1 - np.exp(-DT_MS / TAU_MS * (1 + conductance)))
    return np.where(_full(mask, x.shape), response, 0.0)


def _gdn_ref(x, mask, gamma):
    x = np.where(_full(mask, x.shape), x, 0.0)
    return x / np.sqrt(1.0 + x**2 @ np.asarray(gamma, np.float64).T)


def _lp_ref(x, mask, eps=1e-12):
    x = np.where(_full(mask, x.shape), x, 0.0)
    return x / np.maximum(np.sqrt(np.sum(x**2, -1, keepdims=True)), eps)


def _weight_norm_ref(weight, eps=1e-12):
    """``g v / max(||v||, eps)`` with ``g`` starting at ``||v||`` (norm over the input axis)."""
    w = np.asarray(weight, np.float64)
    norm = np.sqrt(np.sum(w**2, 0, keepdims=True))
    return w * norm / np.maximum(norm, eps)


def _spectral_norm_ref(weight, eps=1e-12):
    w = np.asarray(weight, np.float64)
    return w / max(np.linalg.svd(w, compute_uv=False)[0], eps)


def _linear_ref(x, mask, weight, reparametrized):
    return x @ reparametrized(weight) + BIAS


# ---------------------------------------------------------------------------
# the subjects: one builder per public layer and function
# ---------------------------------------------------------------------------


class _Function(brainstate.nn.Module):
    """A public function as a module: trainable arguments in a ``ParamState``, returned statistics in states.

    ``call(x, mask, params, running)`` returns the output, or ``(output, running)``
    for a function that returns new running statistics: they are written to the
    short-term states ``running_mean`` and ``running_var``, as a layer writes
    its own.
    """

    def __init__(self, call, params=None, **running):
        super().__init__()
        self.call = call
        self.params = brainstate.ParamState({k: jnp.asarray(v) for k, v in params.items()}) if params else None
        self.running = tuple(running)
        for key, value in running.items():
            setattr(self, key, brainstate.ShortTermState(jnp.asarray(value)))

    def update(self, x, mask=None):
        params = {} if self.params is None else self.params.value
        out = self.call(x, mask, params, {key: getattr(self, key).value for key in self.running})
        if not self.running:
            return out
        out, new = out
        for key in self.running:
            getattr(self, key).value = new[key]
        return out


def _running(out):
    """``(y, new_running_mean, new_running_var, ...)`` as ``(y, running)``."""
    y, mean, var = out[:3]
    return y, dict(running_mean=mean, running_var=var)


def _linear(weight=WEIGHT):
    linear = brainstate.nn.Linear(6, C)
    linear.weight.value = {"weight": jnp.asarray(weight), "bias": jnp.asarray(BIAS)}
    return linear


def _with_state(layer, batch_size):
    layer.init_state(batch_size)
    return layer


@dataclass(frozen=True)
class Subject:
    """How to build one public layer or function and what its output should be.

    ``build()`` (``build(weight)`` for the weight wrappers) returns a module
    whose ``update(x, mask=None)`` runs the subject; ``reference(x, mask)``
    (``reference(x, mask, weight)``) is its float64 result, a tuple where
    the subject returns several arrays. ``covers``: the public names it tests,
    by default its key in ``SUBJECTS`` (``()`` for a variant of another).
    """

    build: Callable
    shape: tuple[int, ...]
    reference: Callable
    masks: bool = True
    wraps_weight: bool = False
    tol: dict | None = None  # hazard -> (atol, rtol) where the subject's own arithmetic limits the accuracy
    units: tuple[int, ...] | None = (0,)  # per output, k of its unit mV^k for input in mV; None: not applicable
    covers: tuple[str, ...] | None = None


_RUNNING = dict(running_mean=np.zeros(C, np.float32), running_var=np.ones(C, np.float32))
_STEP_RUNNING = dict(running_mean=np.zeros((T, 1, C), np.float32), running_var=np.ones((T, 1, C), np.float32))
_WHOLE = dict(scale=SCALE, bias=BIAS)
_GROUPED = dict(scale_init=np.repeat(SCALE, 2), bias_init=np.repeat(BIAS, 2))
_TEMPORAL = dict(step_mode="multi", **_affine())
_CIRCUIT = dict(tau=TAU_MS * u.ms, tau_pool=TAU_POOL_MS * u.ms, gain=SCALE)

# Keys are the public names (functions as "functional.<name>"); their order is that of the test ids.
SUBJECTS = {
    "BatchNorm0d": Subject(lambda: brainnorm.BatchNorm0d(C, **_affine()), (8, C), _bn_ref),
    "BatchNorm1d": Subject(lambda: brainnorm.BatchNorm1d((5, C), **_affine()), (4, 5, C), _bn_ref),
    "BatchNorm2d": Subject(lambda: brainnorm.BatchNorm2d((3, 3, C), **_affine()), (2, 3, 3, C), _bn_ref),
    "BatchNorm3d": Subject(lambda: brainnorm.BatchNorm3d((2, 2, 2, C), **_affine()), (2, 2, 2, 2, C), _bn_ref),
    "BatchRenorm": Subject(lambda: brainnorm.BatchRenorm((5, C), **_affine()), (4, 5, C), _renorm_ref),
    "LayerNorm": Subject(lambda: brainnorm.LayerNorm((5, C), reduction_axes=(0, 1), **_affine()), (4, 5, C),
                         _ln_ref),
    "RMSNorm": Subject(lambda: brainnorm.RMSNorm((5, C), scale_init=SCALE), (4, 5, C), _rms_ref),
    "GroupNorm": Subject(lambda: brainnorm.GroupNorm((5, 2 * C), num_groups=C, **_GROUPED), (4, 5, 2 * C), _gn_ref),
    "InstanceNorm": Subject(lambda: brainnorm.InstanceNorm((5, C), **_affine()), (4, 5, C), _in_ref),
    "InstanceNorm-tracked": Subject(lambda: brainnorm.InstanceNorm((5, C), track_running_stats=True, **_affine()),
                                    (4, 5, C), _in_ref, covers=()),
    # alpha is read in 1 / unit^2, so LRN's output has the unit of x
    "LocalResponseNorm": Subject(lambda: brainnorm.LocalResponseNorm((5, C), 2, alpha=0.5), (4, 5, C), _lrn_ref,
                                 units=(1,)),
    "BatchNormThroughTime": Subject(lambda: brainnorm.BatchNormThroughTime(C, T, step_mode="multi",
                                                                           scale_init=STEP_SCALE), (T, 6, C),
                                    _bntt_ref),
    "ThresholdDependentBatchNorm": Subject(lambda: brainnorm.ThresholdDependentBatchNorm(C, **_TEMPORAL), (T, 6, C),
                                           _bn_ref),
    "TemporalEffectiveBatchNorm": Subject(lambda: brainnorm.TemporalEffectiveBatchNorm(C, T, **_TEMPORAL),
                                          (T, 6, C), _bn_ref),
    "TemporalAccumulatedBatchNorm": Subject(lambda: brainnorm.TemporalAccumulatedBatchNorm(
        C, T, step_mode="multi", scale_init=STEP_SCALE, bias_init=STEP_BIAS, p_init=STEP_P), (T, 6, C), _tab_ref),
    "NeuNorm": Subject(lambda: _with_state(brainnorm.NeuNorm(C, step_mode="multi", w_init=SCALE), 6), (T, 6, C),
                       _neunorm_ref, masks=False, units=(1,)),
    "DivisiveNormalization": Subject(lambda: brainnorm.DivisiveNormalization((5, C), gain=SCALE, learnable=True),
                                     (4, 5, C), _divisive_ref),
    "GDN": Subject(lambda: brainnorm.GDN((5, C)), (4, 5, C), lambda x, m: _gdn_ref(x, m, 0.1 * np.eye(C))),
    "DynamicDivisiveNormalization": Subject(lambda: _with_state(brainnorm.DynamicDivisiveNormalization(
        (5, C), **_CIRCUIT), 4), (4, 5, C), _circuit_ref),
    # the wrapped Linear does the arithmetic on x (brainstate's Linear refuses mV input with a plain bias)
    "WeightNorm": Subject(lambda weight=WEIGHT: brainnorm.WeightNorm(_linear(weight)), (5, 6),
                          functools.partial(_linear_ref, reparametrized=_weight_norm_ref), masks=False,
                          wraps_weight=True, units=None),
    "SpectralNorm": Subject(lambda weight=WEIGHT: brainnorm.SpectralNorm(_linear(weight), n_steps=10), (5, 6),
                            functools.partial(_linear_ref, reparametrized=_spectral_norm_ref), masks=False,
                            wraps_weight=True, units=None),
    # --- functions: _Function(call(x, mask, params, running), params, **running) ---
    "functional.moments": Subject(lambda: _Function(lambda x, m, p, r: F.moments(x, (0, 1), mask=m)), (4, 5, C),
                                  lambda x, m: ref.moments(x, (0, 1), m)[:2], units=(1, 2)),
    # given statistics (here the batch's own) and no mask; x - mean with a float32 mean loses the digits of the
    # rounded mean at an offset (SPEC §3: about 5e-4 at 1e4, ulp(1e6) / 2 = 0.03 at 1e6)
    "functional.normalize": Subject(lambda: _Function(lambda x, m, p, r: F.normalize(
        x, *F.moments(x, (0, 1)), **p, epsilon=1e-5), _WHOLE), (4, 5, C),
        lambda x, m: ref.apply_stats(x, *ref.moments(x, (0, 1))[:2], 1e-5, SCALE, BIAS), masks=False,
        tol={"offset_1e4": (2e-3, 1e-5), "offset_1e6": (0.1, 1e-5)}),
    "functional.layer_norm": Subject(lambda: _Function(lambda x, m, p, r: F.layer_norm(
        x, p["scale"], p["bias"], reduction_axes=(1, 2), mask=m), _WHOLE), (4, 5, C), _ln_ref),
    "functional.rms_norm": Subject(lambda: _Function(lambda x, m, p, r: F.rms_norm(x, p["scale"], mask=m),
                                                     dict(scale=SCALE)), (4, 5, C), _rms_ref),
    "functional.batch_norm": Subject(lambda: _Function(lambda x, m, p, r: _running(F.batch_norm(
        x, r["running_mean"], r["running_var"], p["scale"], p["bias"], training=True, mask=m)), _WHOLE, **_RUNNING),
        (4, 5, C), _bn_ref),
    "functional.batch_renorm": Subject(lambda: _Function(lambda x, m, p, r: _running(F.batch_renorm(
        x, r["running_mean"], r["running_var"], p["scale"], p["bias"], training=True, mask=m)), _WHOLE, **_RUNNING),
        (4, 5, C), _renorm_ref),
    "functional.group_norm": Subject(lambda: _Function(lambda x, m, p, r: F.group_norm(
        x, C, p["scale"], p["bias"], mask=m), dict(scale=np.repeat(SCALE, 2), bias=np.repeat(BIAS, 2))),
        (4, 5, 2 * C), _gn_ref),
    "functional.instance_norm": Subject(lambda: _Function(lambda x, m, p, r: F.instance_norm(
        x, p["scale"], p["bias"], mask=m), _WHOLE), (4, 5, C), _in_ref),
    "functional.local_response_norm": Subject(lambda: _Function(
        lambda x, m, p, r: F.local_response_norm(x, 2, alpha=0.5, mask=m)), (4, 5, C), _lrn_ref, units=(1,)),
    "functional.weight_standardization": Subject(lambda: _Function(
        lambda x, m, p, r: F.weight_standardization(x, gain=p["gain"]), dict(gain=SCALE)), (2, 5, C),
        lambda x, m: ref.weight_standardization(x, 1e-4, SCALE), masks=False,
        covers=("weight_standardization", "functional.weight_standardization")),
    "functional.lp_normalize": Subject(lambda: _Function(lambda x, m, p, r: F.lp_normalize(x, mask=m)), (4, 5, C),
                                       _lp_ref),
    "functional.divisive_normalization": Subject(lambda: _Function(
        lambda x, m, p, r: F.divisive_normalization(x, gain=p["gain"], mask=m), dict(gain=SCALE)), (4, 5, C),
        _divisive_ref),
    "functional.gdn": Subject(lambda: _Function(lambda x, m, p, r: F.gdn(x, p["beta"], p["gamma"], mask=m),
                                                dict(beta=np.ones(C, np.float32), gamma=GAMMA)), (4, 5, C),
                              lambda x, m: _gdn_ref(x, m, GAMMA)),
    "functional.temporal_accumulated_batch_norm": Subject(lambda: _Function(
        lambda x, m, p, r: _running(F.temporal_accumulated_batch_norm(
            x, r["running_mean"], r["running_var"], p["scale"], p["bias"], p["p"], training=True, mask=m)),
        dict(scale=STEP_SCALE[:, None], bias=STEP_BIAS[:, None], p=STEP_P), **_STEP_RUNNING), (T, 6, C), _tab_ref),
    "functional.neu_norm": Subject(lambda: _Function(lambda x, m, p, r: F.neu_norm(x, p["w"], multi_step=True),
                                                     dict(w=SCALE)), (T, 6, C),
                                   lambda x, m: _neunorm_ref(x, m, with_activity=True), masks=False, units=(1, 1)),
}
WRAPPERS = [name for name, subject in SUBJECTS.items() if subject.wraps_weight]

# Public names that take no data array, each with the reason it is not in the matrix.
EXCLUDED = {
    "NormalizationParamState": "a ParamState holding scale and bias; it computes no statistics (execute(x) is the "
                               "affine map x * scale + bias that every layer's hazards run through)",
    "functional": "the module of functions; its names are enumerated from functional.__all__",
    "backend_info": "reports the installed backends; takes no array",
    "fold_batch_norm": "takes trained layers, not data; folding extreme running statistics is "
                       "test_folding_at_extreme_statistics",
    "fold_threshold": "takes a trained layer and a threshold, not data; folding extreme running statistics is "
                      "test_folding_at_extreme_statistics",
    "normalize_for_conversion": "takes trained layers and recorded activations, computes no statistics under jit "
                                "(host percentiles; non-finite activations are refused): test_conversion.py",
    "record_activations": "runs brainstate's Linear/Conv and ReLU on data, computes no statistics of its own; "
                          "test_conversion.py",
}


def covered_names(name):
    subject = SUBJECTS[name]
    return (name,) if subject.covers is None else subject.covers


def public_names():
    """Every public name: ``brainnorm.X`` as ``X``, ``brainnorm.functional.X`` as ``functional.X``."""
    return set(brainnorm.__all__) | {f"functional.{name}" for name in F.__all__}


def test_every_public_name_is_in_the_hazard_matrix():
    covered = {public for name in SUBJECTS for public in covered_names(name)}
    names = public_names()
    missing = sorted(names - covered - set(EXCLUDED))
    assert not missing, f"public names with no hazard builder in SUBJECTS and no reason in EXCLUDED: {missing}"
    stale = sorted((covered | set(EXCLUDED)) - names)
    assert not stale, f"SUBJECTS or EXCLUDED name what is not public (renamed or removed?): {stale}"
    both = sorted(covered & set(EXCLUDED))
    assert not both, f"both covered and excluded: {both}"
    print(f"hazard matrix: {len(names)} public names, {len(covered)} covered by {len(SUBJECTS)} builders, "
          f"{len(EXCLUDED)} excluded, {len(MATRIX)} combinations")


# ---------------------------------------------------------------------------
# hazards
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Hazard:
    """``values(rng, shape)``: the input, or for ``target == 'weight'`` the wrapped weight (input N(1, 1)).

    ``mask``: None, ``'group'`` (a sample and a channel without valid entries) or
    ``'none_valid'``; ``needs_mask``: whether the hazard is the mask itself (else
    a subject without masks runs it unmasked); ``tol``: ``(atol, rtol)`` against the
    reference, None for a finiteness check only.
    """

    values: Callable
    mask: str | None = None
    dtype: object = np.float32
    tol: tuple[float, float] | None = (1e-5, 1e-5)
    needs_mask: bool = False
    target: str = "input"


def _normal(rng, shape):
    return 1.0 + rng.standard_normal(shape)


HAZARDS = {
    "constant": Hazard(lambda rng, s: np.full(s, 3.0)),
    "tiny_1e-30": Hazard(lambda rng, s: 1e-30 * rng.standard_normal(s)),
    "huge_1e17": Hazard(lambda rng, s: 1e17 * rng.standard_normal(s), tol=(1e-4, 1e-4)),
    # sums of squares overflow float32; the variances (at most 1e38 / 3) stay representable
    "huge_1e19": Hazard(lambda rng, s: 1e19 * rng.uniform(-1, 1, s), tol=(1e-4, 1e-4)),
    "offset_1e4": Hazard(lambda rng, s: 1e4 + rng.standard_normal(s), tol=(1e-4, 1e-5)),
    "offset_1e6": Hazard(lambda rng, s: 1e6 + rng.standard_normal(s), tol=(1e-3, 1e-5)),
    "masked_group": Hazard(_normal, "group", tol=(1e-4, 1e-5), needs_mask=True),
    "all_masked": Hazard(_normal, "none_valid", needs_mask=True),
    "bfloat16": Hazard(_normal, "group", jnp.bfloat16, None),
    "float16": Hazard(_normal, "group", np.float16, None),
    "zero_weight": Hazard(lambda rng, s: np.zeros(s), target="weight"),
    "tiny_weight": Hazard(lambda rng, s: 1e-30 * WEIGHT, target="weight"),
    "huge_weight": Hazard(lambda rng, s: 1e30 * WEIGHT, target="weight", tol=(1e-4, 1e-4)),
}


def applies(subject, hazard):
    if hazard.target == "weight":
        return subject.wraps_weight
    return subject.masks or not hazard.needs_mask


MATRIX = [(name, hazard) for name, subject in SUBJECTS.items() for hazard in HAZARDS
          if applies(subject, HAZARDS[hazard])]


def hazard_mask(shape, kind, rng):
    """A sample (index 0 of the first axis) and the last channel without any valid entry."""
    if kind == "none_valid":
        return np.zeros(shape, bool)
    mask = rng.random(shape) < 0.7
    mask[0] = False
    mask[..., -1] = False
    return mask


def finite_leaves(tree):
    return all(bool(np.all(np.isfinite(np.asarray(jnp.asarray(u.get_mantissa(leaf), jnp.float32)))))
               for leaf in jax.tree_util.tree_leaves(tree))


def _loss_weights(y):
    """Fixed random weights of the loss, one array per output (drawn from the output's static shape)."""
    return [jnp.asarray(np.random.default_rng(1).standard_normal(np.shape(leaf)), jnp.float32)
            for leaf in jax.tree_util.tree_leaves(y)]


def _state_values(module):
    return {path: state.value for path, state in module.states().items()}


class Harness:
    """One subject, its initial states, and a compiled training step per (masked, dtype)."""

    def __init__(self, name):
        self.subject = SUBJECTS[name]
        self.name, self.shape = name, self.subject.shape
        self.layer = self.subject.build()
        self.initial = {None: _state_values(self.layer)}
        self.weight = WEIGHT
        self.compiled = {}

    def reset(self, weight_hazard=None):
        """States back to their initial values; for a weight hazard, those of the subject built on that weight
        (the same states, so the compiled steps serve it)."""
        self.weight = WEIGHT
        if weight_hazard is not None:
            self.weight = np.asarray(HAZARDS[weight_hazard].values(None, WEIGHT.shape), np.float32)
            if weight_hazard not in self.initial:
                self.initial[weight_hazard] = _state_values(self.subject.build(self.weight))
        states = self.layer.states()
        for path, value in self.initial[weight_hazard].items():
            states[path].value = value

    def reference(self, x, mask):
        if self.subject.wraps_weight:
            return self.subject.reference(x, mask, weight=self.weight)
        return self.subject.reference(x, mask)

    def step(self, x, mask=None, loss_mask=None):
        """A training step: ``(y, parameter grads, input grad)`` of ``sum(w * y)``.

        ``loss_mask`` (with ``mask``): outputs of the shape of ``x`` count in the
        loss only where it is True (default all True: the whole output).
        """
        key = (mask is not None, jnp.dtype(x.dtype))
        if key not in self.compiled:
            layer = self.layer
            params = layer.states(brainstate.ParamState)

            def loss(v, m, counted):
                with brainstate.environ.context(fit=True, dt=DT_MS):
                    y = layer(v) if m is None else layer(v, m)
                total = 0.0
                for leaf, weights in zip(jax.tree_util.tree_leaves(y), _loss_weights(y), strict=True):
                    if counted is not None and np.shape(leaf) == v.shape:
                        weights = jnp.where(counted, weights, 0)
                    total = total + jnp.sum(jnp.asarray(leaf, jnp.float32) * weights)
                return total, y

            grad = brainstate.transform.grad(loss, grad_states=params, argnums=0, has_aux=True)
            self.compiled[key] = brainstate.transform.jit(grad)
        if mask is not None and loss_mask is None:
            loss_mask = np.ones(np.shape(mask), bool)
        grads, y = self.compiled[key](x, mask, loss_mask)
        if not self.layer.states(brainstate.ParamState):
            return y, {}, grads  # without parameters, grad returns the input gradient alone
        g_params, g_x = grads
        return y, g_params, g_x


_HARNESSES = {}


def harness(name):
    if name not in _HARNESSES:
        _HARNESSES[name] = Harness(name)
    return _HARNESSES[name]


def _leaves64(tree):
    return [np.asarray(jnp.asarray(leaf, jnp.float32), np.float64) for leaf in jax.tree_util.tree_leaves(tree)]


@pytest.mark.parametrize("name,hazard", MATRIX, ids=[f"{a}-{b}" for a, b in MATRIX])
def test_hazard(name, hazard):
    spec = HAZARDS[hazard]
    subject = SUBJECTS[name]
    h = harness(name)
    h.reset(hazard if spec.target == "weight" else None)
    rng = np.random.default_rng(0)
    values = _normal(rng, h.shape) if spec.target == "weight" else spec.values(rng, h.shape)
    x = jnp.asarray(np.asarray(values, np.float32), spec.dtype)
    mask = hazard_mask(h.shape, spec.mask, rng) if spec.mask and subject.masks else None

    y, g_params, g_x = h.step(x, mask)

    assert finite_leaves(y), f"{name}/{hazard}: non-finite output"
    assert finite_leaves(g_x), f"{name}/{hazard}: non-finite input gradient"
    trainable = h.layer.states(brainstate.ParamState)
    assert set(g_params) == set(trainable), f"{name}/{hazard}: gradients reach {set(g_params)}, not {set(trainable)}"
    for path, grad in g_params.items():
        assert finite_leaves(grad), f"{name}/{hazard}: non-finite gradient of {path}"
    for path, state in h.layer.states().items():
        assert finite_leaves(state.value), f"{name}/{hazard}: state {path} became non-finite"

    if spec.tol is not None:
        x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
        expected = [np.asarray(e, np.float64) for e in jax.tree_util.tree_leaves(h.reference(x64, mask))]
        actual = _leaves64(y)
        assert [a.shape for a in actual] == [e.shape for e in expected], f"{name}/{hazard}: output shapes"
        atol, rtol = (subject.tol or {}).get(hazard, spec.tol)
        for a, e in zip(actual, expected, strict=True):
            # statistics (moments) and the wrapped layers' outputs carry the data's magnitude: the tolerance
            # scales with the largest expected value
            np.testing.assert_allclose(a, e, atol=atol * max(1.0, np.abs(e).max()), rtol=rtol,
                                       err_msg=f"{name}/{hazard}")


# ---------------------------------------------------------------------------
# padding that holds NaN or inf, and running statistics of an empty channel
# ---------------------------------------------------------------------------

MASKED = [name for name, subject in SUBJECTS.items() if subject.masks]
PADDING = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "1e30": 1e30}


def _valid(leaf, mask):
    """The entries of an output at valid positions (an output of another shape, e.g. statistics, whole)."""
    leaf = np.asarray(jnp.asarray(leaf, jnp.float32))
    return leaf[np.broadcast_to(mask, leaf.shape)] if leaf.shape == np.shape(mask) else leaf


@pytest.mark.parametrize("pad", PADDING)
@pytest.mark.parametrize("name", MASKED)
def test_padding_never_reaches_valid_values_or_gradients(name, pad):
    """Whatever the padding holds, a loss over the valid outputs has the values and gradients of zero padding.

    The valid outputs equal the float64 reference on the valid data. The gradient at padded positions is 0
    (they enter no statistic and their outputs are not in the loss), and the parameter gradients and the
    states are those of the zero-padded input.
    """
    h = harness(name)
    rng = np.random.default_rng(6)
    x = _normal(rng, h.shape).astype(np.float32)
    mask = hazard_mask(h.shape, "group", rng)
    mask[0] = rng.random(mask.shape[1:]) < 0.7  # keep some valid entries in every sample
    runs = []
    for fill in (0.0, PADDING[pad]):
        h.reset()
        y, g_params, g_x = h.step(jnp.asarray(np.where(mask, x, fill).astype(np.float32)), mask, mask)
        runs.append((y, g_params, np.asarray(g_x), _state_values(h.layer)))
    (y0, p0, g0, s0), (y1, p1, g1, s1) = runs
    expected = h.reference(x.astype(np.float64), mask)
    for first, second, reference in zip(jax.tree_util.tree_leaves(y0), jax.tree_util.tree_leaves(y1),
                                        jax.tree_util.tree_leaves(expected), strict=True):
        np.testing.assert_allclose(_valid(second, mask), _valid(first, mask), rtol=1e-6, atol=1e-6,
                                   err_msg=f"{name}/{pad}: valid outputs")
        np.testing.assert_allclose(_valid(second, mask), _valid(reference, mask), rtol=1e-5, atol=1e-4,
                                   err_msg=f"{name}/{pad}: valid outputs against the reference")
    assert np.all(np.isfinite(g1)), f"{name}/{pad}: non-finite input gradient"
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-6, err_msg=f"{name}/{pad}: input gradient")
    assert np.all(g1[~np.broadcast_to(mask, g1.shape)] == 0), "padded positions have a non-zero gradient"
    for what, first, second in (("gradient of", p0, p1), ("state", s0, s1)):
        for path in first:
            leaves = zip(jax.tree_util.tree_leaves(first[path]), jax.tree_util.tree_leaves(second[path]), strict=True)
            for a, b in leaves:
                np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6,
                                           err_msg=f"{name}/{pad}: {what} {path}")


def _has_running_statistics(name):
    return getattr(harness(name).layer, "running_mean", None) is not None


STATEFUL = [name for name in MASKED if _has_running_statistics(name)]


@pytest.mark.parametrize("name", STATEFUL)
def test_fully_masked_channel_keeps_running_statistics(name):
    """The last channel has no valid entry: its running statistics are exactly the old ones."""
    h = harness(name)
    h.reset()
    rng = np.random.default_rng(3)
    start = {}
    for stat, value in (("running_mean", 0.7), ("running_var", 1.3)):  # not the batch statistics' 0 and 1
        state = getattr(h.layer, stat)
        state.value = jnp.full(np.shape(state.value), value, jnp.asarray(state.value).dtype)
        start[stat] = np.asarray(state.value)
    x = jnp.asarray(_normal(rng, h.shape).astype(np.float32))
    h.step(x, hazard_mask(h.shape, "group", rng))
    for stat in ("running_mean", "running_var"):
        old = start[stat]
        new = np.asarray(getattr(h.layer, stat).value)
        assert np.array_equal(new[..., -1], old[..., -1]), f"{stat} of the empty channel changed"
        assert not np.array_equal(new[..., 0], old[..., 0]), f"{stat} of a channel with data did not change"


# ---------------------------------------------------------------------------
# Quantity input (SPEC §3 "Units")
# ---------------------------------------------------------------------------


def _in_mv_powers(outputs):
    """Each output of a call on ``x * mV`` as ``(k, float64 mantissa in mV^k)``; k = 0: a plain array."""
    converted = []
    for leaf in jax.tree_util.tree_leaves(outputs, is_leaf=lambda a: isinstance(a, u.Quantity)):
        if not isinstance(leaf, u.Quantity):
            converted.append((0, np.asarray(leaf, np.float64)))
            continue
        powers = [k for k in (1, 2) if u.have_same_dim(leaf, u.mV**k)]
        assert powers, f"output in {leaf.unit}, not a power of the input's mV"
        converted.append((powers[0], np.asarray(leaf.to_decimal(u.mV ** powers[0]), np.float64)))
    return converted


UNITS = [name for name, subject in SUBJECTS.items() if subject.units is not None]


@pytest.mark.parametrize("name", UNITS)
def test_quantity_input_normalizes_like_its_mantissa(name):
    """``x * mV`` gives the output of ``x``: dimensionless and plain, or in mV^k (statistics, spikes, LRN)."""
    subject = SUBJECTS[name]
    rng = np.random.default_rng(7)
    x = _normal(rng, subject.shape).astype(np.float32)
    mask = hazard_mask(subject.shape, "group", rng) if subject.masks else None
    h = harness(name)
    h.reset()
    plain = h.step(jnp.asarray(x), mask)[0]  # the compiled training step of the matrix
    layer = subject.build()  # eager: a layer adopts the unit of its running statistics on its first call
    with brainstate.environ.context(fit=True, dt=DT_MS):
        x_mv = jnp.asarray(x) * u.mV
        with_unit = layer(x_mv) if mask is None else layer(x_mv, mask)
    for path, state in layer.states().items():
        assert finite_leaves(state.value), f"{name}: state {path} became non-finite"
    converted = _in_mv_powers(with_unit)
    assert tuple(k for k, _ in converted) == subject.units, f"{name}: output units mV^{[k for k, _ in converted]}"
    for (_, actual), expected in zip(converted, _leaves64(plain), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5, err_msg=name)


# ---------------------------------------------------------------------------
# folding extreme running statistics (fold_batch_norm, fold_threshold)
# ---------------------------------------------------------------------------

# running mean, running variance, scale: statistics of huge data, of tiny data, a vanishing and a huge scale
FOLDING = {
    "huge_statistics": (1e19, 3e37, 1.0),
    "tiny_statistics": (1e-30, 1e-60, 1.0),
    "tiny_scale": (0.5, 2.0, 1e-30),
    "huge_scale": (0.5, 2.0, 1e30),
}


@pytest.mark.parametrize("case", FOLDING)
def test_folding_at_extreme_statistics(case):
    """Folded weights and thresholds are finite and reproduce the normalization they replace (float64)."""
    mean, var, scale = FOLDING[case]
    norm = brainnorm.BatchNorm0d(C, scale_init=np.float32(scale) * SCALE, bias_init=BIAS)
    norm.running_mean.value = jnp.full(C, mean, jnp.float32)
    norm.running_var.value = jnp.full(C, var, jnp.float32)
    mean64 = np.full(C, np.float32(mean), np.float64)
    std64 = np.sqrt(np.full(C, np.float32(var), np.float64) + 1e-5)
    g64 = np.asarray(np.float32(scale) * SCALE, np.float64)

    folded = brainnorm.fold_batch_norm(_linear(), norm)
    assert finite_leaves(folded.weight.value), f"{case}: non-finite folded parameters"
    rng = np.random.default_rng(8)
    # inputs whose layer outputs spread around the running mean by about its standard deviation
    x = (rng.standard_normal((16, 6)) * (np.sqrt(var) if var > 1 else 1.0)).astype(np.float32)
    z64 = x.astype(np.float64) @ WEIGHT.astype(np.float64) + BIAS
    expected = (z64 - mean64) / std64 * g64 + BIAS
    actual = np.asarray(folded(jnp.asarray(x)), np.float64)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(expected).max()),
                               err_msg=case)

    threshold, sign = brainnorm.fold_threshold(norm, 1.0)
    assert not np.any(np.isnan(np.asarray(threshold))), f"{case}: NaN threshold"
    potentials = (mean64 + std64 * rng.standard_normal((4096, C)) * 3).astype(np.float32).astype(np.float64)
    normalized = (potentials - mean64) / std64 * g64 + BIAS
    fires = normalized >= 1.0
    folded_fires = np.asarray(sign, np.float64) * (potentials - np.asarray(threshold, np.float64)) >= 0
    decided = np.abs(normalized - 1.0) > 1e-5 * np.maximum(1.0, np.abs(normalized))  # away from the threshold
    assert np.array_equal(folded_fires[decided], fires[decided]), f"{case}: folded threshold fires differently"


# ---------------------------------------------------------------------------
# boundedness and finiteness that docstrings promise, at float32's extremes
# ---------------------------------------------------------------------------

F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal number
F32_SUBNORMAL = float(np.finfo(np.float32).smallest_subnormal)
# XLA's CPU backend flushes subnormal numbers to 0, so "tiny" (the smallest normal numbers, times 2 to 4) is
# the smallest magnitude whose value is compared; "subnormal" input is checked for finiteness and bounds only.
EXTREMES = {"max/4": F32_MAX / 4, "1e30": 1e30, "1e-30": 1e-30, "tiny": 4 * F32_TINY}
FINITE_EXTREMES = {**EXTREMES, "subnormal": 2 * F32_SUBNORMAL, "zero": 0.0}


def _extreme(magnitude, shape, seed=9):
    """Data of ``magnitude`` in float32: uniform in ±[0.5, 1] times it."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(0.5, 1.0, shape) * rng.choice([-1.0, 1.0], shape)
    return (values * magnitude).astype(np.float32)


@pytest.mark.parametrize("magnitude", EXTREMES)
@pytest.mark.parametrize("p", [1.0, 2.0, 3.5, math.inf])
def test_lp_normalize_neither_overflows_nor_underflows(p, magnitude):
    """lp_normalize's docstring: the norm is formed on rescaled values, so it neither overflows nor underflows."""
    x = _extreme(EXTREMES[magnitude], (4, 6))
    x64 = x.astype(np.float64)
    if p == math.inf:
        norm = np.max(np.abs(x64), -1, keepdims=True)
    else:
        norm = np.sum(np.abs(x64) ** p, -1, keepdims=True) ** (1 / p)
    expected = x64 / np.maximum(norm, F32_TINY)
    y = jax.jit(lambda v: F.lp_normalize(v, p, epsilon=F32_TINY))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=1e-5, atol=1e-6, err_msg=f"p={p}")
    w = np.random.default_rng(1).standard_normal(x.shape)
    g = jax.grad(lambda v: jnp.sum(F.lp_normalize(v, p, epsilon=F32_TINY) * w))(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(g))), "non-finite gradient"


@pytest.mark.parametrize("magnitude", FINITE_EXTREMES)
def test_divisive_normalization_output_and_gradient_stay_finite(magnitude):
    """divisive_normalization's docstring: gradients are finite everywhere; the response is at most gain * C."""
    x = jnp.asarray(_extreme(FINITE_EXTREMES[magnitude], (4, C)))
    y = F.divisive_normalization(x, gain=SCALE)
    assert np.all(np.isfinite(np.asarray(y)))
    assert np.all(np.abs(np.asarray(y)) <= SCALE * C * (1 + 1e-6))  # |x_i|^2 / (1 + mean_j |x_j|^2) <= C
    g = jax.grad(lambda v: jnp.sum(F.divisive_normalization(v, gain=SCALE)))(x)
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("dt_ms", [0.01, 1e6])
@pytest.mark.parametrize("magnitude", FINITE_EXTREMES)
def test_divisive_circuit_stays_bounded_for_any_finite_input(magnitude, dt_ms):
    """DynamicDivisiveNormalization's docstring: from rest, ``|R| <= max_t |g d|`` for any finite input, at
    any dt (each step is a convex combination of the state and its target); and R stays finite."""
    circuit = brainnorm.DynamicDivisiveNormalization(C, gain=SCALE)
    circuit.init_state(4)
    x = _extreme(FINITE_EXTREMES[magnitude], (4, C))
    with brainstate.environ.context(dt=dt_ms * u.ms):
        responses = np.asarray(brainstate.transform.for_loop(lambda i: circuit(jnp.asarray(x)), jnp.arange(5)))
    assert np.all(np.isfinite(responses)), "non-finite response"
    assert finite_leaves(circuit.conductance.value), "non-finite conductance"
    bound = SCALE * np.asarray(x, np.float64) ** 2  # |g d| with sigma = 1, exponent 2
    assert np.all(np.abs(responses) <= bound * (1 + 1e-5)), "response above the bound of the docstring"


WRAPPED_WEIGHTS = {"zero": 0.0, "subnormal": 2 * F32_SUBNORMAL, "tiny": 4 * F32_TINY, "1e-30": 1e-30, "1e30": 1e30,
                   "1e37": 1e37}


@pytest.mark.parametrize("magnitude", WRAPPED_WEIGHTS)
@pytest.mark.parametrize("name", WRAPPERS)
def test_weight_wrappers_at_float32_extremes(name, magnitude):
    """SpectralNorm's docstring: sigma is bounded below by epsilon, so the weight stays finite (WeightNorm:
    the norm is bounded below by epsilon); at every magnitude the weight in use is the float64 one."""
    weight = _extreme(WRAPPED_WEIGHTS[magnitude], WEIGHT.shape)
    wrapper = SUBJECTS[name].build(weight)
    with brainstate.environ.context(fit=True):
        wrapper(jnp.ones((2, 6)))
    used = np.asarray(wrapper.normalized_weight(), np.float64)
    reparametrized = _weight_norm_ref if name == "WeightNorm" else _spectral_norm_ref
    expected = reparametrized(weight)
    assert np.all(np.isfinite(used)), "non-finite weight"
    np.testing.assert_allclose(used, expected, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(expected).max()))
    params = wrapper.states(brainstate.ParamState)
    grads = brainstate.transform.grad(lambda v: jnp.sum(wrapper(v) * WEIGHT[:2, :]), grad_states=params)(
        jnp.ones((2, 6)))
    assert finite_leaves(grads), "non-finite parameter gradient"


# ---------------------------------------------------------------------------
# single regressions
# ---------------------------------------------------------------------------


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
        loss = lambda v: jnp.sum(F.local_response_norm(v, 3, alpha=0.5) * w)  # noqa: E731
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
