"""The benchmark cases: what each one builds and times, per implementation.

A case function takes the shapes (``shapes(quick)``) and a NumPy random
generator and returns its implementations (``harness.Impl``), as a list or
as a ``harness.Case`` where it departs from the command's timing. Every
implementation checks its first output: against a float64 NumPy reference
(forward cases) or against flax.nnx's (gradients, training steps).

Per-layer cases: every JAX implementation is one ``jax.jit`` of a pure
function of the data arrays only (``x``, and ``mask`` or the cotangent ``c``);
the module is closed over, so its parameters are compile-time constants for
every framework alike (flax modules through ``nnx.split``/``nnx.merge``;
brainstate and brainnorm modules read their states directly, and state
writes such as BatchNorm running statistics are traced inside a
``brainstate.StateTraceStack``, returned as outputs and rolled back, so the
compiled function is pure and the new statistics are not dead code).
Parameters are random, not ones and zeros, so XLA cannot fold them away.
PyTorch runs eagerly (``torch.no_grad()``; default threads).

Model cases (``compile``, ``e2e_*``): the parameters and other states go in
as arguments and come out updated, as in a training step
(``state_jit``, ``flax_train_step``).
"""

from __future__ import annotations

from harness import Case, Impl, Skip  # first: pins the allocator before anything allocates

import numpy as np  # noqa: E402

import brainstate  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import brainnorm  # noqa: E402

try:  # flax.nnx is a test dependency, not a runtime one
    from flax import nnx
except Exception as exc:  # pragma: no cover - depends on the environment
    nnx = None
    _NNX_ERROR = f"flax.nnx not importable: {exc}"
else:
    _NNX_ERROR = ""

try:  # PyTorch is optional
    import torch
except Exception as exc:  # pragma: no cover - depends on the environment
    torch = None
    _TORCH_ERROR = f"torch not importable: {exc}"
else:
    _TORCH_ERROR = ""


# ---------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------
BN = "brainnorm"
FLAX = "flax.nnx"
BST = "brainstate.nn"
TORCH = "torch"
FLOOR = "floor (x*a+b)"
SCAN = "hand-written lax.scan"
BN_MASKED = "brainnorm (masked)"
BN_UNMASKED = "brainnorm (unmasked)"
FLAX_MASKED = "flax.nnx (masked)"

CASES = (
    "floor",
    "layernorm",
    "rmsnorm",
    "masked_layernorm",
    "batchnorm2d",
    "groupnorm",
    "grad_layernorm",
    "grad_rmsnorm",
    "grad_batchnorm2d",
    "grad_groupnorm",
    "sim_loop",
    "compile",
    "memory",
    "e2e_convnet",
    "e2e_snn",
)
GROUPS = {
    "grad": tuple(c for c in CASES if c.startswith("grad_")),
    "e2e": tuple(c for c in CASES if c.startswith("e2e_")),
}

TITLES = {
    "floor": "bandwidth floor x*a+b",
    "layernorm": "LayerNorm forward",
    "rmsnorm": "RMSNorm forward",
    "masked_layernorm": "masked LayerNorm forward",
    "batchnorm2d": "BatchNorm2d training forward",
    "groupnorm": "GroupNorm forward",
    "grad_layernorm": "LayerNorm forward+backward",
    "grad_rmsnorm": "RMSNorm forward+backward",
    "grad_batchnorm2d": "BatchNorm2d (training) forward+backward",
    "grad_groupnorm": "GroupNorm forward+backward",
    "sim_loop": "LayerNorm in a simulation loop",
    "compile": "trace+compile of jit(grad(loss)), MLP of Linear-LayerNorm-BatchNorm0d-relu blocks",
    "memory": "temporary + output bytes of the compiled jit(grad) of LayerNorm (and masked)",
    "e2e_convnet": "training step of a conv net with BatchNorm2d",
    "e2e_snn": "training step of a spiking network with tdBN (multi-step)",
}

CLASSES = 10  # of the end-to-end models
LEARNING_RATE = 0.05


def shapes(quick: bool) -> dict:
    """The shapes of every case.

    ``mlp``: (blocks, batch, width); ``conv``: (batch, height, width,
    in_channels, channels); ``snn``: (steps, batch, inputs, hidden).
    """
    if quick:
        return {"rows": (256, 128), "image": (4, 8, 8, 64), "groups": 32, "loop": (50, 16, 128),
                "mlp": (2, 16, 32), "conv": (4, 8, 8, 1, 8), "snn": (4, 8, 16, 32)}
    return {"rows": (4096, 1024), "image": (32, 32, 32, 64), "groups": 32, "loop": (5000, 64, 128),
            "mlp": (20, 256, 512), "conv": (32, 28, 28, 1, 32), "snn": (8, 64, 128, 256)}


def shape_note(case, sh):
    """The shape shown beside the case's name in the table."""
    if case == "floor":
        return ""
    if case == "compile":
        blocks, batch, width = sh["mlp"]
        return f"{blocks}x{width} on {batch}x{width}"
    if case == "e2e_convnet":
        return "x".join(map(str, sh["conv"][:4]))
    if case == "e2e_snn":
        return "x".join(map(str, sh["snn"][:3]))
    key = {"layernorm": "rows", "rmsnorm": "rows", "masked_layernorm": "rows", "grad_layernorm": "rows",
           "grad_rmsnorm": "rows", "memory": "rows", "sim_loop": "loop"}.get(case, "image")
    return "x".join(map(str, sh[key]))


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def need_nnx():
    if nnx is None:
        raise Skip(_NNX_ERROR)


