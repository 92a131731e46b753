"""Run one program as several JAX processes on this machine, and join them with ``jax.distributed``.

Data-parallel training beyond one machine runs one process per host under
JAX's distributed runtime: every process calls
:func:`jax.distributed.initialize`, after which ``jax.devices()`` lists the
devices of every process, a :class:`jax.sharding.Mesh` can span them all,
and brainnorm's statistics are reduced over the whole global batch. This
module reproduces that set-up on one machine, for tests, examples and
debugging:

- the launcher, ``python -m brainnorm.distributed``, starts ``N`` copies of a
  Python program on the loopback interface, gives each its rank, the world
  size and the coordinator's address, prefixes every line a child prints
  with ``[rank i]``, enforces a time limit, and when one child fails (or the
  time is up) stops every child and exits with a non-zero status after
  printing that child's error;
- :func:`initialize`, called by the program before its first computation,
  reads what the launcher passed and calls :func:`jax.distributed.initialize`
  (with the gloo collectives for CPU devices). Outside the launcher it calls
  :func:`jax.distributed.initialize` with JAX's cluster auto-detection
  (SLURM, Open MPI, ...), so the same program runs on a cluster unchanged.

Run ``python -m brainnorm.distributed --help`` for the options. For example,
two processes with two CPU devices each, at most five minutes::

    python -m brainnorm.distributed -n 2 --devices-per-process 2 --timeout 300 \\
        examples/multiprocess_training.py

The environment of child ``i`` of ``N`` holds ``JAX_PROCESS_ID=i``,
``JAX_NUM_PROCESSES=N``, ``JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT`` (a free
port) and ``JAX_COORDINATOR_BIND_ADDRESS=127.0.0.1:PORT``; JAX itself reads
the two addresses (so the coordinator listens on the loopback interface
only), :func:`initialize` reads the rank and the number of processes;
``PYTHONUNBUFFERED=1``; with ``--devices-per-process D``, ``XLA_FLAGS`` gains
``--xla_force_host_platform_device_count=D`` (CPU devices only); and
``PYTHONPATH`` starts with the directory this ``brainnorm`` was imported
from, so the children import the same package as the launcher.

The launcher's exit status is 0 when every child exits with 0; the status of
the first child that failed otherwise (1 if it was killed by a signal); 124
when the time limit is reached; 130 when the launcher is interrupted
(Ctrl-C or SIGTERM); 2 for bad arguments. Stopping means SIGTERM
to each child's process group, then SIGKILL to the groups still alive 3
seconds later (a JAX process initialized for several processes catches
SIGTERM, for its preemption notice, and goes on: it ends with the SIGKILL);
the launcher waits for every child before it exits, so no process is left
behind.

This module is a submodule (``import brainnorm.distributed``), not part of
``brainnorm``'s top-level namespace; it uses the standard library only,
and imports JAX only inside :func:`initialize`.

Examples
--------
Outside the launcher the environment holds no rank:

>>> from brainnorm import distributed
>>> distributed.launched_process() is None
True
>>> distributed.free_port() > 0
True
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TextIO

__all__ = ["LaunchResult", "ProcessInfo", "free_port", "initialize", "launch", "launched_process", "main"]

# JAX reads JAX_COORDINATOR_ADDRESS itself; the other two are read by initialize(). (Not BRAINNORM_*: brainnorm
# warns about every such variable it does not read when it is imported.)
PROCESS_ID = "JAX_PROCESS_ID"
NUM_PROCESSES = "JAX_NUM_PROCESSES"
COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"

#: Exit status of the launcher when the time limit is reached (that of coreutils' ``timeout``).
TIMEOUT_STATUS = 124
_GRACE_SECONDS = 3.0  # between SIGTERM and SIGKILL
_TAIL_LINES = 40  # lines of a child's output kept to report its error


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands among the processes of one launch.

    Attributes
    ----------
    process_id : int
        Rank of this process, ``0 <= process_id < num_processes``.
    num_processes : int
        Number of processes.
    coordinator_address : str
        ``host:port`` of the coordination service (run by process 0).
    """

    process_id: int
    num_processes: int
    coordinator_address: str


@dataclasses.dataclass(frozen=True)
class LaunchResult:
    """Outcome of :func:`launch`.

    Attributes
    ----------
    returncode : int
        0 if every child succeeded, the failing child's status (1 for a
        signal), or :data:`TIMEOUT_STATUS`.
    failed_rank : int or None
        Rank of the first child that failed, None on success or timeout.
    timed_out : bool
        Whether the time limit stopped the children.
    error : str
        The failing child's error (its traceback, or the last lines it
        printed), or the timeout message; empty on success.
    pids : tuple of int
        Process ids of the children (all of them have exited when
        :func:`launch` returns).
    """

    returncode: int
    failed_rank: int | None
    timed_out: bool
    error: str
    pids: tuple[int, ...]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that no process listens on now (the system picks it).

    Another program may take it before the coordinator binds it; on a busy
    machine pass ``--port`` to the launcher.

    Examples
    --------
    >>> 0 < free_port() < 65536
    True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _positive_int(owner: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be a positive int, got {type(value).__name__} {value!r}.")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}.")
    return value


