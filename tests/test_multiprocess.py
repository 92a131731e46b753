"""Data-parallel training over two processes under ``jax.distributed`` equals one process (SPEC §13).

``python -m brainnorm.distributed`` starts tests/_multiprocess_worker.py as
two processes with two CPU devices each, joined over loopback with the gloo
collectives; one global mesh spans the four devices. The worker runs two
training steps of BatchNorm1d/2d/3d, BatchRenorm, tdBN, TEBN and TAB on a
global batch of padded sequences, sharded along its batch axis, under GSPMD
and under ``shard_map`` with ``axis_name``; the two processes hold different
numbers of valid elements. One launch computes every case; this process
runs the same steps on one device with the whole global batch, and compares:

- outputs and input gradients (put together from both processes' shards),
  parameter gradients and running statistics equal the single-process run,
  and for the BatchNorm layers and tdBN the float64 NumPy references of
  tests/reference.py (two steps of the running-statistics recursion);
- running statistics and parameter gradients are bit-identical on every
  device of every process;
- LayerNorm keeps the batch sharding, with no all-gather in its program.

And the launcher: a child that fails (a bad input on rank 1, while rank 0
waits for it in a collective) makes it exit non-zero with that child's
error within its time limit; the time limit stops children that hang; no
process is left behind.

The processes compile with ``--xla_backend_optimization_level=0`` (half the
compile time; the HLO, and so the statistics, are the same).

Tolerances (float32, values of order 1 to 10): outputs, input gradients
and running statistics within 1e-5 absolute + 1e-5 relative of the
single-process run and of the float64 references; parameter gradients (sums
over the batch, of order 10) within 1e-4 absolute + 1e-5 relative. The
largest differences measured are printed by ``test_report_largest_differences``
(run with ``-s`` to see them).
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from brainnorm import distributed

from . import _multiprocess_worker as worker
from . import reference as ref
from . import reference_training as reft

pytestmark = pytest.mark.slow

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "_multiprocess_worker.py"
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
LIMIT = 240  # seconds the launcher gives the worker (a loaded CI machine; about 30 s when idle)
ATOL = RTOL = 1e-5
GRAD_ATOL = 1e-4
CASES = [(name, mode) for name in worker.LAYERS for mode in worker.MODES]
LARGEST: dict[str, float] = {}  # largest |multi-process - reference| per kind of value, for the report


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # LLVM's optimizations of the CPU code take half the compile time of these small programs and change nothing
    # that is compared (the statistics are those of the same HLO); the launcher adds the device count
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def _launch(out, *mode, timeout=LIMIT, devices=DEVICES_PER_PROCESS):
    command = [sys.executable, "-m", "brainnorm.distributed", "-n", str(NUM_PROCESSES)]
    command += ["--devices-per-process", str(devices), "--timeout", str(timeout), str(WORKER), str(out), *mode]
    return subprocess.Popen(command, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Launch:
    """Both processes' results: ``value(case, key)`` puts sharded outputs together, ``copies`` stacks replicas."""

    def __init__(self, out, stdout, stderr, returncode, seconds):
        self.stdout, self.stderr, self.returncode, self.seconds = stdout, stderr, returncode, seconds
        self.meta, self.arrays = [], []
        for rank in range(NUM_PROCESSES):
            self.meta.append(json.loads((out / f"rank{rank}.json").read_text()))
            with np.load(out / f"rank{rank}.npz") as npz:
                self.arrays.append({k: npz[k] for k in npz.files})

    def check_case(self, case):
        for meta in self.meta:
            if case in meta["errors"]:
                pytest.fail(f"process {meta['process_id']}: case {case} raised:\n{meta['errors'][case]}")

    def value(self, case, key, batch_axis):
        """The global array of a batch-sharded output, from every process's shards (keys ``key@start``)."""
        self.check_case(case)
        prefix = f"{case}/{key}@"
        shards = {}
        for arrays in self.arrays:
            shards.update({int(k[len(prefix) :]): v for k, v in arrays.items() if k.startswith(prefix)})
        assert len(shards) == NUM_PROCESSES * DEVICES_PER_PROCESS, f"{case}/{key}: shards at {sorted(shards)}"
        return np.concatenate([shards[start] for start in sorted(shards)], axis=batch_axis)

    def copies(self, case, key):
        """Every device's copy of a replicated value, process 0's devices first: ``(4, ...)``."""
        self.check_case(case)
        return np.concatenate([arrays[f"{case}/{key}"] for arrays in self.arrays])

    def keys(self, case, rank=0):
        return {k[len(case) + 1 :] for k in self.arrays[rank] if k.startswith(case + "/")}


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    out = tmp_path_factory.mktemp("multiprocess")
    started = time.monotonic()
    proc = _launch(out)
    try:
        single = {name: worker.run_single(name) for name in worker.LAYERS}  # while the processes run
        stdout, stderr = proc.communicate(timeout=LIMIT + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    seconds = time.monotonic() - started
    assert proc.returncode == 0, f"launcher failed ({proc.returncode}):\n{stdout[-4000:]}\n{stderr[-4000:]}"
    result = Launch(out, stdout, stderr, proc.returncode, seconds)
    result.single = single
    return result


def _record(kind, actual, expected):
    diff = float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64)), initial=0.0))
    LARGEST[kind] = max(LARGEST.get(kind, 0.0), diff)


