"""Train a spiking network on scikit-learn's digits with temporal normalization.

The network is ``Linear(64, H) -> [norm] -> LIF -> Linear(H, 10)``, run for
``T`` time steps. Each 8x8 image (64 pixels scaled to [0, 1]) is presented at
every step, either as rate-coded (Bernoulli/Poisson) spikes with the pixel
value as the firing probability per step (``--encoding poisson``, the default
of the full setting) or as a constant input current (``--encoding current``,
the default of the quick setting: it compiles faster). With a constant current
the synaptic currents are the same at every step, so BNTT's per-step
statistics coincide; spike input makes them differ. The read-out ``Linear`` is
applied to the spikes of every step and averaged over time.

Four variants are trained from the same initial weights on the same
mini-batches:

* ``none`` -- no normalization,
* ``tdbn`` -- :class:`brainnorm.ThresholdDependentBatchNorm` (statistics over
  time and batch, output scaled by the firing threshold),
* ``tebn`` -- :class:`brainnorm.TemporalEffectiveBatchNorm` (tdBN statistics,
  then a trainable weight ``p_t`` per step),
* ``bntt`` -- :class:`brainnorm.BatchNormThroughTime` (statistics and scale per
  step).

All normalizations run in ``step_mode='multi'`` on the time-major
``(T, B, H)`` synaptic currents. The leaky integrate-and-fire neurons keep
their membrane potential in a ``brainstate.HiddenState`` and are stepped with
``brainstate.transform.for_loop``::

    V <- V + (-V + I) / tau
    s  = heaviside(V - v_th)        (sigmoid surrogate gradient)
    V <- V - v_th * s               (soft reset; reset='hard' sets V to 0)

Training steps run in ``brainstate.environ.context(fit=True)`` (batch
statistics, running statistics updated); evaluation runs with ``fit=False``
(running statistics). The script prints a table of the test accuracy and the
mean firing rate of the hidden neurons per variant, and writes a PNG with the
training-loss and test-accuracy curves.

Usage::

    python examples/snn_digits.py                  # full setting
    python examples/snn_digits.py --quick          # a few epochs (CI)
    BRAINNORM_QUICK=1 python examples/snn_digits.py
    python examples/snn_digits.py --encoding current --out /tmp/snn.png
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

VARIANTS = ("none", "tdbn", "tebn", "bntt")


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------
def load_data(seed: int, test_size: float = 0.25):
    """Digits, split into train/test (stratified, fixed seed), pixels scaled to [0, 1]."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel values are 0..16
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    return x_train, y_train, x_test, y_test


def encode(x, num_steps, encoding, key):
    """``(B, 64)`` pixels in [0, 1] -> ``(T, B, 64)`` input at every time step."""
    if encoding == "current":
        return jnp.broadcast_to(x, (num_steps,) + x.shape)
    # rate coding: a spike with probability equal to the pixel value, per step
    return jax.random.bernoulli(key, x, (num_steps,) + x.shape).astype(x.dtype)


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------
class LIF(brainstate.nn.Module):
    """Leaky integrate-and-fire neurons with a surrogate-gradient spike."""

    def __init__(self, size: int, *, tau: float = 2.0, v_th: float = 1.0, reset: str = "soft"):
        super().__init__()
        if reset not in ("soft", "hard"):
            raise ValueError(f"reset must be 'soft' or 'hard', got {reset!r}")
        self.size = size
        self.tau = tau
        self.v_th = v_th
        self.reset = reset
        self.spike_fn = braintools.surrogate.Sigmoid(alpha=4.0)
        self.V = brainstate.HiddenState(jnp.zeros((size,)))

    def reset_state(self, batch_size: int):
        self.V.value = jnp.zeros((batch_size, self.size))

    def update(self, current):
        v = self.V.value + (-self.V.value + current) / self.tau
        spike = self.spike_fn(v - self.v_th)
        # the reset does not carry gradient (detached reset, as in SpikingJelly)
        s = jax.lax.stop_gradient(spike)
        v = v - self.v_th * s if self.reset == "soft" else v * (1.0 - s)
        self.V.value = v
        return spike


