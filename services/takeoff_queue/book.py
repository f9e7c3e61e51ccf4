"""The queue service's use cases: queues, Enqueue with every check before accepting, items, cancel.

Plain Python: the API layer calls these with domain values and turns the results into protos. Live
state (pending and leased items, agents) belongs to the dispatcher; this module validates, records and
reads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

import jsonschema

from takeoff_queue import checks, lifecycle, resource_config, tracing
from takeoff_queue.dispatcher import Dispatcher
from takeoff_queue.lifecycle import ItemState
from takeoff_queue.model import (
    ITEM,
    ITEM_IN_ANY_QUEUE,
    PROJECT,
    QUEUE,
    Item,
    Priority,
    Queue,
    ResolvedJob,
    SecretMount,
    SourceKind,
    default_start_timeout,
)
from takeoff_queue.queue_watch import QueueWatcher
from takeoff_queue.resource_config import ResourceKind
from takeoff_queue.store import QueueStore, QueueWrite, queue_values
from takeoff_server.errors import AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from takeoff_server.idempotency import check_request_id, request_fingerprint
from takeoff_server.pagination import PageRequest
from takeoff_server.random_ids import random_hex
from takeoff_server.validation import Problems

MAX_ATTEMPTS_LIMIT = 100
_QUEUE_GONE = "queue deleted"
"""What an insert's transaction answers when the item's queue was deleted meanwhile: nothing is written."""


_VENV_KINDS = frozenset({ResourceKind.LOCAL_PROCESS, ResourceKind.SLURM, ResourceKind.RAY})
"""The kinds whose jobs run from a venv build (a Slurm cluster or a Ray cluster runs no image of ours)."""


class JobResolver(checks.ProjectLookup, Protocol):
    """Pins a job reference to one version, and tells the projects written to through it (the registry,
    over gRPC)."""

    async def resolve(self, project: str, reference: str) -> ResolvedJob: ...


@dataclass
class EnqueueRequest:
    queue: str
    job: str
    run_config: dict[str, Any] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    resource_config: dict[str, Any] = field(default_factory=dict)
    template_variables: dict[str, Any] = field(default_factory=dict)
    priority: Priority = Priority.MEDIUM
    max_attempts: int = 0
    max_run_time: timedelta | None = None
    run_display_name: str = ""
    request_id: str = ""
    traceparent: str = ""
    secrets: tuple[SecretMount, ...] = ()
    """As given: short ids are resolved in the queue's project."""
    creator: str = ""
    """The caller (``takeoff_server.access.current_actor``), recorded as the item's creator."""

    def fingerprint(self) -> str:
        return request_fingerprint(
            {
                "queue": self.queue,
                "job": self.job,
                "run_config": self.run_config,
                "entrypoint": self.entrypoint,
                "resource_config": self.resource_config,
                "template_variables": self.template_variables,
                "priority": int(self.priority),
                "max_attempts": self.max_attempts,
                "max_run_seconds": self.max_run_time.total_seconds() if self.max_run_time else None,
                "run_display_name": self.run_display_name,
                "secrets": [mount.as_json() for mount in self.secrets],
            }
        )


def _filled_config(job: ResolvedJob, given: dict[str, Any]) -> tuple[dict[str, Any], list[FieldViolation]]:
    """The run config: what was given, over the version's defaults, over the schema's property defaults."""
    schema = job.input_schema or {}
    config = {
        name: spec["default"]
        for name, spec in schema.get("properties", {}).items()
        if isinstance(spec, dict) and "default" in spec
    }
    config.update(job.default_config)
    config.update(given)
    if not schema:
        return config, []
    validator = jsonschema.Draft202012Validator(schema)
    problems = [
        FieldViolation("run_config" + "".join(f".{part}" for part in error.absolute_path), error.message)
        for error in sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    ]
    return config, problems


