"""Targets naming several replicas of a service (``host:port,host:port``): how they are taken apart, the
errors that name a bad entry, the settings that take them, and a real TLS channel failing over between two
servers on loopback when the one it was using stops.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from takeoff_agent.settings import AgentSettings
from takeoff_builder.settings import BuilderSettings
from takeoff_console.settings import ConsoleSettings
from takeoff_rpc.backoff import RetryPolicy
from takeoff_rpc.channels import (
    DialTarget,
    TargetError,
    UnresolvedTarget,
    check_target,
    dial_target,
    open_channel,
    tls_credentials,
)
from takeoff_rpc.retries import call_with_retries
from takeoff_rpc.status import decode_rpc_error
from takeoff_server.config import ConfigError, ServerSettings, load_settings
from tests.tls import Certificates, make_certificates

WHO = "/takeoff.test.Who/Name"


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1:50052",
        "localhost:50052",
        "unix:/run/takeoff/queue.sock",
        "dns:///queue.example:443",
        "ipv4:10.0.0.1:1,10.0.0.2:1",
    ],
)
def test_one_address_and_grpcs_own_targets_pass_unchanged(target: str) -> None:
    assert dial_target(target) == DialTarget(target)


def test_a_list_of_ip_addresses_is_one_ipv4_target_in_the_order_given() -> None:
    assert dial_target("10.0.0.2:7000, 10.0.0.1:7001") == DialTarget(
        "ipv4:10.0.0.2:7000,10.0.0.1:7001", authority="10.0.0.2:7000"
    )


def test_a_list_of_names_is_resolved_and_keeps_the_first_name_for_tls() -> None:
    dial = dial_target("localhost:7000,127.0.0.1:7001,localhost:7000")
    assert dial == DialTarget("ipv4:127.0.0.1:7000,127.0.0.1:7001", authority="localhost:7000")


def test_a_list_of_ipv6_addresses_is_one_ipv6_target() -> None:
    assert dial_target("[::1]:7000,[::1]:7001") == DialTarget("ipv6:[::1]:7000,[::1]:7001", "[::1]:7000")


@pytest.mark.parametrize(
    ("target", "named"),
    [
        ("a:1,,b:2", "entry 2 of 'a:1,,b:2' is empty"),
        ("a:1,", "entry 2 of 'a:1,' is empty"),
        ("queue-a,queue-b:50052", "entry 1 of 'queue-a,queue-b:50052' ('queue-a') is not host:port"),
        ("a:1,b:0", "('b:0') is not host:port"),
        ("a:1,b:65536", "('b:65536') is not host:port"),
        ("a:1,b:http", "('b:http') is not host:port"),
        ("a:1,::1:2", "('::1:2') is not host:port or [ipv6]:port"),
        ("a:1,[a.b]:2", "('[a.b]:2') is not host:port or [ipv6]:port"),
        ("a:1,unix:/x.sock", "('unix:/x.sock') names a scheme"),
    ],
)
def test_a_malformed_list_is_refused_naming_the_entry(target: str, named: str) -> None:
    for check in (check_target, dial_target):
        with pytest.raises(TargetError, match=re.escape(named)):
            check(target)


def test_an_empty_target_is_refused() -> None:
    with pytest.raises(TargetError, match="a channel needs a target"):
        dial_target(" ")


def test_a_host_that_does_not_resolve_is_named_when_the_channel_opens_not_in_settings() -> None:
    target = "127.0.0.1:1,queue.invalid:2"
    assert check_target(target) == target
    with pytest.raises(UnresolvedTarget, match=r"entry 2 of .*cannot resolve 'queue\.invalid'"):
        open_channel(target)


def test_a_list_mixing_address_families_is_refused() -> None:
    with pytest.raises(TargetError, match=r"mixes IPv4-only hosts \(127.0.0.1:1\) with IPv6-only ones"):
        dial_target("127.0.0.1:1,[::1]:2")


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        (AgentSettings, "QUEUE_ADDRESS"),
        (AgentSettings, "BUILDER_ADDRESS"),
        (AgentSettings, "REGISTRY_ADDRESS"),
        (AgentSettings, "JOB_REGISTRY_ADDRESS"),
        (BuilderSettings, "REGISTRY_ADDRESS"),
        (ConsoleSettings, "QUEUE_ADDRESS"),
        (ConsoleSettings, "REGISTRY_ADDRESS"),
    ],
)
def test_settings_take_a_list_from_the_environment_and_name_a_bad_entry(
    settings: type[ServerSettings], field: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TAKEOFF_HOME", str(tmp_path))
    monkeypatch.delenv("TAKEOFF_API_KEY", raising=False)  # the console takes none
    monkeypatch.setenv(f"TAKEOFF_{field}", "queue-a.example:50052,queue-b.example:50052")
    assert getattr(load_settings(settings), field.lower()) == "queue-a.example:50052,queue-b.example:50052"

    monkeypatch.setenv(f"TAKEOFF_{field}", "queue-a.example:50052,queue-b.example")
    with pytest.raises(ConfigError) as raised:
        load_settings(settings)
    assert f"TAKEOFF_{field}: entry 2 of" in str(raised.value)
    assert "('queue-b.example') is not host:port" in str(raised.value)


class NamedServer:
    """A TLS server on loopback that answers :data:`WHO` with its name."""

    def __init__(self, name: str, certificates: Certificates) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(
            lambda request, context: name.encode()
        )
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("takeoff.test.Who", {"Name": handler}),)
        )
        credentials = grpc.ssl_server_credentials(
            [(certificates.server.key_file.read_bytes(), certificates.server.cert_file.read_bytes())]
        )
        self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()


def who_is(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(WHO)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def servers(certificates: Certificates) -> Iterator[tuple[NamedServer, NamedServer]]:
    first, second = NamedServer("first", certificates), NamedServer("second", certificates)
    yield first, second
    for server in (first, second):
        server.server.stop(None)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_a_tls_channel_to_a_list_checks_the_certificate_and_moves_on_when_its_server_stops(
    servers: tuple[NamedServer, NamedServer], certificates: Certificates, host: str
) -> None:
    first, second = servers
    target = f"{host}:{first.port},{host}:{second.port}"
    with open_channel(target, credentials=tls_credentials(certificates.ca_file)) as channel:
        who = who_is(channel)
        assert who(b"", timeout=10) == b"first"  # pick_first: the first address that answers
        first.server.stop(None).wait()
        # A call already on the closing connection may fail UNAVAILABLE, which every client retries.
        moved_on = call_with_retries(lambda: who(b"", timeout=10), RetryPolicy(max_attempts=3, deadline=30))
        assert moved_on == b"second"


def test_a_tls_channel_to_a_list_refuses_a_certificate_that_does_not_name_the_first_host(
    servers: tuple[NamedServer, NamedServer], certificates: Certificates
) -> None:
    first, second = servers
    # 127.0.0.2 is loopback too, but the certificate names only 127.0.0.1 and localhost.
    target = f"127.0.0.2:{first.port},127.0.0.1:{second.port}"
    with (
        open_channel(target, credentials=tls_credentials(certificates.ca_file)) as channel,
        pytest.raises(grpc.RpcError) as raised,
    ):
        who_is(channel)(b"", timeout=10)
    status = decode_rpc_error(raised.value)
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert "verification" in status.message.lower()
