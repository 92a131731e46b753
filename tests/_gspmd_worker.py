"""GSPMD computations on 4 CPU devices for tests/test_gspmd.py, run in a subprocess.

The host platform is split into 4 CPU devices with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``, which JAX reads once,
when it initializes, so these computations run in a fresh interpreter.

Usage: ``python tests/_gspmd_worker.py OUT_DIR [CASE ...]``.

Every case builds float32 inputs from a fixed seed, runs brainnorm on inputs
sharded with ``NamedSharding`` (automatic and explicit mesh axes), under
``jax.shard_map`` or ``jax.pmap``, and the same computation on one device,
unsharded. It stores arrays in ``OUT_DIR/results.npz`` under ``"<case>/<key>"``
and facts about shardings and the compiled programs in ``OUT_DIR/meta.json``
under ``"info"``: output partition specs, whether the output sharding is
equivalent to the input's, and every collective of the compiled HLO with the
element count of its largest operand or result. A case that raises is
recorded under ``"errors"`` and the others still run. This worker asserts
nothing; tests/test_gspmd.py does.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # tests/test_gspmd.py imports this module for its case names: leave its JAX alone
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

import brainstate  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import brainnorm  # noqa: E402
from brainnorm import functional as F  # noqa: E402

NDEV = 4
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def auto_mesh():
    return Mesh(np.array(jax.devices()[:NDEV]), ("data",), axis_types=(AxisType.Auto,))


def explicit_mesh():
    return jax.make_mesh((NDEV,), ("d",), axis_types=(AxisType.Explicit,))


def data(shape, seed, offset=0.5):
    return (offset + np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>.*?)\s(?P<op>all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter|"
    r"collective-broadcast|ragged-all-to-all)(?:-start)?\((?P<operands>[^)]*)\)")
_ARRAY = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def collectives(hlo_text):
    """``[(op, largest element count among its result and operands), ...]`` for every collective."""
    found = []
    for m in _COLLECTIVE.finditer(hlo_text):
        sizes = [math.prod(int(d) for d in dims.split(",") if d) for dims in _ARRAY.findall(m.group("shape"))]
        sizes += [math.prod(int(d) for d in dims.split(",") if d) for dims in _ARRAY.findall(m.group("operands"))]
        found.append((m.group("op"), max(sizes, default=0)))
    return found


def spec_of(a):
    return str(a.sharding.spec) if isinstance(a.sharding, NamedSharding) else repr(a.sharding)


def sharding_info(out, x):
    """Partition spec of ``out`` and whether its sharding equals ``x``'s (same rank)."""
    return dict(spec=spec_of(out), same_as_input=bool(out.sharding.is_equivalent_to(x.sharding, x.ndim)),
                fully_replicated=bool(out.sharding.is_fully_replicated))


def per_device_elements(x):
    return int(x.addressable_shards[0].data.size)


# --- a. automatic axes: per-sample layers keep the batch sharding, no all-gather ----------------------------

SMALL_2D, LARGE_2D = (16, 64), (64, 1024)  # LARGE: 65536 elements
SMALL_3D, LARGE_3D = (16, 4, 16), (64, 32, 32)


def _per_sample(name, shape):
    """(functional closure, layer) for a per-sample normalization of ``shape``."""
    channels = shape[-1]
    rng = np.random.default_rng(1)
    scale = (1 + 0.2 * rng.standard_normal(channels)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(channels)).astype(np.float32)
    if name == "LayerNorm":
        return (lambda v: F.layer_norm(v, scale, bias),
                brainnorm.LayerNorm(shape[1:], scale_init=scale, bias_init=bias))
    if name == "RMSNorm":
        return lambda v: F.rms_norm(v, scale), brainnorm.RMSNorm(shape[1:], scale_init=scale)
    if name == "GroupNorm":
        return (lambda v: F.group_norm(v, 4, scale, bias),
                brainnorm.GroupNorm(shape[1:], num_groups=4, scale_init=scale, bias_init=bias))
    if name == "InstanceNorm":
        return (lambda v: F.instance_norm(v, scale, bias),
                brainnorm.InstanceNorm(shape[1:], scale_init=scale, bias_init=bias))
    if name == "LocalResponseNorm":
        return (lambda v: F.local_response_norm(v, 5, alpha=0.5),
                brainnorm.LocalResponseNorm(shape[1:], 5, alpha=0.5))
    raise AssertionError(name)


