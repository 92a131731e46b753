"""Multi-device computations for tests/test_distributed.py, run in a subprocess.

The host platform is split into 4 CPU devices with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``, which JAX reads once,
when it initializes; the pytest process has already imported JAX, so these
computations run here, in a fresh interpreter.

Usage: ``python tests/_distributed_worker.py OUT_DIR [CASE ...]``.

Every case builds its float32 inputs from a fixed seed, runs brainnorm under
``jax.shard_map``, ``jax.pmap`` or brainstate's mapping transforms, and
stores inputs and outputs in ``OUT_DIR/results.npz`` under ``"<case>/<key>"``.
A case that raises is recorded in ``OUT_DIR/errors.json`` with its message
and the others still run. The test process computes the float64 references
and asserts; this worker asserts nothing.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

import brainstate  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

import brainnorm  # noqa: E402
from brainnorm import functional as F  # noqa: E402

NDEV = 4
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def mesh1d():
    return Mesh(np.array(jax.devices()[:NDEV]), ("d",))


def shard(fn, in_specs, out_specs, **kwargs):
    return jax.jit(jax.shard_map(fn, mesh=mesh1d(), in_specs=in_specs, out_specs=out_specs, **kwargs))


# --- data -----------------------------------------------------------------------------------

ROWS = 6  # rows per device
# Valid rows per device (columns) for each channel (rows of this table):
# unequal counts, a device with none, a channel with a single valid element
# overall, and a channel with no valid element at all.
COUNTS = np.array([
    [6, 1, 0, 3],
    [2, 5, 0, 6],
    [0, 1, 0, 0],
    [0, 0, 0, 0],
])
DEVICE_OFFSET = np.array([0.0, 3.0, -2.0, 1.0])


def unequal_data(offset=1e4, seed=0):
    """Global ``(NDEV * ROWS, C)`` float32 data and its mask, device ``d`` owning rows ``d*ROWS:(d+1)*ROWS``.

    Values are ``offset + device offset + N(0, 1)``: per-device means differ,
    so averaging per-device means is visibly wrong.
    """
    rng = np.random.default_rng(seed)
    channels = COUNTS.shape[0]
    x = offset + rng.standard_normal((NDEV, ROWS, channels)) + DEVICE_OFFSET[:, None, None]
    mask = np.zeros((NDEV, ROWS, channels), bool)
    for c in range(channels):
        for d in range(NDEV):
            rows = rng.permutation(ROWS)[: COUNTS[c, d]]
            mask[d, rows, c] = True
    return x.reshape(NDEV * ROWS, channels).astype(np.float32), mask.reshape(NDEV * ROWS, channels)


def per_device(a):
    """``(NDEV * n, ...)`` -> ``(NDEV, n, ...)`` for pmap."""
    a = np.asarray(a)
    return a.reshape((NDEV, a.shape[0] // NDEV) + a.shape[1:])


def stacked(*arrays):
    """Give every output a leading axis of 1, so that ``out_specs=P('d')`` returns each device's copy."""
    return tuple(a[None] for a in arrays)


# --- functional: moments ----------------------------------------------------------------------


@case
def moments_shard_unmasked():
    x = (1.0 + np.random.default_rng(1).standard_normal((NDEV * ROWS, 3))).astype(np.float32)
    f = shard(lambda v: stacked(*F.moments(v, 0, axis_name="d")), P("d"), (P("d"), P("d")))
    mean, var = f(x)
    return dict(x=x, mean=mean, var=var)


@case
def moments_shard_unmasked_offset():
    x = (1e4 + np.random.default_rng(2).standard_normal((NDEV * ROWS, 3))).astype(np.float32)
    x += np.repeat(DEVICE_OFFSET, ROWS)[:, None].astype(np.float32)
    f = shard(lambda v: stacked(*F.moments(v, 0, axis_name="d")), P("d"), (P("d"), P("d")))
    mean, var = f(x)
    return dict(x=x, mean=mean, var=var)


@case
def moments_shard_masked_unequal():
    x, mask = unequal_data()
    f = shard(lambda v, m: stacked(*F.moments(v, 0, mask=m, axis_name="d")), (P("d"), P("d")), (P("d"), P("d")))
    mean, var = f(x, mask)
    return dict(x=x, mask=mask, mean=mean, var=var)


@case
def moments_shard_masked_unequal_offset_1e6():
    x, mask = unequal_data(offset=1e6, seed=3)
    f = shard(lambda v, m: stacked(*F.moments(v, 0, mask=m, axis_name="d")), (P("d"), P("d")), (P("d"), P("d")))
    mean, var = f(x, mask)
    return dict(x=x, mask=mask, mean=mean, var=var)


