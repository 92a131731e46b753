#!/usr/bin/env python
"""Benchmarks: brainnorm against flax.nnx, brainstate.nn and PyTorch.

One command, one process, one machine::

    python benchmarks/run.py                      # full run (a few minutes)
    python benchmarks/run.py --quick              # tiny shapes, 3 runs (CI smoke test)
    BRAINNORM_QUICK=1 python benchmarks/run.py    # same as --quick
    python benchmarks/run.py --only layernorm     # one case (comma-separate several)
    python benchmarks/run.py --out-dir /tmp/bench # where results.json and the PNG go
    python benchmarks/run.py --cold               # caches evicted before every timed call

Every JAX implementation is a ``jax.jit`` of a pure function of the input
arrays only (``x``, and ``mask`` or the cotangent ``c`` where a case has
them): the modules are closed over, so their parameters are compile-time
constants for every framework alike (flax modules through
``nnx.split``/``nnx.merge``; brainstate and brainnorm modules read their
states directly, and state writes such as BatchNorm running statistics are
traced inside a ``brainstate.StateTraceStack``, returned as outputs and rolled
back, so the compiled function is pure and the new statistics are not
dead code). Parameters are random, not ones and zeros, so XLA cannot fold
them away. PyTorch runs eagerly (``torch.no_grad()``; default threads).

Timing: after a warm-up (compilation plus extra calls), each implementation
of a case is timed with ``time.perf_counter`` around the call and
``jax.block_until_ready``; repetitions are interleaved in rounds (default 25
rounds x 2 runs, the order rotated every round) so machine noise hits all
implementations of a case alike; the median over all runs is reported (the
ratio of the minimum times is stored beside it, as a noise indicator). Each
case also times the bandwidth floor, a jitted ``x * a + b`` over the same
array, in the same rounds.

Cache state: by default the calls of a round run back to back, so an
implementation's input and output are partly in the CPU caches from its
previous call (the usual regime of micro-benchmarks, and the one the
targets are measured in). ``--cold`` instead reads a buffer of twice the
last-level cache (at least 64 MiB) before every timed call, outside the
timed region: each call then starts the way a layer inside a larger model
does, with its input and output buffers out of the caches.

The table, the SPEC section 7 targets (PASS/FAIL), the machine and all raw
samples are written to ``results.json``; ``results.png`` plots the ratios to
flax.nnx and to the floor with the target lines. The exit status is 0 when
every case ran (timing targets never change it unless ``--strict``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _pin_allocator():
    """Make glibc's malloc reuse freed buffers instead of mapping fresh pages.

    JAX (like PyTorch) allocates every output with the C allocator. Under
    glibc's defaults whether a 16 MiB output lands on pages already mapped or
    on freshly mapped ones depends on the history of earlier calls (the
    dynamic mmap threshold, heap trimming, one arena per thread): in the
    second case each call takes 4096 page faults, about 9 ms on the
    development machine, for a kernel that takes 0.6 ms. Which implementation
    hit that depended on the order of the cases, so the ratios measured the
    allocator. With one arena, a fixed 32 MiB mmap threshold and no trimming,
    every implementation reuses its buffers after warm-up (0 faults per call).
    Set ``BRAINNORM_BENCH_MALLOC=default`` to measure with glibc's defaults.
    Must run before any large allocation; a no-op where glibc is absent.
    """
    if os.environ.get("BRAINNORM_BENCH_MALLOC", "pinned") != "pinned":
        return "default"
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        ok = (libc.mallopt(m_arena_max, 1) == 1
              and libc.mallopt(m_mmap_threshold, 32 << 20) == 1
              and libc.mallopt(m_trim_threshold, 1 << 30) == 1)
    except (OSError, AttributeError):
        return "default (no glibc)"
    return "pinned" if ok else "default (mallopt refused)"


MALLOC = _pin_allocator()
# PyTorch's OpenMP workers otherwise spin for a while after each call, on the
# same cores the next (JAX) implementation of the interleaved round runs on.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

import brainstate  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import brainnorm  # noqa: E402

try:  # flax.nnx is a test dependency, not a runtime one
    from flax import nnx
except Exception as exc:  # pragma: no cover - depends on the environment
    nnx = None
    _NNX_ERROR = f"flax.nnx not importable: {exc}"
else:
    _NNX_ERROR = ""

try:  # PyTorch is optional
    import torch
except Exception as exc:  # pragma: no cover - depends on the environment
    torch = None
    _TORCH_ERROR = f"torch not importable: {exc}"
else:
    _TORCH_ERROR = ""


# ---------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------
BN = "brainnorm"
FLAX = "flax.nnx"
BST = "brainstate.nn"
TORCH = "torch"
FLOOR = "floor (x*a+b)"
SCAN = "hand-written lax.scan"
BN_MASKED = "brainnorm (masked)"
BN_UNMASKED = "brainnorm (unmasked)"

CASES = (
    "floor",
    "layernorm",
    "rmsnorm",
    "masked_layernorm",
    "batchnorm2d",
    "groupnorm",
    "grad_layernorm",
    "grad_rmsnorm",
    "grad_batchnorm2d",
    "grad_groupnorm",
    "sim_loop",
)
GROUPS = {"grad": tuple(c for c in CASES if c.startswith("grad_"))}

TITLES = {
    "floor": "bandwidth floor x*a+b",
    "layernorm": "LayerNorm forward",
    "rmsnorm": "RMSNorm forward",
    "masked_layernorm": "masked LayerNorm forward",
    "batchnorm2d": "BatchNorm2d training forward",
    "groupnorm": "GroupNorm forward",
    "grad_layernorm": "LayerNorm forward+backward",
    "grad_rmsnorm": "RMSNorm forward+backward",
    "grad_batchnorm2d": "BatchNorm2d (training) forward+backward",
    "grad_groupnorm": "GroupNorm forward+backward",
    "sim_loop": "LayerNorm in a simulation loop",
}

# SPEC section 7: (case, numerator row, denominator row, limit, label)
TARGETS = (
    ("layernorm", BN, FLAX, 0.8, "<= 0.8x flax.nnx"),
    ("layernorm", BN, FLOOR, 1.5, "<= 1.5x floor"),
    ("rmsnorm", BN, FLAX, 0.8, "<= 0.8x flax.nnx"),
    ("rmsnorm", BN, FLOOR, 1.5, "<= 1.5x floor"),
    ("masked_layernorm", BN_MASKED, BN_UNMASKED, 2.0, "<= 2x brainnorm unmasked"),
    ("batchnorm2d", BN, BST, 1.0, "<= brainstate.nn"),
    ("batchnorm2d", BN, FLAX, 0.8, "<= 0.8x flax.nnx"),
    ("groupnorm", BN, FLAX, 0.6, "<= 0.6x flax.nnx"),
    ("grad_layernorm", BN, FLAX, 1.0, "<= flax.nnx"),
    ("grad_rmsnorm", BN, FLAX, 1.0, "<= flax.nnx"),
    ("grad_batchnorm2d", BN, FLAX, 1.0, "<= flax.nnx"),
    ("grad_groupnorm", BN, FLAX, 1.0, "<= flax.nnx"),
    ("sim_loop", BN, SCAN, 1.1, "<= 1.1x hand-written scan"),
)

# the row each case's "vs ref" column divides by (besides flax.nnx and the floor)
REFERENCE_ROW = {
    "masked_layernorm": BN_UNMASKED,
    "batchnorm2d": BST,
    "sim_loop": SCAN,
}

# tolerance of the output check against a float64 NumPy reference (forward
# cases) or against flax.nnx's gradients (relative to their largest entry)
CHECK_TOL = 1e-3


def shapes(quick: bool) -> dict:
    if quick:
        return {"rows": (256, 128), "image": (4, 8, 8, 64), "groups": 32, "loop": (50, 16, 128)}
    return {"rows": (4096, 1024), "image": (32, 32, 32, 64), "groups": 32, "loop": (5000, 64, 128)}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
class Skip(Exception):
    """An implementation that cannot run here (a missing optional package)."""


def need_nnx():
    if nnx is None:
        raise Skip(_NNX_ERROR)


def need_torch():
    if torch is None:
        raise Skip(_TORCH_ERROR)


def random_affine(rng, n):
    """Random scale and bias (not 1 and 0, which XLA could fold away)."""
    scale = (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(n)).astype(np.float32)
    return scale, bias


def set_brainstate_affine(module, scale, bias=None):
    """Write scale/bias into the NormalizationParamState(s) of a brainstate or brainnorm layer."""
    found = False
    for state in module.states(brainstate.ParamState).values():
        value = state.value
        if not isinstance(value, dict):
            continue
        new = dict(value)
        if "scale" in value:
            new["scale"] = jnp.asarray(scale, value["scale"].dtype).reshape(value["scale"].shape)
            found = True
        if "bias" in value and bias is not None:
            new["bias"] = jnp.asarray(bias, value["bias"].dtype).reshape(value["bias"].shape)
        state.value = new
    if not found:
        raise RuntimeError(f"no scale parameter found in {type(module).__name__}")


def set_flax_affine(module, scale, bias=None):
    module.scale.set_value(jnp.asarray(scale))
    if bias is not None:
        module.bias.set_value(jnp.asarray(bias))


def set_torch_affine(module, scale, bias=None):
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(scale))
        if bias is not None:
            module.bias.copy_(torch.from_numpy(bias))


def stateful_jit(fn):
    """``jax.jit`` of ``fn`` that may write brainstate states: returns ``(out, new_values)``.

    The writes are traced inside a ``brainstate.StateTraceStack``, returned as
    outputs and rolled back, so the compiled function is pure (no state is
    touched at run time) and the written values are not dead code.
    """

    def pure(*args):
        with brainstate.StateTraceStack() as trace:
            out = fn(*args)
        written = [st.value for st, w in zip(trace.states, trace.been_writen) if w]
        trace.recovery_original_values()
        return out, written

    return jax.jit(pure)


def flax_jit(module, fn=None):
    """``jax.jit`` of ``fn(module, *args)`` over ``nnx.split``/``nnx.merge``; returns ``(out, batch_stats)``."""
    graphdef, state = nnx.split(module)
    fn = fn or (lambda m, *a: m(*a))

    def pure(*args):
        m = nnx.merge(graphdef, state, copy=True)  # fresh Variables inside the trace
        out = fn(m, *args)
        return out, nnx.state(m, nnx.BatchStat)

    return jax.jit(pure)


def floor_fn(x_shape, rng):
    a, b = random_affine(rng, x_shape[-1])
    a, b = jnp.asarray(a), jnp.asarray(b)
    return jax.jit(lambda x: x * a + b)


def to_numpy(a):
    if torch is not None and isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _block(out, kind):
    if kind == "jax":
        jax.block_until_ready(out)
    # PyTorch CPU eager calls are synchronous: nothing to wait for


class Impl:
    """One implementation of a case: a zero-argument call plus how to check it."""

    def __init__(self, name, build, kind="jax", check=None):
        self.name = name
        self.build = build  # () -> zero-argument callable
        self.kind = kind
        self.check = check  # (first output) -> error (float), or None
        self.call = None
        self.status = "ok"
        self.note = ""
        self.first_call_s = None
        self.error = None
        self.check_failed = False
        self.samples = []


def last_level_cache_bytes():
    """Size of the largest CPU cache Linux reports (0 where it reports none)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(base)
    except OSError:
        return 0
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "size")) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best


