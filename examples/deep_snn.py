"""A deep spiking network on scikit-learn's digits: what temporal normalization is for.

The network stacks ``depth`` (default 8) hidden blocks ``Linear -> [norm] ->
LIF`` of ``width`` neurons, run for ``T`` time steps, then a ``Linear``
read-out of the last spikes averaged over time. Each 8x8 image (pixels scaled
to [0, 1]) is the constant input current of the first block at every step.
Six variants are trained from the same initial weights on the same
mini-batches:

* ``none`` -- no normalization: the spikes thin out from block to block and
  the gradient that reaches the first blocks is small; a deep network trains
  badly;
* ``tdbn`` -- :class:`brainnorm.ThresholdDependentBatchNorm` of the synaptic
  currents (statistics over time and batch);
* ``tebn`` -- :class:`brainnorm.TemporalEffectiveBatchNorm` (tdBN statistics,
  a trainable weight per step);
* ``bntt`` -- :class:`brainnorm.BatchNormThroughTime` (statistics per step);
* ``tab`` -- temporal accumulated batch normalization (statistics of the steps
  so far, per-step parameters and a weight ``p_t^2``);
* ``mpbn`` -- membrane-potential batch normalization: a
  :class:`brainnorm.BatchNorm0d` inside the neuron normalizes the membrane
  potential before the spike (Guo et al., ICCV 2023).

The leaky integrate-and-fire neurons keep their membrane potential in a
``brainstate.HiddenState`` and are stepped with
``brainstate.transform.for_loop``::

    V <- decay * V + I
    s  = heaviside(V - v_th)          (MPBN: heaviside(BN(V) - v_th))
    V <- V * (1 - s)                  (hard reset, detached)

The spike has a sigmoid surrogate gradient. Training runs in
``brainstate.environ.context(fit=True)``, evaluation with ``fit=False``
(running statistics). Afterwards the normalizations are folded away for
deployment: ``fold_batch_norm`` merges each tdBN into the weights and biases
of its ``Linear``, ``fold_threshold`` turns each MPBN into a per-neuron
threshold and sign, and the folded networks' test predictions are compared
with the unfolded ones.

The script prints a table (test accuracy, firing rates, time per variant)
and writes a PNG of the test accuracy per epoch and the firing rate per block.

Usage::

    python examples/deep_snn.py                 # full setting (a few minutes on 2 cores)
    python examples/deep_snn.py --quick         # reduced setting (CI)
    python examples/deep_snn.py --depth 12 --out /tmp/deep.png
"""

from __future__ import annotations

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")

import braintools  # noqa: E402
import brainstate  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from tqdm import tqdm  # noqa: E402

import brainnorm  # noqa: E402
from brainnorm import TemporalAccumulatedBatchNorm, fold_batch_norm, fold_threshold  # noqa: E402

VARIANTS = ("none", "tdbn", "tebn", "bntt", "tab", "mpbn")


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------
def load_data(seed: int, test_size: float = 0.25):
    """Digits, split into train/test (stratified, fixed seed), pixels scaled to [0, 1]."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    return train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------
class LIF(brainstate.nn.Module):
    """Leaky integrate-and-fire neurons; with ``membrane_norm`` the potential is normalized before the spike (MPBN)."""

    def __init__(self, size, *, decay=0.5, v_th=1.0, membrane_norm=None):
        super().__init__()
        self.size = size
        self.decay = decay
        self.v_th = v_th
        self.membrane_norm = membrane_norm
        self.spike_fn = braintools.surrogate.Sigmoid(alpha=4.0)
        self.V = brainstate.HiddenState(jnp.zeros((size,)))

    def reset_state(self, batch_size):
        self.V.value = jnp.zeros((batch_size, self.size))

    def update(self, current):
        v = self.decay * self.V.value + current
        drive = v if self.membrane_norm is None else self.membrane_norm(v)  # MPBN: BN(V) before the spike
        spike = self.spike_fn(drive - self.v_th)
        self.V.value = v * (1.0 - jax.lax.stop_gradient(spike))  # hard reset, detached
        return spike


class DeepSNN(brainstate.nn.Module):
    """``depth`` blocks ``Linear -> [norm] -> LIF``, a read-out averaged over time."""

    def __init__(self, n_in, width, n_out, depth, num_steps, norm, *, v_th=1.0, decay=0.5):
        super().__init__()
        if norm not in VARIANTS:
            raise ValueError(f"norm must be one of {VARIANTS}, got {norm!r}")
        self.norm_name = norm
        self.num_steps = num_steps
        self.layers = [self._linear(n_in if i == 0 else width, width) for i in range(depth)]
        options = dict(step_mode="multi", momentum=0.9)
        self.norms = [self._norm(norm, width, num_steps, v_th, options) for _ in range(depth)]
        self.neurons = [
            LIF(width, decay=decay, v_th=v_th,
                membrane_norm=brainnorm.BatchNorm0d(width, momentum=0.9) if norm == "mpbn" else None)
            for _ in range(depth)
        ]
        self.readout = self._linear(width, n_out)

    @staticmethod
    def _linear(n_in, n_out):
        """PyTorch's default initialization of ``nn.Linear``: uniform in +-1/sqrt(fan_in)."""
        bound = 1.0 / n_in**0.5
        return brainstate.nn.Linear(n_in, n_out, w_init=brainstate.nn.init.Uniform(-bound, bound),
                                    b_init=brainstate.nn.init.Uniform(-bound, bound))

    @staticmethod
    def _norm(norm, width, num_steps, v_th, options):
        if norm == "tdbn":
            return brainnorm.ThresholdDependentBatchNorm(width, v_th=v_th, **options)
        if norm == "tebn":
            return brainnorm.TemporalEffectiveBatchNorm(width, num_steps=num_steps, **options)
        if norm == "bntt":
            return brainnorm.BatchNormThroughTime(width, num_steps=num_steps, **options)
        if norm == "tab":
            return TemporalAccumulatedBatchNorm(width, num_steps=num_steps, **options)
        return None

    def update(self, inputs):
        """``inputs``: ``(T, B, n_in)``; returns logits ``(B, n_out)`` and the firing rate of every block."""
        spikes = inputs
        rates = []
        for layer, norm, neuron in zip(self.layers, self.norms, self.neurons):
            current = layer(spikes)  # (T, B, width)
            if norm is not None:
                current = norm(current)  # multi-step: the whole window at once
            neuron.reset_state(inputs.shape[1])
            spikes = brainstate.transform.for_loop(neuron, current)
            rates.append(jnp.mean(spikes))
        logits = jnp.mean(self.readout(spikes), axis=0)
        return logits, jnp.stack(rates)