@case
def moments_shard_masked_rms():
    x, mask = unequal_data(offset=1.0, seed=4)
    f = shard(lambda v, m: stacked(*F.moments(v, 0, mask=m, use_mean=False, axis_name="d")),
              (P("d"), P("d")), (P("d"), P("d")))
    mean, var = f(x, mask)
    return dict(x=x, mask=mask, mean=mean, var=var)


@case
def moments_shard_masked_fast_variance():
    x, mask = unequal_data(offset=1.0, seed=5)
    f = shard(lambda v, m: stacked(*F.moments(v, 0, mask=m, use_fast_variance=True, axis_name="d")),
              (P("d"), P("d")), (P("d"), P("d")))
    mean, var = f(x, mask)
    return dict(x=x, mask=mask, mean=mean, var=var)


@case
def moments_pmap_unmasked():
    x = (1.0 + np.random.default_rng(6).standard_normal((NDEV * ROWS, 3))).astype(np.float32)
    mean, var = jax.pmap(lambda v: F.moments(v, 0, axis_name="d"), axis_name="d")(per_device(x))
    return dict(x=x, mean=mean, var=var)


@case
def moments_pmap_masked_unequal():
    x, mask = unequal_data(seed=7)
    mean, var = jax.pmap(lambda v, m: F.moments(v, 0, mask=m, axis_name="d"), axis_name="d")(
        per_device(x), per_device(mask))
    return dict(x=x, mask=mask, mean=mean, var=var)


@case
def moments_pmap_groups():
    """``axis_index_groups=[[0, 1], [2, 3]]``: devices 0-1 and 2-3 reduce separately."""
    x, mask = unequal_data(seed=8)
    groups = [[0, 1], [2, 3]]
    mean, var = jax.pmap(
        lambda v, m: F.moments(v, 0, mask=m, axis_name="d", axis_index_groups=groups), axis_name="d"
    )(per_device(x), per_device(mask))
    return dict(x=x, mask=mask, mean=mean, var=var)


@case
def moments_mesh2d_tuple_axis_name():
    """A 2 x 2 mesh; ``axis_name=('a', 'b')`` reduces over both mesh axes."""
    x, mask = unequal_data(seed=9)
    mesh = Mesh(np.array(jax.devices()[:NDEV]).reshape(2, 2), ("a", "b"))
    f = jax.jit(jax.shard_map(
        lambda v, m: stacked(*F.moments(v, 0, mask=m, axis_name=("a", "b"))),
        mesh=mesh, in_specs=(P(("a", "b")), P(("a", "b"))), out_specs=(P(("a", "b")), P(("a", "b")))))
    mean, var = f(x, mask)
    return dict(x=x, mask=mask, mean=mean, var=var)


# --- functional: layer_norm, rms_norm, batch_norm ------------------------------------------------


def _feature_sharded_data(seed):
    """``(4, NDEV * 5)`` data whose reduced (last) axis is split across devices, with a mask."""
    rng = np.random.default_rng(seed)
    F_ = 5
    x = (1e4 + rng.standard_normal((4, NDEV * F_))).astype(np.float32)
    x += np.repeat(DEVICE_OFFSET, F_)[None, :].astype(np.float32)
    counts = np.array([[5, 5, 5, 5], [5, 1, 0, 2], [0, 0, 0, 1], [0, 0, 0, 0]])
    mask = np.zeros((4, NDEV, F_), bool)
    for r in range(4):
        for d in range(NDEV):
            mask[r, d, rng.permutation(F_)[: counts[r, d]]] = True
    scale = np.linspace(0.5, 1.5, NDEV * F_).astype(np.float32)
    bias = np.linspace(-0.3, 0.4, NDEV * F_).astype(np.float32)
    return x, mask.reshape(4, NDEV * F_), scale, bias


@case
def layer_norm_shard_masked():
    x, mask, scale, bias = _feature_sharded_data(10)
    f = shard(lambda v, m, s, b: F.layer_norm(v, s, b, mask=m, axis_name="d"),
              (P(None, "d"), P(None, "d"), P("d"), P("d")), P(None, "d"))
    return dict(x=x, mask=mask, scale=scale, bias=bias, y=f(x, mask, scale, bias))


@case
def layer_norm_shard_unmasked():
    x, _, scale, bias = _feature_sharded_data(11)
    f = shard(lambda v, s, b: F.layer_norm(v, s, b, axis_name="d"), (P(None, "d"), P("d"), P("d")), P(None, "d"))
    return dict(x=x, scale=scale, bias=bias, y=f(x, scale, bias))


