"""How the benchmarks measure: the process set-up, warm-up, interleaved timing and sample statistics.

Import this module before numpy, JAX or PyTorch: it pins the C allocator and
sets the OpenMP wait policy, which only take effect before the first large
allocation and before the OpenMP runtime starts.

Timing: after a warm-up (the first call, which compiles, plus ``warmup``
more), each implementation of a case is timed with ``time.perf_counter``
around the call and ``jax.block_until_ready``. The implementations of a case
run in interleaved rounds (each runs ``runs`` times in a row per round) so
that machine noise hits all of them; the order of a round is reversed every
round and rotated by one every two rounds, so every implementation runs
first, last, and after each of its neighbours alike (a fixed cyclic order
lets an implementation inherit the caches and awake threads of the one that
always runs before it).

Statistics: the median over all samples, and the median per block of
consecutive rounds (``BLOCKS`` blocks). A ratio of two implementations is
reported as the ratio of their overall medians and, per block, as the ratio
of their block medians: the minimum over the blocks (min-of-medians) and the
range show how much a burst of machine noise moved it.
"""

from __future__ import annotations

import gc
import importlib
import math
import os
import platform
import statistics
import sys
import time
import traceback

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _pin_allocator():
    """Make glibc's malloc reuse freed buffers instead of mapping fresh pages.

    JAX (like PyTorch) allocates every output with the C allocator. Under
    glibc's defaults whether a 16 MiB output lands on pages already mapped or
    on freshly mapped ones depends on the history of earlier calls (the
    dynamic mmap threshold, heap trimming, one arena per thread): in the
    second case each call takes 4096 page faults, about 9 ms on the
    development machine, for a computation that takes 0.6 ms. Which
    implementation hit that depended on the order of the cases, so the ratios
    measured the allocator. With one arena, a fixed 32 MiB mmap threshold and
    no trimming, every implementation reuses its buffers after warm-up (0
    faults per call). Set ``BRAINNORM_BENCH_MALLOC=default`` to measure with
    glibc's defaults. Must run before any large allocation; a no-op where
    glibc is absent.
    """
    if os.environ.get("BRAINNORM_BENCH_MALLOC", "pinned") != "pinned":
        return "default"
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        ok = (libc.mallopt(m_arena_max, 1) == 1
              and libc.mallopt(m_mmap_threshold, 32 << 20) == 1
              and libc.mallopt(m_trim_threshold, 1 << 30) == 1)
    except (OSError, AttributeError):
        return "default (no glibc)"
    return "pinned" if ok else "default (mallopt refused)"


MALLOC = _pin_allocator()
# PyTorch's OpenMP workers otherwise spin for a while after each call, on the
# same cores the next (JAX) implementation of the interleaved round runs on.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

import jax  # noqa: E402

# tolerance of the output checks (a case's check returns the error it measured)
CHECK_TOL = 1e-3

# blocks of consecutive rounds for the min-of-medians statistics
BLOCKS = 5


class Skip(Exception):
    """An implementation that cannot run here (a missing optional package)."""


class Impl:
    """One implementation of a case: a zero-argument call plus how to check it.

    Parameters
    ----------
    name : str
        The row's name in the table.
    build : callable
        ``() -> call``: builds the implementation and returns the zero-argument
        callable that is timed (or, in an untimed case, measured).
    kind : {'jax', 'torch', 'host'}
        How to wait for an output: ``jax.block_until_ready`` ('jax'), or
        nothing: PyTorch's CPU eager calls are synchronous, and so is work
        done on the host such as a compilation ('host').
    check : callable, optional
        ``(first output) -> error`` (a float, or None when there is nothing to
        report on this row); an error above ``CHECK_TOL`` fails the row.
    before : callable, optional
        Runs before every call, outside the timed region (``jax.clear_caches``
        for the compile-time case).
    """

    def __init__(self, name, build, kind="jax", check=None, before=None):
        self.name = name
        self.build = build
        self.kind = kind
        self.check = check
        self.before = before
        self.call = None
        self.status = "ok"
        self.note = ""
        self.first_call_s = None
        self.error = None
        self.check_failed = False
        self.samples = []  # seconds, one per timed call
        self.sample_rounds = []  # the round of each sample
        self.block_medians = []  # seconds, one per block of rounds (None where a block has no sample)
        self.value = None  # untimed cases: what the call measured (MiB, count)
        self.details = {}  # untimed cases: the parts of the value