def launched_process(environ: Mapping[str, str] | None = None) -> ProcessInfo | None:
    """The rank, world size and coordinator the launcher passed to this process, or None outside it.

    Parameters
    ----------
    environ : mapping, optional
        The environment to read (default ``os.environ``).

    Returns
    -------
    ProcessInfo or None
        None when neither ``JAX_PROCESS_ID`` nor ``JAX_NUM_PROCESSES`` is set
        (``JAX_COORDINATOR_ADDRESS`` alone is JAX's own setting).

    Raises
    ------
    ValueError
        Some but not all of the variables are set, or their values are not
        a rank ``0 <= i < N`` and a ``host:port`` address.

    Examples
    --------
    >>> launched_process({"JAX_PROCESS_ID": "1", "JAX_NUM_PROCESSES": "2",
    ...                   "JAX_COORDINATOR_ADDRESS": "127.0.0.1:4242"})
    ProcessInfo(process_id=1, num_processes=2, coordinator_address='127.0.0.1:4242')
    """
    environ = os.environ if environ is None else environ
    names = (PROCESS_ID, NUM_PROCESSES, COORDINATOR_ADDRESS)
    present = [name for name in names if name in environ]
    if PROCESS_ID not in environ and NUM_PROCESSES not in environ:
        return None  # JAX_COORDINATOR_ADDRESS alone is JAX's own setting (the rest auto-detected)
    owner = "brainnorm.distributed.launched_process"
    if len(present) != len(names):
        missing = [name for name in names if name not in environ]
        raise ValueError(f"{owner}: the environment sets {present} but not {missing}; set all three or none.")
    try:
        process_id = int(environ[PROCESS_ID])
        num_processes = int(environ[NUM_PROCESSES])
    except ValueError:
        raise ValueError(
            f"{owner}: {PROCESS_ID} and {NUM_PROCESSES} must be integers, "
            f"got {environ[PROCESS_ID]!r} and {environ[NUM_PROCESSES]!r}."
        ) from None
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"{owner}: expected 0 <= {PROCESS_ID} < {NUM_PROCESSES}, got {process_id} and {num_processes}."
        )
    address = environ[COORDINATOR_ADDRESS]
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{owner}: {COORDINATOR_ADDRESS} must be 'host:port', got {address!r}.")
    return ProcessInfo(process_id, num_processes, address)


def initialize(*, cpu_collectives: str | None = "gloo", **kwargs: object) -> ProcessInfo:
    """Join this process to the others with :func:`jax.distributed.initialize`; call it first.

    Under the launcher the rank, the number of processes and the
    coordinator's address come from the environment the launcher set (see
    :func:`launched_process`). Elsewhere JAX detects them from the cluster
    (SLURM, Open MPI, Kubernetes, Cloud TPU), or they are passed as keyword
    arguments. It must run before the first JAX computation, like
    :func:`jax.distributed.initialize` itself.

    Parameters
    ----------
    cpu_collectives : str or None
        Implementation of the cross-process collectives of CPU devices
        (``jax_cpu_collectives_implementation``): ``'gloo'`` (default) or
        ``'mpi'``; None leaves JAX's setting alone. Without it, CPU devices
        of different processes cannot reduce together. GPU devices use NCCL
        and ignore it.
    **kwargs
        Passed to :func:`jax.distributed.initialize` (``coordinator_address``,
        ``num_processes``, ``process_id``, ``local_device_ids``,
        ``initialization_timeout``, ...); they take precedence over the
        launcher's environment.

    An uncaught exception then ends the process at once (status 1, after
    its traceback is printed) instead of waiting in JAX's shutdown barrier
    for processes that wait for it, so the launcher sees the failure and
    stops the others.

    Returns
    -------
    ProcessInfo
        This process's rank, the number of processes and the coordinator.

    Raises
    ------
    ValueError
        The launcher's environment is inconsistent (see :func:`launched_process`).
    RuntimeError
        From JAX: called twice, or after the first computation.
    """
    import jax

    launched = launched_process()
    _exit_at_once_on_error()
    if launched is not None:
        kwargs.setdefault("coordinator_address", launched.coordinator_address)
        kwargs.setdefault("num_processes", launched.num_processes)
        kwargs.setdefault("process_id", launched.process_id)
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(**kwargs)  # type: ignore[arg-type]
    from jax._src import distributed as _jax_distributed  # the address JAX settled on (auto-detected or given)

    address = str(getattr(_jax_distributed.global_state, "coordinator_address", "") or "")
    return ProcessInfo(jax.process_index(), jax.process_count(), address)


