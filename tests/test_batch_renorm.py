"""BatchRenorm (Ioffe, 2017) against a float64 re-statement of the formula and against torchrl's BatchRenorm1d.

SPEC §9: ``r = clip(sigma_B / sigma, 1/r_max, r_max)``, ``d = clip((mu_B - running_mean) / sigma, -d_max,
d_max)``, both constant under differentiation, ``y = gamma ((x - mu_B) / sigma_B r + d) + beta``; ``r = 1``,
``d = 0`` while ``num_batches_tracked < warmup_steps``; running statistics updated as BatchNorm does.
"""

from __future__ import annotations

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brainnorm
from brainnorm import functional as F


class Reference:
    """Float64 batch renormalization over every axis but the last, with masks; brainnorm's momentum convention."""

    def __init__(self, channels, *, r_max=3.0, d_max=5.0, warmup_steps=0, momentum=0.99, epsilon=1e-5,
                 unbiased=False, gamma=None, beta=None):
        self.mean = np.zeros(channels)
        self.var = np.ones(channels)
        self.steps = 0
        self.r_max, self.d_max, self.warmup, self.momentum, self.eps = r_max, d_max, warmup_steps, momentum, epsilon
        self.unbiased = unbiased
        self.gamma = np.ones(channels) if gamma is None else np.asarray(gamma, np.float64)
        self.beta = np.zeros(channels) if beta is None else np.asarray(beta, np.float64)

    def train(self, x, mask=None):
        shape = np.shape(x)
        x = np.asarray(x, np.float64).reshape(-1, shape[-1])
        valid = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, shape).reshape(x.shape)
        n = valid.sum(0)
        mean = np.where(n > 0, (x * valid).sum(0) / np.maximum(n, 1), 0.0)
        var = np.where(n > 0, (((x - mean) ** 2) * valid).sum(0) / np.maximum(n, 1), 0.0)
        sigma = np.sqrt(self.var + self.eps)
        r = np.clip(np.sqrt(var + self.eps) / sigma, 1 / self.r_max, self.r_max)
        d = np.clip((mean - self.mean) / sigma, -self.d_max, self.d_max)
        if self.steps < self.warmup:
            r, d = np.ones_like(r), np.zeros_like(d)
        r, d = np.where(n > 0, r, 1.0), np.where(n > 0, d, 0.0)
        xhat = np.where(n > 0, (x - mean) / np.sqrt(var + self.eps), 0.0)
        y = self.gamma * (xhat * r + d) + self.beta
        batch_var = var * n / np.maximum(n - 1, 1) if self.unbiased else var
        m = self.momentum
        self.mean = np.where(n > 0, m * self.mean + (1 - m) * mean, self.mean)
        self.var = np.where(n > 0, m * self.var + (1 - m) * batch_var, self.var)
        self.steps += 1
        return y, r, d

    def evaluate(self, x):
        x = np.asarray(x, np.float64)
        return self.gamma * (x - self.mean) / np.sqrt(self.var + self.eps) + self.beta


def _batches(shape, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * (1 + t) + 2 * t).astype(np.float32) for t in range(steps)]


