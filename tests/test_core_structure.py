"""One statistics core: layers call the public functions, the core computes every statistic.

Also ``brainnorm.backend_info()`` and the environment variables that
``import brainnorm`` must survive.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import brainnorm

PACKAGE = Path(brainnorm.__file__).parent
CORE = {"_stats.py", "functional.py", "_divisive_functional.py", "_spiking_functional.py"}
LAYER_FILES = sorted(p for p in PACKAGE.glob("_*.py") if p.name not in CORE | {"__init__.py"})


def test_backend_info_names_the_core():
    info = brainnorm.backend_info()
    assert info["core"] == "jax" and info["active"] == ["jax"]
    assert info["backends"]["jax"]["active"] is True
    assert info["backends"]["cpu_kernel"]["active"] is False and "removed" in info["backends"]["cpu_kernel"]["reason"]
    assert info["platform"] == jax.default_backend()


@pytest.mark.parametrize("name, value", [("BRAINNORM_CPU_KERNEL_MIN_ELEMENTS", "abc"), ("BRAINNORM_CPU_KERNEL", "0"),
                                         ("BRAINNORM_SOMETHING", "1")])
def test_import_survives_and_warns_about_environment_variables(name, value):
    env = {**os.environ, name: value, "JAX_PLATFORMS": "cpu"}
    code = "import brainnorm; print(brainnorm.backend_info()['ignored_environment'])"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert name in proc.stdout
    assert "RuntimeWarning" in proc.stderr and name in proc.stderr and "ignored" in proc.stderr
    assert proc.stderr.count(f"{name}=") == 1  # once


def _attribute_chains(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            yield node.value.id, node.attr


@pytest.mark.parametrize("path", LAYER_FILES, ids=lambda p: p.name)
def test_layers_use_only_the_public_functional_api(path):
    """No layer file reaches into a private helper of ``functional`` (``F._...``)."""
    tree = ast.parse(path.read_text())
    aliases = {"functional", "F"}
    private = [f"{base}.{attr}" for base, attr in _attribute_chains(tree) if base in aliases and attr.startswith("_")]
    assert not private, private


STATISTICS = {"sum", "mean", "var", "std", "psum", "pmean", "nansum", "nanmean", "average"}


@pytest.mark.parametrize("path", LAYER_FILES, ids=lambda p: p.name)
def test_no_statistic_is_computed_outside_the_core(path):
    """Layers hold states and validate; sums, means and variances are the core's (``_stats``)."""
    tree = ast.parse(path.read_text())
    found = [f"{base}.{attr}" for base, attr in _attribute_chains(tree)
             if base in {"jnp", "np", "lax"} and attr in STATISTICS]
    found += [f"jax.lax.{node.attr}" for node in ast.walk(tree)
              if isinstance(node, ast.Attribute) and node.attr in STATISTICS
              and isinstance(node.value, ast.Attribute) and node.value.attr == "lax"]
    assert not found, found


def test_the_compiled_program_has_no_branch_or_custom_call_at_any_size():
    for shape in [(8, 64), (512, 256)]:
        grad = jax.jit(jax.grad(lambda v: jnp.sum(jnp.sin(brainnorm.functional.layer_norm(v)))))
        program = grad.lower(jnp.ones(shape, jnp.float32)).compile().as_text()
        assert "conditional" not in program and "custom-call" not in program