def _exit_at_once_on_error() -> None:
    """Make an uncaught exception end this process at once, with status 1, after printing its traceback.

    At a normal exit JAX's distributed client waits in a shutdown barrier for
    every other process; a process that failed would wait there (minutes)
    for processes that are themselves blocked in a collective waiting for
    it, and the launcher would see no failure until a timeout.
    """
    previous = sys.excepthook

    def exit_now(kind: type[BaseException], value: BaseException, traceback: TracebackType | None) -> None:
        previous(kind, value, traceback)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    sys.excepthook = exit_now


def _package_parent() -> str:
    return str(pathlib.Path(__file__).resolve().parent.parent)


def _child_environment(
    base: Mapping[str, str], rank: int, num_processes: int, port: int, devices_per_process: int | None
) -> dict[str, str]:
    env = dict(base)
    address = f"127.0.0.1:{port}"
    env[PROCESS_ID] = str(rank)
    env[NUM_PROCESSES] = str(num_processes)
    env[COORDINATOR_ADDRESS] = address
    env["JAX_COORDINATOR_BIND_ADDRESS"] = address  # read by JAX: listen on loopback only
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the launcher as they are printed
    if devices_per_process is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device")]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_package_parent(), env.get("PYTHONPATH", "")]))
    return env


def _error_of(lines: Sequence[str]) -> str:
    """The last traceback among ``lines`` and what follows it, else the lines themselves."""
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    return "\n".join(lines[starts[-1] :] if starts else lines)


class _Child:
    """One child process, its rank and a thread copying its output with a rank prefix."""

    def __init__(self, rank: int, command: Sequence[str], env: Mapping[str, str], out: TextIO, lock: threading.Lock):
        self.rank = rank
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        # a session of its own: the child and whatever it starts form one process group to stop together
        self.process = subprocess.Popen(
            list(command),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            text=True,
            errors="replace",
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._copy, args=(out, lock), daemon=True)
        self._reader.start()

    def _copy(self, out: TextIO, lock: threading.Lock) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.tail.append(line)
            with lock:
                out.write(f"[rank {self.rank}] {line}\n")
                out.flush()

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):  # already gone (PermissionError: a zombie group on macOS)
            pass

    def finish_output(self, timeout: float = 5.0) -> None:
        self._reader.join(timeout)


def _stop(children: Sequence[_Child], grace: float) -> None:
    """SIGTERM every child's process group, SIGKILL what is left after ``grace`` seconds, wait for all."""
    for child in children:
        if child.process.poll() is None:
            child.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for child in children:
        # the whole group: a grandchild may outlive its parent
        child.signal_group(signal.SIGKILL)
        child.process.wait()


