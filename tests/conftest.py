import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

# --- required peers ----------------------------------------------------------
# The conformance tests compare brainnorm with other libraries (PyTorch,
# flax, spikingjelly, torchrl, dm-haiku, CompressAI) and skip where one is not
# installed. With BRAINNORM_REQUIRE_PEERS=1 (set by .ci/run) a missing peer is
# an error instead: a skip would hide that the comparison never ran.
REQUIRE_PEERS_ENV = "BRAINNORM_REQUIRE_PEERS"
# brainnorm warns at import about every BRAINNORM_* variable it does not read (and lists it in
# backend_info()["ignored_environment"]); this one is the test suite's, not brainnorm's. It is moved, before
# brainnorm is imported, to a name brainnorm does not look at; pytest-xdist's workers inherit the moved one.
_MOVED_ENV = "PYTEST_BRAINNORM_REQUIRE_PEERS"
if REQUIRE_PEERS_ENV in os.environ:
    os.environ[_MOVED_ENV] = os.environ.pop(REQUIRE_PEERS_ENV)

# what to install for each peer (the top-level module name)
_INSTALL = {
    "torch": "pip install torch==2.13.0",
    "flax": "pip install flax",
    "spikingjelly": "pip install --no-deps spikingjelly==2.0.0 && pip install loguru",
    "loguru": "pip install loguru",
    "torchrl": "pip install torchrl==0.14.1",
    "tensordict": "pip install torchrl==0.14.1",
    "haiku": "pip install dm-haiku==0.0.17",
    "compressai": "pip install --no-deps compressai==1.2.8",
    "braintools": "pip install braintools",
}


def peers_required() -> bool:
    """True when a missing peer must fail the run (``BRAINNORM_REQUIRE_PEERS=1``)."""
    value = os.environ.get(REQUIRE_PEERS_ENV, os.environ.get(_MOVED_ENV, ""))
    return value.strip() == "1"


def missing_peer_message(modname: str, error: BaseException | None = None) -> str:
    """The error for a peer that could not be imported while peers are required."""
    top = modname.split(".")[0]
    install = _INSTALL.get(top, f"pip install {top}")
    detail = f" ({type(error).__name__}: {error})" if error is not None else ""
    return (
        f"{modname} is required when {REQUIRE_PEERS_ENV}=1: install it ({install}); "
        f"it could not be imported{detail}."
    )


_original_importorskip = pytest.importorskip


def _importorskip(modname, minversion=None, reason=None, *args, **kwargs):
    if not peers_required():
        return _original_importorskip(modname, minversion, reason, *args, **kwargs)
    try:
        return _original_importorskip(modname, minversion, reason, *args, **kwargs)
    except pytest.skip.Exception as skip:
        raise pytest.fail.Exception(missing_peer_message(modname) + f" pytest said: {skip}", pytrace=False) from None


pytest.importorskip = _importorskip


@pytest.fixture
def rng():
    return np.random.default_rng(0)
