"""A fused normalization kernel for XLA's CPU backend (XLA FFI, C++).

XLA's CPU backend runs normalization as several kernels: one reduction per
sum (it does not fuse ``sum(x)`` and ``sum(x**2)`` into one read), a handful
of tiny kernels on the statistics, and the normalization. ``moments.cc``
does it in one custom call: per group, float32 block sums merged in double
(exact at any offset, see the file's header), then ``y`` while the data are
still in cache. On the CPU backend the layers use it for large float32 inputs
(:data:`MIN_ELEMENTS`); everything else (other backends, dtypes, layouts,
``axis_name``) takes the pure-JAX core, which defines the semantics.

The kernel is compiled on first use with the system's C++ compiler against
the XLA FFI headers that ship with jaxlib, and cached under
``$BRAINNORM_CACHE_DIR`` (default ``~/.cache/brainnorm``). Without a compiler,
or with ``BRAINNORM_CPU_KERNEL=0``, brainnorm runs the pure-JAX core only:
same results to float32 rounding, slower on CPU.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import numbers
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__: list[str] = []

_LOG = logging.getLogger("brainnorm")
_SOURCE = Path(__file__).with_name("moments.cc")
_TARGET = "brainnorm_normalize_f32"
_BWD_TARGET = "brainnorm_normalize_bwd_f32"

#: Inputs with fewer elements take the pure-JAX core: there a single XLA
#: fusion costs less than a custom call plus its dispatch. Read at trace time;
#: ``BRAINNORM_CPU_KERNEL_MIN_ELEMENTS`` overrides it.
MIN_ELEMENTS = int(os.environ.get("BRAINNORM_CPU_KERNEL_MIN_ELEMENTS", 1 << 16))


def _cache_dir() -> Path:
    root = os.environ.get("BRAINNORM_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "brainnorm"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compile() -> Path | None:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        _LOG.info("brainnorm: no C++ compiler found; using the pure-JAX statistics core")
        return None
    include = jax.ffi.include_dir()
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, compiler.encode(), jax.__version__.encode(), _cpu_flags().encode(),
                    platform.machine().encode()])
    ).hexdigest()[:16]
    library = _cache_dir() / f"brainnorm_cpu_{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        out = Path(tmp) / library.name
        cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd", "-march=native",
               f"-I{include}", str(_SOURCE), "-o", str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            _LOG.warning("brainnorm: compiling the CPU kernel failed (%s); using the pure-JAX core", exc)
            return None
        if proc.returncode != 0:
            _LOG.warning("brainnorm: compiling the CPU kernel failed; using the pure-JAX core:\n%s",
                         proc.stderr[-2000:])
            return None
        os.replace(out, library)  # atomic: concurrent builds race harmlessly
    return library


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when the kernel is compiled, loaded and registered with XLA (tried once per process)."""
    if os.environ.get("BRAINNORM_CPU_KERNEL", "1").lower() in ("0", "false", "no", "off"):
        return False
    try:
        library = _compile()
        if library is None:
            return False
        lib = ctypes.cdll.LoadLibrary(str(library))
        for target in (_TARGET, _BWD_TARGET):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), platform="cpu")
    except Exception as exc:  # any failure falls back to the pure-JAX core
        _LOG.warning("brainnorm: the CPU kernel is unavailable (%s); using the pure-JAX core", exc)
        return False
    return True


def _or_empty(value, dtype):
    """An absent optional operand as an empty array (the kernel reads its size)."""
    return jnp.zeros((0,), dtype) if value is None else value


def _call(x3, mask3, scale, bias, *, centered, param_axis, eps):
    stats = jax.ShapeDtypeStruct(x3.shape[:-2] + x3.shape[-1:], jnp.float32)
    outs = jax.ffi.ffi_call(
        _TARGET,
        (jax.ShapeDtypeStruct(x3.shape, jnp.float32), stats, stats, stats, stats),
        vmap_method="broadcast_all",
    )(
        x3,
        _or_empty(mask3, jnp.bool_),
        _or_empty(scale, jnp.float32),
        _or_empty(bias, jnp.float32),
        centered=bool(centered),
        masked=mask3 is not None,
        param_axis=np.int64(param_axis),
        eps=np.float32(eps),
    )
    return outs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(x3, mask3, scale, bias, centered, param_axis, eps):
    return _call(x3, mask3, scale, bias, centered=centered, param_axis=param_axis, eps=eps)


