"""SecretService on a real registry (SQLite and PostgreSQL): set, list, delete; values stored only encrypted
and never read back except by AccessSecret, which admits only run tokens listing the secret (not even an
admin key)."""

from __future__ import annotations

import stat
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

from takeoff.v1 import keys_pb2, keys_pb2_grpc, secrets_pb2, secrets_pb2_grpc
from takeoff_registry.secrets import MAX_VALUE_BYTES, SecretKey, Secrets, SecretUnreadable, load_secrets_key
from takeoff_registry.store import RegistryStore
from takeoff_rpc.channels import open_aio_channel
from tests.keys import ADMIN_KEY
from tests.registry.conftest import Registry, failure, registry_settings, start_registry

PROJECT = "projects/vault"


def _value() -> bytes:
    """A value no other test or table holds by chance."""
    return f"plaintext-{uuid.uuid4().hex}".encode() + b"\x00\xffend"


@dataclass
class Stubs:
    secrets: secrets_pb2_grpc.SecretServiceAsyncStub
    keys: keys_pb2_grpc.KeyServiceAsyncStub
    address: str


@pytest.fixture
async def admin(registry: Registry) -> AsyncIterator[Stubs]:
    async with _stubs(registry, ADMIN_KEY) as stubs:
        yield stubs


@asynccontextmanager
async def _stubs(registry: Registry, key: str) -> AsyncIterator[Stubs]:
    """Stubs on a channel presenting ``key``."""
    async with open_aio_channel(registry.address, api_key=key) as channel:
        yield Stubs(
            secrets_pb2_grpc.SecretServiceStub(channel),
            keys_pb2_grpc.KeyServiceStub(channel),
            registry.address,
        )


async def _set(stubs: Stubs, secret_id: str, value: bytes, parent: str = PROJECT) -> secrets_pb2.Secret:
    request = secrets_pb2.SetSecretRequest(parent=parent, secret_id=secret_id, value=value)
    return (await stubs.secrets.SetSecret(request)).secret


async def _access(stubs: Stubs, name: str) -> bytes:
    return (await stubs.secrets.AccessSecret(secrets_pb2.AccessSecretRequest(name=name))).value


@asynccontextmanager
async def _given(admin: Stubs, name: str) -> AsyncIterator[Stubs]:
    """Stubs presenting a run token given the secret ``name``: the only way to read a value back."""
    token = await _mint(admin, [name])
    async with open_aio_channel(admin.address, api_key=token) as channel:
        yield Stubs(
            secrets_pb2_grpc.SecretServiceStub(channel), keys_pb2_grpc.KeyServiceStub(channel), admin.address
        )


async def _read_back(admin: Stubs, name: str) -> bytes:
    async with _given(admin, name) as run:
        return await _access(run, name)


async def _list(stubs: Stubs, *, page_size: int = 0, parent: str = PROJECT) -> list[str]:
    names: list[str] = []
    token = ""
    while True:
        response = await stubs.secrets.ListSecrets(
            secrets_pb2.ListSecretsRequest(parent=parent, page_size=page_size, page_token=token)
        )
        names += [secret.name for secret in response.secrets]
        token = response.next_page_token
        if not token:
            return names


async def test_secrets_are_set_replaced_listed_in_pages_and_deleted(admin: Stubs) -> None:
    created = await _set(admin, "WANDB_API_KEY", b"first")
    assert created.name == f"{PROJECT}/secrets/WANDB_API_KEY"
    assert created.create_time == created.update_time
    await _set(admin, "hf-token", b"x")
    await _set(admin, "Db_password", b"y")

    replaced = await _set(admin, "WANDB_API_KEY", b"second")
    assert replaced.create_time == created.create_time
    assert replaced.update_time.ToDatetime() >= created.update_time.ToDatetime()
    assert await _read_back(admin, created.name) == b"second"

    # Ordered by id, byte order (upper case first), on every database; pages of one continue in order.
    expected = [f"{PROJECT}/secrets/{secret}" for secret in ("Db_password", "WANDB_API_KEY", "hf-token")]
    assert await _list(admin) == expected
    assert await _list(admin, page_size=1) == expected
    assert await _list(admin, parent="projects/never-written") == []

    await admin.secrets.DeleteSecret(secrets_pb2.DeleteSecretRequest(name=created.name))
    assert await _list(admin) == expected[:1] + expected[2:]
    gone = await failure(admin.secrets.DeleteSecret(secrets_pb2.DeleteSecretRequest(name=created.name)))
    assert (gone.code, gone.reason) == (grpc.StatusCode.NOT_FOUND, "SECRET_NOT_FOUND")
    async with _given(admin, created.name) as run:
        gone = await failure(run.secrets.AccessSecret(secrets_pb2.AccessSecretRequest(name=created.name)))
    assert (gone.code, gone.reason) == (grpc.StatusCode.NOT_FOUND, "SECRET_NOT_FOUND")


