"""Keys from the SDK and the command line: where a client finds its key, what it says without one, and
``takeoff keys`` and ``takeoff secrets``, which never print a secret but the new key's, once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from takeoff import Client, KeyKind, SecretMount, TakeoffError
from takeoff._auth import admin_key_path, channel_credentials, find_key
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess, wait_for

KEY_VARIABLES = ("TAKEOFF_API_KEY", "TAKEOFF_TOKEN", "TAKEOFF_BOOTSTRAP_ADMIN_KEY_FILE")
BOGUS_KEY = "tko_bogus_" + "x" * 40


def cli_environment(home: Path, registry: str, project: str, **extra: str) -> dict[str, str]:
    """A user's environment without any key: Takeoff settings only as given."""
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("TAKEOFF_")}
    return {
        **inherited,
        "TAKEOFF_HOME": str(home),
        "TAKEOFF_REGISTRY": registry,
        "TAKEOFF_PROJECT": project,
        "COLUMNS": "80",
        **extra,
    }


def takeoff(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "takeoff.cli", *args],
        env=env,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )


def write_admin_file(home: Path, key: str) -> None:
    path = admin_key_path(home)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(key + "\n")


@pytest.fixture
def no_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """This process without any key: none in the environment, an empty TAKEOFF_HOME."""
    for variable in KEY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("TAKEOFF_HOME", str(home))
    return home


