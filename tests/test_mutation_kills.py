"""Tests written for mutants of ``_stats.py``, ``_spiking_functional.py`` and ``_divisive_functional.py``
that survived the mutation run (cosmic-ray; see CONTRIBUTING.md), one per behaviour the mutant changed.

Equivalent mutants of that run (no test can kill them; they change no result):

- ``_stats.py`` ``while trailing > 0 and (trailing - 1) in axes`` -> ``while not trailing > 0 and ...``
  (``_sum_kept``'s reduction layout): the loop only chooses how the innermost reduced block is
  reshaped before it is summed; without it the same elements are summed in another order. Results
  differ by rounding only.
- ``_stats.py`` ``... and start - 1 >= 1 and start - 1 in axes`` -> ``start - 0 >= 1`` (the same
  layout loop, channels last): lets the merged block reach the leading axis, which the layout avoids for
  sharded batches; the same elements are summed, in another order. Results differ by rounding only.
- ``_stats.py`` ``per_channel[0].shape[feature]`` -> ``per_channel[-1].shape[feature]``: every array
  of ``per_channel`` has the same shape (they are sums of arrays of one shape).
- ``_stats.py`` (sums across ``axis_name``) ``... if not jnp.iscomplexobj(s2) else stacked[-1]`` ->
  ``else stacked[-0]``: ``s2`` is a sum of ``|x - k|^2``, real for complex data too, so the ``else``
  branch never runs. ``test_complex_moments_across_a_mapped_axis`` checks that path's results.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brainnorm import functional as F
from brainnorm._spiking_functional import AccumulatedSums


def _keyword_only_after(func, first_keyword):
    params = list(inspect.signature(func).parameters.values())
    names = [p.name for p in params]
    start = names.index(first_keyword)
    return params[:start], params[start:]


@pytest.mark.parametrize("func, first_keyword", [
    (F.temporal_accumulated_batch_norm, "training"),
    (F.neu_norm, "k"),
    (F.gdn, "inverse"),
    (F.divisive_normalization, "exponent"),
])
def test_options_are_keyword_only(func, first_keyword):
    """A `*` turned into `/` would make the options positional (and the leading arguments positional-only)."""
    before, after = _keyword_only_after(func, first_keyword)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in after), [(p.name, p.kind) for p in after]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in before), [(p.name, p.kind) for p in before]


def test_tab_options_cannot_be_passed_by_position():
    x = jnp.ones((2, 3, 2))
    with pytest.raises(TypeError):
        F.temporal_accumulated_batch_norm(x, None, None, None, None, None, True)
    # and the input may be named
    y = F.temporal_accumulated_batch_norm(x=x, training=True)[0]
    assert y.shape == x.shape


def test_tab_accumulated_without_scale_equals_scale_one(rng):
    """An AccumulatedSums of four fields (no ``scale``) is read with scale 1."""
    x = jnp.asarray(rng.standard_normal((3, 4, 2)) + 1.0, jnp.float32)
    _, _, _, scaled = F.temporal_accumulated_batch_norm(x[:2], training=True, return_accumulated=True)
    # the same sums at scale 1 (the core may return them at a power-of-two scale)
    s = scaled.scale
    acc = AccumulatedSums(scaled.count, scaled.shift, scaled.total / s, scaled.total_sq / (s * s), jnp.ones_like(s))
    with_scale = F.temporal_accumulated_batch_norm(x[2:], training=True, accumulated=acc)[0]
    four = (acc.count, acc.shift, acc.total, acc.total_sq)
    without = F.temporal_accumulated_batch_norm(x[2:], training=True, accumulated=four)[0]
    np.testing.assert_array_equal(np.asarray(without), np.asarray(with_scale))
    # and both equal the multi-step call's last step
    full = F.temporal_accumulated_batch_norm(x, training=True)[0]
    np.testing.assert_allclose(np.asarray(without), np.asarray(full[2:]), rtol=1e-5, atol=1e-5)
    assert isinstance(acc, AccumulatedSums)


@pytest.mark.parametrize("fast", [False, True], ids=["two-pass", "fast"])
def test_masked_group_and_layer_norm_gradients_float64(rng, fast):
    """The masked normalization's derivative rule (per group and per element) against central differences."""
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, 3, 4)) * 1.5 + 0.7)
        mask = jnp.asarray(rng.random((2, 3, 4)) > 0.3).at[:, 0, :].set(True)
        c = jnp.asarray(rng.standard_normal((2, 3, 4)))
        scale = jnp.asarray(rng.uniform(0.5, 1.5, 4))
        bias = jnp.asarray(rng.uniform(-0.5, 0.5, 4))

        def group(v, s, b):
            return jnp.sum(F.group_norm(v, 2, s, b, mask=mask, epsilon=1e-3, use_fast_variance=fast) * c)

        def layer(v, s, b):
            return jnp.sum(F.layer_norm(v, s, b, mask=mask, epsilon=1e-3, use_fast_variance=fast) * c)

        for loss in (group, layer):
            grads = jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)
            for i, base in enumerate((x, scale, bias)):
                flat = base.reshape(-1)
                expected = []
                for j in range(flat.size):
                    e = jnp.zeros_like(flat).at[j].set(1e-6).reshape(base.shape)
                    args = [x, scale, bias]
                    plus, minus = list(args), list(args)
                    plus[i], minus[i] = base + e, base - e
                    expected.append((loss(*plus) - loss(*minus)) / 2e-6)
                expected = np.asarray(expected).reshape(base.shape)
                np.testing.assert_allclose(np.asarray(grads[i]), expected, rtol=1e-5,
                                           atol=1e-5 * max(1.0, np.abs(expected).max()), err_msg=f"{loss.__name__} {i}")