class CacheEvictor:
    """Reads a buffer of twice the last-level cache (at least 64 MiB) to push other data out of the caches."""

    def __init__(self):
        self.nbytes = max(64 << 20, 2 * last_level_cache_bytes())
        self.buf = np.ones(self.nbytes // 4, np.float32)

    def __call__(self):
        self.buf.sum()


def run_case(case, impls, rounds, runs, warmup, min_time=0.0, evict=None):
    """Build, warm up, check and time the implementations of one case (interleaved).

    Each round runs every implementation ``runs`` times, or more when that
    gives the slowest implementation less than ``min_time`` seconds of samples
    over all rounds (short kernels get more samples, so a few disturbed calls
    move the median less). ``evict`` (a callable) runs before every timed
    call, outside the timed region.
    """
    live = []
    warm_times = []
    for impl in impls:
        try:
            impl.call = impl.build()
            t0 = time.perf_counter()
            out = impl.call()
            _block(out, impl.kind)
            impl.first_call_s = time.perf_counter() - t0
            if impl.check is not None:
                err = impl.check(out)
                impl.error = None if err is None else float(err)
                if impl.error is not None and not (impl.error <= CHECK_TOL):
                    impl.check_failed = True
                    impl.note = f"output check failed: max error {impl.error:.2e} > {CHECK_TOL:g}"
            del out
            for _ in range(warmup):
                t0 = time.perf_counter()
                _block(impl.call(), impl.kind)
                warm_times.append(time.perf_counter() - t0)
            live.append(impl)
        except Skip as exc:
            impl.status, impl.note = "skipped", str(exc)
        except Exception as exc:  # keep going: report the failure at the end
            impl.status = "error"
            impl.note = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            traceback.print_exc()
    if warm_times and min_time > 0:
        runs = max(runs, math.ceil(min_time / (rounds * max(max(warm_times), 1e-6))))
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        n = len(live)
        for r in range(rounds):
            order = live[r % n:] + live[: r % n] if n else []
            for impl in order:
                call, kind = impl.call, impl.kind
                for _ in range(runs):
                    if evict is not None:
                        evict()
                    t0 = time.perf_counter()
                    out = call()
                    _block(out, kind)
                    impl.samples.append(time.perf_counter() - t0)
                    del out
    finally:
        if gc_was_enabled:
            gc.enable()
    for impl in impls:
        impl.call = None  # release compiled functions and captured arrays
    gc.collect()


# ---------------------------------------------------------------------------
# float64 NumPy references for the output checks
# ---------------------------------------------------------------------------
def ref_layer_norm(x, scale, bias, eps, mask=None, axes=(-1,)):
    x = x.astype(np.float64)
    if mask is None:
        mean = x.mean(axis=axes, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    else:
        cnt = mask.sum(axis=axes, keepdims=True)
        mean = np.where(mask, x, 0).sum(axis=axes, keepdims=True) / cnt
        var = np.where(mask, (x - mean) ** 2, 0).sum(axis=axes, keepdims=True) / cnt
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def ref_rms_norm(x, scale, eps):
    x = x.astype(np.float64)
    return x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + eps) * scale


def ref_group_norm(x, groups, scale, bias, eps):
    b, h, w, c = x.shape
    xg = x.astype(np.float64).reshape(b, h, w, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def max_err(got, want):
    got = to_numpy(got)
    if got.shape != want.shape:
        raise ValueError(f"output shape {got.shape}, expected {want.shape}")
    return float(np.max(np.abs(got.astype(np.float64) - want)))


def nchw(y):
    """A PyTorch channels-first output as channels-last NumPy."""
    return np.moveaxis(to_numpy(y), 1, -1)


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------
def case_floor(sh, rng):
    impls = []
    for label, shape in (("rows", sh["rows"]), ("image", sh["image"])):
        x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
        f = floor_fn(shape, rng)
        impls.append(Impl(f"{FLOOR} {'x'.join(map(str, shape))}", lambda f=f, x=x: lambda: f(x)))
    return impls


def _rows_case(sh, rng, kind):
    shape = sh["rows"]
    n = shape[-1]
    eps = 1e-6
    x_np = rng.standard_normal(shape, dtype=np.float32)
    x = jnp.asarray(x_np)
    scale, bias = random_affine(rng, n)
    if kind == "layernorm":
        want = ref_layer_norm(x_np, scale, bias, eps)
    else:
        want = ref_rms_norm(x_np, scale, eps)
        bias = None
    check = lambda y: max_err(y, want)  # noqa: E731

    def bn():
        m = brainnorm.LayerNorm(n, epsilon=eps) if kind == "layernorm" else brainnorm.RMSNorm(n, epsilon=eps)
        set_brainstate_affine(m, scale, bias)
        f = jax.jit(lambda x: m(x))
        return lambda: f(x)

    def fx():
        need_nnx()
        cls = nnx.LayerNorm if kind == "layernorm" else nnx.RMSNorm
        m = cls(n, epsilon=eps, rngs=nnx.Rngs(0))
        set_flax_affine(m, scale, bias)
        f = flax_jit(m)
        return lambda: f(x)

    def bs():
        m = brainstate.nn.LayerNorm(n, epsilon=eps) if kind == "layernorm" else brainstate.nn.RMSNorm(n, epsilon=eps)
        set_brainstate_affine(m, scale, bias)
        f = jax.jit(lambda x: m(x))
        return lambda: f(x)

    def th():
        need_torch()
        m = torch.nn.LayerNorm(n, eps=eps) if kind == "layernorm" else torch.nn.RMSNorm(n, eps=eps)
        set_torch_affine(m, scale, bias)
        xt = torch.from_numpy(x_np)

        def call():
            with torch.no_grad():
                return m(xt)

        return call

    flr = floor_fn(shape, rng)
    return [
        Impl(BN, bn, check=lambda o: check(o)),
        Impl(FLAX, fx, check=lambda o: check(o[0])),
        Impl(BST, bs, check=lambda o: check(o)),
        Impl(TORCH, th, kind="torch", check=lambda o: check(o)),
        Impl(FLOOR, lambda: lambda: flr(x)),
    ]


def case_layernorm(sh, rng):
    return _rows_case(sh, rng, "layernorm")


def case_rmsnorm(sh, rng):
    return _rows_case(sh, rng, "rmsnorm")


def case_masked_layernorm(sh, rng):
    shape = sh["rows"]
    n = shape[-1]
    eps = 1e-6
    x_np = rng.standard_normal(shape, dtype=np.float32)
    mask_np = rng.random(shape) < 0.8
    x, mask = jnp.asarray(x_np), jnp.asarray(mask_np)
    scale, bias = random_affine(rng, n)
    want = ref_layer_norm(x_np, scale, bias, eps, mask=mask_np)
    want_unmasked = ref_layer_norm(x_np, scale, bias, eps)

    def bn_masked():
        m = brainnorm.LayerNorm(n, epsilon=eps)
        set_brainstate_affine(m, scale, bias)
        f = jax.jit(lambda x, mask: m(x, mask=mask))  # the mask is an argument, never a constant
        return lambda: f(x, mask)

    def bn_unmasked():
        m = brainnorm.LayerNorm(n, epsilon=eps)
        set_brainstate_affine(m, scale, bias)
        f = jax.jit(lambda x: m(x))
        return lambda: f(x)

    def fx():
        need_nnx()
        m = nnx.LayerNorm(n, epsilon=eps, rngs=nnx.Rngs(0))
        set_flax_affine(m, scale, bias)
        f = flax_jit(m, lambda m, x, mask: m(x, mask=mask))
        return lambda: f(x, mask)

    def bs():
        m = brainstate.nn.LayerNorm(n, epsilon=eps)
        set_brainstate_affine(m, scale, bias)
        f = jax.jit(lambda x, mask: m(x, mask=mask))
        return lambda: f(x, mask)

    flr = floor_fn(shape, rng)
    return [
        Impl(BN_MASKED, bn_masked, check=lambda o: max_err(o, want)),
        Impl(FLAX, fx, check=lambda o: max_err(o[0], want)),
        Impl(BST, bs, check=lambda o: max_err(o, want)),
        Impl(BN_UNMASKED, bn_unmasked, check=lambda o: max_err(o, want_unmasked)),
        Impl(FLOOR, lambda: lambda: flr(x)),
    ]


def case_batchnorm2d(sh, rng):
    shape = sh["image"]
    c = shape[-1]
    eps = 1e-5
    x_np = rng.standard_normal(shape, dtype=np.float32)
    x = jnp.asarray(x_np)
    scale, bias = random_affine(rng, c)
    want = ref_layer_norm(x_np, scale, bias, eps, axes=(0, 1, 2))  # batch statistics per channel

    def bn():
        m = brainnorm.BatchNorm2d(shape[1:], epsilon=eps)
        set_brainstate_affine(m, scale, bias)
        f = stateful_jit(lambda x: m(x, use_running_average=False))  # returns (y, new running stats)
        return lambda: f(x)

    def bs():
        m = brainstate.nn.BatchNorm2d(shape[1:], epsilon=eps)
        set_brainstate_affine(m, scale, bias)

        def train(x):
            with brainstate.environ.context(fit=True):
                return m(x)

        f = stateful_jit(train)
        return lambda: f(x)

    def fx():
        need_nnx()
        m = nnx.BatchNorm(c, use_running_average=False, epsilon=eps, rngs=nnx.Rngs(0))
        set_flax_affine(m, scale, bias)
        f = flax_jit(m)  # returns (y, new batch stats)
        return lambda: f(x)

    def th():
        need_torch()
        m = torch.nn.BatchNorm2d(c, eps=eps).train()
        set_torch_affine(m, scale, bias)
        xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_np, -1, 1)))

        def call():
            with torch.no_grad():
                return m(xt)  # running statistics updated in place

        return call

    flr = floor_fn(shape, rng)
    return [
        Impl(BN, bn, check=lambda o: max_err(o[0], want)),
        Impl(BST, bs, check=lambda o: max_err(o[0], want)),
        Impl(FLAX, fx, check=lambda o: max_err(o[0], want)),
        Impl(TORCH, th, kind="torch", check=lambda o: max_err(nchw(o), want)),
        Impl(FLOOR, lambda: lambda: flr(x)),
    ]