class Case:
    """The implementations of one case and how the harness runs them.

    A case function returns a ``Case`` where it departs from the command's
    timing settings, else a plain list of ``Impl``.

    Parameters
    ----------
    impls : list of Impl
    unit : {'ms', 'MiB', 'count'}
        'ms': timed. 'MiB' (a size) and 'count' (a number of things, such as
        jaxpr equations or HLO instructions): untimed; each call returns
        ``(value, details, output)``, the value in that unit, a dict of its
        parts and the output to check, and is made once.
    runs, warmup, min_time : optional
        Replace the command's settings (None: keep them).
    max_rounds : int, optional
        At most this many rounds (for calls that take seconds, such as
        compilations).
    """

    def __init__(self, impls, *, unit="ms", runs=None, warmup=None, min_time=None, max_rounds=None):
        self.impls = list(impls)
        self.unit = unit
        self.runs = runs
        self.warmup = warmup
        self.min_time = min_time
        self.max_rounds = max_rounds

    @classmethod
    def of(cls, result):
        """A case function's result as a ``Case``."""
        return result if isinstance(result, cls) else cls(result)

    def timing(self, rounds, runs, warmup, min_time):
        """The command's timing settings with this case's overrides applied."""
        if self.max_rounds is not None:
            rounds = min(rounds, self.max_rounds)
        return (rounds,
                runs if self.runs is None else self.runs,
                warmup if self.warmup is None else self.warmup,
                min_time if self.min_time is None else self.min_time)


def _block(out, kind):
    if kind == "jax":
        jax.block_until_ready(out)
    # PyTorch CPU eager calls are synchronous: nothing to wait for


