"""ArtifactService on a real registry: versions, aliases and deduplication, blobs streamed both ways, an
upload that breaks off or does not match leaving nothing behind, bad manifests, lineage both ways, and who
may do what."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest

from takeoff.v1 import artifacts_pb2, artifacts_pb2_grpc, common_pb2, keys_pb2, runs_pb2
from takeoff_registry.named_artifacts import WRITE_BATCH_BYTES
from tests.processes import eventually
from tests.registry.conftest import Registry, failure, registry_settings, start_registry, stream

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
MIB = 1024 * 1024
TABLES = ("registry_artifact_versions", "registry_artifact_blobs", "registry_artifact_collections")
ITEM = "projects/demo/queues/gpu/items/item-1"
JOB_VERSION = "projects/demo/jobs/train/versions/0"
Request = artifacts_pb2.CreateArtifactVersionRequest


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def header(
    files: dict[str, bytes],
    *,
    artifact: str = "ckpt",
    type_: str = "checkpoint",
    project: str = "demo",
    run: str = "",
    aliases: Sequence[str] = (),
    uploads: Sequence[str] | None = None,
    request_id: str = "",
) -> artifacts_pb2.ArtifactVersionHeader:
    """A manifest of ``files``, uploading each distinct blob unless ``uploads`` says otherwise."""
    digests = list(dict.fromkeys(sha(data) for data in files.values()))
    return artifacts_pb2.ArtifactVersionHeader(
        parent=f"projects/{project}",
        artifact=artifact,
        type=type_,
        run=run,
        aliases=aliases,
        files=[
            artifacts_pb2.ArtifactFile(path=path, sha256=sha(data), size_bytes=len(data))
            for path, data in files.items()
        ],
        uploads=digests if uploads is None else uploads,
        request_id=request_id,
    )


def messages(
    head: artifacts_pb2.ArtifactVersionHeader, files: dict[str, bytes], *, chunk: int = MIB
) -> list[Request]:
    """The header, then the bytes of its uploads in order, in chunks."""
    blobs = {sha(data): data for data in files.values()}
    data = b"".join(blobs[digest] for digest in head.uploads)
    return [
        Request(header=head),
        *(Request(chunk=data[at : at + chunk]) for at in range(0, len(data), chunk)),
    ]


async def log(
    stub: artifacts_pb2_grpc.ArtifactServiceAsyncStub, files: dict[str, bytes], **fields: object
) -> artifacts_pb2.CreateArtifactVersionResponse:
    head = header(files, **fields)  # type: ignore[arg-type]
    return await stub.CreateArtifactVersion(stream(messages(head, files)))


async def read_file(
    stub: artifacts_pb2_grpc.ArtifactServiceAsyncStub, name: str, path: str, offset: int = 0
) -> tuple[artifacts_pb2.ArtifactFile, list[bytes]]:
    responses = [
        response
        async for response in stub.ReadArtifactFile(
            artifacts_pb2.ReadArtifactFileRequest(name=name, path=path, offset=offset)
        )
    ]
    assert responses[0].WhichOneof("part") == "file"
    return responses[0].file, [response.chunk for response in responses[1:]]


def blob_files(registry: Registry) -> list[Path]:
    """Every file under the named artifacts' blob directory, staging files included."""
    root = registry.settings.artifact_blobs_path
    return sorted(path for path in root.rglob("*") if path.is_file()) if root.exists() else []


async def assert_nothing_stored(registry: Registry) -> None:
    assert blob_files(registry) == []
    for table in TABLES:
        assert await registry.count_rows(table) == 0, table


async def new_run(registry: Registry, project: str = "demo", run_id: str = "") -> str:
    created = await registry.runs.CreateRun(
        runs_pb2.CreateRunRequest(parent=f"projects/{project}", run_id=run_id)
    )
    return created.run.name


@pytest.fixture
async def sqlite_registry(tmp_path: Path) -> AsyncIterator[Registry]:
    settings = registry_settings(tmp_path / "home", f"sqlite:///{tmp_path / 'registry.db'}")
    async for running in start_registry(settings):
        yield running