@pytest.mark.parametrize("warmup_steps", [0, 2])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_training_steps_match_the_float64_formula(warmup_steps, masked):
    channels = 3
    gamma, beta = np.array([0.5, 1.0, 1.5]), np.array([-0.2, 0.0, 0.3])
    layer = brainnorm.BatchRenorm((5, channels), warmup_steps=warmup_steps, momentum=0.8, r_max=1.5, d_max=0.5,
                                  scale_init=gamma, bias_init=beta)
    reference = Reference(channels, r_max=1.5, d_max=0.5, warmup_steps=warmup_steps, momentum=0.8,
                          gamma=gamma, beta=beta)
    rng = np.random.default_rng(1)
    step = brainstate.transform.jit(lambda v, m: layer(v, m))
    for t, x in enumerate(_batches((4, 5, channels), 5)):
        mask = None
        if masked:
            mask = rng.random((4, 5, 1)) < 0.7
            mask[0, 0] = True
        with brainstate.environ.context(fit=True):
            y = step(jnp.asarray(x), None if mask is None else jnp.asarray(mask))
        expected, r, d = reference.train(x, mask)
        valid = np.broadcast_to(np.ones((1,), bool) if mask is None else mask, x.shape).reshape(-1, channels)
        got = np.asarray(y, np.float64).reshape(-1, channels)
        np.testing.assert_allclose(got[valid], expected[valid], rtol=2e-5, atol=2e-5, err_msg=f"step {t}")
        if t >= warmup_steps:
            assert not np.allclose(r, 1.0) or not np.allclose(d, 0.0), "the correction never applied"
        np.testing.assert_allclose(np.asarray(layer.running_mean.value, np.float64).ravel(), reference.mean,
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(layer.running_var.value, np.float64).ravel(), reference.var,
                                   rtol=1e-5, atol=1e-5)
    assert int(layer.num_batches_tracked.value) == 5
    x = _batches((4, 5, channels), 1, seed=9)[0]
    with brainstate.environ.context(fit=False):
        y = layer(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y, np.float64), reference.evaluate(x), rtol=1e-5, atol=1e-5)


def _torchrl_forward_restated(x, state, *, momentum, eps, r_max, d_max, warmup_steps):
    """torchrl's BatchRenorm1d(smooth=False) training step in float64 (as its source defines it)."""
    b_mean, b_var = x.mean(0), x.var(0)
    running_std = np.sqrt(state["var"] + eps)
    b_std = np.sqrt(b_var + eps)
    r = np.clip(b_std / running_std, 1 / r_max, r_max)
    d = np.clip((b_mean - state["mean"]) / running_std, -d_max, d_max)
    factor = state["steps"] // warmup_steps
    r, d = 1 + (r - 1) * factor, d * factor
    y = (x - b_mean) / b_std * r + d
    state["var"] = state["var"] + momentum * (b_var * x.shape[0] / (x.shape[0] - 1) - state["var"])
    state["mean"] = state["mean"] + momentum * (b_mean - state["mean"])
    state["steps"] += 1
    return y


@pytest.mark.parametrize("source", ["restated", "torchrl"])
def test_equals_torchrl_during_its_first_two_warmup_periods(source):
    """torchrl's BatchRenorm1d(momentum=m, smooth=False) = BatchRenorm(momentum=1-m, unbiased_running_var=True).

    After 2 * warmup_steps steps torchrl's factor num_batches_tracked // warmup_steps becomes 2, 3, ...
    (its counter is never clamped): there brainnorm keeps the factor 1, as the paper does.
    """
    warmup, torch_momentum, eps, r_max, d_max = 3, 0.1, 1e-5, 1.2, 0.3
    batches = [x.reshape(8, 4).astype(np.float64) for x in _batches((8, 4), 2 * warmup + 2, seed=3)]
    layer = brainnorm.BatchRenorm(4, warmup_steps=warmup, momentum=1 - torch_momentum, epsilon=eps, r_max=r_max,
                                  d_max=d_max, unbiased_running_var=True, param_dtype=jnp.float32)
    if source == "torchrl":
        torchrl = pytest.importorskip("torchrl.modules")
        import torch

        peer = torchrl.BatchRenorm1d(4, momentum=torch_momentum, eps=eps, max_r=r_max, max_d=d_max,
                                     warmup_steps=warmup, smooth=False).double().train()

        def peer_step(x):
            with torch.no_grad():
                return peer(torch.tensor(x)).numpy()
    else:
        state = {"mean": np.zeros(4), "var": np.ones(4), "steps": 0}

        def peer_step(x):
            return _torchrl_forward_restated(x, state, momentum=torch_momentum, eps=eps, r_max=r_max, d_max=d_max,
                                             warmup_steps=warmup)

    deviations = []
    for t, x in enumerate(batches):
        with brainstate.environ.context(fit=True):
            y = np.asarray(layer(jnp.asarray(x, jnp.float32)), np.float64)
        expected = peer_step(x)
        deviation = float(np.abs(y - expected).max())
        if t < 2 * warmup:
            deviations.append(deviation)
            assert deviation < 2e-5, f"step {t}: {deviation}"
        else:
            assert deviation > 1e-3, "torchrl's unclamped factor should differ from here on"
    print(f"{source}: largest deviation over the first {2 * warmup} steps {max(deviations):.2e}")


