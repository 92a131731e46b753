"""A checkpoint round trip keeps parameters and running statistics.

The recipe is the one the quick start documents (``docs/tutorials/quickstart.md``:
``checkpoint_states``, every state but the ``brainstate.HiddenState``\\ s), read
from the page itself, written with ``braintools.file.msgpack_save`` and read
back with ``braintools.file.msgpack_load``. brainnorm keeps running statistics
in ``brainstate.ShortTermState``\\ s, so the recipe that captures brainstate.nn's
(``model.states(brainstate.LongTermState)``) must not be enough here; the
tests show both.
"""

import pathlib
import re

import brainstate
import braintools
import jax.numpy as jnp
import numpy as np
import pytest

import brainnorm

QUICKSTART = pathlib.Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "quickstart.md"
T, B, N_IN, H = 4, 16, 5, 6


def _documented_recipe():
    """The ``checkpoint_states`` function of the quick start, executed from the page's code cell."""
    cells = re.findall(r"```\{code-cell\} ipython3\n(.*?)```", QUICKSTART.read_text(), re.DOTALL)
    source = [cell for cell in cells if "def checkpoint_states(" in cell]
    assert len(source) == 1, "the quick start defines checkpoint_states in exactly one code cell"
    namespace = {"brainstate": brainstate}
    exec(source[0].split("\nprint(")[0], namespace)
    return namespace["checkpoint_states"]


checkpoint_states = _documented_recipe()


class Neurons(brainstate.nn.Module):
    """A stand-in for spiking neurons: a batch-shaped hidden state reset for every batch."""

    def __init__(self, size):
        super().__init__()
        self.size = size
        self.V = brainstate.HiddenState(jnp.zeros((size,)))

    def update(self, current):
        self.V.value = jnp.zeros(current.shape[1:])
        out = []
        for t in range(current.shape[0]):
            self.V.value = 0.5 * self.V.value + current[t]
            out.append(jnp.tanh(self.V.value))
        return jnp.stack(out)


class Net(brainstate.nn.Module):
    """``Linear -> BatchNorm0d`` per step, ``Linear -> tdBN (multi-step) -> neurons``, a read-out."""

    def __init__(self, width=H):
        super().__init__()
        self.fc1 = brainstate.nn.Linear(N_IN, width)
        self.bn = brainnorm.BatchNorm0d(width, momentum=0.5)
        self.fc2 = brainstate.nn.Linear(width, width)
        self.tdbn = brainnorm.ThresholdDependentBatchNorm(width, step_mode="multi", momentum=0.5)
        self.neurons = Neurons(width)
        self.readout = brainstate.nn.Linear(width, 3)

    def update(self, x):  # x: (T, B, N_IN)
        h = jnp.tanh(self.bn(self.fc1(x)))
        h = self.neurons(self.tdbn(self.fc2(h)))
        return jnp.mean(self.readout(h), axis=0)


def _trained_net(seed=0):
    """A net whose parameters and running statistics are all far from their initial values."""
    brainstate.random.seed(seed)
    net = Net()
    params = net.states(brainstate.ParamState)
    optimizer = braintools.optim.SGD(lr=0.1)
    optimizer.register_trainable_weights(params)
    rng = np.random.default_rng(seed)

    def loss_fn(x):
        return jnp.mean(net(x) ** 2)

    for _ in range(4):
        x = jnp.asarray(rng.normal(2.0, 3.0, (T, B, N_IN)), jnp.float32)
        with brainstate.environ.context(fit=True):
            grads = brainstate.transform.grad(loss_fn, params)(x)
        optimizer.update(grads)
    return net


def _evaluate(net, x):
    with brainstate.environ.context(fit=False):
        return np.asarray(net(x))


@pytest.fixture(scope="module")
def x_eval():
    return jnp.asarray(np.random.default_rng(99).normal(2.0, 3.0, (T, 8, N_IN)), jnp.float32)


def test_recipe_keeps_running_statistics_not_hidden_states():
    net = _trained_net()
    kept = checkpoint_states(net)
    for layer in ("bn", "tdbn"):
        for name in ("running_mean", "running_var", "num_batches_tracked", "weight"):
            assert (layer, name) in kept
    assert ("neurons", "V") not in kept
    assert all(not isinstance(state, brainstate.HiddenState) for state in kept.values())
    # the running statistics are ShortTermStates: the LongTermState recipe misses them
    long_term = net.states(brainstate.LongTermState)
    assert ("bn", "running_mean") not in long_term and ("tdbn", "running_var") not in long_term
    assert ("bn", "weight") in long_term


def test_msgpack_round_trip_restores_running_statistics_and_outputs(tmp_path, x_eval):
    net = _trained_net(seed=0)
    assert int(net.bn.num_batches_tracked.value) == 4  # one update per training call
    assert int(net.tdbn.num_batches_tracked.value) == 4
    expected = _evaluate(net, x_eval)
    path = tmp_path / "net.msgpack"
    braintools.file.msgpack_save(str(path), checkpoint_states(net))

    brainstate.random.seed(123)
    restored = Net()
    assert not np.allclose(_evaluate(restored, x_eval), expected), "a fresh model must predict differently"
    braintools.file.msgpack_load(str(path), target=checkpoint_states(restored))

    for layer in ("bn", "tdbn"):
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            original = np.asarray(getattr(getattr(net, layer), name).value)
            value = np.asarray(getattr(getattr(restored, layer), name).value)
            assert value.dtype == original.dtype, f"{layer}.{name}"
            np.testing.assert_array_equal(value, original, err_msg=f"{layer}.{name}")
    for path_, state in net.states(brainstate.ParamState).items():
        for key, leaf in state.value.items():
            np.testing.assert_array_equal(
                np.asarray(restored.states()[path_].value[key]), np.asarray(leaf), err_msg=f"{path_} {key}"
            )
    np.testing.assert_array_equal(_evaluate(restored, x_eval), expected)


def test_long_term_state_recipe_does_not_restore_running_statistics(tmp_path, x_eval):
    net = _trained_net(seed=0)
    expected = _evaluate(net, x_eval)
    path = tmp_path / "params_only.msgpack"
    braintools.file.msgpack_save(str(path), net.states(brainstate.LongTermState))

    brainstate.random.seed(123)
    restored = Net()
    braintools.file.msgpack_load(str(path), target=restored.states(brainstate.LongTermState))
    # the parameters came back ...
    np.testing.assert_array_equal(
        np.asarray(restored.bn.weight.value["scale"]), np.asarray(net.bn.weight.value["scale"])
    )
    # ... the running statistics did not: they are still the initial ones, and so are the eval outputs
    np.testing.assert_array_equal(np.asarray(restored.bn.running_mean.value), np.zeros(H, np.float32))
    np.testing.assert_array_equal(np.asarray(restored.tdbn.running_var.value), np.ones(H, np.float32))
    assert int(restored.tdbn.num_batches_tracked.value) == 0
    assert not np.allclose(np.asarray(net.bn.running_mean.value), 0.0)
    assert not np.allclose(_evaluate(restored, x_eval), expected)


def test_loading_into_another_structure_raises(tmp_path):
    net = _trained_net(seed=0)
    path = tmp_path / "net.msgpack"
    braintools.file.msgpack_save(str(path), checkpoint_states(net))
    wider = Net(width=H + 1)
    with pytest.raises(ValueError):
        braintools.file.msgpack_load(str(path), target=checkpoint_states(wider))
