"""The documentation's code runs: docstring examples and the guides' doctests.

Also checks that the API reference lists every public name.
"""

import doctest
import importlib
import pathlib
import pkgutil
import re

import pytest

import brainnorm

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(brainnorm.__path__, prefix="brainnorm.")
)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=FLAGS)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {module_name} failed"


def test_public_names_have_examples():
    missing = []
    for name in brainnorm.__all__:
        obj = getattr(brainnorm, name)
        if name == "functional":
            continue
        if ">>>" not in (obj.__doc__ or ""):
            missing.append(name)
    for name in brainnorm.functional.__all__:
        if ">>>" not in (getattr(brainnorm.functional, name).__doc__ or ""):
            missing.append(f"functional.{name}")
    assert not missing, f"public names without an example: {missing}"


# Hand-written pages only: not the build output nor the API stubs autosummary generates.
GUIDES = sorted(p for p in DOCS.glob("**/*.rst") if not {"_build", "generated"} & set(p.relative_to(DOCS).parts))


@pytest.mark.parametrize("page", GUIDES, ids=lambda p: str(p.relative_to(DOCS)))
def test_guide_code_runs(page):
    result = doctest.testfile(str(page), module_relative=False, optionflags=FLAGS)
    assert result.failed == 0, f"{result.failed} example(s) in {page.name} failed"


def test_guides_have_code():
    pages = ["masks", "temporal", "units", "distributed", "conventions"]
    for page in pages:
        text = (DOCS / "guides" / f"{page}.rst").read_text()
        assert ">>>" in text, f"guide {page} has no runnable code"


def _documented_names(text):
    """Fully qualified names that ``auto*`` directives and ``autosummary`` tables of ``text`` document."""
    documented = set()
    module = ""
    in_autosummary = False
    for line in text.splitlines():
        current = re.match(r"\s*\.\. (?:current|auto)?module:: ([\w.]+)", line)
        if current:
            module = current.group(1)
            documented.add(module)
        entry = re.match(r"\s*\.\. auto(?:class|function|module|data):: ([\w.]+)", line)
        if entry:
            name = entry.group(1)
            documented.add(name if name.startswith("brainnorm") else f"{module}.{name}")
        if re.match(r"\s*\.\. autosummary::", line):
            in_autosummary = True
            continue
        if in_autosummary:
            if not line.strip() or re.match(r"\s+:[\w-]+:", line):  # blank line or option
                continue
            item = re.match(r"\s+~?([\w.]+)\s*$", line)
            if item is None:  # the table ended
                in_autosummary = False
                continue
            name = item.group(1)
            documented.add(name if name.startswith("brainnorm") else f"{module}.{name}")
    return documented


def test_api_reference_lists_every_public_name():
    documented = _documented_names((DOCS / "api.rst").read_text())
    expected = {f"brainnorm.{n}" for n in brainnorm.__all__ if n != "functional"}
    expected |= {f"brainnorm.functional.{n}" for n in brainnorm.functional.__all__}
    expected.add("brainnorm.functional")
    missing = sorted(n for n in expected if n not in documented)
    assert not missing, f"names missing from docs/api.rst: {missing}"


def test_api_reference_parser_reads_autosummary_tables():
    text = """
.. currentmodule:: brainnorm

.. autosummary::
   :toctree: generated
   :nosignatures:

   LayerNorm
   ~brainnorm.functional.moments

Next section
"""
    assert _documented_names(text) == {"brainnorm", "brainnorm.LayerNorm", "brainnorm.functional.moments"}
