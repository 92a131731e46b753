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
NEW_CASES = ("compile", "jaxpr_equations", "hlo_instructions", "memory", "e2e_convnet", "e2e_snn")
# like for like: each library's non-default variance
LIKE_FOR_LIKE = ("brainnorm (fast variance)", "flax.nnx (two-pass)", "brainstate.nn (two-pass)")
VARIANCE_CASES = ("layernorm", "batchnorm2d", "groupnorm", "grad_layernorm", "grad_batchnorm2d", "grad_groupnorm")
COUNT_CASES = ("jaxpr_equations", "hlo_instructions")
UNTIMED = {"memory": "MiB", "jaxpr_equations": "count", "hlo_instructions": "count"}
PEERS = ["flax.nnx", "brainstate.nn"]
TWO_PASS_PEERS = ["flax.nnx (two-pass)", "brainstate.nn (two-pass)"]

# (case, implementation) rows of a quick run, in order
EXPECTED_ROWS = [
    ("floor", f"{FLOOR} 256x128"),
    ("floor", f"{FLOOR} 4x8x8x64"),
    *[("layernorm", impl) for impl in (*JAX_PEERS, "torch", *LIKE_FOR_LIKE, FLOOR)],
    *[("rmsnorm", impl) for impl in (*JAX_PEERS, "torch", FLOOR)],
    *[("masked_layernorm", impl) for impl in
      ("brainnorm (masked)", "flax.nnx", "brainstate.nn", "brainnorm (unmasked)", FLOOR)],
    *[("padded_layernorm", impl) for impl in
      ("brainnorm (padding mask)", "flax.nnx", "brainstate.nn", "brainnorm (unmasked)", FLOOR)],
    *[(case, impl) for case in ("batchnorm2d", "groupnorm") for impl in (*JAX_PEERS, "torch", *LIKE_FOR_LIKE, FLOOR)],
    *[("grad_layernorm", impl) for impl in (*JAX_PEERS, *LIKE_FOR_LIKE, FLOOR)],
    *[("grad_rmsnorm", impl) for impl in (*JAX_PEERS, FLOOR)],
    *[(case, impl) for case in ("grad_batchnorm2d", "grad_groupnorm") for impl in (*JAX_PEERS, *LIKE_FOR_LIKE, FLOOR)],
    *[("sim_loop", impl) for impl in ("brainnorm", "hand-written lax.scan", "brainstate.nn", FLOOR)],
    *[(case, impl) for case in ("compile", *COUNT_CASES) for impl in JAX_PEERS],
    *[("memory", impl) for impl in (*JAX_PEERS, "brainnorm (masked)", "flax.nnx (masked)", "brainstate.nn (masked)")],
    *[(case, impl) for case in ("e2e_convnet", "e2e_snn") for impl in JAX_PEERS],
]

