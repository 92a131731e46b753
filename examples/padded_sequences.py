"""Masked normalization of padded variable-length sequences.

A batch of sequences of different lengths is padded at the end to a common
length ``T`` and run through a ``brainstate.nn.GRUCell``; the GRU outputs
``(B, T, H)`` are normalized with a boolean mask ``(B, T, 1)`` that marks the
valid steps:

* :class:`brainnorm.LayerNorm` ``(H)``: statistics per position, so the valid
  outputs trivially equal those of each sequence normalized alone;
* :class:`brainnorm.BatchNorm1d` ``((T, H))``: statistics per channel over
  batch and time. With the mask they are the statistics of the
  **concatenation of the valid steps of all sequences** -- padding never
  enters them.

The script computes everything a second way, without padding: each sequence
goes through the GRU alone, the valid steps are concatenated, their mean and
variance are taken in float64 NumPy, and the reference outputs come from
those statistics (and from :class:`brainnorm.BatchNorm0d` applied to the
concatenation). It then overwrites the padded positions with garbage (``1e6``
in the GRU input and in the normalized features) and checks that no valid
output changes. The maximum absolute differences are printed, and a PNG shows
one channel of the normalized sequences and the differences.

Usage::

    python examples/padded_sequences.py
    python examples/padded_sequences.py --out /tmp/padded.png

``run(seed)`` returns the differences as a dict; the tests call it.
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")

import brainstate  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import brainnorm  # noqa: E402

LENGTHS = (7, 3, 5, 1, 6)  # valid steps of each sequence
T_MAX = 8                  # padded length (longer than every sequence)
N_IN = 3                   # input features
HIDDEN = 16                # GRU units
GARBAGE = 1e6              # value written into padded positions


def run_gru(cell, x):
    """Run ``cell`` over ``x`` of shape ``(B, T, N_IN)``; returns ``(B, T, HIDDEN)``."""
    cell.init_state(batch_size=x.shape[0])
    outputs = brainstate.transform.for_loop(cell, jnp.swapaxes(x, 0, 1))  # time-major loop
    return jnp.swapaxes(outputs, 0, 1)


def _random_affine(layer, rng):
    """Non-trivial scale and bias, so the comparison does not rely on 1 and 0."""
    value = layer.weight.value
    layer.weight.value = {
        "scale": jnp.asarray(rng.uniform(0.5, 2.0, np.shape(value["scale"])), value["scale"].dtype),
        "bias": jnp.asarray(rng.normal(size=np.shape(value["bias"])), value["bias"].dtype),
    }


def run(seed: int = 0, *, lengths=LENGTHS, t_max: int = T_MAX, return_arrays: bool = False) -> dict:
    """Compare masked normalization of padded sequences with the unpadded computation.

    Returns a dict of maximum absolute differences (all expected to be at
    float32 rounding level, <= 1e-5); with ``return_arrays=True`` the arrays
    used for the plot are added under the key ``'arrays'``.
    """
    lengths = tuple(int(n) for n in lengths)
    if max(lengths) > t_max:
        raise ValueError(f"every length must be <= t_max={t_max}, got {lengths}")
    rng = np.random.RandomState(seed)
    batch = len(lengths)
    brainstate.random.seed(seed)

    # -- data: sequences of different lengths, zero-padded to t_max -------------
    sequences = [rng.normal(size=(n, N_IN)).astype(np.float32) for n in lengths]
    x = np.zeros((batch, t_max, N_IN), np.float32)
    valid = np.zeros((batch, t_max), bool)
    for b, seq in enumerate(sequences):
        x[b, : len(seq)] = seq
        valid[b, : len(seq)] = True
    mask = jnp.asarray(valid[:, :, None])  # (B, T, 1): broadcasts over the channels
    x_garbage = np.where(valid[:, :, None], x, np.float32(GARBAGE))

    # -- layers -----------------------------------------------------------------
    cell = brainstate.nn.GRUCell(N_IN, HIDDEN)
    layer_norm = brainnorm.LayerNorm(HIDDEN)
    # momentum=0: after one training call the running statistics *are* the batch statistics
    batch_norm = brainnorm.BatchNorm1d((t_max, HIDDEN), momentum=0.0)
    _random_affine(layer_norm, rng)
    _random_affine(batch_norm, rng)

    # -- padded, masked computation ---------------------------------------------
    @brainstate.transform.jit
    def padded_forward(x_padded):
        h = run_gru(cell, x_padded)                # (B, T, H)
        h_garbage = jnp.where(mask, h, GARBAGE)    # garbage directly in the padded features
        with brainstate.environ.context(fit=True):
            return h, layer_norm(h, mask=mask), batch_norm(h, mask=mask), \
                layer_norm(h_garbage, mask=mask), batch_norm(h_garbage, mask=mask)

    # garbage in the padded GRU input first, clean data last (running statistics of clean data)
    _, _, bn_garbage_in, _, _ = padded_forward(jnp.asarray(x_garbage))
    h, ln, bn, ln_garbage, bn_garbage = padded_forward(jnp.asarray(x))
    # momentum=0 and the clean call last: the running statistics are its masked batch statistics
    batch_mean = np.asarray(batch_norm.running_mean.value).reshape(HIDDEN)
    batch_var = np.asarray(batch_norm.running_var.value).reshape(HIDDEN)

    # -- reference: every sequence alone, no padding, no mask ---------------------
    cell.init_state(batch_size=1)
    step = brainstate.transform.jit(cell)          # one GRU step of a single sequence

    def gru_alone(seq):
        cell.reset_state(batch_size=1)
        return np.stack([np.asarray(step(jnp.asarray(x_t[None])))[0] for x_t in seq])

    h_alone = [gru_alone(seq) for seq in sequences]               # (n, H) each
    split = np.cumsum(lengths)[:-1]
    concat = np.concatenate(h_alone, axis=0)                       # (sum(lengths), H), valid steps only
    # LayerNorm is per position: normalizing the concatenation is normalizing each sequence alone
    ln_alone = np.split(np.asarray(layer_norm(jnp.asarray(concat))), split, axis=0)
    concat64 = concat.astype(np.float64)
    ref_mean = concat64.mean(axis=0)
    ref_var = concat64.var(axis=0)
    scale = np.asarray(batch_norm.weight.value["scale"], np.float64).reshape(HIDDEN)
    bias = np.asarray(batch_norm.weight.value["bias"], np.float64).reshape(HIDDEN)
    ref_bn = [(hs - ref_mean) / np.sqrt(ref_var + batch_norm.epsilon) * scale + bias for hs in h_alone]
    # the same with a plain BatchNorm0d over the concatenated valid steps
    bn0 = brainnorm.BatchNorm0d(HIDDEN, momentum=0.0)
    bn0.weight.value = {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
    with brainstate.environ.context(fit=True):
        bn0_alone = np.split(np.asarray(bn0(jnp.asarray(concat))), split, axis=0)

    # -- differences on the valid steps --------------------------------------------
    def valid_diff(padded, alone):
        padded = np.asarray(padded, np.float64)
        return float(max(np.max(np.abs(padded[b, :n] - alone[b])) for b, n in enumerate(lengths)))

    def padded_valid_diff(a, b):
        diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        return float(np.max(diff[valid]))

    diffs = {
        "gru_vs_alone": valid_diff(h, h_alone),
        "layernorm_vs_alone": valid_diff(ln, ln_alone),
        "batchnorm_mean_vs_concat": float(np.max(np.abs(batch_mean - ref_mean))),
        "batchnorm_var_vs_concat": float(np.max(np.abs(batch_var - ref_var))),
        "batchnorm_vs_concat": valid_diff(bn, ref_bn),
        "batchnorm_vs_batchnorm0d_concat": valid_diff(bn, bn0_alone),
        "batchnorm0d_stats_vs_concat": float(max(
            np.max(np.abs(np.asarray(bn0.running_mean.value, np.float64) - ref_mean)),
            np.max(np.abs(np.asarray(bn0.running_var.value, np.float64) - ref_var)),
        )),
        "layernorm_garbage_padding": padded_valid_diff(ln, ln_garbage),
        "batchnorm_garbage_padding": padded_valid_diff(bn, bn_garbage),
        "batchnorm_garbage_gru_input": padded_valid_diff(bn, bn_garbage_in),
    }
    # padded outputs stay finite even with garbage there (flax-compatible transform)
    diffs["nonfinite_outputs"] = float(sum(int(np.sum(~np.isfinite(np.asarray(a))))
                                           for a in (ln_garbage, bn_garbage, bn_garbage_in)))
    if return_arrays:
        # for contrast: the same BatchNorm1d without the mask (padding enters the statistics)
        unmasked = brainnorm.BatchNorm1d((t_max, HIDDEN), momentum=0.0)
        unmasked.weight.value = batch_norm.weight.value
        with brainstate.environ.context(fit=True):
            bn_unmasked = unmasked(h)
        diffs["arrays"] = dict(valid=valid, bn=np.asarray(bn), bn_garbage=np.asarray(bn_garbage),
                               ref_bn=ref_bn, lengths=lengths,
                               unmasked_vs_concat=valid_diff(bn_unmasked, ref_bn))
    return diffs


def plot(diffs, out):
    arrays = diffs["arrays"]
    values = {k: v for k, v in diffs.items() if k not in ("arrays", "nonfinite_outputs")}
    fig, (ax_seq, ax_diff) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw=dict(width_ratios=(1, 1.2)))
    channel = 0
    for b, n in enumerate(arrays["lengths"]):
        color = f"C{b}"
        steps = np.arange(n)
        ax_seq.plot(steps, arrays["bn"][b, :n, channel], "-", color=color, label=f"length {n}")
        ax_seq.plot(steps, arrays["bn_garbage"][b, :n, channel], "x", color=color, ms=7)
        ax_seq.plot(steps, arrays["ref_bn"][b][:, channel], "o", mfc="none", color=color, ms=9)
    ax_seq.plot([], [], "x", color="k", label="garbage (1e6) padding")
    ax_seq.plot([], [], "o", mfc="none", color="k", label="unpadded reference")
    ax_seq.set_xlabel("time step (valid steps only)")
    ax_seq.set_ylabel(f"BatchNorm1d output, channel {channel}")
    ax_seq.set_title("Masked BatchNorm1d over batch and time")
    ax_seq.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    ax_seq.grid(True, alpha=0.3)

    names = list(values)
    floor = 1e-12  # exact zeros drawn at the floor of the log scale
    ax_diff.barh(names, [max(values[k], floor) for k in names], color="C0")
    ax_diff.axvline(1e-5, color="C3", ls="--", label="tolerance 1e-5")
    ax_diff.set_xscale("log")
    ax_diff.set_xlim(floor / 2, 1e-3)
    ax_diff.set_xlabel("max |difference| on valid steps (0 drawn at 1e-12)")
    ax_diff.set_title("Padded + mask vs unpadded")
    ax_diff.tick_params(axis="y", labelsize=7)
    ax_diff.legend(fontsize=8)
    ax_diff.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="padded_sequences.png", help="path of the PNG to write")
    p.add_argument("--quick", action="store_true", help="accepted for uniformity; the example is always quick")
    args = p.parse_args(argv)
    diffs = run(args.seed, return_arrays=True)
    print(f"GRU({N_IN} -> {HIDDEN}) over {len(LENGTHS)} sequences of lengths {LENGTHS}, padded to {T_MAX}, "
          f"mask (B, T, 1)")
    print()
    print(f"{'comparison (valid steps)':<36s}{'max |diff|':>12s}")
    print("-" * 48)
    for name, value in diffs.items():
        if name != "arrays":
            print(f"{name:<36s}{value:>12.3g}")
    print()
    print(f"for contrast, BatchNorm1d without the mask (zero padding in the statistics): "
          f"{diffs['arrays']['unmasked_vs_concat']:.3g}")
    worst = max(v for k, v in diffs.items() if k != "arrays")
    print("all equal within 1e-5" if worst <= 1e-5 else f"LARGEST DIFFERENCE {worst:.3g} EXCEEDS 1e-5")
    plot(diffs, args.out)
    print(f"plot written to {args.out}")
    return diffs


if __name__ == "__main__":
    main()
