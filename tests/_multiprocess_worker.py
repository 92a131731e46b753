"""Training steps over several processes for tests/test_multiprocess.py, run by the launcher.

Usage::

    python -m brainnorm.distributed -n 2 --devices-per-process 2 tests/_multiprocess_worker.py OUT_DIR [MODE]

Every process writes its pid to ``OUT_DIR/pid<rank>`` first. ``MODE``:

- ``cases`` (default): joins the processes with ``brainnorm.distributed.initialize()``
  (gloo collectives), builds one global mesh over every device of every
  process, and runs two training steps of every layer in :data:`LAYERS` on a
  global batch sharded along its batch axis, both under GSPMD (``jit`` over
  the global array built with ``jax.make_array_from_process_local_data``) and
  under ``brainstate.transform.shard_map`` with ``axis_name``. Each process
  stores in ``OUT_DIR/rank<r>.npz`` under ``"<layer>/<mode>/<key>"``: the
  output, the input gradient (gathered from every process), the parameter
  gradients and the running statistics after each step (one copy per local
  device, so that the test sees every process's and every device's copy);
  and in ``OUT_DIR/rank<r>.json`` the errors of cases that raised, the
  device layout and LayerNorm's output sharding.
- ``fail``: rank 1 calls a layer with an input of the wrong shape, while
  rank 0 waits for it in a collective; the launcher must stop both.
- ``hang``: every process sleeps (before importing JAX); the launcher's time
  limit must stop them.

The data, the layers and the training step are defined here once and
imported by the test, which runs the same step in its own single process on
the whole global batch, and computes float64 references. This worker asserts
nothing.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time


def _write_pid(out_dir: str) -> None:
    rank = os.environ.get("JAX_PROCESS_ID", "0")
    pathlib.Path(out_dir, f"pid{rank}").write_text(str(os.getpid()))


if __name__ == "__main__" and sys.argv[2:3] == ["hang"]:
    _write_pid(sys.argv[1])
    print("sleeping", flush=True)
    time.sleep(3600)

import json  # noqa: E402
import traceback  # noqa: E402

import brainstate  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import brainnorm  # noqa: E402

STEPS = 2
BATCH = 8  # global batch: 4 samples per process, 2 per device on 2 processes x 2 devices
CHANNELS = 4
MOMENTUM = 0.8
TIME = 3  # steps of the temporal layers
SCALE = np.linspace(0.5, 1.5, CHANNELS).astype(np.float32)
BIAS = np.linspace(-0.3, 0.4, CHANNELS).astype(np.float32)
BIAS_T = np.stack([BIAS, -BIAS, 0.5 * BIAS]).astype(np.float32)  # TAB: a bias per time step
# valid length of each sample's padded axis (the length axis, or time for the temporal layers): the samples of
# process 0 (the first 4) hold far more valid entries than those of process 1, and one sample holds none
LENGTHS = np.array([3, 3, 3, 2, 1, 0, 1, 1])


def _bn(cls, in_size, axis_name):
    return cls(in_size, momentum=MOMENTUM, axis_name=axis_name, scale_initializer=SCALE, bias_initializer=BIAS)


def _temporal_kwargs(axis_name):
    return dict(momentum=MOMENTUM, axis_name=axis_name, step_mode="multi", scale_init=SCALE, bias_init=BIAS)


# name: (constructor(axis_name), global input shape, batch axis, padded axis of the mask)
LAYERS = {
    "BatchNorm1d": (lambda a: _bn(brainnorm.BatchNorm1d, (3, CHANNELS), a), (BATCH, 3, CHANNELS), 0, 1),
    "BatchNorm2d": (lambda a: _bn(brainnorm.BatchNorm2d, (3, 2, CHANNELS), a), (BATCH, 3, 2, CHANNELS), 0, 1),
    "BatchNorm3d": (lambda a: _bn(brainnorm.BatchNorm3d, (3, 2, 2, CHANNELS), a), (BATCH, 3, 2, 2, CHANNELS), 0, 1),
    "BatchRenorm": (
        lambda a: brainnorm.BatchRenorm(
            (3, CHANNELS), r_max=1.5, d_max=0.5, momentum=MOMENTUM, axis_name=a, scale_init=SCALE, bias_init=BIAS
        ),
        (BATCH, 3, CHANNELS),
        0,
        1,
    ),
    "ThresholdDependentBatchNorm": (
        lambda a: brainnorm.ThresholdDependentBatchNorm(CHANNELS, v_th=0.5, alpha=0.8, **_temporal_kwargs(a)),
        (TIME, BATCH, CHANNELS),
        1,
        0,
    ),
    "TemporalEffectiveBatchNorm": (
        lambda a: brainnorm.TemporalEffectiveBatchNorm(CHANNELS, TIME, **_temporal_kwargs(a)),
        (TIME, BATCH, CHANNELS),
        1,
        0,
    ),
    "TemporalAccumulatedBatchNorm": (
        lambda a: brainnorm.TemporalAccumulatedBatchNorm(
            CHANNELS, TIME, **{**_temporal_kwargs(a), "scale_init": np.tile(SCALE, (TIME, 1)), "bias_init": BIAS_T}
        ),
        (TIME, BATCH, CHANNELS),
        1,
        0,
    ),
}
MODES = ("gspmd", "shard_map")


def batch_spec(ndim, batch_axis):
    """``PartitionSpec`` sharding axis ``batch_axis`` of an ``ndim``-array over the mesh axis ``'d'``."""
    return P(*["d" if a == batch_axis else None for a in range(ndim)])


def data(name, step):
    """Global float32 input, padding mask and float32 loss weights of ``name`` at training step ``step``.

    The mask is True where the position along the padded axis is below the
    sample's length (:data:`LENGTHS`); it has size 1 on the channel axis.
    """
    _, shape, batch_axis, padded_axis = LAYERS[name]
    ndim = len(shape)
    rng = np.random.default_rng([len(name), step])
    x = 3.0 + 2.0 * rng.standard_normal(shape)
    # the processes' halves have different means: averaging per-process means would be visibly wrong
    x += np.expand_dims(np.where(np.arange(BATCH) < BATCH // 2, -1.0, 2.0), [a for a in range(ndim) if a != batch_axis])
    lengths = np.expand_dims(LENGTHS, [a for a in range(ndim) if a != batch_axis])
    positions = np.expand_dims(np.arange(shape[padded_axis]), [a for a in range(ndim) if a != padded_axis])
    mask = np.broadcast_to(positions < lengths, tuple(shape[:-1]) + (1,))
    weights = rng.standard_normal(shape)
    return x.astype(np.float32), np.ascontiguousarray(mask), weights.astype(np.float32)


def make_step(name, mode, mesh=None):
    """``(layer, step)``: a new layer ``name`` and its jitted training step.

    ``step(x, mask, weights) -> ((param_grads, x_grad), y)`` runs the layer
    in training mode (``fit=True``, updating its running statistics) and
    differentiates the loss ``sum(y * weights)`` w.r.t. the input and every
    parameter. ``mode``: ``'single'`` or ``'gspmd'`` (the plain layer; jit
    partitions the program when the inputs are sharded) or ``'shard_map'``
    (the layer built with ``axis_name='d'`` and called inside
    ``brainstate.transform.shard_map`` over ``mesh``; the gradient is taken
    outside the map).
    """
    make, shape, batch_axis, _ = LAYERS[name]
    layer = make("d" if mode == "shard_map" else None)

    def forward(x, mask):
        with brainstate.environ.context(fit=True):
            return layer(x, mask)

    if mode == "shard_map":
        spec = batch_spec(len(shape), batch_axis)
        forward = brainstate.transform.shard_map(forward, mesh=mesh, in_specs=(spec, spec), out_specs=spec)

    def loss(x, mask, weights):
        y = forward(x, mask)
        return jnp.sum(y * weights), y

    params = layer.states(brainstate.ParamState)
    return layer, brainstate.transform.jit(brainstate.transform.grad(loss, grad_states=params, argnums=0, has_aux=True))


def flat_grads(param_grads):
    """``{"path": array}`` for a tree of parameter gradients."""
    leaves = jax.tree_util.tree_flatten_with_path(param_grads)[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def run(name, mode, place, gather, copies, mesh=None):
    """Every step of ``name`` in ``mode``: outputs, gradients and running statistics, as NumPy arrays.

    ``place(array, batch_axis)`` makes the step's input, ``gather`` turns a
    (sharded) output into the global NumPy array, ``copies`` stacks every
    local copy of a replicated value on a new leading axis.
    """
    layer, step = make_step(name, mode, mesh)
    if mesh is not None:
        replicate_states(layer, mesh)
    batch_axis = LAYERS[name][2]
    out = {}
    for s in range(STEPS):
        x, mask, weights = data(name, s)
        (param_grads, x_grad), y = step(*(place(a, batch_axis) for a in (x, mask, weights)))
        for key, value in (("y", y), ("gx", x_grad)):
            found = gather(value)
            if isinstance(found, dict):  # the shards of this process, keyed by their first index
                out.update({f"{key}{s}@{start}": rows for start, rows in found.items()})
            else:
                out[f"{key}{s}"] = found
        for key, grad in flat_grads(param_grads).items():
            out[f"g{s}{key}"] = copies(grad)
        out[f"mean{s}"] = copies(layer.running_mean.value)
        out[f"var{s}"] = copies(layer.running_var.value)
    return out


def run_single(name):
    """The steps of ``name`` on one device, with the whole global batch (the test's single-process run)."""
    return run(name, "single", lambda a, _: jnp.asarray(a), np.asarray, lambda a: np.asarray(a)[None])


# --- the multi-process side ---------------------------------------------------------------------------


def global_mesh():
    """Every device of every process on one axis ``'d'``, ordered by process (jax.devices() is)."""
    return Mesh(np.array(jax.devices()), ("d",))


def replicate_states(layer, mesh):
    """Put every state of ``layer`` on every device of ``mesh`` (as the training step returns them).

    Otherwise the first step sees single-device states, the second the
    replicated states the first returned, and the step compiles twice.
    """
    replicated = NamedSharding(mesh, P())
    for state in layer.states().values():
        state.value = jax.tree.map(
            lambda v: jax.make_array_from_process_local_data(replicated, np.asarray(v)), state.value
        )


def process_rows():
    """This process's contiguous share of the global batch."""
    per_process = BATCH // jax.process_count()
    return slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)


