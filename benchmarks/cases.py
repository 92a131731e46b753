"""The benchmark cases: what each one builds and times, per implementation.

A case function takes the shapes (``shapes(quick)``) and a NumPy random
generator and returns its implementations (``harness.Impl``), as a list or
as a ``harness.Case`` where it departs from the command's timing. Every
implementation checks its first output: against a float64 NumPy reference
(forward cases) or against flax.nnx's (gradients, training steps, compiled
models).

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

The layer cases build each implementation with ``make_layer``: every
library's default first (brainnorm's robust two-pass variance against the
one-pass default of flax.nnx and brainstate.nn), then, where the layer
computes a variance, like for like (``LIKE_FOR_LIKE``: brainnorm with
``use_fast_variance=True``, the peers with ``use_fast_variance=False``).

Model cases (``compile``, ``e2e_*``): the parameters and other states go in
as arguments and come out updated, as in a training step
(``state_jit``, ``flax_train_step``). Untimed cases (``memory``, and the
program-size counts ``jaxpr_equations`` and ``hlo_instructions``) return a
``Case`` with the unit of what they measure.
"""

from __future__ import annotations

import re

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
BN_PADDED = "brainnorm (padding mask)"
FLAX_MASKED = "flax.nnx (masked)"
BST_MASKED = "brainstate.nn (masked)"
# like for like: each library's non-default variance (brainnorm's default is
# the robust two-pass variance, flax.nnx's and brainstate.nn's the one-pass)
BN_FAST = "brainnorm (fast variance)"
FLAX_TWO_PASS = "flax.nnx (two-pass)"
BST_TWO_PASS = "brainstate.nn (two-pass)"

# implementation name -> (library, use_fast_variance; None: the library's default)
LAYERS = {
    BN: (BN, None),
    FLAX: (FLAX, None),
    BST: (BST, None),
    BN_FAST: (BN, True),
    FLAX_TWO_PASS: (FLAX, False),
    BST_TWO_PASS: (BST, False),
}
PEERS = (FLAX, BST)  # "the faster of flax.nnx and brainstate.nn" (SPEC section 7)
TWO_PASS_PEERS = (FLAX_TWO_PASS, BST_TWO_PASS)
LIKE_FOR_LIKE = (BN_FAST, FLAX_TWO_PASS, BST_TWO_PASS)

CASES = (
    "floor",
    "layernorm",
    "rmsnorm",
    "masked_layernorm",
    "padded_layernorm",
    "batchnorm2d",
    "groupnorm",
    "grad_layernorm",
    "grad_rmsnorm",
    "grad_batchnorm2d",
    "grad_groupnorm",
    "sim_loop",
    "compile",
    "jaxpr_equations",
    "hlo_instructions",
    "memory",
    "e2e_convnet",
    "e2e_snn",
)
# the cases whose layers compute a variance: run with every library's default
# and like for like (the LIKE_FOR_LIKE implementations)
VARIANCE_CASES = ("layernorm", "batchnorm2d", "groupnorm", "grad_layernorm", "grad_batchnorm2d", "grad_groupnorm")
GROUPS = {
    "grad": tuple(c for c in CASES if c.startswith("grad_")),
    "mask": ("masked_layernorm", "padded_layernorm"),
    "variance": VARIANCE_CASES,
    "counts": ("jaxpr_equations", "hlo_instructions"),
    "e2e": tuple(c for c in CASES if c.startswith("e2e_")),
}

TITLES = {
    "floor": "bandwidth floor x*a+b",
    "layernorm": "LayerNorm forward",
    "rmsnorm": "RMSNorm forward",
    "masked_layernorm": "masked LayerNorm forward, random mask",
    "padded_layernorm": "masked LayerNorm forward, padding mask (B, 1)",
    "batchnorm2d": "BatchNorm2d training forward",
    "groupnorm": "GroupNorm forward",
    "grad_layernorm": "LayerNorm forward+backward",
    "grad_rmsnorm": "RMSNorm forward+backward",
    "grad_batchnorm2d": "BatchNorm2d (training) forward+backward",
    "grad_groupnorm": "GroupNorm forward+backward",
    "sim_loop": "LayerNorm in a simulation loop",
    "compile": "trace+compile of jit(grad(loss)), MLP of Linear-LayerNorm-BatchNorm0d-relu blocks",
    "jaxpr_equations": "jaxpr equations (every nesting level) of jit(grad(loss)) of one MLP block",
    "hlo_instructions": "optimized HLO instructions (every computation) of jit(grad(loss)) of one MLP block",
    "memory": "temporary + output bytes of the compiled jit(grad) of LayerNorm (and masked)",
    "e2e_convnet": "training step of a conv net with BatchNorm2d",
    "e2e_snn": "training step of a spiking network with tdBN (multi-step)",
}

