"""Every layer and function under every JAX transformation, at small and large sizes (SPEC §8).

SPEC §8: "Every public layer and function works, for every input size, dtype
and backend, under jax.grad, jax.jvp, jax.linearize, jax.jacfwd, jax.jacrev,
jax.hessian, jax.vmap, jax.checkpoint, jax.eval_shape, jax.jit [...]. Every
path gives the same results up to float32 rounding [...]; no path raises where
another works." With the fused CPU kernel, a float32 input of 65536 elements or
more failed under ``jax.jvp`` / ``jax.linearize`` / ``jax.jacfwd`` (TypeError:
can't apply forward-mode autodiff (jvp) to a custom_vjp function) and
``jax.jvp(jax.grad(f))`` (ValueError: the FFI call cannot be differentiated):
the "large" cells of this grid hold 65536 elements or more.

The grid: transform x layer/function x size x dtype x mask (see TRANSFORMS).

* Functions (``brainnorm.functional``): layer_norm, rms_norm, batch_norm
  (training=True: ``y`` and the new running statistics are all outputs),
  group_norm, instance_norm, local_response_norm, moments,
  weight_standardization. Layers: LayerNorm, RMSNorm, BatchNorm0d/2d
  (training), GroupNorm, InstanceNorm, LocalResponseNorm and
  ThresholdDependentBatchNorm (``step_mode='multi'``, training). A layer that
  writes running statistics is made a pure function of its input with
  brainstate's ``StatefulFunction`` (states in, new states out, nothing
  written: ``jaxpr_call``); its outputs are ``y`` and the new running mean and
  variance. Stateless layers are called directly (they only read states).
* Sizes: ``large`` (exactly 65536 elements: jit, vmap, checkpoint, eval_shape,
  grad, jvp, linearize and Hessian-vector products ``jax.jvp(jax.grad(L))``
  stand in for Jacobians, too big there), ``small`` (256-512 elements:
  jacfwd, jacrev) and ``tiny`` (jax.hessian).
* dtypes: float32 (every mask) and bfloat16 (unmasked; grad, jvp, hvp,
  eval_shape). Inputs are bfloat16 values in both, so both share a reference.
* Masks: none, or the mask the layer takes: elementwise for 2-D inputs (with a
  row and a column that have no valid element), a ``(B, T, 1)`` padding mask
  (one sequence of length 0) for 3-D inputs, ``(B, H, W, 1)`` for BatchNorm2d.
  Masked data are offset by 3, unmasked data by 0.5.

Every check compares against an independent float64 reference: the formulas
below (written with ``jax.numpy``, not brainnorm's code) differentiated by JAX
with 64-bit types enabled (``jax.enable_x64``, a context manager in JAX 0.10),
evaluated at the same input values; the references' own derivatives are
checked against central differences. Outputs under jit / vmap / checkpoint
are also compared with the eager (untransformed) call within 1e-5 (float32)
or one bfloat16 rounding.

The loss ``L(x) = sum_k sum(sin(out_k(x)) * w_k)`` (fixed random ``w_k``, one
per output) makes every derivative non-trivial.

Tolerances: outputs within 1e-4 (+1e-5 relative) of the float64 reference
(float32), 3e-2 of the largest value (bfloat16); derivatives within 2e-5
(float32) or 3e-2 (bfloat16) of the largest reference entry, elementwise
(measured with the pure-JAX core: about 1e-6 and 5e-3).

Also here: the two reproductions of the issue (``jax.jvp`` and
``jax.jvp(jax.grad(f))`` of layer_norm at 512 x 256) and empty batches
(SPEC §3 "A group with no valid element").
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainnorm
from brainnorm import functional as F

# --- tolerances ----------------------------------------------------------------------------------

OUT_ATOL = {"float32": 1e-4, "bfloat16": 3e-2}  # vs float64 reference (bf16: relative to max |ref|)
SAME_ATOL = {"float32": 1e-5, "bfloat16": 1.6e-2}  # transformed vs eager (bf16: relative to max |eager|)
DERIV_TOL = {"float32": 2e-5, "bfloat16": 3e-2}  # relative to max |reference derivative|

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# --- shapes ------------------------------------------------------------------------------------------

SHAPES = {
    2: {"tiny": (4, 8), "small": (8, 64), "large": (256, 256)},  # (B, C)
    3: {"tiny": (2, 3, 4), "small": (4, 8, 16), "large": (16, 32, 128)},  # (B, T, C) or (T, B, C)
    4: {"tiny": (2, 2, 2, 4), "small": (2, 4, 4, 8), "large": (4, 32, 32, 16)},  # (B, H, W, C)
}
for _rank in SHAPES:
    assert int(np.prod(SHAPES[_rank]["large"])) >= 1 << 16


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


# --- float64 references (jax.numpy, evaluated under jax.enable_x64) ---------------------------------


def r_moments(x, axes, mask=None, use_mean=True):
    valid = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
    count = jnp.sum(valid, axis=axes, keepdims=True)
    safe = jnp.maximum(count, 1)
    if use_mean:
        mean = jnp.sum(jnp.where(valid, x, 0.0), axis=axes, keepdims=True) / safe
    else:
        mean = jnp.zeros(count.shape, x.dtype)
    var = jnp.sum(jnp.where(valid, jnp.square(x - mean), 0.0), axis=axes, keepdims=True) / safe
    return mean, var, count


def r_normalize(x, axes, mask, eps, scale=None, bias=None, use_mean=True):
    mean, var, count = r_moments(x, axes, mask, use_mean)
    y = jnp.where(count > 0, (x - mean) / jnp.sqrt(var + eps), 0.0)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


def r_group_norm(x, groups, mask, eps, scale, bias):
    """``x`` is ``(B, ..., C)``; channels split into ``groups`` along the last axis."""
    shape = x.shape
    split = shape[:-1] + (groups, shape[-1] // groups)
    xg = x.reshape(split)
    mg = None
    if mask is not None:
        mg = jnp.broadcast_to(jnp.asarray(mask, bool), shape).reshape(split)
    axes = tuple(range(1, len(shape) - 1)) + (len(split) - 1,)
    y = r_normalize(xg, axes, mg, eps).reshape(shape)
    return y * scale + bias


def r_running(old_mean, old_var, x, axes, mask, momentum):
    mean, var, count = r_moments(x, axes, mask)
    mean, var, count = (jnp.reshape(a, old_mean.shape) for a in (mean, var, count))
    new_mean = momentum * old_mean + (1 - momentum) * mean
    new_var = momentum * old_var + (1 - momentum) * var
    return jnp.where(count > 0, new_mean, old_mean), jnp.where(count > 0, new_var, old_var)


def r_batch_norm(x, mask, eps, scale, bias, running_mean, running_var, momentum, factor=1.0):
    axes = tuple(range(x.ndim - 1))
    y = r_normalize(x, axes, mask, eps, scale * factor, bias)
    return (y,) + r_running(running_mean, running_var, x, axes, mask, momentum)


def r_local_response_norm(x, size, alpha, beta, k, mask=None):
    """PyTorch LRN along the last axis; masked positions' squares read as 0."""
    squares = jnp.square(x)
    if mask is not None:
        squares = jnp.where(jnp.broadcast_to(jnp.asarray(mask, bool), x.shape), squares, 0.0)
    channels = x.shape[-1]
    lo, hi = size // 2, (size - 1) // 2
    padded = jnp.pad(squares, [(0, 0)] * (x.ndim - 1) + [(lo, hi)])
    window = sum(padded[..., i:i + channels] for i in range(size))
    return x * (k + alpha / size * window) ** (-beta)


