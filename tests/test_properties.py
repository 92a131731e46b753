"""Property tests (hypothesis): every layer and function against the float64 references.

Drawn at random: ``in_size`` of rank 1-3 (each entry 1-4), 0-2 leading batch
axes, reduction/feature axes within ``in_size`` written as positive or
negative counts, masks (none, random boolean, integer, broadcast forms such
as ``(B, ..., 1)`` with leading axes dropped, a fully masked row, all
False), scale/bias values, and the input dtype (float32, or bfloat16 with a
loose tolerance). The references are tests/reference.py and
tests/reference_training.py, evaluated in float64 on the very values the
layer received (bfloat16 inputs included).

Each example runs one jitted function (one XLA compilation), so the example
counts are modest; the profile below sets them.
"""

from __future__ import annotations

import math

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import brainnorm
from brainnorm import functional as F

from . import reference as ref
from . import reference_training as reft

settings.register_profile(
    "brainnorm-properties",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("brainnorm-properties")

BF16 = jnp.bfloat16
TOL = {np.dtype(np.float32): (1e-4, 1e-4), jnp.dtype(BF16): (2e-2, 2e-2)}  # (atol, rtol) of outputs


# --- strategies ---------------------------------------------------------------------------------


@st.composite
def layouts(draw, min_rank=1, max_rank=3, max_dim=4, max_batch=2):
    rank = draw(st.integers(min_rank, max_rank))
    in_size = tuple(draw(st.lists(st.integers(1, max_dim), min_size=rank, max_size=rank)))
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=max_batch)))
    return in_size, batch


@st.composite
def axes_of(draw, rank, min_size=1, max_size=None, must_include=None):
    """A set of axes of a rank-``rank`` shape, each written as ``k`` or ``k - rank``, in any order."""
    chosen = draw(st.lists(st.integers(0, rank - 1), min_size=min_size, max_size=max_size or rank, unique=True))
    if must_include is not None and must_include not in chosen:
        chosen.append(must_include)
    negative = draw(st.lists(st.booleans(), min_size=len(chosen), max_size=len(chosen)))
    written = tuple(a - rank if neg else a for a, neg in zip(chosen, negative))
    if len(written) == 1 and draw(st.booleans()):
        return written[0]  # a plain int
    return written


def positions(axes, rank, offset=0):
    """Non-negative positions of ``axes`` (int or tuple) in a shape with ``offset`` leading axes."""
    axes = (axes,) if isinstance(axes, int) else axes
    return tuple(sorted(offset + a % rank for a in axes))


dtypes = st.sampled_from([np.float32, np.float32, np.float32, BF16])
seeds = st.integers(0, 2**32 - 1)


@st.composite
def masks(draw, shape, per_sample_rank):
    """None or a mask broadcastable to ``shape`` (the last ``per_sample_rank`` axes are per-sample)."""
    kind = draw(st.sampled_from(["none", "random", "random", "broadcast", "row_off", "all_false"]))
    if kind == "none":
        return None
    rng = np.random.default_rng(draw(seeds))
    p = draw(st.sampled_from([0.3, 0.7, 0.95]))
    mshape = list(shape)
    if kind == "broadcast":
        n = len(shape)
        ones = draw(st.lists(st.booleans(), min_size=per_sample_rank, max_size=per_sample_rank))
        ones[-1] = True  # at least the last axis broadcast, as in (B, T, 1)
        for i, one in enumerate(ones):
            if one:
                mshape[n - per_sample_rank + i] = 1
        drop = draw(st.integers(0, n - per_sample_rank))
        mshape = mshape[drop:]
    mask = rng.random(mshape) < p
    if kind == "row_off" and mask.ndim:
        mask[rng.integers(mask.shape[0])] = False
    if kind == "all_false":
        mask[...] = False
    if draw(st.integers(0, 4)) == 0:
        mask = mask.astype(np.int8) * 3  # integer masks are read as mask != 0
    return mask


def bool_mask(mask):
    return None if mask is None else np.asarray(mask) != 0


@st.composite
def inputs(draw, shape, per_sample_rank):
    """``(x as passed to the layer, x as float64, mask, dtype)``."""
    dtype = draw(dtypes)
    rng = np.random.default_rng(draw(seeds))
    loc = draw(st.sampled_from([0.0, 2.0, -5.0]))
    spread = draw(st.sampled_from([0.5, 1.0, 3.0]))
    x = (loc + spread * rng.standard_normal(shape)).astype(np.float32)
    x = jnp.asarray(x, dtype)
    mask = draw(masks(shape, per_sample_rank))
    return x, np.asarray(x.astype(jnp.float32), np.float64), mask, np.dtype(dtype)


