"""Regressions found in review of the single statistics core."""

import subprocess
import sys
import textwrap

import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brainnorm import functional as F

from ._devices import ROOT, four_device_env


@pytest.mark.parametrize("name, call", [
    ("layer_norm", lambda x, s, b: F.layer_norm(x, s, b)),
    ("batch_norm", lambda x, s, b: F.batch_norm(x, None, None, s, b, training=True)[0]),
    ("group_norm", lambda x, s, b: F.group_norm(x, 2, s, b)),
])
@pytest.mark.parametrize("kind", ["int", "bool"])
def test_integer_parameters_differentiate_like_float_ones(name, call, kind):
    """Integer or boolean scale/bias have no tangent space: the gradient w.r.t. x must still work."""
    x = jnp.arange(12.0).reshape(3, 4) ** 1.5
    scale, bias = (jnp.array([2, 1, 3, 1]), jnp.array([1, 0, 2, 1])) if kind == "int" else (
        jnp.array([True, True, False, True]), jnp.array([True, False, True, False]))
    loss = lambda s, b: (lambda v: jnp.sum(call(v, s, b) ** 3))
    expected = jax.grad(loss(scale.astype(jnp.float32), bias.astype(jnp.float32)))(x)
    got = jax.grad(loss(scale, bias))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_a_running_variance_with_a_unit_is_converted_or_refused():
    x = jnp.arange(8.0).reshape(2, 4) * u.mV
    _, _, var = F.batch_norm(x, jnp.zeros(4), jnp.ones(4) * u.volt**2, training=False)
    np.testing.assert_allclose(np.asarray(var.to_decimal(u.mV**2)), np.full(4, 1e6), rtol=1e-6)
    y, _, _ = F.batch_norm(x, jnp.zeros(4), jnp.ones(4) * u.volt**2, training=False, epsilon=1e-12)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x.to_decimal(u.mV)) / 1e3, rtol=1e-5)
    with pytest.raises(u.UnitMismatchError, match="running_var"):
        F.batch_norm(x, jnp.zeros(4), jnp.ones(4) * u.second, training=True)
    with pytest.raises(u.UnitMismatchError, match="running_var"):
        F.instance_norm(x[:, None], running_mean=jnp.zeros(4), running_var=jnp.ones(4) * u.second)


def test_array_momentum_is_checked_and_keeps_the_statistics_shape():
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 4))
    per_channel = np.array([0.9, 0.5, 0.0, 1.0])
    for momentum in (per_channel, jnp.asarray(per_channel)):
        _, mean, var = F.batch_norm(x, jnp.zeros(4), jnp.ones(4), training=True, momentum=momentum)
        assert mean.shape == (4,) and var.shape == (4,)
        batch_mean = np.asarray(x).mean(0)
        np.testing.assert_allclose(np.asarray(mean), (1 - per_channel) * batch_mean, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="broadcasts to the running statistics' shape"):
        F.batch_norm(x, jnp.zeros(4), jnp.ones(4), training=True, momentum=jnp.full((1, 1, 4), 0.9))
    with pytest.raises(ValueError, match="broadcasts to the running statistics' shape"):
        F.batch_norm(x, jnp.zeros(4), jnp.ones(4), training=True, momentum=jnp.full((3,), 0.9))
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        F.batch_norm(x, jnp.zeros(4), jnp.ones(4), training=True, momentum=jnp.full((4,), 1.5))


def test_masked_normalization_on_a_mesh_with_explicit_axes():
    """Masks under explicit sharding: forward and gradients keep the batch sharding (regression)."""
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from brainnorm import functional as F
        mesh = jax.make_mesh((4,), ("d",))
        x = jax.random.normal(jax.random.PRNGKey(0), (8, 16))
        m = (jnp.arange(8) % 3 != 0)[:, None]
        xs = jax.device_put(x, NamedSharding(mesh, P("d", None)))
        ms = jax.device_put(m, NamedSharding(mesh, P("d", None)))
        ln = lambda a, k: jnp.sum(jnp.sin(F.layer_norm(a, mask=k)))
        bn = lambda a, k: jnp.sum(jnp.sin(F.batch_norm(a, jnp.zeros(16), jnp.ones(16), mask=k, training=True)[0]))
        for f in (ln, bn):
            g = jax.jit(jax.grad(f))(xs, ms)
            assert g.sharding.spec == P("d", None), g.sharding
            np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(f)(x, m)), rtol=1e-5, atol=1e-6)
        y = jax.jit(lambda a, k: F.layer_norm(a, mask=k))(xs, ms)
        assert y.sharding.spec == P("d", None), y.sharding
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=four_device_env(), capture_output=True, text=True,
                          timeout=600, cwd=str(ROOT))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