class QueueBook:
    def __init__(
        self,
        store: QueueStore,
        dispatcher: Dispatcher,
        jobs: JobResolver,
        clock: Callable[[], datetime],
        *,
        images_pushed: bool = False,
    ) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self._jobs = jobs
        self._clock = clock
        self._images_pushed = images_pushed
        self._projects = checks.Projects(jobs)

    async def start(self) -> None:
        """Load what the store holds: of each queue's PENDING items, the first the dispatcher's window
        holds (docs/design.md §9 "The queue's in-memory index")."""
        stored = await self._store.load(self._dispatcher.pending_window)
        self._projects.written(*stored.projects)
        self._dispatcher.restore(stored.queues, stored.items, stored.run_closes, stored.pending)

    async def reload_queue(self, name: str) -> None:
        """Another replica created, changed or deleted the queue: take it as the database has it."""
        queue = await self._store.queue(name)
        if queue is not None:
            self._projects.written(queue.project)
            self._dispatcher.put_queue(queue)
        elif name in self._dispatcher.queues:
            self._dispatcher.drop_queue(name)

    async def check_project(self, project: str, *, field: str) -> None:
        """NOT_FOUND ``PROJECT_NOT_FOUND`` unless ``project`` (``projects/{p}``) was written to, here or in
        the registry."""
        await self._projects.check(project, field=field)

    # ----- queues ------------------------------------------------------------------------------------

    async def current_queue(self, name: str, *, field_name: str = "name") -> Queue:
        """:meth:`queue`, once a queue that another replica may have just created has been looked for."""
        if self._dispatcher.replicated and name not in self._dispatcher.queues:
            await self.reload_queue(name)
        return self.queue(name, field_name=field_name)

    def queue(self, name: str, *, field_name: str = "name") -> Queue:
        QUEUE.parse(name, field=field_name)
        queue = self._dispatcher.queues.get(name)
        if queue is None:
            raise NotFound("QUEUE_NOT_FOUND", f"queue {name} does not exist", metadata={"resource": name})
        return queue

    async def create_queue(self, parent: str, queue_id: str, queue: Queue, request_id: str = "") -> Queue:
        project = PROJECT.parse(parent, field="parent")["project"]
        name = QUEUE.format(project=project, queue=queue_id)
        QUEUE.parse(name, field="queue_id")
        check_request_id(request_id)
        now = self._clock()
        queue = _checked_queue(replace(queue, name=name, create_time=now, update_time=now))
        if queue.start_timeout is None:
            queue = replace(queue, start_timeout=default_start_timeout(queue.resource))
        fingerprint = request_fingerprint(
            {key: value for key, value in queue_values(queue).items() if not key.endswith("_time")}
        )
        if request_id:
            replayed = await self._store.replay(f"CreateQueue:{parent}", request_id, fingerprint)
            if replayed is not None:
                return self.queue(replayed)
        if self._dispatcher.replicated:
            await self.reload_queue(name)  # another replica may have made it
        if name in self._dispatcher.queues:
            raise AlreadyExists(
                "QUEUE_ALREADY_EXISTS", f"queue {name} already exists", metadata={"resource": name}
            )

        async def write(tx: QueueWrite) -> str | None:
            scope = f"CreateQueue:{parent}"
            if request_id and (replayed := await tx.replay(scope, request_id, fingerprint)) is not None:
                return replayed  # a retry of this request committed first
            await tx.insert_queue(queue)
            if request_id:
                await tx.remember(scope, request_id, fingerprint, name)
            return None

        if (replayed := await self._store.write(write)) is not None:
            return self.queue(replayed)
        self._projects.written(queue.project)
        self._dispatcher.put_queue(queue)
        return queue

    async def update_queue(self, name: str, changes: dict[str, Any]) -> Queue:
        current = await self.current_queue(name, field_name="queue.name")
        queue = replace(current, **changes, update_time=self._clock())
        queue = _checked_queue(queue)
        if queue.start_timeout is None:
            queue = replace(queue, start_timeout=default_start_timeout(queue.resource))

        async def write(tx: QueueWrite) -> None:
            await tx.update_queue(queue)

        await self._store.write(write)
        self._dispatcher.put_queue(queue)
        return queue

    async def delete_queue(self, name: str, *, force: bool) -> None:
        await self.current_queue(name)
        open_items = self._dispatcher.open_items(name)
        if open_items and not force:
            raise FailedPrecondition(
                "QUEUE_NOT_EMPTY",
                f"queue {name} has {open_items} items not yet ended; delete with force to drop them",
                metadata={"resource": name, "items": str(open_items)},
            )

        runs = self._dispatcher.runs_to_close(name)
        now = self._clock()

        async def write(tx: QueueWrite) -> None:
            await tx.delete_queue(name)
            await tx.insert_run_closes(runs, now)

        await self._store.write(write)
        self._dispatcher.drop_queue(name)

    def list_queues(
        self, parent: str, page: PageRequest, resource: ResourceKind | None = None
    ) -> tuple[list[Queue], str | None]:
        project = PROJECT.parse(parent, field="parent")["project"]
        prefix = f"projects/{project}/queues/"
        after = str(page.after[0]) if page.after else ""
        names = sorted(
            name
            for name, queue in self._dispatcher.queues.items()
            if name.startswith(prefix) and name > after and resource in (None, queue.resource)
        )
        found = [self._dispatcher.queues[n] for n in names[: page.size]]
        return found, (found[-1].name if len(names) > page.size else None)

    async def item_counts(self, name: str) -> dict[ItemState, int]:
        return await self._store.count_items_by_state(name)

    def agent_count(self, name: str) -> int:
        return self._dispatcher.agent_count(name)

    # ----- items ------------------------------------------------------------------------------------

    async def enqueue(self, request: EnqueueRequest) -> Item:
        check_request_id(request.request_id)
        queue = await self.current_queue(request.queue, field_name="queue")
        fingerprint = request.fingerprint() if request.request_id else ""
        if request.request_id:
            replayed = await self._store.replay(f"Enqueue:{queue.name}", request.request_id, fingerprint)
            if replayed is not None:
                return await self.get_item(replayed)
        if not request.job:
            raise InvalidArgument(
                "ARGUMENT_INVALID",
                "job is required",
                violations=[FieldViolation("job", "required: a job reference")],
            )
        job = await self._jobs.resolve(queue.project, request.job)
        item = self._validated_item(queue, job, request)
        return await self._insert(item, f"Enqueue:{queue.name}", request.request_id, fingerprint)

    async def _insert(self, item: Item, scope: str, request_id: str, fingerprint: str) -> Item:
        """Commit a new item (and the request id that made it); only then may it be dispatched.

        When an agent can take it now, the dispatcher leases it first and it is inserted LEASED, its
        claim committed with it. The request id is looked up again in the transaction: when a retry of the
        same request committed first, its item is the answer and this one never existed. A caller that
        gives up stops neither the commit nor what memory must learn of it: the server runs a unary call
        to its end (``takeoff_server.interceptors.FinishedCalls``)."""
        leased = self._dispatcher.admit(item)

        async def write(tx: QueueWrite) -> str | None:
            if request_id and (replayed := await tx.replay(scope, request_id, fingerprint)) is not None:
                return replayed
            if not await tx.queue_exists(item.queue):
                return _QUEUE_GONE  # deleted while the item was checked (here, or on another replica)
            item.seq = await tx.insert_item(item)
            if request_id:
                await tx.remember(scope, request_id, fingerprint, item.name)
            return None

        try:
            # The attempt's run token first: without one in time, the item is inserted PENDING.
            leased = await self._dispatcher.issue_token(item, leased)
            replayed = await self._store.write(write)
        except BaseException:
            self._dispatcher.not_admitted(item)
            raise
        if replayed is not None:
            self._dispatcher.not_admitted(item)
            if replayed is _QUEUE_GONE:
                raise NotFound(
                    "QUEUE_NOT_FOUND",
                    f"queue {item.queue} does not exist",
                    metadata={"resource": item.queue},
                )
            return await self.get_item(replayed)
        item.committed = item.life
        tracing.committed(item, item.life.history, 0)
        self._dispatcher.admitted(item, leased)
        return replace(item)  # as committed: a dispatch pass may lease it before the caller reads it

    def _validated_item(self, queue: Queue, job: ResolvedJob, request: EnqueueRequest) -> Item:
        problems = Problems()
        run_config: dict[str, Any] = {}
        if checks.check_run_config(request.run_config, field="run_config", problems=problems) and (
            job.input_schema is None
            or checks.check_stored_schema(
                job.input_schema,
                field="job",
                whose=f"the input schema of {job.version_name}",
                problems=problems,
            )
        ):
            run_config, config_problems = _filled_config(job, request.run_config)
            for problem in config_problems:
                problems.add("CONFIG_INVALID", problem.field, problem.description)
            if not config_problems:  # the defaults filled in count too
                checks.check_run_config(run_config, field="run_config", problems=problems)
        merged: dict[str, Any] = {}
        variables: dict[str, Any] = {}
        usable = [
            checks.check_config(request.resource_config, field="resource_config", problems=problems),
            checks.check_config(request.template_variables, field="template_variables", problems=problems),
            *(
                checks.check_stored_schema(
                    schema, field="queue", whose=f"the schema of template variable {name}", problems=problems
                )
                for name, schema in sorted(queue.variable_schemas.items())
            ),
        ]
        if all(usable):
            # Refuses, each by name, what a secure queue does not let an item override, and host paths
            # unless the queue allows them.
            merged, variables = resource_config.item_resource_config(
                queue.resource,
                queue_config=queue.resource_config,
                variable_schemas=queue.variable_schemas,
                override=request.resource_config,
                template_variables=request.template_variables,
                secure=queue.secure,
                allow_host_paths=queue.allow_host_paths,
                queue=queue.name,
                max_json_bytes=checks.MAX_RESOURCE_CONFIG_JSON_BYTES,
                problems=problems,
            )
        if not 0 <= request.max_attempts <= MAX_ATTEMPTS_LIMIT:
            problems.add(
                "ARGUMENT_INVALID", "max_attempts", f"must be 1..{MAX_ATTEMPTS_LIMIT} (0: the default)"
            )
        checks.check_duration(
            request.max_run_time, field="max_run_time", at_most=checks.MAX_RUN_TIME, problems=problems
        )
        checks.check_entrypoint(request.entrypoint, problems)
        checks.check_secure_entrypoint(
            request.entrypoint, secure=queue.secure, queue=queue.name, problems=problems
        )
        secret_names = checks.check_item_secrets(
            request.secrets,
            project=queue.project,
            queue_mounts=queue.secrets,
            secure=queue.secure,
            queue=queue.name,
            problems=problems,
        )
        checks.check_text(
            request.run_display_name,
            field="run_display_name",
            max_chars=checks.MAX_RUN_DISPLAY_NAME_CHARS,
            problems=problems,
        )
        if job.source_kind is SourceKind.IMAGE and queue.resource in _VENV_KINDS:
            problems.add(
                "SOURCE_INCOMPATIBLE",
                "job",
                f"{job.version_name} is an image job; {queue.resource.value} queues run code and git jobs",
            )
        if (
            job.source_kind is not SourceKind.IMAGE
            and queue.resource is ResourceKind.KUBERNETES
            and not self._images_pushed
        ):
            problems.add(
                "SOURCE_INCOMPATIBLE",
                "job",
                f"{job.version_name} is built from source, and the builder has no registry to push its image"
                " to for the cluster to pull",
            )
        problems.raise_if_any()
        now = self._clock()
        item_id = _new_item_id()
        return Item(
            id=item_id,
            queue=queue.name,
            job=request.job,
            job_version=job.version_name,
            job_version_proto=job.version_proto,
            source_kind=job.source_kind,
            run_config=run_config,
            entrypoint=list(request.entrypoint),
            resource_config_override=request.resource_config,
            template_variables=variables,
            resource_config=merged,
            priority=request.priority,
            life=lifecycle.enqueued(
                item_id, request.max_attempts or queue.max_attempts, now, actor=request.creator
            ),
            max_run_time=request.max_run_time or queue.max_run_time,
            run_display_name=request.run_display_name,
            traceparent=request.traceparent,
            secrets=tuple(
                SecretMount(name, mount.env, mount.file)
                for name, mount in zip(secret_names, request.secrets, strict=True)
            ),
            creator=request.creator,
            update_time=now,
        )

    async def get_item(self, name: str) -> Item:
        found = await self._store.items(item_ids=[ITEM.parse(name, field="name")["item"]])
        if not found or found[0].name != name:
            raise NotFound("ITEM_NOT_FOUND", f"item {name} does not exist", metadata={"resource": name})
        return found[0]

    async def find_item(self, name: str) -> Item:
        """The item ``name`` names, whose queue may be ``-``: the item with that id in whichever queue of
        the project holds it (item ids are unique across queues)."""
        anywhere = ITEM_IN_ANY_QUEUE.match(name)
        if anywhere is None:
            return await self.get_item(name)
        found = await self._store.items(item_ids=[anywhere["item"]])
        if not found or found[0].project != PROJECT.format(project=anywhere["project"]):
            raise NotFound("ITEM_NOT_FOUND", f"item {name} does not exist", metadata={"resource": name})
        return found[0]

    async def list_items(
        self, parent: str, states: Sequence[ItemState], page: PageRequest, job: str = "", id_prefix: str = ""
    ) -> tuple[list[Item], int | None]:
        """Items of one queue (or, with queue ``-``, of every queue of the project), newest first;
        ``job`` keeps those of one job (``projects/p/jobs/j``) or one version of it, ``id_prefix`` those
        whose id starts with it."""
        if parent.endswith("/queues/-"):
            project = PROJECT.parse(parent.removesuffix("/queues/-"), field="parent")["project"]
            scope: dict[str, str] = {"project": f"projects/{project}"}
        else:
            scope = {"queue": (await self.current_queue(parent, field_name="parent")).name}
        before = int(page.after[0]) if page.after else None
        found = await self._store.items(
            states=states,
            job=job or None,
            id_prefix=id_prefix or None,
            before_seq=before,
            limit=page.size + 1,
            **scope,
        )
        more = len(found) > page.size
        found = found[: page.size]
        return found, (found[-1].seq if more else None)

    async def cancel_item(self, name: str, message: str = "cancelled by user", *, actor: str = "") -> Item:
        """Cancel the item; the CANCELLED transition it causes names ``actor``."""
        item_id = ITEM.parse(name, field="name")["item"]
        held = self._dispatcher.items.get(item_id)
        if held is None or held.name != name:
            stored = await self.get_item(name)
            await self._dispatcher.admission_done(item_id)  # found committed, before its Enqueue took it in
            # Looked up again: a page or the item's admission may have taken it in meanwhile, and leased it.
            held = self._dispatcher.items.get(item_id)
            if held is None or held.name != name:
                if stored.state.is_terminal:
                    lifecycle.request_cancel(stored.life, self._clock(), message)  # ITEM_ENDED unless so
                    return stored
                held = stored  # left in the database by the index (or, among replicas, not seen here yet)
        await self._dispatcher.cancel(held, message, actor=actor)
        return await self.get_item(name)

    async def relaunch_item(self, name: str, request_id: str = "", *, actor: str = "") -> Item:
        """A new item from an ended one: same queue, pinned version, inputs and secrets; ``actor`` is its
        creator."""
        check_request_id(request_id)
        old = await self.get_item(name)
        if not old.state.is_terminal:
            raise FailedPrecondition(
                "ITEM_NOT_ENDED",
                f"item {name} is {old.state.value}; only ended items are relaunched",
                metadata={"resource": name, "state": old.state.value},
            )
        await self.current_queue(old.queue)  # the queue must still exist
        fingerprint = request_fingerprint({"relaunch": name})
        if request_id:
            replayed = await self._store.replay(f"RelaunchItem:{name}", request_id, fingerprint)
            if replayed is not None:
                return await self.get_item(replayed)
        now = self._clock()
        item_id = _new_item_id()
        item = replace(
            old,
            id=item_id,
            life=lifecycle.enqueued(item_id, old.life.max_attempts, now, actor=actor),
            relaunched_from=name,
            creator=actor,
            seq=0,
            update_time=now,
            committed=None,
        )
        return await self._insert(item, f"RelaunchItem:{name}", request_id, fingerprint)

    async def watch_item(self, name: str) -> AsyncIterator[Item]:
        """The item now, then again after every change, until it ends."""
        item_id = ITEM.parse(name, field="name")["item"]
        updates = self._dispatcher.watch(item_id)
        try:
            item = await self.get_item(name)
            yield item
            while not item.state.is_terminal:
                changed = await updates.get()
                while not updates.empty():
                    changed = updates.get_nowait()
                # As its last commit left it, with no read of the database: the dispatcher tells watchers
                # after each commit, and a change of the index not committed yet is not shown.
                assert changed.committed is not None, "watchers are told of committed items"
                item = replace(changed, life=changed.committed)
                yield item
        finally:
            self._dispatcher.unwatch(item_id, updates)

    @contextmanager
    def watch_queue(self, name: str) -> Iterator[QueueWatcher]:
        """The queue's items and agents, as a snapshot and then as they change (docs/design.md §5)."""
        self.queue(name)
        changes = self._dispatcher.watch_queue(name)
        try:
            yield QueueWatcher(self._dispatcher, changes)
        finally:
            self._dispatcher.unwatch_queue(changes)