# (case, numerator, denominator candidates, limit) of every target (SPEC sections
# 7 and 8); several candidates: against the fastest of them that ran; a limit of
# None reports the ratio only
EXPECTED_TARGETS = [
    ("layernorm", "brainnorm", PEERS, 1.0),
    ("layernorm", "brainnorm", [FLOOR], 2.0),
    ("layernorm", "brainnorm (fast variance)", ["flax.nnx"], 1.0),
    ("layernorm", "brainnorm", TWO_PASS_PEERS, None),
    ("rmsnorm", "brainnorm", PEERS, 1.0),
    ("rmsnorm", "brainnorm", [FLOOR], 2.0),
    ("masked_layernorm", "brainnorm (masked)", ["brainnorm (unmasked)"], 1.3),
    ("masked_layernorm", "brainnorm (masked)", PEERS, None),
    ("padded_layernorm", "brainnorm (padding mask)", ["brainnorm (unmasked)"], 1.1),
    ("padded_layernorm", "brainnorm (padding mask)", PEERS, None),
    ("batchnorm2d", "brainnorm", PEERS, 1.0),
    ("batchnorm2d", "brainnorm (fast variance)", ["flax.nnx"], 1.0),
    ("batchnorm2d", "brainnorm", TWO_PASS_PEERS, None),
    ("groupnorm", "brainnorm", PEERS, 1.0),
    ("groupnorm", "brainnorm", ["flax.nnx"], 0.6),
    ("groupnorm", "brainnorm (fast variance)", ["flax.nnx"], 1.0),
    ("groupnorm", "brainnorm", TWO_PASS_PEERS, None),
    ("grad_layernorm", "brainnorm", PEERS, 1.0),
    ("grad_layernorm", "brainnorm (fast variance)", ["flax.nnx"], 1.0),
    ("grad_layernorm", "brainnorm", TWO_PASS_PEERS, None),
    ("grad_rmsnorm", "brainnorm", PEERS, 1.0),
    ("grad_batchnorm2d", "brainnorm", PEERS, 1.0),
    ("grad_batchnorm2d", "brainnorm (fast variance)", ["flax.nnx"], 1.0),
    ("grad_batchnorm2d", "brainnorm", TWO_PASS_PEERS, None),
    ("grad_groupnorm", "brainnorm", PEERS, 1.0),
    ("grad_groupnorm", "brainnorm", ["flax.nnx"], 0.6),
    ("grad_groupnorm", "brainnorm (fast variance)", ["flax.nnx"], 1.0),
    ("grad_groupnorm", "brainnorm", TWO_PASS_PEERS, None),
    ("sim_loop", "brainnorm", ["hand-written lax.scan"], 1.1),
    ("sim_loop", "brainnorm", ["brainstate.nn"], None),
    ("compile", "brainnorm", ["flax.nnx"], 1.0),
    ("compile", "brainnorm", ["brainstate.nn"], None),
    ("jaxpr_equations", "brainnorm", ["flax.nnx"], None),
    ("jaxpr_equations", "brainnorm", ["brainstate.nn"], None),
    ("hlo_instructions", "brainnorm", ["flax.nnx"], None),
    ("hlo_instructions", "brainnorm", ["brainstate.nn"], None),
    ("memory", "brainnorm", ["flax.nnx"], 1.0),
    ("memory", "brainnorm (masked)", ["flax.nnx (masked)"], 1.0),
    ("e2e_convnet", "brainnorm", ["flax.nnx"], 1.0), ("e2e_convnet", "brainnorm", ["brainstate.nn"], 1.0),
    ("e2e_snn", "brainnorm", ["flax.nnx"], 1.0), ("e2e_snn", "brainnorm", ["brainstate.nn"], 1.0),
]

# rows whose output check compares against a peer (its error is reported on that row)
PEER_CHECKED = {
    *[(case, impl) for case in ("compile", *COUNT_CASES, "e2e_convnet", "e2e_snn")
      for impl in ("flax.nnx", "brainstate.nn")],
    *[("memory", impl) for impl in ("flax.nnx", "brainstate.nn", "flax.nnx (masked)", "brainstate.nn (masked)")],
}


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
        if r["case"] in UNTIMED:  # untimed: one compilation, measured
            assert r["unit"] == UNTIMED[r["case"]] and r["n_runs"] == 0 and r["samples_ms"] == [], where
            assert r["median_ms"] is None, where
            continue
        assert r["unit"] == "ms", where
        expected_runs = 1 if r["case"] == "compile" else 3  # one compilation per round
        assert r["n_runs"] == expected_runs, where
        assert len(r["samples_ms"]) == expected_runs, where
        assert r["median_ms"] == r["value"] > 0, where
        assert len(r["block_medians_ms"]) == 1, where  # one round: one block

    targets = [(t["case"], t["impl"], t["candidates"], t["limit"]) for t in result["targets"]]
    assert targets == EXPECTED_TARGETS
    for t in result["targets"]:
        # a verdict is computed; its value is not asserted
        assert t["result"] in (("PASS", "FAIL") if t["limit"] is not None else ("info",)), t
        assert t["ratio"] > 0, t
        assert t["versus"] in t["candidates"], t
        # the denominator is the fastest candidate that ran
        values = {r["impl"]: r["value"] for r in result["rows"]
                  if r["case"] == t["case"] and r["impl"] in t["candidates"]}
        assert values[t["versus"]] == min(values.values()), t
        num = next(r["value"] for r in result["rows"] if (r["case"], r["impl"]) == (t["case"], t["impl"]))
        assert t["ratio"] == pytest.approx(num / values[t["versus"]]), t

    assert "targets (SPEC sections 7 and 8" in stdout
    assert (out_dir / "table.rst").read_text().startswith(".. list-table::")
    if HAVE_MATPLOTLIB:
        assert (out_dir / "results.png").stat().st_size > 0


