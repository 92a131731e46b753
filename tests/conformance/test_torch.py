"""brainnorm against PyTorch 2.13 (CPU): same inputs, same parameters.

Compared for every layer: outputs, gradients of ``sum(y * c)`` (``c`` a
fixed random cotangent) with respect to the input and to every parameter,
and for layers with running statistics their trajectory over ``STEPS``
training steps (each step a forward and backward pass followed by the same
SGD update of the parameters on both sides), then evaluation.

Convention mapping (see docs/porting.rst): brainnorm ``momentum`` is
``1 - torch momentum``; ``unbiased_running_var=True`` gives torch's running
variance; torch's channels-first input ``(N, C, *S)`` is brainnorm
``in_size=(C, *S)`` with ``feature_axis=0``, and channels-last layouts are
tested through a transpose of the same data.

Tolerances (float32 unless stated):
- outputs and running statistics: ``ATOL = 1e-5`` absolute;
- gradients: ``GRAD_TOL = 1e-4`` relative plus absolute;
- float64 (RMSNorm ``eps=None``): ``ATOL64 = 1e-12`` absolute.
"""

from __future__ import annotations

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainnorm

from ._common import brainnorm_grads, check, sample, sgd

torch = pytest.importorskip("torch", reason="PyTorch is needed for the PyTorch conformance tests")

ATOL = 1e-5
GRAD_TOL = 1e-4
ATOL64 = 1e-12
STEPS = 5
LR = 0.01
PEER = "torch"

torch.set_num_threads(1)


# --------------------------------------------------------------------------- helpers


def torch_grads(module, x, cotangent):
    """``(y, dx, {parameter name: grad})`` of ``sum(module(x) * cotangent)``."""
    module.zero_grad(set_to_none=True)
    xt = torch.tensor(np.asarray(x), requires_grad=True)
    y = module(xt)
    (y * torch.tensor(np.asarray(cotangent))).sum().backward()
    grads = {n: p.grad.numpy().copy() for n, p in module.named_parameters() if p.grad is not None}
    return y.detach().numpy().copy(), xt.grad.numpy().copy(), grads


def torch_sgd(module, lr):
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= lr * p.grad


def set_torch(param, value):
    with torch.no_grad():
        param.copy_(torch.tensor(np.asarray(value).reshape(tuple(param.shape))))


class Layout:
    """torch ``(N, C, *S)`` data seen channels-first or channels-last by brainnorm."""

    def __init__(self, last):
        self.last = last

    def in_size(self, shape):
        return tuple(shape[2:]) + (shape[1],) if self.last else tuple(shape[1:])

    @property
    def feature_axis(self):
        return -1 if self.last else 0

    def to_bn(self, a):
        return np.moveaxis(a, 1, -1) if self.last and a.ndim > 2 else a

    def from_bn(self, a):
        return np.moveaxis(a, -1, 1) if self.last and a.ndim > 2 else a


def compare_affine(layer_name, quantity, bn_params, torch_params, *, atol, rtol=0.0):
    """brainnorm ``{'scale', 'bias'}`` (feature-shaped) against torch ``weight``/``bias``."""
    if "scale" in bn_params or "weight" in torch_params:
        check(PEER, layer_name, quantity, np.ravel(bn_params["scale"]), np.ravel(torch_params["weight"]),
              atol=atol, rtol=rtol)
    if "bias" in bn_params or "bias" in torch_params:
        check(PEER, layer_name, quantity, np.ravel(bn_params["bias"]), np.ravel(torch_params["bias"]),
              atol=atol, rtol=rtol)


def random_affine(rng, channels):
    return 1.0 + 0.3 * rng.standard_normal(channels), 0.2 * rng.standard_normal(channels)


# --------------------------------------------------------------------------- BatchNorm

BN_SHAPES = {0: (8, 3), 1: (6, 3, 5), 2: (4, 3, 4, 5), 3: (3, 2, 3, 4, 3)}
BN_CASES = [
    # (spatial dims, channels last, torch momentum)
    (0, True, 0.1),
    (0, True, None),
    (1, False, 0.1),
    (1, True, None),
    (1, False, None),
    (2, False, 0.1),
    (2, True, 0.1),
    (2, False, None),
    (3, False, 0.3),
    (3, True, None),
]


