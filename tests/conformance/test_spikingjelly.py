"""tdBN, TEBN and BNTT against spikingjelly 2.0 (``spikingjelly.activation_based.layer``).

Compared: outputs, the gradient of ``sum(y * c)`` for the input and every
parameter, the running statistics after two training calls, and the
evaluation-mode output, in single- and multi-step mode. Input ``(T, N, C)``;
spikingjelly's 1d layers read ``(T * N, C)`` with the channels on axis 1, the
same channels as brainnorm's ``feature_axis=-1``.

Mapping: PyTorch's momentum ``m`` is brainnorm's ``1 - m`` and PyTorch updates
the running variance with the unbiased variance (``unbiased_running_var``).

tdBN's scale (decision of the project, documented in the temporal guide):
brainnorm keeps the paper's parameterization, ``alpha * v_th * gamma *
x_hat + beta`` with a learned ``gamma`` (initialized to 1) and the fixed
factor ``alpha * v_th``; spikingjelly learns one weight ``W`` initialized to
``alpha * v_th``. With ``W = alpha * v_th * gamma`` the outputs and the input
gradients are equal, and ``dL/dgamma = alpha * v_th * dL/dW``. A plain SGD
step therefore moves brainnorm's effective weight by ``(alpha * v_th) ** 2``
times spikingjelly's step (tested below).

Tolerances (float32 on both sides): outputs and running statistics 2e-5
absolute; gradients 1e-4 relative to ``max(1, max |peer|)``.
"""

from __future__ import annotations

import brainstate
import jax.numpy as jnp
import numpy as np
import pytest

import brainnorm

from ._common import brainnorm_grads, check, sample

torch = pytest.importorskip("torch", reason="PyTorch is needed for the spikingjelly conformance tests")
# spikingjelly imports loguru: ask for it by name, so that its absence is not reported as spikingjelly's
pytest.importorskip("loguru", reason="loguru (a runtime requirement of spikingjelly 2.0) is not installed")
sj = pytest.importorskip("spikingjelly.activation_based.layer")

PEER = "spikingjelly"
T, N, C = 4, 6, 3
TORCH_MOMENTUM = 0.1
ATOL = 2e-5
GRAD_TOL = 1e-4


@pytest.fixture
def data(rng):
    x = sample(rng, (T, N, C), offset=0.8, spread=1.3)
    cot = rng.standard_normal((T, N, C)).astype(np.float32)
    return x, cot


def _torch_grads(module, x, cot):
    """``(y, dx, {name: grad})`` of ``sum(module(x) * cot)`` for spikingjelly's module."""
    module.zero_grad(set_to_none=True)
    xt = torch.tensor(np.asarray(x), requires_grad=True)
    y = module(xt)
    (y * torch.tensor(np.asarray(cot))).sum().backward()
    grads = {n: p.grad.numpy().copy() for n, p in module.named_parameters() if p.grad is not None}
    return y.detach().numpy().copy(), xt.grad.numpy().copy(), grads


def _train(module, x, cot, **kwargs):
    with brainstate.environ.context(fit=True):
        return brainnorm_grads(module, x, cot, **kwargs)


def _evaluate(module, x, **kwargs):
    with brainstate.environ.context(fit=False):
        return np.asarray(module(jnp.asarray(x), **kwargs))


def _set(parameter, value):
    with torch.no_grad():
        parameter.copy_(torch.from_numpy(np.ascontiguousarray(value, np.float32)))