def affine(draw, shape):
    rng = np.random.default_rng(draw(seeds))
    return rng.uniform(0.5, 1.5, shape).astype(np.float32), rng.uniform(-1.0, 1.0, shape).astype(np.float32)


def check(actual, expected, dtype=np.float32, what="output"):
    atol, rtol = TOL[np.dtype(dtype)]
    actual = np.asarray(jnp.asarray(actual).astype(jnp.float32), np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol, err_msg=what)


def check_stats(actual, expected, what):
    """Statistics are float32 (also for bf16 input): float32 tolerance."""
    check(np.ravel(np.asarray(actual)), np.ravel(expected), np.float32, what)


def feature_shape(in_size, feature_positions):
    return tuple(d if i in feature_positions else 1 for i, d in enumerate(in_size))


def call(layer, x, mask, **kwargs):
    """``layer(x, mask, ...)``, leaving the mask out when there is none."""
    return layer(x, mask, **kwargs) if mask is not None else layer(x, **kwargs)


# --- per-sample layers -----------------------------------------------------------------------------


@given(data=st.data())
@settings(max_examples=30)
def test_layer_norm_and_rms_norm(data):
    in_size, batch = data.draw(layouts())
    rank, nb = len(in_size), len(batch)
    red = data.draw(axes_of(rank))
    feat = data.draw(axes_of(rank))
    x, x64, mask, dtype = data.draw(inputs(batch + in_size, rank))
    scale, bias = affine(data.draw, feature_shape(in_size, positions(feat, rank)))
    ln = brainnorm.LayerNorm(in_size, reduction_axes=red, feature_axes=feat, scale_init=scale, bias_init=bias)
    rms = brainnorm.RMSNorm(in_size, reduction_axes=red, feature_axes=feat, scale_init=scale)
    y_ln, y_rms = brainstate.transform.jit(lambda v, m: (call(ln, v, m), call(rms, v, m)))(x, mask)
    axes = positions(red, rank, nb)
    assert y_ln.dtype == dtype and y_rms.dtype == dtype
    check(y_ln, ref.normalize(x64, axes, bool_mask(mask), 1e-6, scale, bias), dtype, "LayerNorm")
    check(y_rms, ref.normalize(x64, axes, bool_mask(mask), 1e-6, scale, use_mean=False), dtype, "RMSNorm")


@st.composite
def group_layouts(draw):
    in_size, batch = draw(layouts())
    rank = len(in_size)
    f = draw(st.integers(0, rank - 1))
    channels = draw(st.sampled_from([1, 2, 3, 4, 6]))
    in_size = in_size[:f] + (channels,) + in_size[f + 1:]
    groups = draw(st.sampled_from([g for g in range(1, channels + 1) if channels % g == 0]))
    return in_size, batch, f, groups