class SNN(brainstate.nn.Module):
    """``Linear -> [temporal norm] -> LIF -> Linear`` read-out averaged over time."""

    def __init__(self, n_in, n_hidden, n_out, num_steps, norm, *, v_th=1.0, tau=2.0, reset="soft"):
        super().__init__()
        if norm not in VARIANTS:
            raise ValueError(f"norm must be one of {VARIANTS}, got {norm!r}")
        self.norm_name = norm
        self.num_steps = num_steps
        self.fc = brainstate.nn.Linear(n_in, n_hidden)
        # momentum=0.9 (PyTorch's 0.1): the running statistics settle within an
        # epoch or two of this small data set (the default 0.99 needs ~500 steps)
        options = dict(step_mode="multi", momentum=0.9)
        if norm == "tdbn":
            # normalized currents have standard deviation alpha * v_th
            self.norm = brainnorm.ThresholdDependentBatchNorm(n_hidden, v_th=v_th, **options)
        elif norm == "tebn":
            self.norm = brainnorm.TemporalEffectiveBatchNorm(n_hidden, num_steps=num_steps, **options)
        elif norm == "bntt":
            self.norm = brainnorm.BatchNormThroughTime(n_hidden, num_steps=num_steps, **options)
        else:
            self.norm = None
        self.lif = LIF(n_hidden, tau=tau, v_th=v_th, reset=reset)
        self.readout = brainstate.nn.Linear(n_hidden, n_out)

    def update(self, inputs):
        """``inputs``: ``(T, B, n_in)``; returns logits ``(B, n_out)`` and spikes ``(T, B, H)``."""
        current = self.fc(inputs)  # (T, B, H)
        if self.norm is not None:
            current = self.norm(current)  # multi-step: the whole (T, B, H) window at once
        self.lif.reset_state(inputs.shape[1])  # a fresh membrane potential per batch
        spikes = brainstate.transform.for_loop(self.lif, current)  # (T, B, H)
        logits = jnp.mean(self.readout(spikes), axis=0)
        return logits, spikes


def cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


# --------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------
def train_variant(norm, data, *, epochs, batch_size, lr, hidden, num_steps, encoding, v_th, tau, reset, seed):
    x_train, y_train, x_test, y_test = data
    brainstate.random.seed(seed)  # same initial weights for every variant
    model = SNN(x_train.shape[1], hidden, 10, num_steps, norm, v_th=v_th, tau=tau, reset=reset)
    weights = model.states(brainstate.ParamState)  # running statistics are not ParamStates
    optimizer = braintools.optim.Adam(lr=lr)
    optimizer.register_trainable_weights(weights)

    def loss_fn(inputs, labels):
        logits, _ = model(inputs)
        return cross_entropy(logits, labels)

    @brainstate.transform.jit
    def train_step(xb, yb, key):
        inputs = encode(xb, num_steps, encoding, key)
        # fit=True: batch statistics, running statistics updated
        with brainstate.environ.context(fit=True):
            grads, loss = brainstate.transform.grad(loss_fn, grad_states=weights, return_value=True)(inputs, yb)
        optimizer.update(grads)
        return loss

    @brainstate.transform.jit
    def evaluate(xs, ys, key):
        inputs = encode(xs, num_steps, encoding, key)
        # fit=False: running statistics
        with brainstate.environ.context(fit=False):
            logits, spikes = model(inputs)
        acc = jnp.mean(jnp.argmax(logits, axis=-1) == ys)
        return cross_entropy(logits, ys), acc, jnp.mean(spikes)

    x_test_j, y_test_j = jnp.asarray(x_test), jnp.asarray(y_test)
    rng = np.random.RandomState(seed)  # same mini-batch order for every variant
    key = jax.random.PRNGKey(seed)  # same input spike trains for every variant
    test_key = jax.random.PRNGKey(seed + 12345)  # fixed test spike trains
    n_batches = len(x_train) // batch_size  # drop the ragged tail: one compiled shape
    history = {"train_loss": [], "test_loss": [], "test_acc": [], "rate": []}

    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"{norm:>5s}", unit="epoch", leave=True)
    for _ in bar:
        perm = rng.permutation(len(x_train))
        losses = []
        for b in range(n_batches):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            key, sub = jax.random.split(key)
            losses.append(train_step(x_train[idx], y_train[idx], sub))
        train_loss = float(jnp.mean(jnp.stack(losses)))
        test_loss, test_acc, rate = evaluate(x_test_j, y_test_j, test_key)
        # back to the training batch shape, so that the compiled train_step is reused
        # (a jitted function is compiled again when the shape of a state it reads changes)
        model.lif.reset_state(batch_size)
        history["train_loss"].append(train_loss)
        history["test_loss"].append(float(test_loss))
        history["test_acc"].append(float(test_acc))
        history["rate"].append(float(rate))
        bar.set_postfix(loss=f"{train_loss:.4f}", test_acc=f"{float(test_acc):.4f}", rate=f"{float(rate):.3f}")
    bar.close()
    history["seconds"] = time.perf_counter() - t0
    return history