def _batch_norm_pair(dims, last, momentum, rng, *, affine=True, track_running_stats=True):
    shape = BN_SHAPES[dims]
    channels = shape[1]
    layout = Layout(last)
    torch_cls = {0: torch.nn.BatchNorm1d, 1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d,
                 3: torch.nn.BatchNorm3d}[dims]
    peer = torch_cls(channels, eps=1e-5, momentum=momentum, affine=affine, track_running_stats=track_running_stats)
    kwargs = {}
    if affine:
        scale, bias = random_affine(rng, channels)
        set_torch(peer.weight, scale)
        set_torch(peer.bias, bias)
        kwargs = dict(scale_initializer=scale, bias_initializer=bias)
    bn_cls = getattr(brainnorm, f"BatchNorm{dims}d")
    ours = bn_cls(
        layout.in_size(shape), layout.feature_axis, epsilon=1e-5,
        momentum=None if momentum is None else 1.0 - momentum, unbiased_running_var=True, affine=affine,
        track_running_stats=track_running_stats, **kwargs,
    )
    return shape, layout, peer, ours


def _step(name, layout, peer, ours, x, cot, *, fit):
    if ours.weight is not None:  # parameters after the previous SGD steps
        compare_affine(name, "params", ours.weight.value,
                       {n: p.detach().numpy() for n, p in peer.named_parameters()}, atol=ATOL)
    y_t, dx_t, dp_t = torch_grads(peer, x, cot)
    with brainstate.environ.context(fit=fit):
        y, dx, dp = brainnorm_grads(ours, layout.to_bn(x), layout.to_bn(cot))
    check(PEER, name, "output", layout.from_bn(y), y_t, atol=ATOL)
    check(PEER, name, "grad x", layout.from_bn(dx), dx_t, atol=GRAD_TOL, rtol=GRAD_TOL)
    if ours.weight is not None:
        compare_affine(name, "grad params", dp[("weight",)], dp_t, atol=GRAD_TOL, rtol=GRAD_TOL)
    return dp


def _train_and_eval(name, layout, peer, ours, shape, rng):
    cot = sample(rng, shape, 0.0, 1.0)
    for step in range(STEPS):
        x = sample(rng, shape, offset=0.5 + 0.4 * step, spread=1.0 + 0.2 * step)
        peer.train()
        dp = _step(name, layout, peer, ours, x, cot, fit=True)
        torch_sgd(peer, LR)
        if ours.weight is not None:
            sgd(ours, dp, LR)
        if ours.track_running_stats:
            check(PEER, name, "running_mean", np.ravel(ours.running_mean.value), peer.running_mean.numpy(), atol=ATOL)
            check(PEER, name, "running_var", np.ravel(ours.running_var.value), peer.running_var.numpy(), atol=ATOL)
            assert int(ours.num_batches_tracked.value) == step + 1
            if name.startswith("BatchNorm"):  # torch's InstanceNorm leaves its counter at 0
                assert int(peer.num_batches_tracked) == step + 1
    peer.eval()
    x = sample(rng, shape, offset=1.0, spread=1.3)
    running = None
    if ours.track_running_stats:
        running = (np.asarray(ours.running_mean.value), np.asarray(ours.running_var.value))
    _step(name, layout, peer, ours, x, cot, fit=False)
    if running is not None:  # evaluation writes nothing
        np.testing.assert_array_equal(ours.running_mean.value, running[0])
        np.testing.assert_array_equal(ours.running_var.value, running[1])
        assert int(ours.num_batches_tracked.value) == STEPS


@pytest.mark.parametrize("dims, last, momentum", BN_CASES)
def test_batch_norm(dims, last, momentum, rng):
    shape, layout, peer, ours = _batch_norm_pair(dims, last, momentum, rng)
    name = f"BatchNorm{dims}d"
    _train_and_eval(name, layout, peer, ours, shape, rng)


