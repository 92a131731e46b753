"""Documented calls of brainnorm, as a user writes them, for a static type checker.

``tests/test_typing.py`` runs pyright (basic mode, ``[tool.pyright]`` in
pyproject.toml) over this file and fails on any error. Nothing here runs under
pytest (the name has no ``test_`` prefix); the file is importable, so the calls
are also real code. Each block names where the call is documented.
``typing.assert_type`` is a checker-only assertion: pyright reports an error
when the inferred type is not exactly the one given.
"""

from __future__ import annotations

from typing import assert_type

import brainstate
import braintools
import brainunit as u
import jax
import jax.numpy as jnp

import brainnorm
import brainnorm.functional as F
from brainnorm import NormalizationParamState

# --- README, docs/index.rst: quick start ---------------------------------------------------------------
x = jnp.ones((2, 128))
ln = brainnorm.LayerNorm(128)  # in_size: per-sample shape
y = ln(x)
assert_type(y, jax.Array)
assert_type(ln.update(x), jax.Array)
assert_type(ln.weight, NormalizationParamState)

bn = brainnorm.BatchNorm2d((28, 28, 16))  # channels last
images = jnp.ones((2, 28, 28, 16))
with brainstate.environ.context(fit=True):
    assert_type(bn(images), jax.Array)
assert_type(bn(images, use_running_average=True), jax.Array)
assert_type(bn.running_mean, brainstate.ShortTermState)
assert_type(bn.running_var, brainstate.ShortTermState)
assert_type(bn.weight, NormalizationParamState)
trained = bn.running_mean.value

# --- SPEC section 12 and issue 25: the calls pyright rejected ----------------------------------------
ln2 = brainnorm.LayerNorm((4, 8), reduction_axes=(-2, -1))
assert_type(ln2(jnp.ones((3, 4, 8))), jax.Array)
rms = brainnorm.RMSNorm(8, epsilon=None)
assert_type(rms(jnp.ones((3, 8))), jax.Array)
assert_type(rms.scale, NormalizationParamState)
bn0 = brainnorm.BatchNorm0d(8, momentum=None)
assert_type(bn0(jnp.ones((3, 8))), jax.Array)
gn = brainnorm.GroupNorm(8, num_groups=None, group_size=4)
assert_type(gn(jnp.ones((3, 8))), jax.Array)
ln3 = brainnorm.LayerNorm(8, scale_init=braintools.init.Normal(0.0, 0.1))
ln4 = brainnorm.LayerNorm(8, scale_init=brainstate.nn.init.Constant(1.0), bias_init=jnp.zeros(8))
ln5 = brainnorm.LayerNorm(8, epsilon=1e-5 * u.mV**2)

# --- brainstate 0.5 positional arguments (docs/porting.rst) -----------------------------------------
ln_pos = brainnorm.LayerNorm(32, -1)
ln_pos2 = brainnorm.LayerNorm((4, 8), (-2, -1), -1)
gn_pos = brainnorm.GroupNorm(8, -1, 4)
gn_pos2 = brainnorm.GroupNorm(8, -1, None, 2)
bn1_pos = brainnorm.BatchNorm1d((4, 3), -1)
bn2_pos = brainnorm.BatchNorm2d((4, 4, 3), 0)
bn3_pos = brainnorm.BatchNorm3d((2, 2, 2, 3), -1)
rms_pos = brainnorm.RMSNorm(32)
assert_type(ln_pos(jnp.ones((2, 32))), jax.Array)
assert_type(gn_pos(jnp.ones((2, 8))), jax.Array)

