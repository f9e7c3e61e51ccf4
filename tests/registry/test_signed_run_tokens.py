"""Run tokens the queue signs itself (docs/design.md §13, "Signed run tokens"), checked by a real registry:
what one may do, that a revoked run's tokens and a revoked signer key's tokens are refused, that a forged,
altered or over-broad token is refused, who may register a signer, and the queue's client falling back to
a minted token for a scope too long to sign."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple

import grpc
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import SecretStr

from takeoff.v1 import keys_pb2, runs_pb2
from takeoff_queue import registry_client
from takeoff_queue.registry_client import Registry as QueueRegistryClient
from takeoff_queue.settings import QueueSettings
from takeoff_server.run_tokens import MAX_SIGNED_TOKEN_CHARS, RunTokenSigner
from tests.processes import until
from tests.registry.conftest import Registry, failure
from tests.registry.test_keys import (
    DENIED,
    INVALID,
    ITEM,
    REVOCATION_BOUND,
    RUN,
    As,
    create_key,
    image_version,
    project_key,
    refused_within,
)

QUEUE_KEY = keys_pb2.Key(kind=keys_pb2.KEY_KIND_SERVICE, service=keys_pb2.SERVICE_ROLE_QUEUE)


async def registered(registry: Registry, signer: RunTokenSigner, secret: str) -> keys_pb2.RunTokenSigner:
    async with As(registry, secret) as queue:
        request = keys_pb2.CreateRunTokenSignerRequest(public_key=signer.public_key)
        return (await queue.keys.CreateRunTokenSigner(request)).signer


def signed(
    signer: RunTokenSigner,
    signer_name: str,
    *,
    job_version: str,
    run: str = RUN,
    item: str = ITEM,
    secrets: Sequence[str] = (),
) -> str:
    token = signer.sign(
        signer_name.removeprefix("runTokenSigners/"),
        run=run,
        item=item,
        job_version=job_version,
        secrets=list(secrets),
        issue_time=datetime.now(UTC),
    )
    assert token is not None
    return token


def encoded(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Signing(NamedTuple):
    """A registry with a job version, a queue's key and a signer that key registered."""

    version: str
    queue_key: keys_pb2.CreateKeyResponse
    signer: RunTokenSigner
    registration: keys_pb2.RunTokenSigner

    @property
    def name(self) -> str:
        return self.registration.name


@pytest.fixture
async def signing(registry: Registry) -> Signing:
    version = await image_version(registry)
    queue_key = await create_key(registry, QUEUE_KEY)
    signer = RunTokenSigner()
    return Signing(version, queue_key, signer, await registered(registry, signer, queue_key.secret))


async def valid(registry: Registry, token: str) -> bool:
    return (await registry.keys.VerifyKey(keys_pb2.VerifyKeyRequest(secret=token))).valid