class FoldedSNN(brainstate.nn.Module):
    """The deployed network: no normalization layer left.

    tdBN is folded into the weights (``fold_batch_norm``); MPBN into per-neuron
    thresholds and signs (``fold_threshold``): ``s = heaviside(sign * (V - threshold))``.
    """

    def __init__(self, model: DeepSNN):
        super().__init__()
        self.decay = model.neurons[0].decay
        self.readout = model.readout
        self.layers = []
        self.thresholds = []
        for layer, norm, neuron in zip(model.layers, model.norms, model.neurons):
            if norm is not None:
                layer = fold_batch_norm(layer, norm)
            self.layers.append(layer)
            if neuron.membrane_norm is not None:
                self.thresholds.append(fold_threshold(neuron.membrane_norm, neuron.v_th))
            else:
                self.thresholds.append((jnp.asarray(neuron.v_th), jnp.asarray(1.0)))

    def update(self, inputs):
        spikes = inputs
        for layer, (threshold, sign) in zip(self.layers, self.thresholds):
            current = layer(spikes)

            def step(v, i):
                v = self.decay * v + i
                s = (sign * (v - threshold) >= 0).astype(v.dtype)
                return v * (1.0 - s), s

            _, spikes = jax.lax.scan(step, jnp.zeros(current.shape[1:], current.dtype), current)
        return jnp.mean(self.readout(spikes), axis=0)


def cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


# --------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------
def train_variant(norm, data, args):
    x_train, x_test, y_train, y_test = data
    T = args.steps
    brainstate.random.seed(args.seed)  # the same initial weights for every variant
    model = DeepSNN(x_train.shape[1], args.width, 10, args.depth, T, norm)
    weights = model.states(brainstate.ParamState)  # running statistics are not ParamStates
    optimizer = braintools.optim.Adam(lr=args.lr)
    optimizer.register_trainable_weights(weights)

    def encode(x):
        return jnp.broadcast_to(x, (T,) + x.shape)  # the pixels as a constant current

    def loss_fn(xb, yb):
        logits, _ = model(encode(xb))
        return cross_entropy(logits, yb)

    @brainstate.transform.jit
    def train_step(xb, yb):
        with brainstate.environ.context(fit=True):
            grads, loss = brainstate.transform.grad(loss_fn, grad_states=weights, return_value=True)(xb, yb)
        optimizer.update(grads)
        return loss

    @brainstate.transform.jit
    def evaluate(xs):
        with brainstate.environ.context(fit=False):
            logits, rates = model(encode(xs))
        return jnp.argmax(logits, axis=-1), rates

    rng = np.random.RandomState(args.seed)  # the same mini-batches for every variant
    n_batches = len(x_train) // args.batch_size
    history = {"train_loss": [], "test_acc": [], "rates": []}
    t0 = time.perf_counter()
    bar = tqdm(range(args.epochs), desc=f"{norm:>5s}", unit="epoch", leave=True)
    for _ in bar:
        perm = rng.permutation(len(x_train))
        losses = [train_step(x_train[idx], y_train[idx])
                  for idx in (perm[b * args.batch_size:(b + 1) * args.batch_size] for b in range(n_batches))]
        predictions, rates = evaluate(jnp.asarray(x_test))
        # back to the training batch shape: a jitted function is traced again when a state it reads
        # changes shape, and evaluation gave the membrane potentials the test set's batch size
        for neuron in model.neurons:
            neuron.reset_state(args.batch_size)
        history["train_loss"].append(float(jnp.mean(jnp.stack(losses))))
        history["test_acc"].append(float(np.mean(np.asarray(predictions) == y_test)))
        history["rates"].append(np.asarray(rates))
        bar.set_postfix(loss=f"{history['train_loss'][-1]:.3f}", test_acc=f"{history['test_acc'][-1]:.3f}")
    bar.close()
    history["seconds"] = time.perf_counter() - t0
    history["predictions"] = np.asarray(predictions)
    history["model"] = model
    return history