def r_weight_standardization(w, eps, gain):
    fan_in = w.shape[0]
    mean = jnp.mean(w, axis=0, keepdims=True)
    var = jnp.mean(jnp.square(w - mean), axis=0, keepdims=True)
    return (w - mean) / jnp.sqrt(jnp.maximum(var * fan_in, eps)) * gain


# --- the cases -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    rank: int  # input rank (SHAPES key)
    masks: tuple  # mask kinds it takes besides "none"


SPECS = {
    "F.layer_norm": Spec(2, ("mask",)),
    "F.rms_norm": Spec(2, ("mask",)),
    "F.batch_norm": Spec(2, ("mask",)),
    "F.group_norm": Spec(3, ("mask",)),
    "F.instance_norm": Spec(3, ("mask",)),
    "F.local_response_norm": Spec(2, ()),
    "F.moments": Spec(2, ("mask",)),
    "F.weight_standardization": Spec(2, ()),
    "LayerNorm": Spec(2, ("mask",)),
    "RMSNorm": Spec(2, ("mask",)),
    "BatchNorm0d": Spec(2, ("mask",)),
    "BatchNorm2d": Spec(4, ("mask",)),
    "GroupNorm": Spec(3, ("mask",)),
    "InstanceNorm": Spec(3, ("mask",)),
    "LocalResponseNorm": Spec(2, ("mask",)),
    "ThresholdDependentBatchNorm": Spec(3, ("mask",)),
}


# A function and the layer built on it share their data, parameters and float64 reference (computed once).
FAMILY = {
    "F.layer_norm": "layer_norm", "LayerNorm": "layer_norm",
    "F.rms_norm": "rms_norm", "RMSNorm": "rms_norm",
    "F.batch_norm": "batch_norm", "BatchNorm0d": "batch_norm",
    "BatchNorm2d": "batch_norm_4d",
    "F.group_norm": "group_norm", "GroupNorm": "group_norm",
    "F.instance_norm": "instance_norm", "InstanceNorm": "instance_norm",
    "F.local_response_norm": "local_response_norm", "LocalResponseNorm": "local_response_norm",
    "F.moments": "moments",
    "F.weight_standardization": "weight_standardization",
    "ThresholdDependentBatchNorm": "tdbn",
}
assert set(FAMILY) == set(SPECS)