def assert_close(actual, expected, kind, atol=ATOL, rtol=RTOL):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    _record(kind, actual, expected)
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


def assert_identical_copies(copies, what):
    for device in range(1, len(copies)):
        assert np.array_equal(copies[device], copies[0], equal_nan=True), (
            f"{what}: device {device} (process {device // DEVICES_PER_PROCESS}) holds other values than device 0"
        )


# --- the launch and the data ---------------------------------------------------------------------


def test_two_processes_of_two_devices_ran_every_case(launch):
    for rank, meta in enumerate(launch.meta):
        assert meta["process_id"] == rank
        assert meta["num_processes"] == NUM_PROCESSES
        assert meta["devices"] == NUM_PROCESSES * DEVICES_PER_PROCESS
        assert meta["local_devices"] == DEVICES_PER_PROCESS
        assert not meta["errors"], meta["errors"]
    lines = launch.stdout.splitlines()
    for rank in range(NUM_PROCESSES):
        assert any(line.startswith(f"[rank {rank}] process {rank}: ") for line in lines), launch.stdout[-2000:]
    assert all(line.startswith("[rank ") for line in lines if line), "every output line carries its rank"


def test_processes_hold_different_numbers_of_valid_elements():
    """The premise: the masks give the two processes very different valid counts (and a sample none)."""
    for name, (_, shape, batch_axis, _) in worker.LAYERS.items():
        _, mask, _ = worker.data(name, 0)
        halves = np.split(np.broadcast_to(mask, shape), NUM_PROCESSES, axis=batch_axis)
        counts = [int(h.sum()) for h in halves]
        assert counts[0] >= 2 * counts[1] > 0, (name, counts)
        per_sample = np.moveaxis(np.broadcast_to(mask, shape), batch_axis, 0).reshape(shape[batch_axis], -1)
        assert (per_sample.sum(1) == 0).any(), f"{name}: no fully padded sample"


def test_average_of_per_process_means_is_not_the_global_mean():
    """What averaging each process's masked mean gives is far from the exact mean: the comparison can fail."""
    x, mask, _ = worker.data("BatchNorm1d", 0)
    exact = ref.moments(x, (0, 1), mask)[0].ravel()
    halves = [ref.moments(xh, (0, 1), mh)[0].ravel() for xh, mh in zip(np.split(x, 2), np.split(mask, 2), strict=True)]
    assert np.all(np.abs(np.mean(halves, axis=0) - exact) > 0.3), (halves, exact)


# --- every layer, both ways of sharding: equal to one process --------------------------------------------


@pytest.mark.parametrize("name,mode", CASES)
def test_outputs_and_input_gradients_equal_one_process(launch, name, mode):
    batch_axis = worker.LAYERS[name][2]
    single = launch.single[name]
    for step in range(worker.STEPS):
        assert_close(launch.value(f"{name}/{mode}", f"y{step}", batch_axis), single[f"y{step}"], "output")
        assert_close(launch.value(f"{name}/{mode}", f"gx{step}", batch_axis), single[f"gx{step}"], "input gradient")


@pytest.mark.parametrize("name,mode", CASES)
def test_running_statistics_identical_everywhere_and_equal_one_process(launch, name, mode):
    single = launch.single[name]
    for step in range(worker.STEPS):
        for key in (f"mean{step}", f"var{step}"):
            copies = launch.copies(f"{name}/{mode}", key)
            assert copies.shape[0] == NUM_PROCESSES * DEVICES_PER_PROCESS
            assert_identical_copies(copies, f"{name}/{mode} {key}")
            assert_close(copies[0], single[key][0], "running statistics")
    # and they moved: the comparison is not between two initial values
    assert not np.allclose(single[f"mean{worker.STEPS - 1}"], 0.0)


@pytest.mark.parametrize("name,mode", CASES)
def test_parameter_gradients_identical_everywhere_and_equal_one_process(launch, name, mode):
    single = launch.single[name]
    keys = {k for k in launch.keys(f"{name}/{mode}") if k.startswith("g") and not k.startswith("gx")}
    assert keys == {k for k in single if k.startswith("g") and not k.startswith("gx")}, keys
    assert keys, "no parameter gradient"
    for key in sorted(keys):
        copies = launch.copies(f"{name}/{mode}", key)
        assert_identical_copies(copies, f"{name}/{mode} {key}")
        assert_close(copies[0], single[key][0], "parameter gradient", atol=GRAD_ATOL)