@pytest.mark.parametrize("affine, track_running_stats", [(False, True), (True, False), (False, False)])
def test_batch_norm_affine_and_tracking_options(affine, track_running_stats, rng):
    shape, layout, peer, ours = _batch_norm_pair(2, False, 0.1, rng, affine=affine,
                                                 track_running_stats=track_running_stats)
    assert (ours.weight is None) == (not affine)
    _train_and_eval("BatchNorm2d", layout, peer, ours, shape, rng)


# --------------------------------------------------------------------------- InstanceNorm

IN_SHAPES = {1: (4, 3, 6), 2: (3, 2, 4, 5)}
IN_CASES = [
    # (spatial dims, channels last, affine, track_running_stats)
    (1, False, True, False),
    (1, False, False, True),
    (1, True, True, True),
    (2, False, True, True),
    (2, True, False, False),
    (2, False, False, False),
]


@pytest.mark.parametrize("dims, last, affine, track", IN_CASES)
def test_instance_norm(dims, last, affine, track, rng):
    shape = IN_SHAPES[dims]
    channels = shape[1]
    layout = Layout(last)
    torch_cls = torch.nn.InstanceNorm1d if dims == 1 else torch.nn.InstanceNorm2d
    peer = torch_cls(channels, eps=1e-5, momentum=0.1, affine=affine, track_running_stats=track)
    kwargs = dict(use_scale=False, use_bias=False)
    if affine:
        scale, bias = random_affine(rng, channels)
        set_torch(peer.weight, scale)
        set_torch(peer.bias, bias)
        kwargs = dict(scale_init=scale, bias_init=bias)
    ours = brainnorm.InstanceNorm(
        layout.in_size(shape), layout.feature_axis, epsilon=1e-5, momentum=0.9, unbiased_running_var=True,
        track_running_stats=track, **kwargs,
    )
    name = f"InstanceNorm{dims}d"
    _train_and_eval(name, layout, peer, ours, shape, rng)


# --------------------------------------------------------------------------- GroupNorm

GN_CASES = [
    # (torch shape (N, C, *S), groups, channels last, affine)
    ((4, 4, 6), 2, False, True),
    ((4, 4, 6), 4, True, True),
    ((3, 6, 4, 5), 3, False, True),
    ((3, 6, 4, 5), 2, True, True),
    ((3, 6, 4, 5), 1, False, False),
    ((2, 4, 3, 3, 2), 2, True, True),
]


@pytest.mark.parametrize("shape, groups, last, affine", GN_CASES)
def test_group_norm(shape, groups, last, affine, rng):
    channels = shape[1]
    layout = Layout(last)
    peer = torch.nn.GroupNorm(groups, channels, eps=1e-5, affine=affine)
    kwargs = dict(use_scale=False, use_bias=False)
    if affine:
        scale, bias = random_affine(rng, channels)
        set_torch(peer.weight, scale)
        set_torch(peer.bias, bias)
        kwargs = dict(scale_init=scale, bias_init=bias)
    ours = brainnorm.GroupNorm(layout.in_size(shape), layout.feature_axis, groups, epsilon=1e-5, **kwargs)
    cot = sample(rng, shape, 0.0, 1.0)
    for step in range(2):
        x = sample(rng, shape, offset=0.5 + step, spread=1.0 + step)
        dp = _step("GroupNorm", layout, peer, ours, x, cot, fit=True)
        torch_sgd(peer, LR)
        if affine:
            sgd(ours, dp, LR)


# --------------------------------------------------------------------------- LayerNorm

LN_CASES = [
    # (x shape, torch normalized_shape, brainnorm in_size, brainnorm axes, torch kwargs)
    ((4, 3, 5), (5,), (5,), -1, {}),
    ((4, 3, 5), (5,), (3, 5), -1, {}),
    ((2, 3, 4, 5), (4, 5), (4, 5), (-2, -1), {}),
    ((2, 3, 4, 5), (4, 5), (3, 4, 5), (-2, -1), {}),
    ((2, 3, 4, 5), (4, 5), (3, 4, 5), (1, 2), {}),  # positive axes count within in_size
    ((2, 3, 4, 5), (3, 4, 5), (3, 4, 5), (0, 1, 2), {}),
    ((4, 3, 5), (5,), (5,), -1, {"bias": False}),
    ((2, 3, 4, 5), (4, 5), (4, 5), (-2, -1), {"elementwise_affine": False}),
]


