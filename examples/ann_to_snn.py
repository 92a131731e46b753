"""Convert a trained ReLU network to a spiking network by data-based normalization.

A ReLU MLP with BatchNorm, ``64 -> H -> H -> 10``
(``Linear -> BatchNorm0d -> ReLU`` twice, then ``Linear -> ReLU``), is trained on
scikit-learn's digits (8x8 images, pixels scaled to [0, 1]), split per seed
into train / validation / test (60 / 20 / 20 %, stratified). The epoch with
the best validation accuracy is kept (the test set is not looked at until the
end). Then, for deployment as a spiking network:

1. each BatchNorm is folded into its ``Linear`` with
   :func:`brainnorm.fold_batch_norm` (evaluation mode, running statistics);
2. the post-ReLU activations of every layer are recorded on the training data
   (:func:`brainnorm.record_activations`), and the layers are rescaled with
   :func:`brainnorm.normalize_for_conversion`, ``W' = W lam_{l-1} / lam_l``,
   ``b' = b / lam_l``, with ``lam_l`` the maximum (``percentile=100``, Diehl et
   al. 2015) or the 99.99th percentile (Rueckauer et al. 2017) of layer ``l``'s
   activations and ``lam_0 = 1`` (the largest pixel value);
3. every ReLU becomes a layer of integrate-and-fire neurons (no leak,
   threshold 1, reset by subtraction), simulated for ``T`` steps::

       V_l <- V_l + W_l' s_{l-1} + b_l'
       s_l  = (V_l >= 1)
       V_l <- V_l - s_l

   The input is not rate-coded: the normalized image is a constant input
   current of the first layer at every step (``s_0 = x``). The output layer is
   spiking too, and the predicted class is the one with the most output
   spikes in ``T`` steps (ties go to the lowest class index, so with no output
   spike at all the prediction is class 0).

The spiking network's test accuracy is measured at every ``T`` up to the
largest, and the script prints a table (mean and standard deviation over
seeds) and writes a PNG of the test accuracy against ``T`` for both
normalizations beside the ANN's test accuracy.

Usage::

    python examples/ann_to_snn.py                 # full setting: 5 seeds, T up to 256
    python examples/ann_to_snn.py --quick         # reduced setting (CI)
    python examples/ann_to_snn.py --seeds 0 1 2 3 4 --out /tmp/ann_to_snn.png
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial

import matplotlib

matplotlib.use("Agg")

import brainstate
import braintools
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import brainnorm


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------
def load_data(seed: int):
    """Digits split into train / validation / test (60 / 20 / 20 %, stratified), pixels in [0, 1]."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel values are 0..16
    y = digits.target.astype(np.int32)
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.4, random_state=seed, stratify=y)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest)
    return x_train, y_train, x_val, y_val, x_test, y_test


# --------------------------------------------------------------------------
# the ReLU network
# --------------------------------------------------------------------------
class MLP(brainstate.nn.Module):
    """``Linear -> BatchNorm0d -> ReLU`` twice, then ``Linear -> ReLU`` (every layer is followed by ReLU)."""

    def __init__(self, n_in: int, hidden: int, n_out: int):
        super().__init__()
        self.fc1 = brainstate.nn.Linear(n_in, hidden)
        # momentum=0.9 (PyTorch's 0.1): running statistics settle within an epoch of this small data set
        self.bn1 = brainnorm.BatchNorm0d(hidden, momentum=0.9)
        self.fc2 = brainstate.nn.Linear(hidden, hidden)
        self.bn2 = brainnorm.BatchNorm0d(hidden, momentum=0.9)
        self.fc3 = brainstate.nn.Linear(hidden, n_out)

    def update(self, x):
        h = jax.nn.relu(self.bn1(self.fc1(x)))
        h = jax.nn.relu(self.bn2(self.fc2(h)))
        # the trained network ends with ReLU too, as the spiking output layer can only fire at rates >= 0;
        # the loss reads the logits before it
        return self.fc3(h)

    def folded_layers(self):
        """The weight layers with BatchNorm folded in (running statistics): ``[fc1', fc2', fc3]``."""
        return [
            brainnorm.fold_batch_norm(self.fc1, self.bn1),
            brainnorm.fold_batch_norm(self.fc2, self.bn2),
            self.fc3,
        ]


def cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def relu_network(layers, x):
    """``relu(layer_L(... relu(layer_1(x))))``: the ANN as converted."""
    for layer in layers:
        x = jax.nn.relu(layer(x))
    return x


def train(data, *, hidden, epochs, batch_size, lr, seed):
    """Train the MLP; returns it with the weights of the epoch of best validation accuracy."""
    x_train, y_train, x_val, y_val = data[:4]
    brainstate.random.seed(seed)
    model = MLP(x_train.shape[1], hidden, 10)
    weights = model.states(brainstate.ParamState)
    optimizer = braintools.optim.Adam(lr=lr)
    optimizer.register_trainable_weights(weights)

    def loss_fn(xb, yb):
        return cross_entropy(model(xb), yb)

    @brainstate.transform.jit
    def train_step(xb, yb):
        with brainstate.environ.context(fit=True):  # batch statistics; running statistics updated
            grads, loss = brainstate.transform.grad(loss_fn, grad_states=weights, return_value=True)(xb, yb)
        optimizer.update(grads)
        return loss

    @brainstate.transform.jit
    def accuracy(xs, ys):
        with brainstate.environ.context(fit=False):  # running statistics
            return jnp.mean(jnp.argmax(model(xs), axis=-1) == ys)

    rng = np.random.RandomState(seed)
    n_batches = len(x_train) // batch_size  # drop the ragged tail: one compiled shape
    states = model.states()
    best_acc, best_epoch, best_values = -1.0, 0, None
    for epoch in range(1, epochs + 1):
        perm = rng.permutation(len(x_train))
        for b in range(n_batches):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            train_step(x_train[idx], y_train[idx])
        val_acc = float(accuracy(x_val, y_val))
        if val_acc > best_acc:  # model selection on the validation set only
            best_acc, best_epoch = val_acc, epoch
            best_values = {key: state.value for key, state in states.items()}
    for key, state in states.items():
        state.value = best_values[key]
    return model, best_epoch, best_acc


# --------------------------------------------------------------------------
# the spiking network
# --------------------------------------------------------------------------
def simulate(layers, x, num_steps):
    """Integrate-and-fire network of ``layers`` driven by the constant current ``x`` for ``num_steps`` steps.

    Returns the cumulative output spike counts after every step, ``(num_steps, B, n_out)``.
    """
    weights = [layer.weight.value["weight"] for layer in layers]
    biases = [
        layer.weight.value.get("bias", jnp.zeros(w.shape[-1], w.dtype))
        for layer, w in zip(layers, weights, strict=True)
    ]
    return _simulate(weights, biases, x, num_steps)


@partial(jax.jit, static_argnums=3)  # the weights are arguments: one compilation for every normalization
def _simulate(weights, biases, x, num_steps):
    def step(carry, _):
        potentials, counts = carry
        spikes = x  # constant input current
        new_potentials = []
        for w, b, v in zip(weights, biases, potentials, strict=True):
            v = v + spikes @ w + b
            spikes = (v >= 1.0).astype(v.dtype)
            new_potentials.append(v - spikes)  # reset by subtraction
        counts = counts + spikes
        return (new_potentials, counts), counts

    potentials = [jnp.zeros((x.shape[0], w.shape[1]), x.dtype) for w in weights]
    counts = jnp.zeros((x.shape[0], weights[-1].shape[1]), x.dtype)
    _, history = jax.lax.scan(step, (potentials, counts), None, length=num_steps)
    return history


