"""The benchmark harness runs end to end in its quick mode.

``benchmarks/run.py --quick`` runs in a subprocess (once for the module); the
tests check that every case and implementation produced a row in
``results.json`` and the table, that every output check passed, and that the
plot was written. Timings and the targets' verdicts are never asserted: quick
mode only smoke-tests the harness. The harness's own helpers are imported in
subprocesses too, because importing it pins the C allocator and sets the
OpenMP policy of the process.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPT = BENCHMARKS / "run.py"

pytest.importorskip("flax.nnx", reason="the benchmarks compare against flax.nnx")

HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

JAX_PEERS = ("brainnorm", "flax.nnx", "brainstate.nn")
FLOOR = "floor (x*a+b)"
NEW_CASES = ("compile", "memory", "e2e_convnet", "e2e_snn")

# (case, implementation) rows of a quick run, in order
EXPECTED_ROWS = [
    ("floor", f"{FLOOR} 256x128"),
    ("floor", f"{FLOOR} 4x8x8x64"),
    *[("layernorm", impl) for impl in (*JAX_PEERS, "torch", FLOOR)],
    *[("rmsnorm", impl) for impl in (*JAX_PEERS, "torch", FLOOR)],
    *[("masked_layernorm", impl) for impl in
      ("brainnorm (masked)", "flax.nnx", "brainstate.nn", "brainnorm (unmasked)", FLOOR)],
    *[("batchnorm2d", impl) for impl in ("brainnorm", "brainstate.nn", "flax.nnx", "torch", FLOOR)],
    *[("groupnorm", impl) for impl in ("brainnorm", "flax.nnx", "torch", FLOOR)],
    *[(case, impl) for case in ("grad_layernorm", "grad_rmsnorm", "grad_batchnorm2d", "grad_groupnorm")
      for impl in ("brainnorm", "flax.nnx", FLOOR)],
    *[("sim_loop", impl) for impl in ("brainnorm", "hand-written lax.scan", FLOOR)],
    *[("compile", impl) for impl in ("brainnorm", "flax.nnx")],
    *[("memory", impl) for impl in ("brainnorm", "flax.nnx", "brainnorm (masked)", "flax.nnx (masked)")],
    *[(case, impl) for case in ("e2e_convnet", "e2e_snn") for impl in JAX_PEERS],
]

# (case, versus, limit) of every target; a limit of None reports the ratio only
EXPECTED_TARGETS = [
    ("layernorm", "flax.nnx", 0.8), ("layernorm", FLOOR, 1.5),
    ("rmsnorm", "flax.nnx", 0.8), ("rmsnorm", FLOOR, 1.5),
    ("masked_layernorm", "brainnorm (unmasked)", 2.0),
    ("batchnorm2d", "brainstate.nn", 1.0), ("batchnorm2d", "flax.nnx", 0.8),
    ("groupnorm", "flax.nnx", 0.6),
    ("grad_layernorm", "flax.nnx", 1.0), ("grad_rmsnorm", "flax.nnx", 1.0),
    ("grad_batchnorm2d", "flax.nnx", 1.0), ("grad_groupnorm", "flax.nnx", 1.0),
    ("sim_loop", "hand-written lax.scan", 1.1),
    ("compile", "flax.nnx", 1.0),
    ("memory", "flax.nnx", 1.0), ("memory", "flax.nnx (masked)", 1.0),
    ("e2e_convnet", "flax.nnx", None), ("e2e_convnet", "brainstate.nn", None),
    ("e2e_snn", "flax.nnx", None), ("e2e_snn", "brainstate.nn", None),
]

# rows whose output check compares against a peer (its error is reported on that row)
PEER_CHECKED = {("compile", "flax.nnx"), ("memory", "flax.nnx"), ("memory", "flax.nnx (masked)"),
                *[(case, impl) for case in ("e2e_convnet", "e2e_snn") for impl in ("flax.nnx", "brainstate.nn")]}


def _run(args, out_dir, **env_extra):
    env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS="cpu", **env_extra)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out-dir", str(out_dir), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, (
        f"benchmarks/run.py exited with {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    )
    with open(out_dir / "results.json") as fh:
        return json.load(fh), proc.stdout


def _harness(code):
    """Run ``code`` in a subprocess that imported benchmarks/harness.py as ``harness``; return its stdout."""
    prelude = f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import harness\n"
    out = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("quick")
    result, stdout = _run(["--quick"], out_dir)
    return result, stdout, out_dir


def test_quick_run_has_every_row(quick_run):
    result, stdout, out_dir = quick_run

    assert result["mode"] == "quick"
    assert result["config"]["runs"] * result["config"]["rounds"] == 3
    for key in ("platform", "cpu_count", "jax", "flax", "brainstate", "brainnorm", "torch"):
        assert key in result["machine"], key
    assert result["machine"]["cpu_count"] >= 1

    rows = [(r["case"], r["impl"]) for r in result["rows"]]
    assert rows == EXPECTED_ROWS

    for r in result["rows"]:
        where = f"{r['case']} / {r['impl']}: {r.get('note')}"
        if r["impl"] == "torch" and not HAVE_TORCH:
            assert r["status"] == "skipped", where
            continue
        assert r["status"] == "ok", where
        assert r["note"] == "", where  # output checks against the reference passed
        assert not r["check_failed"], where
        assert r["value"] > 0, where
        if r["case"] == "memory":  # untimed: one compilation, measured
            assert r["unit"] == "MiB" and r["n_runs"] == 0 and r["samples_ms"] == [], where
            continue
        assert r["unit"] == "ms", where
        expected_runs = 1 if r["case"] == "compile" else 3  # one compilation per round
        assert r["n_runs"] == expected_runs, where
        assert len(r["samples_ms"]) == expected_runs, where
        assert r["median_ms"] == r["value"] > 0, where
        assert len(r["block_medians_ms"]) == 1, where  # one round: one block

    targets = [(t["case"], t["versus"], t["limit"]) for t in result["targets"]]
    assert targets == EXPECTED_TARGETS
    for t in result["targets"]:
        # a verdict is computed; its value is not asserted
        assert t["result"] in (("PASS", "FAIL") if t["limit"] is not None else ("info",)), t
        assert t["ratio"] > 0, t

    assert "targets (SPEC sections 7 and 8" in stdout
    assert (out_dir / "table.rst").read_text().startswith(".. list-table::")
    if HAVE_MATPLOTLIB:
        assert (out_dir / "results.png").stat().st_size > 0


@pytest.mark.parametrize("case", NEW_CASES)
def test_quick_run_has_the_spec8_rows(quick_run, case):
    result, stdout, out_dir = quick_run
    rows = [r for r in result["rows"] if r["case"] == case]
    assert {r["impl"] for r in rows} >= {"brainnorm", "flax.nnx"}
    for r in rows:
        where = f"{r['case']} / {r['impl']}: {r.get('note')}"
        assert r["status"] == "ok" and not r["check_failed"], where
        if (case, r["impl"]) in PEER_CHECKED:  # the check compared the outputs, and they agree
            assert r["check_error"] is not None and r["check_error"] <= result["config"]["check_tolerance"], where
    if case == "memory":
        for r in rows:
            assert r["details"]["temp_mib"] >= 0 and r["details"]["output_mib"] > 0, r
            assert r["value"] == pytest.approx(r["details"]["temp_mib"] + r["details"]["output_mib"])
    # in the printed table and in table.rst
    table_rows = [line for line in stdout.splitlines() if line.startswith(f"{case} ")]
    assert len(table_rows) == len(rows), stdout
    assert f"   * - {case} " in (out_dir / "table.rst").read_text()
    assert any(t["case"] == case for t in result["targets"])


def test_only_one_case_with_env_quick(tmp_path):
    result, _ = _run(["--only", "floor"], tmp_path, BRAINNORM_QUICK="1")
    assert result["mode"] == "quick"
    assert [(r["case"], r["impl"]) for r in result["rows"]] == EXPECTED_ROWS[:2]
    assert result["targets"] == []


def test_cold_mode_evicts_before_each_call(tmp_path):
    result, stdout = _run(["--quick", "--cold", "--only", "batchnorm2d"], tmp_path)
    assert result["config"]["cache"] == "cold"
    assert "cold:" in stdout.splitlines()[0]
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    assert {r["impl"] for r in rows} >= {"brainnorm", "flax.nnx", "brainstate.nn", FLOOR}
    assert all(len(r["samples_ms"]) == 3 and r["note"] == "" for r in rows)


def test_cache_evictor_reads_twice_the_last_level_cache():
    out = _harness("e = harness.CacheEvictor(); print(e.nbytes, harness.last_level_cache_bytes(), e.buf.nbytes)")
    nbytes, llc, buf = map(int, out.split()[-3:])
    sizes = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"))
    if sizes:  # Linux reports the caches: the largest one is found
        assert llc >= max(int(p.read_text().strip().rstrip("KMG")) for p in sizes) << 10
    assert nbytes == buf == max(64 << 20, 2 * llc)


def test_round_order_alternates_and_visits_every_position():
    out = _harness("print(repr([harness.round_order(list('abc'), r) for r in range(6)]))")
    orders = eval(out.strip().splitlines()[-1])
    assert orders[0] == list("abc") and orders[1] == list("cba")  # reversed every round
    for r in range(0, 6, 2):
        assert orders[r + 1] == orders[r][::-1]
    for impl in "abc":  # every implementation runs first, and each follows both its neighbours
        assert any(order[0] == impl for order in orders)
    follows = {(order[i - 1], order[i]) for order in orders for i in range(1, 3)}
    assert {("a", "b"), ("b", "a"), ("b", "c"), ("c", "b")} <= follows


def test_min_of_medians_over_blocks_of_rounds():
    code = (
        "s = [1.0, 1.1, 2.0, 2.2, 3.0, 3.3, 4.0, 4.4, 5.0, 5.5]; rounds = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]\n"
        "a = harness.block_medians(s, rounds, 5)\n"
        "b = harness.block_medians([2 * x for x in s], rounds, 5)\n"
        "b[3] = 1.0  # one disturbed block of the denominator\n"
        "print(repr((a, harness.block_medians(s, rounds, 5, blocks=2), harness.block_ratio_range(a, b))))"
    )
    blocks, two_blocks, (low, high) = eval(_harness(code).strip().splitlines()[-1])
    assert blocks == pytest.approx([1.05, 2.1, 3.15, 4.2, 5.25])
    assert two_blocks == pytest.approx([2.1, 4.7])  # rounds 0-2 and 3-4
    assert low == pytest.approx(0.5) and high == pytest.approx(4.2)
