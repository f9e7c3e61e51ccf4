"""The command line and the SDK against a registry serving mutual TLS, configured as users do: the CA and
a client certificate in ``TAKEOFF_TLS_CA_FILE``, ``TAKEOFF_TLS_CERT_FILE`` and ``TAKEOFF_TLS_KEY_FILE``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from takeoff import Client, TakeoffError
from tests.keys import ADMIN_KEY
from tests.processes import ServiceProcess, service_process
from tests.sdk.test_keys import cli_environment, takeoff
from tests.tls import Certificates, make_certificates


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def mutual_tls_registry(
    certificates: Certificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    env = certificates.server_env(require_client_cert=True)
    with service_process("registry", tmp_path_factory.mktemp("tls-registry"), env=env) as registry:
        yield registry


def test_the_cli_speaks_mutual_tls_from_the_environment(
    mutual_tls_registry: ServiceProcess, certificates: Certificates, tmp_path: Path
) -> None:
    tls = {
        "TAKEOFF_TLS_CA_FILE": str(certificates.ca_file),
        "TAKEOFF_TLS_CERT_FILE": str(certificates.client.cert_file),
        "TAKEOFF_TLS_KEY_FILE": str(certificates.client.key_file),
    }
    env = cli_environment(tmp_path, mutual_tls_registry.address, "tls", TAKEOFF_API_KEY=ADMIN_KEY, **tls)

    served = takeoff(env, "keys", "list", "--json")
    assert served.returncode == 0, served.stderr

    for left_out in ({}, {"TAKEOFF_TLS_CERT_FILE": "", "TAKEOFF_TLS_KEY_FILE": ""}):
        without = {**env, **left_out} if left_out else {k: v for k, v in env.items() if k not in tls}
        refused = takeoff(without, "keys", "list")
        assert refused.returncode == 1, refused.stdout
        assert refused.stderr.startswith("error: "), refused.stderr
        assert "Traceback" not in refused.stderr
        assert ADMIN_KEY not in refused.stderr

    half = takeoff({**env, "TAKEOFF_TLS_KEY_FILE": ""}, "keys", "list")
    assert half.returncode == 1
    assert "TAKEOFF_TLS_KEY_FILE" in half.stderr


def test_the_client_speaks_mutual_tls_from_the_environment_or_its_argument(
    mutual_tls_registry: ServiceProcess, certificates: Certificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TAKEOFF_TLS_CA_FILE", str(certificates.ca_file))
    monkeypatch.setenv("TAKEOFF_TLS_CERT_FILE", str(certificates.client.cert_file))
    monkeypatch.setenv("TAKEOFF_TLS_KEY_FILE", str(certificates.client.key_file))
    with Client(mutual_tls_registry.address, project="tls") as client:
        assert any(key.kind == "admin" for key in client.list_keys())
    with Client(mutual_tls_registry.address, project="tls", tls=False) as client, pytest.raises(TakeoffError):
        list(client.list_keys())
