"""Static types of the public API, as a type checker sees them from user code.

pyright (basic mode, ``[tool.pyright]`` in pyproject.toml) checks
``tests/typing_cases/documented_calls.py``: the documented calls must raise no
error, and its ``typing.assert_type`` lines pin the inferred types (a layer
call is a ``jax.Array``, ``layer.weight`` a ``NormalizationParamState``, ...).

The pyright wheel bundles its engine and the ``nodejs`` extra brings node as a
wheel, so nothing is downloaded at run time; the version check against the
package index is switched off (``PYRIGHT_PYTHON_IGNORE_WARNINGS``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "typing_cases" / "documented_calls.py"

pytestmark = pytest.mark.slow

# skipped without pyright, except with BRAINNORM_REQUIRE_PEERS=1 (CI), where conftest's importorskip fails instead
pytest.importorskip("pyright", reason="pyright is not installed: pip install -e '.[test]'")


def _run_pyright(*paths: Path) -> tuple[int, dict, str]:
    env = dict(os.environ, PYRIGHT_PYTHON_IGNORE_WARNINGS="1")
    command = [sys.executable, "-m", "pyright", "--outputjson", "--pythonpath", sys.executable]
    command += [str(p) for p in paths]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"pyright did not report (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.returncode, report, proc.stderr


def _format(report: dict) -> str:
    lines = []
    for diag in report.get("generalDiagnostics", []):
        start = diag.get("range", {}).get("start", {})
        lines.append(
            f"{Path(diag.get('file', '?')).name}:{start.get('line', -1) + 1}:{start.get('character', -1) + 1}: "
            f"{diag.get('severity')}: {diag.get('message')} ({diag.get('rule', '')})"
        )
    return "\n".join(lines)


def test_documented_calls_type_check():
    returncode, report, stderr = _run_pyright(CASES)
    summary = report.get("summary", {})
    assert summary.get("filesAnalyzed", 0) >= 1, f"pyright analyzed no file:\n{stderr}"
    errors = [d for d in report.get("generalDiagnostics", []) if d.get("severity") == "error"]
    assert not errors, f"pyright reports {len(errors)} error(s) on documented calls:\n{_format(report)}"
    assert returncode == 0, f"pyright exited with {returncode}:\n{_format(report)}\n{stderr}"


def test_pyright_sees_a_wrong_type(tmp_path):
    """The check can fail: a wrong ``assert_type`` and a wrong argument are reported."""
    bad = tmp_path / "wrong_calls.py"
    bad.write_text(
        "from typing import assert_type\n"
        "import jax.numpy as jnp\n"
        "import brainnorm\n"
        "ln = brainnorm.LayerNorm(4)\n"
        "assert_type(ln(jnp.ones(4)), int)\n"
        "brainnorm.GroupNorm(8, num_groups='four')\n"
    )
    _, report, _ = _run_pyright(bad)
    errors = [d for d in report.get("generalDiagnostics", []) if d.get("severity") == "error"]
    rules = sorted(d.get("rule", "") for d in errors)
    assert rules == ["reportArgumentType", "reportAssertTypeFailure"], _format(report)