@given(data=st.data())
def test_group_norm(data):
    in_size, batch, f, groups = data.draw(group_layouts())
    rank, nb = len(in_size), len(batch)
    f_written = f - rank if data.draw(st.booleans()) else f
    red = data.draw(st.one_of(st.none(), axes_of(rank, must_include=f)))
    by_size = data.draw(st.booleans())
    x, x64, mask, dtype = data.draw(inputs(batch + in_size, rank))
    scale, bias = affine(data.draw, feature_shape(in_size, (f,)))
    group_option = dict(num_groups=None, group_size=in_size[f] // groups) if by_size else dict(num_groups=groups)
    gn = brainnorm.GroupNorm(in_size, f_written, reduction_axes=red, scale_init=scale, bias_init=bias,
                             **group_option)
    y = brainstate.transform.jit(lambda v, m: call(gn, v, m))(x, mask)
    axes = positions(tuple(range(rank)) if red is None else red, rank, nb)
    expected = ref.group_normalize(x64, groups, nb + f, axes, bool_mask(mask), 1e-6, scale, bias)
    assert y.dtype == dtype
    check(y, expected, dtype, "GroupNorm")


@given(data=st.data())
def test_instance_norm(data):
    in_size, batch = data.draw(layouts(min_rank=2))
    rank, nb = len(in_size), len(batch)
    f = data.draw(st.integers(0, rank - 1))
    track = data.draw(st.booleans())
    momentum = data.draw(st.sampled_from([0.0, 0.5, 0.9, None]))
    unbiased = data.draw(st.booleans())
    x, x64, mask, dtype = data.draw(inputs(batch + in_size, rank))
    fshape = feature_shape(in_size, (f,))
    scale, bias = affine(data.draw, fshape)
    layer = brainnorm.InstanceNorm(in_size, f - rank if data.draw(st.booleans()) else f, scale_init=scale,
                                   bias_init=bias, track_running_stats=track, momentum=momentum,
                                   unbiased_running_var=unbiased)

    def run(v, m):
        y = call(layer, v, m, use_running_average=False)
        if not track:
            return y, None, None, None
        rm, rv = layer.running_mean.value, layer.running_var.value
        return y, rm, rv, layer(v, use_running_average=True)

    y, rm, rv, y_eval = brainstate.transform.jit(run)(x, mask)
    inst_axes = tuple(nb + a for a in range(rank) if a != f)
    check(y, ref.normalize(x64, inst_axes, bool_mask(mask), 1e-5, scale, bias), dtype, "InstanceNorm")
    if track:
        mean, var = reft.instance_running_update(np.zeros(in_size[f]), np.ones(in_size[f]), x64, inst_axes,
                                                 tuple(range(nb)), 0.0 if momentum is None else momentum,
                                                 bool_mask(mask), unbiased)
        check_stats(rm, mean, "running_mean")
        check_stats(rv, var, "running_var")
        expected_eval = ref.apply_stats(x64, np.reshape(mean, fshape), np.reshape(var, fshape), 1e-5, scale, bias)
        check(y_eval, expected_eval, dtype, "InstanceNorm eval")


@given(data=st.data())
@settings(max_examples=20)
def test_local_response_norm(data):
    in_size, batch = data.draw(layouts())
    rank, nb = len(in_size), len(batch)
    f = data.draw(st.integers(0, rank - 1))
    size = data.draw(st.integers(1, 5))
    alpha = data.draw(st.sampled_from([1e-4, 0.1, 1.0]))
    beta = data.draw(st.sampled_from([0.5, 0.75, 1.0]))
    k = data.draw(st.sampled_from([0.5, 1.0, 2.0]))
    x, x64, mask, dtype = data.draw(inputs(batch + in_size, rank))
    lrn = brainnorm.LocalResponseNorm(in_size, size, alpha=alpha, beta=beta, k=k,
                                      feature_axis=f - rank if data.draw(st.booleans()) else f)
    y = brainstate.transform.jit(lambda v, m: call(lrn, v, m))(x, mask)
    if mask is None:
        expected = ref.local_response_norm(x64, size, alpha, beta, k, nb + f)
    else:
        expected = ref.masked_local_response_norm(x64, size, bool_mask(mask), alpha, beta, k, nb + f)
    assert y.dtype == dtype
    check(y, expected, dtype, "LocalResponseNorm")


# --- batch normalization ----------------------------------------------------------------------------

BATCH_NORMS = [brainnorm.BatchNorm0d, brainnorm.BatchNorm1d, brainnorm.BatchNorm2d, brainnorm.BatchNorm3d]


@given(data=st.data())
@settings(max_examples=40)
def test_batch_norm_train_then_eval(data):
    dims = data.draw(st.integers(0, 3))
    in_size, batch = data.draw(layouts(min_rank=dims + 1, max_rank=dims + 1, max_dim=3 if dims < 3 else 2))
    rank, nb = len(in_size), len(batch)
    f = data.draw(st.integers(0, rank - 1))
    momentum = data.draw(st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0, None]))
    unbiased = data.draw(st.booleans())
    x, x64, mask, dtype = data.draw(inputs(batch + in_size, rank))
    fshape = feature_shape(in_size, (f,))
    scale, bias = affine(data.draw, fshape)
    layer = BATCH_NORMS[dims](in_size, f - rank if data.draw(st.booleans()) else f, momentum=momentum,
                              unbiased_running_var=unbiased, scale_initializer=scale, bias_initializer=bias)

    def run(v, m):
        y = call(layer, v, m, use_running_average=False)
        rm, rv = layer.running_mean.value, layer.running_var.value
        return y, rm, rv, layer(v, use_running_average=True)

    y, rm, rv, y_eval = brainstate.transform.jit(run)(x, mask)
    axes = tuple(a for a in range(nb + rank) if a != nb + f)
    check(y, ref.normalize(x64, axes, bool_mask(mask), 1e-5, scale, bias), dtype, "training output")
    mean, var = ref.running_update(np.zeros(in_size[f]), np.ones(in_size[f]), x64, axes,
                                   0.0 if momentum is None else momentum, bool_mask(mask), unbiased)
    check_stats(rm, mean, "running_mean")
    check_stats(rv, var, "running_var")
    assert int(layer.num_batches_tracked.value) == 1
    expected_eval = ref.apply_stats(x64, np.reshape(mean, fshape), np.reshape(var, fshape), 1e-5, scale, bias)
    check(y_eval, expected_eval, dtype, "eval output")


# --- temporal layers -------------------------------------------------------------------------------