async def test_a_signed_run_token_writes_its_run_only_and_is_refused_for_good_once_its_run_is_revoked(
    registry: Registry, signing: Signing
) -> None:
    version, queue_key, signer, registration = signing
    assert registration.name.startswith("runTokenSigners/signer-")
    assert (registration.public_key, registration.creator) == (signer.public_key, queue_key.key.name)
    token = signed(signer, registration.name, job_version=version, secrets=["projects/demo/secrets/HF_TOKEN"])

    verified = await registry.keys.VerifyKey(keys_pb2.VerifyKeyRequest(secret=token))
    assert verified.valid
    key = verified.key
    assert (key.kind, key.run, key.item, key.job_version) == (keys_pb2.KEY_KIND_RUN, RUN, ITEM, version)
    assert key.name.startswith("keys/run-")
    unstored = await failure(registry.keys.GetKey(keys_pb2.GetKeyRequest(name=key.name)))
    assert (unstored.code, unstored.reason) == (grpc.StatusCode.NOT_FOUND, "KEY_NOT_FOUND")
    assert "RevokeRunTokens" in unstored.message  # says how to revoke it instead
    assert key.creator == queue_key.key.name
    assert key.permissions == [
        "artifacts.read on projects/demo",
        f"artifacts.write on {RUN}",
        f"jobs.read on {version}",
        f"runs.read on {RUN}",
        f"runs.write on {RUN}",
        "secrets.access on projects/demo/secrets/HF_TOKEN",
    ]
    async with As(registry, token) as job:
        created = await job.runs.CreateRun(
            runs_pb2.CreateRunRequest(
                parent="projects/demo", run_id="run-1", run=runs_pb2.Run(job_version=version)
            )
        )
        assert created.run.name == RUN
        await job.runs.AppendLogs(
            runs_pb2.AppendLogsRequest(name=RUN, lines=[runs_pb2.LogLine(text="training")])
        )
        another = job.runs.CreateRun(runs_pb2.CreateRunRequest(parent="projects/demo", run_id="run-2"))
        assert (await failure(another)).code == DENIED

        await registry.keys.RevokeRunTokens(keys_pb2.RevokeRunTokensRequest(run=RUN))
        assert not await valid(registry, token)
        refused, took = await refused_within(
            lambda: job.runs.GetRun(runs_pb2.GetRunRequest(name=RUN)), REVOCATION_BOUND
        )
    assert refused.reason == "KEY_INVALID"
    assert took < REVOCATION_BOUND
    # Attempts never share a run: a token signed for a revoked run later is no token either.
    assert not await valid(registry, signed(signer, registration.name, job_version=version))
    # Another run's token from the same signer is untouched.
    assert await valid(
        registry, signed(signer, registration.name, run="projects/demo/runs/run-3", job_version=version)
    )


async def test_a_token_is_refused_when_forged_altered_over_broad_or_its_signers_key_is_revoked(
    registry: Registry, signing: Signing
) -> None:
    version, queue_key, signer, name = signing.version, signing.queue_key, signing.signer, signing.name
    signer_id = name.removeprefix("runTokenSigners/")
    token = signed(signer, name, job_version=version)
    assert await valid(registry, token)

    claims_text, signature_text = token.removeprefix(f"tko_{signer_id}_").split(".")
    claims = keys_pb2.RunTokenClaims.FromString(
        base64.urlsafe_b64decode(claims_text + "=" * (-len(claims_text) % 4))
    )
    claims.run = "projects/demo/runs/someone-elses"
    altered_text = encoded(claims.SerializeToString())
    # The signature's last character carries 4 unused bits: another character with the same 2 used ones
    # decodes to the same signature, a second spelling of the token.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    respelled = token[:-1] + alphabet[alphabet.index(token[-1]) ^ 1]
    # A registered signer that names its token as another key (the bootstrap admin) is refused too.
    private_key = Ed25519PrivateKey.generate()
    own_key = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    async with As(registry, queue_key.secret) as queue:
        request = keys_pb2.CreateRunTokenSignerRequest(public_key=own_key)
        own_id = (await queue.keys.CreateRunTokenSigner(request)).signer.name.removeprefix("runTokenSigners/")
    claims = keys_pb2.RunTokenClaims(key_id="bootstrap-admin", run=RUN, item=ITEM, job_version=version)
    claims_bytes = claims.SerializeToString()
    as_admin = f"tko_{own_id}_{encoded(claims_bytes)}.{encoded(private_key.sign(claims_bytes))}"
    claims.key_id = "run-0123456789abcdef"
    claims_bytes = claims.SerializeToString()
    well_named = f"tko_{own_id}_{encoded(claims_bytes)}.{encoded(private_key.sign(claims_bytes))}"
    assert await valid(registry, well_named)
    refused = {
        "signed by a key nobody registered": signed(RunTokenSigner(), name, job_version=version),
        "its claims altered": f"tko_{signer_id}_{altered_text}.{signature_text}",
        "an unknown signer": token.replace(f"tko_{signer_id}_", "tko_signer-000000000000_"),
        "its signature cut": token[:-1],
        "its signature spelled another way": respelled,
        "named as another key": as_admin,
        "a scope MintRunToken refuses": signed(
            signer, name, job_version=version, secrets=["projects/other/secrets/HF_TOKEN"]
        ),
        "an item that is no item": signed(signer, name, job_version=version, item="gpu/items/1"),
        "too long": f"tko_{signer_id}_{'A' * MAX_SIGNED_TOKEN_CHARS}.{signature_text}",
    }
    for what, forged in refused.items():
        assert not await valid(registry, forged), what
        async with As(registry, forged) as job:
            answer = await failure(job.runs.GetRun(runs_pb2.GetRunRequest(name=RUN)))
        assert answer.code == grpc.StatusCode.UNAUTHENTICATED, what

    await registry.keys.RevokeKey(keys_pb2.RevokeKeyRequest(name=queue_key.key.name))
    assert not await valid(registry, token)  # whoever stole the queue's key signs nothing valid after