def need_torch():
    if torch is None:
        raise Skip(_TORCH_ERROR)


def random_affine(rng, n):
    """Random scale and bias (not 1 and 0, which XLA could fold away)."""
    scale = (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(n)).astype(np.float32)
    return scale, bias


def set_brainstate_affine(module, scale, bias=None):
    """Write scale/bias into the NormalizationParamState(s) of a brainstate or brainnorm layer."""
    found = False
    for state in module.states(brainstate.ParamState).values():
        value = state.value
        if not isinstance(value, dict):
            continue
        new = dict(value)
        if "scale" in value:
            new["scale"] = jnp.asarray(scale, value["scale"].dtype).reshape(value["scale"].shape)
            found = True
        if "bias" in value and bias is not None:
            new["bias"] = jnp.asarray(bias, value["bias"].dtype).reshape(value["bias"].shape)
        state.value = new
    if not found:
        raise RuntimeError(f"no scale parameter found in {type(module).__name__}")


def set_flax_affine(module, scale, bias=None):
    module.scale.set_value(jnp.asarray(scale))
    if bias is not None:
        module.bias.set_value(jnp.asarray(bias))


def set_torch_affine(module, scale, bias=None):
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(scale))
        if bias is not None:
            module.bias.copy_(torch.from_numpy(bias))


