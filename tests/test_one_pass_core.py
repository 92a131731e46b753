"""How the core is compiled: every sum of a group in one pass, masks inside it, padding masks on the unmasked path.

The staged sums (:func:`brainnorm._stats._sums_kept`) reshape only the
innermost axes and change layout at row lengths 16 (8 lanes) and 128 (64
lanes) and at a channels-last reduced axis of 32 (steps of 16): every check
here runs below and above those sizes against float64 sums. The structural
checks read the optimized XLA CPU program: the full-size arrays it writes.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainnorm
import brainnorm.functional as F
from brainnorm import _stats

# (shape, reduced axes): rows below/at/above 8- and 64-lane blocks, channels last below/at/above steps of
# 16, reduced axes on both sides of a kept one, a size-1 axis, one element per group
SHAPES = [
    ((3, 7), (1,)),
    ((5, 8), (1,)),
    ((5, 16), (1,)),
    ((4, 64), (1,)),
    ((3, 127), (1,)),
    ((3, 128), (1,)),
    ((2, 1000), (1,)),
    ((2, 1024), (1,)),
    ((2, 4, 48), (1, 2)),
    ((31, 4), (0,)),
    ((32, 4), (0,)),
    ((48, 3), (0,)),
    ((256, 8), (0,)),
    ((2, 32, 5, 16), (0, 1, 2)),
    ((2, 4, 8, 16, 3), (0, 1, 2, 3)),
    ((3, 5, 7, 6), (0, 1, 2)),
    ((4, 6, 128), (0, 2)),
    ((4, 1, 64), (0, 1)),
    ((5, 1), (1,)),
]


def _ids(cases):
    return [f"{'x'.join(map(str, s))}-axes{''.join(map(str, a))}" for s, a in cases]


@pytest.mark.parametrize("shape, axes", SHAPES, ids=_ids(SHAPES))
def test_staged_sums_equal_float64_sums(shape, axes, rng):
    a = rng.standard_normal(shape).astype(np.float32)
    b = (rng.standard_normal(shape) * 10 + 3).astype(np.float32)
    got = jax.jit(lambda a, b: _stats._sums_kept([a, b * b], axes))(a, b)
    for value, want in zip(got, (a.astype(np.float64), np.square(b.astype(np.float64))), strict=True):
        want = want.sum(axis=axes, keepdims=True)
        assert value.shape == want.shape
        scale = np.abs(want).max() + 1.0
        np.testing.assert_allclose(np.asarray(value, np.float64), want, atol=2e-6 * scale * np.sqrt(np.prod(shape)))


@pytest.mark.parametrize("shape, axes", SHAPES, ids=_ids(SHAPES))
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_moments_at_every_layout(shape, axes, masked, rng):
    """Mean and variance (offset 1e4) within float32 rounding of float64, masked or not."""
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    mask = rng.random(shape) < 0.7 if masked else None
    mean, var = jax.jit(lambda v, m: F.moments(v, axes, mask=m))(x, mask)
    w = np.ones(shape) if mask is None else mask.astype(np.float64)
    n = w.sum(axis=axes, keepdims=True)
    xd = x.astype(np.float64)
    ref_mean = np.where(n > 0, (w * xd).sum(axis=axes, keepdims=True) / np.maximum(n, 1), 0.0)
    ref_var = np.where(n > 0, (w * (xd - ref_mean) ** 2).sum(axis=axes, keepdims=True) / np.maximum(n, 1), 0.0)
    np.testing.assert_allclose(np.asarray(mean, np.float64), ref_mean, rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.asarray(var, np.float64), ref_var, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("shape, mask_shape", [((6, 256), (6, 1)), ((3, 5, 128), (3, 5, 1)), ((3, 5, 128), (5, 1))])
def test_padding_mask_equals_the_elementwise_mask(shape, mask_shape, rng):
    """A mask constant along the reduced axes (the unmasked path with a count per group) equals the same mask
    broadcast to ``x``'s shape (the masked path): outputs, moments, gradients; padding holds nan."""
    x = rng.standard_normal(shape).astype(np.float32) * 3 + 5
    rows = rng.random(mask_shape) < 0.6
    rows.flat[0] = False  # at least one padded group
    rows.flat[-1] = True
    full = np.broadcast_to(rows, shape)
    x = np.where(full, x, np.nan).astype(np.float32)
    cot = rng.standard_normal(shape).astype(np.float32)
    layer = brainnorm.LayerNorm(shape[-1])

    def run(mask):
        def loss(v):
            return jnp.sum(jnp.where(full, layer(v, mask=mask), 0.0) * cot)

        y = layer(x, mask=mask)
        g = jax.grad(loss)(x)
        m, v = F.moments(x, -1, mask=mask)
        return y, g, m, v

    constant, elementwise = run(jnp.asarray(rows)), run(jnp.asarray(full))
    for a, b, what in zip(constant, elementwise, ("output", "gradient", "mean", "var"), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if what in ("output", "gradient"):
            a, b = np.where(full, a, 0.0), np.where(full, b, 0.0)
        assert np.all(np.isfinite(a)), what
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=what)
    # padded groups: the statistics of nothing
    padded = ~np.broadcast_to(rows, constant[2].shape)
    assert np.all(np.asarray(constant[2])[padded] == 0) and np.all(np.asarray(constant[3])[padded] == 0)
    assert np.all(np.asarray(constant[1])[~full] == 0)  # no gradient reaches padding


def _full_size_writes(compiled_text, size):
    """Full-size arrays the ENTRY computation writes (fusion and other thunk outputs, tuples included)."""
    entry = compiled_text[compiled_text.index("\nENTRY") :]
    writes = 0
    for line in entry.splitlines()[1:]:
        if " = " not in line:
            continue
        rest = line.split(" = ", 1)[1]
        op_match = re.search(r"\)?\s*([a-z\-]+)\(", rest)
        op = op_match.group(1) if op_match else ""
        if op in ("parameter", "constant", "get-tuple-element", "bitcast", "tuple"):
            continue
        head = rest.split(op + "(", 1)[0]
        for dims in re.findall(r"\w+\[([\d,]*)\]", head):
            if dims and int(np.prod([int(d) for d in dims.split(",")])) == size:
                writes += 1
    return writes


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="reads XLA CPU's fusion decisions")
@pytest.mark.parametrize("case", ["layer_norm", "masked_layer_norm", "padding_mask", "batch_norm_2d", "rms_norm"])
def test_forward_writes_only_its_output(case):
    """One full-size array written: the output (no copy of x, of the mask as floats, of x - shift)."""
    x = jnp.zeros((512, 1024))
    mask = jnp.zeros((512, 1024), bool)
    if case == "layer_norm":
        f, args = jax.jit(lambda v: F.layer_norm(v)), (x,)
    elif case == "rms_norm":
        f, args = jax.jit(lambda v: F.rms_norm(v)), (x,)
    elif case == "masked_layer_norm":
        f, args = jax.jit(lambda v, m: F.layer_norm(v, mask=m)), (x, mask)
    elif case == "padding_mask":
        f, args = jax.jit(lambda v, m: F.layer_norm(v, mask=m)), (x, mask[:, :1])
    else:
        x = jnp.zeros((16, 16, 16, 64))
        f, args = jax.jit(lambda v: F.batch_norm(v, jnp.zeros(64), jnp.ones(64), training=True)), (x,)
    assert _full_size_writes(f.lower(*args).compile().as_text(), x.size) == 1