async def test_only_a_key_that_may_mint_everywhere_registers_a_signer_and_only_an_ed25519_key(
    registry: Registry,
) -> None:
    public_key = RunTokenSigner().public_key
    writer = await create_key(registry, project_key("projects/demo"))
    agent = await create_key(
        registry, keys_pb2.Key(kind=keys_pb2.KEY_KIND_AGENT, queues=["projects/demo/queues/gpu"])
    )
    for secret in (writer.secret, agent.secret):
        async with As(registry, secret) as caller:
            request = keys_pb2.CreateRunTokenSignerRequest(public_key=public_key)
            assert (await failure(caller.keys.CreateRunTokenSigner(request))).code == DENIED
    async with As(registry, None) as anonymous:
        request = keys_pb2.CreateRunTokenSignerRequest(public_key=public_key)
        assert (
            await failure(anonymous.keys.CreateRunTokenSigner(request))
        ).code == grpc.StatusCode.UNAUTHENTICATED

    identity = b"\x01" + b"\x00" * 31  # small order: R = identity, S = 0 would verify for every message
    for bad in (b"", b"\x01" * 31, b"\x01" * 33, identity, b"\x00" * 32):
        answer = await failure(
            registry.keys.CreateRunTokenSigner(keys_pb2.CreateRunTokenSignerRequest(public_key=bad))
        )
        assert (answer.code, answer.reason, answer.fields) == (INVALID, "ARGUMENT_INVALID", ["public_key"])


