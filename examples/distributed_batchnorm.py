"""Synchronized BatchNorm across 4 devices with padded sequences.

Four host CPU devices each hold a batch of padded sequences ``(B, T, C)``
with a padding mask ``(B, T, 1)``. The devices hold very different numbers
of valid time steps (long recordings on one, short ones on another) and
their data have different means. With ``axis_name`` brainnorm reduces sums
and valid counts across devices, so its statistics are those of all valid
data together. flax and brainstate instead average the per-device masked
means (``pmean``), which weighs a device with a few valid steps as much as
one with thousands.

The script prints, per channel, the exact mean and variance of the
concatenated valid data (float64 NumPy), brainnorm's global statistics
(``brainnorm.functional.moments`` under ``jax.shard_map``, and the running
statistics of a ``BatchNorm1d`` trained one step under
``brainstate.transform.pmap2``), the per-device average, and the error of
each, and writes a bar chart of the errors.

Run::

    python examples/distributed_batchnorm.py [--quick] [--out distributed_batchnorm.png]

``--quick`` (or ``BRAINNORM_QUICK=1``) uses small arrays, for CI.
"""

from __future__ import annotations

import os

# 4 host devices: XLA reads this once, when JAX initializes, so before importing jax.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402

import brainstate  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

import brainnorm  # noqa: E402
from brainnorm import functional as F  # noqa: E402

NDEV = 4


def make_data(batch, steps, channels, seed=0):
    """Per-device padded sequences: unequal valid lengths and device-specific means.

    Returns ``x`` of shape ``(NDEV, batch, steps, channels)`` (float32) and a
    mask ``(NDEV, batch, steps, 1)``.
    """
    rng = np.random.default_rng(seed)
    device_mean = np.array([-65.0, -60.0, -52.0, -45.0])  # e.g. resting potentials of four sessions (mV)
    fill = np.array([1.0, 0.5, 0.15, 0.03])  # fraction of valid steps per device
    x = device_mean[:, None, None, None] + 2.0 * rng.standard_normal((NDEV, batch, steps, channels))
    x += np.linspace(0.0, 3.0, channels)  # channels differ too
    lengths = np.maximum(1, (fill[:, None] * steps * rng.uniform(0.8, 1.0, (NDEV, batch))).astype(int))
    mask = np.arange(steps)[None, None, :] < lengths[:, :, None]
    return x.astype(np.float32), mask[..., None]


def exact_statistics(x, mask):
    """Mean and variance of the valid entries of every device together (float64)."""
    valid = np.broadcast_to(mask, x.shape).reshape(-1, x.shape[-1])
    values = x.astype(np.float64).reshape(-1, x.shape[-1])
    count = valid.sum(0)
    mean = np.where(valid, values, 0).sum(0) / count
    var = np.where(valid, (values - mean) ** 2, 0).sum(0) / count
    return mean, var, count


def brainnorm_statistics(x, mask):
    """``moments`` with ``axis_name`` under ``jax.shard_map``: batch and time sharded over 4 devices."""
    mesh = Mesh(np.array(jax.devices()[:NDEV]), ("dev",))

    def local(v, m):  # v: this device's (1, B, T, C)
        mean, var = F.moments(v, axes=(0, 1, 2), mask=m, axis_name="dev")
        return mean, var  # the same on every device; returned per device

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("dev"), P("dev")), out_specs=(P("dev"), P("dev"))))
    mean, var = f(x, mask)
    mean, var = np.asarray(mean).reshape(NDEV, -1), np.asarray(var).reshape(NDEV, -1)
    assert np.all(mean == mean[0]) and np.all(var == var[0]), "devices disagree"
    return mean[0], var[0]


def layer_running_statistics(x, mask):
    """One training step of ``BatchNorm1d(axis_name=...)`` per device; momentum 0 stores the batch statistics."""
    steps, channels = x.shape[2], x.shape[3]
    bn = brainnorm.BatchNorm1d((steps, channels), axis_name="dev", momentum=0.0)

    def train(v, m):
        with brainstate.environ.context(fit=True):
            return bn(v, m)

    brainstate.transform.jit(brainstate.transform.pmap2(train, axis_name="dev"))(x, mask)
    return np.ravel(bn.running_mean.value), np.ravel(bn.running_var.value)


def per_device_average(x, mask):
    """What flax and brainstate compute: ``pmean`` of each device's masked mean and variance."""

    def local(v, m):
        m = jnp.broadcast_to(m, v.shape)
        mean = jnp.mean(v, axis=(0, 1), where=m)
        mean = jax.lax.pmean(mean, "dev")
        var = jnp.mean(jnp.square(v - mean), axis=(0, 1), where=m)
        return mean, jax.lax.pmean(var, "dev")

    mean, var = jax.pmap(local, axis_name="dev")(x, mask)
    return np.asarray(mean[0]), np.asarray(var[0])


def plot(path, exact, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    channels = np.arange(len(exact[0]))
    width = 0.8 / len(results)
    for ax, which, title in ((axes[0], 0, "mean"), (axes[1], 1, "variance")):
        for i, (label, stats) in enumerate(results.items()):
            err = np.maximum(np.abs(np.asarray(stats[which], np.float64) - exact[which]), 1e-9)
            ax.bar(channels + i * width, err, width, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("channel")
        ax.set_ylabel(f"|error of the {title}|")
        ax.set_title(f"global {title} vs. exact (float64)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small arrays (CI); also BRAINNORM_QUICK=1")
    parser.add_argument("--out", default="distributed_batchnorm.png", help="path of the PNG to write")
    args = parser.parse_args()
    quick = args.quick or os.environ.get("BRAINNORM_QUICK", "") not in ("", "0")

    if len(jax.devices()) < NDEV:
        raise SystemExit(f"needs {NDEV} devices, JAX sees {jax.devices()} (was jax imported before XLA_FLAGS was set?)")
    batch, steps, channels = (4, 20, 4) if quick else (32, 200, 8)
    x, mask = make_data(batch, steps, channels)
    valid_per_device = np.broadcast_to(mask, x.shape)[..., 0].sum(axis=(1, 2))
    print(f"{NDEV} devices, per device (B, T, C) = {x.shape[1:]}; valid time steps per device: "
          f"{valid_per_device.tolist()}")

    exact = exact_statistics(x, mask)
    results = {
        "brainnorm moments (shard_map)": brainnorm_statistics(x, mask),
        "brainnorm BatchNorm1d (pmap2)": layer_running_statistics(x, mask),
        "per-device average (flax, brainstate)": per_device_average(x, mask),
    }

    for which, name in ((0, "mean"), (1, "variance")):
        print(f"\n{name} per channel")
        print(f"  {'exact':<40}" + "".join(f"{v:11.4f}" for v in exact[which]))
        for label, stats in results.items():
            print(f"  {label:<40}" + "".join(f"{v:11.4f}" for v in np.asarray(stats[which], np.float64)))
        print("  max |error|:")
        for label, stats in results.items():
            err = np.max(np.abs(np.asarray(stats[which], np.float64) - exact[which]))
            print(f"    {label:<38} {err:.3g}")

    plot(args.out, exact, results)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
