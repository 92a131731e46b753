"""Train a small MLP on scikit-learn's bundled digits data set with brainnorm layers.

Three variants of the same network are trained from the same initial weights
on the same mini-batches:

* ``none``       -- no normalization,
* ``batchnorm``  -- :class:`brainnorm.BatchNorm0d` after each hidden ``Linear``,
* ``layernorm``  -- :class:`brainnorm.LayerNorm` after each hidden ``Linear``.

The digits data set (1797 grey-scale 8x8 images, 10 classes) ships with
scikit-learn, so nothing is downloaded. Inputs are standardized with the
statistics of the training split.

Training steps run with ``brainstate.environ.context(fit=True)`` (BatchNorm
uses batch statistics and updates its running statistics); evaluation runs with
``fit=False`` (BatchNorm uses its running statistics). LayerNorm behaves the
same in both modes.

The script prints a table of the final test accuracy per variant and writes a
PNG with the training-loss and test-accuracy curves.

Usage::

    python examples/train_digits.py                 # full setting
    python examples/train_digits.py --quick         # a few epochs (CI)
    BRAINNORM_QUICK=1 python examples/train_digits.py
    python examples/train_digits.py --out /tmp/digits.png
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

VARIANTS = ("none", "batchnorm", "layernorm")


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------
def load_data(seed: int, test_size: float = 0.25):
    """Digits, split into train/test (stratified, fixed seed), standardized."""
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)  # some border pixels are always 0
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
    return x_train, y_train, x_test, y_test


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------
class MLP(brainstate.nn.Module):
    """``Linear -> [norm] -> ReLU`` hidden blocks, then a ``Linear`` read-out."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int, n_layers: int, norm: str):
        super().__init__()
        if norm not in VARIANTS:
            raise ValueError(f"norm must be one of {VARIANTS}, got {norm!r}")
        self.norm = norm
        linears, norms = [], []
        size = n_in
        for _ in range(n_layers):
            linears.append(brainstate.nn.Linear(size, n_hidden))
            if norm == "batchnorm":
                # in_size is the per-sample shape: the input is (batch, n_hidden)
                norms.append(brainnorm.BatchNorm0d(n_hidden))
            elif norm == "layernorm":
                norms.append(brainnorm.LayerNorm(n_hidden))
            size = n_hidden
        self.linears = linears
        self.norms = norms
        self.readout = brainstate.nn.Linear(size, n_out)

    def update(self, x):
        for i, linear in enumerate(self.linears):
            x = linear(x)
            if self.norms:
                x = self.norms[i](x)
            x = jax.nn.relu(x)
        return self.readout(x)


def cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


# --------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------
def train_variant(norm, data, *, epochs, batch_size, lr, hidden, layers, seed, position=0):
    x_train, y_train, x_test, y_test = data
    brainstate.random.seed(seed)  # same initial weights for every variant
    model = MLP(x_train.shape[1], hidden, 10, layers, norm)
    weights = model.states(brainstate.ParamState)  # running stats are not ParamStates
    optimizer = braintools.optim.Adam(lr=lr)
    optimizer.register_trainable_weights(weights)

    def loss_fn(xb, yb):
        return cross_entropy(model(xb), yb)

    @brainstate.transform.jit
    def train_step(xb, yb):
        # fit=True: batch statistics, running statistics updated
        with brainstate.environ.context(fit=True):
            grads, loss = brainstate.transform.grad(loss_fn, weights, return_value=True)(xb, yb)
        optimizer.update(grads)
        return loss

    @brainstate.transform.jit
    def evaluate(xs, ys):
        # fit=False: running statistics (BatchNorm)
        with brainstate.environ.context(fit=False):
            logits = model(xs)
        return cross_entropy(logits, ys), jnp.mean(jnp.argmax(logits, axis=-1) == ys)

    x_test_j, y_test_j = jnp.asarray(x_test), jnp.asarray(y_test)
    rng = np.random.RandomState(seed)  # same mini-batch order for every variant
    n_batches = len(x_train) // batch_size  # drop the ragged tail: one compiled shape
    history = {"train_loss": [], "test_loss": [], "test_acc": []}

    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"{norm:>9s}", unit="epoch", position=position, leave=True)
    for _ in bar:
        perm = rng.permutation(len(x_train))
        losses = []
        for b in range(n_batches):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            losses.append(train_step(x_train[idx], y_train[idx]))
        train_loss = float(jnp.mean(jnp.stack(losses)))
        test_loss, test_acc = evaluate(x_test_j, y_test_j)
        history["train_loss"].append(train_loss)
        history["test_loss"].append(float(test_loss))
        history["test_acc"].append(float(test_acc))
        bar.set_postfix(loss=f"{train_loss:.4f}", test_acc=f"{float(test_acc):.4f}")
    bar.close()
    history["seconds"] = time.perf_counter() - t0
    return history


# --------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------
def print_table(results):
    header = f"{'variant':<12s}{'test acc':>10s}{'best acc':>10s}{'test loss':>11s}{'train loss':>12s}{'time (s)':>10s}"
    print()
    print(header)
    print("-" * len(header))
    for name, h in results.items():
        print(
            f"{name:<12s}{h['test_acc'][-1]:>10.4f}{max(h['test_acc']):>10.4f}"
            f"{h['test_loss'][-1]:>11.4f}{h['train_loss'][-1]:>12.4f}{h['seconds']:>10.1f}"
        )
    print()


def plot(results, out):
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, h in results.items():
        epochs = np.arange(1, len(h["train_loss"]) + 1)
        ax_loss.plot(epochs, h["train_loss"], label=name)
        ax_acc.plot(epochs, h["test_acc"], label=name)
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
    fig.suptitle("MLP on scikit-learn digits: no norm vs brainnorm.BatchNorm0d vs brainnorm.LayerNorm")
    fig.tight_layout()
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="reduced setting for CI (also: environment variable BRAINNORM_QUICK=1)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per variant (default 40, quick 3)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=128, help="width of the hidden layers")
    p.add_argument("--layers", type=int, default=2, help="number of hidden layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--out", default="train_digits.png", help="path of the PNG to write")
    args = p.parse_args(argv)
    quick = args.quick or os.environ.get("BRAINNORM_QUICK", "").strip().lower() in ("1", "true", "yes")
    if args.epochs is None:
        args.epochs = 3 if quick else 40
    args.quick = quick
    return args


def main(argv=None):
    args = parse_args(argv)
    data = load_data(args.seed)
    print(
        f"digits: {len(data[0])} train / {len(data[2])} test samples, {data[0].shape[1]} features; "
        f"MLP {args.layers}x{args.hidden}, {args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}"
        + (" (quick)" if args.quick else "")
    )
    results = {}
    for i, norm in enumerate(args.variants):
        results[norm] = train_variant(
            norm, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            hidden=args.hidden, layers=args.layers, seed=args.seed,
        )
    print_table(results)
    plot(results, args.out)
    print(f"plot written to {args.out}")
    return results


if __name__ == "__main__":
    main()