@jax.jit
def _accuracies(history, labels):
    """Test accuracy after every step from cumulative spike counts ``(T, B, C)``."""
    return jnp.mean(jnp.argmax(history, axis=-1) == labels[None, :], axis=-1)


def run_seed(seed, args):
    data = load_data(seed)
    x_train, _, _, _, x_test, y_test = data
    t0 = time.perf_counter()
    model, best_epoch, val_acc = train(
        data, hidden=args.hidden, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed
    )
    layers = model.folded_layers()
    x_test_j = jnp.asarray(x_test)
    with brainstate.environ.context(fit=False):
        ann_logits = model(x_test_j)
    ann_pred = jnp.argmax(ann_logits, axis=-1)
    ann_acc = float(jnp.mean(ann_pred == y_test))
    folded_same = float(jnp.mean(jnp.argmax(relu_network(layers, x_test_j), axis=-1) == ann_pred))
    # activations on the training data; one scale per layer, so only one layer's activations are held at a time
    result = {
        "seed": seed,
        "epoch": best_epoch,
        "val_acc": val_acc,
        "ann_acc": ann_acc,
        "folded_same_prediction": folded_same,
        "snn": {},
        "scales": {},
    }
    for percentile in args.percentiles:
        scales = brainnorm.record_activations(layers, jnp.asarray(x_train), percentile=percentile)
        normalized = brainnorm.normalize_for_conversion(layers, scales, percentile=percentile, input_scale=1.0)
        history = simulate(normalized, x_test_j, max(args.steps))
        accs = np.asarray(_accuracies(history, jnp.asarray(y_test)))
        result["snn"][str(percentile)] = {str(t): float(accs[t - 1]) for t in args.steps}
        result["scales"][str(percentile)] = [float(s) for s in scales]
    result["seconds"] = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------
def _label(percentile):
    return "max" if percentile == 100 else f"p{percentile:g}"


def summarize(results, args):
    """``{label: (means, stds)}`` over seeds for each normalization, and the ANN's (mean, std)."""
    ann = np.array([r["ann_acc"] for r in results])
    curves = {}
    for percentile in args.percentiles:
        accs = np.array([[r["snn"][str(percentile)][str(t)] for t in args.steps] for r in results])
        curves[_label(percentile)] = (accs.mean(axis=0), accs.std(axis=0, ddof=1) if len(results) > 1 else 0 * accs[0])
    return (ann.mean(), ann.std(ddof=1) if len(results) > 1 else 0.0), curves


def print_table(results, args):
    (ann_mean, ann_std), curves = summarize(results, args)
    print()
    print(f"test accuracy (%), mean ± std over {len(results)} seed(s); ANN: {100 * ann_mean:.2f} ± {100 * ann_std:.2f}")
    header = f"{'T':>5s}" + "".join(f"{'SNN ' + label:>18s}" for label in curves)
    print(header)
    print("-" * len(header))
    for i, t in enumerate(args.steps):
        cells = "".join(f"{100 * m[i]:>11.2f} ± {100 * s[i]:<5.2f}" for m, s in curves.values())
        print(f"{t:>5d}{cells}")
    print(f"{'ANN':>5s}" + f"{100 * ann_mean:>11.2f} ± {100 * ann_std:<5.2f}" * len(curves))
    print()
    t_max = str(args.steps[-1])
    print(f"per seed at T={t_max} (SNN - ANN, points):")
    for r in results:
        diffs = ", ".join(
            f"{_label(p)} {100 * (r['snn'][str(p)][t_max] - r['ann_acc']):+.2f}" for p in args.percentiles
        )
        scales = "; ".join(
            f"{_label(p)} " + "/".join(f"{s:.3g}" for s in r["scales"][str(p)]) for p in args.percentiles
        )
        print(
            f"  seed {r['seed']}: ANN {100 * r['ann_acc']:.2f} (epoch {r['epoch']}, validation "
            f"{100 * r['val_acc']:.2f}); {diffs}; layer scales {scales}; folded = unfolded predictions on "
            f"{100 * r['folded_same_prediction']:.1f}% of test; {r['seconds']:.1f} s"
        )
    print()
    # what the numbers say, computed from them: the gap at the largest T, and how soon each normalization
    # is within 1 point of the ANN on every seed
    for p in args.percentiles:
        gaps = np.array([[r["snn"][str(p)][str(t)] - r["ann_acc"] for t in args.steps] for r in results])
        within = [t for t, column in zip(args.steps, gaps.T, strict=True) if np.all(np.abs(column) <= 0.01)]
        first = f"from T={within[0]} on" if within and all(t in within for t in args.steps if t >= within[0]) else ""
        print(
            f"{_label(p):>7s}: SNN - ANN at T={t_max}: {100 * gaps[:, -1].mean():+.2f} points on average "
            f"(per seed {', '.join(f'{100 * g:+.2f}' for g in gaps[:, -1])}); within 1 point of the ANN on every "
            f"seed {first or 'at ' + (', '.join(f'T={t}' for t in within) or 'no T')}"
        )
    print()