def random_params(rng, leaves):
    """Random values for a model's parameter leaves.

    Vectors (biases, scales: every axis but the last of size 1) become their
    value plus 0.1 standard normal; weights and kernels standard normal over
    the square root of their fan-in.
    """
    out = []
    for leaf in leaves:
        leaf = np.asarray(leaf)
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if leaf.size == leaf.shape[-1]:
            out.append((leaf + 0.1 * noise).astype(np.float32))
        else:
            out.append(noise / np.float32(np.sqrt(leaf.size // leaf.shape[-1])))
    return out


def brainstate_param_leaves(module):
    """The parameter leaves of a brainstate module, in the order of their sorted paths."""
    return jax.tree.leaves({k: st.value for k, st in module.states(brainstate.ParamState).items()})


def set_brainstate_params(module, leaves):
    """Write parameter leaves (as from ``brainstate_param_leaves``, any shapes of the same sizes)."""
    states = module.states(brainstate.ParamState)
    values = {k: st.value for k, st in states.items()}
    new = jax.tree.unflatten(jax.tree.structure(values), _fit(leaves, jax.tree.leaves(values)))
    for key, st in states.items():
        st.value = new[key]


def set_flax_params(module, leaves):
    """Write parameter leaves into a flax.nnx module, in the order of their sorted paths."""
    params = nnx.state(module, nnx.Param)
    nnx.update(module, jax.tree.unflatten(jax.tree.structure(params), _fit(leaves, jax.tree.leaves(params))))


def _fit(leaves, like):
    """``leaves`` reshaped to the shapes of ``like``; models with the same attribute names match leaf by leaf."""
    if len(leaves) != len(like) or any(np.size(a) != np.size(b) for a, b in zip(leaves, like)):
        raise ValueError(f"parameters do not match: {[np.shape(a) for a in leaves]} vs {[np.shape(b) for b in like]}")
    return [jnp.asarray(a, b.dtype).reshape(b.shape) for a, b in zip(leaves, like)]


def stateful_jit(fn):
    """``jax.jit`` of ``fn`` that may write brainstate states: returns ``(out, new_values)``.

    The writes are traced inside a ``brainstate.StateTraceStack``, returned as
    outputs and rolled back, so the compiled function is pure (no state is
    touched at run time) and the written values are not dead code.
    """

    def pure(*args):
        with brainstate.StateTraceStack() as trace:
            out = fn(*args)
        written = [st.value for st, w in zip(trace.states, trace.been_writen) if w]
        trace.recovery_original_values()
        return out, written

    return jax.jit(pure)


def state_jit(fn, states):
    """``jax.jit`` of ``fn`` over the values of ``states``: ``(values, *args) -> (out, new values)``.

    The states' values go in as arguments (as ``brainstate.transform.jit``
    passes them) and come out as ``fn`` left them; the states themselves are
    restored after tracing, so the compiled function is pure.
    """
    states = list(states)

    def pure(values, *args):
        with brainstate.StateTraceStack() as trace:
            for st, value in zip(states, values):
                st.value = value
            out = fn(*args)
            new_values = [st.value for st in states]
        trace.recovery_original_values()
        return out, new_values

    return jax.jit(pure)


def flax_jit(module, fn=None):
    """``jax.jit`` of ``fn(module, *args)`` over ``nnx.split``/``nnx.merge``; returns ``(out, batch_stats)``."""
    graphdef, state = nnx.split(module)
    fn = fn or (lambda m, *a: m(*a))

    def pure(*args):
        m = nnx.merge(graphdef, state, copy=True)  # fresh Variables inside the trace
        out = fn(m, *args)
        return out, nnx.state(m, nnx.BatchStat)

    return jax.jit(pure)


def floor_fn(x_shape, rng):
    a, b = random_affine(rng, x_shape[-1])
    a, b = jnp.asarray(a), jnp.asarray(b)
    return jax.jit(lambda x: x * a + b)


def to_numpy(a):
    if torch is not None and isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


class PeerCheck:
    """Checks implementations against a reference implementation's values (flax.nnx's by default).

    ``check(name, extract)`` is an ``Impl.check``: ``extract`` turns the
    first output into a dict of arrays (the same keys for every
    implementation). The error is the largest over the entries of
    ``max |value - reference|`` divided by the entry's largest reference
    magnitude, or by a thousandth of the largest over all entries where that
    is larger: a gradient that vanishes in exact arithmetic (the bias of a
    layer followed by BatchNorm) is rounding noise in every implementation.
    An implementation checked before the reference reports nothing on its
    row; the reference's row reports the largest error of those.
    """

    def __init__(self, reference=FLAX):
        self.reference = reference
        self.values = {}

    def check(self, name, extract):
        def check(out):
            self.values[name] = {k: np.asarray(v, np.float64).ravel() for k, v in extract(out).items()}
            if name != self.reference:
                return self._error(name) if self.reference in self.values else None
            return max((self._error(n) for n in self.values if n != name), default=None)

        return check

    def _error(self, name):
        got, want = self.values[name], self.values[self.reference]
        if got.keys() != want.keys():
            raise ValueError(f"{name} and {self.reference} give different entries: {sorted(got)} vs {sorted(want)}")
        floor = 1e-3 * max(float(np.max(np.abs(b), initial=0.0)) for b in want.values())
        errors = []
        for key, b in want.items():
            a = got[key]
            if a.shape != b.shape:
                raise ValueError(f"{key}: shape {a.shape} against {b.shape}")
            errors.append(float(np.max(np.abs(a - b), initial=0.0)) / max(np.max(np.abs(b), initial=0.0), floor, 1e-30))
        return max(errors)


# ---------------------------------------------------------------------------
# float64 NumPy references for the output checks
# ---------------------------------------------------------------------------
def ref_layer_norm(x, scale, bias, eps, mask=None, axes=(-1,)):
    x = x.astype(np.float64)
    if mask is None:
        mean = x.mean(axis=axes, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    else:
        cnt = mask.sum(axis=axes, keepdims=True)
        mean = np.where(mask, x, 0).sum(axis=axes, keepdims=True) / cnt
        var = np.where(mask, (x - mean) ** 2, 0).sum(axis=axes, keepdims=True) / cnt
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def ref_rms_norm(x, scale, eps):
    x = x.astype(np.float64)
    return x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + eps) * scale


def ref_group_norm(x, groups, scale, bias, eps):
    b, h, w, c = x.shape
    xg = x.astype(np.float64).reshape(b, h, w, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def max_err(got, want):
    got = to_numpy(got)
    if got.shape != want.shape:
        raise ValueError(f"output shape {got.shape}, expected {want.shape}")
    return float(np.max(np.abs(got.astype(np.float64) - want)))


def nchw(y):
    """A PyTorch channels-first output as channels-last NumPy."""
    return np.moveaxis(to_numpy(y), 1, -1)


# ---------------------------------------------------------------------------
# per-layer cases
# ---------------------------------------------------------------------------
def case_floor(sh, rng):
    impls = []
    for label, shape in (("rows", sh["rows"]), ("image", sh["image"])):
        x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
        f = floor_fn(shape, rng)
        impls.append(Impl(f"{FLOOR} {'x'.join(map(str, shape))}", lambda f=f, x=x: lambda: f(x)))
    return impls


def _rows_case(sh, rng, kind):
    shape = sh["rows"]
    n = shape[-1]
    eps = 1e-6
    x_np = rng.standard_normal(shape, dtype=np.float32)
    x = jnp.asarray(x_np)
    scale, bias = random_affine(rng, n)
    if kind == "layernorm":
        want = ref_layer_norm(x_np, scale, bias, eps)
    else:
        want = ref_rms_norm(x_np, scale, eps)
        bias = None
    check = lambda y: max_err(y, want)  # noqa: E731

    def bn():
        m = brainnorm.LayerNorm(n, epsilon=eps) if kind == "layernorm" else brainnorm.RMSNorm(n, epsilon=eps)
        set_brainstate_affine(m, scale, bias)
        f = jax.jit(lambda x: m(x))
        return lambda: f(x)

    def fx():
        need_nnx()
        cls = nnx.LayerNorm if kind == "layernorm" else nnx.RMSNorm
        m = cls(n, epsilon=eps, rngs=nnx.Rngs(0))
        set_flax_affine(m, scale, bias)
        f = flax_jit(m)
        return lambda: f(x)

    def bs():
        m = brainstate.nn.LayerNorm(n, epsilon=eps) if kind == "layernorm" else brainstate.nn.RMSNorm(n, epsilon=eps)
        set_brainstate_affine(m, scale, bias)
        f = jax.jit(lambda x: m(x))
        return lambda: f(x)

    def th():
        need_torch()
        m = torch.nn.LayerNorm(n, eps=eps) if kind == "layernorm" else torch.nn.RMSNorm(n, eps=eps)
        set_torch_affine(m, scale, bias)
        xt = torch.from_numpy(x_np)

        def call():
            with torch.no_grad():
                return m(xt)

        return call

    flr = floor_fn(shape, rng)
    return [
        Impl(BN, bn, check=lambda o: check(o)),
        Impl(FLAX, fx, check=lambda o: check(o[0])),
        Impl(BST, bs, check=lambda o: check(o)),
        Impl(TORCH, th, kind="torch", check=lambda o: check(o)),
        Impl(FLOOR, lambda: lambda: flr(x)),
    ]


def case_layernorm(sh, rng):
    return _rows_case(sh, rng, "layernorm")


def case_rmsnorm(sh, rng):
    return _rows_case(sh, rng, "rmsnorm")


def case_masked_layernorm(sh, rng):
    shape = sh["rows"]
    n = shape[-1]
    eps = 1e-6
    x_np = rng.standard_normal(shape, dtype=np.float32)
    mask_np = rng.random(shape) < 0.8
    x, mask = jnp.asarray(x_np), jnp.asarray(mask_np)
    scale, bias = random_affine(rng, n)
    want = ref_layer_norm(x_np, scale, bias, eps, mask=mask_np)
    want_unmasked = ref_layer_norm(x_np, scale, bias, eps)

    def bn_masked():
        m = brainnorm.LayerNorm(n, epsilon=eps)
        set_brainstate_affine(m, scale, bias)
        f = jax.jit(lambda x, mask: m(x, mask=mask))  # the mask is an argument, never a constant
        return lambda: f(x, mask)

    def bn_unmasked():
        m = brainnorm.LayerNorm(n, epsilon=eps)
        set_brainstate_affine(m, scale, bias)
        f = jax.jit(lambda x: m(x))
        return lambda: f(x)

    def fx():
        need_nnx()
        m = nnx.LayerNorm(n, epsilon=eps, rngs=nnx.Rngs(0))
        set_flax_affine(m, scale, bias)
        f = flax_jit(m, lambda m, x, mask: m(x, mask=mask))
        return lambda: f(x, mask)

    def bs():
        m = brainstate.nn.LayerNorm(n, epsilon=eps)
        set_brainstate_affine(m, scale, bias)
        f = jax.jit(lambda x, mask: m(x, mask=mask))
        return lambda: f(x, mask)

    flr = floor_fn(shape, rng)
    return [
        Impl(BN_MASKED, bn_masked, check=lambda o: max_err(o, want)),
        Impl(FLAX, fx, check=lambda o: max_err(o[0], want)),
        Impl(BST, bs, check=lambda o: max_err(o, want)),
        Impl(BN_UNMASKED, bn_unmasked, check=lambda o: max_err(o, want_unmasked)),
        Impl(FLOOR, lambda: lambda: flr(x)),
    ]


def case_batchnorm2d(sh, rng):
    shape = sh["image"]
    c = shape[-1]
    eps = 1e-5
    x_np = rng.standard_normal(shape, dtype=np.float32)
    x = jnp.asarray(x_np)
    scale, bias = random_affine(rng, c)
    want = ref_layer_norm(x_np, scale, bias, eps, axes=(0, 1, 2))  # batch statistics per channel

    def bn():
        m = brainnorm.BatchNorm2d(shape[1:], epsilon=eps)
        set_brainstate_affine(m, scale, bias)
        f = stateful_jit(lambda x: m(x, use_running_average=False))  # returns (y, new running stats)
        return lambda: f(x)

    def bs():
        m = brainstate.nn.BatchNorm2d(shape[1:], epsilon=eps)
        set_brainstate_affine(m, scale, bias)

        def train(x):
            with brainstate.environ.context(fit=True):
                return m(x)

        f = stateful_jit(train)
        return lambda: f(x)

    def fx():
        need_nnx()
        m = nnx.BatchNorm(c, use_running_average=False, epsilon=eps, rngs=nnx.Rngs(0))
        set_flax_affine(m, scale, bias)
        f = flax_jit(m)  # returns (y, new batch stats)
        return lambda: f(x)

    def th():
        need_torch()
        m = torch.nn.BatchNorm2d(c, eps=eps).train()
        set_torch_affine(m, scale, bias)
        xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_np, -1, 1)))

        def call():
            with torch.no_grad():
                return m(xt)  # running statistics updated in place

        return call

    flr = floor_fn(shape, rng)
    return [
        Impl(BN, bn, check=lambda o: max_err(o[0], want)),
        Impl(BST, bs, check=lambda o: max_err(o[0], want)),
        Impl(FLAX, fx, check=lambda o: max_err(o[0], want)),
        Impl(TORCH, th, kind="torch", check=lambda o: max_err(nchw(o), want)),
        Impl(FLOOR, lambda: lambda: flr(x)),
    ]


def case_groupnorm(sh, rng):
    shape = sh["image"]
    c, groups = shape[-1], sh["groups"]
    eps = 1e-6
    x_np = rng.standard_normal(shape, dtype=np.float32)
    x = jnp.asarray(x_np)
    scale, bias = random_affine(rng, c)
    want = ref_group_norm(x_np, groups, scale, bias, eps)

    def bn():
        m = brainnorm.GroupNorm(shape[1:], num_groups=groups, epsilon=eps)
        set_brainstate_affine(m, scale, bias)
        f = jax.jit(lambda x: m(x))
        return lambda: f(x)

    def fx():
        need_nnx()
        m = nnx.GroupNorm(c, num_groups=groups, epsilon=eps, rngs=nnx.Rngs(0))
        set_flax_affine(m, scale, bias)
        f = flax_jit(m)
        return lambda: f(x)

    def th():
        need_torch()
        m = torch.nn.GroupNorm(groups, c, eps=eps)
        set_torch_affine(m, scale, bias)
        xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_np, -1, 1)))

        def call():
            with torch.no_grad():
                return m(xt)

        return call

    flr = floor_fn(shape, rng)
    return [
        Impl(BN, bn, check=lambda o: max_err(o, want)),
        Impl(FLAX, fx, check=lambda o: max_err(o[0], want)),
        Impl(TORCH, th, kind="torch", check=lambda o: max_err(nchw(o), want)),
        Impl(FLOOR, lambda: lambda: flr(x)),
    ]