def temporal_case(data, min_steps=1):
    in_size, batch = data.draw(layouts(max_rank=2, max_batch=1))
    rank = len(in_size)
    f = data.draw(st.integers(0, rank - 1))
    steps = data.draw(st.integers(min_steps, 4))
    x, x64, mask, dtype = data.draw(inputs((steps,) + batch + in_size, rank))
    return in_size, batch, f, steps, x, x64, mask, dtype


def step_mask(mask, ndim, t):
    """The mask of time step ``t`` for an input of rank ``ndim`` (time first), or None."""
    if mask is None:
        return None
    m = np.reshape(bool_mask(mask), (1,) * (ndim - np.ndim(mask)) + np.shape(mask))
    return m[0] if m.shape[0] == 1 else m[t]


@given(data=st.data())
@settings(max_examples=15)
def test_batch_norm_through_time_multi_and_single_step(data):
    """Multi-step and single-step (traced index) runs both equal the per-step reference."""
    in_size, batch, f, steps, x, x64, mask, dtype = temporal_case(data)
    rank, nb = len(in_size), len(batch)
    num_steps = data.draw(st.integers(1, 3))
    momentum = data.draw(st.sampled_from([0.0, 0.5, 0.9]))
    use_bias = data.draw(st.booleans())
    fshape = feature_shape(in_size, (f,))
    scale, bias = affine(data.draw, (num_steps,) + fshape)
    options = dict(momentum=momentum, use_bias=use_bias, scale_init=scale, bias_init=bias,
                   feature_axis=f - rank if data.draw(st.booleans()) else f)
    multi = brainnorm.BatchNormThroughTime(in_size, num_steps, step_mode="multi", **options)
    single = brainnorm.BatchNormThroughTime(in_size, num_steps, step_mode="single", **options)
    y_multi = brainstate.transform.jit(lambda v, m: call(multi, v, m, use_running_average=False))(x, mask)
    single_step = brainstate.transform.jit(
        lambda v, m, t: single(v, m, t=t, use_running_average=False) if m is not None
        else single(v, t=t, use_running_average=False))
    y_single = [single_step(x[t], None if mask is None else jnp.asarray(step_mask(mask, x.ndim, t)), t)
                for t in range(steps)]

    axes = tuple(a for a in range(nb + rank) if a != nb + f)
    run_mean = np.zeros((num_steps, in_size[f]))
    run_var = np.ones((num_steps, in_size[f]))
    counts = np.zeros(num_steps, int)
    for t in range(steps):
        slot = min(t, num_steps - 1)
        m_t = step_mask(mask, x.ndim, t)
        expected = ref.normalize(x64[t], axes, m_t, 1e-5, scale[slot], bias[slot] if use_bias else None)
        check(y_multi[t], expected, dtype, f"multi-step output, step {t}")
        check(y_single[t], expected, dtype, f"single-step output, step {t}")
        run_mean[slot], run_var[slot] = ref.running_update(run_mean[slot], run_var[slot], x64[t], axes, momentum,
                                                           m_t)
        counts[slot] += 1
    for layer in (multi, single):
        check_stats(layer.running_mean.value, run_mean, "running_mean")
        check_stats(layer.running_var.value, run_var, "running_var")
        assert np.array_equal(np.asarray(layer.num_batches_tracked.value), counts)


@given(data=st.data())
def test_threshold_dependent_and_temporal_effective_batch_norm(data):
    kind = data.draw(st.sampled_from(["tdBN", "TEBN"]))
    mode = data.draw(st.sampled_from(["multi", "single"]))
    in_size, batch, f, steps, x, x64, mask, dtype = temporal_case(data)
    if mode == "single":  # one step: drop the time axis of x (a (B, ...) mask keeps its meaning)
        x, x64 = x[0], x64[0]
        mask = None if mask is None else step_mask(mask, x.ndim + 1, 0)
    rank, nb = len(in_size), x.ndim - len(in_size)
    momentum = data.draw(st.sampled_from([0.0, 0.5, 0.9]))
    fshape = feature_shape(in_size, (f,))
    scale, bias = affine(data.draw, fshape)
    options = dict(momentum=momentum, scale_init=scale, bias_init=bias, step_mode=mode,
                   feature_axis=f - rank if data.draw(st.booleans()) else f)
    t = data.draw(st.integers(0, 4))
    if kind == "tdBN":
        alpha = data.draw(st.sampled_from([1.0, 1 / math.sqrt(2)]))
        v_th = data.draw(st.sampled_from([0.5, 1.0, 2.0]))
        layer = brainnorm.ThresholdDependentBatchNorm(in_size, alpha=alpha, v_th=v_th, **options)
        extra = {}
    else:
        alpha = v_th = 1.0
        num_steps = data.draw(st.integers(1, 3))
        layer = brainnorm.TemporalEffectiveBatchNorm(in_size, num_steps, **options)
        p = np.random.default_rng(data.draw(seeds)).uniform(0.5, 1.5, num_steps).astype(np.float32)
        layer.p.value = jnp.asarray(p)
        extra = dict(t=t) if mode == "single" else {}
    y = brainstate.transform.jit(lambda v, m: call(layer, v, m, use_running_average=False, **extra))(x, mask)

    axes = tuple(a for a in range(nb + rank) if a != nb + f)
    xhat = ref.normalize(x64, axes, bool_mask(mask), 1e-5)
    expected = alpha * v_th * scale * xhat + bias
    if kind == "TEBN":
        if mode == "single":
            expected = p[min(t, len(p) - 1)] * expected
        else:
            weight = p[np.minimum(np.arange(steps), len(p) - 1)]
            expected = np.reshape(weight, (steps,) + (1,) * (x.ndim - 1)) * expected
    check(y, expected, dtype, kind)
    mean, var = ref.running_update(np.zeros(in_size[f]), np.ones(in_size[f]), x64, axes, momentum,
                                   bool_mask(mask))
    check_stats(layer.running_mean.value, mean, "running_mean")
    check_stats(layer.running_var.value, var, "running_var")