def case_groupnorm(sh, rng):
    shape = sh["image"]
    c, groups = shape[-1], sh["groups"]
    eps = 1e-6
    x_np = rng.standard_normal(shape, dtype=np.float32)
    x = jnp.asarray(x_np)
    scale, bias = random_affine(rng, c)
    want = ref_group_norm(x_np, groups, scale, bias, eps)

    def bn():
        m = brainnorm.GroupNorm(shape[1:], num_groups=groups, epsilon=eps)
        set_brainstate_affine(m, scale, bias)
        f = jax.jit(lambda x: m(x))
        return lambda: f(x)

    def fx():
        need_nnx()
        m = nnx.GroupNorm(c, num_groups=groups, epsilon=eps, rngs=nnx.Rngs(0))
        set_flax_affine(m, scale, bias)
        f = flax_jit(m)
        return lambda: f(x)

    def th():
        need_torch()
        m = torch.nn.GroupNorm(groups, c, eps=eps)
        set_torch_affine(m, scale, bias)
        xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_np, -1, 1)))

        def call():
            with torch.no_grad():
                return m(xt)

        return call

    flr = floor_fn(shape, rng)
    return [
        Impl(BN, bn, check=lambda o: max_err(o, want)),
        Impl(FLAX, fx, check=lambda o: max_err(o[0], want)),
        Impl(TORCH, th, kind="torch", check=lambda o: max_err(nchw(o), want)),
        Impl(FLOOR, lambda: lambda: flr(x)),
    ]