@pytest.mark.parametrize("shape, normalized_shape, in_size, axes, torch_kwargs", LN_CASES)
def test_layer_norm(shape, normalized_shape, in_size, axes, torch_kwargs, rng):
    peer = torch.nn.LayerNorm(normalized_shape, eps=1e-5, **torch_kwargs)
    use_scale = torch_kwargs.get("elementwise_affine", True)
    use_bias = use_scale and torch_kwargs.get("bias", True)
    scale = 1.0 + 0.3 * rng.standard_normal(normalized_shape)
    bias = 0.2 * rng.standard_normal(normalized_shape)
    if use_scale:
        set_torch(peer.weight, scale)
    if use_bias:
        set_torch(peer.bias, bias)
    ours = brainnorm.LayerNorm(in_size, reduction_axes=axes, feature_axes=axes, epsilon=1e-5, use_scale=use_scale,
                               use_bias=use_bias, scale_init=scale, bias_init=bias)
    cot = sample(rng, shape, 0.0, 1.0)
    for step in range(2):
        x = sample(rng, shape, offset=0.5 + step, spread=1.0 + step)
        y_t, dx_t, dp_t = torch_grads(peer, x, cot)
        y, dx, dp = brainnorm_grads(ours, x, cot)
        check(PEER, "LayerNorm", "output", y, y_t, atol=ATOL)
        check(PEER, "LayerNorm", "grad x", dx, dx_t, atol=GRAD_TOL, rtol=GRAD_TOL)
        if ours.weight is not None:
            compare_affine("LayerNorm", "grad params", dp[("weight",)], dp_t, atol=GRAD_TOL, rtol=GRAD_TOL)
            torch_sgd(peer, LR)
            sgd(ours, dp, LR)


# --------------------------------------------------------------------------- RMSNorm


def _rms_compare(shape, normalized_shape, eps, dtype, spread, rng, atol):
    in_size = normalized_shape
    axes = tuple(range(-len(normalized_shape), 0))
    peer = torch.nn.RMSNorm(normalized_shape, eps=eps, dtype=getattr(torch, np.dtype(dtype).name))
    scale = (1.0 + 0.3 * rng.standard_normal(normalized_shape)).astype(dtype)
    set_torch(peer.weight, scale)
    ours = brainnorm.RMSNorm(in_size, reduction_axes=axes, feature_axes=axes, epsilon=eps, scale_init=scale,
                             param_dtype=dtype)
    x = (spread * (0.3 + rng.standard_normal(shape))).astype(dtype)
    cot = rng.standard_normal(shape).astype(dtype)
    y_t, dx_t, dp_t = torch_grads(peer, x, cot)
    y, dx, dp = brainnorm_grads(ours, x, cot)
    assert y.dtype == np.dtype(dtype)
    name = f"RMSNorm {np.dtype(dtype).name}"
    check(PEER, name, "output", y, y_t, atol=atol)
    check(PEER, name, "grad x", dx, dx_t, atol=atol if dtype == np.float64 else GRAD_TOL,
          rtol=atol if dtype == np.float64 else GRAD_TOL)
    check(PEER, name, "grad params", np.ravel(dp[("scale",)]["scale"]), np.ravel(dp_t["weight"]),
          atol=atol if dtype == np.float64 else GRAD_TOL, rtol=atol if dtype == np.float64 else GRAD_TOL)


# Small inputs make epsilon matter: with eps=None and spread 1e-4 (float32), the
# mean square (~1e-8) is below finfo(float32).eps (1.2e-7).
RMS_CASES = [
    ((4, 3, 6), (6,), None, 1.0),
    ((4, 3, 6), (6,), None, 1e-4),
    ((4, 3, 6), (6,), 1e-6, 1.0),
    ((2, 3, 4, 5), (4, 5), None, 1e-4),
    ((2, 3, 4, 5), (4, 5), 1e-3, 0.1),
]