# --- brainstate keywords (SPEC section 3) --------------------------------------------------------------
bn_bs = brainnorm.BatchNorm1d(
    (4, 3),
    affine=True,
    bias_initializer=brainstate.nn.init.Constant(0.0),
    scale_initializer=brainstate.nn.init.Constant(1.0),
    mean_type=brainstate.ShortTermState,
    param_type=NormalizationParamState,
    name="bn",
)
ln_flags = brainnorm.LayerNorm(3, use_scale=False, use_bias=False, epsilon=1e-6)  # guides/conditional.rst
assert_type(ln_flags(jnp.ones((2, 3)), scale=jnp.ones((2, 1)), bias=jnp.zeros((2, 1))), jax.Array)
bn_film = brainnorm.BatchNorm2d((4, 4, 3), affine=False)
assert_type(bn_film(jnp.ones((2, 4, 4, 3)), scale=jnp.ones((2, 1, 1, 3))), jax.Array)

# --- guides: masks, errors, units, distributed, temporal -------------------------------------------------
mask = jnp.ones((2, 4, 1), dtype=bool)
bn_mask = brainnorm.BatchNorm1d((4, 3))
assert_type(bn_mask(jnp.ones((2, 4, 3)), mask=mask), jax.Array)
assert_type(bn_mask(jnp.ones((2, 4, 3)), mask), jax.Array)
bn_unit = brainnorm.BatchNorm1d((4, 3), unit=u.mV)
bn_mom = brainnorm.BatchNorm0d(4, momentum=0.9, use_running_average=False)
bn_unbiased = brainnorm.BatchNorm2d((4, 4, 8), momentum=0.9, unbiased_running_var=True)
per_sample = brainnorm.BatchNorm1d((5, 3), axis_name="batch")
brn = brainnorm.BatchRenorm((5, 3), warmup_steps=2, r_max=3.0, d_max=5.0)
assert_type(brn(jnp.ones((2, 5, 3))), jax.Array)
inst = brainnorm.InstanceNorm((5, 3), track_running_stats=True)
assert_type(inst(jnp.ones((2, 5, 3))), jax.Array)
lrn = brainnorm.LocalResponseNorm((4, 4, 8), 5, alpha=1e-4, beta=0.75, k=2.0)
assert_type(lrn(jnp.ones((2, 4, 4, 8))), jax.Array | u.Quantity)  # keeps the input's unit

# --- spiking layers (guides/temporal.rst, guides/spiking_frontier.rst, tutorials/spiking.md) ---------------
T, C = 4, 3
bntt = brainnorm.BatchNormThroughTime(C, num_steps=T)
multi = brainnorm.BatchNormThroughTime(C, num_steps=T, step_mode="multi")
assert_type(multi(jnp.ones((T, 2, C))), jax.Array)
assert_type(bntt(jnp.ones((2, C)), t=0), jax.Array)
tdbn = brainnorm.ThresholdDependentBatchNorm(C, v_th=0.5, momentum=0.0)
tdbn_multi = brainnorm.ThresholdDependentBatchNorm(C, v_th=1.0, step_mode="multi")
assert_type(tdbn_multi(jnp.ones((T, 2, C))), jax.Array)
tebn = brainnorm.TemporalEffectiveBatchNorm(C, num_steps=T, step_mode="multi")
assert_type(tebn(jnp.ones((T, 2, C))), jax.Array)
tab = brainnorm.TemporalAccumulatedBatchNorm(C, num_steps=T, step_mode="multi")
assert_type(tab(jnp.ones((T, 2, C))), jax.Array)
neu = brainnorm.NeuNorm((4, 4, 2), k=0.9, w_init=jnp.full((4, 4, 2), 0.5))
assert_type(neu(jnp.ones((2, 4, 4, 2))), jax.Array | u.Quantity)  # in the unit of the input

# --- weight wrappers ----------------------------------------------------------------------------------
wn = brainnorm.WeightNorm(brainstate.nn.Linear(4, 3))
sn = brainnorm.SpectralNorm(brainstate.nn.Linear(4, 3), n_steps=5)
wn_out = wn(jnp.ones((2, 4)))
sn_out = sn(jnp.ones((2, 4)), use_running_average=True)
assert_type(sn.normalized_weight(), jax.Array)