def placer(mesh):
    def place(a, batch_axis):
        """The global array of which this process holds its rows of ``a`` (the only rows it would have)."""
        index = [slice(None)] * a.ndim
        index[batch_axis] = process_rows()
        sharding = NamedSharding(mesh, batch_spec(a.ndim, batch_axis))
        return jax.make_array_from_process_local_data(sharding, a[tuple(index)], a.shape)

    return place


def local_rows(a):
    """This process's shards of a batch-sharded ``a``: ``{"<start>": rows}`` keyed by their first global index.

    The test puts the global array together from every process's shards
    (gathering here would compile and run one more program per shape).
    """
    batch_axis = next(i for i, part in enumerate(a.sharding.spec) if part is not None)
    return {str(s.index[batch_axis].start or 0): np.asarray(s.data) for s in a.addressable_shards}


def local_copies(a):
    """Each local device's copy of a value that every device holds whole."""
    shards = a.addressable_shards
    assert all(s.data.shape == a.shape for s in shards), f"not replicated: {a.sharding}"
    return np.stack([np.asarray(s.data) for s in shards])


def layer_norm_case(mesh):
    """LayerNorm (masked, over both per-sample axes) on the sharded global batch: outputs, output sharding, HLO."""
    shape = (BATCH, 3, CHANNELS)
    x, mask, _ = data("BatchNorm1d", 0)
    layer = brainnorm.LayerNorm(shape[1:], reduction_axes=(0, 1), scale_init=SCALE, bias_init=BIAS)
    place = placer(mesh)
    xs, ms = place(x, 0), place(mask, 0)
    run_layer = brainstate.transform.jit(lambda v, m: layer(v, m))
    y = run_layer(xs, ms)
    hlo = jax.jit(lambda v, m: layer(v, m)).lower(xs, ms).compile().as_text()
    info = dict(
        input_spec=str(xs.sharding.spec),
        output_spec=str(y.sharding.spec),
        same_sharding=bool(y.sharding.is_equivalent_to(xs.sharding, xs.ndim)),
        all_gathers=hlo.count("all-gather"),
        local_rows=int(y.addressable_shards[0].data.shape[0]),
    )
    return {f"y@{start}": rows for start, rows in local_rows(y).items()}, info