def _layer_grads(kind, shape, scale, bias, groups=None):
    """Builders of brainnorm's and flax.nnx's jitted gradient of ``sum(layer(x, mask=mask) * c)``.

    Each returns ``f(x, c, mask=None) -> ((parameter gradients, dx), new
    running statistics)``, the gradient taken w.r.t. ``x`` and the
    parameters; plus the functions that turn those outputs into the dicts
    ``PeerCheck`` compares.
    """
    n = shape[-1]

    def make_bn():
        if kind == "layernorm":
            return brainnorm.LayerNorm(n, epsilon=1e-6), {}
        if kind == "rmsnorm":
            return brainnorm.RMSNorm(n, epsilon=1e-6), {}
        if kind == "batchnorm2d":
            return brainnorm.BatchNorm2d(shape[1:], epsilon=1e-5), {"use_running_average": False}
        return brainnorm.GroupNorm(shape[1:], num_groups=groups, epsilon=1e-6), {}

    def make_flax():
        r = nnx.Rngs(0)
        if kind == "layernorm":
            return nnx.LayerNorm(n, epsilon=1e-6, rngs=r)
        if kind == "rmsnorm":
            return nnx.RMSNorm(n, epsilon=1e-6, rngs=r)
        if kind == "batchnorm2d":
            return nnx.BatchNorm(n, use_running_average=False, epsilon=1e-5, rngs=r)
        return nnx.GroupNorm(n, num_groups=groups, epsilon=1e-6, rngs=r)

    def bn():
        m, kw = make_bn()
        set_brainstate_affine(m, scale, bias)
        params = m.states(brainstate.ParamState)

        def loss(x, c, mask):
            return jnp.sum(m(x, mask=mask, **kw) * c)

        grad = brainstate.transform.grad(loss, grad_states=params, argnums=0)
        return stateful_jit(lambda x, c, mask=None: grad(x, c, mask))

    def fx():
        need_nnx()
        m = make_flax()
        set_flax_affine(m, scale, bias)
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)

        def loss(p, x, c, mask):
            mm = nnx.merge(graphdef, p, rest, copy=True)
            return jnp.sum(mm(x, mask=mask) * c), nnx.state(mm, nnx.BatchStat)

        grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
        return jax.jit(lambda x, c, mask=None: grad(params, x, c, mask))

    def grads_bn(out):
        (pgrads, dx), _ = out
        (leaf,) = pgrads.values()
        return {"x": to_numpy(dx), **{k: to_numpy(v) for k, v in leaf.items()}}

    def grads_flax(out):
        (pgrads, dx), _ = out
        return {"x": to_numpy(dx), **{k: to_numpy(v.get_value()) for k, v in pgrads.items()}}

    return bn, fx, grads_bn, grads_flax