CLASSES = 10  # of the end-to-end models
LEARNING_RATE = 0.05
EPS = {"layernorm": 1e-6, "rmsnorm": 1e-6, "batchnorm2d": 1e-5, "groupnorm": 1e-6}
VALID_FRACTION = 0.8  # of the masks' positions (random mask) or rows (padding mask)


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
    if case in ("compile", "jaxpr_equations", "hlo_instructions"):
        blocks, batch, width = sh["mlp"]
        blocks = blocks if case == "compile" else 1  # the counts are of one block
        return f"{blocks}x{width} on {batch}x{width}"
    if case == "e2e_convnet":
        return "x".join(map(str, sh["conv"][:4]))
    if case == "e2e_snn":
        return "x".join(map(str, sh["snn"][:3]))
    key = {"layernorm": "rows", "rmsnorm": "rows", "masked_layernorm": "rows", "padded_layernorm": "rows",
           "grad_layernorm": "rows",
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


def make_layer(name, kind, shape, groups=None):
    """The ``kind`` layer of implementation ``name`` (see ``LAYERS``) for inputs of ``shape``.

    Returns ``(module, apply)``, ``apply(module, x, mask=None)`` its training
    call: batch statistics for BatchNorm (brainnorm ``use_running_average=False``,
    brainstate.nn under ``environ.context(fit=True)``, flax.nnx built with
    ``use_running_average=False``). brainstate.nn's GroupNorm takes the
    channel count as ``in_size`` (its feature axis must be the only axis) and
    reduces over every other axis but the first.
    """
    library, fast = LAYERS[name]
    n, eps = shape[-1], EPS[kind]
    variance = {} if fast is None or kind == "rmsnorm" else {"use_fast_variance": fast}
    if library == FLAX:
        need_nnx()
        r = nnx.Rngs(0)
        if kind == "layernorm":
            m = nnx.LayerNorm(n, epsilon=eps, rngs=r, **variance)
        elif kind == "rmsnorm":
            m = nnx.RMSNorm(n, epsilon=eps, rngs=r)
        elif kind == "batchnorm2d":
            m = nnx.BatchNorm(n, use_running_average=False, epsilon=eps, rngs=r, **variance)
        else:
            m = nnx.GroupNorm(n, num_groups=groups, epsilon=eps, rngs=r, **variance)
        return m, lambda m, x, mask=None: m(x, mask=mask)
    lib = brainnorm if library == BN else brainstate.nn
    if kind == "layernorm":
        m = lib.LayerNorm(n, epsilon=eps, **variance)
    elif kind == "rmsnorm":
        m = lib.RMSNorm(n, epsilon=eps)
    elif kind == "batchnorm2d":
        m = lib.BatchNorm2d(shape[1:], epsilon=eps, **variance)
    elif library == BN:
        m = brainnorm.GroupNorm(shape[1:], num_groups=groups, epsilon=eps, **variance)
    else:
        m = brainstate.nn.GroupNorm((n,), num_groups=groups, epsilon=eps, **variance)
    if kind != "batchnorm2d":
        return m, lambda m, x, mask=None: m(x, mask=mask)
    if library == BN:
        return m, lambda m, x, mask=None: m(x, mask=mask, use_running_average=False)

    def fit(m, x, mask=None):
        with brainstate.environ.context(fit=True):
            return m(x, mask=mask)

    return m, fit


def set_affine(name, module, scale, bias=None):
    (set_flax_affine if LAYERS[name][0] == FLAX else set_brainstate_affine)(module, scale, bias)


def forward_builder(name, kind, shape, scale, bias, groups=None, with_mask=False):
    """``build`` of the jitted forward of implementation ``name``: ``f(x[, mask]) -> (y, new statistics)``.

    The statistics are flax.nnx's batch statistics or the brainstate states
    the call wrote (none for the per-sample layers).
    """

    def build():
        m, apply = make_layer(name, kind, shape, groups)
        set_affine(name, m, scale, bias)
        if LAYERS[name][0] == FLAX:
            return flax_jit(m, apply)
        # the mask is an argument, never a constant
        return stateful_jit((lambda x, mask: apply(m, x, mask)) if with_mask else (lambda x: apply(m, x)))

    return build


def reference(kind, x, scale, bias, groups=None, mask=None):
    """The float64 NumPy output of layer ``kind`` (training statistics for BatchNorm2d)."""
    eps = EPS[kind]
    if kind == "layernorm":
        return ref_layer_norm(x, scale, bias, eps, mask=mask)
    if kind == "rmsnorm":
        return ref_rms_norm(x, scale, eps)
    if kind == "batchnorm2d":
        return ref_layer_norm(x, scale, bias, eps, axes=(0, 1, 2))  # batch statistics per channel
    return ref_group_norm(x, groups, scale, bias, eps)


def torch_builder(kind, x_np, scale, bias, groups=None):
    """``build`` of PyTorch's eager layer (channels first for BatchNorm2d and GroupNorm) and its output check."""
    n, eps = x_np.shape[-1], EPS[kind]

    def build():
        need_torch()
        if kind == "layernorm":
            m = torch.nn.LayerNorm(n, eps=eps)
        elif kind == "rmsnorm":
            m = torch.nn.RMSNorm(n, eps=eps)
        elif kind == "batchnorm2d":
            m = torch.nn.BatchNorm2d(n, eps=eps).train()  # running statistics updated in place
        else:
            m = torch.nn.GroupNorm(groups, n, eps=eps)
        set_torch_affine(m, scale, bias)
        xt = np.moveaxis(x_np, -1, 1) if kind in ("batchnorm2d", "groupnorm") else x_np
        xt = torch.from_numpy(np.ascontiguousarray(xt))

        def call():
            with torch.no_grad():
                return m(xt)

        return call

    return build, (nchw if kind in ("batchnorm2d", "groupnorm") else to_numpy)


def _layer_case(sh, rng, kind):
    """The forward of one layer: every library's default, PyTorch, then like for like (see ``LAYERS``)."""
    shape = sh["rows"] if kind in ("layernorm", "rmsnorm") else sh["image"]
    groups = sh["groups"]
    x_np = rng.standard_normal(shape, dtype=np.float32)
    x = jnp.asarray(x_np)
    scale, bias = random_affine(rng, shape[-1])
    if kind == "rmsnorm":
        bias = None
    want = reference(kind, x_np, scale, bias, groups)

    def jax_impl(name):
        build = forward_builder(name, kind, shape, scale, bias, groups)
        return Impl(name, lambda: (lambda f: lambda: f(x))(build()), check=lambda o: max_err(o[0], want))

    torch_build, torch_out = torch_builder(kind, x_np, scale, bias, groups)
    variants = LIKE_FOR_LIKE if kind != "rmsnorm" else ()  # RMSNorm computes no variance
    flr = floor_fn(shape, rng)
    return [
        *(jax_impl(name) for name in (BN, FLAX, BST)),
        Impl(TORCH, torch_build, kind="torch", check=lambda o: max_err(torch_out(o), want)),
        *(jax_impl(name) for name in variants),
        Impl(FLOOR, lambda: lambda: flr(x)),
    ]


def case_layernorm(sh, rng):
    return _layer_case(sh, rng, "layernorm")


def case_rmsnorm(sh, rng):
    return _layer_case(sh, rng, "rmsnorm")


def case_batchnorm2d(sh, rng):
    return _layer_case(sh, rng, "batchnorm2d")


def case_groupnorm(sh, rng):
    return _layer_case(sh, rng, "groupnorm")


def _masked_case(sh, rng, padding):
    """LayerNorm with a mask as an argument: random (``padding=False``) or constant along the normalized axis.

    The random mask has the input's shape; the padding mask is ``(B, 1)``
    (whole rows valid or padding, about ``VALID_FRACTION`` valid), and the
    outputs are checked on the valid rows only: a padding row has no valid
    element, and flax.nnx and brainstate.nn return NaN there (0 / 0).
    """
    shape = sh["rows"]
    x_np = rng.standard_normal(shape, dtype=np.float32)
    mask_np = rng.random((shape[0], 1) if padding else shape) < VALID_FRACTION
    if padding:
        mask_np[0] = True  # at least one valid row
    x, mask = jnp.asarray(x_np), jnp.asarray(mask_np)
    scale, bias = random_affine(rng, shape[-1])
    valid = mask_np[:, 0] if padding else slice(None)
    with np.errstate(invalid="ignore", divide="ignore"):  # padding rows: 0 / 0
        want = ref_layer_norm(x_np, scale, bias, EPS["layernorm"], mask=np.broadcast_to(mask_np, shape))[valid]
    want_unmasked = ref_layer_norm(x_np, scale, bias, EPS["layernorm"])

    def masked(name, library):
        build = forward_builder(library, "layernorm", shape, scale, bias, with_mask=True)
        return Impl(name, lambda: (lambda f: lambda: f(x, mask))(build()),
                    check=lambda o: max_err(to_numpy(o[0])[valid], want))

    unmasked = forward_builder(BN, "layernorm", shape, scale, bias)
    flr = floor_fn(shape, rng)
    return [
        masked(BN_PADDED if padding else BN_MASKED, BN),
        masked(FLAX, FLAX),
        masked(BST, BST),
        Impl(BN_UNMASKED, lambda: (lambda f: lambda: f(x))(unmasked()),
             check=lambda o: max_err(o[0], want_unmasked)),
        Impl(FLOOR, lambda: lambda: flr(x)),
    ]


def case_masked_layernorm(sh, rng):
    return _masked_case(sh, rng, padding=False)


def case_padded_layernorm(sh, rng):
    return _masked_case(sh, rng, padding=True)


def grad_builder(name, kind, shape, scale, bias, groups=None):
    """``build`` of implementation ``name``'s jitted gradient of ``sum(layer(x, mask=mask) * c)``.

    The built function is ``f(x, c, mask=None) -> ((parameter gradients,
    dx), new running statistics)``, the gradient taken w.r.t. ``x`` and the
    parameters: ``brainstate.transform.grad`` with
    ``grad_states=model.states(ParamState)`` for brainnorm and brainstate.nn,
    ``jax.grad`` over ``nnx.split``/``nnx.merge`` for flax.nnx.
    """

    def build():
        m, apply = make_layer(name, kind, shape, groups)
        set_affine(name, m, scale, bias)
        if LAYERS[name][0] == FLAX:
            graphdef, params, rest = nnx.split(m, nnx.Param, ...)

            def flax_loss(p, x, c, mask):
                mm = nnx.merge(graphdef, p, rest, copy=True)
                return jnp.sum(apply(mm, x, mask) * c), nnx.state(mm, nnx.BatchStat)

            flax_grad = jax.grad(flax_loss, argnums=(0, 1), has_aux=True)
            return jax.jit(lambda x, c, mask=None: flax_grad(params, x, c, mask))

        def loss(x, c, mask):
            return jnp.sum(apply(m, x, mask) * c)

        grad = brainstate.transform.grad(loss, grad_states=m.states(brainstate.ParamState), argnums=0)
        return stateful_jit(lambda x, c, mask=None: grad(x, c, mask))

    return build


def grad_values(name):
    """``(gradient output) -> {"x": dx, "scale": ..., "bias": ...}`` for ``PeerCheck``."""
    if LAYERS[name][0] == FLAX:
        def values(out):
            (pgrads, dx), _ = out
            return {"x": to_numpy(dx), **{k: to_numpy(v.get_value()) for k, v in pgrads.items()}}
    else:
        def values(out):
            (pgrads, dx), _ = out
            (leaf,) = pgrads.values()
            return {"x": to_numpy(dx), **{k: to_numpy(v) for k, v in leaf.items()}}
    return values


def _grad_case(sh, rng, kind):
    """jax.grad of sum(layer(x) * c) w.r.t. x and the parameters; c is a fixed random cotangent."""
    shape = sh["rows"] if kind in ("layernorm", "rmsnorm") else sh["image"]
    x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    cot = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    scale, bias = random_affine(rng, shape[-1])
    if kind == "rmsnorm":
        bias = None
    # every implementation's gradients against flax.nnx's (relative to their largest entry)
    peers = PeerCheck()
    flr = floor_fn(shape, rng)

    def impl(name):
        build = grad_builder(name, kind, shape, scale, bias, sh["groups"])
        return Impl(name, lambda: (lambda f: lambda: f(x, cot))(build()), check=peers.check(name, grad_values(name)))

    variants = LIKE_FOR_LIKE if kind != "rmsnorm" else ()
    return [
        *(impl(name) for name in (BN, FLAX, BST, *variants)),
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
    eps = EPS["layernorm"]
    xs_np = rng.standard_normal(shape, dtype=np.float32)
    xs = jnp.asarray(xs_np)
    scale, bias = random_affine(rng, n)
    want = ref_layer_norm(xs_np, scale, bias, eps)

    def loop(name):
        def build():
            m, _ = make_layer(name, "layernorm", shape, None)
            set_brainstate_affine(m, scale, bias)
            f = stateful_jit(lambda xs: brainstate.transform.for_loop(m, xs))  # one update per step
            return lambda: f(xs)

        return build

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
        Impl(BN, loop(BN), check=lambda o: max_err(o[0], want)),
        Impl(SCAN, scan, check=lambda o: max_err(o, want)),
        Impl(BST, loop(BST), check=lambda o: max_err(o[0], want)),
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
    mask = jnp.asarray(rng.random(shape) < VALID_FRACTION)
    scale, bias = random_affine(rng, shape[-1])

    def measured(library, args):
        make = grad_builder(library, "layernorm", shape, scale, bias)

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
    impls = []
    for check, args, names in ((plain, (x, cot), (BN, FLAX, BST)),
                               (masked, (x, cot, mask), (BN_MASKED, FLAX_MASKED, BST_MASKED))):
        for library, name in zip((BN, FLAX, BST), names):
            impls.append(Impl(name, measured(library, args), check=check.check(name, grad_values(library))))
    return Case(impls, unit="MiB")


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
    """Linear -> LayerNorm -> BatchNorm0d (training) -> relu, with brainnorm's or brainstate.nn's layers.

    brainstate.nn's BatchNorm0d uses batch statistics only under
    ``brainstate.environ.context(fit=True)`` (see ``_mlp_gradient``).
    """

    def __init__(self, width, library=BN):
        super().__init__()
        self.linear = brainstate.nn.Linear(width, width, **_ZERO_W)
        if library == BN:
            self.ln = brainnorm.LayerNorm(width, epsilon=1e-6)
            self.bn = brainnorm.BatchNorm0d(width, epsilon=1e-5, use_running_average=False)
        else:
            self.ln = brainstate.nn.LayerNorm(width, epsilon=1e-6)
            self.bn = brainstate.nn.BatchNorm0d(width, epsilon=1e-5)

    def update(self, x):
        return jax.nn.relu(self.bn(self.ln(self.linear(x))))


class MLP(brainstate.nn.Module):
    def __init__(self, blocks, width, library=BN):
        super().__init__()
        self.blocks = [MLPBlock(width, library) for _ in range(blocks)]

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
def _mlp_gradient(library, blocks, width, leaves):
    """``jit(grad(loss))`` of the MLP of ``library`` (BN, BST or FLAX) with parameters ``leaves``.

    ``loss = sum(mlp(x) * c)``, the gradient w.r.t. the parameters, the
    running statistics returned. Returns ``(make, statistics)``: ``make()``
    builds afresh the gradient transform, the ``jax.jit`` object and the
    model's state collection (``model.states()``, ``nnx.split``), and returns
    ``(jitted, args)``, to be called as ``jitted(*args, x, c)``;
    ``statistics(output)`` gives the new running statistics of every block,
    in the order of their sorted paths (for ``PeerCheck``).
    """

    def statistics(values):
        return {f"running statistic {i}": to_numpy(v) for i, v in enumerate(values)}

    if library == FLAX:
        need_nnx()
        model = FlaxMLP(blocks, width, nnx.Rngs(0))
        set_flax_params(model, leaves)

        def make_flax():
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)

            def loss(p, rest, x, c):
                m = nnx.merge(graphdef, p, rest, copy=True)
                return jnp.sum(m(x) * c), nnx.state(m, nnx.BatchStat)

            return jax.jit(jax.grad(loss, has_aux=True)), (params, rest)

        def flax_statistics(out):
            _grads, batch_stats = out
            return statistics(jax.tree.leaves(batch_stats))

        return make_flax, flax_statistics

    model = MLP(blocks, width, library)
    set_brainstate_params(model, leaves)
    paths = list(model.states().keys())  # the order of the state values state_jit returns
    states = list(model.states().values())
    values = [st.value for st in states]

    if library == BST:
        def loss(x, c):
            with brainstate.environ.context(fit=True):  # batch statistics in brainstate.nn's BatchNorm0d
                return jnp.sum(model(x) * c)
    else:
        def loss(x, c):
            return jnp.sum(model(x) * c)

    def make():
        grad = brainstate.transform.grad(loss, grad_states=model.states(brainstate.ParamState))
        return state_jit(grad, states), (values,)

    def brainstate_statistics(out):
        _grads, new_values = out
        return statistics(v for path, v in zip(paths, new_values) if path[-1] in ("running_mean", "running_var"))

    return make, brainstate_statistics


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
    leaves = random_params(rng, brainstate_param_leaves(MLP(blocks, width)))
    peers = PeerCheck()

    def impl(library):
        def build():
            make, statistics = _mlp_gradient(library, blocks, width, leaves)

            def compile_():
                jitted, args = make()
                run = compile_fresh(jitted, *args, x, cot)
                return lambda: statistics(run())

            return compile_

        return Impl(library, build, kind="host", before=jax.clear_caches, check=peers.check(library, lambda run: run()))

    return Case([impl(BN), impl(FLAX), impl(BST)], runs=1, warmup=0, min_time=0.0, max_rounds=5)


# ---------------------------------------------------------------------------
# program size: jaxpr equations and optimized HLO instructions of one block
# ---------------------------------------------------------------------------
def count_jaxpr_equations(jaxpr):
    """The equations of a (closed) jaxpr at every nesting level, and the number of nested jaxprs.

    Every equation counts once, a call-like one (``jit``/``pjit``,
    ``custom_jvp_call``, ``custom_vjp_call``, ``cond``, ``scan``, ...) as
    well as every equation of the jaxprs in its parameters.
    """
    equations = nested = 0
    todo = [getattr(jaxpr, "jaxpr", jaxpr)]
    while todo:
        current = todo.pop()
        for eqn in current.eqns:
            equations += 1
            for sub in _jaxprs_in(list(eqn.params.values())):
                nested += 1
                todo.append(sub)
    return equations, nested


def _jaxprs_in(values):
    """The jaxprs (a ``ClosedJaxpr``'s jaxpr, or a ``Jaxpr``) among ``values`` and in their lists and tuples."""
    out = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out.extend(_jaxprs_in(v))
        elif hasattr(v, "eqns"):
            out.append(v)
        elif hasattr(getattr(v, "jaxpr", None), "eqns"):
            out.append(v.jaxpr)
    return out


_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%[^\s=]+\s*=\s")
_HLO_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%\S+\s.*\{\s*$")


def count_hlo_instructions(text):
    """The instructions (``%name = ...`` lines) of an HLO module's text, per computation.

    Returns ``(instructions of every computation, computations, instructions
    of the entry computation)``.
    """
    instructions = computations = entry = 0
    in_entry = False
    for line in text.splitlines():
        if _HLO_COMPUTATION.match(line):
            computations += 1
            in_entry = line.startswith("ENTRY")
        elif _HLO_INSTRUCTION.match(line):
            instructions += 1
            entry += in_entry
    return instructions, computations, entry


def _count_case(sh, rng, what):
    """Untimed: the size of ``jit(grad(loss))`` of one MLP block (the ``compile`` case's block) per library.

    ``what`` is ``"jaxpr"`` (``jax.make_jaxpr`` of the jitted gradient,
    equations at every nesting level) or ``"hlo"`` (instructions of
    ``jitted.lower(...).compile().as_text()``, every computation, fusions'
    bodies included). The check runs the program and compares the new
    running statistics with flax.nnx's.
    """
    _blocks, batch, width = sh["mlp"]
    x = jnp.asarray(rng.standard_normal((batch, width), dtype=np.float32))
    cot = jnp.asarray(rng.standard_normal((batch, width), dtype=np.float32))
    leaves = random_params(rng, brainstate_param_leaves(MLP(1, width)))
    peers = PeerCheck()

    def impl(library):
        def build():
            make, statistics = _mlp_gradient(library, 1, width, leaves)

            def call():
                jitted, args = make()
                args = (*args, x, cot)
                if what == "jaxpr":
                    value, nested = count_jaxpr_equations(jax.make_jaxpr(jitted)(*args))
                    details = {"jaxpr_equations": value, "nested_jaxprs": nested}
                    run = lambda: jitted(*args)  # noqa: E731
                else:
                    compiled = jitted.lower(*args).compile()
                    value, computations, entry = count_hlo_instructions(compiled.as_text())
                    details = {"hlo_instructions": value, "computations": computations,
                               "entry_instructions": entry}
                    run = lambda: compiled(*args)  # noqa: E731
                return value, details, lambda: statistics(run())

            return call

        return Impl(library, build, check=peers.check(library, lambda run: run()))

    return Case([impl(BN), impl(FLAX), impl(BST)], unit="count")


def case_jaxpr_equations(sh, rng):
    return _count_case(sh, rng, "jaxpr")


def case_hlo_instructions(sh, rng):
    return _count_case(sh, rng, "hlo")


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
