"""What the benchmarks report: rows, targets, the printed table, results.json, results.png and table.rst."""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys

import harness
from cases import (BN, BN_FAST, BN_MASKED, BN_PADDED, BN_UNMASKED, BST, BST_MASKED, BST_TWO_PASS, CASES, FLAX,
                   FLAX_MASKED, FLAX_TWO_PASS, FLOOR, PEERS, SCAN, TITLES, TORCH, TWO_PASS_PEERS, VARIANCE_CASES)

# Targets: (case, numerator row, denominator, limit, label, SPEC section).
# The denominator is a row's name or a tuple of names: the fastest (smallest
# median) of those that ran, e.g. PEERS, "the faster of flax.nnx and
# brainstate.nn". A limit of None reports the ratio without a target.
LAYER_CASES = ("layernorm", "rmsnorm", "batchnorm2d", "groupnorm",
               "grad_layernorm", "grad_rmsnorm", "grad_batchnorm2d", "grad_groupnorm")
_TARGETS = (
    # SPEC 7, defaults (brainnorm's robust two-pass variance, the peers' one-pass):
    # every single-layer row, forward and forward+backward, at most the faster peer
    *((case, BN, PEERS, 1.0, "<= faster peer", 7) for case in LAYER_CASES),
    # LayerNorm and RMSNorm forward against the bandwidth floor
    ("layernorm", BN, FLOOR, 2.0, "<= 2x floor (goal 1.5x)", 7),
    ("rmsnorm", BN, FLOOR, 2.0, "<= 2x floor (goal 1.5x)", 7),
    # GroupNorm (the bullet covers the forward and the forward+backward rows)
    ("groupnorm", BN, FLAX, 0.6, "<= 0.6x flax.nnx", 7),
    ("grad_groupnorm", BN, FLAX, 0.6, "<= 0.6x flax.nnx", 7),
    # `use_fast_variance=True`: at most flax.nnx's (one-pass, its default) time
    *((case, BN_FAST, FLAX, 1.0, "<= flax.nnx", 7) for case in VARIANCE_CASES),
    # like for like, no limit: brainnorm's default against the peers' two-pass variance
    *((case, BN, TWO_PASS_PEERS, None, "like for like: vs faster two-pass peer", 7) for case in VARIANCE_CASES),
    ("masked_layernorm", BN_MASKED, BN_UNMASKED, 1.3, "<= 1.3x brainnorm unmasked", 7),
    ("masked_layernorm", BN_MASKED, PEERS, None, "vs faster peer (masked)", 7),
    ("padded_layernorm", BN_PADDED, BN_UNMASKED, 1.1, "<= 1.1x brainnorm unmasked", 7),
    ("padded_layernorm", BN_PADDED, PEERS, None, "vs faster peer (padding mask)", 7),
    ("sim_loop", BN, SCAN, 1.1, "<= 1.1x hand-written scan", 7),
    ("sim_loop", BN, BST, None, "vs brainstate.nn", 7),
    ("compile", BN, FLAX, 1.0, "<= flax.nnx", 8),
    ("compile", BN, BST, None, "vs brainstate.nn", 8),
    ("jaxpr_equations", BN, FLAX, None, "vs flax.nnx", 8),
    ("jaxpr_equations", BN, BST, None, "vs brainstate.nn", 8),
    ("hlo_instructions", BN, FLAX, None, "vs flax.nnx", 8),
    ("hlo_instructions", BN, BST, None, "vs brainstate.nn", 8),
    ("memory", BN, FLAX, 1.0, "<= flax.nnx", 8),
    ("memory", BN_MASKED, FLAX_MASKED, 1.0, "<= flax.nnx (masked)", 8),
    # SPEC 7: each training step at most 1.0x both peers
    ("e2e_convnet", BN, FLAX, 1.0, "<= flax.nnx", 7),
    ("e2e_convnet", BN, BST, 1.0, "<= brainstate.nn", 7),
    ("e2e_snn", BN, FLAX, 1.0, "<= flax.nnx", 7),
    ("e2e_snn", BN, BST, 1.0, "<= brainstate.nn", 7),
)
TARGETS = tuple(sorted(_TARGETS, key=lambda t: CASES.index(t[0])))  # in the order of the cases (stable)

