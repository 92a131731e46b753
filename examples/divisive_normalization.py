"""Divisive normalization in a ring of orientation-tuned model neurons.

A ring of ``N`` units with preferred orientations ``theta_k = k * 180 / N``
degrees is driven by gratings. A grating of orientation ``phi`` and contrast
``c`` gives unit ``k`` the linear drive (a membrane potential)

    x_k = c * A * exp(kappa * (cos(2 (theta_k - phi)) - 1))        (A in mV)

and a plaid (two superimposed gratings) the sum of the two drives. The
responses are divisively normalized over the ring (Heeger 1992; Carandini &
Heeger 2012):

    R_k = g * x_k^n / (sigma^n + sum_j w_kj x_j^n)                  (g in Hz)

The pool is untuned, as in Heeger (1992): every unit is normalized by all
orientations alike, ``w_kj = 1 / S`` with ``S = sum_j h(theta_j)^n`` (``h``
the tuning curve), so that a grating of contrast ``c`` at any orientation
contributes ``(c A)^n`` to every pool. The unit preferring the test grating
then follows the contrast-response function ``g c^n / ((sigma / A)^n +
c^n)``: its semi-saturation contrast (half of the maximum ``g``) is ``c50 =
sigma / A``. A mask grating at the orthogonal orientation hardly drives that
unit but enters its pool, so it suppresses the response to the test grating
(cross-orientation suppression): with test contrast ``c_t`` and mask
contrast ``c_m`` the ratio is close to ``(sigma^n + (c_t A)^n) / (sigma^n +
(c_t A)^n + (c_m A)^n)``.

The script computes both effects with :class:`brainnorm.DivisiveNormalization`
(static) and with :class:`brainnorm.DynamicDivisiveNormalization` (the
shunting circuit whose steady state is the same normalization, run to steady
state inside ``brainstate.transform.for_loop``), compares them with the closed
form in float64 NumPy, prints the semi-saturation contrast and the
suppression ratio next to the closed-form values, and writes a PNG with the
contrast-response curves, cross-orientation suppression, the population
response and the circuit's time course.

Usage::

    python examples/divisive_normalization.py                     # full setting
    python examples/divisive_normalization.py --quick             # reduced setting (CI), ~15 s of CPU
    python examples/divisive_normalization.py --out /tmp/dn.png
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")

import brainstate
import brainunit as u
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from brainnorm import DivisiveNormalization, DynamicDivisiveNormalization

AMPLITUDE = 10.0  # mV of drive at full contrast, preferred orientation
SIGMA = 2.0  # mV: semi-saturation contrast sigma / A = 0.2
GAIN = 60.0  # Hz
EXPONENT = 2.0
KAPPA = 2.0  # orientation tuning concentration
MASK_CONTRAST = 0.5
TAU, TAU_POOL, DT = 10.0 * u.ms, 15.0 * u.ms, 0.5 * u.ms


def tuning(delta_deg):
    """Von Mises orientation tuning (period 180 degrees), 1 at the preferred orientation."""
    return np.exp(KAPPA * (np.cos(2 * np.deg2rad(delta_deg)) - 1))


def ring(num_units):
    preferred = np.arange(num_units) * 180.0 / num_units
    pooled = np.sum(tuning(preferred) ** EXPONENT)
    weights = np.full((num_units, num_units), 1.0 / pooled)  # any grating of contrast c pools (c A)^n
    return preferred, weights


def drive(preferred, contrast, orientation=0.0, mask_contrast=0.0):
    """Linear drive (mV mantissa) of every unit: ``(len(contrast), N)``."""
    contrast = np.atleast_1d(np.asarray(contrast, np.float64))[:, None]
    test = contrast * AMPLITUDE * tuning(preferred - orientation)[None, :]
    mask = mask_contrast * AMPLITUDE * tuning(preferred - orientation - 90.0)[None, :]
    return test + mask


def closed_form(x, weights):
    """``g x^n / (sigma^n + W x^n)`` in float64."""
    energy = np.abs(x) ** EXPONENT
    return GAIN * np.sign(x) * energy / (SIGMA**EXPONENT + energy @ weights.T)


def static_response(layer, x):
    return np.asarray(layer(jnp.asarray(x, jnp.float32) * u.mV).to_decimal(u.Hz), np.float64)


def simulator(circuit, steps):
    """A compiled run of ``steps`` steps from rest: constant drive (mV mantissa) -> responses ``(steps, B, N)``."""

    @brainstate.transform.jit
    def simulate(x_mv):
        circuit.reset_state(x_mv.shape[0])
        x_q = x_mv * u.mV
        with brainstate.environ.context(dt=DT):
            return brainstate.transform.for_loop(lambda _: circuit(x_q), jnp.arange(steps))

    def run(x):
        if circuit.response is None or circuit.conductance.value.shape[0] != x.shape[0]:
            circuit.init_state(x.shape[0])  # states of this batch size, created outside the compiled function
        return np.asarray(simulate(jnp.asarray(x, jnp.float32)).to_decimal(u.Hz), np.float64)

    return run


def half_maximum_contrast(response_of_contrast, lo=0.01, hi=1.0, rounds=3, points=33):
    """Contrast at which the preferred unit responds with ``GAIN / 2``: grid refinement in log contrast.

    ``response_of_contrast`` maps an array of contrasts to the preferred
    unit's responses (monotonic); each round brackets the crossing on a grid
    and zooms in, the last round interpolates linearly in log contrast.
    """
    for _ in range(rounds):
        contrasts = np.geomspace(lo, hi, points)
        responses = response_of_contrast(contrasts)
        above = int(np.argmax(responses >= GAIN / 2))
        lo, hi = contrasts[max(above - 1, 0)], contrasts[above]
    r_lo, r_hi = response_of_contrast(np.array([lo, hi]))
    t = (GAIN / 2 - r_lo) / (r_hi - r_lo)
    return float(np.exp(np.log(lo) + t * (np.log(hi) - np.log(lo))))


def report(name, measured, expected):
    deviation = abs(measured - expected) / abs(expected)
    print(f"{name:<22s} measured {measured:.6f}  closed form {expected:.6f}  deviation {deviation:.2e}")
    return deviation


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a reduced setting that runs in seconds")
    parser.add_argument("--out", default="divisive_normalization.png", help="path of the PNG")
    args = parser.parse_args(argv)
    quick = args.quick or os.environ.get("BRAINNORM_QUICK") == "1"

    num_units = 12 if quick else 36
    steps = 600 if quick else 1200  # 300 ms (20 tau_pool) or 600 ms (40 tau_pool) of simulated time
    preferred, weights = ring(num_units)
    options = {"exponent": EXPONENT, "sigma": SIGMA * u.mV, "gain": GAIN * u.Hz, "weights": weights.astype(np.float32)}
    static = DivisiveNormalization(num_units, **options)
    circuit = DynamicDivisiveNormalization(num_units, tau=TAU, tau_pool=TAU_POOL, **options)
    simulate = simulator(circuit, steps)

    def static_preferred(contrasts):
        return static_response(static, drive(preferred, contrasts))[:, 0]

    def dynamic_preferred(contrasts):
        return simulate(drive(preferred, contrasts))[-1, :, 0]

    # contrast-response and semi-saturation contrast
    c50_expected = SIGMA / AMPLITUDE
    deviations = {
        "c50_static": report("c50_static", half_maximum_contrast(static_preferred), c50_expected),
        "c50_dynamic": report("c50_dynamic", half_maximum_contrast(dynamic_preferred), c50_expected),
    }

    # cross-orientation suppression of a test grating at c50 by an orthogonal mask
    test_alone = drive(preferred, c50_expected)
    plaid = drive(preferred, c50_expected, mask_contrast=MASK_CONTRAST)
    both = np.concatenate([test_alone, plaid])
    expected = closed_form(both, weights)[:, 0]
    ratio_expected = expected[1] / expected[0]
    static_both = static_response(static, both)[:, 0]
    dynamic_both = simulate(both)[-1, :, 0]
    deviations["suppression_static"] = report("suppression_static", static_both[1] / static_both[0], ratio_expected)
    deviations["suppression_dynamic"] = report("suppression_dynamic", dynamic_both[1] / dynamic_both[0],
                                               ratio_expected)

    # curves for the figure
    contrasts = np.geomspace(0.01, 1.0, 25 if quick else 61)
    crf_closed = closed_form(drive(preferred, contrasts), weights)[:, 0]
    crf_static = static_preferred(contrasts)
    coarse = contrasts[:: 4 if quick else 6]
    crf_dynamic = dynamic_preferred(coarse)
    masked_closed = closed_form(drive(preferred, contrasts, mask_contrast=MASK_CONTRAST), weights)[:, 0]
    masked_static = static_response(static, drive(preferred, contrasts, mask_contrast=MASK_CONTRAST))[:, 0]
    worst = max(np.max(np.abs(crf_static - crf_closed)), np.max(np.abs(masked_static - masked_closed))) / GAIN
    print(f"largest deviation of the static curves from the closed form: {worst:.2e} (relative to the gain)")
    time_contrasts = np.array([0.1, 0.2, 0.5, 1.0])
    time_course = simulate(np.concatenate([drive(preferred, time_contrasts), plaid]))
    population = closed_form(both, weights)
    population_dynamic = simulate(both)[-1]

    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    ax = axes[0, 0]
    ax.semilogx(contrasts, crf_closed, "k-", lw=1, label="closed form")
    ax.semilogx(contrasts, crf_static, "C0--", lw=2, label="DivisiveNormalization")
    ax.semilogx(coarse, crf_dynamic, "C1o", ms=5, label="DynamicDivisiveNormalization (steady state)")
    ax.axvline(c50_expected, color="0.6", ls=":")
    ax.axhline(GAIN / 2, color="0.6", ls=":")
    ax.set(xlabel="test contrast", ylabel="response of the preferred unit (Hz)",
           title=f"contrast response, c50 = sigma / A = {c50_expected:g}")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    ax.semilogx(contrasts, crf_static, "C0-", label="test alone")
    ax.semilogx(contrasts, masked_static, "C3-", label=f"test + orthogonal mask (c = {MASK_CONTRAST:g})")
    ax.semilogx(contrasts, masked_closed, "k:", lw=1, label="closed form")
    ax.set(xlabel="test contrast", ylabel="response of the preferred unit (Hz)",
           title=f"cross-orientation suppression: ratio {ratio_expected:.3f} at c50")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    ax.plot(preferred, population[0], "C0-", label="test alone (closed form)")
    ax.plot(preferred, population[1], "C3-", label="test + mask (closed form)")
    ax.plot(preferred, population_dynamic[0], "C0o", ms=4, label="circuit, steady state")
    ax.plot(preferred, population_dynamic[1], "C3o", ms=4)
    ax.set(xlabel="preferred orientation (deg); test at 0, mask at 90", ylabel="response (Hz)",
           title="population response")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    t_ms = (np.arange(steps) + 1) * float(DT.to_decimal(u.ms))
    for k, c in enumerate(time_contrasts):
        ax.plot(t_ms, time_course[:, k, 0], f"C{k}-", label=f"c = {c:g}")
        ax.axhline(closed_form(drive(preferred, c), weights)[0, 0], color=f"C{k}", ls=":", lw=1)
    ax.plot(t_ms, time_course[:, -1, 0], "k--", label=f"c = {c50_expected:g} + mask")
    ax.set(xlabel="time (ms)", ylabel="response of the preferred unit (Hz)",
           title=f"circuit time course (tau = {TAU}, tau_pool = {TAU_POOL})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return deviations


if __name__ == "__main__":
    main()