async def _queue_client(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> tuple[QueueRegistryClient, keys_pb2.CreateKeyResponse]:
    """The queue service's registry client, presenting a queue key made for it (returned too)."""
    queue_key = await create_key(registry, QUEUE_KEY)
    monkeypatch.delenv("TAKEOFF_API_KEY", raising=False)  # the environment would win over the queue's key
    return QueueRegistryClient(
        registry.address, QueueSettings(api_key=SecretStr(queue_key.secret))
    ), queue_key


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_queues_client_signs_and_mints_only_a_scope_too_long_to_sign(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = await image_version(registry)
    client, queue_key = await _queue_client(registry, monkeypatch)
    try:
        short = await client.mint_run_token(RUN, ITEM, version, ["projects/demo/secrets/HF_TOKEN"])
        many = [f"projects/demo/secrets/S{index:02d}-{'x' * 56}" for index in range(60)]
        long = await client.mint_run_token("projects/demo/runs/run-2", ITEM, version, many)
    finally:
        await client.close()
    assert "." in short
    assert len(short) <= MAX_SIGNED_TOKEN_CHARS
    assert "." not in long  # a stored key's secret, tko_{key id}_{43 characters}
    for token, run, secrets in ((short, RUN, 1), (long, "projects/demo/runs/run-2", 60)):
        verified = await registry.keys.VerifyKey(keys_pb2.VerifyKeyRequest(secret=token))
        assert (verified.valid, verified.key.run, len(verified.key.secrets)) == (True, run, secrets)
        assert verified.key.creator == queue_key.key.name
    listed = await registry.keys.ListKeys(keys_pb2.ListKeysRequest(show_run_tokens=True))
    assert [key.run for key in listed.keys if key.kind == keys_pb2.KEY_KIND_RUN] == [
        "projects/demo/runs/run-2"
    ]


async def test_batch_revoke_run_tokens_revokes_each_run_named_minted_or_signed_in_one_call(
    registry: Registry, signing: Signing
) -> None:
    version, signer, name = signing.version, signing.signer, signing.name
    runs = [f"projects/demo/runs/batch-{letter}" for letter in "abcd"]
    minted = await registry.keys.MintRunToken(
        keys_pb2.MintRunTokenRequest(run=runs[0], item=ITEM, job_version=version)
    )
    tokens = [minted.secret] + [signed(signer, name, run=run, job_version=version) for run in runs[1:]]
    assert all([await valid(registry, token) for token in tokens])

    request = keys_pb2.BatchRevokeRunTokensRequest(runs=[*runs[:3], runs[1]])
    assert (await registry.keys.BatchRevokeRunTokens(request)).revoked == 1  # the stored one
    assert [await valid(registry, token) for token in tokens] == [False, False, False, True]
    assert (await registry.keys.BatchRevokeRunTokens(request)).revoked == 0  # idempotent

    bad = {
        "runs": [],
        "runs[1]": [runs[3], "batch-e"],
    }
    for field, named in bad.items():
        refused = await failure(
            registry.keys.BatchRevokeRunTokens(keys_pb2.BatchRevokeRunTokensRequest(runs=named))
        )
        assert (refused.code, refused.fields) == (INVALID, [field])
    too_many = keys_pb2.BatchRevokeRunTokensRequest(
        runs=[f"projects/demo/runs/r{index}" for index in range(1001)]
    )
    assert (await failure(registry.keys.BatchRevokeRunTokens(too_many))).fields == ["runs"]
    writer = await create_key(registry, project_key("projects/demo"))
    async with As(registry, writer.secret) as caller:
        request = keys_pb2.BatchRevokeRunTokensRequest(runs=[runs[3]])
        assert (await failure(caller.keys.BatchRevokeRunTokens(request))).code == DENIED
    assert await valid(registry, tokens[3])


async def test_the_queues_client_registers_its_signer_again_so_a_registry_restored_from_before_knows_it(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = await image_version(registry)
    monkeypatch.setattr(registry_client, "REGISTER_AGAIN_SECONDS", 0.0)
    client, queue_key = await _queue_client(registry, monkeypatch)

    async def signers() -> list[str]:
        async with registry.database.engine.connect() as connection:
            rows = await connection.execute(sa.text("SELECT signer_id FROM registry_run_token_signers"))
            return [row[0] for row in rows]

    try:
        token = await client.mint_run_token(RUN, ITEM, version, [])
        [signer_id] = await signers()
        assert token.startswith(f"tko_{signer_id}_")
        async with registry.database.engine.begin() as connection:  # a backup from before the registration
            await connection.execute(sa.text("DELETE FROM registry_run_token_signers"))

        async def registered_again() -> bool:
            # Tokens go on being signed meanwhile, as dispatch does; each may start a registration.
            assert client.signed_run_token("projects/demo/runs/run-2", ITEM, version, []) is not None
            return await signers() == [signer_id]

        await until(registered_again, "the queue's client to register its signer again (the same id)")
    finally:
        await client.close()
    # Registering the same public key again is the signer as stored, its creator and time included.
    async with As(registry, queue_key.secret) as queue:
        request = keys_pb2.CreateRunTokenSignerRequest(public_key=client._signer.public_key)
        again = (await queue.keys.CreateRunTokenSigner(request)).signer
        assert again == (await queue.keys.CreateRunTokenSigner(request)).signer
    assert again.name == f"runTokenSigners/{signer_id}"
