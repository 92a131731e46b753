"""A deep spiking network on scikit-learn's digits: what temporal normalization is for.

The network stacks ``depth`` (default 8) hidden blocks ``Linear -> [norm] ->
LIF`` of ``width`` neurons, run for ``T`` time steps, then a ``Linear``
read-out of the last spikes averaged over time. Each 8x8 image (pixels scaled
to [0, 1]) is the constant input current of the first block at every step.
The weights start from PyTorch's default initialization of ``nn.Linear``
(uniform in +-1/sqrt(fan_in)), which shrinks the signal from block to block.
Six variants are compared:

* ``none`` -- no normalization;
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
(running statistics).

Protocol. The digits are split once (``--data-seed``, stratified) into a test
set (25 %) and a training set, of which 20 % is held out for validation. For
every seed (``--seeds``, default 0 1 2) and variant the network is trained;
the seed fixes the initial weights (the same for every variant) and the
mini-batch order. The states of the epoch with the highest validation
accuracy are kept and that model alone is evaluated on the test set. The table
gives the test accuracy of every seed, the mean and the sample standard
deviation (``std``, ``ddof=1``) over seeds, and the firing rate per block
twice: at initialization (one forward pass in training mode, i.e. with batch
statistics, on the validation set; no state is changed) and after training
(test set, evaluation mode). The figure shows the validation accuracy per
epoch (mean +- std band) and both firing-rate profiles (mean +- std over
seeds). A gap between two variants is called a gap only when every seed agrees
on its sign and the mean of the per-seed differences exceeds their standard
deviation.

What the rates show (full setting, seeds 0 1 2): at initialization the network
without normalization loses its spikes from block to block -- the first block
fires about 0.02 spikes per neuron per step and every deeper block is silent --
and it stays at chance (0.10) for the whole run, while every normalized network
keeps every block firing at initialization (at least 0.14) and trains to 0.93
to 0.97 test accuracy. The rates "after training" are those of the selected
model (the epoch with the highest validation accuracy); for a network that
never leaves chance that is an early epoch. A network without normalization
that does train fires more, not less, than the normalized ones after training:
in the quick setting (3 blocks) its trained rates are the highest of all
variants. So the "spikes thin out" effect is one of initialization, and the
figure shows both profiles. Differences among the normalized variants are
printed with their seed spread; most are within it.

Afterwards the normalizations are folded away for deployment:
``fold_batch_norm`` merges each tdBN into the weights and biases of its
``Linear``, ``fold_threshold`` turns each MPBN into a per-neuron threshold and
sign, and the folded networks' test predictions are compared with the
unfolded ones, for every seed.

The quick setting (``--quick``) uses 3 blocks of 32 instead of 8 of 64 and 4
epochs, so that the network without normalization also learns within the run
(well above the chance level 0.1, though behind the normalized networks): it
checks that every variant trains and that folding is exact; the full setting is
the one that shows the effect of depth.

Usage::

    python examples/deep_snn.py                 # full setting, seeds 0 1 2 (several minutes on 2 cores)
    python examples/deep_snn.py --quick         # reduced setting (CI)
    python examples/deep_snn.py --depth 12 --seeds 0 1 2 3 4 --out /tmp/deep.png
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
from _seeds import band, compare, mean_std, rule
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import brainnorm
from brainnorm import TemporalAccumulatedBatchNorm, fold_batch_norm, fold_threshold

VARIANTS = ("none", "tdbn", "tebn", "bntt", "tab", "mpbn")
CHANCE = 0.1  # ten balanced classes


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------
def load_data(seed: int = 0, test_size: float = 0.25, val_size: float = 0.2):
    """Digits, pixels in [0, 1], split (stratified, fixed seed) into train / validation / test.

    Returns ``(x_train, y_train, x_val, y_val, x_test, y_test)``.
    """
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_size, random_state=seed, stratify=y_rest
    )
    return x_train, y_train, x_val, y_val, x_test, y_test


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
        for layer, norm, neuron in zip(self.layers, self.norms, self.neurons, strict=False):
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
        for layer, norm, neuron in zip(model.layers, model.norms, model.neurons, strict=False):
            if norm is not None:
                layer = fold_batch_norm(layer, norm)
            self.layers.append(layer)
            if neuron.membrane_norm is not None:
                self.thresholds.append(fold_threshold(neuron.membrane_norm, neuron.v_th))
            else:
                self.thresholds.append((jnp.asarray(neuron.v_th), jnp.asarray(1.0)))

    def update(self, inputs):
        spikes = inputs
        for layer, (threshold, sign) in zip(self.layers, self.thresholds, strict=False):
            current = layer(spikes)

            def step(v, i, threshold=threshold, sign=sign):
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
class Trainer:
    """One variant: a model, its optimizer and compiled steps, trained once per seed.

    The compiled functions are built once and reused across seeds: for every
    seed the model's states are overwritten with those of a freshly built model
    (``brainstate.random.seed(seed)``) and the optimizer's with their initial values.
    """

    def __init__(self, norm, n_in, args):
        self.norm = norm
        self.args = args
        self.n_in = n_in
        T = args.steps
        self.model = model = DeepSNN(n_in, args.width, 10, args.depth, T, norm)
        weights = model.states(brainstate.ParamState)  # running statistics are not ParamStates
        self.optimizer = optimizer = braintools.optim.Adam(lr=args.lr)
        optimizer.register_trainable_weights(weights)
        self.opt_initial = {
            path: state.value
            for path, state in brainstate.graph.states(optimizer).items()
            if not isinstance(state, brainstate.ParamState)
        }

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

        @brainstate.transform.jit
        def probe(xs):
            with brainstate.environ.context(fit=True):  # batch statistics, as in the first training step
                _, rates = model(encode(xs))
            return rates

        self.train_step, self.evaluate, self.probe = train_step, evaluate, probe

    def reinitialize(self, seed):
        brainstate.random.seed(seed)  # the same initial weights for every variant
        fresh = DeepSNN(self.n_in, self.args.width, 10, self.args.depth, self.args.steps, self.norm).states()
        for path, state in self.model.states().items():
            state.value = fresh[path].value
        optimizer_states = brainstate.graph.states(self.optimizer)
        for path, value in self.opt_initial.items():
            optimizer_states[path].value = value

    def reset_neurons(self):
        # back to the training batch shape: a jitted function is traced again when a state it reads
        # changes shape, and evaluation gave the membrane potentials another batch size
        for neuron in self.model.neurons:
            neuron.reset_state(self.args.batch_size)

    def run(self, seed, data):
        """Train from ``seed``; select the epoch on the validation set; test that model once."""
        x_train, y_train, x_val, y_val, x_test, y_test = data
        args = self.args
        self.reinitialize(seed)
        states = self.model.states()
        # firing rates at initialization; the running statistics this pass updates are put back
        before = {path: state.value for path, state in states.items()}
        rates_init = np.asarray(self.probe(x_val))
        for path, value in before.items():
            states[path].value = value
        rng = np.random.RandomState(seed)  # the same mini-batches for every variant
        n_batches = len(x_train) // args.batch_size
        history = {"train_loss": [], "val_acc": [], "rates_init": rates_init}
        best_acc, best_values = -1.0, None
        t0 = time.perf_counter()
        bar = tqdm(range(args.epochs), desc=f"{self.norm:>5s} seed {seed}", unit="epoch", leave=False)
        for _ in bar:
            self.reset_neurons()
            perm = rng.permutation(len(x_train))
            losses = [self.train_step(x_train[idx], y_train[idx])
                      for idx in (perm[b * args.batch_size:(b + 1) * args.batch_size] for b in range(n_batches))]
            predictions, _ = self.evaluate(x_val)
            history["train_loss"].append(float(jnp.mean(jnp.stack(losses))))
            history["val_acc"].append(float(np.mean(np.asarray(predictions) == y_val)))
            if history["val_acc"][-1] > best_acc:  # model selection on the validation set
                best_acc = history["val_acc"][-1]
                best_values = {path: state.value for path, state in states.items()}
            bar.set_postfix(loss=f"{history['train_loss'][-1]:.3f}", val_acc=f"{history['val_acc'][-1]:.3f}")
        bar.close()
        for path, value in best_values.items():  # the selected model
            states[path].value = value
        predictions, rates = self.evaluate(x_test)
        history["predictions"] = np.asarray(predictions)
        history["test_acc"] = float(np.mean(history["predictions"] == y_test))
        history["rates"] = np.asarray(rates)
        history["best_val_acc"] = best_acc
        history["best_epoch"] = int(np.argmax(history["val_acc"])) + 1
        history["seconds"] = time.perf_counter() - t0
        history["folded_identical"] = deploy(self.model, history["predictions"], x_test)
        self.reset_neurons()
        return history


def deploy(model, predictions, x_test):
    """Fold the normalizations away; whether the test predictions are unchanged (None: not foldable)."""
    if model.norm_name in ("none", "tebn", "bntt", "tab"):
        return None  # per-step statistics or weights would need one folded layer per time step
    folded = FoldedSNN(model)
    inputs = jnp.broadcast_to(jnp.asarray(x_test), (model.num_steps,) + x_test.shape)
    folded_predictions = np.asarray(jax.jit(lambda v: jnp.argmax(folded(v), axis=-1))(inputs))
    return bool(np.array_equal(folded_predictions, predictions))


# --------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------
def print_table(results, seeds, depth, n_test):
    seed_cols = "".join(f"{f'seed {s}':>9s}" for s in seeds)
    header = (f"{'variant':<9s}{seed_cols}{'test acc mean +- std':>23s}{'val acc':>17s}"
              f"{f'rate init (block {depth})':>22s}{'rate (mean)':>17s}{f'rate (block {depth})':>17s}{'time (s)':>10s}")
    print()
    print(header)
    print("-" * len(header))
    for name, runs in results.items():
        test = [r["test_acc"] for r in runs]
        m, s = mean_std(test)
        vm, vs = mean_std([r["best_val_acc"] for r in runs])
        im, is_ = mean_std([r["rates_init"][-1] for r in runs])
        rm, rs = mean_std([r["rates"].mean() for r in runs])
        lm, ls = mean_std([r["rates"][-1] for r in runs])
        print(f"{name:<9s}{''.join(f'{a:>9.4f}' for a in test)}{f'{m:.4f} +- {s:.4f}':>23s}"
              f"{f'{vm:.4f} +- {vs:.4f}':>17s}{f'{im:.3f} +- {is_:.3f}':>22s}{f'{rm:.3f} +- {rs:.3f}':>17s}"
              f"{f'{lm:.3f} +- {ls:.3f}':>17s}{sum(r['seconds'] for r in runs):>10.1f}")
    print(f"test acc: the model of the epoch with the highest validation accuracy, on the {n_test} test images; "
          f"mean +- sample std (ddof=1) over seeds {' '.join(map(str, seeds))}")
    print("rate: spikes per hidden neuron per time step; 'init': at initialization (batch statistics, validation "
          "set), the others after training (test set; mean over blocks, and the last block)")


def summarize(results):
    """Sentences that say only what the per-seed numbers support."""
    lines = []
    if "none" in results:
        init = np.mean([r["rates_init"] for r in results["none"]], axis=0)
        lines.append("without normalization, firing rate per block at initialization (mean over seeds): "
                     + " ".join(f"{r:.3f}" for r in init))
        normalized = {k: v for k, v in results.items() if k != "none"}
        if normalized:
            lowest = min(float(np.min([r["rates_init"] for r in runs])) for runs in normalized.values())
            lines.append(f"with normalization, the lowest firing rate of any block at initialization: {lowest:.3f}")
            base = [r["test_acc"] for r in results["none"]]
            best = max(normalized, key=lambda k: np.mean([r["test_acc"] for r in normalized[k]]))
            mean, std, clear = compare(base, [r["test_acc"] for r in normalized[best]])
            what = (f"{'behind' if mean < 0 else 'ahead of'} it on every seed" if clear
                    else "a difference within the seed spread")
            lines.append(f"without normalization vs the best normalization ({best}): test accuracy "
                         f"{100 * mean:+.1f} +- {100 * std:.1f} points (per-seed differences, mean +- std), {what}")
            for name, runs in normalized.items():
                if name == best:
                    continue
                mean, std, clear = compare([r["test_acc"] for r in runs], [r["test_acc"] for r in normalized[best]])
                what = "lower on every seed" if clear else "within the seed spread"
                lines.append(f"{name} vs {best}: {100 * mean:+.1f} +- {100 * std:.1f} points, {what}")
    lines.append(rule(len(next(iter(results.values())))))
    return lines


def plot(results, out, title):
    fig, (ax_acc, ax_init, ax_rate) = plt.subplots(1, 3, figsize=(15, 4))
    for name, runs in results.items():
        band(ax_acc, np.arange(1, len(runs[0]["val_acc"]) + 1), [r["val_acc"] for r in runs], name)
        blocks = np.arange(1, len(runs[0]["rates"]) + 1)
        band(ax_init, blocks, [r["rates_init"] for r in runs], name, marker="o")
        band(ax_rate, blocks, [r["rates"] for r in runs], name, marker="o")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("validation accuracy")
    ax_acc.set_title("Validation accuracy (mean +- std)")
    for ax, when in ((ax_init, "at initialization"), (ax_rate, "after training")):
        ax.set_xlabel("hidden block")
        ax.set_ylabel("firing rate (spikes / neuron / step)")
        ax.set_title(f"Firing rate per block {when}")
    for ax in (ax_acc, ax_init, ax_rate):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="reduced setting for CI (also: environment variable BRAINNORM_QUICK=1)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 20, quick 4)")
    p.add_argument("--depth", type=int, default=None, help="hidden LIF blocks (default 8, quick 3)")
    p.add_argument("--width", type=int, default=None, help="neurons per block (default 64, quick 32)")
    p.add_argument("--train-samples", type=int, default=None,
                   help="use only this many training samples (default all)")
    p.add_argument("--steps", type=int, default=4, help="time steps T")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="training seeds: initial weights and batch order (default 0 1 2)")
    p.add_argument("--seed", type=int, default=None, help="a single training seed (same as --seeds SEED)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train / validation / test split")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--out", default="deep_snn.png", help="path of the PNG to write")
    args = p.parse_args(argv)
    quick = args.quick or os.environ.get("BRAINNORM_QUICK", "").strip().lower() in ("1", "true", "yes")
    if args.seed is not None:
        args.seeds = [args.seed]
    if args.epochs is None:
        args.epochs = 4 if quick else 20
    if args.depth is None:
        args.depth = 3 if quick else 8
    if args.width is None:
        args.width = 32 if quick else 64
    args.quick = quick
    return args


def main(argv=None):
    args = parse_args(argv)
    data = list(load_data(args.data_seed))
    if args.train_samples is not None:
        data[0], data[1] = data[0][:args.train_samples], data[1][:args.train_samples]
    print(
        f"digits: {len(data[0])} train / {len(data[2])} validation / {len(data[4])} test samples; "
        f"deep SNN 64-{args.depth}x{args.width}(LIF)-10, T={args.steps}, {args.epochs} epochs, "
        f"batch {args.batch_size}, Adam lr {args.lr}, seeds {' '.join(map(str, args.seeds))}"
        + (" (quick)" if args.quick else "")
    )
    results = {}
    for norm in args.variants:
        trainer = Trainer(norm, data[0].shape[1], args)
        results[norm] = [trainer.run(seed, data) for seed in args.seeds]
        accuracies = " ".join(f"{r['test_acc']:.4f}" for r in results[norm])
        print(f"{norm}: test accuracy per seed {accuracies}", flush=True)
    print_table(results, args.seeds, args.depth, len(data[4]))
    checked = {name: [r["folded_identical"] for r in runs] for name, runs in results.items()
               if runs[0]["folded_identical"] is not None}
    for name, same in checked.items():
        how = "fold_threshold" if name == "mpbn" else "fold_batch_norm"
        print(f"deployment of {name} ({how}): test predictions identical on {sum(same)} of {len(same)} seeds")
    if checked:
        print(f"folded predictions identical: {'yes' if all(all(s) for s in checked.values()) else 'no'}")
    for line in summarize(results):
        print(line)
    plot(results, args.out, f"{args.depth} hidden LIF blocks of {args.width} on scikit-learn digits "
                            f"(T={args.steps}), {len(args.seeds)} seeds")
    print(f"plot written to {args.out}")
    return results


if __name__ == "__main__":
    main()