def plot(results, args, out):
    (ann_mean, ann_std), curves = summarize(results, args)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    steps = np.array(args.steps)
    for label, (means, stds) in curves.items():
        name = "max normalization" if label == "max" else f"{label[1:]}th-percentile normalization"
        ax.errorbar(steps, 100 * means, yerr=100 * stds, marker="o", capsize=3, label=f"SNN, {name}")
    ax.axhline(100 * ann_mean, color="k", linestyle="--", label=f"ANN ({100 * ann_mean:.1f}%)")
    ax.axhspan(100 * (ann_mean - ann_std), 100 * (ann_mean + ann_std), color="k", alpha=0.1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps)
    ax.set_xticklabels([str(t) for t in steps])
    ax.set_xlabel("simulation time T (steps)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(
        f"ReLU MLP 64-{args.hidden}-{args.hidden}-10 on digits, converted to IF neurons\n"
        f"(mean ± std over {len(results)} seeds)",
        fontsize=10,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="reduced setting for CI (also: environment variable BRAINNORM_QUICK=1)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2 3 4, quick 0)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 40, quick 10)")
    p.add_argument("--hidden", type=int, default=None, help="hidden units per layer (default 128, quick 64)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--steps", type=int, nargs="+", default=None, help="simulation times T (default 1 2 4 ... 256, quick 1 4 16 64)"
    )
    p.add_argument(
        "--percentiles",
        type=float,
        nargs="+",
        default=[100.0, 99.99],
        help="normalization percentiles (100 is the maximum)",
    )
    p.add_argument("--out", default="ann_to_snn.png", help="path of the PNG to write")
    p.add_argument("--json", default=None, help="also write the per-seed results to this JSON file")
    args = p.parse_args(argv)
    quick = args.quick or os.environ.get("BRAINNORM_QUICK", "").strip().lower() in ("1", "true", "yes")
    args.seeds = args.seeds or ([0] if quick else [0, 1, 2, 3, 4])
    args.epochs = args.epochs or (10 if quick else 40)
    args.hidden = args.hidden or (64 if quick else 128)
    args.steps = sorted(args.steps or ([1, 4, 16, 64] if quick else [2**k for k in range(9)]))
    args.quick = quick
    return args


def main(argv=None):
    args = parse_args(argv)
    print(
        f"digits, 60/20/20 train/validation/test; ReLU MLP 64-{args.hidden}-{args.hidden}-10 with BatchNorm, "
        f"{args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}; seeds {args.seeds}; "
        f"IF neurons (threshold 1, reset by subtraction), constant input current" + (" (quick)" if args.quick else "")
    )
    results = [run_seed(seed, args) for seed in args.seeds]
    print_table(results, args)
    plot(results, args, args.out)
    print(f"plot written to {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "percentiles": args.percentiles, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