PER_SAMPLE_SHAPES = {
    "LayerNorm": (SMALL_2D, LARGE_2D),
    "RMSNorm": (SMALL_2D, LARGE_2D),
    "GroupNorm": (SMALL_3D, LARGE_3D),
    "InstanceNorm": (SMALL_3D, LARGE_3D),
    "LocalResponseNorm": (SMALL_2D, LARGE_2D),
}


def _auto_per_sample_case(name, size, api):
    def run():
        shape = PER_SAMPLE_SHAPES[name][size == "large"]
        fn, layer = _per_sample(name, shape)
        x = data(shape, seed=len(name) + len(size))
        mesh = auto_mesh()
        xs = jax.device_put(x, NamedSharding(mesh, P("data", *([None] * (x.ndim - 1)))))
        if api == "functional":
            jitted = jax.jit(fn)
        else:
            jitted = brainstate.transform.jit(lambda v: layer(v))
        y = jitted(xs)
        y_single = jax.jit(fn)(jnp.asarray(x)) if api == "functional" else brainstate.transform.jit(
            lambda v: layer(v))(jnp.asarray(x))
        hlo = jitted.lower(xs).compile().as_text()
        info = dict(sharding_info(y, xs), collectives=collectives(hlo), per_device=per_device_elements(xs),
                    input_spec=spec_of(xs))
        return dict(x=x, y=y, y_single=y_single), info

    return run


for _name in PER_SAMPLE_SHAPES:
    for _size in ("small", "large"):
        for _api in ("functional", "layer"):
            CASES[f"auto_{_name}_{_api}_{_size}"] = _auto_per_sample_case(_name, _size, _api)


@case
def auto_layer_norm_grad_large():
    """``jit(grad)`` of a loss on layer_norm: the input gradient keeps the batch sharding, no all-gather."""
    x = data(LARGE_2D, seed=3)
    w = np.random.default_rng(4).standard_normal(LARGE_2D).astype(np.float32)
    loss = lambda v: jnp.sum(jnp.sin(F.layer_norm(v)) * w)  # noqa: E731
    mesh = auto_mesh()
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    jitted = jax.jit(jax.grad(loss))
    g = jitted(xs)
    hlo = jitted.lower(xs).compile().as_text()
    return dict(x=x, g=g, g_single=jax.jit(jax.grad(loss))(jnp.asarray(x))), dict(
        sharding_info(g, xs), collectives=collectives(hlo), per_device=per_device_elements(xs))


@case
def auto_layer_norm_jvp_large():
    """Forward mode under GSPMD: ``jit(jvp)`` of layer_norm keeps the batch sharding, no all-gather."""
    x = data(LARGE_2D, seed=5)
    t = np.random.default_rng(6).standard_normal(LARGE_2D).astype(np.float32)
    mesh = auto_mesh()
    sharding = NamedSharding(mesh, P("data", None))
    xs, ts = jax.device_put(x, sharding), jax.device_put(t, sharding)
    jitted = jax.jit(lambda a, b: jax.jvp(F.layer_norm, (a,), (b,)))
    y, dy = jitted(xs, ts)
    hlo = jitted.lower(xs, ts).compile().as_text()
    return dict(x=x, t=t, y=y, dy=dy), dict(sharding_info(dy, xs), collectives=collectives(hlo),
                                            per_device=per_device_elements(xs))


# --- b. automatic axes: batch statistics reduce partial sums, the output stays sharded -----------------------

# Small shapes hold at least 8 channels' worth of elements per device and channel, so that a collective of
# per-device statistics (devices x channels) stays below one device's share of the input.
BN_SHAPES = {
    "BatchNorm0d": ((64, 16), (64, 1024)),
    "BatchNorm2d": ((16, 2, 2, 8), (64, 8, 8, 16)),
    "ThresholdDependentBatchNorm": ((4, 16, 8), (8, 64, 128)),  # (T, B, C): the batch axis is axis 1
    "F.batch_norm": ((64, 16), (64, 1024)),
}


def _bn_layer(name, shape):
    channels = shape[-1]
    scale = np.linspace(0.5, 1.5, channels).astype(np.float32)
    bias = np.linspace(-0.3, 0.4, channels).astype(np.float32)
    if name == "BatchNorm0d":
        return brainnorm.BatchNorm0d(channels, momentum=0.9, scale_initializer=scale, bias_initializer=bias)
    if name == "BatchNorm2d":
        return brainnorm.BatchNorm2d(shape[1:], momentum=0.9, scale_initializer=scale, bias_initializer=bias)
    if name == "ThresholdDependentBatchNorm":
        return brainnorm.ThresholdDependentBatchNorm(channels, momentum=0.9, v_th=0.5, step_mode="multi",
                                                     scale_init=scale, bias_init=bias)
    raise AssertionError(name)