@pytest.mark.parametrize("shape, normalized_shape, eps, spread", RMS_CASES)
def test_rms_norm_float32(shape, normalized_shape, eps, spread, rng):
    _rms_compare(shape, normalized_shape, eps, np.float32, spread, rng, ATOL)


@pytest.mark.parametrize("spread", [1.0, 1e-8])
def test_rms_norm_float64_eps_none(spread, rng):
    # jax.experimental.enable_x64 is gone in jax 0.10; jax.enable_x64 is its successor.
    if not hasattr(jax, "enable_x64"):
        pytest.skip("this JAX has no jax.enable_x64 context manager for a float64 comparison")
    with jax.enable_x64(True):
        # spread 1e-8: the mean square (~1e-16) is comparable to finfo(float64).eps.
        _rms_compare((4, 3, 6), (6,), None, np.float64, spread, rng, ATOL64)
        _rms_compare((2, 3, 4, 5), (4, 5), None, np.float64, spread, rng, ATOL64)


# --------------------------------------------------------------------------- LocalResponseNorm

LRN_CASES = [
    # (torch shape (N, C, *S), size, alpha, beta, k, channels last)
    ((2, 6, 3, 4), 1, 0.5, 0.75, 1.0, False),
    ((2, 6, 3, 4), 2, 0.5, 0.75, 1.0, False),
    ((2, 6, 3, 4), 3, 0.5, 0.75, 1.0, True),
    ((2, 6, 3, 4), 4, 1.0, 0.5, 2.0, False),
    ((2, 6, 3, 4), 5, 1e-4, 0.75, 1.0, False),
    ((3, 7, 5), 2, 0.3, 0.75, 1.0, True),
    ((3, 7, 5), 3, 0.3, 0.9, 0.5, False),
    ((3, 7, 5), 6, 0.3, 0.75, 1.0, False),
]


@pytest.mark.parametrize("shape, size, alpha, beta, k, last", LRN_CASES)
def test_local_response_norm(shape, size, alpha, beta, k, last, rng):
    layout = Layout(last)
    peer = torch.nn.LocalResponseNorm(size, alpha=alpha, beta=beta, k=k)
    ours = brainnorm.LocalResponseNorm(layout.in_size(shape), size, alpha=alpha, beta=beta, k=k,
                                       feature_axis=layout.feature_axis)
    x = sample(rng, shape, 0.2, 1.5)
    cot = sample(rng, shape, 0.0, 1.0)
    y_t, dx_t, _ = torch_grads(peer, x, cot)
    y, vjp = jax.vjp(ours, jnp.asarray(layout.to_bn(x)))
    (dx,) = vjp(jnp.asarray(layout.to_bn(cot)))
    name = f"LocalResponseNorm size {'even' if size % 2 == 0 else 'odd'}"
    check(PEER, name, "output", layout.from_bn(np.asarray(y)), y_t, atol=ATOL)
    check(PEER, name, "grad x", layout.from_bn(np.asarray(dx)), dx_t, atol=GRAD_TOL, rtol=GRAD_TOL)


# --------------------------------------------------------------------------- WeightNorm / SpectralNorm