def _make_mask(name, shape, rng):
    """A boolean mask for ``shape``: every group has no valid element or several."""
    rank = len(shape)
    if rank == 2:  # elementwise; row 1 and column 2 have no valid element
        mask = rng.random(shape) < 0.7
        mask[[0, 3], :] = True  # >= 2 valid per non-empty column
        mask[:, [0, 3]] = True  # >= 2 valid per non-empty row
        mask[1, :] = False
        mask[:, 2] = False
        return mask
    if rank == 3:  # padding mask over the first two axes; lengths 0 or >= 4
        time_major = name == "ThresholdDependentBatchNorm"  # (T, B, C)
        steps, batch = (shape[0], shape[1]) if time_major else (shape[1], shape[0])
        shortest = min(4, steps)  # short sequences have tiny variances: their padded outputs explode
        lengths = shortest + (np.arange(batch) * 3) % (steps - shortest + 1)
        lengths[1] = 0
        valid = np.arange(steps)[None, :] < lengths[:, None]  # (batch, steps)
        return (valid.T if time_major else valid)[..., None]
    # (B, H, W, 1)
    return rng.random(shape[:-1] + (1,)) < 0.7


def _purified(layer, call, x_example):
    """``v -> (y, new running mean, new running var)`` through the layer, writing no state."""
    sf = brainstate.transform.StatefulFunction(call, return_only_write=False)
    sf.make_jaxpr(x_example)
    states = list(sf.get_states(x_example))
    values = [s.value for s in states]
    i_mean = next(i for i, s in enumerate(states) if s is layer.running_mean)
    i_var = next(i for i, s in enumerate(states) if s is layer.running_var)

    def pure(v):
        new, y = sf.jaxpr_call(values, v)
        return y, new[i_mean], new[i_var]

    return pure


def _affine(channels, rng):
    scale = (1.0 + 0.3 * rng.standard_normal(channels)).astype(np.float32)
    bias = (0.2 * rng.standard_normal(channels)).astype(np.float32)
    return scale, bias


def _build(name, size, dtype, mask_kind, x):
    """(fn, ref) for case ``name`` on input ``x`` (the tested dtype)."""
    shape = x.shape
    rng = np.random.default_rng(_seed("params", FAMILY[name], size, mask_kind))
    channels = shape[-1]
    scale, bias = _affine(channels, rng)
    mask = _make_mask(name, shape, rng) if mask_kind == "mask" else None
    groups = 2 if size == "tiny" else 4
    rm = (0.1 * rng.standard_normal(channels)).astype(np.float32)
    rv = (1.0 + 0.5 * rng.random(channels)).astype(np.float32)
    lrn_size = 3 if size == "tiny" else 5
    f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))  # noqa: E731  (called under enable_x64)

    if name == "F.layer_norm":
        return (lambda v: (F.layer_norm(v, scale, bias, mask=mask),),
                lambda v: (r_normalize(v, (-1,), mask, 1e-6, f64(scale), f64(bias)),))
    if name == "F.rms_norm":
        return (lambda v: (F.rms_norm(v, scale, mask=mask),),
                lambda v: (r_normalize(v, (-1,), mask, 1e-6, f64(scale), use_mean=False),))
    if name == "F.batch_norm":
        return (lambda v: tuple(F.batch_norm(v, rm, rv, scale, bias, training=True, momentum=0.9, mask=mask)),
                lambda v: r_batch_norm(v, mask, 1e-5, f64(scale), f64(bias), f64(rm), f64(rv), 0.9))
    if name == "F.group_norm":
        return (lambda v: (F.group_norm(v, groups, scale, bias, mask=mask),),
                lambda v: (r_group_norm(v, groups, mask, 1e-6, f64(scale), f64(bias)),))
    if name == "F.instance_norm":
        return (lambda v: (F.instance_norm(v, scale, bias, mask=mask),),
                lambda v: (r_normalize(v, (1,), mask, 1e-5, f64(scale), f64(bias)),))
    if name == "F.local_response_norm":
        return (lambda v: (F.local_response_norm(v, lrn_size, alpha=0.5, beta=0.75, k=1.0),),
                lambda v: (r_local_response_norm(v, lrn_size, 0.5, 0.75, 1.0),))
    if name == "F.moments":
        return (lambda v: tuple(F.moments(v, 0, mask=mask)),
                lambda v: r_moments(v, (0,), mask)[:2])
    if name == "F.weight_standardization":
        return (lambda v: (F.weight_standardization(v, eps=1e-4, gain=scale),),
                lambda v: (r_weight_standardization(v, 1e-4, f64(scale)),))
    if name == "LayerNorm":
        layer = brainnorm.LayerNorm(channels, scale_init=scale, bias_init=bias)
        return (lambda v: (layer(v, mask),),
                lambda v: (r_normalize(v, (-1,), mask, 1e-6, f64(scale), f64(bias)),))
    if name == "RMSNorm":
        layer = brainnorm.RMSNorm(channels, scale_init=scale)
        return (lambda v: (layer(v, mask),),
                lambda v: (r_normalize(v, (-1,), mask, 1e-6, f64(scale), use_mean=False),))
    if name in ("BatchNorm0d", "BatchNorm2d"):
        cls = getattr(brainnorm, name)
        layer = cls(shape[1:] if name == "BatchNorm2d" else channels, momentum=0.9, scale_initializer=scale,
                    bias_initializer=bias)
        layer.running_mean.value = jnp.reshape(jnp.asarray(rm), layer.running_mean.value.shape)
        layer.running_var.value = jnp.reshape(jnp.asarray(rv), layer.running_var.value.shape)
        pure = _purified(layer, lambda v: layer(v, mask, use_running_average=False), x)
        return pure, lambda v: r_batch_norm(v, mask, 1e-5, f64(scale), f64(bias), f64(rm), f64(rv), 0.9)
    if name == "GroupNorm":
        layer = brainnorm.GroupNorm(shape[1:], num_groups=groups, scale_init=scale, bias_init=bias)
        return (lambda v: (layer(v, mask),),
                lambda v: (r_group_norm(v, groups, mask, 1e-6, f64(scale), f64(bias)),))
    if name == "InstanceNorm":
        layer = brainnorm.InstanceNorm(shape[1:], scale_init=scale, bias_init=bias)
        return (lambda v: (layer(v, mask),),
                lambda v: (r_normalize(v, (1,), mask, 1e-5, f64(scale), f64(bias)),))
    if name == "LocalResponseNorm":
        layer = brainnorm.LocalResponseNorm(channels, lrn_size, alpha=0.5, beta=0.75, k=1.0)
        return (lambda v: (layer(v, mask),),
                lambda v: (r_local_response_norm(v, lrn_size, 0.5, 0.75, 1.0, mask),))
    if name == "ThresholdDependentBatchNorm":
        layer = brainnorm.ThresholdDependentBatchNorm(channels, v_th=0.5, momentum=0.9, step_mode="multi",
                                                      scale_init=scale, bias_init=bias)
        layer.running_mean.value = jnp.reshape(jnp.asarray(rm), layer.running_mean.value.shape)
        layer.running_var.value = jnp.reshape(jnp.asarray(rv), layer.running_var.value.shape)
        pure = _purified(layer, lambda v: layer(v, mask, use_running_average=False), x)
        return pure, lambda v: r_batch_norm(v, mask, 1e-5, f64(scale), f64(bias), f64(rm), f64(rv), 0.9,
                                            factor=0.5)
    raise AssertionError(name)