# the row each case's "vs ref" column divides by (besides flax.nnx and the
# floor); a row of a variant ("brainnorm (masked)") is divided by the
# reference's row of the same variant where there is one
REFERENCE_ROW = {
    **{case: BST for case in (*LAYER_CASES, "compile", "jaxpr_equations", "hlo_instructions", "memory",
                              "e2e_convnet", "e2e_snn")},
    "masked_layernorm": BN_UNMASKED,
    "padded_layernorm": BN_UNMASKED,
    "sim_loop": SCAN,
}


# ---------------------------------------------------------------------------
# rows and targets
# ---------------------------------------------------------------------------
def peer_row(name, base, names):
    """The ``base`` row a row is compared with: the one of the same variant ("flax.nnx (masked)"), else ``base``."""
    variant = name[name.index(" ("):] if " (" in name else ""
    return base + variant if variant and base + variant in names else base


def flax_peer(name, names):
    """The flax.nnx row a row is compared with (``peer_row`` with flax.nnx)."""
    return peer_row(name, FLAX, names)


def summarize(case, impls, shape_note, unit="ms", rounds=0):
    """The rows of one case: statistics of every implementation and its ratios to flax.nnx, the floor, the reference."""
    values = {}
    for impl in impls:
        if unit == "ms" and impl.samples:
            values[impl.name] = harness.sample_stats(impl.samples)["median_ms"]
        elif unit != "ms" and impl.value is not None:
            values[impl.name] = impl.value
    blocks = {impl.name: impl.block_medians for impl in impls}
    floor_name = next((k for k in values if k.startswith(FLOOR)), None)
    ref_name = REFERENCE_ROW.get(case)
    rows = []
    for impl in impls:
        v = values.get(impl.name)
        flax_name = flax_peer(impl.name, values)
        ref = peer_row(impl.name, ref_name, values) if ref_name else None
        ran = impl.samples if unit == "ms" else impl.value is not None
        row = {
            "case": case,
            "title": TITLES[case],
            "shape": shape_note,
            "impl": impl.name,
            "status": impl.status if impl.status != "ok" or ran else "error",
            "note": impl.note,
            "unit": unit,
            "value": v,
            **(harness.sample_stats(impl.samples) if unit == "ms" else {"median_ms": None}),
            **({"details": impl.details} if unit != "ms" else {}),
            "n_runs": len(impl.samples),
            "rounds": rounds,
            "block_medians_ms": [None if b is None else b * 1e3 for b in blocks[impl.name]],
            "first_call_s": impl.first_call_s,
            "check_error": impl.error,
            "check_failed": impl.check_failed,
            "versus_flax": flax_name,
            "ratio_flax": (v / values[flax_name]) if v is not None and flax_name in values else None,
            "ratio_floor": (v / values[floor_name]) if v is not None and floor_name and case != "floor" else None,
            "reference": ref,
            "ratio_ref": (v / values[ref]) if v is not None and ref in values else None,
            "samples_ms": [s * 1e3 for s in impl.samples],
        }
        rows.append(row)
    return rows


def error_row(case, shape_note, exc):
    """The row of a case that failed before its implementations ran."""
    return {"case": case, "title": TITLES[case], "shape": shape_note, "impl": "(case)", "status": "error",
            "note": f"{type(exc).__name__}: {exc}"[:300], "unit": None, "value": None, "median_ms": None,
            "ratio_flax": None, "ratio_floor": None, "reference": None, "ratio_ref": None,
            "block_medians_ms": [], "samples_ms": []}


def pick_denominator(case, den, by_key):
    """The row a target divides by: ``den``'s, or for a tuple the fastest (smallest value) of its rows that ran."""
    candidates = den if isinstance(den, tuple) else (den,)
    present = [by_key[(case, d)] for d in candidates if (case, d) in by_key and by_key[(case, d)]["value"]]
    return min(present, key=lambda r: r["value"]) if present else None


