"""gRPC servicer of ArtifactService (named artifacts): requests become domain calls, results become protos."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from takeoff.v1 import artifacts_pb2, artifacts_pb2_grpc
from takeoff_registry.named_artifacts import (
    ArtifactCollection,
    ArtifactFile,
    ArtifactVersion,
    NamedArtifacts,
    NewVersion,
    VersionFilter,
)
from takeoff_registry.refs import (
    EVERY_ARTIFACT,
    ArtifactCollectionKey,
    ArtifactReference,
    RunKey,
    check_artifact_id,
    parse_artifact_reference,
    parse_artifact_version,
    parse_project,
)
from takeoff_registry.upload_streams import header_and_chunks
from takeoff_server.idempotency import check_request_id
from takeoff_server.pagination import page_request, page_response
from takeoff_server.protovalues import dict_to_struct, struct_to_dict, timestamp


def _file_to_proto(file: ArtifactFile) -> artifacts_pb2.ArtifactFile:
    return artifacts_pb2.ArtifactFile(path=file.path, sha256=file.sha256, size_bytes=file.size_bytes)


def _version_to_proto(version: ArtifactVersion) -> artifacts_pb2.ArtifactVersion:
    return artifacts_pb2.ArtifactVersion(
        name=version.name,
        version=version.version,
        type=version.type,
        digest=version.digest,
        size_bytes=version.size_bytes,
        files=[_file_to_proto(file) for file in version.files],
        aliases=version.aliases,
        metadata=dict_to_struct(version.metadata),
        run=version.run,
        used_by=version.used_by,
        use_count=version.use_count,
        create_time=timestamp(version.create_time),
    )


def _collection_to_proto(collection: ArtifactCollection) -> artifacts_pb2.ArtifactCollection:
    return artifacts_pb2.ArtifactCollection(
        name=collection.key.name,
        type=collection.type,
        version_count=collection.version_count,
        aliases=collection.aliases,
        create_time=timestamp(collection.create_time),
        update_time=timestamp(collection.update_time),
    )


def _new_version(header: artifacts_pb2.ArtifactVersionHeader) -> NewVersion:
    project = parse_project(header.parent, field="header.parent")
    return NewVersion(
        collection=ArtifactCollectionKey(
            project, check_artifact_id(header.artifact, field="header.artifact")
        ),
        type=header.type,
        run=RunKey.parse(header.run, field="header.run") if header.run else None,
        aliases=tuple(header.aliases),
        metadata=struct_to_dict(header.metadata) if header.HasField("metadata") else {},
        files=tuple(ArtifactFile(file.path, file.sha256, file.size_bytes) for file in header.files),
        uploads=tuple(header.uploads),
    )


def _reference(name: str, project: str) -> ArtifactReference:
    """A reference as Get/UseArtifactVersion take it: ``project`` only for short forms."""
    short_project = (
        parse_project(project, field="project") if project and not name.startswith("projects/") else None
    )
    return parse_artifact_reference(name, project=short_project, field="name")


class ArtifactApi(artifacts_pb2_grpc.ArtifactServiceServicer):
    """Named artifacts: versions, aliases, blobs and lineage."""

    def __init__(self, artifacts: NamedArtifacts) -> None:
        self._artifacts = artifacts

    async def FindMissingBlobs(
        self,
        request: artifacts_pb2.FindMissingBlobsRequest,
        context: grpc.aio.ServicerContext[
            artifacts_pb2.FindMissingBlobsRequest, artifacts_pb2.FindMissingBlobsResponse
        ],
    ) -> artifacts_pb2.FindMissingBlobsResponse:
        project = parse_project(request.parent, field="parent")
        missing = await self._artifacts.find_missing_blobs(project, list(request.sha256))
        return artifacts_pb2.FindMissingBlobsResponse(missing_sha256=missing)

    async def CreateArtifactVersion(
        self,
        request_iterator: AsyncIterator[artifacts_pb2.CreateArtifactVersionRequest],
        context: grpc.aio.ServicerContext[
            artifacts_pb2.CreateArtifactVersionRequest, artifacts_pb2.CreateArtifactVersionResponse
        ],
    ) -> artifacts_pb2.CreateArtifactVersionResponse:
        header, chunks = await header_and_chunks(request_iterator)
        version, already_existed = await self._artifacts.create_version(
            _new_version(header),
            chunks,
            request_id=check_request_id(header.request_id, field="header.request_id"),
        )
        return artifacts_pb2.CreateArtifactVersionResponse(
            version=_version_to_proto(version), already_existed=already_existed
        )

    async def GetArtifactVersion(
        self,
        request: artifacts_pb2.GetArtifactVersionRequest,
        context: grpc.aio.ServicerContext[
            artifacts_pb2.GetArtifactVersionRequest, artifacts_pb2.GetArtifactVersionResponse
        ],
    ) -> artifacts_pb2.GetArtifactVersionResponse:
        version = await self._artifacts.get_version(_reference(request.name, request.project))
        return artifacts_pb2.GetArtifactVersionResponse(version=_version_to_proto(version))

    async def UseArtifactVersion(
        self,
        request: artifacts_pb2.UseArtifactVersionRequest,
        context: grpc.aio.ServicerContext[
            artifacts_pb2.UseArtifactVersionRequest, artifacts_pb2.UseArtifactVersionResponse
        ],
    ) -> artifacts_pb2.UseArtifactVersionResponse:
        reference = _reference(request.name, request.project)
        run = RunKey.parse(request.run, field="run")
        version = await self._artifacts.use_version(reference, run)
        return artifacts_pb2.UseArtifactVersionResponse(version=_version_to_proto(version))

    async def GetArtifactCollection(
        self,
        request: artifacts_pb2.GetArtifactCollectionRequest,
        context: grpc.aio.ServicerContext[
            artifacts_pb2.GetArtifactCollectionRequest, artifacts_pb2.GetArtifactCollectionResponse
        ],
    ) -> artifacts_pb2.GetArtifactCollectionResponse:
        collection = await self._artifacts.get_collection(
            ArtifactCollectionKey.parse(request.name, field="name")
        )
        return artifacts_pb2.GetArtifactCollectionResponse(collection=_collection_to_proto(collection))

    async def ListArtifactCollections(
        self,
        request: artifacts_pb2.ListArtifactCollectionsRequest,
        context: grpc.aio.ServicerContext[
            artifacts_pb2.ListArtifactCollectionsRequest, artifacts_pb2.ListArtifactCollectionsResponse
        ],
    ) -> artifacts_pb2.ListArtifactCollectionsResponse:
        project = parse_project(request.parent, field="parent")
        query = {"parent": request.parent, "type": request.type}
        page = page_request(
            page_size_requested=request.page_size,
            page_token=request.page_token,
            query=query,
            cursor_types=[str],
        )
        collections, more = await self._artifacts.list_collections(project, type_=request.type, page=page)
        shown, token = page_response(
            [(_collection_to_proto(collection), (collection.key.artifact,)) for collection in collections],
            more=more,
            query=query,
        )
        return artifacts_pb2.ListArtifactCollectionsResponse(collections=shown, next_page_token=token)

    async def ListArtifactVersions(
        self,
        request: artifacts_pb2.ListArtifactVersionsRequest,
        context: grpc.aio.ServicerContext[
            artifacts_pb2.ListArtifactVersionsRequest, artifacts_pb2.ListArtifactVersionsResponse
        ],
    ) -> artifacts_pb2.ListArtifactVersionsResponse:
        if (every := EVERY_ARTIFACT.match(request.parent)) is not None:
            project, collection = every["project"], None
        else:
            collection = ArtifactCollectionKey.parse(request.parent, field="parent")
            project = collection.project
        where = VersionFilter(
            collection,
            logged_by=RunKey.parse(request.logged_by, field="logged_by").name if request.logged_by else "",
            used_by=RunKey.parse(request.used_by, field="used_by").name if request.used_by else "",
        )
        query = {"parent": request.parent, "logged_by": request.logged_by, "used_by": request.used_by}
        page = page_request(
            page_size_requested=request.page_size,
            page_token=request.page_token,
            query=query,
            cursor_types=[int],
        )
        versions, more = await self._artifacts.list_versions(project, where, page=page)
        shown, token = page_response(
            [(_version_to_proto(version), (position,)) for version, position in versions],
            more=more,
            query=query,
        )
        return artifacts_pb2.ListArtifactVersionsResponse(versions=shown, next_page_token=token)

    async def ReadArtifactFile(
        self,
        request: artifacts_pb2.ReadArtifactFileRequest,
        context: grpc.aio.ServicerContext[
            artifacts_pb2.ReadArtifactFileRequest, artifacts_pb2.ReadArtifactFileResponse
        ],
    ) -> AsyncIterator[artifacts_pb2.ReadArtifactFileResponse]:
        reference = parse_artifact_version(request.name, field="name")
        file, chunks = await self._artifacts.open_file(reference, request.path, offset=request.offset)
        yield artifacts_pb2.ReadArtifactFileResponse(file=_file_to_proto(file))
        async for chunk in chunks:
            yield artifacts_pb2.ReadArtifactFileResponse(chunk=chunk)
