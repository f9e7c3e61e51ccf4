"""The code of job versions, unpacked once per source digest (artifact sha256 or git commit).

The cached tree is never run in place: each attempt copies it into a work directory of its own.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

from takeoff_builder.git_mirrors import GitMirrors
from takeoff_builder.locks import KeyedLocks, Locks
from takeoff_builder.model import BuildFailed, CodeSource, GitSource, JobSpec
from takeoff_builder.registry_client import RegistryClient
from takeoff_builder.shelf import Shelf
from takeoff_server.archive import extract_archive
from takeoff_server.errors import InvalidArgument


class CodeCache:
    def __init__(
        self,
        root: Path,
        registry: RegistryClient,
        git_mirrors: GitMirrors,
        *,
        locks: Locks | None = None,
        mirror_locks: Locks | None = None,
    ) -> None:
        self._shelf = Shelf(root / "code")
        self._downloads = root / "downloads"
        self._registry = registry
        self._git_mirrors = git_mirrors
        self._locks = locks or KeyedLocks()
        self._mirror_locks = mirror_locks or KeyedLocks()
        """By remote URL: the mirror is one directory, which builder replicas may share."""

    async def lookup(self, spec: JobSpec) -> Path | None:
        return await asyncio.to_thread(self._shelf.lookup, spec.source_digest)

    def hand_out(self, spec: JobSpec) -> Path | None:
        """The cached code of ``spec``, its lease renewed (``Shelf.hand_out``); blocks."""
        return self._shelf.hand_out(spec.source_digest)

    async def ensure(self, spec: JobSpec, log: Callable[[str], None], *, rebuild: bool = False) -> Path:
        """The unpacked code of ``spec``, fetching and unpacking it unless it is cached."""
        digest = spec.source_digest
        async with self._locks.hold(digest):
            if not rebuild and (cached := await asyncio.to_thread(self._shelf.lookup, digest)):
                log(f"code {digest[:16]} is cached")
                return cached
            entry = await asyncio.to_thread(self._shelf.new_entry, digest)
            try:
                match spec.source:
                    case CodeSource(sha256=sha256):
                        await self._unpack_artifact(spec.project, sha256, entry, log)
                    case GitSource(url=url, commit=commit):
                        async with self._mirror_locks.hold(url):
                            await asyncio.to_thread(self._git_mirrors.export, url, commit, entry, log)
                return await asyncio.to_thread(self._shelf.publish, digest, entry)
            except BaseException:
                await asyncio.shield(asyncio.to_thread(Shelf.discard, entry))
                raise

    async def _unpack_artifact(
        self, project: str, sha256: str, destination: Path, log: Callable[[str], None]
    ) -> None:
        await asyncio.to_thread(self._downloads.mkdir, parents=True, exist_ok=True)
        download = self._downloads / f"{sha256}.{uuid.uuid4().hex[:12]}.tar.gz"
        try:
            log(f"downloading code artifact {sha256[:16]}")
            await self._registry.download_artifact(project, sha256, download)
            try:
                summary = await asyncio.to_thread(extract_archive, download, destination)
            except InvalidArgument as error:
                raise BuildFailed(f"the code artifact {sha256} cannot be unpacked: {error.message}") from None
            log(f"unpacked {summary.members} archive members ({summary.unpacked_bytes} bytes of files)")
        finally:
            await asyncio.to_thread(download.unlink, missing_ok=True)