def _grad_case(sh, rng, kind):
    """jax.grad of sum(layer(x) * c) w.r.t. x and the parameters; c is a fixed random cotangent."""
    shape = sh["rows"] if kind in ("layernorm", "rmsnorm") else sh["image"]
    x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    cot = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    scale, bias = random_affine(rng, shape[-1])
    if kind == "rmsnorm":
        bias = None
    bn, fx, grads_bn, grads_flax = _layer_grads(kind, shape, scale, bias, sh["groups"])
    # brainnorm's gradients against flax.nnx's (relative to their largest entry)
    peers = PeerCheck()
    flr = floor_fn(shape, rng)

    def timed(make):
        def build():
            f = make()
            return lambda: f(x, cot)

        return build

    return [
        Impl(BN, timed(bn), check=peers.check(BN, grads_bn)),
        Impl(FLAX, timed(fx), check=peers.check(FLAX, grads_flax)),
        Impl(FLOOR, lambda: lambda: flr(x)),
    ]


def case_grad_layernorm(sh, rng):
    return _grad_case(sh, rng, "layernorm")


def case_grad_rmsnorm(sh, rng):
    return _grad_case(sh, rng, "rmsnorm")


def case_grad_batchnorm2d(sh, rng):
    return _grad_case(sh, rng, "batchnorm2d")


def case_grad_groupnorm(sh, rng):
    return _grad_case(sh, rng, "groupnorm")


