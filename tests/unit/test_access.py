"""The access model without gRPC: what each key kind may do, scopes, rules on messages, the verifier's
cache and outage bridge, and per-key rate limits (fake clocks, no sleeping)."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from takeoff_server import errors
from takeoff_server.access import (
    EVERYWHERE,
    CachedVerifier,
    Grant,
    KeyKind,
    KeyScope,
    Permission,
    Principal,
    ProjectRole,
    ServiceRole,
    caller_var,
    constant,
    current_actor,
    fields,
    grants_for,
    missing_rules,
    needs,
    project_of,
    secret_digest,
)
from takeoff_server.rate_limits import Rate, RateLimiter

P = Permission


def permissions_on(scope: KeyScope, resource: str) -> set[Permission]:
    return {grant.permission for grant in grants_for(scope) if grant.covers(resource)}


# Scopes


@pytest.mark.parametrize(
    ("scope", "resource", "covered"),
    [
        ("projects/a", "projects/a", True),
        ("projects/a", "projects/a/jobs/x", True),
        ("projects/a", "projects/a/jobs/x/versions/1", True),
        ("projects/a", "projects/ab", False),
        ("projects/a", "projects/ab/jobs/x", False),
        ("projects/a", "projects", False),
        ("projects/a", "", False),
        ("projects/a/queues/q", "projects/a/queues/q/items/1", True),
        ("projects/a/queues/q", "projects/a/queues/q2", False),
        ("projects/a/queues/q", "projects/a", False),
        (EVERYWHERE, "builds/b", True),
        (EVERYWHERE, "projects/z/runs/r", True),
    ],
)
def test_a_grant_covers_its_scope_and_what_is_under_it_only(scope: str, resource: str, covered: bool) -> None:
    assert Grant(P.JOBS_READ, scope).covers(resource) is covered


def test_project_of_a_name() -> None:
    assert project_of("projects/a/queues/q/items/1") == "projects/a"
    assert project_of("projects/a") == "projects/a"
    assert project_of("builds/b") == "builds/b"
    assert project_of("projects") == "projects"


# What each kind may do


def test_an_admin_key_may_do_everything_everywhere_but_read_a_secrets_value() -> None:
    # A secret's value goes only to the attempt given it, through its run token (secrets.proto).
    assert grants_for(KeyScope(KeyKind.ADMIN)) == {
        Grant(p, EVERYWHERE) for p in Permission if p is not P.SECRETS_ACCESS
    }


def test_a_project_read_key_reads_its_projects_and_writes_nothing() -> None:
    scope = KeyScope(KeyKind.PROJECT, projects=("projects/a", "projects/b"), role=ProjectRole.READ)

    for project in ("projects/a", "projects/b/jobs/x"):
        assert permissions_on(scope, project) == {
            P.JOBS_READ,
            P.RUNS_READ,
            P.ARTIFACTS_READ,
            P.QUEUES_READ,
            P.SECRETS_READ,
        }
    assert permissions_on(scope, "projects/c") == set()
    assert permissions_on(scope, "keys/k") == set()


def test_a_project_write_key_reads_and_writes_its_projects_but_no_keys_leases_or_secret_values() -> None:
    scope = KeyScope(KeyKind.PROJECT, projects=("projects/a",), role=ProjectRole.WRITE)

    held = permissions_on(scope, "projects/a/queues/q")

    assert {P.JOBS_WRITE, P.RUNS_WRITE, P.QUEUES_WRITE, P.ITEMS_WRITE, P.SECRETS_WRITE, P.JOBS_READ} <= held
    assert {P.ARTIFACTS_READ, P.ARTIFACTS_WRITE} <= held
    assert held.isdisjoint(
        {P.QUEUES_LEASE, P.SECRETS_ACCESS, P.KEYS_READ, P.KEYS_WRITE, P.KEYS_VERIFY, P.TOKENS_MINT}
    )
    assert held.isdisjoint({P.AGENTS_READ, P.AGENTS_WRITE, P.BUILDS_READ, P.BUILDS_WRITE})
    assert permissions_on(scope, "projects/b") == set()


def test_a_project_key_without_a_role_only_reads() -> None:
    scope = KeyScope(KeyKind.PROJECT, projects=("projects/a",))
    assert P.JOBS_WRITE not in permissions_on(scope, "projects/a")


def test_an_agent_key_leases_its_queues_and_reads_and_builds_their_projects_jobs() -> None:
    scope = KeyScope(KeyKind.AGENT, queues=("projects/a/queues/gpu",))

    assert permissions_on(scope, "projects/a/queues/gpu") == {
        P.QUEUES_LEASE,
        P.QUEUES_READ,
        P.JOBS_READ,
        P.BUILDS_WRITE,
        P.KEYS_VERIFY,
        P.BUILDS_READ,
    }
    assert P.QUEUES_LEASE not in permissions_on(scope, "projects/a/queues/cpu")
    assert permissions_on(scope, "projects/a/jobs/x") >= {P.JOBS_READ, P.BUILDS_WRITE}
    assert permissions_on(scope, "projects/b/jobs/x") == {P.KEYS_VERIFY, P.BUILDS_READ}
    # Runs are written with each attempt's run token, never with the agent's own key.
    assert P.RUNS_WRITE not in permissions_on(scope, "projects/a/runs/r")
    assert P.ITEMS_WRITE not in permissions_on(scope, "projects/a/queues/gpu")


@pytest.mark.parametrize(
    ("service", "permissions"),
    [
        (ServiceRole.QUEUE, {P.KEYS_VERIFY, P.JOBS_READ, P.RUNS_READ, P.RUNS_WRITE, P.TOKENS_MINT}),
        (ServiceRole.BUILDER, {P.KEYS_VERIFY, P.JOBS_READ}),
        (ServiceRole.CONSOLE, {P.KEYS_VERIFY}),
        (None, set()),
    ],
)
def test_a_service_key_holds_what_its_service_needs_everywhere(
    service: ServiceRole | None, permissions: set[Permission]
) -> None:
    assert grants_for(KeyScope(KeyKind.SERVICE, service=service)) == {
        Grant(p, EVERYWHERE) for p in permissions
    }


def test_a_run_token_writes_its_run_reads_its_job_version_and_accesses_its_secrets_only() -> None:
    scope = KeyScope(
        KeyKind.RUN,
        run="projects/a/runs/r1",
        job_version="projects/a/jobs/j/versions/3",
        secrets=("projects/a/secrets/HF",),
    )

    # Artifacts: its own run's to write, its project's to read (ArtifactService).
    read = {P.ARTIFACTS_READ}
    assert (
        permissions_on(scope, "projects/a/runs/r1") == {P.RUNS_READ, P.RUNS_WRITE, P.ARTIFACTS_WRITE} | read
    )
    assert permissions_on(scope, "projects/a/runs/r2") == read
    assert permissions_on(scope, "projects/a/runs/r1x") == read
    assert permissions_on(scope, "projects/a/jobs/j/versions/3") == {P.JOBS_READ} | read
    assert permissions_on(scope, "projects/a/jobs/j/versions/2") == read
    assert permissions_on(scope, "projects/a/secrets/HF") == {P.SECRETS_ACCESS} | read
    assert permissions_on(scope, "projects/a/secrets/OTHER") == read
    assert permissions_on(scope, "projects/a/queues/q") == read  # cannot enqueue
    assert permissions_on(scope, "projects/b/artifactCollections/x") == set()
    assert P.ITEMS_WRITE not in {grant.permission for grant in grants_for(scope)}


def test_a_run_token_without_a_job_version_reads_no_job() -> None:
    scope = KeyScope(KeyKind.RUN, run="projects/a/runs/r1")
    assert {grant.permission for grant in grants_for(scope)} == {
        P.RUNS_READ,
        P.RUNS_WRITE,
        P.ARTIFACTS_READ,
        P.ARTIFACTS_WRITE,
    }


# Principals and rules


def principal(scope: KeyScope, name: str = "keys/k", display: str = "") -> Principal:
    return Principal(name, display, scope.kind, grants_for(scope))


READER = principal(KeyScope(KeyKind.PROJECT, projects=("projects/a",), role=ProjectRole.READ), "keys/r", "ci")


def denial(raised: pytest.ExceptionInfo[errors.PermissionDenied]) -> tuple[str, dict[str, str]]:
    return raised.value.reason, raised.value.metadata


def test_require_names_the_permission_and_the_resource() -> None:
    READER.require(P.JOBS_READ)
    READER.require(P.JOBS_READ, "projects/a/jobs/x")

    with pytest.raises(errors.PermissionDenied) as raised:
        READER.require(P.JOBS_WRITE)
    assert denial(raised) == ("PERMISSION_DENIED", {"permission": "jobs.write"})
    assert "keys/r lacks the permission jobs.write" in raised.value.message

    with pytest.raises(errors.PermissionDenied) as raised:
        READER.require(P.JOBS_READ, "projects/b/jobs/x")
    assert denial(raised) == (
        "PERMISSION_DENIED",
        {"permission": "jobs.read", "resource": "projects/b/jobs/x"},
    )


def test_the_actor_names_the_key_and_its_label() -> None:
    assert READER.actor == "keys/r (ci)"
    assert principal(KeyScope(KeyKind.ADMIN), "keys/a").actor == "keys/a"
    assert current_actor() == ""
    token = caller_var.set(READER)
    try:
        assert current_actor() == "keys/r (ci)"
    finally:
        caller_var.reset(token)


class Named:
    """A request with a string field and a repeated one, as generated messages have."""

    def __init__(self, name: str, names: list[str]) -> None:
        self.name = name
        self.names = names


def test_a_rule_checks_the_permission_and_every_resource_its_request_names() -> None:
    rule = needs(P.JOBS_READ, fields("name", "names"))

    rule.enforce(READER, Named("projects/a/jobs/x", ["projects/a/jobs/y", "projects/a"]))
    rule.enforce(READER, Named("", []))  # names nothing: the servicer refuses an empty name itself

    with pytest.raises(errors.PermissionDenied) as raised:
        rule.enforce(READER, Named("projects/a/jobs/x", ["projects/a/jobs/y", "projects/b/jobs/z"]))
    assert raised.value.metadata["resource"] == "projects/b/jobs/z"


def test_a_rule_of_constant_resources_needs_the_grant_on_them() -> None:
    builds = needs(P.BUILDS_READ, constant("builds"))
    agent = principal(KeyScope(KeyKind.AGENT, queues=("projects/a/queues/q",)))

    builds.enforce(agent, object())
    with pytest.raises(errors.PermissionDenied):
        builds.enforce(READER, object())


def test_missing_rules_lists_the_methods_without_one() -> None:
    rules = {"A": needs(P.JOBS_READ)}
    assert missing_rules(["A", "B", "C"], rules) == ["B", "C"]


def test_the_stored_form_of_a_secret_is_its_sha256() -> None:
    assert secret_digest("tko_k_abc") == hashlib.sha256(b"tko_k_abc").hexdigest()
    assert len(secret_digest("x")) == 64


# The cached verifier


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Registry:
    """What VerifyKey would answer; ``down`` as an unreachable registry."""

    def __init__(self) -> None:
        self.keys: dict[str, Principal] = {"good": READER}
        self.down = False
        self.asked: list[str] = []

    async def verify(self, secret: str) -> Principal | None:
        self.asked.append(secret)
        if self.down:
            raise errors.Unavailable("DEPENDENCY_UNAVAILABLE", "registry unreachable")
        return self.keys.get(secret)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry() -> Registry:
    return Registry()


async def test_an_answer_is_reused_for_the_ttl_then_asked_again(clock: FakeClock, registry: Registry) -> None:
    verifier = CachedVerifier(registry, ttl=2.0, clock=clock)

    assert await verifier.verify("good") is READER
    clock.now += 1.9
    assert await verifier.verify("good") is READER
    assert registry.asked == ["good"]

    del registry.keys["good"]  # revoked
    clock.now += 0.1
    assert await verifier.verify("good") is None
    assert registry.asked == ["good", "good"]


async def test_an_unknown_key_is_cached_too(clock: FakeClock, registry: Registry) -> None:
    verifier = CachedVerifier(registry, ttl=2.0, clock=clock)

    assert await verifier.verify("bad") is None
    assert await verifier.verify("bad") is None
    assert registry.asked == ["bad"]


async def test_an_outage_is_bridged_for_keys_verified_within_the_grace(
    clock: FakeClock, registry: Registry
) -> None:
    verifier = CachedVerifier(registry, ttl=2.0, outage_grace=60.0, clock=clock)
    assert await verifier.verify("good") is READER
    assert await verifier.verify("bad") is None

    registry.down = True
    clock.now += 30
    assert await verifier.verify("good") is READER  # asked, could not tell, served the recent answer
    with pytest.raises(errors.Unavailable):
        await verifier.verify("bad")  # a refusal is not bridged: the caller retries
    with pytest.raises(errors.Unavailable):
        await verifier.verify("never-seen")

    clock.now += 31  # past the grace, counted from the last real answer
    with pytest.raises(errors.Unavailable):
        await verifier.verify("good")

    registry.down = False
    assert await verifier.verify("good") is READER


async def test_the_cache_holds_digests_never_secrets_and_stays_bounded(
    clock: FakeClock, registry: Registry
) -> None:
    verifier = CachedVerifier(registry, ttl=2.0, clock=clock, max_entries=10)

    for n in range(25):
        await verifier.verify(f"flood-{n}")

    held = vars(verifier)["_answers"]
    assert 0 < len(held) <= 10
    assert all(len(key) == 64 and not key.startswith("flood") for key in held)


# Rate limits


def test_a_bucket_allows_its_burst_then_its_rate(clock: FakeClock) -> None:
    limiter = RateLimiter(Rate(per_second=10, burst=5), "enqueues", clock=clock)

    for _ in range(5):
        limiter.take("keys/a")
    with pytest.raises(errors.ResourceExhausted) as raised:
        limiter.take("keys/a")
    assert raised.value.reason == "RATE_LIMITED"
    assert raised.value.metadata == {"retry_after_seconds": "0.1", "limit": "enqueues"}
    assert "at most 10 per second" in raised.value.message

    limiter.take("keys/b")  # each key has its own bucket
    clock.now += 0.1
    limiter.take("keys/a")
    with pytest.raises(errors.ResourceExhausted):
        limiter.take("keys/a")


def test_a_refused_take_spends_nothing_and_a_big_one_waits_for_a_full_bucket(clock: FakeClock) -> None:
    limiter = RateLimiter(Rate(per_second=100, burst=50), "log lines", clock=clock)

    limiter.take("run", 40)
    with pytest.raises(errors.ResourceExhausted):
        limiter.take("run", 20)
    limiter.take("run", 10)  # the refused 20 took nothing
    clock.now += 0.5  # full again
    limiter.take("run", 500)  # larger than the burst: allowed once the bucket is full
    with pytest.raises(errors.ResourceExhausted):
        limiter.take("run", 1)


@pytest.mark.parametrize(("per_second", "burst"), [(0, 1), (-1, 5), (1, 0.5)])
def test_a_rate_that_cannot_refill_is_refused(per_second: float, burst: float) -> None:
    with pytest.raises(ValueError, match="per_second > 0 and burst >= 1"):
        Rate(per_second, burst)


async def test_concurrent_checks_of_one_key_ask_once_and_share_the_answer(clock: FakeClock) -> None:
    asked_both, answering = asyncio.Event(), asyncio.Event()

    class SlowRegistry(Registry):
        async def verify(self, secret: str) -> Principal | None:
            self.asked.append(secret)
            if len(self.asked) == 2:
                asked_both.set()
            await answering.wait()
            return self.keys.get(secret)

    slow = SlowRegistry()
    verifier = CachedVerifier(slow, ttl=2.0, clock=clock)
    impatient = asyncio.create_task(verifier.verify("good"))
    checks = [asyncio.create_task(verifier.verify(secret)) for secret in ["good"] * 50 + ["bad"] * 50]
    await asyncio.wait_for(asked_both.wait(), 5)
    impatient.cancel()  # a caller that gives up does not take the answer from the others
    answering.set()
    assert await asyncio.gather(*checks) == [READER] * 50 + [None] * 50
    assert sorted(slow.asked) == ["bad", "good"]


async def test_a_failed_check_fails_every_caller_waiting_on_it_and_the_next_asks_again(
    clock: FakeClock, registry: Registry
) -> None:
    verifier = CachedVerifier(registry, ttl=2.0, outage_grace=0.0, clock=clock)
    registry.down = True
    results = await asyncio.gather(*(verifier.verify("good") for _ in range(5)), return_exceptions=True)
    assert all(isinstance(result, errors.Unavailable) for result in results)
    assert registry.asked == ["good"]
    registry.down = False
    assert await verifier.verify("good") is READER
    assert registry.asked == ["good", "good"]
