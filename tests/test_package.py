"""brainnorm as a package: constructor signatures, version, and what the sdist and the wheel hold."""

from __future__ import annotations

import importlib.metadata
import inspect
import pathlib
import pydoc
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest

import brainnorm

ROOT = pathlib.Path(__file__).resolve().parents[1]

PUBLIC_CLASSES = sorted(name for name in brainnorm.__all__ if isinstance(getattr(brainnorm, name), type))


def test_every_public_class_is_checked():
    assert "LayerNorm" in PUBLIC_CLASSES and "BatchNorm2d" in PUBLIC_CLASSES


@pytest.mark.parametrize("name", PUBLIC_CLASSES)
def test_signature_is_the_constructor(name):
    """``inspect.signature(cls)`` is ``cls.__init__``'s without ``self``, not the metaclass's ``(*args, **kwargs)``."""
    cls = getattr(brainnorm, name)
    signature = inspect.signature(cls)
    kinds = [p.kind for p in signature.parameters.values()]
    assert kinds and kinds != [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD], (
        f"{name}: {signature}")
    init = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert list(signature.parameters.values()) == init
    assert "self" not in signature.parameters


def test_layer_norm_signature_shows_its_options_and_defaults():
    parameters = inspect.signature(brainnorm.LayerNorm).parameters
    assert list(parameters)[0] == "in_size"
    assert parameters["epsilon"].default == 1e-6
    assert {"reduction_axes", "feature_axes", "use_bias", "use_scale", "axis_name", "dtype", "name"} <= set(parameters)


@pytest.mark.parametrize("name", ["BatchNorm0d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_batch_norm_signatures(name):
    parameters = inspect.signature(getattr(brainnorm, name)).parameters
    assert list(parameters)[:2] == ["in_size", "feature_axis"]
    assert parameters["momentum"].default == 0.99 and parameters["epsilon"].default == 1e-5


def test_help_shows_the_constructor():
    text = pydoc.render_doc(brainnorm.LayerNorm, renderer=pydoc.plaintext)
    # brainstate's positional order: in_size, reduction_axes, feature_axes, then keywords.
    assert re.search(r"LayerNorm\(in_size\b[^,]*, reduction_axes\b[^,]*= -1, feature_axes\b[^,]*= -1, \*, epsilon", text), text[:2000]


def test_subclass_reports_its_own_constructor():
    class Scaled(brainnorm.LayerNorm):
        def __init__(self, in_size, gain=2.0):
            super().__init__(in_size)
            self.gain = gain

    assert list(inspect.signature(Scaled).parameters) == ["in_size", "gain"]
    assert Scaled(3).gain == 2.0


def test_instance_signature_is_the_call():
    """On an instance ``__signature__`` is None, so ``inspect`` describes calling the layer, not building it."""
    layer = brainnorm.LayerNorm(3)
    assert layer.__signature__ is None
    assert "in_size" not in inspect.signature(layer).parameters


# --- metadata ---------------------------------------------------------------------------------


def test_version_is_the_distribution_version():
    assert brainnorm.__version__ == importlib.metadata.version("brainnorm")


def test_version_is_written_once():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]


def test_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert "Typing :: Typed" in project["classifiers"]
    assert {"Homepage", "Documentation", "Source", "Changelog"} <= set(project["urls"])
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "brainnorm" / "py.typed").exists()


# --- sdist and wheel --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    pytest.importorskip("build")
    pytest.importorskip("hatchling")
    out = tmp_path_factory.mktemp("dist")
    # No isolation: the build backend comes from the test extra, so no download is needed.
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


@pytest.mark.slow
def test_wheel_contents(dists):
    _, wheel = dists
    names = set(zipfile.ZipFile(wheel).namelist())
    version = brainnorm.__version__
    assert "brainnorm/py.typed" in names
    assert "brainnorm/__init__.py" in names and "brainnorm/functional.py" in names
    assert f"brainnorm-{version}.dist-info/licenses/LICENSE" in names
    assert not any(name.startswith(("tests/", "docs/", "examples/")) for name in names)
    metadata = zipfile.ZipFile(wheel).read(f"brainnorm-{version}.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert "Classifier: Typing :: Typed" in metadata


@pytest.mark.slow
def test_sdist_holds_what_the_tests_need(dists):
    sdist, _ = dists
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {
        "LICENSE", "README.md", "pyproject.toml", "brainnorm/py.typed",
        "tests/conftest.py", "tests/reference.py", "tests/reference_training.py",
        "tests/conformance/conftest.py", "tests/conformance/_common.py",
        "docs/conf.py", "docs/api.rst", "examples/train_digits.py", "benchmarks/run.py",
    }
    # every test module and every file the tests import, run or read
    needed |= {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*.py")}
    needed |= {str(p.relative_to(ROOT)) for p in (ROOT / "examples").glob("*.py")}
    needed |= {str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.rst")
               if "_build" not in p.parts and "generated" not in p.parts}
    missing = sorted(n for n in needed if n not in names)
    assert not missing, f"missing from the sdist: {missing}"
    assert not any("__pycache__" in n or n.startswith("docs/_build") for n in names)