# --------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------
def print_table(results):
    header = (f"{'variant':<9s}{'test acc':>10s}{'best acc':>10s}{'firing rate':>13s}"
              f"{'test loss':>11s}{'train loss':>12s}{'time (s)':>10s}")
    print()
    print(header)
    print("-" * len(header))
    for name, h in results.items():
        print(
            f"{name:<9s}{h['test_acc'][-1]:>10.4f}{max(h['test_acc']):>10.4f}{h['rate'][-1]:>13.4f}"
            f"{h['test_loss'][-1]:>11.4f}{h['train_loss'][-1]:>12.4f}{h['seconds']:>10.1f}"
        )
    print("firing rate: mean spikes per hidden neuron per time step on the test set")
    print()


def plot(results, out, title):
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, h in results.items():
        epochs = np.arange(1, len(h["train_loss"]) + 1)
        ax_loss.plot(epochs, h["train_loss"], label=name)
        ax_acc.plot(epochs, h["test_acc"], label=f"{name} (rate {h['rate'][-1]:.2f})")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (cross-entropy)")
    ax_loss.set_title("Training loss")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_title("Test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="reduced setting for CI (also: environment variable BRAINNORM_QUICK=1)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per variant (default 30, quick 2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=None, help="hidden LIF neurons (default 128, quick 64)")
    p.add_argument("--steps", type=int, default=8, help="time steps T")
    p.add_argument("--encoding", choices=("current", "poisson"), default=None,
                   help="input coding (default poisson, quick current)")
    p.add_argument("--v-th", type=float, default=1.0, help="firing threshold")
    p.add_argument("--tau", type=float, default=2.0, help="membrane time constant (in steps)")
    p.add_argument("--reset", choices=("soft", "hard"), default="soft")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--out", default="snn_digits.png", help="path of the PNG to write")
    args = p.parse_args(argv)
    quick = args.quick or os.environ.get("BRAINNORM_QUICK", "").strip().lower() in ("1", "true", "yes")
    if args.epochs is None:
        args.epochs = 2 if quick else 30
    if args.encoding is None:
        args.encoding = "current" if quick else "poisson"
    if args.hidden is None:
        args.hidden = 64 if quick else 128
    args.quick = quick
    return args


def main(argv=None):
    args = parse_args(argv)
    data = load_data(args.seed)
    print(
        f"digits: {len(data[0])} train / {len(data[2])} test samples, {data[0].shape[1]} features; "
        f"SNN 64-{args.hidden}(LIF)-10, T={args.steps}, {args.encoding} input, {args.epochs} epochs, "
        f"batch {args.batch_size}, Adam lr {args.lr}" + (" (quick)" if args.quick else "")
    )
    results = {}
    for norm in args.variants:
        results[norm] = train_variant(
            norm, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, hidden=args.hidden,
            num_steps=args.steps, encoding=args.encoding, v_th=args.v_th, tau=args.tau, reset=args.reset,
            seed=args.seed,
        )
    print_table(results)
    plot(results, args.out, f"LIF network on scikit-learn digits (T={args.steps}, {args.encoding} input): "
                            f"no norm vs tdBN vs TEBN vs BNTT")
    print(f"plot written to {args.out}")
    return results


if __name__ == "__main__":
    main()
