"""Data-parallel training over 2 processes x 2 devices with ``jax.distributed``: same statistics as one process.

A small sequence classifier, ``Linear -> tdBN -> tanh -> masked mean over
time -> BatchNorm0d -> Linear``, trains with plain SGD on padded sequences
``(T, B, F)`` with a padding mask ``(T, B, 1)``. Every process loads only its
own part of each global batch (process 0 long recordings, process 1 short
ones, so the two hold very different numbers of valid time steps); one
global mesh spans the devices of every process, and
``jax.make_array_from_process_local_data`` makes the sharded global batch.
``jit`` partitions the training step (GSPMD): tdBN and BatchNorm reduce
per-channel sums across all devices of all processes.

At the end the script prints, on process 0:

- that the running statistics (and the parameters) are identical on every
  device of every process (max difference 0);
- the max difference between them and a single-process run: process 0
  gathers the global batches, trains a fresh copy of the model on one of its
  devices without any sharding, and compares;
- the largest difference between the loss curves.

Run, from the repository root (2 processes with 2 CPU devices each, at most
5 minutes)::

    python -m brainnorm.distributed -n 2 --devices-per-process 2 --timeout 300 examples/multiprocess_training.py

``--steps N`` sets the number of training steps (default 20). On a cluster,
run the same file once per host (see docs/guides/distributed.rst): without
the launcher, ``brainnorm.distributed.initialize()`` lets JAX detect the
cluster (SLURM, Open MPI, ...).
"""

from __future__ import annotations

import argparse

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import brainnorm
from brainnorm import distributed

TIME, FEATURES, HIDDEN, CLASSES = 8, 6, 16, 3
BATCH_PER_PROCESS = 8
LEARNING_RATE = 0.3
# (shortest, longest) valid length of the sequences each process loads: very different valid counts
LENGTHS = {0: (6, TIME), 1: (1, 3)}


class Classifier(brainstate.nn.Module):
    """``Linear -> tdBN -> tanh -> masked mean over time -> BatchNorm0d -> Linear`` on ``(T, B, F)``."""

    def __init__(self):
        super().__init__()
        self.encode = brainstate.nn.Linear(FEATURES, HIDDEN)
        self.tdbn = brainnorm.ThresholdDependentBatchNorm(HIDDEN, step_mode="multi", momentum=0.9)
        self.bn = brainnorm.BatchNorm0d(HIDDEN, momentum=0.9)
        self.readout = brainstate.nn.Linear(HIDDEN, CLASSES)

    def update(self, x, mask):
        h = jnp.tanh(self.tdbn(self.encode(x), mask))  # statistics over the valid (t, b) only
        weights = mask.astype(h.dtype)
        pooled = (h * weights).sum(0) / jnp.maximum(weights.sum(0), 1.0)  # mean over each sequence's valid steps
        return self.readout(self.bn(pooled))


def local_batch(step, process_id):
    """This process's part of global batch ``step``: ``(x (T, B, F), mask (T, B, 1), labels (B,))``."""
    rng = np.random.default_rng([step, process_id])
    labels = rng.integers(0, CLASSES, BATCH_PER_PROCESS)
    low, high = LENGTHS[process_id]
    lengths = rng.integers(low, high + 1, BATCH_PER_PROCESS)
    mask = (np.arange(TIME)[:, None] < lengths[None, :])[..., None]
    x = rng.standard_normal((TIME, BATCH_PER_PROCESS, FEATURES)) + 1.5 * np.eye(CLASSES, FEATURES)[labels]
    x += 2.0 * process_id  # the processes' recordings differ in offset: per-process statistics would differ
    return x.astype(np.float32), mask, labels.astype(np.int32)


def make_model():
    brainstate.random.seed(0)  # the same initial parameters on every process and in the reference
    return Classifier()


def make_train_step(model):
    """Jitted SGD step: ``step(x, mask, labels) -> loss``; updates parameters and running statistics."""
    params = model.states(brainstate.ParamState)

    def loss_fn(x, mask, labels):
        with brainstate.environ.context(fit=True):
            logits = model(x, mask)
        log_probs = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))

    def step(x, mask, labels):
        grads, loss = brainstate.transform.grad(loss_fn, params, return_value=True)(x, mask, labels)
        for key, grad in grads.items():
            params[key].value = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params[key].value, grad)
        return loss

    return brainstate.transform.jit(step)


def statistics_and_parameters(model):
    """``{name: array}`` of the running statistics and every parameter (each a global or local array)."""
    found = {
        "tdbn.running_mean": model.tdbn.running_mean.value,
        "tdbn.running_var": model.tdbn.running_var.value,
        "bn.running_mean": model.bn.running_mean.value,
        "bn.running_var": model.bn.running_var.value,
    }
    for path, state in model.states(brainstate.ParamState).items():
        for key, leaf in jax.tree_util.tree_flatten_with_path(state.value)[0]:
            found[".".join(map(str, path)) + jax.tree_util.keystr(key)] = leaf
    return found


