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

Four variants are compared:

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

Protocol. The digits are split once (``--data-seed``, stratified) into a test
set (25 %), which is used once per run, and a training set, of which 20 % is
held out as a validation set. For every seed (``--seeds``, default 0 1 2) and
variant the network is trained on the rest; the seed fixes the initial weights
(the same for every variant), the mini-batch order and the input spike trains.
After each epoch the model is evaluated on the validation set, and the states
of the epoch with the highest validation accuracy (the earliest on a tie) are
kept; that model alone is evaluated on the test set. The table reports, per
variant, the test accuracy of every seed and their mean and sample standard
deviation (``std``, ``ddof=1``), and the figure shows the same mean +- std
(bands over epochs for the training loss and validation accuracy, error bars
for the test accuracy). A difference between two variants is called a
difference only when every seed agrees on its sign and the mean of the
per-seed differences exceeds their standard deviation; otherwise the script
says it is within the seed spread. With 3 seeds and 450 test images, one test
image is 0.22 points: read small gaps with that in mind.

Training steps run in ``brainstate.environ.context(fit=True)`` (batch
statistics, running statistics updated); evaluation runs with ``fit=False``
(running statistics).

Usage::

    python examples/snn_digits.py                  # full setting, seeds 0 1 2
    python examples/snn_digits.py --quick          # a few epochs (CI)
    BRAINNORM_QUICK=1 python examples/snn_digits.py
    python examples/snn_digits.py --seeds 0 1 2 3 4 --encoding current --out /tmp/snn.png