# --- tdBN ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha, v_th", [(1.0, 1.0), (0.5**0.5, 0.3), (2.0, 1.5)])
@pytest.mark.parametrize("step_mode", ["multi", "single"])
def test_tdbn_equals_spikingjelly_with_weight_alpha_vth_gamma(data, rng, alpha, v_th, step_mode):
    x, cot = data
    factor = alpha * v_th
    gamma = rng.uniform(0.5, 1.5, C).astype(np.float32)
    beta = rng.uniform(-0.5, 0.5, C).astype(np.float32)
    ours = brainnorm.ThresholdDependentBatchNorm(
        (C,), alpha=alpha, v_th=v_th, momentum=1 - TORCH_MOMENTUM, unbiased_running_var=True, step_mode=step_mode
    )
    ours.weight.value = {"scale": jnp.asarray(gamma), "bias": jnp.asarray(beta)}
    theirs = sj.ThresholdDependentBatchNorm1d(alpha, v_th, C, momentum=TORCH_MOMENTUM)
    # spikingjelly initializes its weight to alpha * v_th, brainnorm its gamma to 1
    np.testing.assert_allclose(theirs.weight.detach().numpy(), factor, rtol=1e-6)
    fresh = brainnorm.ThresholdDependentBatchNorm((C,), alpha=alpha, v_th=v_th)
    np.testing.assert_array_equal(np.asarray(fresh.weight.value["scale"]), 1.0)
    _set(theirs.weight, factor * gamma)
    _set(theirs.bias, beta)
    # a single step is normalized over the batch of that step: spikingjelly's layer on a sequence of length 1
    sequences = [(x, cot)] if step_mode == "multi" else [(x[t], cot[t]) for t in (0, 2)]
    for xs, cs in sequences:
        y_t, dx_t, dp_t = _torch_grads(theirs, xs if step_mode == "multi" else xs[None], cs if step_mode == "multi"
                                       else cs[None])
        if step_mode == "single":
            y_t, dx_t = y_t[0], dx_t[0]
        y, dx, dp = _train(ours, xs, cs)
        check(PEER, "tdBN", f"y {step_mode}", y, y_t, atol=ATOL)
        check(PEER, "tdBN", f"grad x {step_mode}", dx, dx_t, atol=GRAD_TOL, rtol=GRAD_TOL)
        # the decision: d/dgamma = alpha * v_th * d/dW (not equal to it unless alpha * v_th == 1)
        check(PEER, "tdBN", f"grad scale {step_mode}", dp[("weight",)]["scale"], factor * dp_t["weight"],
              atol=GRAD_TOL, rtol=GRAD_TOL)
        check(PEER, "tdBN", f"grad bias {step_mode}", dp[("weight",)]["bias"], dp_t["bias"], atol=GRAD_TOL,
              rtol=GRAD_TOL)
        check(PEER, "tdBN", f"running mean {step_mode}", ours.running_mean.value, theirs.running_mean.numpy(),
              atol=ATOL)
        check(PEER, "tdBN", f"running var {step_mode}", ours.running_var.value, theirs.running_var.numpy(),
              atol=ATOL)
        if factor != 1.0:
            # the relation is a factor, not an equality: the gradients differ where they are not 0
            assert not np.allclose(dp[("weight",)]["scale"], dp_t["weight"], rtol=1e-3, atol=0)
    theirs.eval()
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x if step_mode == "multi" else x[1][None])).numpy()
    check(PEER, "tdBN", f"y eval {step_mode}", _evaluate(ours, x if step_mode == "multi" else x[1]),
          expected if step_mode == "multi" else expected[0], atol=ATOL)


def test_tdbn_sgd_step_moves_the_effective_weight_by_factor_squared(data, rng):
    """The consequence of the parameterization: the same SGD step trains the two differently."""
    x, cot = data
    alpha, v_th, lr = 0.5, 0.6, 0.1
    factor = alpha * v_th
    ours = brainnorm.ThresholdDependentBatchNorm((C,), alpha=alpha, v_th=v_th, step_mode="multi")
    theirs = sj.ThresholdDependentBatchNorm1d(alpha, v_th, C)
    _, _, dp_t = _torch_grads(theirs, x, cot)
    _, _, dp = _train(ours, x, cot)
    gamma_after = 1.0 - lr * np.asarray(dp[("weight",)]["scale"])
    weight_after = factor - lr * dp_t["weight"]
    # effective weight after one step: ours alpha*v_th*gamma, theirs W
    check(PEER, "tdBN", "sgd step ratio", factor * gamma_after - factor,
          factor**2 * (weight_after - factor), atol=1e-6, rtol=1e-4)


