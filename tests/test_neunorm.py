"""NeuNorm against spikingjelly 2.0's ``layer.NeuNorm`` and a float64 NumPy restatement.

spikingjelly is channels first (``[N, C, H, W]``): brainnorm runs with
``in_size=(C, H, W), feature_axis=0`` and the same ``w``. The NumPy
restatement of the formula (``a_t = k a_{t-1} + (1 - k) / C**2 * sum_c s_t``,
``y_t = s_t - w a_t``) runs whether or not spikingjelly is installed, so the
comparison is never vacuous. Tolerance: 1e-6 absolute (spikes are 0/1, ``w``
of order 1).
"""

import brainstate
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brainnorm import NeuNorm
from brainnorm.functional import neu_norm

ATOL = 1e-6
T, N, C, H, W = 5, 3, 4, 3, 2


def reference(spikes, w, k, feature_axis):
    """float64 NeuNorm over a ``(T, N, ...)`` sequence, channels along ``feature_axis`` of a sample."""
    spikes = np.asarray(spikes, np.float64)
    axis = feature_axis % (spikes.ndim - 2) + 2
    channels = spikes.shape[axis]
    state = np.zeros(spikes.shape[1:axis] + (1,) + spikes.shape[axis + 1:])
    outputs = []
    for s in spikes:
        state = k * state + (1 - k) / channels**2 * s.sum(axis=axis - 1, keepdims=True)
        outputs.append(s - np.asarray(w, np.float64) * state)
    return np.stack(outputs), state


@pytest.fixture
def spikes(rng):
    return (rng.random((T, N, C, H, W)) < 0.4).astype(np.float32)


def _weight(rng, shared):
    return rng.uniform(-1.0, 1.0, (1 if shared else C, H, W)).astype(np.float32)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("step_mode", ["single", "multi"])
def test_equals_numpy_restatement(spikes, rng, shared, step_mode):
    w = _weight(rng, shared)
    layer = NeuNorm((C, H, W), 0, k=0.8, shared_across_channels=shared, w_init=w, step_mode=step_mode)
    layer.init_state(N)
    if step_mode == "multi":
        y = np.asarray(layer(spikes))
    else:
        y = np.stack([np.asarray(layer(s)) for s in spikes])
    expected, state = reference(spikes, w, 0.8, 0)
    np.testing.assert_allclose(y, expected, atol=ATOL)
    np.testing.assert_allclose(layer.activity.value, state, atol=ATOL)
    assert layer.w.value.shape == ((1, H, W) if shared else (C, H, W))


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("step_mode", ["single", "multi"])
def test_equals_spikingjelly(spikes, rng, shared, step_mode):
    torch = pytest.importorskip("torch")
    # spikingjelly imports loguru: ask for it by name, so that its absence is not reported as spikingjelly's
    pytest.importorskip("loguru", reason="loguru (a runtime requirement of spikingjelly 2.0) is not installed")
    sj_layer = pytest.importorskip("spikingjelly.activation_based.layer")
    k = 0.7
    w = _weight(rng, shared)
    mode = "m" if step_mode == "multi" else "s"
    theirs = sj_layer.NeuNorm(C, H, W, k=k, shared_across_channels=shared, step_mode=mode)
    with torch.no_grad():
        theirs.w.copy_(torch.from_numpy(w))
    ours = NeuNorm((C, H, W), 0, k=k, shared_across_channels=shared, w_init=w, step_mode=step_mode)
    ours.init_state(N)
    for _ in range(2):  # two sequences: reset between them
        theirs.reset()
        ours.reset_state(N)
        with torch.no_grad():
            if step_mode == "multi":
                expected = theirs(torch.from_numpy(spikes)).numpy()
                y = np.asarray(ours(spikes))
            else:
                expected = np.stack([theirs(torch.from_numpy(s)).numpy() for s in spikes])
                y = np.stack([np.asarray(ours(s)) for s in spikes])
        np.testing.assert_allclose(y, expected, atol=ATOL)
        np.testing.assert_allclose(y, reference(spikes, w, k, 0)[0], atol=ATOL)


def test_channels_last_and_shared_weight_shape(spikes, rng):
    channels_last = np.moveaxis(spikes, 2, -1)  # (T, N, H, W, C)
    w = rng.uniform(-1.0, 1.0, (H, W, 1)).astype(np.float32)
    layer = NeuNorm((H, W, C), k=0.9, shared_across_channels=True, w_init=w, step_mode="multi")
    layer.init_state(N)
    y = np.asarray(layer(channels_last))
    expected, _ = reference(channels_last, w, 0.9, -1)
    np.testing.assert_allclose(y, expected, atol=ATOL)


def test_hidden_state_init_reset_and_jitted_for_loop(spikes, rng):
    w = _weight(rng, False)
    layer = NeuNorm((C, H, W), 0, k=0.9, w_init=w)
    brainstate.nn.init_all_states(layer, N)
    assert isinstance(layer.activity, brainstate.HiddenState)
    assert isinstance(layer.w, brainstate.ParamState)
    assert layer.activity.value.shape == (N, 1, H, W)
    run = brainstate.transform.jit(lambda xs: brainstate.transform.for_loop(layer, xs))
    y = np.asarray(run(jnp.asarray(spikes)))
    expected, state = reference(spikes, w, 0.9, 0)
    np.testing.assert_allclose(y, expected, atol=ATOL)
    np.testing.assert_allclose(layer.activity.value, state, atol=ATOL)
    layer.reset_state(N)
    np.testing.assert_array_equal(layer.activity.value, 0.0)
    # gradients reach w and the input
    grads = brainstate.transform.grad(lambda x: jnp.sum(layer(x) ** 2), grad_states={"w": layer.w}, argnums=0)(
        jnp.asarray(spikes[0]))
    assert grads[0]["w"].shape == (C, H, W) and float(jnp.abs(grads[0]["w"]).max()) > 0


def test_function_single_and_multi_step_agree(spikes, rng):
    w = _weight(rng, False)
    y_multi, last = neu_norm(spikes, w, k=0.6, feature_axes=1, multi_step=True)
    state, outputs = None, []
    for s in spikes:
        y, state = neu_norm(s, w, state, k=0.6, feature_axes=1)
        outputs.append(y)
    np.testing.assert_allclose(np.stack(outputs), y_multi, atol=ATOL)
    np.testing.assert_allclose(state, last, atol=ATOL)
    tangent = jnp.ones_like(jnp.asarray(spikes))
    _, forward = jax.jvp(lambda x: neu_norm(x, w, k=0.6, feature_axes=1, multi_step=True)[0],
                         (jnp.asarray(spikes),), (tangent,))
    assert forward.shape == spikes.shape


def test_errors(spikes):
    with pytest.raises(ValueError, match="NeuNorm: k must be a number in"):
        NeuNorm((C, H, W), 0, k=1.5)
    with pytest.raises(ValueError, match="NeuNorm: step_mode"):
        NeuNorm((C, H, W), 0, step_mode="m")
    with pytest.raises(ValueError, match="NeuNorm: feature_axis"):
        NeuNorm((C, H, W), 3)
    layer = NeuNorm((C, H, W), 0)
    layer.init_state(N)
    before = np.asarray(layer.activity.value)
    with pytest.raises(ValueError, match="reset_state"):
        layer(spikes[0, :2])  # another batch size
    with pytest.raises(ValueError, match="trailing shape"):
        layer(spikes[0, :, :2])
    np.testing.assert_array_equal(layer.activity.value, before)
