"""GSPMD: brainnorm under ``jax.jit`` with sharded inputs, on 4 CPU devices (SPEC §8).

SPEC §8: "GSPMD: under jax.jit / brainstate.transform.jit, with an input
sharded by NamedSharding along a batch axis, per-sample layers (LayerNorm,
RMSNorm, GroupNorm, InstanceNorm, LocalResponseNorm) return their output with
the same sharding and the compiled program holds no all-gather of activations;
batch-statistics layers (the BatchNorm family, the temporal layers) compute
exact global statistics by reducing per-channel partial sums across shards and
keep the output sharded." Before the statistics core was rewritten, float32
inputs of 65536 elements or more were all-gathered onto every device (the CPU
kernel had no partitioning rule), and on a mesh with explicit axes (the default
of ``jax.make_mesh`` in JAX 0.10) batch statistics over a sharded axis raised
``ShardingTypeError: slicing on sharded dims``.

JAX fixes its device count when it initializes, so tests/_gspmd_worker.py runs
the multi-device computations in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``; it stores outputs, the
unsharded (one-device) results of the same computations, output shardings and
the collectives of the compiled HLO. The assertions are here:

a. automatic axes, per-sample layers (functional API under ``jax.jit``, layers
   under ``brainstate.transform.jit``), 256-element and 65536-element inputs
   sharded along the batch: output sharding equivalent to the input's; no
   all-gather at all and no collective moving as many elements as one
   device's share of the input; results equal the unsharded ones within 1e-5.
b. automatic axes, batch statistics (BatchNorm0d/2d and functional batch_norm
   in training, tdBN multi-step with its batch axis 1 sharded): output sharded
   like the input, an all-reduce in the program (partial sums), no collective
   of activation size (element count >= one device's share of the input; a
   statistic-sized all-gather or permute is allowed), outputs and running
   statistics equal the unsharded ones within 1e-5 (+1e-6 relative).
c. explicit axes (``jax.make_mesh((4,), ('d',))``: Explicit in JAX 0.10, also
   asserted): batch_norm / moments over the sharded batch axis, layer_norm over
   a sharded feature axis, layers under ``jax.set_mesh``: no error, same
   results as unsharded, output sharding kept.
d. ``jax.shard_map`` and ``jax.pmap`` with ``axis_name`` (65536 elements per
   device), forward mode (``jax.jvp``) inside both.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "_gspmd_worker.py"
NDEV = 4
ATOL = 1e-5
RTOL = 1e-6

from . import _gspmd_worker as W  # case names and the HLO scan; importing it sets no environment variable
from ._devices import four_device_env


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """Run every worker case once; return ``get(case) -> (arrays, info)``."""
    out = tmp_path_factory.mktemp("gspmd")
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], env=four_device_env(), capture_output=True, text=True,
                          timeout=900, cwd=str(ROOT))
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["devices"] == NDEV, meta["devices"]
    with np.load(out / "results.npz") as npz:
        results = {k: npz[k] for k in npz.files}

    def get(case):
        assert case in meta["cases"], f"the worker has no case {case}"
        if case in meta["errors"]:
            pytest.fail(f"worker case {case} raised:\n{meta['errors'][case]}")
        prefix = case + "/"
        found = {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}
        assert found, f"no results for {case}"
        return found, meta["info"][case]

    return get


def assert_close(actual, expected, atol=ATOL, rtol=RTOL, what=""):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), f"{what}: not finite"
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol, err_msg=what)


def activation_sized(info):
    """Collectives that move at least one device's share of the input."""
    return [c for c in info["collectives"] if c[1] >= info["per_device"]]


def layer_norm_jvp64(x, t, eps=1e-6):
    """Closed-form float64 tangent of plain layer_norm over the last axis."""
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
    xc = x - x.mean(-1, keepdims=True)
    s = np.sqrt((xc**2).mean(-1, keepdims=True) + eps)
    tc = t - t.mean(-1, keepdims=True)
    return tc / s - xc * (xc * tc).mean(-1, keepdims=True) / s**3


def layer_norm64(x, eps=1e-6):
    x = np.asarray(x, np.float64)
    xc = x - x.mean(-1, keepdims=True)
    return xc / np.sqrt((xc**2).mean(-1, keepdims=True) + eps)


