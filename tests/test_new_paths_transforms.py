"""SPEC §8 for the functions added with BatchRenorm, Lp, TAB, NeuNorm and divisive normalization.

jvp (forward mode) against central differences of the same function in float64 (under
``jax.enable_x64(True)``, ``h = 1e-5``, tolerance 1e-5 relative to ``max(1, |difference|)``), the float32
jvp equal to the float64 one (2e-3 relative), forward and reverse mode agreeing, jacfwd equal to jacrev, a
Hessian-vector product (forward over reverse) that is finite and symmetric, eval_shape, at a small size and at
one of 65536+ elements; and jit over an input sharded along the batch axis of a 4-device mesh (in a
subprocess), equal to the unsharded call. The float64 gradients of every argument, with masks and in single-
and multi-step modes, are in ``test_gradients_float64.py``.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brainnorm import functional as F

from ._devices import ROOT, four_device_env

C = 4


def _cases():
    rm, rv = jnp.full((C,), 0.3), jnp.full((C,), 2.0)
    w = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (C, C)), jnp.float32)
    beta, gamma = jnp.full((C,), 1.0), 0.1 * jnp.eye(C) + 0.05
    return {
        "batch_renorm": lambda x: F.batch_renorm(x, rm, rv, training=True, r_max=1.5, d_max=0.5)[0],
        "lp_normalize": lambda x: F.lp_normalize(x, 2.0, axis=-1),
        "divisive_normalization": lambda x: F.divisive_normalization(x, exponent=2.0, sigma=0.5, weights=w),
        "gdn": lambda x: F.gdn(x, beta, gamma),
        "temporal_accumulated_batch_norm": lambda x: F.temporal_accumulated_batch_norm(
            x, jnp.zeros((x.shape[0], 1, C)), jnp.ones((x.shape[0], 1, C)), training=True)[0],
        "neu_norm": lambda x: F.neu_norm(x, jnp.full((C,), 0.5), multi_step=True)[0],
    }


CASES = _cases()
SIZES = {"small": (3, 5, C), "large": (4, 4096, C)}  # 65536 elements


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", CASES)
def test_forward_and_reverse_derivatives(name, size):
    f = CASES[name]
    shape = SIZES[size]
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(shape) + 0.5, jnp.float32)
    t = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def loss(v):
        return jnp.sum(f(v) * w)

    assert jax.eval_shape(f, x).shape == shape
    y, dy = jax.jit(lambda v, u: jax.jvp(f, (v,), (u,)))(x, t)
    g = jax.jit(jax.grad(loss))(x)
    assert np.all(np.isfinite(np.asarray(dy))) and np.all(np.isfinite(np.asarray(g)))
    # forward and reverse mode agree: <w, J t> = <J^T w, t>
    np.testing.assert_allclose(float(jnp.sum(dy * w)), float(jnp.sum(g * t)), rtol=2e-3, atol=1e-3)
    # the directional derivative against central differences in float64 (BatchRenorm's r and d are constants
    # under differentiation by definition, so its derivative is not the function's: its float64 gradients are
    # compared with a re-statement in test_gradients_float64.py)
    with jax.enable_x64(True):
        x64, t64, w64 = (jnp.asarray(np.asarray(a), jnp.float64) for a in (x, t, w))

        def loss64(v):
            return jnp.sum(f(v) * w64)

        y64, dy64 = jax.jit(lambda v, u: jax.jvp(f, (v,), (u,)))(x64, t64)
        assert y64.dtype == jnp.float64 and dy64.dtype == jnp.float64
        directional = float(jnp.sum(dy64 * w64))
        if name != "batch_renorm":
            h = 1e-5
            fd = float(jax.jit(lambda v, u: (loss64(v + h * u) - loss64(v - h * u)) / (2 * h))(x64, t64))
            np.testing.assert_allclose(directional, fd, rtol=1e-5, atol=1e-5 * max(1.0, abs(fd)))
        # the float32 derivative is the float64 one to float32's accuracy
        np.testing.assert_allclose(float(jnp.sum(dy * w)), directional, rtol=2e-3, atol=2e-3)
    # Hessian-vector product (forward over reverse): finite, and symmetric in its two directions
    hvp = jax.jit(lambda v, u: jax.jvp(jax.grad(loss), (v,), (u,))[1])
    s = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    a, b = float(jnp.sum(hvp(x, t) * s)), float(jnp.sum(hvp(x, s) * t))
    assert np.isfinite(a) and np.isfinite(b)
    np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-2)
    if size == "small":
        jf = jax.jacfwd(f)(x)
        jr = jax.jacrev(f)(x)
        np.testing.assert_allclose(np.asarray(jf), np.asarray(jr), rtol=1e-4, atol=1e-5)


_WORKER = r"""
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tests.test_new_paths_transforms import CASES, C
mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
rng = np.random.default_rng(2)
for name, f in CASES.items():
    # the batch axis: axis 0 for the per-step functions' (T, B, C) is time, so shard B (axis 1)
    x = jnp.asarray(rng.standard_normal((4, 8, C)) + 0.5, jnp.float32)
    spec = P(None, "data") if name in ("temporal_accumulated_batch_norm", "neu_norm") else P("data")
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    y = jax.jit(f)(xs)
    g = jax.jit(jax.grad(lambda v: jnp.sum(f(v) ** 2)))(xs)
    ref_y, ref_g = f(x), jax.grad(lambda v: jnp.sum(f(v) ** 2))(x)
    err = max(float(jnp.max(jnp.abs(y - ref_y))), float(jnp.max(jnp.abs(g - ref_g))))
    print(name, "sharded" if len(y.sharding.device_set) == 4 else "gathered", err)
"""


def test_jit_over_batch_sharded_inputs_equals_the_unsharded_call():
    proc = subprocess.run([sys.executable, "-c", _WORKER], env=four_device_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = dict((line.split()[0], line.split()[1:]) for line in proc.stdout.strip().splitlines())
    assert set(lines) == set(CASES), proc.stdout
    for name, (placement, err) in lines.items():
        assert float(err) < 1e-4, (name, err)
        assert placement == "sharded", (name, placement)