def _bn_case(name, size, masked=False):
    def run():
        shape = BN_SHAPES[name][size == "large"]
        x = data(shape, seed=len(name) + len(size), offset=3.0)
        batch_axis = 1 if name == "ThresholdDependentBatchNorm" else 0
        spec = [None] * len(shape)
        spec[batch_axis] = "data"
        mesh = auto_mesh()
        xs = jax.device_put(x, NamedSharding(mesh, P(*spec)))
        mask = None
        if masked:  # a (B, ..., 1) padding-style mask, sharded like x
            mask = np.random.default_rng(7).random(shape[:-1] + (1,)) < 0.7
            mask_s = jax.device_put(mask, NamedSharding(mesh, P(*spec)))
        channels = shape[-1]
        if name == "F.batch_norm":
            rm, rv = np.zeros(channels, np.float32), np.ones(channels, np.float32)
            if masked:
                f = lambda v, m: F.batch_norm(v, rm, rv, training=True, momentum=0.9, mask=m)  # noqa: E731
                args, args_single = (xs, mask_s), (jnp.asarray(x), jnp.asarray(mask))
            else:
                f = lambda v: F.batch_norm(v, rm, rv, training=True, momentum=0.9)  # noqa: E731
                args, args_single = (xs,), (jnp.asarray(x),)
            jitted = jax.jit(f)
            y, new_mean, new_var = jitted(*args)
            y1, mean1, var1 = jax.jit(f)(*args_single)
        else:
            layer, single = _bn_layer(name, shape), _bn_layer(name, shape)
            if masked:
                jitted = brainstate.transform.jit(lambda v, m: layer(v, m, use_running_average=False))
                args = (xs, mask_s)
                y1 = brainstate.transform.jit(lambda v, m: single(v, m, use_running_average=False))(
                    jnp.asarray(x), jnp.asarray(mask))
            else:
                jitted = brainstate.transform.jit(lambda v: layer(v, use_running_average=False))
                args = (xs,)
                y1 = brainstate.transform.jit(lambda v: single(v, use_running_average=False))(jnp.asarray(x))
            y = jitted(*args)
            new_mean, new_var = layer.running_mean.value, layer.running_var.value
            mean1, var1 = single.running_mean.value, single.running_var.value
        hlo = jitted.lower(*args).compile().as_text()
        info = dict(sharding_info(y, xs), collectives=collectives(hlo), per_device=per_device_elements(xs),
                    input_spec=spec_of(xs))
        out = dict(x=x, y=y, y_single=y1, mean=new_mean, var=new_var, mean_single=mean1, var_single=var1)
        if masked:
            out["mask"] = mask
        return out, info

    return run


for _name in BN_SHAPES:
    for _size in ("small", "large"):
        CASES[f"auto_{_name}_{_size}"] = _bn_case(_name, _size)
CASES["auto_F.batch_norm_masked_large"] = _bn_case("F.batch_norm", "large", masked=True)
CASES["auto_BatchNorm0d_masked_large"] = _bn_case("BatchNorm0d", "large", masked=True)


# --- c. explicit axes ------------------------------------------------------------------------------------

EXPLICIT_SHAPES = {"small": (8, 16), "large": (256, 256)}


def _program_info(jitted, x):
    return dict(collectives=collectives(jitted.lower(x).compile().as_text()), per_device=per_device_elements(x))