class Setup:
    """One grid cell's data: brainnorm's function, the reference, inputs; eager output and references cached."""

    def __init__(self, name, size, dtype, mask_kind):
        shape = SHAPES[SPECS[name].rank][size]
        # Inputs and tangents are bfloat16 values (also in the float32 cells): both dtypes see the same
        # numbers and share one float64 reference.
        rng = np.random.default_rng(_seed("data", FAMILY[name], size, mask_kind))
        offset = 3.0 if mask_kind == "mask" else 0.5
        jdtype = DTYPES[dtype]
        self.name, self.size, self.dtype, self.mask_kind = name, size, dtype, mask_kind

        def draw(values):
            return jnp.asarray(jnp.asarray(values, jnp.bfloat16), jdtype)

        self.x = draw(offset + rng.standard_normal(shape))
        self.x2 = draw(offset - 1.0 + 2.0 * rng.standard_normal(shape))
        self.v = draw(rng.standard_normal(shape))
        self.fn, self.ref = _build(name, size, dtype, mask_kind, self.x)
        with jax.enable_x64(True):
            shapes = [o.shape for o in jax.eval_shape(self.ref, jax.ShapeDtypeStruct(shape, jnp.float64))]
        self.ws = tuple(rng.standard_normal(s).astype(np.float32) for s in shapes)
        self._eager = None
        self._reference = None
        self.bundle = None  # transformed results of the cell, computed together (see ``computed``)

    @property
    def loss(self):
        """``L(x) = sum_k sum(sin(out_k) * w_k)``, in float32."""
        return _loss(self.fn, self.ws, jnp.float32)

    def eager(self):
        """The untransformed call (no jit) at ``x``, computed once."""
        if self._eager is None:
            self._eager = jax.tree_util.tree_map(np.asarray, self.fn(self.x))
        return self._eager

    def reference(self, what):
        """Float64 reference quantities at ``x`` (NumPy), all computed by one jitted program per cell."""
        if self._reference is None:
            key = (FAMILY[self.name], self.size, self.mask_kind)
            if key not in _REFERENCES:
                _REFERENCES[key] = _reference_values(self.ref, self.ws, f64(self.x), f64(self.x2), f64(self.v),
                                                     self.size)
            self._reference = _REFERENCES[key]
        return self._reference[what]


