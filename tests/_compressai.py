"""CompressAI's GDN without importing the ``compressai`` package.

``compressai/__init__.py`` imports its datasets, transforms and models,
which need torchvision and torch_geometric (whose requirements would replace
the CPU build of torch). The GDN comparison needs only
``compressai/layers/gdn.py`` and the ``compressai/ops`` helpers it imports
(torch only): they are loaded from the installed files under a stand-in
``compressai`` package (no ``__init__`` executed), which is removed from
``sys.modules`` afterwards, so that nothing else sees it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest


def load_compressai_gdn():
    """The module ``compressai/layers/gdn.py`` (with ``GDN``, ``GDN1``), loaded from the installed CompressAI.

    A missing CompressAI skips the test (an error with ``BRAINNORM_REQUIRE_PEERS=1``, see ``conftest.py``).
    """
    pytest.importorskip("torch")
    spec = importlib.util.find_spec("compressai")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.importorskip("compressai")  # skips, or fails when peers are required
        raise AssertionError("unreachable: compressai is importable but has no package directory")
    root = Path(next(iter(spec.submodule_search_locations)))
    saved = {name: module for name, module in sys.modules.items() if name == "compressai" or
             name.startswith("compressai.")}
    for name in saved:
        del sys.modules[name]
    shim = types.ModuleType("compressai")
    shim.__path__ = [str(root)]
    sys.modules["compressai"] = shim
    try:
        importlib.import_module("compressai.ops")  # bound_ops, ops, parametrizers: torch only
        gdn_spec = importlib.util.spec_from_file_location("compressai.layers.gdn", root / "layers" / "gdn.py")
        assert gdn_spec is not None and gdn_spec.loader is not None
        gdn = importlib.util.module_from_spec(gdn_spec)
        gdn_spec.loader.exec_module(gdn)
    finally:
        for name in [n for n in sys.modules if n == "compressai" or n.startswith("compressai.")]:
            del sys.modules[name]
        sys.modules.update(saved)
    return gdn