# Versions, aliases, deduplication (SQLite and PostgreSQL).


async def test_versions_count_from_zero_latest_is_the_newest_and_aliases_move(registry: Registry) -> None:
    stub = registry.artifacts
    run = await new_run(registry)
    first = await log(stub, {"model.pt": b"weights-0"}, aliases=["best"], run=run)
    second = await log(stub, {"model.pt": b"weights-1", "opt.pt": b"adam"}, aliases=["best", "Epoch.2"])

    assert (first.version.name, first.already_existed) == (
        "projects/demo/artifactCollections/ckpt/versions/0",
        False,
    )
    assert (first.version.run, first.version.type, first.version.size_bytes) == (run, "checkpoint", 9)
    assert first.version.aliases == ["best", "latest"]
    assert second.version.version == 1
    assert second.version.aliases == ["Epoch.2", "best", "latest"]
    assert [file.path for file in second.version.files] == ["model.pt", "opt.pt"]
    collection = (
        await stub.GetArtifactCollection(
            artifacts_pb2.GetArtifactCollectionRequest(name="projects/demo/artifactCollections/ckpt")
        )
    ).collection
    assert (collection.type, collection.version_count) == ("checkpoint", 2)
    assert dict(collection.aliases) == {"latest": 1, "best": 1, "Epoch.2": 1}

    for reference, project, expected in [
        ("ckpt", "projects/demo", 1),
        ("ckpt:latest", "projects/demo", 1),
        ("ckpt:v0", "projects/demo", 0),
        ("ckpt:best", "projects/demo", 1),
        ("projects/demo/artifactCollections/ckpt:v0", "", 0),
        ("projects/demo/artifactCollections/ckpt/versions/1", "", 1),
    ]:
        got = await stub.GetArtifactVersion(
            artifacts_pb2.GetArtifactVersionRequest(name=reference, project=project)
        )
        assert got.version.version == expected, reference
    old = await stub.GetArtifactVersion(
        artifacts_pb2.GetArtifactVersionRequest(name="ckpt:v0", project="projects/demo")
    )
    assert old.version.aliases == []  # best moved on, latest is the newest

    await log(stub, {"data.csv": b"a,b\n"}, artifact="mnist", type_="dataset")
    listed = await stub.ListArtifactCollections(
        artifacts_pb2.ListArtifactCollectionsRequest(parent="projects/demo", page_size=1)
    )
    assert [c.name for c in listed.collections] == ["projects/demo/artifactCollections/ckpt"]
    rest = await stub.ListArtifactCollections(
        artifacts_pb2.ListArtifactCollectionsRequest(
            parent="projects/demo", page_token=listed.next_page_token
        )
    )
    assert [c.name for c in rest.collections] == ["projects/demo/artifactCollections/mnist"]
    datasets = await stub.ListArtifactCollections(
        artifacts_pb2.ListArtifactCollectionsRequest(parent="projects/demo", type="dataset")
    )
    assert [c.type for c in datasets.collections] == ["dataset"]

    names = []
    token = ""
    while True:
        page = await stub.ListArtifactVersions(
            artifacts_pb2.ListArtifactVersionsRequest(
                parent="projects/demo/artifactCollections/-", page_size=2, page_token=token
            )
        )
        names += [
            version.name.removeprefix("projects/demo/artifactCollections/") for version in page.versions
        ]
        if not (token := page.next_page_token):
            break
    assert names == ["mnist/versions/0", "ckpt/versions/1", "ckpt/versions/0"]
    one = await stub.ListArtifactVersions(
        artifacts_pb2.ListArtifactVersionsRequest(parent="projects/demo/artifactCollections/ckpt")
    )
    assert [version.version for version in one.versions] == [1, 0]