# --- TEBN ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step_mode", ["multi", "single"])
def test_tebn_equals_spikingjelly(data, rng, step_mode):
    x, cot = data
    gamma = rng.uniform(0.5, 1.5, C).astype(np.float32)
    beta = rng.uniform(-0.5, 0.5, C).astype(np.float32)
    p = rng.uniform(0.5, 1.5, T).astype(np.float32)
    ours = brainnorm.TemporalEffectiveBatchNorm(
        (C,), num_steps=T, momentum=1 - TORCH_MOMENTUM, unbiased_running_var=True, step_mode=step_mode
    )
    ours.weight.value = {"scale": jnp.asarray(gamma), "bias": jnp.asarray(beta)}
    ours.p.value = jnp.asarray(p)
    if step_mode == "multi":
        theirs = sj.TemporalEffectiveBatchNorm1d(T, C, momentum=TORCH_MOMENTUM)
        _set(theirs.scale, p)
        calls = [(x, cot, {}, slice(None))]
    else:
        # one step: the statistics of that step's batch, weighted by p_t (spikingjelly: a sequence of length 1)
        theirs = sj.TemporalEffectiveBatchNorm1d(1, C, momentum=TORCH_MOMENTUM)
        calls = [(x[t], cot[t], {"t": t}, t) for t in (0, 3)]
    _set(theirs.weight, gamma)
    _set(theirs.bias, beta)
    for xs, cs, kwargs, t in calls:
        if step_mode == "single":
            _set(theirs.scale, p[t : t + 1])
        y_t, dx_t, dp_t = _torch_grads(theirs, xs if step_mode == "multi" else xs[None],
                                       cs if step_mode == "multi" else cs[None])
        if step_mode == "single":
            y_t, dx_t = y_t[0], dx_t[0]
        y, dx, dp = _train(ours, xs, cs, **kwargs)
        check(PEER, "TEBN", f"y {step_mode}", y, y_t, atol=ATOL)
        check(PEER, "TEBN", f"grad x {step_mode}", dx, dx_t, atol=GRAD_TOL, rtol=GRAD_TOL)
        check(PEER, "TEBN", f"grad scale {step_mode}", dp[("weight",)]["scale"], dp_t["weight"], atol=GRAD_TOL,
              rtol=GRAD_TOL)
        check(PEER, "TEBN", f"grad bias {step_mode}", dp[("weight",)]["bias"], dp_t["bias"], atol=GRAD_TOL,
              rtol=GRAD_TOL)
        dp_ours = np.asarray(dp[("p",)])
        if step_mode == "multi":
            check(PEER, "TEBN", "grad p multi", dp_ours, dp_t["scale"], atol=GRAD_TOL, rtol=GRAD_TOL)
        else:
            expected = np.zeros(T, np.float32)
            expected[t] = dp_t["scale"][0]
            check(PEER, "TEBN", "grad p single", dp_ours, expected, atol=GRAD_TOL, rtol=GRAD_TOL)
        check(PEER, "TEBN", f"running mean {step_mode}", ours.running_mean.value, theirs.running_mean.numpy(),
              atol=ATOL)
        check(PEER, "TEBN", f"running var {step_mode}", ours.running_var.value, theirs.running_var.numpy(),
              atol=ATOL)
    theirs.eval()
    if step_mode == "multi":
        with torch.no_grad():
            expected = theirs(torch.from_numpy(x)).numpy()
        check(PEER, "TEBN", "y eval multi", _evaluate(ours, x), expected, atol=ATOL)
    else:
        _set(theirs.scale, p[1:2])
        with torch.no_grad():
            expected = theirs(torch.from_numpy(x[1][None])).numpy()[0]
        check(PEER, "TEBN", "y eval single", _evaluate(ours, x[1], t=1), expected, atol=ATOL)