# --- the worker's cases exist as this file expects ---------------------------------------------------------

PER_SAMPLE = [f"auto_{n}_{api}_{size}" for n in W.PER_SAMPLE_SHAPES for api in ("functional", "layer")
              for size in ("small", "large")]
BATCH_STATS = [f"auto_{n}_{size}" for n in W.BN_SHAPES for size in ("small", "large")] + [
    "auto_F.batch_norm_masked_large", "auto_BatchNorm0d_masked_large"]
EXPLICIT = [f"explicit_{k}_{size}" for k in W.EXPLICIT_KINDS for size in W.EXPLICIT_SHAPES]


def test_worker_cases_cover_both_sizes():
    for case in PER_SAMPLE + BATCH_STATS + EXPLICIT:
        assert case in W.CASES, case
    large = [s[1] for s in W.PER_SAMPLE_SHAPES.values()] + [s[1] for s in W.BN_SHAPES.values()]
    assert all(np.prod(shape) >= 65536 for shape in large), large
    assert np.prod(W.EXPLICIT_SHAPES["large"]) >= 65536
    assert np.prod(W.SHARDED_BN) // NDEV >= 65536


def test_hlo_collective_parser():
    """The HLO scan the assertions rely on finds collectives and their sizes."""
    hlo = """
  %all-gather = f32[64,1024,1]{2,1,0} all-gather(%bitcast), channel_id=1, dimensions={0}
  %all-reduce.1 = (f32[1,8]{1,0}, f32[1,8]{1,0}) all-reduce(%a, %b), channel_id=2, to_apply=%add
  %cp = f32[16]{0} collective-permute-start(f32[16]{0} %p), source_target_pairs={{0,1}}
  %fusion = f32[4,4]{1,0} fusion(%x), kind=kLoop
"""
    assert W.collectives(hlo) == [("all-gather", 65536), ("all-reduce", 8), ("collective-permute", 16)]


# --- a. per-sample layers on an automatic-axes mesh -------------------------------------------------------


@pytest.mark.parametrize("case", PER_SAMPLE)
def test_per_sample_layer_keeps_batch_sharding(worker, case):
    r, info = worker(case)
    assert "'data'" in info["input_spec"], info["input_spec"]
    assert info["same_as_input"], f"output sharding {info['spec']} differs from the input's {info['input_spec']}"
    assert not info["fully_replicated"], info["spec"]
    assert_close(r["y"], r["y_single"], what="sharded vs one device")


@pytest.mark.parametrize("case", PER_SAMPLE)
def test_per_sample_layer_has_no_all_gather(worker, case):
    _, info = worker(case)
    gathers = [c for c in info["collectives"] if c[0] == "all-gather"]
    assert not gathers, f"all-gather in the compiled program: {gathers}"
    assert not activation_sized(info), f"activation-sized collectives: {activation_sized(info)}"


def test_layer_norm_grad_keeps_batch_sharding(worker):
    r, info = worker("auto_layer_norm_grad_large")
    assert info["same_as_input"], info["spec"]
    assert not [c for c in info["collectives"] if c[0] == "all-gather"], info["collectives"]
    assert not activation_sized(info), activation_sized(info)
    assert_close(r["g"], r["g_single"], atol=1e-5, rtol=1e-5, what="gradient")


def test_layer_norm_jvp_under_gspmd(worker):
    r, info = worker("auto_layer_norm_jvp_large")
    assert info["same_as_input"], info["spec"]
    assert not [c for c in info["collectives"] if c[0] == "all-gather"], info["collectives"]
    assert_close(r["y"], layer_norm64(r["x"]), atol=1e-4, rtol=1e-5, what="primal")
    assert_close(r["dy"], layer_norm_jvp64(r["x"], r["t"]), atol=1e-4, rtol=1e-4, what="tangent")


# --- b. batch statistics on an automatic-axes mesh -------------------------------------------------------


@pytest.mark.parametrize("case", BATCH_STATS)
def test_batch_statistics_equal_unsharded(worker, case):
    r, _ = worker(case)
    assert_close(r["y"], r["y_single"], what="output")
    assert_close(np.ravel(r["mean"]), np.ravel(r["mean_single"]), what="running mean")
    assert_close(np.ravel(r["var"]), np.ravel(r["var_single"]), what="running var")
    # the running statistics moved (a training step happened)
    assert not np.allclose(np.ravel(r["var"]), 1.0)