def test_complex_moments_across_a_mapped_axis(rng):
    """Sums of complex data across ``axis_name`` (psum of count, mean and variance together)."""
    x = (rng.standard_normal((4, 3, 2)) + 1j * rng.standard_normal((4, 3, 2))).astype(np.complex64)
    mean, var = jax.vmap(lambda v: F.moments(v, 0, axis_name="batch"), axis_name="batch")(x)
    expected_mean = x.mean(axis=(0, 1))
    expected_var = np.mean(np.abs(x - expected_mean) ** 2, axis=(0, 1))
    np.testing.assert_allclose(np.asarray(mean)[0].ravel(), expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(var)[0].ravel(), expected_var, rtol=1e-5, atol=1e-6)
    assert not np.iscomplexobj(np.asarray(var))


def test_batch_renorm_bias_is_added(rng):
    x = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)
    rm, rv = jnp.zeros(3), jnp.ones(3)
    bias = jnp.asarray([0.5, -1.0, 2.0])
    without = F.batch_renorm(x, rm, rv, training=True)[0]
    with_bias = F.batch_renorm(x, rm, rv, None, bias, training=True)[0]
    np.testing.assert_allclose(np.asarray(with_bias - without), np.broadcast_to(bias, (6, 3)), atol=1e-6)


@pytest.mark.parametrize("fast", [False, True], ids=["two-pass", "fast"])
def test_masked_mean_square_without_mean(rng, fast):
    """``use_mean=False`` (RMS statistics) with a mask: the second moment about 0 of the valid elements."""
    x = rng.standard_normal((3, 5)).astype(np.float32) + 0.5
    mask = rng.random((3, 5)) > 0.4
    mask[:, 0] = True
    _, second = F.moments(x, -1, mask=mask, use_mean=False, use_fast_variance=fast)
    expected = np.sum(np.where(mask, x.astype(np.float64) ** 2, 0), axis=-1) / mask.sum(-1)
    np.testing.assert_allclose(np.ravel(np.asarray(second)), expected, rtol=1e-5)


def test_instance_norm_running_statistics_across_a_mapped_axis(rng):
    """Instance-averaged running statistics over a batch split across ``axis_name`` equal the unsplit call's."""
    x = (rng.standard_normal((4, 3, 2)) * np.array([1.0, 3.0]) + np.array([2.0, -1.0])).astype(np.float32)
    rm, rv = jnp.zeros((1, 1, 2)), jnp.ones((1, 1, 2))

    def call(v, **kw):
        return F.instance_norm(v, running_mean=rm, running_var=rv, training=True, momentum=0.5, **kw)

    _, mean, var = call(jnp.asarray(x))
    split = jnp.asarray(x).reshape(2, 2, 3, 2)
    _, mean_split, var_split = jax.vmap(lambda v: call(v, axis_name="d"), axis_name="d")(split)
    np.testing.assert_allclose(np.asarray(mean_split)[0], np.asarray(mean), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(var_split)[0], np.asarray(var), rtol=1e-5, atol=1e-6)
    # the average of the instances' means, moved half way from 0
    np.testing.assert_allclose(np.ravel(mean), 0.5 * x.mean(axis=(0, 1)), rtol=1e-5, atol=1e-6)