_REFERENCES = {}


@functools.lru_cache(maxsize=None)
def setup(name, size, dtype, mask_kind) -> Setup:
    return Setup(name, size, dtype, mask_kind)


def _loss(fn, ws, ftype):
    """``v -> sum_k sum(sin(out_k) * w_k)`` in ``ftype`` (``w_k`` reshaped to the output's shape)."""

    def loss(v):
        outs = fn(v)
        assert len(outs) == len(ws), (len(outs), len(ws))
        total = 0.0
        for o, w in zip(outs, ws):
            assert np.size(o) == np.size(w), (np.shape(o), np.shape(w))
            total = total + jnp.sum(jnp.sin(jnp.asarray(o).astype(ftype)) * jnp.reshape(jnp.asarray(w, ftype), o.shape))
        return total

    return loss


def f64(a):
    """Any array (bfloat16 included) as a float64 NumPy array."""
    return np.asarray(a).astype(np.float64)


def _reference_values(ref, ws, x, x2, v, size):
    """Outputs and derivatives of the float64 reference (``jax.enable_x64``); Jacobian / Hessian by size."""

    def values(x, x2, v):
        loss = _loss(ref, ws, jnp.float64)
        if size == "tiny":
            return dict(hessian=jax.hessian(loss)(x))
        out = dict(out=ref(x), out2=ref(x2), grad=jax.grad(loss)(x), jvp=jax.jvp(ref, (x,), (v,))[1],
                   hvp=jax.jvp(jax.grad(loss), (x,), (v,))[1])
        if size == "small":
            out["jac"] = jax.jacrev(ref)(x)
        return out

    with jax.enable_x64(True):
        # the reference programs are compiled without LLVM optimizations: faster to build, same float64 math
        compiled = jax.jit(values).lower(x, x2, v).compile({"xla_backend_optimization_level": 0})
        result = compiled(x, x2, v)
        return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), result)


# --- assertions ----------------------------------------------------------------------------------------


def _leaves(tree):
    return [f64(a) for a in jax.tree_util.tree_leaves(tree)]


def assert_matches_reference(actual, expected, dtype, what="output"):
    """Outputs: 1e-4 absolute + 1e-5 relative (float32); bf16: 3e-2 of the largest expected value."""
    a_leaves, e_leaves = _leaves(actual), _leaves(expected)
    assert len(a_leaves) == len(e_leaves), (len(a_leaves), len(e_leaves))
    for k, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        assert a.size == e.size, f"{what}[{k}]: shape {a.shape}, reference {e.shape}"
        a = a.reshape(e.shape)
        assert np.all(np.isfinite(a)), f"{what}[{k}] is not finite"
        if dtype == "float32":
            allowed = OUT_ATOL[dtype] + 1e-5 * np.abs(e)
        else:
            allowed = OUT_ATOL[dtype] * max(1.0, np.abs(e).max(initial=0.0))
        err = np.abs(a - e)
        assert np.all(err <= allowed), (
            f"{what}[{k}]: max error {err.max(initial=0):.3g} against the float64 reference "
            f"(allowed {np.max(allowed):.3g})")


def assert_same(actual, eager, dtype, what="output"):
    """A transformed output against the eager output: 1e-5 (+1e-6 relative) in float32, one bf16 rounding."""
    a_leaves, e_leaves = _leaves(actual), _leaves(eager)
    assert len(a_leaves) == len(e_leaves)
    for k, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        assert a.shape == e.shape, f"{what}[{k}]: shape {a.shape}, eager {e.shape}"
        if dtype == "float32":
            allowed = SAME_ATOL[dtype] + 1e-6 * np.abs(e)
        else:
            allowed = SAME_ATOL[dtype] * max(1.0, np.abs(e).max(initial=0.0))
        err = np.abs(a - e)
        assert np.all(err <= allowed), f"{what}[{k}]: max difference {err.max(initial=0):.3g} from the eager call"


def assert_derivative(actual, expected, dtype, what):
    """Elementwise within DERIV_TOL times the largest |expected| entry of each leaf."""
    a_leaves, e_leaves = _leaves(actual), _leaves(expected)
    assert len(a_leaves) == len(e_leaves), (what, len(a_leaves), len(e_leaves))
    for k, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        assert a.size == e.size, f"{what}[{k}]: shape {a.shape}, reference {e.shape}"
        a = a.reshape(e.shape)
        assert np.all(np.isfinite(a)), f"{what}[{k}] is not finite"
        scale = max(np.abs(e).max(initial=0.0), 1e-3)
        tol = DERIV_TOL[dtype] * scale
        err = np.abs(a - e).max(initial=0.0)
        assert err <= tol, f"{what}[{k}]: max error {err:.3g} against the float64 reference (allowed {tol:.3g})"


