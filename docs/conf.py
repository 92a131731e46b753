"""Sphinx configuration for the brainnorm documentation."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import os
import pathlib
import re
import shutil
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
# One page per public name, generated into docs/generated/ (git-ignored) from
# the tables of docs/api.rst. Classes show their real constructor signature
# (brainnorm/_signatures.py) and the members they define; the class template
# (docs/_templates/autosummary/class.rst) adds the ``update`` call right after
# the class's docstring, inherited or not.
autosummary_generate = True
autosummary_imported_members = True
templates_path = ["_templates"]
autodoc_default_options = {
    "member-order": "bysource",
    "members": True,
    "show-inheritance": True,
}
# Defaults as written in the source (``ZeroInit()``, ``NormalizationParamState``)
# instead of their reprs (multi-line ``ZeroInit(unit=Unit("1"))``, ``<class ...>``).
autodoc_preserve_defaults = True
autodoc_typehints = "description"
# A constructor with twenty options reads best one parameter a line.
python_maximum_signature_line_length = 88
autodoc_class_signature = "mixed"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True  # the return type once, after "Returns" (not twice)
# Attributes sections as fields: a directive per attribute would clash with the
# members autodoc documents (the fields of a NamedTuple).
napoleon_use_ivar = True


def _preserve_constructor_defaults(app) -> None:
    """``autodoc_preserve_defaults`` for the constructors.

    A class's signature comes from its ``__signature__`` (brainnorm/_signatures.py
    computes it from ``__init__``), which autodoc takes as it is, without
    the source's default texts; giving each ``__init__`` those texts first
    makes ``__signature__`` carry them.
    """
    import brainnorm
    from sphinx.ext.autodoc.preserve_defaults import update_default_value

    namespaces = (brainnorm, brainnorm.functional)
    for namespace in namespaces:
        for name in namespace.__all__:
            cls = getattr(namespace, name)
            init = getattr(cls, "__init__", None) if isinstance(cls, type) else None
            if inspect.isfunction(init) and init.__module__.startswith("brainnorm"):
                update_default_value(init, bound_method=False)


def _public_bases(app, name, obj, options, bases):
    """Show public base classes only: a private base gives way to its nearest public ancestor."""
    shown = []
    for base in bases:
        if isinstance(base, type) and base.__name__.startswith("_"):
            base = next(
                (c for c in base.__mro__ if not c.__name__.startswith("_") and not c.__module__.startswith("_")),
                object,
            )
        if base is not object and base not in shown:
            shown.append(base)
    bases[:] = shown


_NUMPY_SECTION = re.compile(r"^(\s*)(Attributes|Parameters|Other Parameters)\s*$")


def _one_entry_per_name(app, what, name, obj, options, lines):
    """Split numpydoc entries that name several variables (``a, b : type``) into one entry each.

    napoleon turns ``running_mean, running_var : State`` into one field, which
    renders as ``running_var (running_mean,)``. Runs before napoleon.
    """
    out, in_section, i = [], False, 0
    while i < len(lines):
        line = lines[i]
        header = _NUMPY_SECTION.match(line)
        if header and i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}:
            in_section, indent = True, len(header.group(1))
            out += [line, lines[i + 1]]
            i += 2
            continue
        stripped = line.strip()
        if in_section and stripped and len(line) - len(line.lstrip()) == indent:
            entry = re.match(r"^(\s*)([\w*]+(?:\s*,\s*[\w*]+)+)\s*(:.*)?$", line)
            if entry is None and (stripped.endswith(":") or set(stripped) == {"-"}):
                in_section = False  # another section starts
            elif entry is not None:
                body = []
                j = i + 1
                while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
                    body.append(lines[j])
                    j += 1
                while body and not body[-1].strip():
                    body.pop()
                for var in re.split(r"\s*,\s*", entry.group(2)):
                    out.append(f"{entry.group(1)}{var} {entry.group(3) or ''}".rstrip())
                    out.extend(body)
                out.append("")
                i = j
                continue
        elif in_section and stripped and len(line) - len(line.lstrip()) < indent:
            in_section = False
        out.append(line)
        i += 1
    lines[:] = out


# The API navigation: one page per section of docs/api.rst, holding that
# section's tables with a toctree, so the sidebar lists the names by group
# (api.rst's hidden toctree includes these pages by glob, in order).
_GENERATED = DOCS / "generated"


def _api_group_pages() -> None:
    _GENERATED.mkdir(exist_ok=True)
    for old in _GENERATED.glob("api-*.rst"):
        old.unlink()
    lines = (DOCS / "api.rst").read_text().splitlines()
    module, sections = "brainnorm", []
    for k, line in enumerate(lines):
        current = re.match(r"\s*\.\. (?:current|auto)module:: ([\w.]+)", line)
        if current and not sections:
            module = current.group(1)
        underline = k + 1 < len(lines) and lines[k + 1] and set(lines[k + 1]) == {"-"}
        if underline and line.strip() and len(lines[k + 1]) >= len(line.strip()) and k > 2:
            sections.append({"title": line.strip(), "module": module, "body": []})
        elif sections and not (set(line) == {"-"} and line):
            sections[-1]["body"].append(line)
        if current and sections:
            module = current.group(1)
    for number, section in enumerate(sections, start=1):
        body, skip_options = [], False
        for line in section["body"]:
            if re.match(r"\s*\.\. toctree::", line) or line.startswith(".. The navigation"):
                break  # api.rst's own navigation closes the last section
            automodule = re.match(r"(\s*)\.\. automodule:: ([\w.]+)", line)
            if automodule:  # documented on api.rst; here only its name applies
                body.append(f"{automodule.group(1)}.. currentmodule:: {automodule.group(2)}")
                skip_options = True
                continue
            if skip_options and re.match(r"\s+:[\w-]+:", line):
                continue
            skip_options = False
            body.append(line)
            if re.match(r"\s*\.\. autosummary::", line):
                body.append("   :toctree: .")
        slug = re.sub(r"[^a-z0-9]+", "-", section["title"].lower()).strip("-")
        title = section["title"]
        text = [title, "=" * len(title), "", f".. currentmodule:: {section['module']}", "", *body]
        (_GENERATED / f"api-{number:02d}-{slug}.rst").write_text("\n".join(text).rstrip() + "\n")


_api_group_pages()

# The page's table of contents lists ``update()``, not ``TemporalEffectiveBatchNorm.update()``.
toc_object_entries_show_parents = "hide"

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

# -- math without a network ----------------------------------------------------
# Formulas are typeset by MathJax 3 from the sphinx-mathjax-offline package (a
# dependency of the ``docs`` extra), copied into the built site: no page loads
# a script, a style or a font from another host. Only what the pages load is
# copied: the TeX-to-HTML component, the TeX extensions it loads on demand and
# its fonts (not the other components, nor ``latest.js``, MathJax's loader
# that looks the newest version up online).
mathjax_path = "mathjax/tex-chtml.js"
_MATHJAX_FILES = ("tex-chtml.js", "input/tex/extensions", "output/chtml/fonts/woff-v2")
# No context menu: its speech and Braille options would load data from another
# host. Fonts load from the copy (MathJax's default, relative to its script).
mathjax3_config = {"options": {"enableMenu": False}}


def _mathjax_source() -> pathlib.Path:
    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the docs need MathJax from the sphinx-mathjax-offline package: "
            'pip install -e ".[docs]"'
        )
    return pathlib.Path(spec.origin).parent / "static" / "mathjax"


def _copy_mathjax(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    source, target = _mathjax_source(), pathlib.Path(app.outdir) / "_static" / "mathjax"
    shutil.rmtree(target, ignore_errors=True)
    for name in _MATHJAX_FILES:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        if (source / name).is_dir():
            shutil.copytree(source / name, target / name)
        else:
            shutil.copy2(source / name, target / name)


_mathjax_source()  # fail at once, not after the build, when the package is missing

# -- HTML ------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"brainnorm {release}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "use_download_button": True,
}
# One search: the button in the article header (and Ctrl+K); the theme's
# default sidebar would add a second search field above the navigation.
html_sidebars = {"**": ["navbar-logo.html", "icon-links.html", "sbt-sidebar-nav.html"]}
html_static_path = ["_static"]
html_css_files = ["brainnorm.css"]


def setup(app):
    app.connect("builder-inited", _preserve_constructor_defaults)
    app.connect("autodoc-process-bases", _public_bases)
    app.connect("autodoc-process-docstring", _one_entry_per_name, priority=400)  # before napoleon (500)
    app.connect("build-finished", _copy_mathjax)
