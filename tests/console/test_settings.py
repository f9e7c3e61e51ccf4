"""The console's settings: it has no key of its own, and serves on one TCP address."""

from __future__ import annotations

import pytest

from takeoff_console.settings import ConsoleSettings
from takeoff_server.config import ConfigError, load_settings


def test_a_key_of_its_own_is_refused_naming_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAKEOFF_API_KEY", "tko_someone_" + "x" * 43)
    with pytest.raises(ConfigError, match="signed-in user's key, never one of its own") as refused:
        load_settings(ConsoleSettings)
    assert "tko_someone_" not in str(refused.value)


def test_it_serves_on_one_host_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TAKEOFF_API_KEY", raising=False)
    assert (load_settings(ConsoleSettings).host, load_settings(ConsoleSettings).port) == ("127.0.0.1", 8080)
    monkeypatch.setenv("TAKEOFF_LISTEN", '["unix:/tmp/console.sock"]')
    with pytest.raises(ConfigError, match="host:port, not a Unix socket"):
        load_settings(ConsoleSettings)
    monkeypatch.setenv("TAKEOFF_LISTEN", '["127.0.0.1:1", "127.0.0.1:2"]')
    with pytest.raises(ConfigError, match="TAKEOFF_LISTEN"):
        load_settings(ConsoleSettings)