# --- weight wrappers -------------------------------------------------------------------------------


@given(n_in=st.integers(1, 5), n_out=st.integers(1, 5), batch=st.lists(st.integers(1, 3), max_size=2),
       seed=seeds)
@settings(max_examples=12)
def test_weight_norm_linear(n_in, n_out, batch, seed):
    rng = np.random.default_rng(seed)
    linear = brainstate.nn.Linear(n_in, n_out)
    w0 = rng.standard_normal((n_in, n_out)).astype(np.float32)
    b0 = rng.standard_normal(n_out).astype(np.float32)
    linear.weight.value = {"weight": jnp.asarray(w0), "bias": jnp.asarray(b0)}
    wn = brainnorm.WeightNorm(linear)
    x = rng.standard_normal(tuple(batch) + (n_in,)).astype(np.float32)
    # at construction: the wrapped layer's function, g = column norms
    check(wn(x), x.astype(np.float64) @ w0 + b0, np.float32, "WeightNorm at construction")
    check(np.ravel(wn.g.value), np.linalg.norm(w0.astype(np.float64), axis=0), np.float32, "g")
    g = rng.uniform(0.5, 2.0, (1, n_out)).astype(np.float32)
    v = rng.standard_normal((n_in, n_out)).astype(np.float32)
    wn.g.value, wn.v.value = jnp.asarray(g), jnp.asarray(v)
    v64 = v.astype(np.float64)
    w = g * v64 / np.linalg.norm(v64, axis=0, keepdims=True)
    check(wn(x), x.astype(np.float64) @ w + b0, np.float32, "WeightNorm")
    assert "weight" not in linear.weight.value, "the wrapped weight is still a trainable parameter"


@given(n_in=st.integers(1, 5), n_out=st.integers(1, 5), batch=st.lists(st.integers(1, 3), max_size=2),
       seed=seeds)
@settings(max_examples=12)
def test_spectral_norm_linear(n_in, n_out, batch, seed):
    """A weight with known singular values (top one twice the next): w / sigma_max after power iteration."""
    rng = np.random.default_rng(seed)
    n = min(n_in, n_out)
    q_in = np.linalg.qr(rng.standard_normal((n_in, n_in)))[0][:, :n]
    q_out = np.linalg.qr(rng.standard_normal((n_out, n_out)))[0][:, :n]
    sigma = np.sort(rng.uniform(0.1, 1.0, n))[::-1] * rng.uniform(0.5, 3.0)
    sigma[0] = 2 * sigma[1] if n > 1 else sigma[0]
    w0 = (q_in * sigma) @ q_out.T
    b0 = rng.standard_normal(n_out)
    linear = brainstate.nn.Linear(n_in, n_out)
    linear.weight.value = {"weight": jnp.asarray(w0, jnp.float32), "bias": jnp.asarray(b0, jnp.float32)}
    sn = brainnorm.SpectralNorm(linear, n_steps=20)
    x = rng.standard_normal(tuple(batch) + (n_in,)).astype(np.float32)
    w32 = np.asarray(jnp.asarray(w0, jnp.float32), np.float64)
    top = np.linalg.svd(w32, compute_uv=False)[0]
    y = sn(x, use_running_average=False)
    check(y, x.astype(np.float64) @ (w32 / top) + np.asarray(jnp.asarray(b0, jnp.float32), np.float64),
          np.float32, "SpectralNorm")
    check(np.linalg.svd(np.asarray(sn.normalized_weight(), np.float64), compute_uv=False)[0], 1.0, np.float32,
          "largest singular value")