def _explicit_case(kind, size):
    def run():
        shape = EXPLICIT_SHAPES[size]
        x = data(shape, seed=11 + len(kind), offset=2.0)
        mesh = explicit_mesh()
        channels = shape[1]
        batch_sharded = NamedSharding(mesh, P("d", None))
        feature_sharded = NamedSharding(mesh, P(None, "d"))
        info = dict(axis_types=[str(t) for t in mesh.axis_types])
        if kind == "batch_norm":
            f = lambda a: F.batch_norm(a, jnp.zeros(channels), jnp.ones(channels), training=True)  # noqa: E731
            xs = jax.device_put(x, batch_sharded)
            y, mean, var = jax.jit(f)(xs)
            y1, mean1, var1 = jax.jit(f)(jnp.asarray(x))
            info.update(sharding_info(y, xs), **_program_info(jax.jit(f), xs))
            return dict(x=x, y=y, mean=mean, var=var, y_single=y1, mean_single=mean1, var_single=var1), info
        if kind == "batch_norm_grad":
            w = np.random.default_rng(12).standard_normal(shape).astype(np.float32)
            loss = lambda a: jnp.sum(jnp.sin(F.batch_norm(a, jnp.zeros(channels), jnp.ones(channels),  # noqa: E731
                                                          training=True)[0]) * w)
            xs = jax.device_put(x, batch_sharded)
            g = jax.jit(jax.grad(loss))(xs)
            info.update(sharding_info(g, xs))
            return dict(x=x, g=g, g_single=jax.jit(jax.grad(loss))(jnp.asarray(x))), info
        if kind == "moments":
            xs = jax.device_put(x, batch_sharded)
            mean, var = jax.jit(lambda a: F.moments(a, 0))(xs)
            mean1, var1 = jax.jit(lambda a: F.moments(a, 0))(jnp.asarray(x))
            info.update(mean_spec=spec_of(mean))
            return dict(x=x, mean=mean, var=var, mean_single=mean1, var_single=var1), info
        if kind == "moments_eager":
            xs = jax.device_put(x, batch_sharded)
            mean, var = F.moments(xs, 0)
            mean1, var1 = F.moments(jnp.asarray(x), 0)
            return dict(x=x, mean=mean, var=var, mean_single=mean1, var_single=var1), info
        if kind == "layer_norm_feature_sharded":
            xs = jax.device_put(x, feature_sharded)
            y = jax.jit(F.layer_norm)(xs)
            info.update(sharding_info(y, xs), **_program_info(jax.jit(F.layer_norm), xs))
            return dict(x=x, y=y, y_single=jax.jit(F.layer_norm)(jnp.asarray(x))), info
        if kind == "layer_norm_batch_sharded":
            xs = jax.device_put(x, batch_sharded)
            y = jax.jit(F.layer_norm)(xs)
            info.update(sharding_info(y, xs), **_program_info(jax.jit(F.layer_norm), xs))
            return dict(x=x, y=y, y_single=jax.jit(F.layer_norm)(jnp.asarray(x))), info
        if kind in ("LayerNorm", "RMSNorm", "BatchNorm0d", "GroupNorm"):
            with jax.set_mesh(mesh):
                xs = jax.device_put(x, batch_sharded)
                if kind == "LayerNorm":
                    layer, single = brainnorm.LayerNorm(channels), brainnorm.LayerNorm(channels)
                elif kind == "RMSNorm":
                    layer, single = brainnorm.RMSNorm(channels), brainnorm.RMSNorm(channels)
                elif kind == "GroupNorm":
                    layer, single = brainnorm.GroupNorm(channels, num_groups=4), brainnorm.GroupNorm(
                        channels, num_groups=4)
                else:
                    layer, single = brainnorm.BatchNorm0d(channels, momentum=0.9), brainnorm.BatchNorm0d(
                        channels, momentum=0.9)
                step = brainstate.transform.jit(lambda a: layer(a, use_running_average=False)
                                                if kind == "BatchNorm0d" else layer(a))
                y = step(xs)
                info.update(sharding_info(y, xs), **_program_info(step, xs))
            y1 = brainstate.transform.jit(lambda a: single(a, use_running_average=False) if kind == "BatchNorm0d"
                                          else single(a))(jnp.asarray(x))
            out = dict(x=x, y=y, y_single=y1)
            if kind == "BatchNorm0d":
                out.update(mean=layer.running_mean.value, var=layer.running_var.value,
                           mean_single=single.running_mean.value, var_single=single.running_var.value)
            return out, info
        raise AssertionError(kind)

    return run


EXPLICIT_KINDS = ("batch_norm", "batch_norm_grad", "moments", "moments_eager", "layer_norm_feature_sharded",
                  "layer_norm_batch_sharded", "LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm0d")
for _kind in EXPLICIT_KINDS:
    for _size in EXPLICIT_SHAPES:
        CASES[f"explicit_{_kind}_{_size}"] = _explicit_case(_kind, _size)


# --- d. shard_map and pmap with axis_name -----------------------------------------------------------------

SHARDED_BN = (256, 1024)  # 65536 elements per device


def _bn_inputs():
    x = data(SHARDED_BN, seed=21, offset=3.0)
    channels = SHARDED_BN[1]
    rm = np.linspace(-0.5, 0.5, channels).astype(np.float32)
    rv = np.linspace(0.5, 2.0, channels).astype(np.float32)
    scale = np.linspace(0.5, 1.5, channels).astype(np.float32)
    bias = np.linspace(-0.3, 0.4, channels).astype(np.float32)
    return x, rm, rv, scale, bias


