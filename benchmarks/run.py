#!/usr/bin/env python
"""Benchmarks: brainnorm against flax.nnx, brainstate.nn and PyTorch.

One command, one process, one machine::

    python benchmarks/run.py                      # full run (a few minutes on 2 cores)
    python benchmarks/run.py --quick              # tiny shapes, 3 runs (CI smoke test)
    BRAINNORM_QUICK=1 python benchmarks/run.py    # same as --quick
    python benchmarks/run.py --only layernorm     # one case (comma-separate several)
    python benchmarks/run.py --out-dir /tmp/bench # where results.json and the PNG go
    python benchmarks/run.py --cold               # caches evicted before every timed call

The work is split in three modules beside this one: ``cases.py`` (what each
case builds and times, per implementation), ``harness.py`` (process set-up,
warm-up, interleaved timing rounds, cache eviction, sample statistics) and
``report.py`` (the table, the SPEC section 7 and 8 targets, results.json,
results.png and table.rst). ``benchmarks/README.md`` describes the cases and
the method.

The exit status is 0 when every case ran and every output check passed
(timing targets never change it unless ``--strict``), 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # harness, cases and report live beside this file

import harness  # noqa: E402  (first: pins the allocator before numpy, JAX and PyTorch allocate)
import cases  # noqa: E402
import report  # noqa: E402
from harness import Case  # noqa: E402

import numpy as np  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and 3 runs, to smoke-test every case (also BRAINNORM_QUICK=1)")
    p.add_argument("--only", action="append", default=None, metavar="CASE",
                   help=f"run only these cases (repeat or comma-separate): {', '.join(cases.CASES)}, "
                        f"or a group: {', '.join(cases.GROUPS)}")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="where results.json, results.png and table.rst go (default: benchmarks/results)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 25; quick: 1)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per round and implementation (default 2; quick: 3)")
    p.add_argument("--min-time", type=float, default=None,
                   help="more runs per round until the slowest implementation of a case has this many seconds "
                        "of samples (default 1.0; quick: 0)")
    p.add_argument("--warmup", type=int, default=None, help="calls after the first (compiling) one (default 2; quick: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cold", action="store_true",
                   help="evict the CPU caches before every timed call (inputs and outputs start out of cache, "
                        "as for a layer inside a larger model); default: calls back to back")
    p.add_argument("--strict", action="store_true", help="exit with status 2 when a target fails")
    args = p.parse_args(argv)
    if os.environ.get("BRAINNORM_QUICK", "").strip().lower() in ("1", "true", "yes", "on"):
        args.quick = True
    if args.only:
        names = []
        for item in args.only:
            for name in filter(None, (s.strip() for s in item.split(","))):
                if name in cases.GROUPS:
                    names.extend(cases.GROUPS[name])
                elif name in cases.CASES:
                    names.append(name)
                else:
                    p.error(f"unknown case {name!r}; choose from {', '.join(cases.CASES)}, "
                            f"{', '.join(cases.GROUPS)}")
        args.cases = [c for c in cases.CASES if c in names]
    else:
        args.cases = list(cases.CASES)
    args.rounds = args.rounds or (1 if args.quick else 25)
    if args.min_time is None:
        args.min_time = 0.0 if args.quick else 1.0
    args.runs = args.runs or (3 if args.quick else 2)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    return args


def run_one(name, args, sh, evict):
    """Run one case; return its rows."""
    note = cases.shape_note(name, sh)
    rng = np.random.default_rng([args.seed, zlib.crc32(name.encode())])  # per case, whatever cases run
    try:
        case = Case.of(cases.CASE_FUNCS[name](sh, rng))
        rounds = harness.run_case(case, args.rounds, args.runs, args.warmup, args.min_time, evict)
        return report.summarize(name, case.impls, note, case.unit, rounds)
    except Exception as exc:
        traceback.print_exc()
        return [report.error_row(name, note, exc)]


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    sh = cases.shapes(args.quick)
    machine = harness.machine_info()
    evict = harness.CacheEvictor() if args.cold else None
    cache = f"cold: {evict.nbytes >> 20} MiB read before every timed call" if evict else "warm: calls back to back"
    print(f"brainnorm benchmarks ({'quick' if args.quick else 'full'}, {cache}): {args.rounds} rounds x {args.runs} runs, "
          f"warm-up {args.warmup}, allocator {machine['malloc']}; {machine['cpu_model']}, {machine['cpus_available']} CPUs; "
          f"jax {machine['jax']}, flax {machine['flax']}, brainstate {machine['brainstate']}, torch {machine['torch']}",
          flush=True)
    rows = []
    for name in args.cases:
        t0 = time.perf_counter()
        case_rows = run_one(name, args, sh, evict)
        rows.extend(case_rows)
        summary = ", ".join(f"{r['impl']} {report.fmt_value(r)}" for r in case_rows)
        print(f"[{name}] {time.perf_counter() - t0:.1f} s: {summary}", flush=True)

    targets = report.evaluate_targets(rows)
    machine["load_average_end"] = harness.load_average()
    wall = time.perf_counter() - t_start

    print()
    print("\n".join(report.table_lines(rows, targets)))
    print()
    print("\n".join(report.target_lines(targets)))

    config = {"rounds": args.rounds, "runs": args.runs, "warmup": args.warmup, "min_time": args.min_time,
              "seed": args.seed, "cache": "cold" if args.cold else "warm", "blocks": harness.BLOCKS,
              "cases": args.cases, "shapes": dict(sh), "check_tolerance": harness.CHECK_TOL}
    written = report.write_results(args.out_dir, mode="quick" if args.quick else "full", config=config,
                                   machine=machine, wall=wall, rows=rows, targets=targets,
                                   cache="cold" if args.cold else "warm")
    print(f"\nwrote {', '.join(written)}")
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