@case
def layer_norm_pmap_masked():
    x, mask, scale, bias = _feature_sharded_data(12)
    split = lambda a: np.stack(np.split(a, NDEV, axis=-1))  # noqa: E731
    y = jax.pmap(lambda v, m, s, b: F.layer_norm(v, s, b, mask=m, axis_name="d"), axis_name="d")(
        split(x), split(mask), split(scale), split(bias))
    return dict(x=x, mask=mask, scale=scale, bias=bias, y=np.concatenate(list(np.asarray(y)), axis=-1))


@case
def rms_norm_shard_masked():
    x, mask, scale, _ = _feature_sharded_data(13)
    x = x - 1e4
    f = shard(lambda v, m, s: F.rms_norm(v, s, mask=m, axis_name="d"), (P(None, "d"), P(None, "d"), P("d")),
              P(None, "d"))
    return dict(x=x, mask=mask, scale=scale, y=f(x, mask, scale))


def _batch_norm_inputs(seed):
    x, mask = unequal_data(seed=seed)
    channels = x.shape[1]
    running_mean = np.linspace(9990.0, 10010.0, channels).astype(np.float32)
    running_var = np.linspace(0.5, 2.0, channels).astype(np.float32)
    scale = np.linspace(0.5, 1.5, channels).astype(np.float32)
    bias = np.linspace(-0.3, 0.4, channels).astype(np.float32)
    return x, mask, running_mean, running_var, scale, bias


@case
def batch_norm_shard_masked():
    x, mask, rm, rv, scale, bias = _batch_norm_inputs(14)

    def step(v, m, rm_, rv_, s, b):
        y, new_mean, new_var = F.batch_norm(v, rm_, rv_, s, b, training=True, momentum=0.9, mask=m,
                                            unbiased_running_var=True, axis_name="d")
        return (y,) + stacked(new_mean, new_var)

    f = shard(step, (P("d"), P("d"), P(), P(), P(), P()), (P("d"), P("d"), P("d")))
    y, new_mean, new_var = f(x, mask, rm, rv, scale, bias)
    return dict(x=x, mask=mask, rm=rm, rv=rv, scale=scale, bias=bias, y=y, new_mean=new_mean, new_var=new_var)


@case
def batch_norm_shard_unmasked():
    x, _, rm, rv, scale, bias = _batch_norm_inputs(15)

    def step(v, rm_, rv_, s, b):
        y, new_mean, new_var = F.batch_norm(v, rm_, rv_, s, b, training=True, momentum=0.9, axis_name="d")
        return (y,) + stacked(new_mean, new_var)

    f = shard(step, (P("d"), P(), P(), P(), P()), (P("d"), P("d"), P("d")))
    y, new_mean, new_var = f(x, rm, rv, scale, bias)
    return dict(x=x, rm=rm, rv=rv, scale=scale, bias=bias, y=y, new_mean=new_mean, new_var=new_var)


@case
def batch_norm_pmap_masked():
    x, mask, rm, rv, scale, bias = _batch_norm_inputs(16)
    y, new_mean, new_var = jax.pmap(
        lambda v, m: F.batch_norm(v, rm, rv, scale, bias, training=True, momentum=0.9, mask=m, axis_name="d"),
        axis_name="d",
    )(per_device(x), per_device(mask))
    return dict(x=x, mask=mask, rm=rm, rv=rv, scale=scale, bias=bias, y=np.asarray(y).reshape(x.shape),
                new_mean=new_mean, new_var=new_var)


@case
def batch_norm_shard_grad():
    """Gradient of a loss on the globally normalized output w.r.t. the sharded input, scale and bias."""
    x, mask, rm, rv, scale, bias = _batch_norm_inputs(17)
    x = x - 1e4
    weights = np.random.default_rng(17).standard_normal(x.shape).astype(np.float32)
    f = jax.shard_map(
        lambda v, m, s, b: F.batch_norm(v, rm, rv, s, b, training=True, mask=m, axis_name="d")[0],
        mesh=mesh1d(), in_specs=(P("d"), P("d"), P(), P()), out_specs=P("d"),
    )
    loss = lambda v, s, b: jnp.sum(f(v, mask, s, b) * weights)  # noqa: E731
    gx, gs, gb = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)
    return dict(x=x, mask=mask, scale=scale, bias=bias, weights=weights, gx=gx, gs=gs, gb=gb)


# --- shard_map's replication check (check_vma=True, the default) -------------------------------