def test_gradient_holds_r_and_d_constant():
    """The gradient is that of batch normalization with the fixed affine (gamma r, gamma d + beta)."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((6, 3)) * 2 + 1, jnp.float32)
    running_mean, running_var = jnp.asarray([0.5, -0.5, 0.0]), jnp.asarray([0.5, 2.0, 9.0])
    gamma, beta = jnp.asarray([1.0, 2.0, 0.5]), jnp.asarray([0.1, 0.0, -0.1])
    w = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)

    def renorm(v, g, b):
        return jnp.sum(w * F.batch_renorm(v, running_mean, running_var, g, b, training=True, r_max=2.0, d_max=1.0,
                                          epsilon=1e-5)[0])

    mean, var = jnp.mean(x, 0), jnp.var(x, 0)
    sigma = jnp.sqrt(running_var + 1e-5)
    r = jnp.clip(jnp.sqrt(var + 1e-5) / sigma, 0.5, 2.0)
    d = jnp.clip((mean - running_mean) / sigma, -1.0, 1.0)

    def fixed(v, g, b):
        return jnp.sum(w * F.batch_norm(v, None, None, g * r, g * d + b, training=True, epsilon=1e-5)[0])

    got = jax.grad(renorm, argnums=(0, 1, 2))(x, gamma, beta)
    expected = jax.grad(fixed, argnums=(0, 1, 2))(x, gamma, beta)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # and forward mode agrees with reverse mode
    tangent = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)
    _, jvp = jax.jvp(lambda v: renorm(v, gamma, beta), (x,), (tangent,))
    np.testing.assert_allclose(float(jvp), float(jnp.sum(got[0] * tangent)), rtol=1e-4)


def test_vmap_with_axis_name_equals_the_batched_call():
    """Cross-device exactness: per-sample calls under vmap(axis_name) reduce masked sums and counts exactly."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((6, 4, 3)) + 3, jnp.float32)
    mask = jnp.asarray(rng.random((6, 4, 1)) < 0.6).at[0, 0].set(True)
    kwargs = dict(r_max=1.3, d_max=0.4, momentum=0.7, training=True)
    mean, var = jnp.zeros((1, 3)), jnp.ones((1, 3))
    mapped_mean, mapped_var = mean[None], var[None]
    valid = np.broadcast_to(np.asarray(mask), x.shape)
    for step in range(3):
        y, mean, var = F.batch_renorm(x * (step + 1), mean, var, mask=mask, **kwargs)
        y_mapped, mapped_mean, mapped_var = jax.vmap(
            lambda v, m, rm, rv: F.batch_renorm(v, rm, rv, mask=m, axis_name="batch", **kwargs),
            axis_name="batch")(x * (step + 1), mask, jnp.broadcast_to(mapped_mean[:1], (6, 1, 3)),
                               jnp.broadcast_to(mapped_var[:1], (6, 1, 3)))
        np.testing.assert_allclose(np.asarray(y_mapped)[valid], np.asarray(y)[valid], rtol=1e-5, atol=1e-5)
        for got, expected in ((mapped_mean, mean), (mapped_var, var)):
            np.testing.assert_allclose(np.asarray(got), np.broadcast_to(np.asarray(expected), got.shape),
                                       rtol=1e-5, atol=1e-6)