def _grad_case(sh, rng, kind):
    """jax.grad of sum(layer(x) * c) w.r.t. x and the parameters; c is a fixed random cotangent."""
    shape = sh["rows"] if kind in ("layernorm", "rmsnorm") else sh["image"]
    n = shape[-1]
    x_np = rng.standard_normal(shape, dtype=np.float32)
    c_np = rng.standard_normal(shape, dtype=np.float32)
    x, cot = jnp.asarray(x_np), jnp.asarray(c_np)
    scale, bias = random_affine(rng, n)
    if kind == "rmsnorm":
        bias = None

    def make_bn():
        if kind == "layernorm":
            return brainnorm.LayerNorm(n, epsilon=1e-6), {}
        if kind == "rmsnorm":
            return brainnorm.RMSNorm(n, epsilon=1e-6), {}
        if kind == "batchnorm2d":
            return brainnorm.BatchNorm2d(shape[1:], epsilon=1e-5), {"use_running_average": False}
        return brainnorm.GroupNorm(shape[1:], num_groups=sh["groups"], epsilon=1e-6), {}

    def make_flax():
        r = nnx.Rngs(0)
        if kind == "layernorm":
            return nnx.LayerNorm(n, epsilon=1e-6, rngs=r)
        if kind == "rmsnorm":
            return nnx.RMSNorm(n, epsilon=1e-6, rngs=r)
        if kind == "batchnorm2d":
            return nnx.BatchNorm(n, use_running_average=False, epsilon=1e-5, rngs=r)
        return nnx.GroupNorm(n, num_groups=sh["groups"], epsilon=1e-6, rngs=r)

    def bn():
        m, kw = make_bn()
        set_brainstate_affine(m, scale, bias)
        params = m.states(brainstate.ParamState)

        def loss(x, c):
            return jnp.sum(m(x, **kw) * c)

        grad = brainstate.transform.grad(loss, grad_states=params, argnums=0)
        # returns ((param grads, dx), new running statistics written during the step)
        f = stateful_jit(lambda x, c: grad(x, c))
        return lambda: f(x, cot)

    def fx():
        need_nnx()
        m = make_flax()
        set_flax_affine(m, scale, bias)
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)

        def loss(p, x, c):
            mm = nnx.merge(graphdef, p, rest, copy=True)
            return jnp.sum(mm(x) * c), nnx.state(mm, nnx.BatchStat)

        grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
        f = jax.jit(lambda x, c: grad(params, x, c))  # returns ((param grads, dx), new batch stats)
        return lambda: f(x, cot)

    flr = floor_fn(shape, rng)
    impls = [Impl(BN, bn), Impl(FLAX, fx), Impl(FLOOR, lambda: lambda: flr(x))]

    # check: brainnorm's gradients against flax.nnx's (relative to their largest entry)
    firsts = {}

    def grads_bn(out):
        (pgrads, dx), _ = out
        (leaf,) = pgrads.values()
        g = {"x": to_numpy(dx), "scale": to_numpy(leaf["scale"]).ravel()}
        if "bias" in leaf:
            g["bias"] = to_numpy(leaf["bias"]).ravel()
        return g

    def grads_flax(out):
        (pgrads, dx), _ = out
        g = {"x": to_numpy(dx), "scale": to_numpy(pgrads["scale"].get_value()).ravel()}
        if "bias" in pgrads:
            g["bias"] = to_numpy(pgrads["bias"].get_value()).ravel()
        return g

    def compare():
        if BN not in firsts or FLAX not in firsts:
            return float("nan")
        a, b = firsts[BN], firsts[FLAX]
        if a.keys() != b.keys():
            raise ValueError(f"gradient entries differ: {sorted(a)} vs {sorted(b)}")
        return max(float(np.max(np.abs(a[k] - b[k])) / max(np.max(np.abs(b[k])), 1e-30)) for k in a)

    def check_bn(out):
        firsts[BN] = grads_bn(out)
        return compare() if FLAX in firsts else None  # reported on the flax.nnx row

    def check_flax(out):
        firsts[FLAX] = grads_flax(out)
        return compare()

    impls[0].check, impls[1].check = check_bn, check_flax
    return impls


