"""Client streams that send a header first and then bytes (UploadArtifact, CreateArtifactVersion): the
header taken out, the rest as a stream of chunks that refuses a second header."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, TypeVar

from takeoff_server.validation import field_error

HeaderT_co = TypeVar("HeaderT_co", covariant=True)


class UploadPart(Protocol[HeaderT_co]):
    """A message of such a stream: a oneof ``part`` of ``header`` and ``chunk``."""

    @property
    def header(self) -> HeaderT_co: ...

    @property
    def chunk(self) -> bytes: ...

    def WhichOneof(self, oneof_group: Any) -> str | None: ...


async def header_and_chunks(
    messages: AsyncIterator[UploadPart[HeaderT_co]],
) -> tuple[HeaderT_co, AsyncIterator[bytes]]:
    first = await anext(messages, None)
    if first is None or first.WhichOneof("part") != "header":
        raise field_error("header", "the first message of an upload must carry the header")

    async def chunks() -> AsyncIterator[bytes]:
        async for message in messages:
            if message.WhichOneof("part") == "header":
                raise field_error("header", "only the first message may carry a header")
            yield message.chunk

    return first.header, chunks()
