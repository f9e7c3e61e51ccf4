"""API keys and run tokens: KeyService's rules, without gRPC or SQL (docs/design.md §13).

A key is a random secret, ``tko_{key_id}_{43 url-safe characters}`` (256 random bits), shown once (by
CreateKey or MintRunToken) and stored only as its SHA-256 digest (:func:`takeoff_server.access.
secret_digest`): the digest finds the key when the secret is presented, and a leaked table cannot be turned
back into secrets. What a key may do follows from its kind and scope (:func:`grants_for`); the registry's
own calls verify keys here, the other services through VerifyKey.

Most run tokens are not stored at all: the queue signs them itself (:mod:`takeoff_server.run_tokens`) with
a key pair whose public half it registered here as a :class:`Signer`. Such a token is valid while its
signature checks, the key that registered its signer is live, and its run's tokens are not revoked.
"""

from __future__ import annotations

import hashlib
import re
import secrets as random_secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Protocol

from takeoff_registry.refs import JOB_VERSION, PROJECT, QUEUE_ITEM, RUN
from takeoff_server.access import (
    KeyKind,
    KeyScope,
    Principal,
    ProjectRole,
    ServiceRole,
    caller_var,
    grants_for,
    secret_digest,
)
from takeoff_server.errors import AlreadyExists, InvalidArgument, NotFound, ServiceFailed
from takeoff_server.names import NAME_INVALID, ResourcePattern
from takeoff_server.pagination import PageRequest
from takeoff_server.run_tokens import TOKEN_KEY_ID, SignedToken, read_signed, valid_public_key
from takeoff_server.validation import Problems, text_problem

KEY_ID_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,62}")
KEY_ID_RULE = "1-63 characters of a-z, 0-9 and '-', starting with a letter"
KEY = ResourcePattern("keys/{key}", key=KEY_ID_PATTERN.pattern)
QUEUE = ResourcePattern("projects/{project}/queues/{queue}")
SECRET = ResourcePattern("projects/{project}/secrets/{secret}", secret=r"[A-Za-z][A-Za-z0-9_-]{0,62}")
SIGNER = ResourcePattern("runTokenSigners/{signer}", signer=KEY_ID_PATTERN.pattern)

MAX_DISPLAY_NAME = 200
MAX_SCOPE_NAMES = 100
"""Projects of a project key, queues of an agent key, secrets of a run token."""
MAX_REVOKED_RUNS = 1000
"""Runs of one BatchRevokeRunTokens."""
SECRET_PREFIX = "tko_"
MIN_BOOTSTRAP_SECRET_CHARS = 32
BOOTSTRAP_KEY_ID = "bootstrap-admin"
BOOTSTRAP_CREATOR = "bootstrap"
MAX_VERIFIED_SIGNED_TOKENS = 10_000
"""Signed tokens whose signature was checked, kept so that a job's every call costs no second check."""
_HINT = re.compile(rf"{SECRET_PREFIX}[a-z][a-z0-9-]{{0,62}}_")


@dataclass(frozen=True, slots=True)
class Key:
    """A key as stored, without its secret."""

    key_id: str
    display_name: str
    scope: KeyScope
    item: str
    """Run tokens: the attempt's item."""
    secret_hint: str
    creator: str
    create_time: datetime
    revoke_time: datetime | None = None

    @property
    def name(self) -> str:
        return KEY.format(key=self.key_id)

    @property
    def live(self) -> bool:
        return self.revoke_time is None

    @property
    def permissions(self) -> list[str]:
        """``permission on scope``, one per grant, sorted."""
        return sorted(str(grant) for grant in grants_for(self.scope))

    def principal(self) -> Principal:
        return Principal(self.name, self.display_name, self.scope.kind, grants_for(self.scope))


@dataclass(frozen=True, slots=True)
class KeySpec:
    """What CreateKey asks for; enum fields are the proto numbers as sent (0 = unset), checked here."""

    kind: int
    display_name: str = ""
    projects: Sequence[str] = ()
    role: int = 0
    queues: Sequence[str] = ()
    service: int = 0