def case_sim_loop(sh, rng):
    shape = sh["loop"]  # (steps, batch, features)
    n = shape[-1]
    eps = 1e-6
    xs_np = rng.standard_normal(shape, dtype=np.float32)
    xs = jnp.asarray(xs_np)
    scale, bias = random_affine(rng, n)
    want = ref_layer_norm(xs_np, scale, bias, eps)

    def bn():
        m = brainnorm.LayerNorm(n, epsilon=eps)
        set_brainstate_affine(m, scale, bias)
        f = stateful_jit(lambda xs: brainstate.transform.for_loop(m, xs))  # one update per step
        return lambda: f(xs)

    def scan():
        s, b = jnp.asarray(scale), jnp.asarray(bias)

        def step(carry, x):
            mean = jnp.mean(x, axis=-1, keepdims=True)
            xc = x - mean
            var = jnp.mean(xc * xc, axis=-1, keepdims=True)
            return carry, xc * jax.lax.rsqrt(var + eps) * s + b

        f = jax.jit(lambda xs: jax.lax.scan(step, None, xs)[1])
        return lambda: f(xs)

    flr = floor_fn(shape, rng)
    return [
        Impl(BN, bn, check=lambda o: max_err(o[0], want)),
        Impl(SCAN, scan, check=lambda o: max_err(o, want)),
        Impl(FLOOR, lambda: lambda: flr(xs)),
    ]


# ---------------------------------------------------------------------------
# memory: the compiled gradient's temporary and output buffers
# ---------------------------------------------------------------------------
def case_memory(sh, rng):
    """``compiled.memory_analysis()`` of the jitted gradient of LayerNorm, plain and masked (untimed)."""
    shape = sh["rows"]
    x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    cot = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    mask = jnp.asarray(rng.random(shape) < 0.8)
    scale, bias = random_affine(rng, shape[-1])
    bn, fx, grads_bn, grads_flax = _layer_grads("layernorm", shape, scale, bias)

    def measured(make, args):
        def build():
            f = make()

            def call():
                compiled = f.lower(*args).compile()
                analysis = compiled.memory_analysis()
                if analysis is None:
                    raise RuntimeError("compiled.memory_analysis() is not available on this backend")
                details = {"temp_mib": analysis.temp_size_in_bytes / 2**20,
                           "output_mib": analysis.output_size_in_bytes / 2**20}
                return details["temp_mib"] + details["output_mib"], details, compiled(*args)

            return call

        return build

    plain, masked = PeerCheck(FLAX), PeerCheck(FLAX_MASKED)
    return Case([
        Impl(BN, measured(bn, (x, cot)), check=plain.check(BN, grads_bn)),
        Impl(FLAX, measured(fx, (x, cot)), check=plain.check(FLAX, grads_flax)),
        Impl(BN_MASKED, measured(bn, (x, cot, mask)), check=masked.check(BN_MASKED, grads_bn)),
        Impl(FLAX_MASKED, measured(fx, (x, cot, mask)), check=masked.check(FLAX_MASKED, grads_flax)),
    ], unit="MiB")


# ---------------------------------------------------------------------------
# models: the same attribute names in every framework, so that the sorted
# parameter paths match leaf by leaf (see set_brainstate_params / set_flax_params)
# ---------------------------------------------------------------------------
# Every model's parameters are overwritten with the same random values
# (random_params); zero initializers skip compiling the frameworks' random ones.
_ZERO_W = {"w_init": brainstate.nn.init.ZeroInit()}

def cross_entropy(logits, labels):
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0])


def surrogate_spike(u, slope=4.0):
    """Heaviside step of ``u`` forward; the derivative of ``sigmoid(slope * u)`` backward (straight-through)."""
    soft = jax.nn.sigmoid(slope * u)
    return soft + jax.lax.stop_gradient((u >= 0).astype(u.dtype) - soft)


def lif_rates(currents, decay=0.9, threshold=1.0):
    """Mean spike count of leaky integrate-and-fire neurons driven by ``currents`` (T, batch, neurons).

    ``v = v * decay + I``; a spike where ``v`` reaches the threshold, which
    resets ``v`` to 0.
    """

    def step(v, current):
        v = v * decay + current
        spike = surrogate_spike(v - threshold)
        return v * (1.0 - spike), spike

    _, spikes = jax.lax.scan(step, jnp.zeros_like(currents[0]), currents)
    return spikes.mean(axis=0)


class MLPBlock(brainstate.nn.Module):
    """Linear -> LayerNorm -> BatchNorm0d (training) -> relu, brainnorm's layers."""

    def __init__(self, width):
        super().__init__()
        self.linear = brainstate.nn.Linear(width, width, **_ZERO_W)
        self.ln = brainnorm.LayerNorm(width, epsilon=1e-6)
        self.bn = brainnorm.BatchNorm0d(width, epsilon=1e-5, use_running_average=False)

    def update(self, x):
        return jax.nn.relu(self.bn(self.ln(self.linear(x))))


class MLP(brainstate.nn.Module):
    def __init__(self, blocks, width):
        super().__init__()
        self.blocks = [MLPBlock(width) for _ in range(blocks)]

    def update(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class ConvNet(brainstate.nn.Module):
    """Two 3x3 convs, each followed by a BatchNorm2d (``norm``) and relu; global mean pool; Linear."""

    def __init__(self, size, channels, norm):
        super().__init__()
        height, width, in_channels = size
        self.conv1 = brainstate.nn.Conv2d((height, width, in_channels), channels, 3, **_ZERO_W)
        self.bn1 = norm((height, width, channels))
        self.conv2 = brainstate.nn.Conv2d((height, width, channels), channels, 3, **_ZERO_W)
        self.bn2 = norm((height, width, channels))
        self.fc = brainstate.nn.Linear(channels, CLASSES, **_ZERO_W)

    def update(self, x):
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = jax.nn.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(axis=(1, 2)))