@pytest.mark.parametrize("case", VARIANCE_CASES)
def test_quick_run_reports_defaults_and_like_for_like(quick_run, case):
    result, stdout, _ = quick_run
    rows = {r["impl"]: r for r in result["rows"] if r["case"] == case}
    for impl in (*JAX_PEERS, *LIKE_FOR_LIKE):  # every library, both variances, checked against the reference
        assert rows[impl]["status"] == "ok" and not rows[impl]["check_failed"], rows[impl]
    # like-for-like rows are compared with the flax.nnx row of the same variance
    assert rows["brainnorm"]["versus_flax"] == "flax.nnx"
    assert rows["brainnorm (fast variance)"]["versus_flax"] == "flax.nnx"
    assert rows["brainstate.nn (two-pass)"]["versus_flax"] == "flax.nnx (two-pass)"
    targets = {(t["impl"], tuple(t["candidates"])): t for t in result["targets"] if t["case"] == case}
    assert targets[("brainnorm", tuple(PEERS))]["limit"] == 1.0  # defaults: SPEC 7 target
    assert targets[("brainnorm (fast variance)", ("flax.nnx",))]["limit"] == 1.0  # SPEC 7, use_fast_variance=True
    like = targets[("brainnorm", tuple(TWO_PASS_PEERS))]
    assert like["result"] == "info" and like["versus"] in TWO_PASS_PEERS  # like for like: information
    assert f"like for like: vs faster two-pass peer [{like['versus']}]" in stdout


def test_quick_run_has_the_mask_rows(quick_run):
    result, stdout, _ = quick_run
    for case, name, limit in (("masked_layernorm", "brainnorm (masked)", 1.3),
                              ("padded_layernorm", "brainnorm (padding mask)", 1.1)):
        rows = {r["impl"]: r for r in result["rows"] if r["case"] == case}
        for impl in (name, "flax.nnx", "brainstate.nn", "brainnorm (unmasked)"):
            assert rows[impl]["status"] == "ok" and rows[impl]["check_error"] is not None, rows[impl]
            assert rows[impl]["check_error"] <= result["config"]["check_tolerance"], rows[impl]
        assert rows[name]["reference"] == "brainnorm (unmasked)"
        (t,) = [t for t in result["targets"] if t["case"] == case and t["limit"] is not None]
        assert (t["impl"], t["versus"], t["limit"]) == (name, "brainnorm (unmasked)", limit)
    assert any(line.startswith("padded_layernorm 256x128") for line in stdout.splitlines())


@pytest.mark.parametrize("case", COUNT_CASES)
def test_quick_run_counts_have_the_count_unit(quick_run, case):
    result, stdout, _ = quick_run
    rows = [r for r in result["rows"] if r["case"] == case]
    assert [r["impl"] for r in rows] == list(JAX_PEERS)
    for r in rows:
        assert r["unit"] == "count" and r["value"] == int(r["value"]) and r["value"] >= 10, r
        assert r["details"][case] == r["value"], r
        assert r["ratio_floor"] is None and r["first_call_s"] is None, r
    lines = [line for line in stdout.splitlines() if line.startswith(f"{case} 1x")]
    assert len(lines) == 3 and not any(" ms " in line or "MiB" in line for line in lines), lines
    assert all(t["result"] == "info" for t in result["targets"] if t["case"] == case)


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
    if case == "hlo_instructions":
        for r in rows:
            assert 0 < r["details"]["entry_instructions"] < r["value"] and r["details"]["computations"] >= 1, r
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