# --- brainnorm.functional ----------------------------------------------------------------------------


@st.composite
def plain_inputs(draw, min_rank=1, max_rank=4):
    rank = draw(st.integers(min_rank, max_rank))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    x, x64, mask, dtype = draw(inputs(shape, rank))
    return shape, x, x64, mask, dtype


def keep_shape(shape, axes):
    return tuple(1 if i in axes else d for i, d in enumerate(shape))


@given(data=st.data())
@settings(max_examples=30)
def test_functional_moments_normalize_layer_norm_rms_norm(data):
    shape, x, x64, mask, dtype = data.draw(plain_inputs())
    rank = len(shape)
    ax = data.draw(axes_of(rank))
    axes = positions(ax, rank)
    # one-pass variance: statistics only; its cancellation error (~1e-6 here) is as large as epsilon, so
    # outputs of groups with a single valid element would legitimately differ
    fast = data.draw(st.booleans())
    stat_shape = keep_shape(shape, axes)
    scale, bias = affine(data.draw, stat_shape)
    rng = np.random.default_rng(data.draw(seeds))
    given_mean = rng.standard_normal(stat_shape).astype(np.float32)
    given_var = rng.uniform(0.1, 2.0, stat_shape).astype(np.float32)

    def run(v, m):
        return dict(
            moments=F.moments(v, ax, mask=m, use_fast_variance=fast),
            rms_moments=F.moments(v, ax, mask=m, use_mean=False),
            normalize=F.normalize(v, given_mean, given_var, scale=scale, bias=bias),
            layer_norm=F.layer_norm(v, scale, bias, reduction_axes=ax, mask=m),
            rms_norm=F.rms_norm(v, scale, reduction_axes=ax, mask=m),
        )

    out = jax.jit(run)(x, mask)
    m = bool_mask(mask)
    mean, var, _ = ref.moments(x64, axes, m)
    check_stats(out["moments"][0], mean, "mean")
    check_stats(out["moments"][1], var, "var")
    assert out["moments"][0].shape == stat_shape and out["moments"][0].dtype == jnp.float32
    _, ms, _ = ref.moments(x64, axes, m, use_mean=False)
    check_stats(out["rms_moments"][0], np.zeros(stat_shape), "rms mean")
    check_stats(out["rms_moments"][1], ms, "mean square")
    check(out["normalize"], ref.apply_stats(x64, given_mean, given_var, 1e-6, scale, bias), dtype, "normalize")
    check(out["layer_norm"], ref.normalize(x64, axes, m, 1e-6, scale, bias), dtype, "layer_norm")
    check(out["rms_norm"], ref.normalize(x64, axes, m, 1e-6, scale, use_mean=False), dtype, "rms_norm")


@given(data=st.data())
@settings(max_examples=30)
def test_functional_batch_norm(data):
    shape, x, x64, mask, dtype = data.draw(plain_inputs())
    rank = len(shape)
    feat = data.draw(axes_of(rank))
    features = positions(feat, rank)
    axes = tuple(a for a in range(rank) if a not in features)
    training = data.draw(st.booleans())
    momentum = data.draw(st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]))
    unbiased = data.draw(st.booleans())
    stat_shape = keep_shape(shape, axes)
    scale, bias = affine(data.draw, stat_shape)
    rng = np.random.default_rng(data.draw(seeds))
    rm = rng.standard_normal(stat_shape).astype(np.float32)
    rv = rng.uniform(0.1, 2.0, stat_shape).astype(np.float32)
    y, new_mean, new_var = jax.jit(lambda v, m: F.batch_norm(
        v, rm, rv, scale, bias, training=training, feature_axes=feat, momentum=momentum, mask=m,
        unbiased_running_var=unbiased))(x, mask)
    assert new_mean.shape == stat_shape and new_var.shape == stat_shape
    m = bool_mask(mask)
    if training:
        check(y, ref.normalize(x64, axes, m, 1e-5, scale, bias), dtype, "batch_norm training")
        mean, var = ref.running_update(np.squeeze(rm, axes), np.squeeze(rv, axes), x64, axes, momentum, m, unbiased)
        check_stats(new_mean, mean, "new running mean")
        check_stats(new_var, var, "new running var")
    else:
        check(y, ref.apply_stats(x64, rm, rv, 1e-5, scale, bias), dtype, "batch_norm eval")
        assert np.array_equal(np.asarray(new_mean), rm) and np.array_equal(np.asarray(new_var), rv)


