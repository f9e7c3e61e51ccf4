"""Who may call each QueueService method (docs/design.md §13): the rule the server enforces on every request
message before the servicer sees it.

Names in a request are checked against the caller: an Enqueue needs ``items.write`` on the queue, and also
``jobs.read`` in the project of the job it names and ``secrets.read`` on each secret it mounts, so a key
cannot launch another project's job, or hand it another project's secrets, through a queue it may write.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from takeoff_server.access import (
    AccessRules,
    Check,
    Permission,
    Rule,
    fields,
    needs,
    project_of,
)

AGENTS = "agents"
"""The resource a listing of every agent names: only a `queues.read` grant everywhere (admin) covers it."""


def job_project(queue: str, job: str) -> str:
    """The project a job reference of an Enqueue into ``queue`` is in: the project of a full name
    (``projects/{p}/jobs/...``), else the queue's (``train``, ``train:v3``, ``train:prod``)."""
    if job.startswith("projects/"):
        return project_of(job)
    return project_of(queue) if queue else ""


def secret_name(queue: str, secret: str) -> str:
    """A mount's secret as a full name: a short id names a secret of the queue's project."""
    if not secret or secret.startswith("projects/") or not queue:
        return secret
    return f"{project_of(queue)}/secrets/{secret}"


def _enqueued_job(request: Any) -> Iterable[str]:
    """the project of `job` (the queue's for a short reference)"""
    if request.job:
        yield job_project(request.queue, request.job)


def _mounted_secrets(request: Any) -> Iterable[str]:
    """each `secrets[].secret` (short ids in the queue's project)"""
    for mount in request.secrets:
        yield secret_name(request.queue, mount.secret)


def _hello_queues(request: Any) -> Iterable[str]:
    """The queues a Lease stream's Hello serves; the stream's other messages name nothing."""
    if request.WhichOneof("message") == "hello":
        yield from request.hello.queues


def _agents_listed(request: Any) -> Iterable[str]:
    """`queue` (the filter), else `agents` (every agent: only a grant everywhere covers it)."""
    yield request.queue or AGENTS


RULES: AccessRules = {
    "CreateQueue": needs(Permission.QUEUES_WRITE, fields("parent")),
    "UpdateQueue": needs(Permission.QUEUES_WRITE, lambda request: (request.queue.name,)),
    "DeleteQueue": needs(Permission.QUEUES_WRITE, fields("name")),
    "GetQueue": needs(Permission.QUEUES_READ, fields("name")),
    "ListQueues": needs(Permission.QUEUES_READ, fields("parent")),
    "Enqueue": Rule(
        (
            Check(Permission.ITEMS_WRITE, fields("queue")),
            Check(Permission.JOBS_READ, _enqueued_job),
            Check(Permission.SECRETS_READ, _mounted_secrets),
        )
    ),
    # A name with `-` for its queue (`projects/p/queues/-`) is under its project, which a project grant
    # covers; `projects/-` names exactly that string, which only a grant everywhere covers.
    "GetItem": needs(Permission.QUEUES_READ, fields("name")),
    "ListItems": needs(Permission.QUEUES_READ, fields("parent")),
    "WatchItem": needs(Permission.QUEUES_READ, fields("name")),
    "WatchQueue": needs(Permission.QUEUES_READ, fields("name")),
    "CancelItem": needs(Permission.ITEMS_WRITE, fields("name")),
    "RelaunchItem": needs(Permission.ITEMS_WRITE, fields("name")),
    "ListAgents": needs(Permission.QUEUES_READ, _agents_listed),
    # `agents/{id}` is in no project: only a grant everywhere covers it.
    "GetAgent": needs(Permission.QUEUES_READ, fields("name")),
    "Lease": needs(Permission.QUEUES_LEASE, _hello_queues),
}
