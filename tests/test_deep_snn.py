"""``examples/deep_snn.py`` runs end to end in its reduced setting (``--quick``) in a subprocess.

The quick setting (3 blocks) must leave every variant, the one without
normalization included, well above chance (0.1); the table must list every
seed with a mean and a standard deviation that agree with them; the firing
rates must be strictly between 0 and 1 after training; without normalization
the deeper blocks are silent at initialization while every normalized block
fires; and the folded networks must predict what the trained ones do.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("none", "tdbn", "tebn", "bntt", "tab", "mpbn")
SEEDS = (0, 1, 2)
NUMBER = r"([0-9]+\.[0-9]+)"
PM = rf"{NUMBER} \+- {NUMBER}"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deep_snn") / "deep_snn.png"
    env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "deep_snn.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert out.is_file() and out.stat().st_size > 0
    return proc.stdout


def _rows(stdout):
    header = re.search(r"^variant\s+(seed \d+\s+)+", stdout, re.MULTILINE)
    assert header is not None, stdout
    assert re.findall(r"seed (\d+)", header.group(0)) == [str(s) for s in SEEDS]
    rows = {}
    for variant in VARIANTS:
        # accuracy per seed, test acc mean +- std, val acc, rate at init (last block), rate (mean), rate (last block)
        pattern = rf"^{variant}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{PM}\s+{PM}\s+{PM}\s+{PM}\s+{PM}"
        row = re.search(pattern, stdout, re.MULTILINE)
        assert row is not None, f"no result row for {variant!r} in:\n{stdout}"
        rows[variant] = np.array(row.groups(), dtype=float)
    return rows


def test_deep_snn_quick_table(quick_run):
    assert "train / " in quick_run and " validation / 450 test samples" in quick_run
    assert "64-3x32(LIF)-10" in quick_run, "the quick setting uses 3 blocks of 32"
    for variant, row in _rows(quick_run).items():
        accs, mean, std = row[:3], row[3], row[4]
        assert mean == pytest.approx(accs.mean(), abs=2e-4) and std == pytest.approx(accs.std(ddof=1), abs=2e-4)
        # above chance (0.1) by a clear margin on every seed; normalized variants reach about 0.9
        floor = 0.3 if variant == "none" else 0.7
        assert accs.min() >= floor, f"{variant}: test accuracy per seed {accs}"
        rate_init_last, rate_mean, rate_last = row[7], row[9], row[11]
        assert 0.0 < rate_mean < 1.0 and 0.0 < rate_last < 1.0, f"{variant}: rates {rate_mean} {rate_last}"
        if variant == "none":
            assert rate_init_last == 0.0, "without normalization the last block is silent at initialization"
        else:
            assert 0.05 < rate_init_last < 1.0, f"{variant}: rate of the last block at initialization"


def test_deep_snn_quick_verdicts(quick_run):
    rows = _rows(quick_run)
    line = re.search(
        r"without normalization vs the best normalization \((\w+)\): test accuracy ([+-][0-9.]+) "
        r"\+- ([0-9.]+) points .*, (.*)$",
        quick_run,
        re.MULTILINE,
    )
    assert line is not None, quick_run
    best = line.group(1)
    assert best == max((v for v in VARIANTS if v != "none"), key=lambda v: rows[v][3])
    diffs = rows["none"][:3] - rows[best][:3]
    assert float(line.group(2)) == pytest.approx(100 * diffs.mean(), abs=0.051)
    assert line.group(4) == "behind it on every seed"
    assert "folded predictions identical: yes" in quick_run
    assert "identical on 3 of 3 seeds" in quick_run