@dataclass(frozen=True, slots=True)
class Signer:
    """A queue's run-token signing key as registered: its public half, and the key that registered it."""

    signer_id: str
    public_key: bytes
    creator_key_id: str
    create_time: datetime

    @property
    def name(self) -> str:
        return SIGNER.format(signer=self.signer_id)

    @property
    def creator(self) -> str:
        return KEY.format(key=self.creator_key_id) if self.creator_key_id else ""


class KeyStore(Protocol):
    """Where keys live (``takeoff_registry.keys_store``)."""

    async def insert(self, key: Key, digest: str) -> bool:
        """Store ``key``; False (nothing stored) when its id or its digest is taken."""
        ...

    async def get(self, key_id: str) -> Key | None: ...

    async def by_digest(self, digest: str) -> Key | None: ...

    async def page(
        self, *, after: tuple[str, str] | None, limit: int, show_revoked: bool, show_run_tokens: bool
    ) -> list[Key]:
        """Keys ordered by (create time, id), after the cursor (create time in ISO form, id)."""
        ...

    async def revoke(self, key_id: str, now: datetime) -> Key | None:
        """Set the revoke time unless set; the key after that, None when there is no such key."""
        ...

    async def revoke_run_tokens(self, runs: Sequence[str], now: datetime) -> int:
        """Revoke the tokens of ``runs`` for good, the signed ones included, in one transaction; how many
        stored ones were live."""
        ...

    async def insert_signer(self, signer: Signer) -> bool:
        """Store ``signer``; False (nothing stored) when its id is taken."""
        ...

    async def signer(self, signer_id: str) -> Signer | None: ...

    async def signed_token_live(self, creator_key_id: str, run: str) -> bool:
        """Whether the key that registered a token's signer is live and the token's run is not revoked."""
        ...


def _now() -> datetime:
    return datetime.now(UTC)


def _new_secret(key_id: str) -> str:
    return f"{SECRET_PREFIX}{key_id}_{random_secrets.token_urlsafe(32)}"


def _hint(secret: str) -> str:
    """The ``tko_{key_id}_`` start of a secret of that form, followed by at least 32 more characters;
    empty for any other (a bootstrap file's), so that a hint never gives away much of a secret."""
    matched = _HINT.match(secret)
    if matched is None or len(secret) - matched.end() < MIN_BOOTSTRAP_SECRET_CHARS:
        return ""
    return matched.group(0)


def _member(enum_type: type[IntEnum], number: int) -> IntEnum | None:
    try:
        return enum_type(number)
    except ValueError:
        return None


def _allowed(enum_type: type[IntEnum]) -> str:
    return ", ".join(f"{member.name} ({member.value})" for member in enum_type)


def _key_not_found(name: str) -> NotFound:
    message = f"key {name} does not exist"
    if TOKEN_KEY_ID.fullmatch(name.removeprefix("keys/")):
        message += " here: a run token the queue signed is stored nowhere; RevokeRunTokens revokes its run's"
    return NotFound("KEY_NOT_FOUND", message, metadata={"resource": name})


def key_id_of(name: str, *, field: str = "name") -> str:
    return KEY.parse(name, field=field)["key"]


def _names(
    problems: Problems,
    values: Sequence[str],
    pattern: ResourcePattern,
    *,
    field: str,
    what: str,
    required: bool,
) -> tuple[str, ...]:
    """``values`` checked against ``pattern``, duplicates dropped, order kept."""
    if required and not values:
        problems.add("ARGUMENT_INVALID", field, f"at least one {what} is required, {pattern.template}")
    if len(values) > MAX_SCOPE_NAMES:
        problems.add("ARGUMENT_INVALID", field, f"at most {MAX_SCOPE_NAMES} are allowed (got {len(values)})")
    for index, value in enumerate(values[:MAX_SCOPE_NAMES]):
        with problems.collect():
            pattern.parse(value, field=f"{field}[{index}]")
    return tuple(dict.fromkeys(values))


