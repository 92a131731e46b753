"""Sphinx configuration for the brainnorm documentation."""

from __future__ import annotations

import importlib.metadata
import os

# Build on CPU without probing for accelerators when brainnorm (and JAX) is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "brainnorm"
author = "brainnorm contributors"
copyright = "brainnorm contributors"

try:
    release = importlib.metadata.version("brainnorm")
except importlib.metadata.PackageNotFoundError:  # not installed: read the source tree
    import brainnorm

    release = getattr(brainnorm, "__version__", "unknown")
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# -- autodoc / napoleon ----------------------------------------------------
autodoc_default_options = {
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_class_signature = "mixed"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

# -- general -----------------------------------------------------------------
exclude_patterns = ["_build"]
templates_path: list[str] = []
pygments_style = "sphinx"

# -- HTML ------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"brainnorm {release}"
html_theme_options = {
    "description": "Normalization layers for brainstate",
    "fixed_sidebar": True,
}