def evaluate_targets(rows):
    """Every target whose case ran: the ratio of medians, the per-block ratios' range, the verdict.

    A target whose denominator is a tuple of rows is evaluated against the
    fastest of them (smallest median; for untimed cases the smallest value)
    that ran; ``versus`` names it and ``candidates`` lists them all.
    """
    by_key = {(r["case"], r["impl"]): r for r in rows if r.get("value") is not None}
    cases = {r["case"] for r in rows}
    out = []
    for case, num, den, limit, label, section in TARGETS:
        if case not in cases:
            continue
        a, b = by_key.get((case, num)), pick_denominator(case, den, by_key)
        ratio = a["value"] / b["value"] if a and b else None
        ratio_min = (a["min_ms"] / b["min_ms"]
                     if a and b and a.get("min_ms") is not None and b.get("min_ms") else None)
        low, high = harness.block_ratio_range(a and a["block_medians_ms"], b and b["block_medians_ms"])
        if limit is None:
            result = "info"
        else:
            result = "n/a" if ratio is None else ("PASS" if ratio <= limit else "FAIL")
        candidates = list(den) if isinstance(den, tuple) else [den]
        out.append({
            "case": case,
            "impl": num,
            "versus": b["impl"] if b else (den if isinstance(den, str) else None),
            "candidates": candidates,
            "limit": limit,
            "label": label,
            "spec_section": section,
            "ratio": ratio,
            "ratio_min_of_medians": low,
            "ratio_block_range": None if low is None else [low, high],
            "ratio_of_min_times": ratio_min,
            "result": result,
        })
    return out