@pytest.mark.parametrize(
    ("secret_id", "value", "reason", "field"),
    [
        ("", b"v", "NAME_INVALID", "secret_id"),
        ("1starts-with-digit", b"v", "NAME_INVALID", "secret_id"),
        ("has.dot", b"v", "NAME_INVALID", "secret_id"),
        ("x" * 64, b"v", "NAME_INVALID", "secret_id"),
        ("empty", b"", "ARGUMENT_INVALID", "value"),
        ("large", b"L" * (MAX_VALUE_BYTES + 1), "ARGUMENT_INVALID", "value"),
    ],
)
async def test_bad_secrets_are_refused_naming_the_field_never_the_value(
    admin: Stubs, secret_id: str, value: bytes, reason: str, field: str
) -> None:
    refused = await failure(_set(admin, secret_id, value))
    assert (refused.code, refused.reason, refused.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        reason,
        [field],
    )
    if field == "value" and value:
        assert value[:16].decode() not in refused.message


async def test_the_largest_value_and_a_63_character_id_are_kept(admin: Stubs) -> None:
    value = bytes(range(256)) * (MAX_VALUE_BYTES // 256)
    secret = await _set(admin, "a" * 63, value)
    assert await _read_back(admin, secret.name) == value


async def test_no_read_and_no_stored_byte_holds_a_value(
    registry: Registry, admin: Stubs, tmp_path: Path
) -> None:
    value = _value()
    response = await admin.secrets.SetSecret(
        secrets_pb2.SetSecretRequest(parent=PROJECT, secret_id="token", value=value)
    )
    assert value not in response.SerializeToString()
    listed = await admin.secrets.ListSecrets(secrets_pb2.ListSecretsRequest(parent=PROJECT))
    assert [secret.name for secret in listed.secrets] == [f"{PROJECT}/secrets/token"]
    assert value not in listed.SerializeToString()

    # Every row of every table of the registry, whatever its type.
    async with registry.database.engine.connect() as connection:
        tables = await connection.run_sync(lambda sync: sa.inspect(sync).get_table_names())
        assert "registry_secrets" in tables
        for table in tables:
            for row in await connection.execute(sa.text(f"SELECT * FROM {table}")):
                for cell in row:
                    stored = cell if isinstance(cell, bytes) else str(cell).encode()
                    assert value not in stored, f"{table} holds the value"
                    assert value[:20] not in stored, f"{table} holds the value"

    # Every file the test's registry wrote: the SQLite database and its journal, the home directory.
    files = [path for path in tmp_path.rglob("*") if path.is_file()]  # noqa: ASYNC240
    if registry.settings.database_url and registry.settings.database_url.startswith("sqlite"):
        assert any(path.name.startswith("registry.db") for path in files)
    for path in files:
        assert value[:20] not in path.read_bytes(), f"{path} holds the value"
    assert await _read_back(admin, response.secret.name) == value


async def _mint(admin: Stubs, secrets: list[str], run: str = "projects/vault/runs/r1") -> str:
    response = await admin.keys.MintRunToken(
        keys_pb2.MintRunTokenRequest(
            run=run,
            item="projects/vault/queues/gpu/items/i1",
            job_version="projects/vault/jobs/train/versions/0",
            secrets=secrets,
        )
    )
    return response.secret


async def _create_key(admin: Stubs, key: keys_pb2.Key) -> str:
    return (await admin.keys.CreateKey(keys_pb2.CreateKeyRequest(key=key))).secret


async def test_only_run_tokens_listing_a_secret_may_access_it(registry: Registry, admin: Stubs) -> None:
    value = _value()
    given = (await _set(admin, "given", value)).name
    other = (await _set(admin, "not_given", b"other")).name

    token = await _mint(admin, [given])
    async with _stubs(registry, token) as run:
        assert await _access(run, given) == value
        refused = await failure(run.secrets.AccessSecret(secrets_pb2.AccessSecretRequest(name=other)))
        assert (refused.code, refused.metadata["permission"]) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "secrets.access",
        )
        # A run token may not list or change secrets either.
        for call in (
            run.secrets.ListSecrets(secrets_pb2.ListSecretsRequest(parent=PROJECT)),
            run.secrets.SetSecret(secrets_pb2.SetSecretRequest(parent=PROJECT, secret_id="x", value=b"v")),
            run.secrets.DeleteSecret(secrets_pb2.DeleteSecretRequest(name=given)),
        ):
            assert (await failure(call)).code == grpc.StatusCode.PERMISSION_DENIED

    not_listing = await _mint(admin, [other])
    project_writer = await _create_key(
        admin,
        keys_pb2.Key(kind=keys_pb2.KEY_KIND_PROJECT, projects=[PROJECT], role=keys_pb2.PROJECT_ROLE_WRITE),
    )
    agent = await _create_key(
        admin, keys_pb2.Key(kind=keys_pb2.KEY_KIND_AGENT, queues=["projects/vault/queues/gpu"])
    )
    for key in (ADMIN_KEY, not_listing, project_writer, agent):
        async with _stubs(registry, key) as caller:
            refused = await failure(caller.secrets.AccessSecret(secrets_pb2.AccessSecretRequest(name=given)))
            assert (refused.code, refused.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
            assert refused.metadata["permission"] == "secrets.access"
            assert value[:20].decode(errors="replace") not in refused.message

    # A project key with write sets, lists and deletes its project's secrets, without reading a value.
    async with _stubs(registry, project_writer) as writer:
        written = await _set(writer, "by_project_key", b"v")
        assert written.name in await _list(writer)
        await writer.secrets.DeleteSecret(secrets_pb2.DeleteSecretRequest(name=written.name))
        elsewhere = await failure(_set(writer, "x", b"v", parent="projects/elsewhere"))
        assert elsewhere.code == grpc.StatusCode.PERMISSION_DENIED


async def test_a_registry_restarted_on_its_home_still_reads_its_secrets(
    database_url: str, tmp_path: Path
) -> None:
    settings = registry_settings(tmp_path / "home", database_url)
    value = _value()
    async for registry in start_registry(settings):
        async with _stubs(registry, ADMIN_KEY) as admin:
            name = (await _set(admin, "kept", value)).name
    async for registry in start_registry(settings):
        async with _stubs(registry, ADMIN_KEY) as admin:
            assert await _read_back(admin, name) == value


async def test_a_value_under_another_key_or_moved_to_another_secret_is_never_returned(
    registry: Registry, admin: Stubs
) -> None:
    value = _value()
    moved = await _set(admin, "source", value)
    target = await _set(admin, "target", b"target's own value")
    store = RegistryStore(registry.database)

    with pytest.raises(SecretUnreadable) as unreadable:
        await Secrets(store, Fernet.generate_key()).access(SecretKey("vault", "source"))
    assert value[:20].decode(errors="replace") not in str(unreadable.value)

    # Whoever can write the database copies one secret's ciphertext onto another: it does not decrypt as it.
    async with registry.database.engine.begin() as connection:
        await connection.execute(
            sa.text(
                "UPDATE registry_secrets SET ciphertext = (SELECT ciphertext FROM registry_secrets "
                "WHERE project_id = 'vault' AND secret_id = 'source') "
                "WHERE project_id = 'vault' AND secret_id = 'target'"
            )
        )
    async with _given(admin, target.name) as run:
        refused = await failure(run.secrets.AccessSecret(secrets_pb2.AccessSecretRequest(name=target.name)))
    assert (refused.code, refused.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SECRET_UNREADABLE")
    assert "secrets_key_file" in refused.message
    assert value[:20].decode(errors="replace") not in refused.message
    assert await _read_back(admin, moved.name) == value


def test_the_secrets_key_file_is_made_once_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "home" / "secrets.key"
    key = load_secrets_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    Fernet(key.strip())  # a valid Fernet key
    assert load_secrets_key(path) == key
    assert [p.name for p in path.parent.iterdir()] == ["secrets.key"]  # no partial file left


def test_a_bad_secrets_key_is_refused_without_quoting_it() -> None:
    with pytest.raises(ValueError, match="not valid") as refused:
        Secrets(None, b"not-a-fernet-key")  # type: ignore[arg-type]
    assert "not-a-fernet-key" not in str(refused.value)
    with pytest.raises(ValueError, match="empty"):
        Secrets(None, b"\n  \n")  # type: ignore[arg-type]


def test_a_key_file_with_several_keys_decrypts_with_each_and_encrypts_with_the_first() -> None:
    old, new = Fernet.generate_key(), Fernet.generate_key()
    token = Fernet(old).encrypt(b"x")
    rotated = Secrets(None, new + b"\n" + old + b"\n")  # type: ignore[arg-type]
    assert rotated._cipher.decrypt(token) == b"x"
    assert Fernet(new).decrypt(rotated._cipher.encrypt(b"y")) == b"y"