class FlatBatchNorm(brainstate.nn.Module):
    """brainstate.nn.BatchNorm0d over the flattened (T * batch, features) currents.

    (brainstate's BatchNorm1d takes (batch, length, features).)
    """

    def __init__(self, features):
        super().__init__()
        self.bn = brainstate.nn.BatchNorm0d(features)

    def update(self, x):
        return self.bn(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class SNN(brainstate.nn.Module):
    """Linear per step -> normalization of the (T, batch, hidden) currents -> LIF -> Linear on the spike rates."""

    def __init__(self, inputs, hidden, norm):
        super().__init__()
        self.fc_in = brainstate.nn.Linear(inputs, hidden, **_ZERO_W)
        self.norm = norm
        self.readout = brainstate.nn.Linear(hidden, CLASSES, **_ZERO_W)

    def update(self, xs):
        return self.readout(lif_rates(self.norm(self.fc_in(xs))))


if nnx is not None:  # the same models in flax.nnx

    _ZEROS = {"kernel_init": nnx.initializers.zeros_init()}

    class FlaxMLPBlock(nnx.Module):
        def __init__(self, width, rngs):
            self.linear = nnx.Linear(width, width, **_ZEROS, rngs=rngs)
            self.ln = nnx.LayerNorm(width, epsilon=1e-6, rngs=rngs)
            self.bn = nnx.BatchNorm(width, use_running_average=False, epsilon=1e-5, rngs=rngs)

        def __call__(self, x):
            return jax.nn.relu(self.bn(self.ln(self.linear(x))))

    class FlaxMLP(nnx.Module):
        def __init__(self, blocks, width, rngs):
            self.blocks = nnx.List([FlaxMLPBlock(width, rngs) for _ in range(blocks)])

        def __call__(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    class FlaxConvNet(nnx.Module):
        def __init__(self, size, channels, rngs):
            in_channels = size[-1]
            self.conv1 = nnx.Conv(in_channels, channels, (3, 3), use_bias=False, **_ZEROS, rngs=rngs)
            self.bn1 = nnx.BatchNorm(channels, use_running_average=False, rngs=rngs)
            self.conv2 = nnx.Conv(channels, channels, (3, 3), use_bias=False, **_ZEROS, rngs=rngs)
            self.bn2 = nnx.BatchNorm(channels, use_running_average=False, rngs=rngs)
            self.fc = nnx.Linear(channels, CLASSES, **_ZEROS, rngs=rngs)

        def __call__(self, x):
            x = jax.nn.relu(self.bn1(self.conv1(x)))
            x = jax.nn.relu(self.bn2(self.conv2(x)))
            return self.fc(x.mean(axis=(1, 2)))

    class FlaxSNN(nnx.Module):
        def __init__(self, inputs, hidden, rngs):
            self.fc_in = nnx.Linear(inputs, hidden, **_ZEROS, rngs=rngs)
            self.norm = nnx.BatchNorm(hidden, use_running_average=False, rngs=rngs)
            self.readout = nnx.Linear(hidden, CLASSES, **_ZEROS, rngs=rngs)

        def __call__(self, xs):
            currents = self.fc_in(xs)
            currents = self.norm(currents.reshape(-1, currents.shape[-1])).reshape(currents.shape)
            return self.readout(lif_rates(currents))


def brainstate_train_step(model, loss_fn):
    """One SGD step of a brainstate model, jitted: ``(state values, x, labels) -> ((loss, grads), new values)``.

    Returns the jitted step and the current state values. Runs with
    ``environ`` ``fit=True``, so that brainstate.nn's BatchNorm trains.
    """
    params = model.states(brainstate.ParamState)

    def step(x, labels):
        with brainstate.environ.context(fit=True):
            grads, loss = brainstate.transform.grad(
                lambda: loss_fn(model(x), labels), grad_states=params, return_value=True)()
        for key, st in params.items():
            st.value = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, st.value, grads[key])
        return loss, grads

    states = list(model.states().values())
    return state_jit(step, states), [st.value for st in states]


def flax_train_step(model, loss_fn):
    """One SGD step of a flax.nnx model, jitted: ``(params, rest, x, labels) -> ((loss, grads), (params, rest))``.

    Returns the jitted step and the current parameters and other states (the batch statistics).
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def step(params, rest, x, labels):
        def loss(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            value = loss_fn(m(x), labels)
            return value, nnx.split(m, nnx.Param, ...)[2]

        (value, new_rest), grads = jax.value_and_grad(loss, has_aux=True)(params)
        new_params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
        return (value, grads), (new_params, new_rest)

    return jax.jit(step), params, rest


def step_values(out):
    """The loss and the gradients of a training step's output, for ``PeerCheck``."""
    (loss, grads), _ = out
    leaves = jax.tree.leaves(grads)
    return {"loss": to_numpy(loss), **{f"gradient {i}": to_numpy(g) for i, g in enumerate(leaves)}}


def _train_case(rng, x, labels, bn_model, bst_model, flax_model):
    """The training step of the same model in brainnorm, flax.nnx and brainstate.nn (same parameters)."""
    leaves = random_params(rng, brainstate_param_leaves(bn_model()))
    peers = PeerCheck()

    def brainstate_impl(make):
        def build():
            model = make()
            set_brainstate_params(model, leaves)
            f, values = brainstate_train_step(model, cross_entropy)
            return lambda: f(values, x, labels)

        return build

    def fx():
        need_nnx()
        model = flax_model()
        set_flax_params(model, leaves)
        f, params, rest = flax_train_step(model, cross_entropy)
        return lambda: f(params, rest, x, labels)

    return [
        Impl(BN, brainstate_impl(bn_model), check=peers.check(BN, step_values)),
        Impl(FLAX, fx, check=peers.check(FLAX, step_values)),
        Impl(BST, brainstate_impl(bst_model), check=peers.check(BST, step_values)),
    ]


# ---------------------------------------------------------------------------
# model cases
# ---------------------------------------------------------------------------
def case_compile(sh, rng):
    """Trace+compile time of ``jax.jit(grad(loss)).lower(...).compile()`` for an MLP (a few compilations).

    Before every call the JAX caches are cleared, and the persistent
    compilation cache is off during it, so each call traces and compiles
    anew; the gradient and the jitted function are built inside the call too
    (brainstate caches traced functions per transform object).

    The check runs the compiled programs once and compares the new running
    statistics of every block, which depend continuously on the inputs. The
    gradients are not compared here (the ``grad_*`` cases do that for each
    layer): a relu whose input lies within float32 rounding of 0 passes the
    cotangent in one implementation and not in the other, and such a flip
    moves a parameter gradient summed over the batch by several percent.
    """
    blocks, batch, width = sh["mlp"]
    x = jnp.asarray(rng.standard_normal((batch, width), dtype=np.float32))
    cot = jnp.asarray(rng.standard_normal((batch, width), dtype=np.float32))
    reference = MLP(blocks, width)
    leaves = random_params(rng, brainstate_param_leaves(reference))
    state_paths = list(reference.states().keys())  # the order of the state values state_jit returns
    peers = PeerCheck()

    def loss_of(model):
        return lambda x, c: jnp.sum(model(x) * c)

    def bn():
        model = MLP(blocks, width)
        set_brainstate_params(model, leaves)
        states = list(model.states().values())
        values = [st.value for st in states]

        def compile_():
            grad = brainstate.transform.grad(loss_of(model), grad_states=model.states(brainstate.ParamState))
            return compile_fresh(state_jit(grad, states), values, x, cot)

        return compile_

    def fx():
        need_nnx()
        model = FlaxMLP(blocks, width, nnx.Rngs(0))
        set_flax_params(model, leaves)

        def compile_():
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)

            def loss(p, rest, x, c):
                m = nnx.merge(graphdef, p, rest, copy=True)
                return loss_of(m)(x, c), nnx.state(m, nnx.BatchStat)

            return compile_fresh(jax.jit(jax.grad(loss, has_aux=True)), params, rest, x, cot)

        return compile_

    def statistics(values):
        return {f"running statistic {i}": to_numpy(v) for i, v in enumerate(values)}

    def bn_statistics(run):
        _grads, new_values = run()
        return statistics(v for path, v in zip(state_paths, new_values) if path[-1] in ("running_mean", "running_var"))

    def flax_statistics(run):
        _grads, batch_stats = run()
        return statistics(jax.tree.leaves(batch_stats))

    return Case([
        Impl(BN, bn, kind="host", before=jax.clear_caches, check=peers.check(BN, bn_statistics)),
        Impl(FLAX, fx, kind="host", before=jax.clear_caches, check=peers.check(FLAX, flax_statistics)),
    ], runs=1, warmup=0, min_time=0.0, max_rounds=5)


