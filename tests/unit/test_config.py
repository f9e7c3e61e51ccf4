from pathlib import Path

import pytest

from takeoff_server.config import ConfigError, ServerSettings, load_settings


class GreeterSettings(ServerSettings):
    listen: list[str] = ["127.0.0.1:7000"]
    greeting: str = "hello"
    retries: int = 3


def test_defaults_then_yaml_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "greeter.yaml"
    config.write_text("greeting: hi\nretries: 5\nlisten: ['127.0.0.1:7001', 'unix:/tmp/greeter.sock']\n")
    monkeypatch.setenv("TAKEOFF_RETRIES", "9")

    settings = load_settings(GreeterSettings, config)

    assert settings.greeting == "hi"  # YAML over the default
    assert settings.retries == 9  # the environment over YAML
    assert settings.listen == ["127.0.0.1:7001", "unix:/tmp/greeter.sock"]


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "greeter.yaml"
    config.write_text("greeting: hey\n")
    monkeypatch.setenv("TAKEOFF_CONFIG_FILE", str(config))

    assert load_settings(GreeterSettings).greeting == "hey"


def test_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAKEOFF_RETRIES", "many")

    with pytest.raises(ConfigError) as raised:
        load_settings(GreeterSettings)

    message = str(raised.value)
    assert "TAKEOFF_RETRIES" in message
    assert "'many'" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("listen: ['nowhere']\n", "'nowhere' is not host:port or unix:/path"),
        ("retries: [1, 2]\n", "retries"),
        ("colour: blue\n", "unknown setting 'colour'"),
        ("greeting: [unclosed\n", "is not valid YAML"),
        ("- a\n- b\n", "must hold a mapping"),
        ("shutdown_grace_seconds: -1\n", "must be between 0 and 3600"),
        ("shutdown_grace_seconds: .inf\n", "must be between 0 and 3600"),
    ],
)
def test_bad_yaml_gives_one_readable_line(tmp_path: Path, yaml_text: str, expected: str) -> None:
    config = tmp_path / "greeter.yaml"
    config.write_text(yaml_text)

    with pytest.raises(ConfigError) as raised:
        load_settings(GreeterSettings, config)

    assert expected in str(raised.value)
    assert "\n" not in str(raised.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(GreeterSettings, tmp_path / "absent.yaml")