def _run_token_scope(run: str, item: str, job_version: str, secrets: Sequence[str]) -> KeyScope:
    """The scope of a run token for ``run``; ``InvalidArgument`` naming each field that is wrong."""
    problems = Problems()
    run_project = ""
    with problems.collect():
        run_project = RUN.parse(run, field="run")["project"]
    with problems.collect():
        QUEUE_ITEM.parse(item, field="item")
    with problems.collect():
        JOB_VERSION.parse(job_version, field="job_version")
    listed = _names(problems, secrets, SECRET, field="secrets", what="secret", required=False)
    for index, secret in enumerate(secrets[:MAX_SCOPE_NAMES]):
        matched = SECRET.match(secret)
        if matched is not None and run_project and matched["project"] != run_project:
            problems.add(
                "ARGUMENT_INVALID",
                f"secrets[{index}]",
                f"is not in the run's project projects/{run_project}",
            )
    problems.raise_if_any()
    return KeyScope(kind=KeyKind.RUN, run=run, job_version=job_version, secrets=listed)


def _unused(problems: Problems, field: str, present: bool, kind: str) -> None:
    if present:
        problems.add("ARGUMENT_INVALID", field, f"is not used by {kind} keys; leave it empty")


class Keys:
    """Creates, lists, revokes and verifies keys; mints and revokes run tokens."""

    def __init__(self, store: KeyStore) -> None:
        self._store = store
        self._signers: dict[str, Signer] = {}
        """A signer never changes once registered."""
        self._signed_keys: dict[str, Key] = {}
        """Signed tokens whose signature checked, by their secret's digest."""

    async def create(self, spec: KeySpec, *, key_id: str = "") -> tuple[Key, str]:
        """A new key and its secret (returned here only)."""
        problems = Problems()
        if key_id and not KEY_ID_PATTERN.fullmatch(key_id):
            problems.add(NAME_INVALID, "key_id", f"key id {key_id[:80]!r} must be {KEY_ID_RULE}")
        if problem := text_problem(spec.display_name, max_chars=MAX_DISPLAY_NAME):
            problems.add("ARGUMENT_INVALID", "key.display_name", problem)
        kind = _member(KeyKind, spec.kind)
        role = _member(ProjectRole, spec.role) if spec.role else None
        service = _member(ServiceRole, spec.service) if spec.service else None
        projects: tuple[str, ...] = ()
        queues: tuple[str, ...] = ()
        if kind is None or kind == KeyKind.RUN:
            why = (
                "run tokens are minted by MintRunToken, not created"
                if kind == KeyKind.RUN
                else f"is required, one of {_allowed(KeyKind).replace(', RUN (5)', '')}"
            )
            problems.add("ARGUMENT_INVALID", "key.kind", why)
        elif kind == KeyKind.PROJECT:
            projects = _names(
                problems, spec.projects, PROJECT, field="key.projects", what="project", required=True
            )
            if role is None:
                problems.add("ARGUMENT_INVALID", "key.role", f"is required, one of {_allowed(ProjectRole)}")
        elif kind == KeyKind.AGENT:
            queues = _names(problems, spec.queues, QUEUE, field="key.queues", what="queue", required=True)
        elif kind == KeyKind.SERVICE and service is None:
            problems.add("ARGUMENT_INVALID", "key.service", f"is required, one of {_allowed(ServiceRole)}")
        if kind is not None and kind != KeyKind.RUN:
            label = kind.name.lower()
            _unused(problems, "key.projects", bool(spec.projects) and kind != KeyKind.PROJECT, label)
            _unused(problems, "key.role", bool(spec.role) and kind != KeyKind.PROJECT, label)
            _unused(problems, "key.queues", bool(spec.queues) and kind != KeyKind.AGENT, label)
            _unused(problems, "key.service", bool(spec.service) and kind != KeyKind.SERVICE, label)
        problems.raise_if_any()
        assert kind is not None
        scope = KeyScope(
            kind=KeyKind(kind),
            projects=projects,
            role=ProjectRole(role) if role is not None else None,
            queues=queues,
            service=ServiceRole(service) if service is not None else None,
        )
        return await self._insert(scope, key_id=key_id, display_name=spec.display_name)

    async def _insert(
        self, scope: KeyScope, *, key_id: str, display_name: str, item: str = ""
    ) -> tuple[Key, str]:
        caller = caller_var.get()
        creator = caller.name if caller is not None else ""
        while True:
            chosen = (
                key_id or f"{'run' if scope.kind == KeyKind.RUN else 'key'}-{random_secrets.token_hex(6)}"
            )
            secret = _new_secret(chosen)
            key = Key(
                key_id=chosen,
                display_name=display_name,
                scope=scope,
                item=item,
                secret_hint=_hint(secret),
                creator=creator,
                create_time=_now(),
            )
            if await self._store.insert(key, secret_digest(secret)):
                return key, secret
            if key_id:
                name = KEY.format(key=key_id)
                raise AlreadyExists(
                    "KEY_ALREADY_EXISTS", f"key {name} already exists", metadata={"resource": name}
                )
            # A generated id that is taken: draw another.

    async def get(self, name: str) -> Key:
        key = await self._store.get(key_id_of(name))
        if key is None:
            raise _key_not_found(name)
        return key

    async def list(
        self, page: PageRequest, *, show_revoked: bool, show_run_tokens: bool
    ) -> tuple[list[Key], bool]:
        """One page of keys, oldest first, and whether more follow."""
        after = (str(page.after[0]), str(page.after[1])) if page.after else None
        found = await self._store.page(
            after=after, limit=page.size + 1, show_revoked=show_revoked, show_run_tokens=show_run_tokens
        )
        return found[: page.size], len(found) > page.size

    async def revoke(self, name: str) -> Key:
        """Revoke the key; revoking a revoked key changes nothing."""
        key = await self._store.revoke(key_id_of(name), _now())
        if key is None:
            raise _key_not_found(name)
        return key

    async def lookup(self, secret: str) -> Key | None:
        """The live key whose secret this is."""
        if not secret:
            return None
        if (signed := read_signed(secret)) is not None:
            return await self._signed_key(secret, signed)
        key = await self._store.by_digest(secret_digest(secret))
        return key if key is not None and key.live else None

    async def _signed_key(self, secret: str, token: SignedToken) -> Key | None:
        signer = self._signers.get(token.signer_id)
        if signer is None:
            signer = await self._store.signer(token.signer_id)
            if signer is None:
                return None
            self._signers[signer.signer_id] = signer
        digest = secret_digest(secret)
        key = self._signed_keys.get(digest)
        if key is None:
            key = self._checked(secret, token, signer)
            if key is None:
                return None
            if len(self._signed_keys) >= MAX_VERIFIED_SIGNED_TOKENS:
                del self._signed_keys[next(iter(self._signed_keys))]
            self._signed_keys[digest] = key
        live = await self._store.signed_token_live(signer.creator_key_id, key.scope.run)
        return key if live else None

    @staticmethod
    def _checked(secret: str, token: SignedToken, signer: Signer) -> Key | None:
        """The key a signed token stands for, when ``signer`` signed it and its scope is one MintRunToken
        would have minted (a signer is trusted with no more than a minter)."""
        claims = token.verified_claims(signer.public_key)
        if claims is None:
            return None
        try:
            scope = _run_token_scope(claims.run, claims.item, claims.job_version, claims.secrets)
        except InvalidArgument:
            return None
        return Key(
            key_id=claims.key_id,
            display_name=f"run token of {claims.run}",
            scope=scope,
            item=claims.item,
            secret_hint=_hint(secret),
            creator=signer.creator,
            create_time=claims.issue_time,
        )

    async def verify(self, secret: str) -> Principal | None:
        """:class:`takeoff_server.access.KeyVerifier`: the caller a secret authenticates, if live."""
        key = await self.lookup(secret)
        return key.principal() if key is not None else None

    async def mint_run_token(
        self, run: str, item: str, job_version: str, secrets: Sequence[str]
    ) -> tuple[Key, str]:
        """A token that may write ``run``, read ``job_version`` and access ``secrets``."""
        scope = _run_token_scope(run, item, job_version, secrets)
        return await self._insert(scope, key_id="", display_name=f"run token of {run}", item=item)

    async def create_run_token_signer(self, public_key: bytes) -> Signer:
        """Register a queue's Ed25519 public key; the tokens it signs are valid while the caller's key is.
        The signer's id is the key's digest, so registering it again is the signer as stored: a queue
        re-registers now and then, which puts its signer back into a database restored from before it."""
        problems = Problems()
        if not valid_public_key(public_key):
            why = f"must be an Ed25519 public key, 32 raw bytes (got {len(public_key)} bytes)"
            problems.add("ARGUMENT_INVALID", "public_key", why)
        problems.raise_if_any()
        caller = caller_var.get()
        creator_key_id = caller.name.removeprefix("keys/") if caller is not None else ""
        signer = Signer(
            f"signer-{hashlib.sha256(public_key).hexdigest()[:16]}", public_key, creator_key_id, _now()
        )
        if await self._store.insert_signer(signer):
            return signer
        stored = await self._store.signer(signer.signer_id)
        assert stored is not None, "signers are never deleted"
        assert stored.public_key == public_key, "two keys whose SHA-256 digests share 64 bits"
        return stored

    async def revoke_run_tokens(self, run: str) -> int:
        RUN.parse(run, field="run")
        return await self._store.revoke_run_tokens([run], _now())

    async def batch_revoke_run_tokens(self, runs: Sequence[str]) -> int:
        problems = Problems()
        if not 1 <= len(runs) <= MAX_REVOKED_RUNS:
            problems.add("ARGUMENT_INVALID", "runs", f"must name 1-{MAX_REVOKED_RUNS} runs (got {len(runs)})")
        for index, run in enumerate(runs[:MAX_REVOKED_RUNS]):
            with problems.collect():
                RUN.parse(run, field=f"runs[{index}]")
        problems.raise_if_any()
        # In one order whoever calls: two batches sharing runs must not lock their rows in opposite orders.
        return await self._store.revoke_run_tokens(sorted(set(runs)), _now())

    async def bootstrap_admin(self, path: Path) -> tuple[Key, bool]:
        """Make the admin key whose secret ``path`` holds, unless it exists (any id, live or revoked: a
        revoked bootstrap key stays revoked); the key, and whether this call made it."""
        secret = read_bootstrap_secret(path)
        digest = secret_digest(secret)
        candidate = 1
        while True:
            existing = await self._store.by_digest(digest)
            if existing is not None:
                return existing, False
            key_id = BOOTSTRAP_KEY_ID if candidate == 1 else f"{BOOTSTRAP_KEY_ID}-{candidate}"
            key = Key(
                key_id=key_id,
                display_name="bootstrap admin key",
                scope=KeyScope(kind=KeyKind.ADMIN),
                item="",
                secret_hint=_hint(secret),
                creator=BOOTSTRAP_CREATOR,
                create_time=_now(),
            )
            if await self._store.insert(key, digest):
                return key, True
            candidate += 1  # the id is taken (or another registry just imported it: checked above)


def read_bootstrap_secret(path: Path) -> str:
    """The admin secret in ``path``; a start failure naming the file (never its content) when it cannot be
    read or is too short to be a secret."""
    try:
        secret = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        why = error.strerror if isinstance(error, OSError) else "it is not UTF-8 text"
        raise ServiceFailed(f"bootstrap_admin_key_file: cannot read {path}: {why}") from None
    if len(secret) < MIN_BOOTSTRAP_SECRET_CHARS:
        raise ServiceFailed(
            f"bootstrap_admin_key_file: {path} must hold a secret of at least {MIN_BOOTSTRAP_SECRET_CHARS} "
            f"characters (it holds {len(secret)}); make one with "
            "`python -c 'import secrets; print(\"tko_admin_\" + secrets.token_urlsafe(32))'`"
        )
    if any(character.isspace() for character in secret):
        raise ServiceFailed(f"bootstrap_admin_key_file: {path} must hold one secret without spaces")
    return secret