def _new_item_id() -> str:
    return random_hex(checks.ITEM_ID_DIGITS)


def _checked_queue(queue: Queue) -> Queue:
    """The queue, valid, with its secret mounts named in full; or INVALID_ARGUMENT naming each problem."""
    problems = Problems()
    secret_names = checks.check_secret_mounts(
        queue.secrets, project=queue.project, field="queue.secrets", problems=problems
    )
    checks.check_text(
        queue.description,
        field="queue.description",
        max_chars=checks.MAX_DESCRIPTION_CHARS,
        problems=problems,
    )
    config_sized = checks.check_config(
        queue.resource_config, field="queue.resource_config", problems=problems
    )
    if checks.check_template_variables(queue.template_variables, problems):
        resource_config.check_variable_declarations(
            queue.variable_schemas, queue.resource_config if config_sized else {}, problems
        )
    if config_sized:
        for problem in resource_config.check_for_resource(
            queue.resource,
            queue.resource_config,
            "queue.resource_config",
            unfilled=True,
            allow_host_paths=queue.allow_host_paths,
        ):
            problems.add("RESOURCE_CONFIG_INVALID", problem.field, problem.description)
    checks.check_container_name(queue.container_name, problems)
    if not 1 <= queue.max_attempts <= MAX_ATTEMPTS_LIMIT:
        problems.add("ARGUMENT_INVALID", "queue.max_attempts", f"must be 1..{MAX_ATTEMPTS_LIMIT} (0: 3)")
    if queue.concurrency_limit < 0:
        problems.add("ARGUMENT_INVALID", "queue.concurrency_limit", "must not be negative (0: unlimited)")
    checks.check_duration(
        queue.start_timeout,
        field="queue.start_timeout",
        at_most=checks.MAX_START_TIMEOUT,
        zero_allowed=True,
        problems=problems,
    )
    checks.check_duration(
        queue.retry_delay,
        field="queue.retry_delay",
        at_most=checks.MAX_RETRY_DELAY,
        zero_allowed=True,
        problems=problems,
    )
    checks.check_duration(
        queue.max_run_time, field="queue.max_run_time", at_most=checks.MAX_RUN_TIME, problems=problems
    )
    problems.raise_if_any()
    mounts = (SecretMount(name, m.env, m.file) for name, m in zip(secret_names, queue.secrets, strict=True))
    return replace(queue, secrets=tuple(mounts))
