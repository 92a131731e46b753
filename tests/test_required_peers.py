"""``BRAINNORM_REQUIRE_PEERS=1`` turns a missing peer into an error (tests/conftest.py)."""

from __future__ import annotations

import pytest

from . import conftest

MISSING = "brainnorm_tests_no_such_peer"


def test_missing_peer_skips_by_default(monkeypatch):
    monkeypatch.delenv(conftest.REQUIRE_PEERS_ENV, raising=False)
    monkeypatch.delenv(conftest._MOVED_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=MISSING):
        pytest.importorskip(MISSING)


@pytest.mark.parametrize("variable", [conftest.REQUIRE_PEERS_ENV, conftest._MOVED_ENV])
def test_missing_peer_fails_when_peers_are_required(monkeypatch, variable):
    monkeypatch.delenv(conftest.REQUIRE_PEERS_ENV, raising=False)
    monkeypatch.delenv(conftest._MOVED_ENV, raising=False)
    monkeypatch.setenv(variable, "1")
    with pytest.raises(pytest.fail.Exception) as info:
        pytest.importorskip(MISSING)
    message = str(info.value)
    assert f"{MISSING} is required when BRAINNORM_REQUIRE_PEERS=1: install it" in message
    assert "pip install" in message


def test_the_error_names_the_install_command_of_a_known_peer():
    message = conftest.missing_peer_message("compressai.layers")
    assert "compressai.layers is required when BRAINNORM_REQUIRE_PEERS=1" in message
    assert "pip install --no-deps compressai==1.2.8" in message


def test_installed_peer_is_returned_when_peers_are_required(monkeypatch):
    monkeypatch.setenv(conftest.REQUIRE_PEERS_ENV, "1")
    assert pytest.importorskip("numpy").__name__ == "numpy"


def test_the_variable_does_not_reach_brainnorm():
    """brainnorm lists every BRAINNORM_* variable it ignores; the suite's own switch is moved away from it."""
    import os

    import brainnorm

    assert conftest.REQUIRE_PEERS_ENV not in os.environ
    assert conftest.REQUIRE_PEERS_ENV not in brainnorm.backend_info()["ignored_environment"]
