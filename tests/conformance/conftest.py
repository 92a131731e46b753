"""Prints the largest deviation seen per peer, layer and quantity."""

from __future__ import annotations

from ._common import DEVIATIONS


def pytest_terminal_summary(terminalreporter):
    if not DEVIATIONS:
        return
    terminalreporter.section("conformance: largest deviation from the peer (gradients: relative to max(1, max|peer|))")
    for (peer, layer, quantity), value in sorted(DEVIATIONS.items()):
        terminalreporter.write_line(f"{peer:<11} {layer:<34} {quantity:<22} {value:.2e}")
