"""Named artifacts: versioned manifests of files that runs log and use, with lineage; ArtifactService's rules
without any gRPC.

A version is a manifest (path, sha256, size of each file); each file's bytes are a blob of the project,
kept once per project in ``{blob_dir}/{project}/{sha[:2]}/{sha}`` (:mod:`takeoff_registry.blobs`).
Creating a version receives the blobs the client sends into staging files, hashing and counting as they
arrive, in large writes in a worker thread (never a whole file in memory, no database work per chunk).
Only when the stream has ended and every blob matched does one transaction record the blobs and the
version and move the aliases; the blobs are moved into place inside it, and taken back out should it fail
to commit. A stream that breaks off, or anything that fails, leaves no version, no blob and no staging
file.

Version numbers count from 0 per artifact; ``latest`` is not stored but always the newest. A manifest
equal to an existing version's (same digest) makes no new version: that one gets the aliases.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from takeoff_registry.blobs import STAGING, ContentStore, StagedFile, storage_errors, sync
from takeoff_registry.named_artifacts_store import (
    MAX_USED_BY,
    ArtifactCollectionRow,
    ArtifactTables,
    ArtifactVersionRow,
    Uses,
    pk,
)
from takeoff_registry.refs import (
    ARTIFACT_VERSION,
    LATEST,
    ArtifactCollectionKey,
    ArtifactReference,
    RunKey,
    check_artifact_alias,
    project_not_found,
)
from takeoff_registry.runs import RunState
from takeoff_registry.store import RegistryStore, Tx
from takeoff_registry.versions import SHA256
from takeoff_server.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from takeoff_server.idempotency import request_fingerprint
from takeoff_server.pagination import PageRequest
from takeoff_server.validation import MAX_CONFIG_DEPTH, Problems, check_struct, field_error, text_problem

MAX_FILES = 10_000
MAX_PATH = 1024
MAX_ALIASES = 16
MAX_METADATA_BYTES = 64 * 1024
MAX_DIGESTS = 10_000
MAX_PATHS_BYTES = 2 * 1024 * 1024
"""All paths of a version together, as UTF-8: with 10,000 digests and the metadata a version still fits in
one response message (4 MiB), used_by and all."""
TYPE_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
TYPE_RULE = "1-64 characters of letters, digits, '-', '_' and '.'"
MAX_CACHED_FILES = 200_000
"""Manifest entries ReadArtifactFile keeps in memory (about 200 bytes each)."""
WRITE_BATCH_BYTES = 8 * 1024 * 1024
"""Bytes of a large blob received before they are handed to the writer threads: few thread hops, bounded
memory."""
MAX_FINISHING_BYTES = 64 * 1024 * 1024
"""Bytes of small blobs (each within one batch, written whole) handed to worker threads and not yet checked,
at most (memory held meanwhile)."""


@dataclass(frozen=True, slots=True)
class ArtifactFile:
    path: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class NewVersion:
    """What CreateArtifactVersion's header asks for (names parsed, everything else unchecked)."""

    collection: ArtifactCollectionKey
    type: str
    run: RunKey | None
    aliases: tuple[str, ...]
    metadata: dict[str, Any]
    files: tuple[ArtifactFile, ...]
    uploads: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ArtifactVersion:
    collection: ArtifactCollectionKey
    version: int
    type: str
    digest: str
    size_bytes: int
    files: tuple[ArtifactFile, ...]
    aliases: tuple[str, ...]
    """Aliases pointing here, ``latest`` included when this is the newest version, sorted."""
    metadata: dict[str, Any]
    run: str
    used_by: tuple[str, ...]
    use_count: int
    create_time: datetime

    @property
    def name(self) -> str:
        return self.collection.version_name(self.version)


@dataclass(frozen=True, slots=True)
class ArtifactCollection:
    key: ArtifactCollectionKey
    type: str
    version_count: int
    aliases: dict[str, int]
    """Every alias -> version number, ``latest`` included."""
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True, slots=True)
class VersionFilter:
    collection: ArtifactCollectionKey | None
    """None: every artifact of the project."""
    logged_by: str = ""
    used_by: str = ""


def _now() -> datetime:
    return datetime.now(UTC)


