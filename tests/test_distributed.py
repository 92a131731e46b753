"""Synchronized statistics on 4 CPU devices: ``axis_name`` under shard_map, pmap and brainstate's maps.

SPEC §3 "axis_name / axis_index_groups" and §6 item 3: with ``axis_name`` the
statistics are those of the data of every device together, exactly, also
with masks under which devices hold different numbers of valid elements (or
none); per-device masked means must not be averaged.

JAX fixes its device count when it initializes, and this process has
already imported JAX, so tests/_distributed_worker.py runs the multi-device
computations in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` and saves inputs and
outputs; the assertions here compare them with the float64 NumPy references
of tests/reference.py computed on the concatenated data.

Tolerances (float32): statistics and O(1) outputs within 1e-5; a mean of
size ``|m|`` may also differ by one float32 spacing of ``m`` (its rounding:
about 1e-3 at 1e4, 0.06 at 1e6).
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from . import reference as ref
from . import reference_training as reft
from ._devices import four_device_env

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "_distributed_worker.py"
EXAMPLE = ROOT / "examples" / "distributed_batchnorm.py"
NDEV = 4
ROWS = 6  # rows per device in the worker's data
ATOL = 1e-5


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """Run every worker case once; return ``get(case) -> dict of arrays``."""
    out = tmp_path_factory.mktemp("distributed")
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], env=four_device_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    meta = json.loads((out / "errors.json").read_text())
    assert meta["devices"] == NDEV, meta["devices"]
    with np.load(out / "results.npz") as npz:
        results = {k: npz[k] for k in npz.files}

    def get(case):
        if case in meta["errors"]:
            pytest.fail(f"worker case {case} raised:\n{meta['errors'][case]}")
        prefix = case + "/"
        found = {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}
        assert found, f"no results for {case}"
        return found

    return get


def assert_close(actual, expected, atol=ATOL, rtol=1e-6):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


def assert_stat_close(actual, expected, atol=ATOL):
    """Within ``atol`` plus one float32 spacing of the expected value (the rounding of a large mean)."""
    actual = np.asarray(actual, np.float64)
    expected = np.broadcast_to(np.asarray(expected, np.float64), actual.shape)
    allowed = atol + np.spacing(np.abs(expected).astype(np.float32)).astype(np.float64)
    err = np.abs(actual - expected)
    assert np.all(err <= allowed), f"max error {err.max():.3g} (allowed {allowed.max():.3g})\n{actual}\n{expected}"


def assert_same_on_every_device(stacked):
    stacked = np.asarray(stacked)
    for d in range(1, stacked.shape[0]):
        assert np.array_equal(stacked[d], stacked[0]), f"device {d} holds other statistics than device 0"


def check_global_moments(r, use_mean=True, groups=None):
    """Every device's (mean, var) equal the statistics of the concatenated data (or of its group's data)."""
    x, mask = r["x"], r.get("mask")
    groups = groups or [list(range(NDEV))]
    for group in groups:
        rows = np.concatenate([np.arange(d * ROWS, (d + 1) * ROWS) for d in group])
        mean, var, _ = ref.moments(x[rows], 0, None if mask is None else mask[rows], use_mean=use_mean)
        for d in group:
            assert_stat_close(r["mean"][d], mean)
            assert_stat_close(r["var"][d], var)
        assert_same_on_every_device(r["mean"][group])
        assert_same_on_every_device(r["var"][group])


# --- the data is non-trivial -------------------------------------------------------------------


def test_worker_masks_give_unequal_counts(worker):
    mask = worker("moments_shard_masked_unequal")["mask"].reshape(NDEV, ROWS, -1)
    counts = mask.sum(axis=1)  # (device, channel)
    assert (counts[2] == 0).all(), "device 2 must hold no valid element"
    assert len(set(counts[:, 0].tolist())) > 2, "devices must hold different numbers of valid elements"
    assert counts[:, 2].sum() == 1 and counts[:, 3].sum() == 0


def test_per_device_average_of_masked_means_is_wrong_here(worker):
    """What flax and brainstate compute (pmean of per-device masked means) is far from the exact mean."""
    r = worker("peers_per_device_average")
    x = r["x"].astype(np.float64).reshape(NDEV, ROWS, -1)
    mask = r["mask"].reshape(NDEV, ROWS, -1)
    exact, exact_var, _ = ref.moments(r["x"], 0, r["mask"])
    with np.errstate(invalid="ignore", divide="ignore"):
        per_device_mean = np.where(mask, x, 0).sum(1) / mask.sum(1)  # NaN where a device has none
    average = per_device_mean.mean(0)
    # channels 0 and 1: every device has data, the average is finite and wrong
    assert np.all(np.abs(average[:2] - exact[0, :2]) > 0.2), (average, exact)
    # channel 2: device 2 has none, the average is not even finite
    assert not np.isfinite(average[2])
    # brainnorm: exact on every device, channel 2 included
    for d in range(NDEV):
        assert_stat_close(r["brainnorm_mean"][d], exact)
        assert_stat_close(r["brainnorm_var"][d], exact_var)
    # the peers' own code does the average (and is therefore off)
    for peer in ("brainstate", "flax"):
        if f"{peer}_mean" not in r:
            continue
        peer_mean = r[f"{peer}_mean"]
        np.testing.assert_allclose(peer_mean[:, :2], np.broadcast_to(average[:2], (NDEV, 2)), rtol=1e-5)
        assert not np.allclose(peer_mean, np.broadcast_to(exact, peer_mean.shape), atol=0.1), peer


# --- functional: moments ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", [
    "moments_shard_unmasked",
    "moments_shard_unmasked_offset",
    "moments_shard_masked_unequal",
    "moments_shard_masked_unequal_offset_1e6",
    "moments_shard_masked_fast_variance",
    "moments_pmap_unmasked",
    "moments_pmap_masked_unequal",
    "moments_mesh2d_tuple_axis_name",
])
def test_moments_equal_statistics_of_concatenated_data(worker, case):
    check_global_moments(worker(case))


def test_moments_rms_masked(worker):
    check_global_moments(worker("moments_shard_masked_rms"), use_mean=False)


def test_moments_empty_channel_gives_zero(worker):
    r = worker("moments_shard_masked_unequal")
    assert np.all(r["mean"][:, 0, 3] == 0) and np.all(r["var"][:, 0, 3] == 0)
    assert np.all(r["var"][:, 0, 2] == 0)  # a single valid element overall


def test_moments_axis_index_groups_reduce_within_groups_under_pmap(worker):
    r = worker("moments_pmap_groups")
    check_global_moments(r, groups=[[0, 1], [2, 3]])
    # and the two groups really differ from the all-device statistics
    mean_all, _, _ = ref.moments(r["x"], 0, r["mask"])
    assert not np.allclose(r["mean"][0][:, :2], mean_all[:, :2], atol=1e-2)


# --- functional: layer_norm, rms_norm, batch_norm ---------------------------------------------------


@pytest.mark.parametrize("case", ["layer_norm_shard_masked", "layer_norm_pmap_masked", "layer_norm_shard_unmasked"])
def test_layer_norm_over_features_split_across_devices(worker, case):
    r = worker(case)
    expected = ref.normalize(r["x"], -1, r.get("mask"), 1e-6, r["scale"], r["bias"])
    assert_close(r["y"], expected)


def test_layer_norm_row_without_valid_element_equals_bias(worker):
    r = worker("layer_norm_shard_masked")
    assert not r["mask"][3].any()
    assert_close(r["y"][3], r["bias"], atol=0)


def test_rms_norm_over_features_split_across_devices(worker):
    r = worker("rms_norm_shard_masked")
    assert_close(r["y"], ref.normalize(r["x"], -1, r["mask"], 1e-6, r["scale"], use_mean=False))


@pytest.mark.parametrize("case,unbiased", [
    ("batch_norm_shard_masked", True),
    ("batch_norm_shard_unmasked", False),
    ("batch_norm_pmap_masked", False),
])
def test_batch_norm_training_step(worker, case, unbiased):
    r = worker(case)
    mask = r.get("mask")
    assert_close(r["y"], ref.normalize(r["x"], 0, mask, 1e-5, r["scale"], r["bias"]))
    new_mean, new_var = ref.running_update(r["rm"], r["rv"], r["x"], (0,), 0.9, mask, unbiased=unbiased)
    for d in range(NDEV):
        assert_stat_close(np.ravel(r["new_mean"][d]), new_mean)
        assert_stat_close(np.ravel(r["new_var"][d]), new_var)
    assert_same_on_every_device(r["new_mean"])
    assert_same_on_every_device(r["new_var"])
    if mask is not None:  # channel 3 has no valid element anywhere: its running statistics are kept
        assert np.all(np.reshape(r["new_mean"], (NDEV, -1))[:, 3] == r["rm"][3])
        assert np.all(np.reshape(r["new_var"], (NDEV, -1))[:, 3] == r["rv"][3])


def test_batch_norm_gradients_through_the_cross_device_combine(worker):
    """jax.grad of a loss on the shard_map output: input, scale and bias gradients of the global batch norm."""
    r = worker("batch_norm_shard_grad")
    dx, g_xhat = reft.normalize_vjp(r["x"], r["weights"], 0, 1e-5, r["scale"], r["mask"])
    assert_close(r["gx"], dx, atol=1e-4, rtol=1e-4)
    assert_close(r["gs"], g_xhat.sum(0), atol=1e-4, rtol=1e-4)
    assert_close(r["gb"], r["weights"].astype(np.float64).sum(0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["replicated_out_specs_moments", "replicated_out_specs_batch_norm"])
def test_global_statistics_can_be_returned_replicated_from_shard_map(worker, case):
    """The global statistics are the same on every device, so jax.shard_map's default replication
    check (check_vma=True) must accept ``out_specs=P()`` for them, as it does for psum results."""
    r = worker(case)
    if "new_mean" in r:
        expected = ref.running_update(r["rm"], r["rv"], r["x"], (0,), 0.9, r["mask"])
        assert_stat_close(np.ravel(r["new_mean"]), expected[0])
        assert_stat_close(np.ravel(r["new_var"]), expected[1])
    else:
        mean, var, _ = ref.moments(r["x"], 0, r["mask"])
        assert_stat_close(r["mean"], mean)
        assert_stat_close(r["var"], var)


# --- layers -------------------------------------------------------------------------------------------

BN_SCALE = np.linspace(0.5, 1.5, 4)
BN_BIAS = np.linspace(-0.3, 0.4, 4)


def check_bn_layer_run(r, steps, unbiased):
    mean, var = np.zeros(4), np.ones(4)
    for i in range(steps):
        x, mask = r[f"x{i}"], r[f"mask{i}"]
        assert_close(r[f"y{i}"], ref.normalize(x, (0, 1), mask, 1e-5, BN_SCALE, BN_BIAS))
        mean, var = ref.running_update(mean, var, x, (0, 1), 0.8, mask, unbiased=unbiased)
        assert_stat_close(np.ravel(r[f"mean{i}"]), mean)
        assert_stat_close(np.ravel(r[f"var{i}"]), var)
    assert int(r["count"]) == steps
    return mean, var


def test_batchnorm1d_layer_under_pmap2(worker):
    """Two training steps then an evaluation step: outputs and running statistics of the batched call."""
    r = worker("layer_batchnorm1d_pmap2")
    mean, var = check_bn_layer_run(r, 2, unbiased=True)
    expected_eval = ref.apply_stats(r["x0"], mean, var, 1e-5, BN_SCALE, BN_BIAS)
    assert_close(r["y_eval"], expected_eval, atol=1e-4, rtol=1e-5)
    assert int(r["count_after_eval"]) == 2


def test_batchnorm1d_layer_under_brainstate_shard_map(worker):
    check_bn_layer_run(worker("layer_batchnorm1d_shard_map"), 2, unbiased=False)


def test_batchnorm1d_layer_under_brainstate_shard_map_default_checks(worker):
    """brainstate.transform.shard_map keeps states replicated and checks it (check_vma=True by default)."""
    check_bn_layer_run(worker("layer_batchnorm1d_shard_map_checked"), 1, unbiased=False)


def test_instancenorm_running_statistics_over_devices(worker):
    r = worker("layer_instancenorm_pmap2")
    x, mask = r["x0"], r["mask0"]
    assert_close(r["y0"], ref.normalize(x, (1,), mask, 1e-5))
    mean, var = reft.instance_running_update(np.zeros(4), np.ones(4), x, (1,), (0,), 0.8, mask)
    assert_stat_close(np.ravel(r["mean0"]), mean)
    assert_stat_close(np.ravel(r["var0"]), var)


def test_layers_with_axis_index_groups_under_pmap(worker):
    r = worker("layer_groups_pmap")
    x, mask = r["x"], r["mask"]
    for rows in (slice(0, 4), slice(4, 8)):  # devices 0-1 and 2-3 (2 rows per device)
        assert_close(r["y_bn"][rows], ref.normalize(x[rows], (0, 1), mask[rows], 1e-5))
    # LayerNorm: sample b of each device with sample b of the other device in its group
    for group in ([0, 1], [2, 3]):
        for b in range(2):
            rows = [2 * d + b for d in group]
            assert_close(r["y_ln"][rows], ref.normalize(x[rows], (0, 1, 2), mask[rows], 1e-6))


# --- the example ---------------------------------------------------------------------------------------


def test_example_runs_in_quick_mode(tmp_path):
    out = tmp_path / "comparison.png"
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--quick", "--out", str(out)], env=four_device_env(),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = proc.stdout
    assert "exact" in text
    # "max |error|" lines (4-space indent): brainnorm's are tiny, the per-device average's are not
    errors = re.findall(r"^ {4}(\S.*?\))\s+(\S+)$", text, flags=re.M)
    ours = [float(e) for label, e in errors if label.startswith("brainnorm")]
    peers = [float(e) for label, e in errors if label.startswith("per-device average")]
    assert len(ours) == 4 and len(peers) == 2, errors
    assert max(ours) < 1e-4 and min(peers) > 1.0, errors