"""

from __future__ import annotations

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")

import brainstate
import braintools
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from _seeds import band, mean_std, summarize_against_none
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import brainnorm

VARIANTS = ("none", "tdbn", "tebn", "bntt")
CHANCE = 0.1  # ten balanced classes


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------
def load_data(seed: int = 0, test_size: float = 0.25, val_size: float = 0.2):
    """Digits, pixels scaled to [0, 1], split (stratified, fixed seed) into train / validation / test.

    Returns ``(x_train, y_train, x_val, y_val, x_test, y_test)``; the
    validation set is ``val_size`` of the data left after the test split.
    """
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel values are 0..16
    y = digits.target.astype(np.int32)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_size, random_state=seed, stratify=y_rest
    )
    return x_train, y_train, x_val, y_val, x_test, y_test


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
class Trainer:
    """One variant: a model, its optimizer and compiled steps, trained once per seed.

    The compiled functions are built once and reused across seeds: for every
    seed the model's states are overwritten with those of a freshly built
    model (``brainstate.random.seed(seed)``) and the optimizer's states with
    their initial values.
    """

    def __init__(self, norm, n_in, args):
        self.norm = norm
        self.args = args
        self.model = SNN(n_in, args.hidden, 10, args.steps, norm, v_th=args.v_th, tau=args.tau, reset=args.reset)
        weights = self.model.states(brainstate.ParamState)  # running statistics are not ParamStates
        self.optimizer = braintools.optim.Adam(lr=args.lr)
        self.optimizer.register_trainable_weights(weights)
        self.opt_initial = {
            path: state.value
            for path, state in brainstate.graph.states(self.optimizer).items()
            if not isinstance(state, brainstate.ParamState)
        }
        model, optimizer, num_steps, encoding = self.model, self.optimizer, args.steps, args.encoding

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
            return jnp.mean(jnp.argmax(logits, axis=-1) == ys), jnp.mean(spikes)

        self.train_step, self.evaluate = train_step, evaluate

    def reinitialize(self, seed):
        brainstate.random.seed(seed)  # the same initial weights for every variant
        args = self.args
        fresh = SNN(self.model.fc.in_size[-1], args.hidden, 10, args.steps, self.norm,
                    v_th=args.v_th, tau=args.tau, reset=args.reset)
        fresh_states = fresh.states()
        for path, state in self.model.states().items():
            state.value = fresh_states[path].value
        optimizer_states = brainstate.graph.states(self.optimizer)
        for path, value in self.opt_initial.items():
            optimizer_states[path].value = value

    def run(self, seed, data):
        """Train from ``seed``; select the epoch on the validation set; test that model once."""
        x_train, y_train, x_val, y_val, x_test, y_test = data
        args = self.args
        self.reinitialize(seed)
        states = self.model.states()
        rng = np.random.RandomState(seed)  # the same mini-batch order for every variant
        key = jax.random.PRNGKey(seed)  # the same input spike trains for every variant
        val_key = jax.random.PRNGKey(seed + 12345)  # fixed validation spike trains
        test_key = jax.random.PRNGKey(seed + 54321)  # fixed test spike trains
        n_batches = len(x_train) // args.batch_size  # drop the ragged tail: one compiled shape
        history = {"train_loss": [], "val_acc": []}
        best_acc, best_values = -1.0, None
        t0 = time.perf_counter()
        bar = tqdm(range(args.epochs), desc=f"{self.norm:>5s} seed {seed}", unit="epoch", leave=False)
        for _ in bar:
            # back to the training batch shape, so that the compiled train_step is reused
            # (a jitted function is compiled again when the shape of a state it reads changes)
            self.model.lif.reset_state(args.batch_size)
            perm = rng.permutation(len(x_train))
            losses = []
            for b in range(n_batches):
                idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
                key, sub = jax.random.split(key)
                losses.append(self.train_step(x_train[idx], y_train[idx], sub))
            val_acc, _ = self.evaluate(x_val, y_val, val_key)
            history["train_loss"].append(float(jnp.mean(jnp.stack(losses))))
            history["val_acc"].append(float(val_acc))
            if history["val_acc"][-1] > best_acc:  # model selection on the validation set
                best_acc = history["val_acc"][-1]
                best_values = {path: state.value for path, state in states.items()}
            bar.set_postfix(loss=f"{history['train_loss'][-1]:.4f}", val_acc=f"{history['val_acc'][-1]:.4f}")
        bar.close()
        for path, value in best_values.items():  # the selected model
            states[path].value = value
        test_acc, rate = self.evaluate(x_test, y_test, test_key)
        history["best_epoch"] = int(np.argmax(history["val_acc"])) + 1
        history["best_val_acc"] = best_acc
        history["test_acc"] = float(test_acc)
        history["rate"] = float(rate)
        history["seconds"] = time.perf_counter() - t0
        return history


# --------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------
def print_table(results, seeds, n_test):
    """Test accuracy per seed, mean +- std; validation accuracy, selected epoch and firing rate as mean +- std."""
    seed_cols = "".join(f"{f'seed {s}':>9s}" for s in seeds)
    header = (f"{'variant':<9s}{seed_cols}{'test acc mean +- std':>23s}{'val acc':>17s}"
              f"{'epoch':>8s}{'firing rate':>17s}{'time (s)':>10s}")
    print()
    print(header)
    print("-" * len(header))
    for name, runs in results.items():
        test = [r["test_acc"] for r in runs]
        cells = "".join(f"{acc:>9.4f}" for acc in test)
        m, s = mean_std(test)
        vm, vs = mean_std([r["best_val_acc"] for r in runs])
        rm, rs = mean_std([r["rate"] for r in runs])
        em = np.mean([r["best_epoch"] for r in runs])
        print(f"{name:<9s}{cells}{f'{m:.4f} +- {s:.4f}':>23s}{f'{vm:.4f} +- {vs:.4f}':>17s}"
              f"{em:>8.1f}{f'{rm:.3f} +- {rs:.3f}':>17s}{sum(r['seconds'] for r in runs):>10.1f}")
    print(f"test acc: the model of the epoch with the highest validation accuracy, on the {n_test} test images; "
          f"mean +- sample std (ddof=1) over seeds {' '.join(map(str, seeds))}")
    print("epoch: selected epoch (mean over seeds); firing rate: mean spikes per hidden neuron per time step "
          "on the test set")


def plot(results, out, title):
    fig, (ax_loss, ax_val, ax_test) = plt.subplots(1, 3, figsize=(14, 4))
    for i, (name, runs) in enumerate(results.items()):
        epochs = np.arange(1, len(runs[0]["train_loss"]) + 1)
        band(ax_loss, epochs, [r["train_loss"] for r in runs], name)
        color = band(ax_val, epochs, [r["val_acc"] for r in runs], name)
        test = [r["test_acc"] for r in runs]
        m, s = mean_std(test)
        ax_test.errorbar(i, m, yerr=s, fmt="o", color=color, ms=9, capsize=8, label=name)
        ax_test.plot(np.full(len(test), i + 0.15), test, "k.", zorder=3)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (cross-entropy)")
    ax_loss.set_title("Training loss (mean +- std)")
    ax_val.set_xlabel("epoch")
    ax_val.set_ylabel("validation accuracy")
    ax_val.set_title("Validation accuracy (mean +- std)")
    names = list(results)
    ax_test.set_xticks(range(len(names)), names)
    ax_test.set_ylabel("test accuracy of the selected epoch")
    ax_test.set_title("Test accuracy (mean +- std; dots: seeds)")
    every = [r["test_acc"] for runs in results.values() for r in runs]
    ax_test.set_xlim(-0.5, len(names) - 0.5)
    ax_test.set_ylim(max(0.0, min(every) - 0.02), min(1.0, max(every) + 0.02))
    for ax in (ax_loss, ax_val):
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_test.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="reduced setting for CI (also: environment variable BRAINNORM_QUICK=1)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 30, quick 3)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=None, help="hidden LIF neurons (default 128, quick 64)")
    p.add_argument("--steps", type=int, default=8, help="time steps T")
    p.add_argument("--encoding", choices=("current", "poisson"), default=None,
                   help="input coding (default poisson, quick current)")
    p.add_argument("--v-th", type=float, default=1.0, help="firing threshold")
    p.add_argument("--tau", type=float, default=2.0, help="membrane time constant (in steps)")
    p.add_argument("--reset", choices=("soft", "hard"), default="soft")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="training seeds: initial weights, batch order, spike trains (default 0 1 2)")
    p.add_argument("--seed", type=int, default=None, help="a single training seed (same as --seeds SEED)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train / validation / test split")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--out", default="snn_digits.png", help="path of the PNG to write")
    args = p.parse_args(argv)
    quick = args.quick or os.environ.get("BRAINNORM_QUICK", "").strip().lower() in ("1", "true", "yes")
    if args.seed is not None:
        args.seeds = [args.seed]
    if args.epochs is None:
        args.epochs = 3 if quick else 30
    if args.encoding is None:
        args.encoding = "current" if quick else "poisson"
    if args.hidden is None:
        args.hidden = 64 if quick else 128
    args.quick = quick
    return args


def main(argv=None):
    args = parse_args(argv)
    data = load_data(args.data_seed)
    print(
        f"digits: {len(data[0])} train / {len(data[2])} validation / {len(data[4])} test samples, "
        f"{data[0].shape[1]} features; SNN 64-{args.hidden}(LIF)-10, T={args.steps}, {args.encoding} input, "
        f"{args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}, seeds {' '.join(map(str, args.seeds))}"
        + (" (quick)" if args.quick else "")
    )
    results = {}
    for norm in args.variants:
        trainer = Trainer(norm, data[0].shape[1], args)
        results[norm] = [trainer.run(seed, data) for seed in args.seeds]
        test = [r["test_acc"] for r in results[norm]]
        print(f"{norm}: test accuracy per seed {' '.join(f'{a:.4f}' for a in test)}", flush=True)
    print_table(results, args.seeds, len(data[4]))
    for line in summarize_against_none(results):
        print(line)
    plot(results, args.out, f"LIF network on scikit-learn digits (T={args.steps}, {args.encoding} input), "
                            f"{len(args.seeds)} seeds: no norm vs tdBN vs TEBN vs BNTT")
    print(f"plot written to {args.out}")
    return results


if __name__ == "__main__":
    main()