# --- divisive normalization (guides/divisive.rst, tutorials/divisive.md) ----------------------------------
dn = brainnorm.DivisiveNormalization(2, sigma=10 * u.mV, gain=100 * u.Hz, weights=jnp.eye(2))
assert_type(dn(jnp.ones((3, 2)) * u.mV), jax.Array | u.Quantity)
gdn = brainnorm.GDN(2)
assert_type(gdn(jnp.ones((3, 2))), jax.Array | u.Quantity)
igdn = brainnorm.GDN(2, inverse=True)
circuit = brainnorm.DynamicDivisiveNormalization(2, tau=5.0 * u.ms, tau_pool=10.0 * u.ms, sigma=1.0)
assert_type(circuit(jnp.ones((3, 2))), jax.Array | u.Quantity)

# --- deployment ---------------------------------------------------------------------------------------
fc = brainstate.nn.Linear(4, 3)
bn_fold = brainnorm.BatchNorm0d(3, momentum=0.0)
folded = brainnorm.fold_batch_norm(fc, bn_fold)
assert_type(folded, brainstate.nn.Linear)
threshold, sign = brainnorm.fold_threshold(brainnorm.BatchNorm0d(2, momentum=0.0), 1.0)
assert_type(threshold, jax.Array | u.Quantity)  # in the unit of the running statistics
assert_type(sign, jax.Array)

# --- functional API (guides/conventions.rst, guides/units.rst, tutorials/devices.md) --------------------------
v = jnp.ones((4, 3))
assert_type(F.layer_norm(v), jax.Array)
assert_type(F.layer_norm(v, use_fast_variance=True, reduction_axes=(-2, -1), epsilon=None), jax.Array)
assert_type(F.layer_norm(v, mask=v > 0), jax.Array)
assert_type(F.rms_norm(v, jnp.ones(3), epsilon=1e-6), jax.Array)
mean, var = F.moments(v, axes=0)
mean_q, var_q = F.moments(v * u.mV, axes=(0,), mask=v > 0)
y_bn, new_mean, new_var = F.batch_norm(v, jnp.zeros(3), jnp.ones(3), training=True, momentum=0.9)
assert_type(y_bn, jax.Array)
y_bn2, _, _ = F.batch_norm(v, None, None, training=True)
assert_type(F.normalize(v, mean, var, epsilon=1e-5), jax.Array)
assert_type(F.group_norm(jnp.ones((1, 6)), 2), jax.Array)
assert_type(F.group_norm(jnp.ones((1, 6)), None, group_size=3), jax.Array)
assert_type(F.instance_norm(jnp.ones((2, 5, 3))), jax.Array)
assert_type(F.local_response_norm(jnp.ones((2, 8)), 5), jax.Array | u.Quantity)
assert_type(F.lp_normalize(v, 2.0, axis=-1), jax.Array | u.Quantity)
assert_type(brainnorm.weight_standardization(jnp.ones((3, 3, 4, 8))), jax.Array)
assert_type(F.weight_standardization(jnp.ones((3, 3, 4, 8)), eps=1e-4, gain=None, out_axis=-1), jax.Array)
info = brainnorm.backend_info()

# --- state access as the guides and tutorials write it (guides/masks.rst, tutorials/quickstart.md) ----------
ln_state = brainnorm.LayerNorm(3)
ln_state.weight.value = {"scale": jnp.ones((3,)), "bias": jnp.full((3,), 0.5)}
bn_state = brainnorm.BatchNorm0d(16)
first_channels = bn_state.running_mean.value[:4]
restored = bool(jnp.array_equal(bn_state.running_var.value, bn_state.running_var.value))
trainable = bn_state.states(brainstate.ParamState)
groups = brainnorm.GroupNorm((5, 6), num_groups=None, group_size=3).num_groups
tebn_p = tebn.p.value
unit_of_mean = brainnorm.BatchNorm1d((4, 3), unit=u.mV).running_mean.value
