"""Who may call what: permissions, the grants a key carries, and the access rule each RPC states.

Plain Python, no gRPC: the server's access interceptor (``takeoff_server.interceptors``) authenticates a
call into a :class:`Principal` and checks the method's :class:`Rule` against every request message; domain
code reads the caller from :data:`caller_var` (to record who enqueued or cancelled). The permission each
RPC needs is tabled in docs/design.md §13; each service states its rules next to its servicer
(``access.py``), and the server refuses to start with a method that has none.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, Protocol

from takeoff_server import errors


class Permission(StrEnum):
    """One action on one kind of resource; a grant gives it within a scope (a resource name prefix)."""

    JOBS_READ = "jobs.read"
    JOBS_WRITE = "jobs.write"
    RUNS_READ = "runs.read"
    RUNS_WRITE = "runs.write"
    ARTIFACTS_READ = "artifacts.read"
    """Named artifacts (ArtifactService): read versions and their files."""
    ARTIFACTS_WRITE = "artifacts.write"
    """Log new versions of named artifacts."""
    QUEUES_READ = "queues.read"
    QUEUES_WRITE = "queues.write"
    ITEMS_WRITE = "items.write"
    """Enqueue, cancel and relaunch items."""
    QUEUES_LEASE = "queues.lease"
    """Hold a Lease stream serving a queue."""
    BUILDS_READ = "builds.read"
    BUILDS_WRITE = "builds.write"
    SECRETS_READ = "secrets.read"
    """List secret names; values are never read back."""
    SECRETS_WRITE = "secrets.write"
    SECRETS_ACCESS = "secrets.access"
    """Read a secret's value: run tokens only, for the secrets their attempt was given."""
    KEYS_READ = "keys.read"
    KEYS_WRITE = "keys.write"
    KEYS_VERIFY = "keys.verify"
    TOKENS_MINT = "tokens.mint"
    """Mint and revoke run tokens."""
    AGENTS_READ = "agents.read"
    AGENTS_WRITE = "agents.write"
    """Drain an agent (AgentService)."""


class KeyKind(IntEnum):
    """What a key is for (proto ``takeoff.v1.KeyKind``, same numbers)."""

    ADMIN = 1
    PROJECT = 2
    AGENT = 3
    SERVICE = 4
    RUN = 5


class ProjectRole(IntEnum):
    """What a project key may do in its projects (proto ``takeoff.v1.ProjectRole``)."""

    READ = 1
    WRITE = 2


class ServiceRole(IntEnum):
    """Which service a service key is for (proto ``takeoff.v1.ServiceRole``)."""

    QUEUE = 1
    BUILDER = 2
    CONSOLE = 3


EVERYWHERE = "*"
"""The scope of a grant that covers every resource, including names outside any project."""


def _covers(scope: str, resource: str) -> bool:
    return scope in (EVERYWHERE, resource) or resource.startswith(scope + "/")


@dataclass(frozen=True, slots=True)
class Grant:
    """``permission`` on ``scope``: every resource named ``scope`` or under it (``projects/a`` covers
    ``projects/a/jobs/x``), or every resource when the scope is :data:`EVERYWHERE`."""

    permission: Permission
    scope: str

    def covers(self, resource: str) -> bool:
        return _covers(self.scope, resource)

    def __str__(self) -> str:
        return f"{self.permission} on {self.scope}"


@dataclass(frozen=True, slots=True)
class KeyScope:
    """What a key was created for; :func:`grants_for` turns it into grants."""

    kind: KeyKind
    projects: tuple[str, ...] = ()
    role: ProjectRole | None = None
    queues: tuple[str, ...] = ()
    service: ServiceRole | None = None
    run: str = ""
    job_version: str = ""
    secrets: tuple[str, ...] = ()


_PROJECT_READ = (
    Permission.JOBS_READ,
    Permission.RUNS_READ,
    Permission.ARTIFACTS_READ,
    Permission.QUEUES_READ,
    Permission.SECRETS_READ,
)
_PROJECT_WRITE = (
    *_PROJECT_READ,
    Permission.JOBS_WRITE,
    Permission.RUNS_WRITE,
    Permission.ARTIFACTS_WRITE,
    Permission.QUEUES_WRITE,
    Permission.ITEMS_WRITE,
    Permission.SECRETS_WRITE,
)
_RUN_TOKEN_ONLY = frozenset({Permission.SECRETS_ACCESS})
"""Not even an admin key reads a secret's value back: only the run token of an attempt given it."""
_SERVICE_PERMISSIONS: Mapping[ServiceRole, tuple[Permission, ...]] = {
    ServiceRole.QUEUE: (
        Permission.KEYS_VERIFY,
        Permission.JOBS_READ,
        Permission.RUNS_READ,
        Permission.RUNS_WRITE,
        Permission.TOKENS_MINT,
    ),
    ServiceRole.BUILDER: (Permission.KEYS_VERIFY, Permission.JOBS_READ),
    ServiceRole.CONSOLE: (Permission.KEYS_VERIFY,),
}