def case_grad_layernorm(sh, rng):
    return _grad_case(sh, rng, "layernorm")


def case_grad_rmsnorm(sh, rng):
    return _grad_case(sh, rng, "rmsnorm")


def case_grad_batchnorm2d(sh, rng):
    return _grad_case(sh, rng, "batchnorm2d")


def case_grad_groupnorm(sh, rng):
    return _grad_case(sh, rng, "groupnorm")


def case_sim_loop(sh, rng):
    shape = sh["loop"]  # (steps, batch, features)
    n = shape[-1]
    eps = 1e-6
    xs_np = rng.standard_normal(shape, dtype=np.float32)
    xs = jnp.asarray(xs_np)
    scale, bias = random_affine(rng, n)
    want = ref_layer_norm(xs_np, scale, bias, eps)

    def bn():
        m = brainnorm.LayerNorm(n, epsilon=eps)
        set_brainstate_affine(m, scale, bias)
        f = stateful_jit(lambda xs: brainstate.transform.for_loop(m, xs))  # one update per step
        return lambda: f(xs)

    def scan():
        s, b = jnp.asarray(scale), jnp.asarray(bias)

        def step(carry, x):
            mean = jnp.mean(x, axis=-1, keepdims=True)
            xc = x - mean
            var = jnp.mean(xc * xc, axis=-1, keepdims=True)
            return carry, xc * jax.lax.rsqrt(var + eps) * s + b

        f = jax.jit(lambda xs: jax.lax.scan(step, None, xs)[1])
        return lambda: f(xs)

    flr = floor_fn(shape, rng)
    return [
        Impl(BN, bn, check=lambda o: max_err(o[0], want)),
        Impl(SCAN, scan, check=lambda o: max_err(o, want)),
        Impl(FLOOR, lambda: lambda: flr(xs)),
    ]