def train_distributed(info, steps):
    mesh = Mesh(np.array(jax.devices()), ("data",))  # every device of every process, process 0's first
    batch_sharding = NamedSharding(mesh, P(None, "data"))  # (T, B, ...): the batch is axis 1
    label_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    model = make_model()
    # states on every device from the start, as the step returns them (else the first step compiles twice)
    for state in model.states().values():
        state.value = jax.tree.map(
            lambda v: jax.make_array_from_process_local_data(replicated, np.asarray(v)), state.value
        )
    train_step = make_train_step(model)
    global_batch = (TIME, BATCH_PER_PROCESS * info.num_processes)
    losses = []
    for step in range(steps):
        x, mask, labels = local_batch(step, info.process_id)
        loss = train_step(
            jax.make_array_from_process_local_data(batch_sharding, x, global_batch + (FEATURES,)),
            jax.make_array_from_process_local_data(batch_sharding, mask, global_batch + (1,)),
            jax.make_array_from_process_local_data(label_sharding, labels, global_batch[1:]),
        )
        losses.append(float(loss))
    return model, np.array(losses)


def train_single(batches, steps):
    """The same training on one device of this process, unsharded, on the gathered global batches."""
    model = make_model()
    train_step = make_train_step(model)
    losses = [float(train_step(*(jnp.asarray(a) for a in batch))) for batch in batches[:steps]]
    return model, np.array(losses)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    steps = parser.parse_args(argv).steps
    # join the other processes before the first JAX computation (the gloo collectives on CPU)
    info = distributed.initialize()
    rank, num_processes = info.process_id, info.num_processes
    print(
        f"process {rank} of {num_processes}: {len(jax.local_devices())} local devices, "
        f"{len(jax.devices())} in the mesh",
        flush=True,
    )
    model, losses = train_distributed(info, steps)

    # 1. every device of every process holds the same running statistics and parameters
    values = statistics_and_parameters(model)
    spread = 0.0
    for value in values.values():
        local = np.stack([np.asarray(shard.data) for shard in value.addressable_shards])  # this process's copies
        everywhere = np.asarray(multihost_utils.process_allgather(local)).reshape((-1,) + value.shape)
        spread = max(spread, float(np.max(np.abs(everywhere - everywhere[0]))))
    valid = [int(local_batch(s, r)[1].sum()) for r in range(num_processes) for s in range(steps)]
    valid = np.array(valid).reshape(num_processes, steps).sum(1)
    print(
        f"process {rank}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, valid time steps per process {valid.tolist()}",
        flush=True,
    )

    # 2. a single-process run on the same global batches (process 0 gathers them and recomputes)
    batches = []
    for step in range(steps):
        parts = [multihost_utils.process_allgather(a) for a in local_batch(step, rank)]  # (processes, ...)
        x, mask, labels = (np.asarray(p) for p in parts)
        batches.append((np.concatenate(list(x), 1), np.concatenate(list(mask), 1), np.concatenate(list(labels))))
    if rank == 0:
        single_model, single_losses = train_single(batches, steps)
        single = statistics_and_parameters(single_model)
        stats_diff = max(
            float(np.max(np.abs(np.asarray(values[k].addressable_shards[0].data) - np.asarray(single[k]))))
            for k in values
            if "running" in k
        )
        param_diff = max(
            float(np.max(np.abs(np.asarray(values[k].addressable_shards[0].data) - np.asarray(single[k]))))
            for k in values
            if "running" not in k
        )
        loss_diff = float(np.max(np.abs(losses - single_losses)))
        print(f"trained {steps} steps on {num_processes} processes x {len(jax.local_devices())} devices")
        for name in ("tdbn.running_mean", "tdbn.running_var", "bn.running_mean", "bn.running_var"):
            shown = np.round(np.asarray(values[name].addressable_shards[0].data).ravel()[:4], 4)
            print(f"  {name:<18} {shown} ...")
        print(
            f"running statistics and parameters identical on every device of every process: "
            f"{spread == 0.0} (max difference {spread:.3g})"
        )
        print(f"max |running statistics - single-process run| {stats_diff:.3g}")
        print(f"max |parameters - single-process run|         {param_diff:.3g}")
        print(f"max |loss - single-process run|               {loss_diff:.3g}")
        ok = spread == 0.0 and stats_diff < 1e-4 and param_diff < 1e-4
        print("equal to one process on the global batch (float32 rounding): " + ("yes" if ok else "NO"), flush=True)
        if not ok:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