def test_evaluate_targets_picks_the_faster_peer():
    """A target against (flax.nnx, brainstate.nn) divides by the faster of the two that ran."""
    code = (
        "import report\n"
        "def row(case, impl, value, unit='ms'):\n"
        "    return {'case': case, 'impl': impl, 'value': value, 'unit': unit, 'min_ms': value,\n"
        "            'block_medians_ms': [value]}\n"
        "def find(ts, case, impl, cands):\n"
        "    return next(t for t in ts if (t['case'], t['impl'], t['candidates']) == (case, impl, cands))\n"
        "peers = ['flax.nnx', 'brainstate.nn']\n"
        "rows = [row('layernorm', 'brainnorm', 1.0), row('layernorm', 'flax.nnx', 2.0),\n"
        "        row('layernorm', 'brainstate.nn', 0.8),\n"
        "        row('grad_rmsnorm', 'brainnorm', 1.0), row('grad_rmsnorm', 'flax.nnx', 1.25),\n"
        "        row('grad_rmsnorm', 'brainstate.nn', None),\n"
        "        row('rmsnorm', 'brainnorm', 1.0),\n"
        "        row('jaxpr_equations', 'brainnorm', 300, 'count'), row('jaxpr_equations', 'flax.nnx', 200, 'count')]\n"
        "ts = report.evaluate_targets(rows)\n"
        "a = find(ts, 'layernorm', 'brainnorm', peers)\n"
        "b = find(ts, 'grad_rmsnorm', 'brainnorm', peers)\n"
        "c = find(ts, 'rmsnorm', 'brainnorm', peers)\n"
        "d = find(ts, 'jaxpr_equations', 'brainnorm', ['flax.nnx'])\n"
        "print(repr([(t['versus'], t['ratio'], t['result'], t['ratio_of_min_times']) for t in (a, b, c, d)]))\n"
        "print(repr(report.target_text(a)))\n"
        "print(repr(report.fmt_value(rows[-2])))\n"
    )
    lines = _harness(code).strip().splitlines()
    (a, b, c, d), text, count = eval(lines[-3]), eval(lines[-2]), eval(lines[-1])
    assert a[0] == "brainstate.nn" and a[1] == pytest.approx(1.25) and a[2] == "FAIL"  # faster peer: brainstate.nn
    assert a[3] == pytest.approx(1.25)
    assert b[0] == "flax.nnx" and b[1] == pytest.approx(0.8) and b[2] == "PASS"  # brainstate.nn did not run
    assert c == (None, None, "n/a", None)  # no peer ran
    assert d[0] == "flax.nnx" and d[1] == pytest.approx(1.5) and d[2] == "info"
    assert text == "<= faster peer [brainstate.nn]: 1.25 FAIL"
    assert count == "300"


HLO_TEXT = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (x: f32[3]) -> f32[] {
  %x = f32[3]{0} parameter(0)
  %c = f32[] constant(0)
  ROOT %r = f32[] reduce(%x, %c), dimensions={0}, to_apply=%add
}
"""


def test_program_size_counters():
    """Jaxpr equations are counted through nested jaxprs; HLO instructions are the `%name = ...` lines."""
    code = (
        "import cases, jax, jax.numpy as jnp\n"
        "inner = jax.jit(lambda y: y * 2.0 + 1.0)\n"
        "f = jax.custom_jvp(lambda y: jnp.sin(y))\n"
        "f.defjvp(lambda p, t: (f(p[0]), jnp.cos(p[0]) * t[0]))\n"
        "outer = jax.jit(lambda x: f(inner(x)).sum())\n"
        "print(repr(cases.count_jaxpr_equations(jax.make_jaxpr(outer)(jnp.ones(3)))))\n"
        f"print(repr(cases.count_hlo_instructions({HLO_TEXT!r})))\n"
        "text = outer.lower(jnp.ones(3)).compile().as_text()\n"
        "print(repr((cases.count_hlo_instructions(text), text.count(' = '))))\n"
    )
    lines = _harness(code).strip().splitlines()
    jaxpr, hlo, (compiled, assignments) = eval(lines[-3]), eval(lines[-2]), eval(lines[-1])
    # outer jit (1) > [inner jit (1) > mul, add (2); custom_jvp_call (1) > sin (1); reduce_sum (1)]
    assert jaxpr == (7, 3)
    assert hlo == (6, 2, 3)  # 3 + 3 instructions, 2 computations, 3 in the entry computation
    instructions, computations, entry = compiled
    assert 0 < entry <= instructions <= assignments and computations >= 1