def test_each_key_source_wins_over_the_later_ones_in_process(
    no_key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert find_key() is None

    write_admin_file(no_key, "from-file")
    assert find_key() == find_key(None)
    found = find_key()
    assert found is not None
    assert (found.secret, found.source) == ("from-file", str(admin_key_path(no_key)))

    monkeypatch.setenv("TAKEOFF_TOKEN", "from-token")
    found = find_key()
    assert found is not None
    assert (found.secret, found.source) == ("from-token", "TAKEOFF_TOKEN")

    monkeypatch.setenv("TAKEOFF_API_KEY", "from-api-key")
    found = find_key()
    assert found is not None
    assert (found.secret, found.source) == ("from-api-key", "TAKEOFF_API_KEY")

    found = find_key("tko_given_1")
    assert found is not None
    assert found.secret == "tko_given_1"
    assert "tko_given_1" not in repr(found)


def test_unix_targets_stay_plaintext_and_a_half_client_pair_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for variable in ("TAKEOFF_TLS_CA_FILE", "TAKEOFF_TLS_CERT_FILE", "TAKEOFF_TLS_KEY_FILE"):
        monkeypatch.delenv(variable, raising=False)
    assert channel_credentials("127.0.0.1:1") is None
    assert channel_credentials("unix:/tmp/x.sock", tls=True) is None
    assert channel_credentials("127.0.0.1:1", tls=True) is not None

    certificate = tmp_path / "client.crt"
    certificate.write_text("not used")
    monkeypatch.setenv("TAKEOFF_TLS_CERT_FILE", str(certificate))
    assert channel_credentials("unix:/tmp/x.sock") is None
    with pytest.raises(ValueError, match="TAKEOFF_TLS_KEY_FILE"):
        channel_credentials("127.0.0.1:1")


def test_secret_mounts_as_the_command_line_spells_them() -> None:
    assert SecretMount.parse("HF=HF_TOKEN") == SecretMount("HF", env="HF_TOKEN")
    assert SecretMount.parse("projects/p/secrets/db:file=db.txt") == SecretMount(
        "projects/p/secrets/db", file="db.txt"
    )
    assert str(SecretMount("db", file="db.txt")) == "db:file=db.txt"
    for wrong in ("HF", "=X", "HF=", "HF:env=X", ":file=x"):
        with pytest.raises(ValueError, match="SECRET=ENV"):
            SecretMount.parse(wrong)


def test_each_key_source_wins_over_the_later_ones_on_the_command_line(
    registry: ServiceProcess, project: str, tmp_path: Path, client: Client
) -> None:
    """A valid key in one place and a bogus one in every later place works; a bogus key in one place and
    the valid one later is refused: so each place is read before the later ones."""
    sources = ["--key", "TAKEOFF_API_KEY", "TAKEOFF_TOKEN", "file"]
    client.create_job("listed")

    def run(keys: dict[str, str]) -> subprocess.CompletedProcess[str]:
        home = tmp_path / uuid.uuid4().hex[:8]
        home.mkdir()
        if "file" in keys:
            write_admin_file(home, keys["file"])
        variables = {name: key for name, key in keys.items() if name.startswith("TAKEOFF_")}
        env = cli_environment(home, registry.address, project, **variables)
        options = ["--key", keys["--key"]] if "--key" in keys else []
        return takeoff(env, *options, "runs", "list")

    for index, source in enumerate(sources):
        later = sources[index + 1 :]
        admitted = run({source: ADMIN_KEY, **dict.fromkeys(later, BOGUS_KEY)})
        assert admitted.returncode == 0, (source, admitted.stderr)
        if later:
            refused = run({source: BOGUS_KEY, **dict.fromkeys(later, ADMIN_KEY)})
            assert refused.returncode == 1, source
            assert "KEY_" in refused.stderr, refused.stderr
            assert BOGUS_KEY not in refused.stderr
            assert ADMIN_KEY not in refused.stderr
            assert "Traceback" not in refused.stderr


def test_a_client_without_a_key_is_told_how_to_get_one(registry: ServiceProcess, no_key: Path) -> None:
    with Client(registry.address, project="anything") as client, pytest.raises(TakeoffError) as caught:
        list(client.list_jobs())

    assert caught.value.code == "UNAUTHENTICATED"
    assert caught.value.reason == "KEY_MISSING"
    assert "takeoff up" in caught.value.message
    assert str(admin_key_path(no_key)) in caught.value.message
    assert "TAKEOFF_API_KEY" in caught.value.message

    result = takeoff(cli_environment(no_key, registry.address, "anything"), "job", "list")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: KEY_MISSING")
    assert "takeoff up" in line
    assert "--key" in line
    assert "TAKEOFF_API_KEY" in line


def test_keys_create_prints_the_secret_once_list_never(
    registry: ServiceProcess, project: str, tmp_path: Path, client: Client
) -> None:
    client.create_job(f"job-{project}")
    env = cli_environment(tmp_path, registry.address, project, TAKEOFF_API_KEY=ADMIN_KEY)
    key_id = f"reader-{uuid.uuid4().hex[:8]}"

    created = takeoff(
        env, "keys", "create", "--kind", "project", "--project", project, "--role", "read",
        "--name", key_id, "--display-name", "a reader",
    )  # fmt: skip

    assert created.returncode == 0, created.stderr
    secrets = [line for line in created.stdout.splitlines() if line.startswith("tko_")]
    assert len(secrets) == 1, created.stdout
    [secret] = secrets
    assert key_id in created.stdout
    assert "only time" in created.stderr

    listed = takeoff(env, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    assert key_id in listed.stdout
    assert secret not in listed.stdout + listed.stderr
    assert all(len(line) <= 80 for line in listed.stdout.splitlines()), listed.stdout
    as_json = takeoff(env, "keys", "list", "--json")
    [mine] = [key for key in json.loads(as_json.stdout) if key["name"] == f"keys/{key_id}"]
    assert secret not in as_json.stdout
    assert mine["kind"] == "project"
    assert mine["role"] == "read"
    assert mine["projects"] == [f"projects/{project}"]
    assert secret.startswith(mine["secret_hint"])

    reader = cli_environment(tmp_path, registry.address, project)
    assert takeoff(reader, "--key", secret, "job", "list").returncode == 0
    elsewhere = takeoff(reader, "--key", secret, "job", "list", "--project", f"other-{project}")
    assert elsewhere.returncode == 1
    assert "PERMISSION_DENIED" in elsewhere.stderr
    assert "jobs.read" in elsewhere.stderr
    assert secret not in elsewhere.stderr

    revoked = takeoff(env, "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    wait_for(
        lambda: takeoff(reader, "--key", secret, "job", "list").returncode == 1,
        timeout=10,
        what="the revoked key to be refused",
    )
    refused = takeoff(reader, "--key", secret, "job", "list")
    assert "KEY_" in refused.stderr
    assert "--key" in refused.stderr
    assert secret not in refused.stderr
    assert f"keys/{key_id}" not in takeoff(env, "keys", "list").stdout
    assert key_id in takeoff(env, "keys", "list", "--all").stdout


def test_keys_create_json_holds_the_secret_and_the_client_returns_it_once(
    registry: ServiceProcess, project: str, tmp_path: Path
) -> None:
    env = cli_environment(tmp_path, registry.address, project, TAKEOFF_API_KEY=ADMIN_KEY)
    created = takeoff(env, "keys", "create", "--kind", "service", "--service", "builder", "--json")
    assert created.returncode == 0, created.stderr
    answer = json.loads(created.stdout)
    assert answer["secret"].startswith("tko_")
    assert answer["key"]["service"] == "builder"

    with Client(registry.address, project=project) as client:
        made = client.create_key(KeyKind.AGENT, queues=["gpu"])
        assert made.secret not in repr(made)
        assert made.key.queues == [f"projects/{project}/queues/gpu"]
        assert client.get_key(made.key.id).secret_hint == made.key.secret_hint
        assert client.revoke_key(made.key.name).revoked


def test_secrets_set_list_delete_never_print_values(
    registry: ServiceProcess, project: str, tmp_path: Path
) -> None:
    values = {"from-stdin": "stdin-value-1234", "from-file": "file-value-5678", "from-env": "env-value-9012"}
    value_file = tmp_path / "value.txt"
    value_file.write_text(values["from-file"])
    env = cli_environment(
        tmp_path, registry.address, project, TAKEOFF_API_KEY=ADMIN_KEY, MY_SECRET=values["from-env"]
    )
    outputs = [
        takeoff(env, "secrets", "set", "from-stdin", stdin=values["from-stdin"] + "\n"),
        takeoff(env, "secrets", "set", "from-file", "--value-file", str(value_file)),
        takeoff(env, "secrets", "set", "from-env", "--from-env", "MY_SECRET"),
        takeoff(env, "secrets", "list"),
        takeoff(env, "secrets", "list", "--json"),
    ]
    for result in outputs:
        assert result.returncode == 0, result.stderr
    listed = outputs[3].stdout
    assert all(name in listed for name in values)
    assert {secret["name"] for secret in json.loads(outputs[4].stdout)} == {
        f"projects/{project}/secrets/{name}" for name in values
    }

    outputs.append(takeoff(env, "secrets", "delete", "from-file"))
    assert outputs[-1].returncode == 0, outputs[-1].stderr
    after = takeoff(env, "secrets", "list")
    outputs.append(after)
    assert "from-file" not in after.stdout
    assert "from-env" in after.stdout
    unset = takeoff(env, "secrets", "set", "x", "--from-env", "NOT_SET_ANYWHERE")
    assert unset.returncode == 1
    assert "NOT_SET_ANYWHERE" in unset.stderr
    printed = "".join(result.stdout + result.stderr for result in outputs)
    assert not [value for value in values.values() if value in printed]