CASE_FUNCS = {name: globals()[f"case_{name}"] for name in CASES}


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------
def git_revision():
    """The repository's commit (with "-dirty" when the work tree has changes), or None."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info():
    def version(mod):
        try:
            return importlib.import_module(mod).__version__
        except Exception:
            return None

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        affinity = None
    cpu_model = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "malloc": MALLOC,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpus_available": affinity,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": version("jaxlib"),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "flax": version("flax"),
        "brainstate": version("brainstate"),
        "brainnorm": getattr(brainnorm, "__version__", None),
        "numpy": np.__version__,
        "torch": getattr(torch, "__version__", None),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def summarize(case, impls, shape_note):
    med = {i.name: statistics.median(i.samples) * 1e3 for i in impls if i.samples}
    floor_name = next((k for k in med if k.startswith(FLOOR)), None)
    ref_name = REFERENCE_ROW.get(case)
    rows = []
    for impl in impls:
        m = med.get(impl.name)
        row = {
            "case": case,
            "title": TITLES[case],
            "shape": shape_note,
            "impl": impl.name,
            "status": impl.status if impl.status != "ok" or impl.samples else "error",
            "note": impl.note,
            "median_ms": m,
            "min_ms": min(impl.samples) * 1e3 if impl.samples else None,
            "q1_ms": float(np.percentile(impl.samples, 25) * 1e3) if impl.samples else None,
            "q3_ms": float(np.percentile(impl.samples, 75) * 1e3) if impl.samples else None,
            "n_runs": len(impl.samples),
            "first_call_s": impl.first_call_s,
            "check_error": impl.error,
            "check_failed": impl.check_failed,
            "ratio_flax": (m / med[FLAX]) if m is not None and FLAX in med else None,
            "ratio_floor": (m / med[floor_name]) if m is not None and floor_name and case != "floor" else None,
            "reference": ref_name,
            "ratio_ref": (m / med[ref_name]) if m is not None and ref_name in med else None,
            "samples_ms": [s * 1e3 for s in impl.samples],
        }
        rows.append(row)
    return rows


def evaluate_targets(rows):
    med = {(r["case"], r["impl"]): r["median_ms"] for r in rows if r["median_ms"] is not None}
    mins = {(r["case"], r["impl"]): r["min_ms"] for r in rows if r.get("min_ms") is not None}
    cases = {r["case"] for r in rows}
    out = []
    for case, num, den, limit, label in TARGETS:
        if case not in cases:
            continue
        a, b = med.get((case, num)), med.get((case, den))
        ratio = a / b if a is not None and b else None
        a, b = mins.get((case, num)), mins.get((case, den))
        ratio_min = a / b if a is not None and b else None
        out.append({
            "case": case,
            "impl": num,
            "versus": den,
            "limit": limit,
            "label": label,
            "ratio": ratio,
            "ratio_of_min_times": ratio_min,
            "result": "n/a" if ratio is None else ("PASS" if ratio <= limit else "FAIL"),
        })
    return out


def fmt(v, spec="{:.2f}"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else spec.format(v)


def table_lines(rows, targets):
    by_row = {}
    for t in targets:
        by_row.setdefault((t["case"], t["impl"]), []).append(f"{t['label']}: {fmt(t['ratio'])} {t['result']}")
    header = ("case", "implementation", "median ms", "vs flax.nnx", "vs floor", "vs ref", "target (SPEC 7)")
    body = []
    for r in rows:
        if r["status"] != "ok":
            target = f"{r['status']}: {r['note']}"
        else:
            target = "; ".join(by_row.get((r["case"], r["impl"]), []))
            if r["note"]:
                target = (target + "; " if target else "") + r["note"]
        ref = f"{fmt(r['ratio_ref'])} ({r['reference']})" if r["ratio_ref"] is not None and r["impl"] != r["reference"] else "-"
        body.append((
            f"{r['case']} {r['shape']}".strip(),
            r["impl"],
            fmt(r["median_ms"], "{:.3f}"),
            fmt(r["ratio_flax"]),
            fmt(r["ratio_floor"]),
            ref,
            target,
        ))
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header) - 1)]
    lines = []

    def line(cells):
        parts = [str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts + [str(cells[-1])]).rstrip()

    lines.append(line(header))
    lines.append("-" * (sum(widths) + 2 * len(widths) + len(header[-1])))
    prev = None
    for r, b in zip(rows, body):
        if prev is not None and r["case"] != prev:
            lines.append("")
        prev = r["case"]
        lines.append(line(b))
    return lines


def rst_table(rows, targets):
    """The result table as a reStructuredText list-table (for docs/performance.rst)."""
    by_row = {}
    for t in targets:
        by_row.setdefault((t["case"], t["impl"]), []).append(f"{t['label']}: {fmt(t['ratio'])} **{t['result']}**")
    out = [
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 22 20 10 10 10 14 30",
        "",
        "   * - case",
        "     - implementation",
        "     - median ms",
        "     - vs flax.nnx",
        "     - vs floor",
        "     - vs ref",
        "     - target (SPEC 7)",
    ]
    for r in rows:
        ref = f"{fmt(r['ratio_ref'])} ({r['reference']})" if r["ratio_ref"] is not None and r["impl"] != r["reference"] else "-"
        target = "; ".join(by_row.get((r["case"], r["impl"]), [])) if r["status"] == "ok" else r["status"]
        cells = [f"{r['case']} {r['shape']}".strip(), r["impl"], fmt(r["median_ms"], "{:.3f}"), fmt(r["ratio_flax"]),
                 fmt(r["ratio_floor"]), ref, target or ""]
        out.append(f"   * - {cells[0]}")
        out.extend(f"     - {c}".rstrip() for c in cells[1:])
    return "\n".join(out) + "\n"


COLORS = {BN: "#1f77b4", BN_MASKED: "#1f77b4", BN_UNMASKED: "#9ecae1", FLAX: "#ff7f0e", BST: "#2ca02c",
          TORCH: "#d62728", SCAN: "#8c564b", FLOOR: "#7f7f7f"}


def plot(rows, targets, path, machine, cache="warm"):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except Exception as exc:
        print(f"note: no plot ({exc})")
        return False
    limits = {(t["case"], t["versus"]): t for t in targets}
    ok = [r for r in rows if r["median_ms"] is not None and r["case"] != "floor"]
    cases = [c for c in CASES if any(r["case"] == c for r in ok)]
    fig, axes = plt.subplots(3, 1, figsize=(13, 11))

    def panel(ax, key, versus, title, impl_filter, cap):
        x0, ticks, labels, used = 0.0, [], [], {}
        for case in cases:
            rs = [r for r in ok if r["case"] == case and r[key] is not None and impl_filter(r)]
            if not rs:
                continue
            width = 0.8 / len(rs)
            for k, r in enumerate(rs):
                name = r["impl"]
                legend = BN if name == BN_MASKED else name
                value = r[key]
                clipped = value > cap
                color = COLORS.get(name, "#bcbd22")
                ax.bar(x0 + k * width, min(value, cap), width, color=color, hatch="//" if clipped else None)
                used.setdefault(legend, color)
                if clipped:
                    ax.text(x0 + k * width, cap * 0.97, f"{value:.1f}", ha="center", va="top", fontsize=6,
                            rotation=90, color="white", fontweight="bold")
                else:
                    ax.text(x0 + k * width, value, f"{value:.2f}", ha="center", va="bottom", fontsize=6)
            t = limits.get((case, versus))
            if t is not None:
                ax.hlines(t["limit"], x0 - width / 2, x0 + 0.8 - width / 2, colors="red", linestyles="--", linewidth=1.5)
            ticks.append(x0 + 0.4 - width / 2)
            labels.append(case)
            x0 += 1.0
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_ylim(0, cap * 1.15)
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(title + f"; bars above {cap:g} are cut (hatched)", fontsize=10)
        handles = [Patch(color=color, label=name) for name, color in used.items()]
        handles.append(Line2D([], [], color="red", linestyle="--", label="SPEC 7 limit (brainnorm)"))
        ax.legend(handles=handles, fontsize=7, ncol=8, loc="upper left")

    panel(axes[0], "ratio_flax", FLAX, "time / flax.nnx time (red dashes: SPEC 7 limit for brainnorm)",
          lambda r: r["impl"] != FLOOR, cap=3.0)
    panel(axes[1], "ratio_floor", FLOOR, "time / bandwidth floor x*a+b on the same array (red dashes: limit)",
          lambda r: r["impl"] != FLOOR, cap=8.0)
    ax = axes[2]
    other = [t for t in targets if t["versus"] not in (FLAX, FLOOR) and t["ratio"] is not None]
    for k, t in enumerate(other):
        ax.bar(k, t["ratio"], 0.6, color="#2ca02c" if t["result"] == "PASS" else "#d62728")
        ax.hlines(t["limit"], k - 0.35, k + 0.35, colors="red", linestyles="--", linewidth=1.5)
        ax.text(k, t["ratio"], f"{t['ratio']:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(other)))
    ax.set_xticklabels([f"{t['case']}\n{t['impl']} / {t['versus']}" for t in other], fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_title("other SPEC 7 targets: ratio (bar; green PASS, red FAIL) and limit (red dashes)", fontsize=10)
    fig.suptitle(f"brainnorm benchmarks: {machine['cpu_model']} ({machine['cpus_available']} CPUs), "
                 f"jax {machine['jax']}, flax {machine['flax']}, torch {machine['torch']}; {cache} caches", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and 3 runs, to smoke-test every case (also BRAINNORM_QUICK=1)")
    p.add_argument("--only", action="append", default=None, metavar="CASE",
                   help=f"run only these cases (repeat or comma-separate): {', '.join(CASES)}, or 'grad'")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="where results.json, results.png and table.rst go (default: benchmarks/results)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 25; quick: 1)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per round and implementation (default 2; quick: 3)")
    p.add_argument("--min-time", type=float, default=None,
                   help="more runs per round until the slowest implementation of a case has this many seconds "
                        "of samples (default 0.3; quick: 0)")
    p.add_argument("--warmup", type=int, default=None, help="calls after the first (compiling) one (default 2; quick: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cold", action="store_true",
                   help="evict the CPU caches before every timed call (inputs and outputs start out of cache, "
                        "as for a layer inside a larger model); default: calls back to back")
    p.add_argument("--strict", action="store_true", help="exit with status 2 when a timing target fails")
    args = p.parse_args(argv)
    if os.environ.get("BRAINNORM_QUICK", "").strip().lower() in ("1", "true", "yes", "on"):
        args.quick = True
    if args.only:
        names = []
        for item in args.only:
            for name in filter(None, (s.strip() for s in item.split(","))):
                if name in GROUPS:
                    names.extend(GROUPS[name])
                elif name in CASES:
                    names.append(name)
                else:
                    p.error(f"unknown case {name!r}; choose from {', '.join(CASES)}, grad")
        args.cases = [c for c in CASES if c in names]
    else:
        args.cases = list(CASES)
    args.rounds = args.rounds or (1 if args.quick else 25)
    if args.min_time is None:
        args.min_time = 0.0 if args.quick else 0.3
    args.runs = args.runs or (3 if args.quick else 2)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    return args


def shape_note(case, sh):
    if case == "floor":
        return ""
    key = {"layernorm": "rows", "rmsnorm": "rows", "masked_layernorm": "rows", "grad_layernorm": "rows",
           "grad_rmsnorm": "rows", "sim_loop": "loop"}.get(case, "image")
    return "x".join(map(str, sh[key]))


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    sh = shapes(args.quick)
    machine = machine_info()
    evict = CacheEvictor() if args.cold else None
    cache = f"cold: {evict.nbytes >> 20} MiB read before every timed call" if evict else "warm: calls back to back"
    print(f"brainnorm benchmarks ({'quick' if args.quick else 'full'}, {cache}): {args.rounds} rounds x {args.runs} runs, "
          f"warm-up {args.warmup}, allocator {machine['malloc']}; {machine['cpu_model']}, {machine['cpus_available']} CPUs; "
          f"jax {machine['jax']}, flax {machine['flax']}, brainstate {machine['brainstate']}, torch {machine['torch']}",
          flush=True)
    rows = []
    for case in args.cases:
        t0 = time.perf_counter()
        rng = np.random.default_rng([args.seed, CASES.index(case)])
        try:
            impls = CASE_FUNCS[case](sh, rng)
            run_case(case, impls, args.rounds, args.runs, args.warmup, args.min_time, evict)
            case_rows = summarize(case, impls, shape_note(case, sh))
        except Exception as exc:
            traceback.print_exc()
            case_rows = [{"case": case, "title": TITLES[case], "shape": shape_note(case, sh), "impl": "(case)",
                          "status": "error", "note": f"{type(exc).__name__}: {exc}"[:300], "median_ms": None,
                          "ratio_flax": None, "ratio_floor": None, "reference": None, "ratio_ref": None,
                          "samples_ms": []}]
        rows.extend(case_rows)
        summary = ", ".join(f"{r['impl']} {fmt(r['median_ms'], '{:.3f}')} ms" for r in case_rows)
        print(f"[{case}] {time.perf_counter() - t0:.1f} s: {summary}", flush=True)

    targets = evaluate_targets(rows)
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    wall = time.perf_counter() - t_start

    print()
    print("\n".join(table_lines(rows, targets)))
    print()
    print("SPEC section 7 targets:")
    for t in targets:
        print(f"  {t['result']:4s}  {t['case']:18s} {t['impl']} {t['label']}: {fmt(t['ratio'])}"
              f"   (ratio of min times {fmt(t['ratio_of_min_times'])})")

    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, "results.json")
    png_path = os.path.join(args.out_dir, "results.png")
    rst_path = os.path.join(args.out_dir, "table.rst")
    result = {
        "mode": "quick" if args.quick else "full",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "git_revision": git_revision(),
        "config": {"rounds": args.rounds, "runs": args.runs, "warmup": args.warmup, "seed": args.seed,
                   "cache": "cold" if args.cold else "warm",
                   "cases": args.cases, "shapes": {k: v for k, v in sh.items()}, "check_tolerance": CHECK_TOL},
        "machine": machine,
        "wall_time_s": wall,
        "rows": rows,
        "targets": targets,
    }
    with open(json_path, "w") as fh:
        json.dump(result, fh, indent=1)
    with open(rst_path, "w") as fh:
        fh.write(rst_table(rows, targets))
    plotted = plot(rows, targets, png_path, machine, "cold" if args.cold else "warm")
    print(f"\nwrote {json_path}" + (f", {png_path}" if plotted else "") + f", {rst_path}")
    print(f"wall time {wall:.1f} s")

    errors = [r for r in rows if r["status"] == "error" or r.get("check_failed")]
    if errors:
        print(f"error: {len(errors)} implementation(s) failed to run or gave a wrong result: "
              + ", ".join(f"{r['case']}/{r['impl']}" for r in errors), file=sys.stderr)
        return 1
    if args.strict and any(t["result"] == "FAIL" for t in targets):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
