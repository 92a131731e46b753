"""``examples/deep_snn.py`` runs end to end in its reduced setting (``--quick``) in a subprocess."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("none", "tdbn", "tebn", "bntt", "tab", "mpbn")


def test_deep_snn_quick(tmp_path):
    out = tmp_path / "deep_snn.png"
    env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "deep_snn.py"), "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert out.is_file() and out.stat().st_size > 0
    # one row per variant: name, test accuracy, best accuracy, mean rate, last block's rate, loss, time
    for variant in VARIANTS:
        row = re.search(rf"^{variant}\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)", proc.stdout, re.MULTILINE)
        assert row is not None, f"no result row for {variant!r} in:\n{proc.stdout}"
        accuracy, best, rate, _ = map(float, row.groups())
        assert 0.0 <= accuracy <= best <= 1.0
        assert 0.0 <= rate < 1.0, f"{variant}: firing rate {rate}"
    assert "folded predictions identical: yes" in proc.stdout, proc.stdout