# --- transforms ---------------------------------------------------------------------------------------
# Every transformed computation runs under jax.jit. To keep compile time down, the transforms a grid cell
# tests (except plain jit, which is compared with the eager call) are first compiled together, as one
# program; if that program fails to trace or compile, each transform is compiled on its own, so every test
# reports its own transform's error. The eager, untransformed output is computed once per cell.


def _raw_vmap(s):
    return lambda x, x2, v: jax.vmap(s.fn)(jnp.stack([x, x2]))


def _raw_checkpoint(s):
    ck = jax.checkpoint(s.fn)
    return lambda x, x2, v: (ck(x), jax.grad(_loss(ck, s.ws, jnp.float32))(x))


def _raw_grad(s):
    return lambda x, x2, v: jax.grad(s.loss)(x)


def _raw_jvp(s):
    return lambda x, x2, v: jax.jvp(s.fn, (x,), (v,))


def _raw_linearize(s):
    def run(x, x2, v):
        out, f_jvp = jax.linearize(s.fn, x)
        return out, f_jvp(v)

    return run


def _raw_hvp(s):
    """Hessian-vector product, forward over reverse: ``jax.jvp(jax.grad(L), (x,), (v,))``."""
    return lambda x, x2, v: jax.jvp(jax.grad(s.loss), (x,), (v,))[1]


def _raw_jacfwd(s):
    return lambda x, x2, v: jax.jacfwd(s.fn)(x)


def _raw_jacrev(s):
    return lambda x, x2, v: jax.jacrev(s.fn)(x)


def _raw_hessian(s):
    return lambda x, x2, v: jax.hessian(s.loss)(x)


RAW = {"vmap": _raw_vmap, "checkpoint": _raw_checkpoint, "grad": _raw_grad, "jvp": _raw_jvp,
       "linearize": _raw_linearize, "hvp": _raw_hvp, "jacfwd": _raw_jacfwd, "jacrev": _raw_jacrev,
       "hessian": _raw_hessian}


def computed(s, transform):
    """The jitted ``transform`` of the cell's function at ``(x, x2, v)``: from the cell's bundle if it built."""
    if s.bundle is None:
        wanted = [t for t in RAW if (t, s.name, s.size, s.dtype, s.mask_kind) in GRID]
        try:
            program = jax.jit(lambda x, x2, v: {t: RAW[t](s)(x, x2, v) for t in wanted})
            s.bundle = jax.device_get(program(s.x, s.x2, s.v))
        except Exception:  # some transform fails: compile each on its own below, to see which
            s.bundle = {}
    if transform in s.bundle:
        return s.bundle[transform]
    return jax.device_get(jax.jit(RAW[transform](s))(s.x, s.x2, s.v))


def t_jit(s):
    y = jax.jit(s.fn)(s.x)
    if s.mask_kind == "none":  # (the eager call costs seconds: one compilation per primitive)
        assert_same(y, s.eager(), s.dtype)
    assert_matches_reference(y, s.reference("out"), s.dtype)


def t_vmap(s):
    ys = computed(s, "vmap")
    first = jax.tree_util.tree_map(lambda a: a[0], ys)
    second = jax.tree_util.tree_map(lambda a: a[1], ys)
    assert_same(first, s.eager(), s.dtype, "vmap[0]")
    assert_matches_reference(first, s.reference("out"), s.dtype, "vmap[0]")
    assert_matches_reference(second, s.reference("out2"), s.dtype, "vmap[1]")


def t_checkpoint(s):
    y, g = computed(s, "checkpoint")
    assert_same(y, s.eager(), s.dtype)
    assert g.dtype == s.x.dtype, g.dtype
    assert_derivative(g, s.reference("grad"), s.dtype, "grad through checkpoint")


def t_eval_shape(s):
    abstract = jax.eval_shape(s.fn, s.x)
    with jax.enable_x64(True):
        ref = jax.eval_shape(s.ref, jax.ShapeDtypeStruct(s.x.shape, jnp.float64))
    assert [np.prod(a.shape) for a in jax.tree_util.tree_leaves(abstract)] == [
        np.prod(a.shape) for a in jax.tree_util.tree_leaves(ref)]
    out_dtype = jax.tree_util.tree_leaves(abstract)[0].dtype
    # the normalized output keeps the input's dtype; moments are statistics (at least float32)
    assert out_dtype == (jnp.float32 if s.name == "F.moments" else s.x.dtype), out_dtype
    g = jax.eval_shape(jax.grad(s.loss), s.x)
    assert (g.shape, g.dtype) == (s.x.shape, s.x.dtype), g
    batched = jax.eval_shape(jax.vmap(s.fn), jax.ShapeDtypeStruct((3,) + s.x.shape, s.x.dtype))
    assert [(a.shape, a.dtype) for a in jax.tree_util.tree_leaves(batched)] == [
        ((3,) + a.shape, a.dtype) for a in jax.tree_util.tree_leaves(abstract)]


def t_grad(s):
    g = computed(s, "grad")
    assert g.dtype == s.x.dtype, g.dtype
    assert_derivative(g, s.reference("grad"), s.dtype, "grad")