@pytest.mark.parametrize("case", BATCH_STATS)
def test_batch_statistics_keep_output_sharded(worker, case):
    _, info = worker(case)
    assert info["same_as_input"], f"output sharding {info['spec']} differs from the input's {info['input_spec']}"
    assert not info["fully_replicated"], info["spec"]


@pytest.mark.parametrize("case", BATCH_STATS)
def test_batch_statistics_reduce_partial_sums(worker, case):
    _, info = worker(case)
    ops = {c[0] for c in info["collectives"]}
    assert "all-reduce" in ops, f"no all-reduce of partial sums: {info['collectives']}"
    assert not activation_sized(info), (
        f"activation-sized collectives (>= {info['per_device']} elements): {activation_sized(info)}")


# --- c. explicit axes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", EXPLICIT)
def test_explicit_mesh_equals_unsharded(worker, case):
    r, info = worker(case)
    assert [t.rsplit(".", 1)[-1] for t in info["axis_types"]] == ["Explicit"], info["axis_types"]
    pairs = [("y", "y_single"), ("mean", "mean_single"), ("var", "var_single"), ("g", "g_single")]
    compared = 0
    for key, single in pairs:
        if key in r:
            atol, rtol = (1e-5, 1e-5) if key == "g" else (ATOL, RTOL)
            assert_close(np.ravel(r[key]), np.ravel(r[single]), atol=atol, rtol=rtol, what=key)
            compared += 1
    assert compared, sorted(r)


@pytest.mark.parametrize("case", [c for c in EXPLICIT if "moments" not in c])
def test_explicit_mesh_keeps_sharding(worker, case):
    _, info = worker(case)
    assert info["same_as_input"], f"output sharding {info['spec']}"


@pytest.mark.parametrize("case", [c for c in EXPLICIT if "moments" not in c and "grad" not in c])
def test_explicit_mesh_has_no_activation_sized_collective(worker, case):
    _, info = worker(case)
    assert not activation_sized(info), (
        f"activation-sized collectives (>= {info['per_device']} elements): {activation_sized(info)}")
    ops = {c[0] for c in info["collectives"]}
    if "batch_sharded" in case or any(k in case for k in ("LayerNorm", "RMSNorm", "GroupNorm")):
        assert "all-gather" not in ops, info["collectives"]  # per-sample statistics: nothing to gather
    if "batch_norm" in case or "BatchNorm" in case or "feature_sharded" in case:
        assert "all-reduce" in ops, f"statistics over the sharded axis without an all-reduce: {info['collectives']}"


# --- d. shard_map and pmap with axis_name -------------------------------------------------------------------


@pytest.mark.parametrize("case", ["shard_map_batch_norm_axis_name", "pmap_batch_norm_axis_name"])
def test_mapped_batch_norm_equals_unsharded(worker, case):
    r, _ = worker(case)
    assert_close(r["y"], r["y_single"], what="output")
    mean, var = np.asarray(r["mean"]), np.asarray(r["var"])
    if mean.ndim == 2:  # pmap: one copy per device
        assert mean.shape[0] == NDEV
        for d in range(NDEV):
            assert_close(mean[d], r["mean_single"], what=f"running mean, device {d}")
            assert_close(var[d], r["var_single"], what=f"running var, device {d}")
    else:
        assert_close(mean, r["mean_single"], what="running mean")
        assert_close(var, r["var_single"], what="running var")


def test_shard_map_batch_norm_grad_equals_unsharded(worker):
    r, _ = worker("shard_map_batch_norm_grad_axis_name")
    assert_close(r["g"], r["g_single"], atol=1e-5, rtol=1e-4, what="gradient")


@pytest.mark.parametrize("case", ["shard_map_layer_norm_jvp", "pmap_layer_norm_jvp"])
def test_mapped_layer_norm_jvp(worker, case):
    r, _ = worker(case)
    assert_close(r["y"], layer_norm64(r["x"]), atol=1e-4, rtol=1e-5, what="primal")
    assert_close(r["dy"], layer_norm_jvp64(r["x"], r["t"]), atol=1e-4, rtol=1e-4, what="tangent")