@given(data=st.data())
@settings(max_examples=30)
def test_functional_group_norm_and_instance_norm(data):
    rank = data.draw(st.integers(2, 4))
    f = data.draw(st.integers(1, rank - 1))
    channels = data.draw(st.sampled_from([1, 2, 3, 4, 6]))
    shape = tuple(data.draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    shape = shape[:f] + (channels,) + shape[f + 1:]
    x, x64, mask, dtype = data.draw(inputs(shape, rank - 1))
    groups = data.draw(st.sampled_from([g for g in range(1, channels + 1) if channels % g == 0]))
    f_written = f - rank if data.draw(st.booleans()) else f
    red = data.draw(st.one_of(st.none(), st.lists(st.integers(1, rank - 1), unique=True).map(
        lambda axes: tuple(sorted(set(axes) | {f})))))
    pshape = keep_shape(shape, tuple(a for a in range(rank) if a != f))
    scale, bias = affine(data.draw, pshape)
    y_gn, y_in = jax.jit(lambda v, m: (
        F.group_norm(v, groups, scale, bias, feature_axis=f_written, reduction_axes=red, mask=m),
        F.instance_norm(v, scale, bias, feature_axis=f_written, mask=m)))(x, mask)
    m = bool_mask(mask)
    axes = tuple(range(1, rank)) if red is None else red
    check(y_gn, ref.group_normalize(x64, groups, f, axes, m, 1e-6, scale, bias), dtype, "group_norm")
    inst_axes = tuple(a for a in range(1, rank) if a != f)
    check(y_in, ref.normalize(x64, inst_axes, m, 1e-5, scale, bias), dtype, "instance_norm")


@given(data=st.data())
@settings(max_examples=20)
def test_functional_local_response_norm_and_weight_standardization(data):
    shape, x, x64, _, dtype = data.draw(plain_inputs())
    rank = len(shape)
    f = data.draw(st.integers(-rank, rank - 1))
    size = data.draw(st.integers(1, 5))
    alpha, beta, k = data.draw(st.sampled_from([(1e-4, 0.75, 1.0), (0.5, 0.5, 2.0), (1.0, 1.0, 0.5)]))
    wshape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=2, max_size=4)))
    w = np.random.default_rng(data.draw(seeds)).standard_normal(wshape).astype(np.float32)
    out_axis = data.draw(st.integers(-len(wshape), len(wshape) - 1))
    gain = np.random.default_rng(data.draw(seeds)).uniform(0.5, 1.5, keep_shape(
        wshape, tuple(a for a in range(len(wshape)) if a != out_axis % len(wshape)))).astype(np.float32)
    eps = data.draw(st.sampled_from([1e-4, 1e-8]))
    with_gain = data.draw(st.booleans())
    y_lrn, w_std = jax.jit(lambda v, w_: (
        F.local_response_norm(v, size, alpha=alpha, beta=beta, k=k, feature_axis=f),
        F.weight_standardization(w_, eps, gain if with_gain else None, out_axis)))(x, w)
    check(y_lrn, ref.local_response_norm(x64, size, alpha, beta, k, f), dtype, "local_response_norm")
    check(w_std, ref.weight_standardization(w, eps, gain if with_gain else None, out_axis), np.float32,
          "weight_standardization")


def _divisive_reference(x, exponent, sigma, gain, weights, feature_axis):
    """``gain * sign(x) |x|^n / (sigma^n + sum_j w_ij |x_j|^n)`` in float64 over ``feature_axis``."""
    x64 = np.moveaxis(np.asarray(x, np.float64), feature_axis, -1)
    drive = np.abs(x64) ** exponent
    pool = drive @ np.asarray(weights, np.float64).T
    y = gain * np.sign(x64) * drive / (sigma**exponent + pool)
    return np.moveaxis(y, -1, feature_axis)


@given(data=st.data())
@settings(max_examples=15)
def test_functional_divisive_normalization_and_gdn(data):
    """Divisive normalization (any pool, exponent, channel axis) and GDN/IGDN against float64 NumPy."""
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    feature_axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    channels = shape[feature_axis]
    seed = data.draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    weights = rng.uniform(0, 1, (channels, channels)).astype(np.float32)
    exponent = data.draw(st.sampled_from([1.0, 1.5, 2.0, 3.0]))
    sigma = data.draw(st.floats(0.1, 3.0))
    gain = data.draw(st.floats(0.5, 2.0))
    y = F.divisive_normalization(x, exponent=exponent, sigma=sigma, gain=gain, weights=weights,
                                 feature_axis=feature_axis)
    expected = _divisive_reference(x, exponent, sigma, gain, weights, feature_axis)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=1e-4, atol=1e-6)

    beta = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    gamma = rng.uniform(0, 0.5, (channels, channels)).astype(np.float32)
    inverse = data.draw(st.booleans())
    x_last = np.moveaxis(x.astype(np.float64), feature_axis, -1)
    norm = np.sqrt(beta + np.square(x_last) @ gamma.astype(np.float64).T)
    expected = np.moveaxis(x_last * norm if inverse else x_last / norm, -1, feature_axis)
    y = F.gdn(x, beta, gamma, inverse=inverse, feature_axis=feature_axis)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=1e-4, atol=1e-6)