def launch(
    command: Sequence[str],
    num_processes: int = 2,
    *,
    devices_per_process: int | None = None,
    timeout: float | None = 600.0,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    grace: float = _GRACE_SECONDS,
) -> LaunchResult:
    """Run ``command`` as ``num_processes`` processes on loopback; stop them all if one fails.

    Parameters
    ----------
    command : sequence of str
        The program and its arguments, e.g. ``[sys.executable, "train.py"]``;
        every child runs the same command (the rank is in its environment).
    num_processes : int
        Number of processes (>= 1).
    devices_per_process : int, optional
        CPU devices of each process (``--xla_force_host_platform_device_count``).
    timeout : float or None
        Seconds before every child is stopped (None: no limit).
    port : int, optional
        Coordinator port on 127.0.0.1 (default: a free one).
    env : mapping, optional
        Base environment of the children (default ``os.environ``).
    out : text stream, optional
        Where the prefixed output and the launcher's messages go (default
        ``sys.stdout``).
    grace : float
        Seconds between SIGTERM and SIGKILL when stopping the children
        (default 3).

    Returns
    -------
    LaunchResult

    Raises
    ------
    TypeError, ValueError
        Bad ``command``, ``num_processes``, ``devices_per_process``,
        ``timeout``, ``port`` or ``grace``.
    """
    owner = "brainnorm.distributed.launch"
    if isinstance(command, str) or not command or not all(isinstance(c, str) for c in command):
        raise TypeError(f"{owner}: command must be a non-empty sequence of str, got {command!r}.")
    num_processes = _positive_int(owner, "num_processes", num_processes)
    if devices_per_process is not None:
        devices_per_process = _positive_int(owner, "devices_per_process", devices_per_process)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
        raise ValueError(f"{owner}: timeout must be a positive number of seconds or None, got {timeout!r}.")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        raise ValueError(f"{owner}: port must be an int in 1..65535 or None, got {port!r}.")
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not grace >= 0:
        raise ValueError(f"{owner}: grace must be a non-negative number of seconds, got {grace!r}.")
    out = sys.stdout if out is None else out
    port = free_port() if port is None else port
    base = os.environ if env is None else env
    lock = threading.Lock()
    children: list[_Child] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    failed: _Child | None = None
    timed_out = False
    try:
        for rank in range(num_processes):
            child_env = _child_environment(base, rank, num_processes, port, devices_per_process)
            children.append(_Child(rank, command, child_env, out, lock))
        running = list(children)
        while running and failed is None:
            for child in list(running):
                code = child.process.poll()
                if code is None:
                    continue
                running.remove(child)
                if code != 0:
                    failed = child
                    break
            if failed is None and running:
                if deadline is not None and time.monotonic() >= deadline:
                    timed_out = True
                    break
                time.sleep(0.05)
    finally:  # failure, timeout, KeyboardInterrupt or an error of the launcher itself: no child survives
        _stop(children, grace)
        for child in children:
            child.finish_output()
    pids = tuple(child.process.pid for child in children)
    if failed is not None:
        code = failed.process.returncode
        status = code if code > 0 else 1
        how = f"exited with status {code}" if code > 0 else f"was killed by signal {-code}"
        error = _error_of(list(failed.tail))
        message = f"process {failed.rank} of {num_processes} {how}; the others were stopped. Its error:\n{error}"
        return LaunchResult(status, failed.rank, False, message, pids)
    if timed_out:
        message = f"time limit of {timeout:g} s reached; all {num_processes} processes were stopped."
        return LaunchResult(TIMEOUT_STATUS, None, True, message, pids)
    return LaunchResult(0, None, False, "", pids)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m brainnorm.distributed",
        description=(
            "Run a Python program as N local JAX processes joined by jax.distributed over loopback "
            "(127.0.0.1, a free port). Each child gets its rank, the number of processes and the "
            "coordinator address in JAX_PROCESS_ID, JAX_NUM_PROCESSES and "
            "JAX_COORDINATOR_ADDRESS; the program calls brainnorm.distributed.initialize() "
            "before its first JAX computation. Every output line is prefixed with [rank i]. If a child "
            "fails or the time limit is reached, every child is stopped (SIGTERM, then SIGKILL) and the "
            "launcher exits non-zero after printing the failing child's error."
        ),
        epilog=(
            "exit status: 0 if every process succeeded; the status of the first process that failed "
            f"(1 if killed by a signal); {TIMEOUT_STATUS} on timeout; 130 if interrupted; 2 for bad arguments. "
            "example: python -m brainnorm.distributed -n 2 --devices-per-process 2 --timeout 300 "
            "examples/multiprocess_training.py"
        ),
    )
    parser.add_argument(
        "-n", "--num-processes", type=int, default=2, metavar="N", help="number of processes (default: 2)"
    )
    parser.add_argument(
        "--devices-per-process",
        type=int,
        default=None,
        metavar="D",
        help="CPU devices per process, via XLA_FLAGS=--xla_force_host_platform_device_count=D (default: unchanged)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="stop every process after this many seconds and exit with status 124; 0 means no limit (default: 600)",
    )
    parser.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free port)")
    parser.add_argument(
        "-m",
        dest="module",
        default=None,
        metavar="MODULE",
        help="run a module (as python -m MODULE) instead of a script",
    )
    parser.add_argument("program", nargs="?", help="the Python script each process runs (omit with -m)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the program")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (see ``--help``)."""
    parser = _parser()
    options = parser.parse_args(argv)
    args = list(options.args)
    if options.module is not None:
        if options.program is not None:
            args.insert(0, options.program)
        command = [sys.executable, "-m", options.module, *args]
    elif options.program is None:
        parser.error("give a program to run (a script path, or -m MODULE)")
    else:
        command = [sys.executable, options.program, *args]
    if options.num_processes < 1:
        parser.error(f"-n/--num-processes must be >= 1, got {options.num_processes}")
    if options.devices_per_process is not None and options.devices_per_process < 1:
        parser.error(f"--devices-per-process must be >= 1, got {options.devices_per_process}")
    if options.timeout < 0:
        parser.error(f"--timeout must be >= 0 (0: no limit), got {options.timeout:g}")
    if options.port is not None and not 0 < options.port < 65536:
        parser.error(f"--port must be in 1..65535, got {options.port}")

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # stops the children in launch()'s cleanup

    signal.signal(signal.SIGTERM, interrupted)
    try:
        result = launch(
            command,
            options.num_processes,
            devices_per_process=options.devices_per_process,
            timeout=options.timeout or None,
            port=options.port,
        )
    except KeyboardInterrupt:  # launch() has stopped every child
        print("brainnorm.distributed: interrupted; all processes were stopped.", file=sys.stderr, flush=True)
        return 130
    if result.returncode != 0:
        print(f"brainnorm.distributed: {result.error}", file=sys.stderr, flush=True)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