def _fused_fwd(x3, mask3, scale, bias, centered, param_axis, eps):
    outs = _call(x3, mask3, scale, bias, centered=centered, param_axis=param_axis, eps=eps)
    return outs, (x3, mask3, scale, bias, outs[1:])


def _fused_bwd(centered, param_axis, eps, residuals, cotangents):
    # The formulas are in moments.cc (Backward pass). Cotangents of the
    # statistics: lo carries the mean (hi is a constant shift), var the
    # variance (the mean square without centering); count has none.
    x3, mask3, scale, bias, (hi, lo, var, count) = residuals
    dy, _, d_lo, d_var, _ = cotangents
    length = x3.shape[-2] if param_axis == 1 else x3.shape[-1]
    param = jax.ShapeDtypeStruct((length,), jnp.float32)
    dx, d_scale, d_bias = jax.ffi.ffi_call(
        _BWD_TARGET, (jax.ShapeDtypeStruct(x3.shape, jnp.float32), param, param), vmap_method="broadcast_all",
    )(
        x3,
        _or_empty(mask3, jnp.bool_),
        _or_empty(scale, jnp.float32),
        dy, hi, lo, var, count, d_lo, d_var,
        centered=bool(centered),
        masked=mask3 is not None,
        param_axis=np.int64(param_axis),
        eps=np.float32(eps),
    )
    return dx, None, None if scale is None else d_scale, None if bias is None else d_bias


_fused.defvjp(_fused_fwd, _fused_bwd)


def _block_layout(shape, axes):
    """``(B, R, C)`` when ``axes`` are one contiguous block of ``shape``, else None."""
    axes = sorted(axes)
    if not axes or axes != list(range(axes[0], axes[-1] + 1)):
        return None
    i, j = axes[0], axes[-1] + 1
    return math.prod(shape[:i]), math.prod(shape[i:j]), math.prod(shape[j:]), i, j


def _param_vector(p, shape, i, j):
    """``p`` (broadcastable to ``shape``) as a vector along R (axis 1) or C (axis 2), or None."""
    if p is None:
        return None, 0
    p = jnp.asarray(p)
    if p.dtype != jnp.float32 or p.ndim > len(shape):
        return False, 0
    full = (1,) * (len(shape) - p.ndim) + p.shape
    varying = [k for k, d in enumerate(full) if d != 1]
    if not varying:
        return False, 0  # a scalar parameter: leave it to the core
    if all(i <= k < j for k in varying):
        block = shape[i:j]
        return jnp.broadcast_to(p.reshape(full[i:j]), block).reshape(-1), 1
    if all(k >= j for k in varying):
        block = shape[j:]
        return jnp.broadcast_to(p.reshape(full[j:]), block).reshape(-1), 2
    return False, 0


def try_normalize(x, axes, *, scale, bias, epsilon, mask, use_mean, core):
    """``(y, hi, lo, var, count)``, statistics kept over ``axes``, from the kernel; None when not applicable.

    ``core()`` computes the same tuple with the pure-JAX core; it is what
    other backends lower (``lax.platform_dependent``).
    """
    if (x.dtype != jnp.float32 or x.size == 0 or x.size < MIN_ELEMENTS
            or not isinstance(epsilon, numbers.Real) or not available()):
        return None
    layout = _block_layout(x.shape, axes)
    if layout is None:
        return None
    b, r, c, i, j = layout
    scale_v, scale_axis = _param_vector(scale, x.shape, i, j)
    bias_v, bias_axis = _param_vector(bias, x.shape, i, j)
    if scale_v is False or bias_v is False:
        return None
    param_axes = {a for a in (scale_axis, bias_axis) if a}
    if len(param_axes) > 1:
        return None
    param_axis = param_axes.pop() if param_axes else (1 if c == 1 else 2)
    if c > 1 and param_axis == 1:
        return None  # parameters along a reduced axis of a strided group: not a layout the layers use
    kept = tuple(1 if i <= k < j else d for k, d in enumerate(x.shape))

    def kernel():
        x3 = x.reshape(b, r, c)
        mask3 = None if mask is None else jnp.broadcast_to(mask, x.shape).reshape(b, r, c)
        y3, *stats = _fused(x3, mask3, scale_v, bias_v, bool(use_mean), param_axis, float(epsilon))
        return (y3.reshape(x.shape),) + tuple(v.reshape(kept) for v in stats)

    return jax.lax.platform_dependent(cpu=kernel, default=core)