# ---------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------
def fmt(v, spec="{:.2f}"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else spec.format(v)


def fmt_value(row):
    """A row's median time or size, with its unit."""
    if row.get("value") is None:
        return "-"
    if row.get("unit") == "MiB":
        return f"{row['value']:.2f} MiB"
    if row.get("unit") == "count":
        return f"{row['value']:.0f}"
    return f"{row['value']:.3f} ms"


def fmt_target_ratio(t):
    """A target's ratio of medians; three decimals where two would show the limit itself (1.00 FAIL)."""
    close = t["ratio"] is not None and t["limit"] is not None and round(t["ratio"], 2) == t["limit"]
    return fmt(t["ratio"], "{:.3f}" if close else "{:.2f}")


def fmt_ratio(t):
    """A target's ratio of medians and, when there are several blocks, the range of the per-block ratios."""
    text = fmt_target_ratio(t)
    rng = t.get("ratio_block_range")
    if rng is not None and t["ratio"] is not None and rng[0] != rng[1]:
        text += f" ({rng[0]:.2f}-{rng[1]:.2f})"
    return text


def target_label(t):
    """A target's label; with the row it was measured against where it is the fastest of several."""
    if len(t.get("candidates", ())) > 1:
        return f"{t['label']} [{t['versus'] or 'none ran'}]"
    return t["label"]


def target_text(t, bold=False):
    verdict = t["result"] if t["limit"] is not None else ""
    if bold and verdict:
        verdict = f"**{verdict}**"
    return f"{target_label(t)}: {fmt_ratio(t)}" + (f" {verdict}" if verdict else "")


def _ref_cell(r):
    if r["ratio_ref"] is None or r["impl"] == r["reference"]:
        return "-"
    return f"{fmt(r['ratio_ref'])} ({r['reference']})"


TABLE_HEADER = ("case", "implementation", "median", "vs flax.nnx", "vs floor", "vs ref", "target (SPEC 7, 8)")


def table_lines(rows, targets):
    by_row = {}
    for t in targets:
        by_row.setdefault((t["case"], t["impl"]), []).append(target_text(t))
    body = []
    for r in rows:
        if r["status"] != "ok":
            target = f"{r['status']}: {r['note']}"
        else:
            target = "; ".join(by_row.get((r["case"], r["impl"]), []))
            if r["note"]:
                target = (target + "; " if target else "") + r["note"]
        body.append((
            f"{r['case']} {r['shape']}".strip(),
            r["impl"],
            fmt_value(r),
            fmt(r["ratio_flax"]),
            fmt(r["ratio_floor"]),
            _ref_cell(r),
            target,
        ))
    header = TABLE_HEADER
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


def target_lines(targets):
    """The targets as printed after the table: verdict, ratio of medians, min-of-medians and block range."""
    lines = ["targets (SPEC sections 7 and 8; ratio of medians, min-of-medians over blocks of rounds [range]):"]
    for t in targets:
        blocks = ""
        if t["ratio_block_range"] is not None:
            low, high = t["ratio_block_range"]
            blocks = f"   min-of-medians {low:.2f} [{low:.2f}-{high:.2f}]"
        ratio = fmt_target_ratio(t)
        lines.append(f"  {t['result']:4s}  {t['case']:18s} {t['impl']} {target_label(t)}: {ratio}{blocks}")
    return lines


def comparison_name(t):
    """What a target's ratio divides by, for a reader: the row, and why that row where it was chosen."""
    versus = t["versus"] or "none ran"
    candidates = tuple(t.get("candidates", ()))
    if candidates == tuple(PEERS):
        return f"faster peer ({versus})"
    if candidates == tuple(TWO_PASS_PEERS):
        return f"faster two-pass peer ({versus})"
    if len(candidates) > 1:
        return f"fastest of {', '.join(candidates)} ({versus})"
    return versus


def page_ratio_text(t):
    """A ratio as the documentation shows it: ``vs <row>: ratio (per-block range)``, and the project's goal.

    No verdict: the page states the goals in its text and the reader compares.
    """
    text = f"vs {comparison_name(t)}: {fmt_ratio(t)}"
    if t["limit"] is not None:
        text += f"; goal at most {t['limit']:.1f}"
    return text


def rst_table(rows, targets):
    """The result table as a reStructuredText list-table (for docs/performance.rst)."""
    by_row = {}
    for t in targets:
        by_row.setdefault((t["case"], t["impl"]), []).append(page_ratio_text(t))
    header = (*TABLE_HEADER[:-1], "ratios of medians (per-block range)")
    out = [
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 22 20 10 10 10 14 30",
        "",
        *(f"   * - {c}" if i == 0 else f"     - {c}" for i, c in enumerate(header)),
    ]
    for r in rows:
        ratios = "; ".join(by_row.get((r["case"], r["impl"]), [])) if r["status"] == "ok" else r["status"]
        cells = [f"{r['case']} {r['shape']}".strip(), r["impl"], fmt_value(r), fmt(r["ratio_flax"]),
                 fmt(r["ratio_floor"]), _ref_cell(r), ratios or ""]
        out.append(f"   * - {cells[0]}")
        out.extend(f"     - {c}".rstrip() for c in cells[1:])
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------
def git_revision():
    """The repository's commit (with "-dirty" when the work tree has changes), or None."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_results(out_dir, *, mode, config, machine, wall, rows, targets, cache):
    """Write results.json, table.rst and results.png into ``out_dir``; return the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    png_path = os.path.join(out_dir, "results.png")
    rst_path = os.path.join(out_dir, "table.rst")
    result = {
        "mode": mode,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "git_revision": git_revision(),
        "config": config,
        "machine": machine,
        "wall_time_s": wall,
        "rows": rows,
        "targets": targets,
    }
    with open(json_path, "w") as fh:
        json.dump(result, fh, indent=1)
    with open(rst_path, "w") as fh:
        fh.write(rst_table(rows, targets))
    written = [json_path]
    if plot(rows, targets, png_path, machine, cache):
        written.append(png_path)
    written.append(rst_path)
    return written


COLORS = {BN: "#1f77b4", BN_MASKED: "#1f77b4", BN_PADDED: "#1f77b4", BN_UNMASKED: "#9ecae1", BN_FAST: "#6baed6",
          FLAX: "#ff7f0e", FLAX_MASKED: "#ff7f0e", FLAX_TWO_PASS: "#fdae6b", BST: "#2ca02c", BST_MASKED: "#2ca02c",
          BST_TWO_PASS: "#a1d99b", TORCH: "#d62728", SCAN: "#8c564b", FLOOR: "#7f7f7f"}
# rows drawn in the colour and legend entry of another
LEGEND = {BN_MASKED: BN, BN_PADDED: BN, FLAX_MASKED: FLAX, BST_MASKED: BST}


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
    # limits drawn over the bar of the row they apply to: targets against one row (flax.nnx's or the floor)
    limits = {(t["case"], t["impl"], t["candidates"][0]): t["limit"] for t in targets
              if t["limit"] is not None and len(t["candidates"]) == 1}
    ok = [r for r in rows if r.get("value") is not None and r["case"] != "floor"]
    cases = [c for c in CASES if any(r["case"] == c for r in ok)]
    other = [t for t in targets if t["ratio"] is not None
             and not (len(t["candidates"]) == 1 and t["candidates"][0] in (FLAX, FLOOR, FLAX_MASKED))]
    fig, axes = plt.subplots(3, 1, figsize=(max(13.0, 0.28 * len(other)), 16),
                             gridspec_kw={"height_ratios": [1, 1, 1.7]})

    def panel(ax, key, title, impl_filter, cap):
        x0, ticks, labels, used = 0.0, [], [], {}
        for case in cases:
            rs = [r for r in ok if r["case"] == case and r[key] is not None and impl_filter(r)]
            if not rs:
                continue
            width = 0.8 / len(rs)
            for k, r in enumerate(rs):
                name = r["impl"]
                legend = LEGEND.get(name, name)
                value = r[key]
                clipped = value > cap
                color = COLORS.get(name, "#bcbd22")
                ax.bar(x0 + k * width, min(value, cap), width, color=color, hatch="//" if clipped else None)
                used.setdefault(legend, color)
                if clipped:
                    ax.text(x0 + k * width, cap * 0.97, f"{value:.1f}", ha="center", va="top", fontsize=6,
                            rotation=90, color="white", fontweight="bold")
                else:
                    ax.text(x0 + k * width, value, f"{value:.2f}", ha="center", va="bottom", fontsize=6,
                            rotation=90 if len(rs) > 5 else 0)
                # the limit of a target on exactly this ratio (this row against the bar's denominator)
                limit = limits.get((case, name, r.get("versus_flax") if key == "ratio_flax" else FLOOR))
                if limit is not None:
                    ax.hlines(limit, x0 + (k - 0.5) * width, x0 + (k + 0.5) * width, colors="red",
                              linestyles="--", linewidth=1.5)
            ticks.append(x0 + 0.4 - width / 2)
            labels.append(case)
            x0 += 1.0
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_ylim(0, cap * 1.15)
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(title + f"; bars above {cap:g} are cut (hatched)", fontsize=10)
        handles = [Patch(color=color, label=name) for name, color in used.items()]
        handles.append(Line2D([], [], color="red", linestyle="--", label="project goal"))
        ax.legend(handles=handles, fontsize=7, ncol=8, loc="upper left")

    panel(axes[0], "ratio_flax", "time (memory: bytes; counts) / flax.nnx's of the same variant "
          "(red dashes: the project's goal for that ratio)",
          lambda r: r["impl"] != FLOOR, cap=3.0)
    panel(axes[1], "ratio_floor", "time / bandwidth floor x*a+b on the same array (red dashes: goal)",
          lambda r: r["impl"] != FLOOR, cap=8.0)
    ax = axes[2]
    for k, t in enumerate(other):
        color = {"PASS": "#2ca02c", "FAIL": "#d62728"}.get(t["result"], "#7f7f7f")
        ax.bar(k, t["ratio"], 0.6, color=color)
        if t["limit"] is not None:
            ax.hlines(t["limit"], k - 0.35, k + 0.35, colors="red", linestyles="--", linewidth=1.5)
        ax.text(k, t["ratio"], f"{t['ratio']:.2f}", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(range(len(other)))
    ax.set_xticklabels([f"{t['case']}: {t['impl']} / {t['versus']}" for t in other], fontsize=6, rotation=90)
    ax.set_xlim(-0.6, max(len(other), 1) - 0.4)
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_title("other ratios (a denominator chosen among several: the fastest): bar (green: within the goal, "
                 "red: above it, grey: no goal) and the goal (red dashes)", fontsize=10)
    fig.suptitle(f"brainnorm benchmarks: {machine['cpu_model']} ({machine['cpus_available']} CPUs), "
                 f"jax {machine['jax']}, flax {machine['flax']}, torch {machine['torch']}; {cache} caches", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