@case
def replicated_out_specs_moments():
    """Global statistics are the same on every device: ``out_specs=P()`` must be accepted."""
    x, mask = unequal_data(offset=1.0, seed=18)
    f = jax.jit(jax.shard_map(lambda v, m: F.moments(v, 0, mask=m, axis_name="d"), mesh=mesh1d(),
                              in_specs=(P("d"), P("d")), out_specs=(P(), P())))
    mean, var = f(x, mask)
    return dict(x=x, mask=mask, mean=mean, var=var)


@case
def replicated_out_specs_batch_norm():
    x, mask, rm, rv, scale, bias = _batch_norm_inputs(19)
    f = jax.jit(jax.shard_map(
        lambda v, m: F.batch_norm(v, rm, rv, scale, bias, training=True, momentum=0.9, mask=m, axis_name="d"),
        mesh=mesh1d(), in_specs=(P("d"), P("d")), out_specs=(P("d"), P(), P())))
    y, new_mean, new_var = f(x, mask)
    return dict(x=x, mask=mask, rm=rm, rv=rv, scale=scale, bias=bias, y=y, new_mean=new_mean, new_var=new_var)


# --- layers ---------------------------------------------------------------------------------------


def _layer_steps(seed, steps=2):
    """Inputs ``(NDEV * 2, 3, 4)`` for BatchNorm1d((3, 4)) and masks with unequal valid counts per device."""
    rng = np.random.default_rng(seed)
    xs, masks = [], []
    for _ in range(steps):
        x = (5.0 + 2.0 * rng.standard_normal((NDEV * 2, 3, 4))).astype(np.float32)
        x += np.repeat(DEVICE_OFFSET, 2)[:, None, None].astype(np.float32)
        lengths = np.array([3, 3, 1, 0, 0, 0, 2, 3])  # (B, T, 1) padding: device 2 has nothing
        mask = (np.arange(3)[None, :] < lengths[:, None])[:, :, None]
        xs.append(x)
        masks.append(mask)
    return xs, masks


def _bn_layer(**kwargs):
    return brainnorm.BatchNorm1d((3, 4), axis_name="d", momentum=0.8,
                                 scale_initializer=np.linspace(0.5, 1.5, 4).astype(np.float32),
                                 bias_initializer=np.linspace(-0.3, 0.4, 4).astype(np.float32), **kwargs)


def _train(layer, x, mask):
    with brainstate.environ.context(fit=True):
        return layer(x, mask)


def _record_layer_run(run, xs, masks, layer):
    out = dict()
    for i, (x, m) in enumerate(zip(xs, masks)):
        out[f"x{i}"], out[f"mask{i}"] = x, m
        out[f"y{i}"] = run(x, m)
        out[f"mean{i}"] = np.asarray(layer.running_mean.value)
        out[f"var{i}"] = np.asarray(layer.running_var.value)
    out["count"] = np.asarray(layer.num_batches_tracked.value)
    return out


@case
def layer_batchnorm1d_pmap2():
    xs, masks = _layer_steps(20)
    layer = _bn_layer(unbiased_running_var=True)
    run = brainstate.transform.jit(brainstate.transform.pmap2(lambda v, m: _train(layer, v, m), axis_name="d"))
    wrapped = lambda x, m: np.asarray(run(per_device(x), per_device(m))).reshape(x.shape)  # noqa: E731
    out = _record_layer_run(wrapped, xs, masks, layer)
    with brainstate.environ.context(fit=False):
        run_eval = brainstate.transform.jit(brainstate.transform.pmap2(lambda v: layer(v), axis_name="d"))
        out["y_eval"] = np.asarray(run_eval(per_device(xs[0]))).reshape(xs[0].shape)
    out["count_after_eval"] = np.asarray(layer.num_batches_tracked.value)
    return out


@case
def layer_batchnorm1d_shard_map():
    """brainstate.transform.shard_map with check_vma=False (the replication check is a separate case)."""
    xs, masks = _layer_steps(21)
    layer = _bn_layer()
    run = brainstate.transform.jit(brainstate.transform.shard_map(
        lambda v, m: _train(layer, v, m), mesh=mesh1d(), in_specs=(P("d"), P("d")), out_specs=P("d"),
        check_vma=False))
    return _record_layer_run(lambda x, m: np.asarray(run(x, m)), xs, masks, layer)


