"""The examples run end to end in their reduced setting, and their tables say what they claim.

``examples/snn_digits.py`` and ``examples/train_digits.py`` run as scripts
(``--quick``) in a subprocess; their tables must list every seed, a mean and
a standard deviation that agree with the per-seed values, and accuracies well
above chance (0.1 for ten digits); model selection must use the validation
split. ``examples/padded_sequences.py`` is imported from its path and its
equality checks are asserted.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TOLERANCE = 1e-5
SEEDS = (0, 1, 2)
NUMBER = r"([0-9]+\.[0-9]+)"


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"brainnorm_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_quick(script, out):
    """Run ``examples/<script> --quick --out <out>``; return its standard output."""
    env = dict(os.environ, BRAINNORM_QUICK="1", MPLBACKEND="Agg", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert out.is_file() and out.stat().st_size > 0
    return proc.stdout


def seed_table(stdout, variants, seeds=SEEDS):
    """Rows ``variant  acc(seed 0) ... acc(seed n)  mean +- std  rest...``: {variant: (accs, mean, std, rest)}."""
    header = re.search(r"^variant\s+(seed \d+\s+)+", stdout, re.MULTILINE)
    assert header is not None, f"no table header in:\n{stdout}"
    assert re.findall(r"seed (\d+)", header.group(0)) == [str(s) for s in seeds], header.group(0)
    rows = {}
    accs_pattern = r"\s+".join([NUMBER] * len(seeds))
    for variant in variants:
        row = re.search(rf"^{variant}\s+{accs_pattern}\s+{NUMBER} \+- {NUMBER}(.*)$", stdout, re.MULTILINE)
        assert row is not None, f"no result row for {variant!r} in:\n{stdout}"
        values = row.groups()
        accs = np.array(values[: len(seeds)], dtype=float)
        mean, std = float(values[len(seeds)]), float(values[len(seeds) + 1])
        rows[variant] = (accs, mean, std, values[-1])
    return rows


def check_statistics(rows):
    """The printed mean and (sample) standard deviation are those of the printed per-seed values."""
    for variant, (accs, mean, std, _) in rows.items():
        assert np.all((accs >= 0.0) & (accs <= 1.0)), (variant, accs)
        assert mean == pytest.approx(accs.mean(), abs=2e-4), (variant, accs, mean)
        assert std == pytest.approx(accs.std(ddof=1), abs=2e-4), (variant, accs, std)


def test_snn_digits_quick(tmp_path):
    stdout = run_quick("snn_digits.py", tmp_path / "snn_digits.png")
    assert re.search(r"\d+ train / \d+ validation / 450 test samples", stdout), stdout
    assert "highest validation accuracy" in stdout and "best acc" not in stdout
    rows = seed_table(stdout, ("none", "tdbn", "tebn", "bntt"))
    check_statistics(rows)
    for variant, (accs, _, _, rest) in rows.items():
        # every seed well above chance (0.1); the quick setting reaches 0.73 to 0.86
        assert accs.min() >= 0.5, f"{variant}: test accuracy per seed {accs} is too close to chance (0.1)"
        # rest: validation accuracy (mean +- std), selected epoch, firing rate (mean +- std), time
        rate = re.search(rf"\s+{NUMBER} \+- {NUMBER}\s+{NUMBER}\s+{NUMBER} \+- {NUMBER}", rest)
        assert rate is not None, rest
        firing = float(rate.group(4))
        assert 0.0 < firing < 1.0, f"{variant}: firing rate {firing}"
    # one sentence per normalized variant, each with a verdict that follows from the per-seed numbers
    for variant in ("tdbn", "tebn", "bntt"):
        line = re.search(
            rf"^{variant}: test accuracy ([+-][0-9.]+) \+- ([0-9.]+) points vs none.*: (.*)$", stdout, re.MULTILINE
        )
        assert line is not None, stdout
        diffs = rows[variant][0] - rows["none"][0]
        clear = (np.all(diffs > 0) or np.all(diffs < 0)) and abs(diffs.mean()) > diffs.std(ddof=1)
        assert line.group(3).startswith("within the seed spread") != clear, (line.group(0), diffs)


def test_train_digits_quick(tmp_path):
    stdout = run_quick("train_digits.py", tmp_path / "train_digits.png")
    assert re.search(r"\d+ train / \d+ validation / 450 test samples", stdout), stdout
    rows = seed_table(stdout, ("none", "batchnorm", "layernorm"))
    check_statistics(rows)
    for variant, (accs, _, _, _) in rows.items():
        assert accs.min() >= 0.6, f"{variant}: test accuracy per seed {accs}"


def test_quick_accuracy_checks_can_fail():
    """The table parser rejects a table whose mean does not match its seeds."""
    table = "variant  seed 0  seed 1  seed 2\nnone  0.5000  0.6000  0.7000  0.9000 +- 0.1000  x\n"
    rows = seed_table(table, ("none",))
    with pytest.raises(AssertionError):
        check_statistics(rows)


@pytest.fixture(scope="module")
def padded_sequences():
    return _load_example("padded_sequences")


def test_padded_sequences_script(padded_sequences, tmp_path):
    out = tmp_path / "padded.png"
    diffs = padded_sequences.main(["--out", str(out)])
    assert out.is_file() and out.stat().st_size > 0
    arrays = diffs.pop("arrays")
    assert diffs, "no comparison made"
    bad = {name: value for name, value in diffs.items() if not value <= TOLERANCE}
    assert not bad, f"padded + mask differs from the unpadded computation: {bad}"
    # without the mask the zero padding does change the BatchNorm outputs
    assert arrays["unmasked_vs_concat"] > 1e-2


def test_padded_sequences_other_lengths(padded_sequences):
    diffs = padded_sequences.run(seed=1, lengths=(2, 8, 4, 1), t_max=9)
    bad = {name: value for name, value in diffs.items() if not value <= TOLERANCE}
    assert not bad, f"padded + mask differs from the unpadded computation: {bad}"