def _unsharded_bn(x, rm, rv, scale, bias):
    return jax.jit(lambda v: F.batch_norm(v, rm, rv, scale, bias, training=True, momentum=0.9))(jnp.asarray(x))


@case
def shard_map_batch_norm_axis_name():
    x, rm, rv, scale, bias = _bn_inputs()
    mesh = Mesh(np.array(jax.devices()[:NDEV]), ("d",))
    f = jax.jit(jax.shard_map(
        lambda v: F.batch_norm(v, rm, rv, scale, bias, training=True, momentum=0.9, axis_name="d"),
        mesh=mesh, in_specs=P("d"), out_specs=(P("d"), P(), P())))
    y, mean, var = f(x)
    y1, mean1, var1 = _unsharded_bn(x, rm, rv, scale, bias)
    return dict(x=x, y=y, mean=mean, var=var, y_single=y1, mean_single=mean1, var_single=var1), {}


@case
def pmap_batch_norm_axis_name():
    x, rm, rv, scale, bias = _bn_inputs()
    blocks = x.reshape((NDEV, -1) + x.shape[1:])
    y, mean, var = jax.pmap(
        lambda v: F.batch_norm(v, rm, rv, scale, bias, training=True, momentum=0.9, axis_name="d"),
        axis_name="d")(blocks)
    y1, mean1, var1 = _unsharded_bn(x, rm, rv, scale, bias)
    return dict(x=x, y=np.asarray(y).reshape(x.shape), mean=mean, var=var, y_single=y1, mean_single=mean1,
                var_single=var1), {}


@case
def shard_map_batch_norm_grad_axis_name():
    """Reverse mode through the cross-device statistics at 65536 elements per device."""
    x, rm, rv, scale, bias = _bn_inputs()
    w = np.random.default_rng(22).standard_normal(x.shape).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()[:NDEV]), ("d",))
    f = jax.shard_map(lambda v: F.batch_norm(v, rm, rv, scale, bias, training=True, axis_name="d")[0],
                      mesh=mesh, in_specs=P("d"), out_specs=P("d"))
    g = jax.jit(jax.grad(lambda v: jnp.sum(jnp.sin(f(v)) * w)))(x)
    g1 = jax.jit(jax.grad(lambda v: jnp.sum(jnp.sin(F.batch_norm(v, rm, rv, scale, bias, training=True)[0]) * w)))(
        jnp.asarray(x))
    return dict(x=x, g=g, g_single=g1), {}


@case
def shard_map_layer_norm_jvp():
    """Forward mode inside shard_map on a 65536-element block per device (no axis_name)."""
    x = data(SHARDED_BN, seed=23)
    t = np.random.default_rng(24).standard_normal(x.shape).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()[:NDEV]), ("d",))
    f = jax.jit(jax.shard_map(lambda a, b: jax.jvp(F.layer_norm, (a,), (b,)), mesh=mesh,
                              in_specs=(P("d"), P("d")), out_specs=(P("d"), P("d"))))
    y, dy = f(x, t)
    return dict(x=x, t=t, y=y, dy=dy), {}


@case
def pmap_layer_norm_jvp():
    x = data(SHARDED_BN, seed=25)
    t = np.random.default_rng(26).standard_normal(x.shape).astype(np.float32)
    split = lambda a: a.reshape((NDEV, -1) + a.shape[1:])  # noqa: E731
    y, dy = jax.pmap(lambda a, b: jax.jvp(F.layer_norm, (a,), (b,)), axis_name="d")(split(x), split(t))
    return dict(x=x, t=t, y=np.asarray(y).reshape(x.shape), dy=np.asarray(dy).reshape(x.shape)), {}


def main(argv):
    out_dir = argv[1]
    names = argv[2:] or list(CASES)
    assert len(jax.devices()) >= NDEV, jax.devices()
    results, errors, info = {}, {}, {}
    for name in names:
        try:
            arrays, facts = CASES[name]()
            for key, value in arrays.items():
                results[f"{name}/{key}"] = np.asarray(value)
            info[name] = facts
        except Exception as exc:  # recorded for the test to report
            errors[name] = f"{type(exc).__name__}: {str(exc)[:1500]}\n{traceback.format_exc(limit=-3)[-2500:]}"
    np.savez(os.path.join(out_dir, "results.npz"), **results)
    with open(os.path.join(out_dir, "meta.json"), "w") as fh:
        json.dump({"errors": errors, "info": info, "devices": len(jax.devices()), "cases": names,
                   "jax": jax.__version__}, fh)


if __name__ == "__main__":
    main(sys.argv)