@case
def layer_batchnorm1d_shard_map_checked():
    """The same with brainstate's default ``check_vma=True``: the running statistics are replicated."""
    xs, masks = _layer_steps(22, steps=1)
    layer = _bn_layer()
    run = brainstate.transform.jit(brainstate.transform.shard_map(
        lambda v, m: _train(layer, v, m), mesh=mesh1d(), in_specs=(P("d"), P("d")), out_specs=P("d")))
    return _record_layer_run(lambda x, m: np.asarray(run(x, m)), xs, masks, layer)


@case
def layer_instancenorm_pmap2():
    """InstanceNorm running statistics: batch average of instance statistics over all devices."""
    xs, masks = _layer_steps(23, steps=1)
    layer = brainnorm.InstanceNorm((3, 4), track_running_stats=True, momentum=0.8, axis_name="d")
    run = brainstate.transform.jit(brainstate.transform.pmap2(lambda v, m: _train(layer, v, m), axis_name="d"))
    wrapped = lambda x, m: np.asarray(run(per_device(x), per_device(m))).reshape(x.shape)  # noqa: E731
    return _record_layer_run(wrapped, xs, masks, layer)


@case
def layer_groups_pmap():
    """Stateless layers with ``axis_index_groups`` under jax.pmap: statistics within each group."""
    xs, masks = _layer_steps(24, steps=1)
    x, mask = xs[0], masks[0]
    groups = [[0, 1], [2, 3]]
    bn = brainnorm.BatchNorm1d((3, 4), track_running_stats=False, axis_name="d", axis_index_groups=groups)
    ln = brainnorm.LayerNorm((3, 4), reduction_axes=(0, 1), axis_name="d", axis_index_groups=groups)
    y_bn = jax.pmap(lambda v, m: bn(v, m), axis_name="d")(per_device(x), per_device(mask))
    y_ln = jax.pmap(lambda v, m: ln(v, m), axis_name="d")(per_device(x), per_device(mask))
    return dict(x=x, mask=mask, y_bn=np.asarray(y_bn).reshape(x.shape), y_ln=np.asarray(y_ln).reshape(x.shape))


# --- what the peers do: average per-device masked means ------------------------------------------


PEER_COUNTS = np.array([
    [6, 1, 2, 3],  # every device has data, in unequal amounts
    [1, 6, 6, 1],
    [3, 3, 0, 3],  # device 2 has none
])


def peer_data(seed=25):
    rng = np.random.default_rng(seed)
    channels = PEER_COUNTS.shape[0]
    x = 1.0 + rng.standard_normal((NDEV, ROWS, channels)) + DEVICE_OFFSET[:, None, None]
    mask = np.zeros((NDEV, ROWS, channels), bool)
    for c in range(channels):
        for d in range(NDEV):
            mask[d, rng.permutation(ROWS)[: PEER_COUNTS[c, d]], c] = True
    return x.reshape(NDEV * ROWS, channels).astype(np.float32), mask.reshape(NDEV * ROWS, channels)


@case
def peers_per_device_average():
    """brainnorm next to what flax.linen and brainstate.nn compute: ``pmean`` of per-device masked means."""
    x, mask = peer_data()
    out = dict(x=x, mask=mask)
    out["brainnorm_mean"], out["brainnorm_var"] = jax.pmap(
        lambda v, m: F.moments(v, 0, mask=m, axis_name="d"), axis_name="d")(per_device(x), per_device(mask))
    from brainstate.nn import _normalizations as bst_norm

    out["brainstate_mean"], out["brainstate_var"] = jax.pmap(
        lambda v, m: bst_norm._compute_stats(v, (0,), None, axis_name="d", use_fast_variance=False, mask=m),
        axis_name="d")(per_device(x), per_device(mask))
    try:
        from flax.linen import normalization as flax_norm
    except ImportError:  # flax is a test extra; the brainstate result suffices
        pass
    else:
        out["flax_mean"], out["flax_var"] = jax.pmap(
            lambda v, m: flax_norm._compute_stats(v, (0,), None, axis_name="d", use_fast_variance=False, mask=m),
            axis_name="d")(per_device(x), per_device(mask))
    return out


def main(argv):
    out_dir = argv[1]
    names = argv[2:] or list(CASES)
    assert len(jax.devices()) >= NDEV, jax.devices()
    results, errors = {}, {}
    for name in names:
        try:
            for key, value in CASES[name]().items():
                results[f"{name}/{key}"] = np.asarray(value)
        except Exception as exc:  # recorded for the test to report
            errors[name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
    np.savez(os.path.join(out_dir, "results.npz"), **results)
    with open(os.path.join(out_dir, "errors.json"), "w") as fh:
        json.dump({"errors": errors, "devices": len(jax.devices()), "cases": names}, fh)


if __name__ == "__main__":
    main(sys.argv)
