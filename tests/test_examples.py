"""The examples run end to end in their reduced setting.

``examples/snn_digits.py`` runs as a script (``--quick``) in a subprocess;
``examples/padded_sequences.py`` is imported from its path and its equality
checks are asserted.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TOLERANCE = 1e-5


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"brainnorm_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def padded_sequences():
    return _load_example("padded_sequences")


def test_snn_digits_quick(tmp_path):
    out = tmp_path / "snn_digits.png"
    env = dict(os.environ, BRAINNORM_QUICK="1", MPLBACKEND="Agg", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "snn_digits.py"), "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert out.is_file() and out.stat().st_size > 0
    # the results table has one row per variant: name, test accuracy, best accuracy, firing rate, ...
    for variant in ("none", "tdbn", "tebn", "bntt"):
        row = re.search(rf"^{variant}\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)", proc.stdout, re.MULTILINE)
        assert row is not None, f"no result row for {variant!r} in:\n{proc.stdout}"
        accuracy, _, rate = map(float, row.groups())
        assert accuracy > 0.2, f"{variant}: test accuracy {accuracy} is near chance (0.1)"
        assert 0.0 < rate < 1.0, f"{variant}: firing rate {rate}"


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
