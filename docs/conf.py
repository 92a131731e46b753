"""Sphinx configuration for the brainnorm documentation."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import tempfile
import zlib

# Build on CPU without probing for accelerators when brainnorm (and JAX) is imported;
# the notebook kernels inherit these.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")

DOCS = pathlib.Path(__file__).resolve().parent

project = "brainnorm"
author = "brainnorm developers"
copyright = "brainnorm developers"

try:
    release = importlib.metadata.version("brainnorm")
except importlib.metadata.PackageNotFoundError:  # not installed: read the source tree
    import brainnorm

    release = getattr(brainnorm, "__version__", "unknown")
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.intersphinx",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]

# -- autodoc / autosummary / napoleon ------------------------------------------
# One page per public name (docs/api.rst lists them; the pages are generated
# into docs/generated/). Classes show their real constructor signature
# (brainnorm/_signatures.py) and the members they define.
autosummary_generate = True
autosummary_imported_members = True

# A class page documents the class with the members it defines (autodoc's
# options below); autosummary's stock template would also list every member
# inherited from brainstate.nn.Module and brainstate.State.
_TEMPLATES = pathlib.Path(tempfile.mkdtemp(prefix="brainnorm-templates-"))
(_TEMPLATES / "autosummary").mkdir()
(_TEMPLATES / "autosummary" / "class.rst").write_text(
    "{{ fullname | escape | underline }}\n\n"
    ".. currentmodule:: {{ module }}\n\n"
    ".. autoclass:: {{ objname }}\n"
)
templates_path = [str(_TEMPLATES)]
autodoc_default_options = {
    "member-order": "bysource",
    "members": True,
    "show-inheritance": True,
}
autodoc_typehints = "description"
autodoc_class_signature = "mixed"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
# Attributes sections as fields: a directive per attribute would clash with the
# members autodoc documents (the fields of a NamedTuple).
napoleon_use_ivar = True

# -- notebooks (myst-nb) ---------------------------------------------------------
# The tutorials are MyST markdown notebooks, executed at every build (outputs
# are not stored); "cache" reruns only notebooks whose code changed.
nb_execution_mode = "cache"
nb_execution_timeout = 180
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath"]

# -- intersphinx -------------------------------------------------------------------
# The docs build must not need the network, so the inventories are compiled
# here from the text tables in docs/_intersphinx/ ("name domain:role uri" per
# line) instead of being downloaded.


def _compile_inventory(table: pathlib.Path, out_dir: pathlib.Path) -> str:
    lines = []
    for line in table.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, role, uri = line.split()
        lines.append(f"{name} {role} 1 {uri} -\n")
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {table.stem}\n"
        "# Version: \n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    path = out_dir / f"{table.stem}-objects.inv"
    path.write_bytes(header.encode() + zlib.compress("".join(lines).encode()))
    return str(path)


_INVENTORY_DIR = pathlib.Path(tempfile.mkdtemp(prefix="brainnorm-intersphinx-"))
_INTERSPHINX_SITES = {
    "jax": "https://docs.jax.dev/en/latest/",
    "brainstate": "https://brainstate.readthedocs.io/en/latest/",
    "brainunit": "https://brainunit.readthedocs.io/en/latest/",
    "numpy": "https://numpy.org/doc/stable/",
}
intersphinx_mapping = {
    name: (url, _compile_inventory(DOCS / "_intersphinx" / f"{name}.txt", _INVENTORY_DIR))
    for name, url in _INTERSPHINX_SITES.items()
}

# -- general -----------------------------------------------------------------
exclude_patterns = ["_build", "_intersphinx", "jupyter_execute", "**.ipynb_checkpoints"]
pygments_style = "sphinx"

# -- HTML ------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"brainnorm {release}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "use_download_button": True,
}