# --- BNTT ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step_mode", ["multi", "single"])
def test_bntt_equals_spikingjelly(data, rng, step_mode):
    x, cot = data
    gamma = rng.uniform(0.5, 1.5, (T, C)).astype(np.float32)
    ours = brainnorm.BatchNormThroughTime(
        (C,), num_steps=T, momentum=1 - TORCH_MOMENTUM, unbiased_running_var=True, step_mode=step_mode
    )
    ours.weight.value = {"scale": jnp.asarray(gamma)}
    theirs = sj.BatchNormThroughTime1d(T, C, momentum=TORCH_MOMENTUM, step_mode="m" if step_mode == "multi" else "s")
    for t in range(T):
        _set(theirs.bn_list[t].weight, gamma[t])
    assert all(bn.bias is None for bn in theirs.bn_list)  # BNTT has no offset: brainnorm's default use_bias=False
    for _ in range(2):  # two sequences; spikingjelly counts the steps in a state reset between sequences
        theirs.reset()
        if step_mode == "multi":
            y_t, dx_t, dp_t = _torch_grads(theirs, x, cot)
            y, dx, dp = _train(ours, x, cot)
            dscale = np.asarray(dp[("weight",)]["scale"])
        else:
            theirs.zero_grad(set_to_none=True)
            outs, dxs, dscale = [], [], np.zeros((T, C), np.float32)
            y_list, dx_list = [], []
            for t in range(T):
                xt = torch.tensor(x[t], requires_grad=True)
                yt = theirs(xt)
                (yt * torch.tensor(cot[t])).sum().backward()
                outs.append(yt.detach().numpy())
                dxs.append(xt.grad.numpy())
                yo, dxo, dpo = _train(ours, x[t], cot[t], t=t)
                y_list.append(yo)
                dx_list.append(dxo)
                dscale += np.asarray(dpo[("weight",)]["scale"])
            y_t, dx_t, y, dx = np.stack(outs), np.stack(dxs), np.stack(y_list), np.stack(dx_list)
            dp_t = {f"bn_list.{t}.weight": theirs.bn_list[t].weight.grad.numpy() for t in range(T)}
        check(PEER, "BNTT", f"y {step_mode}", y, y_t, atol=ATOL)
        check(PEER, "BNTT", f"grad x {step_mode}", dx, dx_t, atol=GRAD_TOL, rtol=GRAD_TOL)
        expected_scale = np.stack([dp_t[f"bn_list.{t}.weight"] for t in range(T)])
        check(PEER, "BNTT", f"grad scale {step_mode}", dscale, expected_scale, atol=GRAD_TOL, rtol=GRAD_TOL)
        mean_t = np.stack([bn.running_mean.numpy() for bn in theirs.bn_list])
        var_t = np.stack([bn.running_var.numpy() for bn in theirs.bn_list])
        check(PEER, "BNTT", f"running mean {step_mode}", ours.running_mean.value, mean_t, atol=ATOL)
        check(PEER, "BNTT", f"running var {step_mode}", ours.running_var.value, var_t, atol=ATOL)
    theirs.eval()
    theirs.reset()
    if step_mode == "multi":
        with torch.no_grad():
            expected = theirs(torch.from_numpy(x)).numpy()
        check(PEER, "BNTT", "y eval multi", _evaluate(ours, x), expected, atol=ATOL)
    else:
        with torch.no_grad():
            expected = np.stack([theirs(torch.from_numpy(x[t])).numpy() for t in range(T)])
        got = np.stack([_evaluate(ours, x[t], t=t) for t in range(T)])
        check(PEER, "BNTT", "y eval single", got, expected, atol=ATOL)