def project_of(name: str) -> str:
    """``projects/{p}`` of a project-scoped resource name, else the name itself."""
    parts = name.split("/", 2)
    return "/".join(parts[:2]) if len(parts) >= 2 and parts[0] == "projects" else name


def grants_for(scope: KeyScope) -> frozenset[Grant]:
    """The grants a key of ``scope`` carries (docs/design.md §13, "Key kinds")."""
    match scope.kind:
        case KeyKind.ADMIN:
            return frozenset(Grant(p, EVERYWHERE) for p in Permission if p not in _RUN_TOKEN_ONLY)
        case KeyKind.PROJECT:
            permissions: tuple[Permission, ...] = (
                _PROJECT_WRITE if scope.role == ProjectRole.WRITE else _PROJECT_READ
            )
            return frozenset(Grant(p, project) for project in scope.projects for p in permissions)
        case KeyKind.AGENT:
            projects = {project_of(queue) for queue in scope.queues}
            per_queue = (Permission.QUEUES_LEASE, Permission.QUEUES_READ)
            per_project = (Permission.JOBS_READ, Permission.BUILDS_WRITE)
            return frozenset(
                {Grant(Permission.KEYS_VERIFY, EVERYWHERE), Grant(Permission.BUILDS_READ, EVERYWHERE)}
                | {Grant(p, queue) for queue in scope.queues for p in per_queue}
                | {Grant(p, project) for project in projects for p in per_project}
            )
        case KeyKind.SERVICE:
            permissions = _SERVICE_PERMISSIONS.get(scope.service, ()) if scope.service else ()
            return frozenset(Grant(p, EVERYWHERE) for p in permissions)
        case KeyKind.RUN:
            # Its own run's artifacts to write, its project's to read (a checkpoint of an earlier attempt).
            return frozenset(
                {Grant(Permission.RUNS_READ, scope.run), Grant(Permission.RUNS_WRITE, scope.run)}
                | {Grant(Permission.ARTIFACTS_READ, project_of(scope.run))}
                | {Grant(Permission.ARTIFACTS_WRITE, scope.run)}
                | ({Grant(Permission.JOBS_READ, scope.job_version)} if scope.job_version else set())
                | {Grant(Permission.SECRETS_ACCESS, secret) for secret in scope.secrets}
            )


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: the key it presented (never its secret) and what the key may do."""

    name: str
    """``keys/{key}``."""
    display_name: str
    kind: KeyKind
    grants: frozenset[Grant] = field(default_factory=frozenset)
    _scopes: Mapping[Permission, tuple[str, ...]] = field(init=False, repr=False, compare=False)
    """The grants by permission: a check looks up one permission instead of scanning every grant."""

    def __post_init__(self) -> None:
        scopes: dict[Permission, list[str]] = {}
        for grant in self.grants:
            scopes.setdefault(grant.permission, []).append(grant.scope)
        object.__setattr__(self, "_scopes", {p: tuple(s) for p, s in scopes.items()})

    @property
    def actor(self) -> str:
        """How item histories name the caller."""
        return f"{self.name} ({self.display_name})" if self.display_name else self.name

    def holds(self, permission: Permission) -> bool:
        return permission in self._scopes

    def allows(self, permission: Permission, resource: str) -> bool:
        return any(_covers(scope, resource) for scope in self._scopes.get(permission, ()))

    def require(self, permission: Permission, resource: str | None = None) -> None:
        """Raise ``PermissionDenied`` naming ``permission`` unless this caller has it on ``resource``
        (anywhere, when ``resource`` is None)."""
        allowed = self.holds(permission) if resource is None else self.allows(permission, resource)
        if allowed:
            return
        where = f" on {resource}" if resource is not None else ""
        raise errors.PermissionDenied(
            "PERMISSION_DENIED",
            f"{self.name} lacks the permission {permission}{where}",
            metadata={"permission": str(permission), **({"resource": resource} if resource else {})},
        )


caller_var: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("takeoff_caller", default=None)
"""The caller of the call being served; None for the public methods (health, reflection)."""


def current_actor() -> str:
    """The caller as item histories record it; empty outside a call."""
    caller = caller_var.get()
    return caller.actor if caller is not None else ""


class KeyVerifier(Protocol):
    """Says which live key a presented secret is, or None for an unknown or revoked one.

    Raises ``errors.Unavailable`` when it cannot tell (the registry is unreachable): the call is then
    refused as retryable, not as unauthenticated.
    """

    async def verify(self, secret: str) -> Principal | None: ...


VERIFY_CACHE_SECONDS = 2.0
"""How long a verification is trusted: a revocation reaches every service within this, plus the stream
recheck for open streams."""
OUTAGE_GRACE_SECONDS = 60.0
"""While the verifier cannot be reached, a key verified this recently is still admitted: a registry
restart must cost time, not refuse every agent and job that was working."""


class CachedVerifier:
    """A :class:`KeyVerifier` that remembers answers for :data:`VERIFY_CACHE_SECONDS`, keyed by the
    secret's digest (so no secret is held), and bridges outages of the one it wraps. Concurrent checks of
    one key make one call (single flight): a hundred agents reconnecting with one key after a restart, or a
    burst of calls when its answer runs out, ask the registry once."""

    def __init__(
        self,
        inner: KeyVerifier,
        *,
        ttl: float = VERIFY_CACHE_SECONDS,
        outage_grace: float = OUTAGE_GRACE_SECONDS,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner = inner
        self._ttl = ttl
        self._outage_grace = outage_grace
        self._max_entries = max_entries
        self._clock = clock
        self._answers: dict[str, tuple[float, Principal | None]] = {}
        self._asking: dict[str, asyncio.Future[Principal | None]] = {}

    async def verify(self, secret: str) -> Principal | None:
        digest = secret_digest(secret)
        cached = self._answers.get(digest)
        if cached is not None and self._clock() - cached[0] < self._ttl:
            return cached[1]
        flight = self._asking.get(digest)
        if flight is None:
            flight = self._asking[digest] = asyncio.ensure_future(self._ask(secret, digest))
            flight.add_done_callback(lambda done: self._landed(digest, done))
        return await asyncio.shield(flight)  # one caller giving up does not cancel the others' answer

    def _landed(self, digest: str, flight: asyncio.Future[Principal | None]) -> None:
        del self._asking[digest]
        if not flight.cancelled():
            flight.exception()  # seen, so that a failure whose every caller gave up is not logged as lost

    async def _ask(self, secret: str, digest: str) -> Principal | None:
        now = self._clock()
        cached = self._answers.get(digest)
        try:
            answer = await self._inner.verify(secret)
        except errors.Unavailable:
            if cached is not None and cached[1] is not None and now - cached[0] < self._outage_grace:
                return cached[1]
            raise
        if len(self._answers) >= self._max_entries:
            self._answers.clear()  # a flood of bad keys must not grow memory; live ones re-verify once
        self._answers[digest] = (now, answer)
        return answer


def secret_digest(secret: str) -> str:
    """The stored form of a key's secret: SHA-256, hex. Keys carry 256 random bits, so a fast hash is as
    safe as a slow one (nothing to brute-force) and keeps an uncached check in microseconds."""
    return hashlib.sha256(secret.encode()).hexdigest()


Resources = Callable[[Any], Iterable[str]]
"""The resource names a request message touches, for one check."""


@dataclass(frozen=True, slots=True)
class Check:
    """The caller needs ``permission`` (somewhere), and on each name ``resources(request)`` gives."""

    permission: Permission
    resources: Resources | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    """What a caller needs to call one method: every check, on every request message (a request
    stream's messages one by one)."""

    checks: tuple[Check, ...]

    def enforce(self, caller: Principal, request: Any) -> None:
        for check in self.checks:
            caller.require(check.permission)
            for resource in check.resources(request) if check.resources else ():
                if resource and not caller.allows(check.permission, resource):
                    # An empty name names nothing: the servicer refuses it as invalid.
                    caller.require(check.permission, resource)


def needs(permission: Permission, resources: Resources | None = None) -> Rule:
    """A rule of one check."""
    return Rule((Check(permission, resources),))


def fields(*names: str) -> Resources:
    """Resources taken from request fields (strings, or repeated strings), e.g. ``fields("name")``."""

    def resources(request: Any) -> Iterable[str]:
        for name in names:
            value = getattr(request, name)
            if isinstance(value, str):
                yield value
            else:
                yield from value

    return resources


def constant(*names: str) -> Resources:
    """Resources that are always the same, for methods whose request names none (``builds``)."""
    return lambda _request: names


AccessRules = Mapping[str, Rule]
"""A service's rules by method name (``CreateJob``), as its ``access.py`` states them."""


def missing_rules(method_names: Sequence[str], rules: AccessRules) -> list[str]:
    """The methods of a service that have no rule."""
    return [name for name in method_names if name not in rules]