def t_jvp(s):
    out, tangent = computed(s, "jvp")
    assert_matches_reference(out, s.reference("out"), s.dtype)
    assert_derivative(tangent, s.reference("jvp"), s.dtype, "jvp")


def t_linearize(s):
    out, tangent = computed(s, "linearize")
    assert_matches_reference(out, s.reference("out"), s.dtype)
    assert_derivative(tangent, s.reference("jvp"), s.dtype, "linearize")


def t_hvp(s):
    assert_derivative(computed(s, "hvp"), s.reference("hvp"), s.dtype, "hvp")


def t_jacfwd(s):
    assert_derivative(computed(s, "jacfwd"), s.reference("jac"), s.dtype, "jacfwd")


def t_jacrev(s):
    assert_derivative(computed(s, "jacrev"), s.reference("jac"), s.dtype, "jacrev")


def t_hessian(s):
    assert_derivative(computed(s, "hessian"), s.reference("hessian"), s.dtype, "hessian")


# Which cells each transform runs on: (size, dtype, masks, names); masks "all" = unmasked and every mask the
# case takes. float32 carries the full grid at the large size (every layer and function); bfloat16 the
# unmasked large cells of grad / jvp / Hessian-vector products. Jacobians (small size) and Hessians (tiny)
# run on the functions and on the layers that do more than call one function (BatchNorm2d's statistics
# axes, tdBN's time axis, LocalResponseNorm's mask): at these sizes a layer and its function share one path.
ALL_NAMES = tuple(SPECS)
REPRESENTATIVES = tuple(n for n in SPECS if n.startswith("F.")) + (
    "BatchNorm2d", "ThresholdDependentBatchNorm", "LocalResponseNorm")
F32_ALL = ("float32", "all", ALL_NAMES)
F32 = ("float32", "none", ALL_NAMES)
BF16 = ("bfloat16", "none", ALL_NAMES)
TRANSFORMS = {
    "jit": (t_jit, [("large",) + F32_ALL]),
    "vmap": (t_vmap, [("large",) + F32]),
    "checkpoint": (t_checkpoint, [("large",) + F32]),
    "eval_shape": (t_eval_shape, [("large",) + F32, ("large",) + BF16]),
    "grad": (t_grad, [("large",) + F32_ALL, ("large",) + BF16]),
    "jvp": (t_jvp, [("large",) + F32_ALL, ("large",) + BF16]),
    "linearize": (t_linearize, [("large",) + F32]),
    "hvp": (t_hvp, [("large",) + F32_ALL, ("large",) + BF16]),
    "jacfwd": (t_jacfwd, [("small", "float32", "all", REPRESENTATIVES)]),
    "jacrev": (t_jacrev, [("small", "float32", "none", REPRESENTATIVES)]),
    "hessian": (t_hessian, [("tiny", "float32", "none", REPRESENTATIVES)]),
}


def _grid():
    params = []
    for transform, (_, cells) in TRANSFORMS.items():
        for size, dtype, masks, names in cells:
            for name in names:
                for mask_kind in ("none",) + (SPECS[name].masks if masks == "all" else ()):
                    params.append(pytest.param(transform, name, size, dtype, mask_kind,
                                               id=f"{transform}-{name}-{size}-{dtype}-{mask_kind}"))
    return params


GRID = {tuple(p.values) for p in _grid()}


@pytest.mark.parametrize("transform,name,size,dtype,mask_kind", _grid())
def test_transform(transform, name, size, dtype, mask_kind):
    TRANSFORMS[transform][0](setup(name, size, dtype, mask_kind))


# --- the grid is what it claims to be -------------------------------------------------------------------


def test_grid_covers_large_inputs_and_every_transform():
    grid = [p.values for p in _grid()]
    for transform in TRANSFORMS:
        assert any(t == transform for t, *_ in grid), transform
    for transform in ("jit", "vmap", "checkpoint", "eval_shape", "grad", "jvp", "linearize", "hvp"):
        for name in SPECS:
            assert (transform, name, "large", "float32", "none") in grid
    for name, spec in SPECS.items():
        assert int(np.prod(SHAPES[spec.rank]["large"])) >= 65536, name


@pytest.mark.parametrize("name", ["F.batch_norm", "BatchNorm2d", "F.group_norm", "F.instance_norm",
                                  "LocalResponseNorm", "F.rms_norm", "F.moments", "F.weight_standardization",
                                  "ThresholdDependentBatchNorm"])
def test_reference_derivatives_match_finite_differences(name):
    """The float64 references' autodiff against central differences (guards the references themselves)."""
    mask_kind = "mask" if SPECS[name].masks else "none"
    s = setup(name, "tiny", "float32", mask_kind)
    h = 1e-5
    with jax.enable_x64(True):
        loss = _loss(s.ref, s.ws, jnp.float64)

        def both(x, v):
            return (loss(x + h * v) - loss(x - h * v)) / (2 * h), jnp.vdot(jax.grad(loss)(x), v)

        fd, ad = jax.jit(both)(f64(s.x), f64(s.v))
    np.testing.assert_allclose(float(fd), float(ad), rtol=1e-6, atol=1e-6)