def compile_fresh(jitted, *args):
    """Trace and compile ``jitted`` for ``args`` with the persistent compilation cache off.

    Returns a callable that runs the compiled program on ``args`` (for the output check).
    """
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        compiled = jitted.lower(*args).compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
    return lambda: compiled(*args)


def case_e2e_convnet(sh, rng):
    """One training step (forward, cross-entropy, gradient, SGD, BatchNorm statistics) of a small conv net."""
    batch, height, width, in_channels, channels = sh["conv"]
    size = (height, width, in_channels)
    x = jnp.asarray(rng.standard_normal((batch, *size), dtype=np.float32))
    labels = jnp.asarray(rng.integers(0, CLASSES, batch))
    return _train_case(
        rng, x, labels,
        bn_model=lambda: ConvNet(size, channels, lambda s: brainnorm.BatchNorm2d(s, use_running_average=False)),
        bst_model=lambda: ConvNet(size, channels, brainstate.nn.BatchNorm2d),
        flax_model=lambda: FlaxConvNet(size, channels, nnx.Rngs(0)),
    )


def case_e2e_snn(sh, rng):
    """One training step of a spiking network: tdBN (multi-step) against BatchNorm over (T * batch, hidden)."""
    steps, batch, inputs, hidden = sh["snn"]
    xs = jnp.asarray((rng.random((steps, batch, inputs)) < 0.2).astype(np.float32))  # input spikes
    labels = jnp.asarray(rng.integers(0, CLASSES, batch))

    def tdbn():
        return brainnorm.ThresholdDependentBatchNorm(hidden, step_mode="multi", use_running_average=False)

    return _train_case(
        rng, xs, labels,
        bn_model=lambda: SNN(inputs, hidden, tdbn()),
        bst_model=lambda: SNN(inputs, hidden, FlatBatchNorm(hidden)),
        flax_model=lambda: FlaxSNN(inputs, hidden, nnx.Rngs(0)),
    )


CASE_FUNCS = {name: globals()[f"case_{name}"] for name in CASES}
