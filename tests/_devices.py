"""The environment of a subprocess with four CPU devices (the distributed and GSPMD workers)."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def four_device_env():
    """This process's environment with four host devices on the CPU and the repository importable."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env
