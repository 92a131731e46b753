"""Results over several seeds, shared by the training examples.

The digits examples (``snn_digits.py``, ``train_digits.py``, ``deep_snn.py``)
report each variant over seeds as mean and sample standard deviation, and call
a gap between two variants real only under one rule (``compare``), so that the
three scripts cannot drift apart in what they claim. Not an example itself.
"""

from __future__ import annotations

import numpy as np


def mean_std(values, axis=None):
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value), over seeds.

    With ``axis=None`` both are floats; with ``axis=0`` (seeds first) arrays.
    """
    values = np.asarray(values, dtype=float)
    n = values.shape[0] if axis == 0 else values.size
    mean = values.mean(axis=axis)
    std = values.std(axis=axis, ddof=1) if n > 1 else np.zeros_like(mean)
    if axis is None:
        return float(mean), float(std)
    return mean, std


def compare(a, b):
    """Per-seed differences ``a - b``: mean, std, and whether they exceed the seed spread.

    A gap is ``clear`` only if every seed agrees on its sign and its mean exceeds
    its standard deviation: a description of these runs, not a significance test.
    """
    diffs = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    mean, std = mean_std(diffs)
    clear = len(diffs) > 1 and (np.all(diffs > 0) or np.all(diffs < 0)) and abs(mean) > std
    return mean, std, bool(clear)


def rule(n):
    """The sentence that states ``compare``'s rule for ``n`` seeds."""
    return (f"a gap counts only if all {n} seeds agree on its sign and its mean exceeds its std; with {n} "
            f"seeds that is a description of these runs, not a significance test")


def summarize_against_none(results):
    """Sentences comparing every variant's test accuracy with ``results["none"]``, per seed."""
    lines = []
    if "none" not in results:
        return lines
    base = [r["test_acc"] for r in results["none"]]
    for name, runs in results.items():
        if name == "none":
            continue
        mean, std, clear = compare([r["test_acc"] for r in runs], base)
        verdict = (f"{'higher' if mean > 0 else 'lower'} than without normalization on every seed"
                   if clear else "within the seed spread of no normalization")
        lines.append(f"{name}: test accuracy {100 * mean:+.1f} +- {100 * std:.1f} points vs none "
                     f"(per-seed differences, mean +- std): {verdict}")
    lines.append(rule(len(base)))
    return lines


def band(ax, x, curves, label, **kwargs):
    """Plot the mean over seeds of ``curves`` (seeds, len(x)) with a band of one std; returns the colour."""
    mean, std = mean_std(curves, axis=0)
    (line,) = ax.plot(x, mean, label=label, **kwargs)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    return line.get_color()