@given(data=st.data())
@settings(max_examples=12)
def test_functional_temporal_accumulated_batch_norm_and_neu_norm(data):
    """TAB (statistics of step t over steps 0..t) and NeuNorm's trace against float64 NumPy."""
    steps = data.draw(st.integers(1, 4))
    batch = data.draw(st.integers(1, 3))
    channels = data.draw(st.integers(1, 3))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    x = (rng.standard_normal((steps, batch, channels)) * 2 + 1).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, (steps, 1, channels)).astype(np.float32)
    bias = rng.uniform(-0.5, 0.5, (steps, 1, channels)).astype(np.float32)
    p = rng.uniform(0.5, 1.5, steps).astype(np.float32)
    y, _, _ = F.temporal_accumulated_batch_norm(
        x, np.zeros((steps, 1, channels)), np.ones((steps, 1, channels)), scale, bias, p, training=True,
        epsilon=1e-5)
    x64 = x.astype(np.float64)
    expected = np.empty_like(x64)
    for t in range(steps):
        seen = x64[: t + 1]
        mean, var = seen.mean(axis=(0, 1)), seen.var(axis=(0, 1))
        expected[t] = p[t] ** 2 * (scale[t] * (x64[t] - mean) / np.sqrt(var + 1e-5) + bias[t])
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=1e-4, atol=1e-4)

    spikes = (rng.random((steps, batch, channels)) < 0.4).astype(np.float32)
    weight = rng.uniform(-1, 1, channels).astype(np.float32)
    k = data.draw(st.floats(0.0, 0.99))
    y, state = F.neu_norm(spikes, weight, k=k, multi_step=True)
    trace = np.zeros((batch, 1))
    expected = np.empty(spikes.shape)
    for t in range(steps):
        trace = k * trace + (1 - k) / channels**2 * spikes[t].astype(np.float64).sum(-1, keepdims=True)
        expected[t] = spikes[t] - weight * trace
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=1e-5, atol=1e-6)


@given(data=st.data())
@settings(max_examples=15)
def test_functional_batch_renorm_and_lp_normalize(data):
    """Batch renormalization (any running statistics, limits, warm-up flag) and Lp normalization vs float64."""
    batch, channels = data.draw(st.integers(2, 5)), data.draw(st.integers(1, 3))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    x = (rng.standard_normal((batch, channels)) * 2 + 1).astype(np.float32)
    running_mean = rng.standard_normal(channels).astype(np.float32)
    running_var = rng.uniform(0.2, 5.0, channels).astype(np.float32)
    r_max = data.draw(st.floats(1.0, 4.0))
    d_max = data.draw(st.floats(0.0, 3.0))
    active = data.draw(st.booleans())
    y, new_mean, new_var = F.batch_renorm(x, running_mean, running_var, training=True, r_max=r_max, d_max=d_max,
                                          renormalize=active, momentum=0.9, epsilon=1e-5)
    x64 = x.astype(np.float64)
    mean, var = x64.mean(0), x64.var(0)
    sigma = np.sqrt(running_var.astype(np.float64) + 1e-5)
    r = np.clip(np.sqrt(var + 1e-5) / sigma, 1 / r_max, r_max) if active else 1.0
    d = np.clip((mean - running_mean) / sigma, -d_max, d_max) if active else 0.0
    expected = (x64 - mean) / np.sqrt(var + 1e-5) * r + d
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(new_mean, np.float64), 0.9 * running_mean + 0.1 * mean, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(new_var, np.float64), 0.9 * running_var + 0.1 * var, rtol=1e-5)

    p = data.draw(st.sampled_from([1.0, 2.0, 3.0, float("inf")]))
    y = F.lp_normalize(x, p, axis=0)
    norm = np.max(np.abs(x64), 0) if p == float("inf") else np.sum(np.abs(x64) ** p, 0) ** (1 / p)
    np.testing.assert_allclose(np.asarray(y, np.float64), x64 / np.maximum(norm, 1e-12), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(brainnorm.functional.__all__))
def test_every_function_has_a_property_test(name):
    """Guard: a new public function must be added to this module."""
    source = open(__file__).read()
    assert f"F.{name}(" in source, f"functional.{name} has no property test here"