# --- issue reproductions (SPEC §8) ------------------------------------------------------------------------


def test_issue_jvp_of_layer_norm_at_512x256():
    """``jax.jvp`` of a loss on layer_norm of a (512, 256) float32 input (raised TypeError)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((512, 256)), jnp.float32)
    f = lambda v: jnp.sum(jnp.sin(F.layer_norm(v)))  # noqa: E731
    value, tangent = jax.jvp(f, (x,), (jnp.ones_like(x),))
    # layer_norm is invariant to adding a constant to each row: the tangent along ones is ~0
    assert abs(float(tangent)) < 1e-2, float(tangent)
    assert np.isfinite(float(value))


def test_issue_hvp_of_layer_norm_at_512x256():
    """``jax.jvp(jax.grad(f), ...)`` at (512, 256) (raised ValueError: the FFI call cannot be differentiated)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((512, 256)), jnp.float32)
    f = lambda v: jnp.sum(jnp.sin(F.layer_norm(v)))  # noqa: E731
    g, hv = jax.jvp(jax.grad(f), (x,), (jnp.ones_like(x),))
    # grad f is invariant along ones (shift invariance of each row): H @ ones ~ 0
    assert np.all(np.isfinite(np.asarray(hv)))
    assert float(jnp.max(jnp.abs(hv))) < 1e-3 * max(1.0, float(jnp.max(jnp.abs(g)))) + 1e-4


# --- empty batches (SPEC §3 "A group with no valid element") ------------------------------------------------


def test_moments_of_an_empty_batch():
    mean, var = F.moments(jnp.zeros((0, 3)), 0)
    assert mean.shape == (1, 3) and var.shape == (1, 3), (mean.shape, var.shape)
    np.testing.assert_array_equal(np.asarray(mean), np.zeros((1, 3)))
    np.testing.assert_array_equal(np.asarray(var), np.zeros((1, 3)))


def test_moments_of_an_empty_batch_under_jit():
    mean, var = jax.jit(lambda a: F.moments(a, 0))(jnp.zeros((0, 3)))
    assert mean.shape == (1, 3) and var.shape == (1, 3), (mean.shape, var.shape)
    assert np.all(np.asarray(mean) == 0) and np.all(np.asarray(var) == 0)


def test_batch_norm0d_training_on_an_empty_batch():
    """Running statistics unchanged; the counter moves as for a batch whose mask is all False."""
    bn = brainnorm.BatchNorm0d(8, momentum=0.9)
    bn.running_mean.value = jnp.linspace(-1.0, 1.0, 8)
    bn.running_var.value = jnp.linspace(0.5, 2.0, 8)
    before = (np.array(bn.running_mean.value), np.array(bn.running_var.value))
    y = bn(jnp.zeros((0, 8)), use_running_average=False)
    assert y.shape == (0, 8) and y.dtype == jnp.float32, (y.shape, y.dtype)
    np.testing.assert_array_equal(np.asarray(bn.running_mean.value), before[0])
    np.testing.assert_array_equal(np.asarray(bn.running_var.value), before[1])
    masked = brainnorm.BatchNorm0d(8, momentum=0.9)
    masked(jnp.ones((3, 8)), jnp.zeros((3, 8), bool), use_running_average=False)
    assert int(bn.num_batches_tracked.value) == int(masked.num_batches_tracked.value), (
        int(bn.num_batches_tracked.value), int(masked.num_batches_tracked.value))


def test_batch_norm0d_training_on_an_empty_batch_under_jit_and_grad():
    bn = brainnorm.BatchNorm0d(8, momentum=0.9)
    step = brainstate.transform.jit(lambda v: bn(v, use_running_average=False))
    y = step(jnp.zeros((0, 8)))
    assert y.shape == (0, 8)
    np.testing.assert_array_equal(np.asarray(bn.running_mean.value), np.zeros(8))
    np.testing.assert_array_equal(np.asarray(bn.running_var.value), np.ones(8))
    g = jax.grad(lambda v: jnp.sum(F.batch_norm(v, jnp.zeros(8), jnp.ones(8), training=True)[0]))(jnp.zeros((0, 8)))
    assert g.shape == (0, 8)


def test_functional_batch_norm_on_an_empty_batch():
    rm, rv = jnp.linspace(-1.0, 1.0, 8), jnp.linspace(0.5, 2.0, 8)
    y, new_mean, new_var = F.batch_norm(jnp.zeros((0, 8)), rm, rv, training=True, momentum=0.9)
    assert y.shape == (0, 8)
    np.testing.assert_array_equal(np.asarray(new_mean), np.asarray(rm))
    np.testing.assert_array_equal(np.asarray(new_var), np.asarray(rv))