def test_any_rank_units_and_call_time_affine():
    """One class for (C,) .. (D, H, W, C); running statistics keep mV; FiLM-style call-time scale and bias."""
    for in_size in [(3,), (4, 3), (2, 2, 3), (2, 2, 2, 3)]:
        layer = brainnorm.BatchRenorm(in_size)
        with brainstate.environ.context(fit=True):
            assert layer(jnp.ones((2,) + in_size)).shape == (2,) + in_size
    layer = brainnorm.BatchRenorm(3, use_scale=False, use_bias=False, r_max=1.5, d_max=0.5)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((4, 3)) * 3 + 1, jnp.float32) * u.mV
    scale, bias = np.linspace(0.5, 2.0, 4).reshape(4, 1), np.linspace(-1, 1, 4).reshape(4, 1)
    with brainstate.environ.context(fit=True):
        y = layer(x, scale=jnp.asarray(scale, jnp.float32), bias=jnp.asarray(bias, jnp.float32))
    assert layer.running_mean.value.unit == u.mV
    xm = np.asarray(x.mantissa, np.float64)
    mean, var = xm.mean(0), xm.var(0)
    r = np.clip(np.sqrt(var + 1e-5) / np.sqrt(1 + 1e-5), 1 / 1.5, 1.5)
    d = np.clip(mean / np.sqrt(1 + 1e-5), -0.5, 0.5)
    expected = scale * ((xm - mean) / np.sqrt(var + 1e-5) * r + d) + bias
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(r_max=0.5), ValueError, ["BatchRenorm", "r_max", ">= 1", "0.5"]),
    (dict(d_max=-1.0), ValueError, ["BatchRenorm", "d_max", ">= 0", "-1.0"]),
    (dict(r_max="3"), TypeError, ["BatchRenorm", "r_max", "'3'"]),
    (dict(warmup_steps=-2), ValueError, ["BatchRenorm", "warmup_steps", "-2"]),
    (dict(warmup_steps=1.5), TypeError, ["BatchRenorm", "warmup_steps", "1.5"]),
    (dict(in_size=(1, 2, 3, 4, 5)), ValueError, ["BatchRenorm", "in_size", "1 to 4"]),
])
def test_bad_options(kwargs, error, words):
    import re

    in_size = kwargs.pop("in_size", 3)
    with pytest.raises(error, match="(?s)" + ".*".join(re.escape(w) for w in words)):
        brainnorm.BatchRenorm(in_size, **kwargs)


def test_a_failed_call_writes_nothing():
    layer = brainnorm.BatchRenorm(3, warmup_steps=1)
    with brainstate.environ.context(fit=True):
        layer(jnp.ones((4, 3)) + jnp.arange(3.0))
    before = {path: np.asarray(state.value) for path, state in layer.states().items()}
    with brainstate.environ.context(fit=True):
        with pytest.raises(ValueError, match="BatchRenorm: expected an input whose trailing shape"):
            layer(jnp.ones((4, 5)))
        with pytest.raises(ValueError, match="BatchRenorm: scale given at call time needs a layer built with"):
            layer(jnp.ones((4, 3)), scale=jnp.ones(3))
        with pytest.raises(ValueError, match="BatchRenorm: mask of shape"):
            layer(jnp.ones((4, 3)), jnp.ones((5, 3), bool))
    for path, state in layer.states().items():
        assert np.array_equal(np.asarray(state.value), before[path]), path


def test_functional_needs_running_statistics():
    with pytest.raises(ValueError, match="batch_renorm: running_mean and running_var must be given"):
        F.batch_renorm(jnp.ones((4, 3)), None, None, training=True)
    with pytest.raises(TypeError, match="batch_renorm: renormalize must be a bool or a boolean array"):
        F.batch_renorm(jnp.ones((4, 3)), jnp.zeros(3), jnp.ones(3), training=True, renormalize="yes")