# --- the BatchNorm layers and tdBN against float64 references ----------------------------------------------

FLOAT64_CASES = {  # name: factor on the scale (tdBN: alpha * v_th), epsilon 1e-5 everywhere
    "BatchNorm1d": 1.0,
    "BatchNorm2d": 1.0,
    "BatchNorm3d": 1.0,
    "ThresholdDependentBatchNorm": 0.8 * 0.5,
}


@pytest.mark.parametrize("mode", worker.MODES)
@pytest.mark.parametrize("name", FLOAT64_CASES)
def test_batch_norm_steps_equal_float64_reference(launch, name, mode):
    _, shape, batch_axis, _ = worker.LAYERS[name]
    axes = tuple(range(len(shape) - 1))  # every axis but the channels
    factor = FLOAT64_CASES[name]
    case = f"{name}/{mode}"
    mean, var = np.zeros(worker.CHANNELS), np.ones(worker.CHANNELS)
    for step in range(worker.STEPS):
        x, mask, weights = worker.data(name, step)
        y = ref.normalize(x, axes, mask, 1e-5, factor * worker.SCALE, worker.BIAS)
        assert_close(launch.value(case, f"y{step}", batch_axis), y, "output vs float64")
        dx, g_xhat = reft.normalize_vjp(x, weights, axes, 1e-5, factor * worker.SCALE, mask)
        assert_close(launch.value(case, f"gx{step}", batch_axis), dx, "input gradient vs float64")
        grads = {k: launch.copies(case, k)[0].ravel() for k in launch.keys(case) if k.startswith(f"g{step}[")}
        (scale_key,) = [k for k in grads if "scale" in k]
        (bias_key,) = [k for k in grads if "bias" in k]
        assert_close(grads[scale_key], factor * g_xhat.sum(axes), "parameter gradient vs float64", atol=GRAD_ATOL)
        assert_close(
            grads[bias_key], weights.astype(np.float64).sum(axes), "parameter gradient vs float64", atol=GRAD_ATOL
        )
        mean, var = ref.running_update(mean, var, x, axes, worker.MOMENTUM, mask)
        assert_close(launch.copies(case, f"mean{step}")[0].ravel(), mean, "running statistics vs float64")
        assert_close(launch.copies(case, f"var{step}")[0].ravel(), var, "running statistics vs float64")


# --- per-sample layers keep their sharding --------------------------------------------------------------------


def test_layer_norm_keeps_the_batch_sharding_across_processes(launch):
    info = launch.meta[0]["LayerNorm"]
    assert info["same_sharding"], info
    assert info["all_gathers"] == 0, info
    assert info["local_rows"] == worker.BATCH // (NUM_PROCESSES * DEVICES_PER_PROCESS), info
    assert launch.meta[1]["LayerNorm"] == info
    x, mask, _ = worker.data("BatchNorm1d", 0)
    expected = ref.normalize(x, (1, 2), mask, 1e-6, worker.SCALE, worker.BIAS)
    assert_close(launch.value("LayerNorm/gspmd", "y", 0), expected, "output vs float64")


def test_report_largest_differences(launch):
    """Runs last in this file: prints the largest differences the comparisons above measured."""
    assert LARGEST, "no comparison was made"
    print(f"\nmulti-process launch: {launch.seconds:.1f} s (compute {launch.meta[0]['seconds']:.1f} s)")
    for kind, diff in sorted(LARGEST.items()):
        print(f"largest |difference| {kind}: {diff:.3g}")


# --- the launcher ------------------------------------------------------------------------------------------------


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return pathlib.Path(f"/proc/{pid}/status").exists() and "zombie" in pathlib.Path(f"/proc/{pid}/status").read_text()


def _pids(out):
    pids = [int((out / f"pid{rank}").read_text()) for rank in range(NUM_PROCESSES)]
    assert len(set(pids)) == NUM_PROCESSES
    return pids


def test_a_failing_child_stops_every_process_and_reports_its_error(tmp_path):
    """Rank 1 calls BatchNorm1d with the wrong number of channels while rank 0 waits for it in a collective."""
    limit = 120
    started = time.monotonic()
    proc = _launch(tmp_path, "fail", timeout=limit)
    stdout, stderr = proc.communicate(timeout=limit + 30)
    seconds = time.monotonic() - started
    assert proc.returncode == 1, (proc.returncode, stdout[-2000:], stderr[-2000:])
    assert seconds < limit
    assert "process 1 of 2 exited with status 1" in stderr, stderr[-3000:]
    error = stderr.split("Its error:", 1)[1]
    assert "ValueError: BatchNorm1d" in error and "(3, 4)" in error, error
    assert "[rank 1] ValueError: BatchNorm1d" in stdout  # the child's own output, with its rank
    for pid in _pids(tmp_path):
        assert _gone(pid), f"process {pid} is still alive"