def main(argv):
    out_dir = pathlib.Path(argv[1])
    mode = argv[2] if len(argv) > 2 else "cases"
    _write_pid(str(out_dir))
    from brainnorm import distributed

    info = distributed.initialize()
    mesh = global_mesh()
    if mode == "fail":
        if info.process_id == 1:
            brainnorm.BatchNorm1d((3, CHANNELS))(np.ones((2, 3, CHANNELS + 1), np.float32))  # wrong channels
        x = np.ones((BATCH, CHANNELS), np.float32)  # rank 0: waits in a collective for rank 1
        print(float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(placer(mesh)(x, 0))), flush=True)
        return
    results, errors, meta = {}, {}, {}
    started = time.perf_counter()
    for name in LAYERS:
        for layer_mode in MODES:
            case = f"{name}/{layer_mode}"
            try:
                case_started = time.perf_counter()
                found = run(name, layer_mode, placer(mesh), local_rows, local_copies, mesh)
                meta.setdefault("case_seconds", {})[case] = round(time.perf_counter() - case_started, 2)
                results.update({f"{case}/{key}": value for key, value in found.items()})
            except Exception as exc:  # recorded for the test to report; the other cases still run
                errors[case] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
    try:
        found, meta["LayerNorm"] = layer_norm_case(mesh)
        results.update({f"LayerNorm/gspmd/{key}": value for key, value in found.items()})
    except Exception as exc:
        errors["LayerNorm/gspmd"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
    meta.update(
        errors=errors,
        process_id=info.process_id,
        num_processes=jax.process_count(),
        devices=len(jax.devices()),
        local_devices=len(jax.local_devices()),
        seconds=time.perf_counter() - started,
    )
    rank = info.process_id
    np.savez(out_dir / f"rank{rank}.npz", **results)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(meta))
    print(f"process {rank}: {len(results)} arrays, {len(errors)} errors, {meta['seconds']:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv)
