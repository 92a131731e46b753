"""Which implementation computes brainnorm's statistics, and the environment it reads.

brainnorm has one implementation: the pure-JAX statistics core
(:mod:`brainnorm._stats`), lowered by XLA on every platform. Earlier versions
also had a fused C++ kernel for XLA's CPU backend; it was removed (see the
changelog). The environment variables that configured it are ignored with a
warning.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax

__all__ = ["backend_info"]

#: Environment variables of earlier versions, now without effect.
_RETIRED = {
    "BRAINNORM_CPU_KERNEL": "the fused CPU kernel was removed",
    "BRAINNORM_CPU_KERNEL_MIN_ELEMENTS": "the fused CPU kernel was removed",
    "BRAINNORM_CACHE_DIR": "brainnorm compiles nothing and caches nothing",
}

_warned: set[str] = set()


def warn_about_environment(environ=os.environ) -> None:
    """Warn once per variable about ``BRAINNORM_*`` settings that brainnorm ignores.

    Never raises: a bad or retired value must not break ``import brainnorm``.
    """
    for name in sorted(environ):
        if not name.startswith("BRAINNORM_") or name.startswith("BRAINNORM_BENCH_") or name in _warned:
            continue
        _warned.add(name)
        reason = _RETIRED.get(name, "brainnorm reads no such variable")
        warnings.warn(
            f"brainnorm: the environment variable {name}={environ[name]!r} is ignored: {reason}. "
            f"Every call runs the pure-JAX statistics core.",
            RuntimeWarning,
            stacklevel=3,
        )


def backend_info() -> dict[str, Any]:
    """Which implementations compute brainnorm's statistics here, and why.

    Returns
    -------
    dict
        ``core``: the implementation that defines every result (always the
        pure-JAX core); ``active``: the implementations in use, in order of
        preference; ``backends``: for each accelerated implementation brainnorm
        knows of, whether it is active and why (or why not); ``platform``:
        JAX's default backend, whose XLA compiler lowers the core;
        ``ignored_environment``: ``BRAINNORM_*`` variables that have no effect.

    Examples
    --------
    >>> import brainnorm
    >>> info = brainnorm.backend_info()
    >>> info["core"], info["active"]
    ('jax', ['jax'])
    """
    ignored = sorted(
        name for name in os.environ if name.startswith("BRAINNORM_") and not name.startswith("BRAINNORM_BENCH_")
    )
    return {
        "core": "jax",
        "active": ["jax"],
        "backends": {
            "jax": {
                "active": True,
                "reason": "pure JAX: every transformation, every platform, every sharding",
            },
            "cpu_kernel": {
                "active": False,
                "reason": _RETIRED["BRAINNORM_CPU_KERNEL"] + "; the pure-JAX core serves every call",
            },
        },
        "platform": jax.default_backend(),
        "ignored_environment": ignored,
    }