def test_time_limit_stops_every_process(tmp_path):
    started = time.monotonic()
    proc = _launch(tmp_path, "hang", timeout=3)
    stdout, stderr = proc.communicate(timeout=60)
    seconds = time.monotonic() - started
    assert proc.returncode == distributed.TIMEOUT_STATUS, (proc.returncode, stdout, stderr)
    assert "time limit of 3 s reached" in stderr
    # the limit, SIGTERM (which ends a sleeping child at once) and the start-up of the launcher (it imports
    # brainnorm, and with it JAX: seconds on a loaded machine)
    assert seconds < 3 + 30, seconds
    assert "[rank 0] sleeping" in stdout and "[rank 1] sleeping" in stdout
    for pid in _pids(tmp_path):
        assert _gone(pid), f"process {pid} is still alive"


def test_launch_passes_rank_and_loopback_coordinator_to_each_child():
    lines = []

    class Collect:
        def write(self, text):
            lines.extend(text.splitlines())

        def flush(self):
            pass

    code = (
        "import os; print(os.environ['JAX_PROCESS_ID'], os.environ['JAX_NUM_PROCESSES'], "
        "os.environ['JAX_COORDINATOR_ADDRESS'], os.environ['JAX_COORDINATOR_BIND_ADDRESS'], "
        "os.environ['XLA_FLAGS'])"
    )
    result = distributed.launch(
        [sys.executable, "-c", code], 3, devices_per_process=2, timeout=60, port=45678, out=Collect()
    )
    assert result.returncode == 0 and result.failed_rank is None and not result.timed_out, result
    for rank in range(3):
        (line,) = [line for line in lines if line.startswith(f"[rank {rank}] ")]
        fields = line.split()
        assert fields[2:6] == [str(rank), "3", "127.0.0.1:45678", "127.0.0.1:45678"], line
        assert "--xla_force_host_platform_device_count=2" in line
    assert all(_gone(pid) for pid in result.pids)


def test_launch_reports_the_first_failure_with_its_traceback():
    code = (
        "import os, time\nif os.environ['JAX_PROCESS_ID'] == '1':\n    raise KeyError('rank one broke')\ntime.sleep(60)"
    )
    started = time.monotonic()
    result = distributed.launch([sys.executable, "-c", code], 2, timeout=60, out=io.StringIO())
    assert time.monotonic() - started < 30
    assert result.returncode == 1 and result.failed_rank == 1, result
    assert "Traceback" in result.error and "KeyError: 'rank one broke'" in result.error, result.error
    assert all(_gone(pid) for pid in result.pids)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(command="python x.py"), TypeError),
        (dict(command=[]), TypeError),
        (dict(command=["python"], num_processes=0), ValueError),
        (dict(command=["python"], num_processes=2.0), TypeError),
        (dict(command=["python"], devices_per_process=0), ValueError),
        (dict(command=["python"], timeout=-1), ValueError),
        (dict(command=["python"], port=70000), ValueError),
        (dict(command=["python"], grace=-1.0), ValueError),
    ],
)
def test_launch_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error, match="brainnorm.distributed.launch"):
        distributed.launch(**kwargs)


@pytest.mark.parametrize(
    "environ,message",
    [
        ({"JAX_PROCESS_ID": "0"}, "not"),
        ({"JAX_PROCESS_ID": "2", "JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"}, "0 <="),
        ({"JAX_PROCESS_ID": "a", "JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"}, "integers"),
        ({"JAX_PROCESS_ID": "0", "JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "localhost"}, "host:port"),
    ],
)
def test_launched_process_rejects_an_inconsistent_environment(environ, message):
    with pytest.raises(ValueError, match=message):
        distributed.launched_process(environ)


def test_launched_process_outside_the_launcher():
    assert distributed.launched_process({}) is None
    assert distributed.launched_process({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) is None  # JAX's own


def test_command_line_help_and_bad_arguments():
    env = _env()
    help_text = subprocess.run(
        [sys.executable, "-m", "brainnorm.distributed", "--help"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert help_text.returncode == 0
    for option in ("--num-processes", "--devices-per-process", "--timeout", "--port", "124"):
        assert option in help_text.stdout, option
    bad = subprocess.run(
        [sys.executable, "-m", "brainnorm.distributed", "-n", "0", "x.py"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--num-processes must be >= 1, got 0" in bad.stderr