async def test_an_equal_manifest_returns_the_existing_version_and_gets_the_aliases(
    registry: Registry,
) -> None:
    stub = registry.artifacts
    files = {"model.pt": b"weights-0", "config.json": b"{}"}
    first = await log(stub, files)
    await log(stub, {"model.pt": b"weights-1", "config.json": b"{}"})
    stored = blob_files(registry)

    missing = await stub.FindMissingBlobs(
        artifacts_pb2.FindMissingBlobsRequest(
            parent="projects/demo", sha256=[sha(b"weights-0"), "0" * 64, sha(b"{}"), "0" * 64]
        )
    )
    assert missing.missing_sha256 == ["0" * 64]
    # Nothing to upload: the client asked which blobs were missing.
    again = await log(stub, files, aliases=["prod"], uploads=[])

    assert again.already_existed
    assert (again.version.name, again.version.digest) == (first.version.name, first.version.digest)
    assert again.version.aliases == ["prod"]
    assert blob_files(registry) == stored
    assert len(stored) == 3  # config.json's blob is stored once for both versions
    assert await registry.count_rows("registry_artifact_versions") == 2
    elsewhere = await stub.FindMissingBlobs(
        artifacts_pb2.FindMissingBlobsRequest(parent="projects/other", sha256=[sha(b"weights-0")])
    )
    assert elsewhere.missing_sha256 == [sha(b"weights-0")]  # blobs belong to their project


async def test_concurrent_versions_get_distinct_numbers_and_equal_ones_are_stored_once(
    registry: Registry,
) -> None:
    stub = registry.artifacts
    shared = os.urandom(64 * 1024)  # every version holds it: its blob is recorded once

    distinct = await asyncio.gather(
        *(log(stub, {"shared.bin": shared, "step.txt": str(step).encode()}) for step in range(5))
    )
    same = await asyncio.gather(*(log(stub, {"final.bin": b"final"}, artifact="final") for _ in range(3)))

    assert sorted(response.version.version for response in distinct) == [0, 1, 2, 3, 4]
    assert {response.version.name for response in same} == {
        "projects/demo/artifactCollections/final/versions/0"
    }
    assert sorted(response.already_existed for response in same) == [False, True, True]
    assert await registry.count_rows("registry_artifact_blobs") == 7
    assert len(blob_files(registry)) == 7


async def test_a_retried_stream_with_the_same_request_id_returns_the_first_version(
    sqlite_registry: Registry,
) -> None:
    stub = sqlite_registry.artifacts
    first = await log(stub, {"a": b"1"}, request_id="req-1")
    retried = await log(stub, {"a": b"1"}, request_id="req-1")
    assert (retried.version.name, retried.already_existed) == (first.version.name, False)
    assert await sqlite_registry.count_rows("registry_artifact_versions") == 1

    conflict = await failure(log(stub, {"a": b"2"}, request_id="req-1"))
    assert (conflict.code, conflict.reason, conflict.fields) == (
        INVALID,
        "REQUEST_ID_CONFLICT",
        ["header.request_id"],
    )


# Bytes both ways.