def last_level_cache_bytes():
    """Size of the largest CPU cache Linux reports (0 where it reports none)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(base)
    except OSError:
        return 0
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "size")) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best


class CacheEvictor:
    """Reads a buffer of twice the last-level cache (at least 64 MiB) to push other data out of the caches."""

    def __init__(self):
        self.nbytes = max(64 << 20, 2 * last_level_cache_bytes())
        self.buf = np.ones(self.nbytes // 4, np.float32)

    def __call__(self):
        self.buf.sum()


def round_order(impls, r):
    """The order of round ``r``: reversed every round, rotated by one every two rounds."""
    n = len(impls)
    if n == 0:
        return []
    shift = (r // 2) % n
    order = impls[shift:] + impls[:shift]
    return order[::-1] if r % 2 else order


def _prepare(impl, warmup):
    """Build, make the first call, check its output and warm up; return the warm-up call times."""
    impl.call = impl.build()
    if impl.before is not None:
        impl.before()
    t0 = time.perf_counter()
    out = impl.call()
    _block(out, impl.kind)
    impl.first_call_s = time.perf_counter() - t0
    _check(impl, out)
    del out
    times = []
    for _ in range(warmup):
        if impl.before is not None:
            impl.before()
        t0 = time.perf_counter()
        _block(impl.call(), impl.kind)
        times.append(time.perf_counter() - t0)
    return times


def _check(impl, out):
    if impl.check is None:
        return
    err = impl.check(out)
    impl.error = None if err is None else float(err)
    if impl.error is not None and not (impl.error <= CHECK_TOL):
        impl.check_failed = True
        impl.note = f"output check failed: max error {impl.error:.2e} > {CHECK_TOL:g}"


def _failed(impl, exc):
    """Record why an implementation did not run (and keep going: the failure is reported at the end)."""
    if isinstance(exc, Skip):
        impl.status, impl.note = "skipped", str(exc)
        return
    impl.status = "error"
    impl.note = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    traceback.print_exc()


def run_case(case, rounds, runs, warmup, min_time=0.0, evict=None):
    """Build, warm up, check and time the implementations of one case (interleaved).

    Each round runs every implementation ``runs`` times, or more when that
    gives the slowest implementation less than ``min_time`` seconds of samples
    over all rounds (short calls get more samples, so a few disturbed calls
    move the median less). ``evict`` (a callable) and each implementation's
    ``before`` run before every timed call, outside the timed region. Returns
    the rounds run.
    """
    if case.unit != "ms":
        measure_case(case)
        return 0
    rounds, runs, warmup, min_time = case.timing(rounds, runs, warmup, min_time)
    live = []
    warm_times = []
    for impl in case.impls:
        try:
            warm_times.extend(_prepare(impl, warmup))
            live.append(impl)
        except Exception as exc:
            _failed(impl, exc)
    if warm_times and min_time > 0:
        runs = max(runs, math.ceil(min_time / (rounds * max(max(warm_times), 1e-6))))
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for impl in round_order(live, r):
                call, kind, before = impl.call, impl.kind, impl.before
                for _ in range(runs):
                    if evict is not None:
                        evict()
                    if before is not None:
                        before()
                    t0 = time.perf_counter()
                    out = call()
                    _block(out, kind)
                    impl.samples.append(time.perf_counter() - t0)
                    impl.sample_rounds.append(r)
                    del out
    finally:
        if gc_was_enabled:
            gc.enable()
    for impl in case.impls:
        impl.block_medians = block_medians(impl.samples, impl.sample_rounds, rounds)
        impl.call = None  # release compiled functions and captured arrays
    gc.collect()
    return rounds


def measure_case(case):
    """Build, measure once and check the implementations of an untimed case."""
    for impl in case.impls:
        try:
            impl.call = impl.build()
            impl.value, impl.details, out = impl.call()
            _check(impl, out)
        except Exception as exc:
            _failed(impl, exc)
        impl.call = None
    gc.collect()


# ---------------------------------------------------------------------------
# sample statistics
# ---------------------------------------------------------------------------
def sample_stats(samples):
    """Median, minimum and quartiles of timing samples (seconds), in ms."""
    if not samples:
        return {"median_ms": None, "min_ms": None, "q1_ms": None, "q3_ms": None}
    q1, q3 = np.percentile(samples, [25, 75])
    return {"median_ms": statistics.median(samples) * 1e3, "min_ms": min(samples) * 1e3,
            "q1_ms": float(q1) * 1e3, "q3_ms": float(q3) * 1e3}


def block_medians(samples, sample_rounds, rounds, blocks=BLOCKS):
    """The median of each of ``min(blocks, rounds)`` blocks of consecutive rounds (None for an empty block)."""
    n = min(blocks, rounds)
    groups = [[] for _ in range(n)]
    for s, r in zip(samples, sample_rounds):
        groups[r * n // rounds].append(s)
    return [statistics.median(g) if g else None for g in groups]


def block_ratio_range(num_blocks, den_blocks):
    """(min, max) over the blocks of the ratio of block medians; the min is the min-of-medians ratio.

    ``(None, None)`` when no block has both medians.
    """
    ratios = [a / b for a, b in zip(num_blocks or [], den_blocks or []) if a is not None and b]
    return (min(ratios), max(ratios)) if ratios else (None, None)


# ---------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------
def machine_info():
    """Platform, CPU, library versions, allocator and OpenMP settings, load average."""
    def version(mod):
        try:
            return importlib.import_module(mod).__version__
        except Exception:
            return None

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        affinity = None
    cpu_model = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    torch = _loaded_torch()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "malloc": MALLOC,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpus_available": affinity,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": version("jaxlib"),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "flax": version("flax"),
        "brainstate": version("brainstate"),
        "brainnorm": version("brainnorm"),
        "numpy": np.__version__,
        "torch": getattr(torch, "__version__", None),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "load_average_start": load_average(),
    }


def _loaded_torch():
    """PyTorch if the cases imported it (it is optional), else None."""
    return sys.modules.get("torch")


def load_average():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None