def manifest_digest(files: Sequence[ArtifactFile]) -> str:
    """sha256 over the canonical JSON of the files sorted by path: equal digests, equal contents."""
    entries = [[file.path, file.sha256, file.size_bytes] for file in sorted(files, key=lambda f: f.path)]
    canonical = json.dumps(entries, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _path_problem(path: str) -> str | None:
    if problem := text_problem(path, max_chars=MAX_PATH):
        return problem
    if not path:
        return "a path is required"
    if path.startswith("/"):
        return "must be relative, not start with '/'"
    if "\\" in path or any(ord(character) < 32 or ord(character) == 127 for character in path):
        return "must hold no backslash or control character (paths are '/'-separated on every system)"
    if any(segment in ("", ".", "..") for segment in path.split("/")):
        return "must be '/'-separated names without '.', '..' or empty segments"
    return None


def _digest_problem(sha256: str) -> str | None:
    return None if SHA256.fullmatch(sha256) else "must be a lowercase hex sha256 (64 characters)"


def check_digests(digests: Sequence[str], *, field: str) -> None:
    """At most MAX_DIGESTS, each 64 lowercase hex characters; every problem as a field violation."""
    problems = Problems()
    if len(digests) > MAX_DIGESTS:
        problems.add("ARGUMENT_INVALID", field, f"at most {MAX_DIGESTS} digests (got {len(digests)})")
    for index, digest in enumerate(digests):
        if problem := _digest_problem(digest):
            problems.add("ARGUMENT_INVALID", f"{field}[{index}]", problem)
    problems.raise_if_any()


def check_type(type_: str, *, field: str) -> str:
    if not TYPE_PATTERN.fullmatch(type_):
        raise field_error(field, f"type {type_!r} must be {TYPE_RULE}" if type_ else "a type is required")
    return type_


def _check_new_version(new: NewVersion, problems: Problems) -> None:
    with problems.collect():
        check_type(new.type, field="header.type")
    if new.run is not None and new.run.project != new.collection.project:
        problems.add("ARGUMENT_INVALID", "header.run", f"must be a run of projects/{new.collection.project}")
    if len(new.aliases) > MAX_ALIASES:
        problems.add("ARGUMENT_INVALID", "header.aliases", f"at most {MAX_ALIASES} aliases")
    for index, alias in enumerate(new.aliases):
        with problems.collect():
            check_artifact_alias(alias, field=f"header.aliases[{index}]")
    with problems.collect():
        check_struct(
            new.metadata, field="header.metadata", max_bytes=MAX_METADATA_BYTES, max_depth=MAX_CONFIG_DEPTH
        )
    if not new.files:
        problems.add("ARGUMENT_INVALID", "header.files", "a version holds at least one file")
    if len(new.files) > MAX_FILES:
        problems.add("ARGUMENT_INVALID", "header.files", f"at most {MAX_FILES} files (got {len(new.files)})")
    elif sum(len(file.path.encode(errors="replace")) for file in new.files) > MAX_PATHS_BYTES:
        problems.add(
            "ARGUMENT_INVALID", "header.files", f"the paths add up to over {MAX_PATHS_BYTES} bytes of UTF-8"
        )
    paths: set[str] = set()
    sizes: dict[str, int] = {}
    for index, file in enumerate(new.files):
        field = f"header.files[{index}]"
        if problem := _path_problem(file.path):
            problems.add("ARGUMENT_INVALID", f"{field}.path", problem)
        elif file.path in paths:
            problems.add("ARGUMENT_INVALID", f"{field}.path", f"{file.path!r} is listed twice")
        paths.add(file.path)
        if problem := _digest_problem(file.sha256):
            problems.add("ARGUMENT_INVALID", f"{field}.sha256", problem)
        if file.size_bytes < 0:
            problems.add("ARGUMENT_INVALID", f"{field}.size_bytes", "must not be negative")
        elif sizes.setdefault(file.sha256, file.size_bytes) != file.size_bytes:
            problems.add(
                "ARGUMENT_INVALID", f"{field}.size_bytes", "differs from another file with this sha256"
            )
    for index, file in enumerate(new.files):
        # A path that is another's directory could not be written out next to it.
        parent = file.path.rpartition("/")[0]
        while parent:
            if parent in paths:
                problems.add(
                    "ARGUMENT_INVALID", f"header.files[{index}].path", f"{parent!r} is a file of this version"
                )
                break
            parent = parent.rpartition("/")[0]
    seen: set[str] = set()
    for index, sha256 in enumerate(new.uploads):
        field = f"header.uploads[{index}]"
        if problem := _digest_problem(sha256):
            problems.add("ARGUMENT_INVALID", field, problem)
        elif sha256 not in sizes:
            problems.add("ARGUMENT_INVALID", field, "is the sha256 of no file in header.files")
        elif sha256 in seen:
            problems.add("ARGUMENT_INVALID", field, "is uploaded twice")
        seen.add(sha256)


def _digest_mismatch(index: int, expected: str, received: str) -> InvalidArgument:
    return InvalidArgument(
        "ARTIFACT_DIGEST_MISMATCH",
        f"header.uploads[{index}]: the uploaded bytes hash to {received}, not to {expected}",
        metadata={"sha256": received},
        violations=[FieldViolation(f"header.uploads[{index}]", "does not match the uploaded bytes")],
    )


def _size_mismatch(index: int, problem: str) -> InvalidArgument:
    return field_error(
        f"header.uploads[{index}]" if index >= 0 else "header.uploads",
        problem,
        reason="ARTIFACT_SIZE_MISMATCH",
    )


class _Receiver:
    """Splits the stream's bytes into the uploads (by their sizes in the manifest) and writes each into a
    staging file in worker threads. A blob that fits in one batch is staged, written, hashed and closed by
    one thread job while the next ones arrive (up to MAX_FINISHING_BYTES of them unchecked); a larger one is
    written batch by batch, one batch in flight while the next arrives."""

    def __init__(self, blobs: ContentStore, uploads: Sequence[tuple[str, int]]) -> None:
        self._blobs = blobs
        self._uploads = uploads
        self._index = 0
        self._remaining = uploads[0][1] if uploads else 0
        self._staged: dict[int, StagedFile] = {}
        """The staging files by upload index: checked ones, and the large blob being written."""
        self._batch: list[memoryview] = []
        self._batched = 0
        self._writing: asyncio.Future[tuple[None, None]] | None = None
        self._finishing: deque[tuple[int, asyncio.Future[tuple[StagedFile, str]]]] = deque()
        self._finishing_bytes = 0

    @property
    def paths(self) -> list[Path]:
        """Each upload's staging file, in upload order (once :meth:`end` has returned)."""
        return [self._staged[index].path for index in range(len(self._uploads))]

    async def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            await self._finish_empty()
            if self._index == len(self._uploads):
                raise _size_mismatch(
                    -1, "more bytes arrived than the uploads' sizes in header.files add up to"
                )
            taken = min(self._remaining, len(view))
            self._batch.append(view[:taken])
            self._batched += taken
            self._remaining -= taken
            view = view[taken:]
            if self._remaining == 0:
                await self._finish_current()
            elif self._batched >= WRITE_BATCH_BYTES:
                await self._hand_over()

    async def end(self) -> None:
        """The stream has ended: every upload must be complete and match its digest."""
        await self._finish_empty()
        if self._index < len(self._uploads):
            size = self._uploads[self._index][1]
            raise _size_mismatch(self._index, f"the stream ended {self._remaining} of its {size} bytes short")
        while self._finishing:
            await self._check_oldest()

    async def _finish_empty(self) -> None:
        while self._index < len(self._uploads) and self._remaining == 0:
            await self._finish_current()

    async def _hand_over(self) -> None:
        await self._wait_for_writer()
        batch, self._batch, self._batched = self._batch, [], 0
        staged = self._staged.get(self._index)
        if staged is None:
            staged = self._staged[self._index] = self._blobs.stage()
        # Written and hashed in two threads at once: each takes about as long as the other.
        self._writing = asyncio.gather(
            asyncio.to_thread(staged.write, *batch), asyncio.to_thread(staged.hash, *batch)
        )

    async def _wait_for_writer(self) -> None:
        if self._writing is not None:
            # Shielded: a cancelled upload leaves the threads to finish, and discard() waits for them.
            await asyncio.shield(self._writing)
            self._writing = None

    async def _finish_current(self) -> None:
        index, batch = self._index, self._batch
        self._batch, self._batched = [], 0
        staged = self._staged.get(index)
        if staged is None:
            future = asyncio.get_running_loop().run_in_executor(None, _write_whole, self._blobs, batch)
            self._finishing.append((index, future))
            self._finishing_bytes += self._uploads[index][1]
            while self._finishing_bytes > MAX_FINISHING_BYTES:
                await self._check_oldest()
        else:
            await self._wait_for_writer()
            # Synced later, all together (sync_all): one fsync per blob here would bound small blobs' rate.
            self._check(index, await asyncio.to_thread(staged.finish, *batch, durable=False))
        self._index += 1
        if self._index < len(self._uploads):
            self._remaining = self._uploads[self._index][1]

    async def _check_oldest(self) -> None:
        index, future = self._finishing[0]
        staged, received = await asyncio.shield(future)
        self._finishing.popleft()
        self._finishing_bytes -= self._uploads[index][1]
        self._staged[index] = staged
        self._check(index, received)

    def _check(self, index: int, received: str) -> None:
        expected = self._uploads[index][0]
        if received != expected:
            raise _digest_mismatch(index, expected, received)

    async def sync_all(self) -> None:
        await sync(self.paths)

    def discard(self) -> None:
        """Remove every staging file now; one a thread still writes is removed when it is done."""
        writing = self._writing
        being_written = self._staged.get(self._index)
        for staged in self._staged.values():
            if writing is not None and not writing.done() and staged is being_written:
                staged.path.unlink(missing_ok=True)
                writing.add_done_callback(_discard_after(staged))
            else:
                staged.discard()
        for _, future in self._finishing:
            if future.done():
                _discard_written(future)
            else:
                future.add_done_callback(_discard_written)

    async def settle(self) -> None:
        """Wait for the threads still writing staging files (what they raise no longer matters), so that
        :meth:`discard` removes every file at once, before the caller is answered."""
        working: list[asyncio.Future[Any]] = [future for _, future in self._finishing]
        if self._writing is not None:
            working.append(self._writing)
        await asyncio.gather(*working, return_exceptions=True)


def _write_whole(blobs: ContentStore, chunks: Sequence[memoryview]) -> tuple[StagedFile, str]:
    """A blob that arrived whole: staged, written, hashed and closed in one go (in a worker thread)."""
    staged = blobs.stage()
    try:
        return staged, staged.finish(*chunks, durable=False)
    except BaseException:
        staged.discard()
        raise


def _discard_written(future: asyncio.Future[tuple[StagedFile, str]]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result()[0].discard()


def _discard_after(staged: StagedFile) -> Callable[[asyncio.Future[tuple[None, None]]], None]:
    def discard(writing: asyncio.Future[tuple[None, None]]) -> None:
        if not writing.cancelled():
            writing.exception()  # retrieved: a write into a file being discarded may fail, harmlessly
        staged.discard()

    return discard


class _Manifests:
    """Versions' files by path, by version name: a version never changes (nor goes away), so nothing here
    goes stale, whichever registry stored it. The least recently used are dropped beyond MAX_CACHED_FILES
    files in all."""

    def __init__(self) -> None:
        self._by_version: OrderedDict[str, dict[str, ArtifactFile]] = OrderedDict()
        self._files = 0

    def get(self, version: str) -> dict[str, ArtifactFile] | None:
        manifest = self._by_version.get(version)
        if manifest is not None:
            self._by_version.move_to_end(version)
        return manifest

    def put(self, version: str, manifest: dict[str, ArtifactFile]) -> None:
        if version in self._by_version:
            return
        self._by_version[version] = manifest
        self._files += len(manifest)
        while self._files > MAX_CACHED_FILES and len(self._by_version) > 1:
            _, dropped = self._by_version.popitem(last=False)
            self._files -= len(dropped)


class NamedArtifacts:
    """Stores, resolves and serves named artifact versions and records their uses."""

    def __init__(self, store: RegistryStore, blob_dir: Path, *, max_version_bytes: int) -> None:
        self._store = store
        self._blob_dir = blob_dir
        self._max_version_bytes = max_version_bytes
        self._manifests = _Manifests()

    def remove_stale_staging(self, *, older_than: float) -> list[Path]:
        """Remove staging files not written for ``older_than`` seconds: what uploads cut short by a crash of
        the registry left (a live upload writes every few seconds). Blocks: run it in a thread."""
        removed = []
        cutoff = time.time() - older_than
        for path in self._blob_dir.glob(f"*/{STAGING}/*"):
            with contextlib.suppress(OSError):  # another registry may remove it first
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed.append(path)
        return removed

    def blobs(self, project: str) -> ContentStore:
        """The project's blobs (project ids are safe path segments: lowercase, digits, '-', '_')."""
        return ContentStore(self._blob_dir / project)

    async def find_missing_blobs(self, project: str, digests: Sequence[str]) -> list[str]:
        check_digests(digests, field="sha256")
        async with self._store.read() as tx:
            stored = await ArtifactTables(tx).stored_blobs(project, digests)
        return [digest for digest in dict.fromkeys(digests) if digest not in stored]

    async def create_version(
        self, new: NewVersion, chunks: AsyncIterable[bytes], *, request_id: str
    ) -> tuple[ArtifactVersion, bool]:
        """Store a new version from the manifest and the uploaded blobs' bytes; returns it and whether a
        version with its digest existed already."""
        problems = Problems()
        _check_new_version(new, problems)
        problems.raise_if_any()
        total = sum(file.size_bytes for file in new.files)
        if total > self._max_version_bytes:
            raise ResourceExhausted(
                "ARTIFACT_TOO_LARGE",
                f"the version's files add up to {total} bytes, over this registry's limit of "
                f"{self._max_version_bytes} bytes per version",
                metadata={"limit_bytes": str(self._max_version_bytes)},
            )
        fingerprint = request_fingerprint(
            {
                "collection": new.collection.name,
                "type": new.type,
                "run": new.run.name if new.run else "",
                "aliases": list(new.aliases),
                "metadata": new.metadata,
                "files": [[file.path, file.sha256, file.size_bytes] for file in new.files],
                "uploads": list(new.uploads),
            }
        )
        if request_id:
            async with self._store.read() as tx:
                if replayed := await self._replay_if_known(tx, request_id, fingerprint):
                    async for _ in chunks:
                        pass  # the bytes were stored by the first stream
                    return replayed
        async with self._store.read() as tx:
            await self._check_state(tx, new)
        sizes = {file.sha256: file.size_bytes for file in new.files}
        blobs = self.blobs(new.collection.project)
        with storage_errors("store an upload"):
            receiver = _Receiver(blobs, [(sha256, sizes[sha256]) for sha256 in new.uploads])
        try:
            with storage_errors("store an upload"):
                async for chunk in chunks:
                    await receiver.feed(chunk)
                await receiver.end()
                await receiver.sync_all()
            staged = dict(zip(new.uploads, receiver.paths, strict=True))
            return await self._commit(new, staged, blobs, fingerprint, request_id)
        except asyncio.CancelledError:
            raise
        except BaseException:
            await receiver.settle()  # a refused upload is answered once nothing of it is left on disk
            raise
        finally:
            # Deliberately synchronous: it must run even when the upload is being cancelled.
            receiver.discard()

    @staticmethod
    async def _check_run(tx: Tx, run: RunKey, what: str) -> None:
        row = await tx.run(run.project, run.run)
        if row is None:
            raise NotFound("RUN_NOT_FOUND", f"run {run.name} does not exist", metadata={"resource": run.name})
        if RunState(row.state).ended:
            raise FailedPrecondition(
                "RUN_ENDED",
                f"run {run.name} has ended ({row.state}) and {what}",
                metadata={"resource": run.name, "state": row.state},
            )

    async def _check_state(self, tx: Tx, new: NewVersion) -> None:
        """What the database must say for the version to be stored: the run live, the type the
        artifact's, every blob uploaded or stored. Checked before the bytes arrive and again after."""
        if new.run is not None:
            await self._check_run(tx, new.run, "logs no more artifacts")
        tables = ArtifactTables(tx)
        collection = await tables.collection(new.collection.project, new.collection.artifact)
        if collection is not None and collection.type != new.type:
            raise _type_mismatch(new, collection.type)
        uploaded = set(new.uploads)
        stored = await tables.stored_blobs(new.collection.project, [file.sha256 for file in new.files])
        missing = [
            index
            for index, file in enumerate(new.files)
            if file.sha256 not in uploaded and file.sha256 not in stored
        ]
        if missing:
            raise FailedPrecondition(
                "BLOB_MISSING",
                f"header.files[{missing[0]}] ({new.files[missing[0]].path!r}): its bytes are neither "
                f"uploaded in this stream nor stored in projects/{new.collection.project}"
                + (f" (and {len(missing) - 1} more files)" if len(missing) > 1 else ""),
                violations=[
                    FieldViolation(f"header.files[{index}]", "its blob is neither uploaded nor stored")
                    for index in missing
                ],
            )

    async def _commit(
        self,
        new: NewVersion,
        staged: dict[str, Path],
        blobs: ContentStore,
        fingerprint: str,
        request_id: str,
    ) -> tuple[ArtifactVersion, bool]:
        key = new.collection
        async with self._store.write() as tx:
            if request_id and (replayed := await self._replay_if_known(tx, request_id, fingerprint)):
                return replayed
            await self._check_state(tx, new)
            tables = ArtifactTables(tx)
            now = _now()
            collection = await tables.ensure_collection(key.project, key.artifact, new.type, now)
            if collection.type != new.type:  # its first version was stored meanwhile
                raise _type_mismatch(new, collection.type)
            digest = manifest_digest(new.files)
            logged_by = new.run.name if new.run else ""
            # Only a version the same run (or, without one, no run) logged is reused: a run token moving an
            # alias onto another run's version would be writing that run's artifacts.
            existing = await tables.version_with_digest(pk(collection), digest, run=logged_by)
            placed: list[Path] = []
            try:
                if existing is not None:
                    version_row = existing
                else:
                    sizes = {file.sha256: file.size_bytes for file in new.files}
                    await tables.ensure_blobs(key.project, {sha256: sizes[sha256] for sha256 in staged}, now)
                    version_row = ArtifactVersionRow(
                        collection_pk=pk(collection),
                        project_id=key.project,
                        version=collection.version_count,
                        digest=digest,
                        size_bytes=sum(file.size_bytes for file in new.files),
                        files=[
                            [file.path, file.sha256, file.size_bytes]
                            for file in sorted(new.files, key=lambda file: file.path)
                        ],
                        user_metadata=new.metadata,
                        run=logged_by,
                        create_time=now,
                    )
                    await tables.add_version(version_row)
                    collection.version_count += 1
                    collection.update_time = now
                    # Under the blob rows' locks: a file missing now is placed by this transaction alone.
                    with storage_errors("store an upload"):
                        placed = await asyncio.to_thread(
                            blobs.put_new, [(staged[sha256], sha256) for sha256 in sorted(staged)]
                        )
                for alias in new.aliases:
                    await tables.set_alias(pk(collection), alias, version_row.version)
                if new.aliases:
                    collection.update_time = now
                if request_id:
                    result = json.dumps(
                        {"version": key.version_name(version_row.version), "existed": existing is not None}
                    )
                    await tx.remember("CreateArtifactVersion", request_id, fingerprint, result)
                return await self._version(tables, collection, version_row), existing is not None
            except BaseException:
                # Taken back while this transaction still holds the blob rows' locks, so that no other
                # upload of the same blob can have relied on the file. (Should the commit itself fail, the
                # files stay without rows: verified bytes, which a later upload of them reuses.)
                blobs.remove(placed)
                raise

    async def _replay_if_known(
        self, tx: Tx, request_id: str, fingerprint: str
    ) -> tuple[ArtifactVersion, bool] | None:
        try:
            replayed = await tx.replay("CreateArtifactVersion", request_id, fingerprint)
        except InvalidArgument as conflict:  # the library names the field of a plain request
            raise InvalidArgument(
                conflict.reason,
                conflict.message,
                violations=[FieldViolation("header.request_id", v.description) for v in conflict.violations],
            ) from None
        return await self._replay(tx, replayed) if replayed else None

    async def _replay(self, tx: Tx, replayed: str) -> tuple[ArtifactVersion, bool]:
        recorded = json.loads(replayed)
        variables = ARTIFACT_VERSION.parse(recorded["version"], field="request_id")
        reference = ArtifactReference(
            ArtifactCollectionKey(variables["project"], variables["artifact"]),
            version=int(variables["version"]),
        )
        return await self._resolve(ArtifactTables(tx), reference), bool(recorded["existed"])

    async def get_version(self, reference: ArtifactReference) -> ArtifactVersion:
        async with self._store.read() as tx:
            return await self._resolve(ArtifactTables(tx), reference)

    async def use_version(self, reference: ArtifactReference, run: RunKey) -> ArtifactVersion:
        """Resolve the reference and record that ``run`` (of the artifact's project, not ended) used the
        version (its latest use time)."""
        if run.project != reference.collection.project:
            raise field_error(
                "run", f"must be a run of projects/{reference.collection.project}, the artifact's"
            )
        async with self._store.write() as tx:
            tables = ArtifactTables(tx)
            collection, version_row = await self._resolve_rows(tables, reference)
            await self._check_run(tx, run, "records no more uses")
            await tables.record_use(pk(version_row), run.name, _now())
            return await self._version(tables, collection, version_row)

    async def get_collection(self, key: ArtifactCollectionKey) -> ArtifactCollection:
        async with self._store.read() as tx:
            tables = ArtifactTables(tx)
            row = await self._require_collection(tables, key)
            aliases = await tables.aliases([pk(row)])
        return _collection(row, aliases[pk(row)])

    async def list_collections(
        self, project: str, *, type_: str, page: PageRequest
    ) -> tuple[list[ArtifactCollection], bool]:
        """One page ordered by artifact id, and whether more follow."""
        if type_:
            check_type(type_, field="type")
        async with self._store.read() as tx:
            if not await tx.project_exists(project):
                raise project_not_found(project)
            tables = ArtifactTables(tx)
            after = str(page.after[0]) if page.after else None
            rows = await tables.collections(project, type_=type_, after=after, limit=page.size + 1)
            shown = rows[: page.size]
            aliases = await tables.aliases([pk(row) for row in shown])
        return [_collection(row, aliases[pk(row)]) for row in shown], len(rows) > page.size

    async def list_versions(
        self, project: str, where: VersionFilter, *, page: PageRequest
    ) -> tuple[list[tuple[ArtifactVersion, int]], bool]:
        """One page, newest first, each with its list position (the cursor after it), and whether more
        follow."""
        async with self._store.read() as tx:
            tables = ArtifactTables(tx)
            collection_pk = None
            if where.collection is not None:
                collection_pk = pk(await self._require_collection(tables, where.collection))
            elif not await tx.project_exists(project):
                raise project_not_found(project)
            rows = await tables.versions(
                project,
                collection_pk=collection_pk,
                logged_by=where.logged_by,
                used_by=where.used_by,
                before=int(page.after[0]) if page.after else None,
                limit=page.size + 1,
            )
            shown = rows[: page.size]
            collections = await tables.collections_by_pk([row.collection_pk for row in shown])
            aliases = await tables.aliases(list(collections))
            uses = await tables.uses([pk(row) for row in shown])
        versions = [
            (
                _version(
                    collections[row.collection_pk], row, aliases[row.collection_pk], uses.get(pk(row), Uses())
                ),
                pk(row),
            )
            for row in shown
        ]
        return versions, len(rows) > page.size

    async def open_file(
        self, reference: ArtifactReference, path: str, *, offset: int
    ) -> tuple[ArtifactFile, AsyncIterable[bytes]]:
        """The file's entry and its bytes from ``offset`` on, in chunks of at most 1 MiB. ``reference`` names
        a version by number. Once a version's manifest is cached its files are served without the database,
        so a client fetching every file of a version costs one manifest read, not one per file."""
        assert reference.version is not None, "ReadArtifactFile names a version by number"
        if problem := _path_problem(path):
            raise field_error("path", problem)
        key = reference.collection
        name = key.version_name(reference.version)
        manifest = self._manifests.get(name)
        if manifest is None:
            async with self._store.read() as tx:
                tables = ArtifactTables(tx)
                version_pk = await tables.version_pk(key.project, key.artifact, reference.version)
                if version_pk is None:
                    _, row = await self._resolve_rows(tables, reference)  # raises what is missing
                    version_pk = pk(row)
                entries = await tables.version_files(version_pk)
            manifest = {entry[0]: ArtifactFile(*entry) for entry in entries}
            self._manifests.put(name, manifest)
        file = manifest.get(path)
        if file is None:
            raise NotFound(
                "ARTIFACT_FILE_NOT_FOUND",
                f"{name} holds no file {path!r}",
                metadata={"resource": name, "path": path},
            )
        if not 0 <= offset <= file.size_bytes:
            raise field_error("offset", f"must be between 0 and the file's size, {file.size_bytes}")
        return file, self.blobs(key.project).read(file.sha256, offset)

    async def _require_collection(
        self, tables: ArtifactTables, key: ArtifactCollectionKey
    ) -> ArtifactCollectionRow:
        row = await tables.collection(key.project, key.artifact)
        if row is not None:
            return row
        if not await tables.tx.project_exists(key.project):
            raise project_not_found(key.project)
        raise NotFound(
            "ARTIFACT_COLLECTION_NOT_FOUND",
            f"artifact {key.name} does not exist",
            metadata={"resource": key.name},
        )

    async def _resolve_rows(
        self, tables: ArtifactTables, reference: ArtifactReference
    ) -> tuple[ArtifactCollectionRow, ArtifactVersionRow]:
        collection = await self._require_collection(tables, reference.collection)
        if reference.version is not None:
            number = reference.version
        elif reference.alias is None or reference.alias == LATEST:
            number = collection.version_count - 1
        else:
            aliases = (await tables.aliases([pk(collection)]))[pk(collection)]
            if reference.alias not in aliases:
                raise NotFound(
                    "ALIAS_NOT_FOUND",
                    f"artifact {collection_name(collection)} has no alias {reference.alias!r}",
                    metadata={"resource": str(reference)},
                )
            number = aliases[reference.alias]
        row = await tables.version(pk(collection), number)
        if row is None:
            raise NotFound(
                "ARTIFACT_VERSION_NOT_FOUND",
                f"{reference}: the artifact has no version v{number}",
                metadata={"resource": str(reference)},
            )
        return collection, row

    async def _resolve(self, tables: ArtifactTables, reference: ArtifactReference) -> ArtifactVersion:
        collection, row = await self._resolve_rows(tables, reference)
        return await self._version(tables, collection, row)

    async def _version(
        self, tables: ArtifactTables, collection: ArtifactCollectionRow, row: ArtifactVersionRow
    ) -> ArtifactVersion:
        aliases = await tables.aliases([pk(collection)])
        uses = await tables.uses([pk(row)])
        return _version(collection, row, aliases[pk(collection)], uses[pk(row)])


def _type_mismatch(new: NewVersion, stored: str) -> FailedPrecondition:
    return FailedPrecondition(
        "ARTIFACT_TYPE_MISMATCH",
        f"artifact {new.collection.name} holds {stored!r} versions, not {new.type!r}",
        metadata={"resource": new.collection.name, "type": stored},
        violations=[FieldViolation("header.type", f"must be {stored!r}, the artifact's type")],
    )


def collection_name(row: ArtifactCollectionRow) -> str:
    return ArtifactCollectionKey(row.project_id, row.artifact_id).name


def _all_aliases(row: ArtifactCollectionRow, user_aliases: dict[str, int]) -> dict[str, int]:
    aliases = dict(user_aliases)
    if row.version_count:
        aliases[LATEST] = row.version_count - 1
    return aliases


def _collection(row: ArtifactCollectionRow, user_aliases: dict[str, int]) -> ArtifactCollection:
    return ArtifactCollection(
        key=ArtifactCollectionKey(row.project_id, row.artifact_id),
        type=row.type,
        version_count=row.version_count,
        aliases=_all_aliases(row, user_aliases),
        create_time=row.create_time,
        update_time=row.update_time,
    )


def _version(
    collection: ArtifactCollectionRow, row: ArtifactVersionRow, user_aliases: dict[str, int], uses: Uses
) -> ArtifactVersion:
    aliases = _all_aliases(collection, user_aliases)
    return ArtifactVersion(
        collection=ArtifactCollectionKey(collection.project_id, collection.artifact_id),
        version=row.version,
        type=collection.type,
        digest=row.digest,
        size_bytes=row.size_bytes,
        files=tuple(ArtifactFile(path, sha256, size) for path, sha256, size in row.files),
        aliases=tuple(sorted(alias for alias, number in aliases.items() if number == row.version)),
        metadata=row.user_metadata,
        run=row.run,
        used_by=uses.runs[:MAX_USED_BY],
        use_count=uses.count,
        create_time=row.create_time,
    )