def _linear_pair(rng, n_in, n_out):
    peer = torch.nn.Linear(n_in, n_out)
    w = rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)
    b = 0.1 * rng.standard_normal(n_out)
    set_torch(peer.weight, w)
    set_torch(peer.bias, b)
    layer = brainstate.nn.Linear(n_in, n_out)
    layer.weight.value = {"weight": jnp.asarray(w.T, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}
    # brainstate Linear weight is (in, out): the transpose of torch's (out, in).
    return peer, layer, (lambda wt: wt.T), (lambda a: a), (lambda a: a)


def _conv_pair(rng, c_in, c_out, hw):
    peer = torch.nn.Conv2d(c_in, c_out, 3, padding=0, bias=False)
    w = rng.standard_normal((c_out, c_in, 3, 3)) / np.sqrt(9 * c_in)
    set_torch(peer.weight, w)
    layer = brainstate.nn.Conv2d((hw, hw, c_in), c_out, 3, padding="VALID")
    # brainstate kernel (kh, kw, in, out) == torch (out, in, kh, kw) transposed (2, 3, 1, 0).
    layer.weight.value = {"weight": jnp.asarray(w.transpose(2, 3, 1, 0), jnp.float32)}
    to_bn = lambda a: np.moveaxis(a, 1, -1)  # noqa: E731  (N, C, H, W) -> (N, H, W, C)
    from_bn = lambda a: np.moveaxis(a, -1, 1)  # noqa: E731
    return peer, layer, (lambda wt: wt.transpose(2, 3, 1, 0)), to_bn, from_bn


def _pair(kind, rng):
    if kind == "Linear":
        peer, layer, w_to_bn, to_bn, from_bn = _linear_pair(rng, 5, 4)
        x_shape = (6, 5)
    else:
        peer, layer, w_to_bn, to_bn, from_bn = _conv_pair(rng, 3, 4, 5)
        x_shape = (2, 3, 5, 5)
    return peer, layer, w_to_bn, to_bn, from_bn, x_shape


@pytest.mark.parametrize("kind", ["Linear", "Conv2d"])
def test_weight_norm(kind, rng):
    from torch.nn.utils.parametrizations import weight_norm

    peer, layer, w_to_bn, to_bn, from_bn, x_shape = _pair(kind, rng)
    peer = weight_norm(peer, name="weight", dim=0)
    ours = brainnorm.WeightNorm(layer)
    g_name, v_name = "parametrizations.weight.original0", "parametrizations.weight.original1"
    params_t = dict(peer.named_parameters())
    name = f"WeightNorm {kind}"
    # Construction: g = ||v|| on both sides.
    check(PEER, name, "g at construction", np.ravel(ours.g.value), np.ravel(params_t[g_name].detach().numpy()),
          atol=ATOL)
    # A magnitude different from ||v|| on both sides.
    g = np.abs(1.0 + 0.5 * rng.standard_normal(np.ravel(ours.g.value).shape))
    set_torch(params_t[g_name], g)
    ours.g.value = jnp.asarray(g.reshape(ours.g.value.shape), jnp.float32)
    out_shape = None
    for _ in range(3):
        x = sample(rng, x_shape, 0.2, 1.0)
        peer.zero_grad(set_to_none=True)
        xt = torch.tensor(x, requires_grad=True)
        yt = peer(xt)
        out_shape = out_shape or tuple(yt.shape)
        cot = sample(np.random.default_rng(1), out_shape, 0.0, 1.0)
        (yt * torch.tensor(cot)).sum().backward()
        y_t, dx_t = yt.detach().numpy(), xt.grad.numpy()
        dp_t = {n: p.grad.numpy() for n, p in peer.named_parameters() if p.grad is not None}
        y, dx, dp = brainnorm_grads(ours, to_bn(x), to_bn(cot))
        check(PEER, name, "output", from_bn(y), y_t, atol=ATOL)
        check(PEER, name, "grad x", from_bn(dx), dx_t, atol=GRAD_TOL, rtol=GRAD_TOL)
        check(PEER, name, "grad g", np.ravel(dp[("g",)]), np.ravel(dp_t[g_name]), atol=GRAD_TOL, rtol=GRAD_TOL)
        check(PEER, name, "grad v", dp[("v",)], w_to_bn(dp_t[v_name]), atol=GRAD_TOL, rtol=GRAD_TOL)
        if "bias" in dp_t:
            check(PEER, name, "grad bias", dp[("layer", "weight")]["bias"], dp_t["bias"], atol=GRAD_TOL,
                  rtol=GRAD_TOL)
        # The wrapped weight is not a parameter any more: an optimizer sees g, v and the bias only.
        assert "weight" not in dp.get(("layer", "weight"), {})
        torch_sgd(peer, LR)
        sgd(ours, dp, LR)
        check(PEER, name, "v after SGD", ours.v.value, w_to_bn(params_t[v_name].detach().numpy()), atol=ATOL)


@pytest.mark.parametrize("kind", ["Linear", "Conv2d"])
def test_spectral_norm(kind, rng):
    from torch.nn.utils.parametrizations import spectral_norm

    peer, layer, w_to_bn, to_bn, from_bn, x_shape = _pair(kind, rng)
    peer = spectral_norm(peer, name="weight", n_power_iterations=1, eps=1e-12)
    ours = brainnorm.SpectralNorm(layer, n_steps=1, epsilon=1e-12)
    param = peer.parametrizations.weight[0]

    def v_to_bn(v):
        if kind == "Linear":  # the matrix view (out, in) is torch's weight itself
            return v
        # torch columns are (in, kh, kw); brainnorm's are (kh, kw, in).
        c_in = layer.weight.value["weight"].shape[-2]
        return v.reshape(c_in, 3, 3).transpose(1, 2, 0).reshape(-1)

    # Copies: ``Tensor.numpy()`` shares memory with the buffer torch updates in place.
    ours.u.value = jnp.array(param._u.numpy().copy(), jnp.float32)
    ours.v.value = jnp.array(v_to_bn(param._v.numpy()).copy(), jnp.float32)
    name = f"SpectralNorm {kind}"
    original = peer.parametrizations.weight.original
    peer.train()
    for _ in range(STEPS):
        x = sample(rng, x_shape, 0.2, 1.0)
        peer.zero_grad(set_to_none=True)
        xt = torch.tensor(x, requires_grad=True)
        yt = peer(xt)
        cot = sample(np.random.default_rng(1), tuple(yt.shape), 0.0, 1.0)
        (yt * torch.tensor(cot)).sum().backward()
        with brainstate.environ.context(fit=True):
            y, dx, dp = brainnorm_grads(ours, to_bn(x), to_bn(cot))
        check(PEER, name, "output", from_bn(y), yt.detach().numpy(), atol=ATOL)
        check(PEER, name, "u", ours.u.value, param._u.numpy(), atol=ATOL)
        check(PEER, name, "v", ours.v.value, v_to_bn(param._v.numpy()), atol=ATOL)
        check(PEER, name, "grad x", from_bn(dx), xt.grad.numpy(), atol=GRAD_TOL, rtol=GRAD_TOL)
        check(PEER, name, "grad weight", dp[("layer", "weight")]["weight"], w_to_bn(original.grad.numpy()),
              atol=GRAD_TOL, rtol=GRAD_TOL)
        if peer.bias is not None:
            check(PEER, name, "grad bias", dp[("layer", "weight")]["bias"], peer.bias.grad.numpy(),
                  atol=GRAD_TOL, rtol=GRAD_TOL)
        torch_sgd(peer, LR)
        sgd(ours, dp, LR)
        check(PEER, name, "weight after SGD", layer.weight.value["weight"], w_to_bn(original.detach().numpy()),
              atol=ATOL)
    # Evaluation: no power iteration on either side; u, v and the weight stay as they are.
    peer.eval()
    u0, v0 = np.asarray(ours.u.value), np.asarray(ours.v.value)
    w0 = np.asarray(layer.weight.value["weight"])
    x = sample(rng, x_shape, 0.2, 1.0)
    with torch.no_grad():
        y_t = peer(torch.tensor(x)).numpy()
    with brainstate.environ.context(fit=False):
        y = np.asarray(ours(jnp.asarray(to_bn(x))))
    check(PEER, name, "output (eval)", from_bn(y), y_t, atol=ATOL)
    check(PEER, name, "normalized weight", ours.normalized_weight(), w_to_bn(peer.weight.detach().numpy()),
          atol=ATOL)
    np.testing.assert_array_equal(ours.u.value, u0)
    np.testing.assert_array_equal(ours.v.value, v0)
    np.testing.assert_array_equal(layer.weight.value["weight"], w0)