async def test_a_large_file_streams_both_ways_in_chunks_and_reads_from_an_offset(
    sqlite_registry: Registry,
) -> None:
    stub = sqlite_registry.artifacts
    big = os.urandom(5 * MIB + 123)
    files = {"weights/model.bin": big, "empty": b"", "notes.txt": b"step 40"}
    head = header(files)
    created = await stub.CreateArtifactVersion(stream(messages(head, files, chunk=3 * MIB + 7)))

    entry, chunks = await read_file(stub, created.version.name, "weights/model.bin")
    assert (entry.sha256, entry.size_bytes) == (sha(big), len(big))
    assert b"".join(chunks) == big
    assert max(len(chunk) for chunk in chunks) == MIB
    _, tail = await read_file(stub, created.version.name, "weights/model.bin", offset=len(big) - 1000)
    assert b"".join(tail) == big[-1000:]
    _, nothing = await read_file(stub, created.version.name, "weights/model.bin", offset=len(big))
    assert nothing == []
    _, empty = await read_file(stub, created.version.name, "empty")
    assert empty == []

    beyond = await failure(read_file(stub, created.version.name, "notes.txt", offset=8))
    assert (beyond.code, beyond.fields) == (INVALID, ["offset"])
    absent = await failure(read_file(stub, created.version.name, "weights"))
    assert (absent.code, absent.reason) == (NOT_FOUND, "ARTIFACT_FILE_NOT_FOUND")

    # Stored bytes lost on the server's disk: the storage failed, not the request (never INTERNAL).
    (sqlite_registry.settings.artifact_blobs_path / "demo" / sha(b"step 40")[:2] / sha(b"step 40")).unlink()
    lost = await failure(read_file(stub, created.version.name, "notes.txt"))
    assert (lost.code, lost.reason) == (grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE")


async def test_an_upload_cut_mid_stream_leaves_no_version_no_blob_and_no_staging_file(
    registry: Registry,
) -> None:
    # Small blobs first (each written whole by a worker thread), then one larger than a write batch.
    files = {f"small/{n}": os.urandom(10 * 1024) for n in range(20)}
    files["model.bin"] = os.urandom(WRITE_BATCH_BYTES + 4 * MIB)
    head, *chunks = messages(header(files, run=await new_run(registry)), files)
    sent = WRITE_BATCH_BYTES // MIB + 1  # enough for the server to write a batch to its staging file
    never = asyncio.Event()

    async def breaks_off() -> AsyncIterator[Request]:
        yield head
        for message in chunks[:sent]:
            yield message
        await never.wait()  # the client goes quiet mid-upload, then is cancelled

    call = registry.artifacts.CreateArtifactVersion(breaks_off())
    staging = registry.settings.artifact_blobs_path / "demo" / "staging"
    await eventually(
        lambda: [path for path in staging.glob("*") if path.stat().st_size >= WRITE_BATCH_BYTES],
        "bytes in a staging file",
    )
    call.cancel()

    await eventually(lambda: blob_files(registry) == [], "the staging file removed")
    await assert_nothing_stored(registry)


async def test_bytes_that_do_not_match_the_manifest_store_nothing(sqlite_registry: Registry) -> None:
    stub = sqlite_registry.artifacts
    files = {"a.bin": b"a" * 1000, "b.bin": b"b" * 2000}

    wrong = [
        Request(header=header(files)),
        Request(chunk=b"a" * 1000),
        Request(chunk=b"c" * 2000),
    ]
    mismatch = await failure(stub.CreateArtifactVersion(stream(wrong)))
    assert (mismatch.code, mismatch.reason, mismatch.fields) == (
        INVALID,
        "ARTIFACT_DIGEST_MISMATCH",
        ["header.uploads[1]"],
    )
    assert mismatch.metadata["sha256"] == sha(b"c" * 2000)

    short = [Request(header=header(files)), Request(chunk=b"a" * 1000), Request(chunk=b"b" * 1999)]
    too_few = await failure(stub.CreateArtifactVersion(stream(short)))
    assert (too_few.reason, too_few.fields) == ("ARTIFACT_SIZE_MISMATCH", ["header.uploads[1]"])

    extra = [*messages(header(files), files), Request(chunk=b"!")]
    too_many = await failure(stub.CreateArtifactVersion(stream(extra)))
    assert (too_many.reason, too_many.fields) == ("ARTIFACT_SIZE_MISMATCH", ["header.uploads"])
    await assert_nothing_stored(sqlite_registry)


async def test_a_file_whose_bytes_are_neither_sent_nor_stored_is_blob_missing(
    sqlite_registry: Registry,
) -> None:
    files = {"a": b"1", "b": b"2", "c": b"3"}
    head = header(files, uploads=[sha(b"2")])
    missing = await failure(sqlite_registry.artifacts.CreateArtifactVersion(stream([Request(header=head)])))
    assert (missing.code, missing.reason, missing.fields) == (
        PRECONDITION,
        "BLOB_MISSING",
        ["header.files[0]", "header.files[2]"],
    )
    await assert_nothing_stored(sqlite_registry)


async def test_a_version_of_another_type_is_refused(sqlite_registry: Registry) -> None:
    stub = sqlite_registry.artifacts
    await log(stub, {"a": b"1"}, type_="checkpoint")
    refused = await failure(log(stub, {"a": b"2"}, type_="model"))
    assert (refused.code, refused.reason, refused.fields) == (
        PRECONDITION,
        "ARTIFACT_TYPE_MISMATCH",
        ["header.type"],
    )
    assert refused.metadata["type"] == "checkpoint"


async def test_bad_manifests_name_every_bad_field(sqlite_registry: Registry) -> None:
    stub = sqlite_registry.artifacts
    good = sha(b"x")

    def files(*entries: tuple[str, str, int]) -> list[artifacts_pb2.ArtifactFile]:
        return [artifacts_pb2.ArtifactFile(path=p, sha256=s, size_bytes=n) for p, s, n in entries]

    cases: list[tuple[dict[str, object], list[str]]] = [
        (
            {"type": "check point", "run": "projects/other/runs/r", "aliases": ["v3", "latest", "ok"]},
            ["header.type", "header.run", "header.aliases[0]", "header.aliases[1]"],
        ),
        (
            {
                "files": files(
                    ("/abs", good, 1),
                    ("a/../b", good, 1),
                    ("./x", good, 1),
                    ("nul\x00", good, 1),
                    ("..\\x", good, 1),
                )
            },
            [f"header.files[{index}].path" for index in range(5)],
        ),
        (
            {
                "files": files(
                    ("a//b", good, 1),
                    ("dir", good, 1),
                    ("dir/inner", good, 1),
                    ("dup", good, 1),
                    ("dup", good, 1),
                )
            },
            ["header.files[0].path", "header.files[4].path", "header.files[2].path"],
        ),
        (
            {"files": files(("hex", "ABC", 1), ("neg", sha(b"y"), -1), ("one", good, 1), ("two", good, 2))},
            ["header.files[0].sha256", "header.files[1].size_bytes", "header.files[3].size_bytes"],
        ),
        (
            {"files": files(("a", good, 1)), "uploads": [good, good, "0" * 64, "bad"]},
            [
                "header.uploads[1]",
                "header.uploads[2]",
                "header.uploads[3]",
            ],
        ),
        ({"files": []}, ["header.files"]),
    ]
    for fields, expected in cases:
        head = artifacts_pb2.ArtifactVersionHeader(parent="projects/demo", artifact="ckpt", type="checkpoint")
        head.files.extend(files(("a", good, 1)) if "files" not in fields else [])
        for name, value in fields.items():
            getattr(head, name).extend(value) if isinstance(value, list) else setattr(head, name, value)
        refused = await failure(stub.CreateArtifactVersion(stream([Request(header=head)])))
        assert (refused.code, refused.fields) == (INVALID, expected), fields

    no_header = await failure(stub.CreateArtifactVersion(stream([Request(chunk=b"x")])))
    assert (no_header.code, no_header.fields) == (INVALID, ["header"])
    two = header({"a": b"x"})
    twice = await failure(stub.CreateArtifactVersion(stream([Request(header=two), Request(header=two)])))
    assert (twice.code, twice.fields) == (INVALID, ["header"])
    bad_name = await failure(log(stub, {"a": b"x"}, artifact="-dash"))
    assert (bad_name.reason, bad_name.fields) == ("NAME_INVALID", ["header.artifact"])
    bad_digests = await failure(
        stub.FindMissingBlobs(
            artifacts_pb2.FindMissingBlobsRequest(parent="projects/demo", sha256=[good, "xyz"])
        )
    )
    assert (bad_digests.code, bad_digests.fields) == (INVALID, ["sha256[1]"])
    await assert_nothing_stored(sqlite_registry)


# Lineage.


async def test_lineage_shows_who_logged_a_version_and_who_used_it(registry: Registry) -> None:
    stub = registry.artifacts
    producer, first_user, second_user = [await new_run(registry) for _ in range(3)]
    logged = await log(stub, {"model.pt": b"w"}, run=producer)
    await log(stub, {"model.pt": b"w2"})

    for user in (
        first_user,
        second_user,
        first_user,
    ):  # a use recorded twice is kept once, with its latest time
        used = await stub.UseArtifactVersion(
            artifacts_pb2.UseArtifactVersionRequest(name="ckpt:v0", project="projects/demo", run=user)
        )
    assert used.version.name == logged.version.name
    assert (list(used.version.used_by), used.version.use_count) == ([first_user, second_user], 2)

    async def listed(*, logged_by: str = "", used_by: str = "") -> list[artifacts_pb2.ArtifactVersion]:
        request = artifacts_pb2.ListArtifactVersionsRequest(
            parent="projects/demo/artifactCollections/-", logged_by=logged_by, used_by=used_by
        )
        return list((await stub.ListArtifactVersions(request)).versions)

    assert [version.name for version in await listed(logged_by=producer)] == [logged.version.name]
    by_user = await listed(used_by=second_user)
    assert [version.name for version in by_user] == [logged.version.name]
    assert list(by_user[0].used_by) == [first_user, second_user]
    assert await listed(used_by=producer) == []

    for reference, reason in [
        ("ckpt:nope", "ALIAS_NOT_FOUND"),
        ("ckpt:v9", "ARTIFACT_VERSION_NOT_FOUND"),
        ("nothing", "ARTIFACT_COLLECTION_NOT_FOUND"),
    ]:
        missing = await failure(
            stub.GetArtifactVersion(
                artifacts_pb2.GetArtifactVersionRequest(name=reference, project="projects/demo")
            )
        )
        assert (missing.code, missing.reason) == (NOT_FOUND, reason), reference
    no_project = await failure(
        stub.GetArtifactVersion(
            artifacts_pb2.GetArtifactVersionRequest(name="projects/void/artifactCollections/a")
        )
    )
    assert no_project.reason == "PROJECT_NOT_FOUND"
    no_run = await failure(
        stub.UseArtifactVersion(
            artifacts_pb2.UseArtifactVersionRequest(
                name="ckpt", project="projects/demo", run="projects/demo/runs/none"
            )
        )
    )
    assert (no_run.code, no_run.reason) == (NOT_FOUND, "RUN_NOT_FOUND")
    elsewhere = await new_run(registry, project="else")
    foreign = await failure(
        stub.UseArtifactVersion(
            artifacts_pb2.UseArtifactVersionRequest(name=logged.version.name, run=elsewhere)
        )
    )
    assert (foreign.code, foreign.fields) == (INVALID, ["run"])
    for reference in (
        "ckpt:",
        "ckpt:v2147483648",
        "projects/demo/artifactCollections/ckpt/versions/2147483648",
    ):
        bad = await failure(
            stub.GetArtifactVersion(
                artifacts_pb2.GetArtifactVersionRequest(name=reference, project="projects/demo")
            )
        )
        assert (bad.code, bad.reason, bad.fields) == (INVALID, "NAME_INVALID", ["name"]), reference
    ended = await new_run(registry)
    await registry.runs.FinishRun(runs_pb2.FinishRunRequest(name=ended, state=common_pb2.RUN_STATE_FINISHED))
    late = await failure(log(stub, {"late": b"!"}, run=ended))
    assert (late.code, late.reason) == (PRECONDITION, "RUN_ENDED")
    used_late = await failure(
        stub.UseArtifactVersion(artifacts_pb2.UseArtifactVersionRequest(name=logged.version.name, run=ended))
    )
    assert (used_late.code, used_late.reason) == (PRECONDITION, "RUN_ENDED")


# Who may do what.


async def test_a_run_token_logs_only_its_own_runs_artifacts_and_reads_the_projects(
    sqlite_registry: Registry,
) -> None:
    registry = sqlite_registry
    mine, other = await new_run(registry, run_id="mine"), await new_run(registry, run_id="other")
    shared = await log(registry.artifacts, {"data.csv": b"1,2"}, artifact="data", type_="dataset")
    token = (
        await registry.keys.MintRunToken(
            keys_pb2.MintRunTokenRequest(run=mine, item=ITEM, job_version=JOB_VERSION)
        )
    ).secret
    reader = (
        await registry.keys.CreateKey(
            keys_pb2.CreateKeyRequest(
                key=keys_pb2.Key(
                    kind=keys_pb2.KEY_KIND_PROJECT,
                    projects=["projects/demo"],
                    role=keys_pb2.PROJECT_ROLE_READ,
                )
            )
        )
    ).secret

    theirs = await log(registry.artifacts, {"model.pt": b"v0"}, artifact="model", run=other, aliases=["prod"])

    async with registry.channel(token) as channel:
        as_run = artifacts_pb2_grpc.ArtifactServiceStub(channel)
        logged = await log(as_run, {"model.pt": b"w"}, run=mine)
        assert logged.version.run == mine
        # The same content as another run's version, with that version's alias: a version of this run's
        # own, so the other run's version keeps its lineage, and the alias moves to this run's version.
        again = await log(
            as_run, {"model.pt": b"v0"}, artifact="model", run=mine, aliases=["prod"], uploads=[]
        )
        assert (again.version.version, again.version.run, again.already_existed) == (1, mine, False)
        untouched = await as_run.GetArtifactVersion(
            artifacts_pb2.GetArtifactVersionRequest(name=theirs.version.name)
        )
        assert (untouched.version.run, list(untouched.version.aliases)) == (other, [])
        for run in (other, ""):
            refused = await failure(log(as_run, {"model.pt": b"w"}, run=run))
            assert (refused.code, refused.metadata["permission"]) == (DENIED, "artifacts.write"), run
        got = await as_run.GetArtifactVersion(
            artifacts_pb2.GetArtifactVersionRequest(name="data:latest", project="projects/demo")
        )
        assert got.version.name == shared.version.name
        _, chunks = await read_file(as_run, shared.version.name, "data.csv")
        assert b"".join(chunks) == b"1,2"
        await as_run.UseArtifactVersion(
            artifacts_pb2.UseArtifactVersionRequest(name="data", project="projects/demo", run=mine)
        )
        someone_else = await failure(
            as_run.UseArtifactVersion(
                artifacts_pb2.UseArtifactVersionRequest(name="data", project="projects/demo", run=other)
            )
        )
        assert (someone_else.code, someone_else.metadata["permission"]) == (DENIED, "runs.write")
        elsewhere = await failure(
            as_run.FindMissingBlobs(artifacts_pb2.FindMissingBlobsRequest(parent="projects/else", sha256=[]))
        )
        assert elsewhere.code == DENIED

    async with registry.channel(reader) as channel:
        as_reader = artifacts_pb2_grpc.ArtifactServiceStub(channel)
        await as_reader.ListArtifactVersions(
            artifacts_pb2.ListArtifactVersionsRequest(parent="projects/demo/artifactCollections/-")
        )
        refused = await failure(log(as_reader, {"x": b"y"}))
        assert (refused.code, refused.metadata["permission"]) == (DENIED, "artifacts.write")
    assert await registry.count_rows("registry_artifact_versions") == 4


async def test_a_start_removes_the_staging_files_a_crash_left(tmp_path: Path) -> None:
    settings = registry_settings(tmp_path / "home", f"sqlite:///{tmp_path / 'registry.db'}")
    staging = settings.artifact_blobs_path / "demo" / "staging"
    staging.mkdir(parents=True)
    left, live = staging / "upload-left", staging / "upload-live"
    left.write_bytes(b"half a checkpoint")
    live.write_bytes(b"another registry's upload")
    two_hours_ago = time.time() - 7200
    os.utime(left, (two_hours_ago, two_hours_ago))

    async for _ in start_registry(settings):
        assert (left.exists(), live.exists()) == (False, True)