def deploy(history, x_test):
    """Fold the normalizations away; whether the test predictions are unchanged (None: not foldable)."""
    model = history["model"]
    if model.norm_name in ("none", "tebn", "bntt", "tab"):
        return None  # per-step statistics or weights would need one folded layer per time step
    folded = FoldedSNN(model)
    inputs = jnp.broadcast_to(jnp.asarray(x_test), (model.num_steps,) + x_test.shape)
    predictions = np.asarray(jax.jit(lambda v: jnp.argmax(folded(v), axis=-1))(inputs))
    return bool(np.array_equal(predictions, history["predictions"]))


# --------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------
def print_table(results, depth):
    header = (f"{'variant':<9s}{'test acc':>10s}{'best acc':>10s}{'rate (mean)':>13s}"
              f"{f'rate (block {depth})':>17s}{'train loss':>12s}{'time (s)':>10s}")
    print()
    print(header)
    print("-" * len(header))
    for name, h in results.items():
        rates = h["rates"][-1]
        print(f"{name:<9s}{h['test_acc'][-1]:>10.4f}{max(h['test_acc']):>10.4f}{rates.mean():>13.4f}"
              f"{rates[-1]:>17.4f}{h['train_loss'][-1]:>12.4f}{h['seconds']:>10.1f}")
    print("rate: spikes per hidden neuron per time step on the test set (mean over blocks, and the last block)")


def plot(results, out, title):
    fig, (ax_acc, ax_rate) = plt.subplots(1, 2, figsize=(11, 4))
    for name, h in results.items():
        ax_acc.plot(np.arange(1, len(h["test_acc"]) + 1), h["test_acc"], label=name)
        rates = h["rates"][-1]
        ax_rate.plot(np.arange(1, len(rates) + 1), rates, marker="o", label=name)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_title("Test accuracy")
    ax_rate.set_xlabel("hidden block")
    ax_rate.set_ylabel("firing rate (spikes / neuron / step)")
    ax_rate.set_title("Firing rate per block after training")
    for ax in (ax_acc, ax_rate):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="reduced setting for CI (also: environment variable BRAINNORM_QUICK=1)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per variant (default 20, quick 2)")
    p.add_argument("--depth", type=int, default=8, help="hidden LIF blocks (at least 8 shows the point)")
    p.add_argument("--width", type=int, default=None, help="neurons per block (default 64, quick 32)")
    p.add_argument("--train-samples", type=int, default=None,
                   help="use only this many training samples (default all; quick 384)")
    p.add_argument("--steps", type=int, default=4, help="time steps T")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--out", default="deep_snn.png", help="path of the PNG to write")
    args = p.parse_args(argv)
    quick = args.quick or os.environ.get("BRAINNORM_QUICK", "").strip().lower() in ("1", "true", "yes")
    if args.epochs is None:
        args.epochs = 2 if quick else 20
    if args.width is None:
        args.width = 32 if quick else 64
    if args.train_samples is None and quick:
        args.train_samples = 384
    args.quick = quick
    return args


def main(argv=None):
    args = parse_args(argv)
    data = load_data(args.seed)
    if args.train_samples is not None:
        data[0], data[2] = data[0][:args.train_samples], data[2][:args.train_samples]
    x_train, x_test = data[0], data[1]
    print(
        f"digits: {len(x_train)} train / {len(x_test)} test samples; deep SNN 64-{args.depth}x{args.width}(LIF)-10, "
        f"T={args.steps}, {args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}"
        + (" (quick)" if args.quick else "")
    )
    results = {}
    for norm in args.variants:
        results[norm] = train_variant(norm, data, args)
    print_table(results, args.depth)
    folded = {name: deploy(h, x_test) for name, h in results.items()}
    checked = {name: same for name, same in folded.items() if same is not None and name != "none"}
    for name, same in checked.items():
        how = "fold_threshold" if name == "mpbn" else "fold_batch_norm"
        print(f"deployment of {name} ({how}): test predictions {'identical' if same else 'DIFFERENT'}")
    if checked:
        print(f"folded predictions identical: {'yes' if all(checked.values()) else 'no'}")
    if "none" in results:
        normalized = {k: v["test_acc"][-1] for k, v in results.items() if k != "none"}
        if normalized:
            best = max(normalized, key=normalized.get)
            gap = normalized[best] - results["none"]["test_acc"][-1]
            print(f"without normalization: test accuracy {results['none']['test_acc'][-1]:.4f}, "
                  f"{gap:.4f} ({100 * gap:.1f} points) behind the best normalization ({best})")
    plot(results, args.out, f"{args.depth} hidden LIF blocks of {args.width} on scikit-learn digits (T={args.steps})")
    print(f"plot written to {args.out}")
    return results


if __name__ == "__main__":
    main()
