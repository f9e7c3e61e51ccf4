"""Code tarballs (gzip-compressed tar) checked before anything is unpacked, and unpacked only when safe.

Every consumer of an uploaded artifact (the registry on upload, the builder and agent when they unpack
one) goes through :func:`check_archive` or :func:`extract_archive`. A member is refused when it could
write or point outside the destination:

- an absolute name, or a name with a ``..`` component;
- a symbolic link whose target, resolved through the archive's own links, leaves the archive root;
- a hard link to anything but an earlier regular file of the archive;
- a member stored under a symbolic link, or a link that replaces another member;
- anything that is not a regular file, directory or link (device files, FIFOs).

Both functions block: call them from a worker thread in async code.
"""

from __future__ import annotations

import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from takeoff_server.errors import InvalidArgument

_MAX_LINK_HOPS = 40


class InvalidArchive(InvalidArgument):
    """The bytes are not a complete gzip-compressed tar archive."""

    def __init__(self, problem: str) -> None:
        super().__init__("ARCHIVE_INVALID", f"not a gzip-compressed tar archive: {problem}")


class UnsafeArchive(InvalidArgument):
    """A member could escape the destination; ``member`` names it."""

    def __init__(self, member: str, problem: str) -> None:
        super().__init__(
            "ARCHIVE_UNSAFE", f"archive member {member!r} is unsafe: {problem}", metadata={"member": member}
        )
        self.member = member


@dataclass(frozen=True, slots=True)
class ArchiveSummary:
    members: int
    unpacked_bytes: int
    """Total size of the regular files, for callers that limit what they unpack."""


def check_archive(path: Path) -> ArchiveSummary:
    """Read the whole archive at ``path`` and check every member, extracting nothing."""
    with path.open("rb") as file, _open_tar(file) as tar:
        return _check_members(_read_members(tar))


def extract_archive(path: Path, destination: Path) -> ArchiveSummary:
    """Check the archive at ``path``, then unpack it into ``destination`` (created if missing)."""
    with path.open("rb") as file, _open_tar(file) as tar:
        members = _read_members(tar)
        summary = _check_members(members)
        destination.mkdir(parents=True, exist_ok=True)
        try:
            # The standard library's "data" filter repeats the checks against the real filesystem and
            # drops setuid bits: a second line of defence, should the checks above ever miss a case.
            tar.extractall(destination, members=members, filter="data")
        except tarfile.FilterError as error:
            name = error.tarinfo.name if error.tarinfo is not None else "?"
            raise UnsafeArchive(name, str(error)) from None
        except (tarfile.TarError, EOFError, zlib.error) as error:
            raise InvalidArchive(str(error) or type(error).__name__) from None
    return summary


def _open_tar(file: BinaryIO) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=file, mode="r:gz")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise InvalidArchive(str(error) or type(error).__name__) from None


def _read_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    try:
        return tar.getmembers()  # reads to the end, so a truncated archive fails here
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise InvalidArchive(str(error) or type(error).__name__) from None


def _path_parts(name: str) -> list[str]:
    """The normalized components of a member or hard-link name; raises on absolute names and ``..``."""
    if name.startswith("/"):
        raise ValueError("its path is absolute")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError("its path contains '..'")
    return parts


@dataclass
class _Tree:
    """The archive's namespace as extraction would build it: member kinds and symbolic-link targets."""

    kinds: dict[str, str] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)

    def resolve(self, directory: list[str], target: str, hops: int = 0) -> list[str] | None:
        """Where ``target``, read from ``directory``, leads after following the archive's symbolic links;
        None when it leaves the archive root."""
        if target.startswith("/"):
            return None
        current = list(directory)
        for part in target.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not current:
                    return None
                current.pop()
                continue
            current.append(part)
            link = self.symlinks.get("/".join(current))
            if link is not None:
                if hops >= _MAX_LINK_HOPS:
                    raise ValueError("its link chain is too long or loops")
                resolved = self.resolve(current[:-1], link, hops + 1)
                if resolved is None:
                    return None
                current = resolved
        return current


def _check_members(members: list[tarfile.TarInfo]) -> ArchiveSummary:
    tree = _Tree()
    unpacked_bytes = 0
    for member in members:
        try:
            parts = _path_parts(member.name)
            path = "/".join(parts)
            if not parts and not member.isdir():
                raise ValueError("it names the archive root but is not a directory")
            for depth in range(1, len(parts)):
                parent = "/".join(parts[:depth])
                if parent in tree.symlinks:
                    raise ValueError(f"it is stored under the symbolic link {parent!r}")
            if path in tree.kinds and (member.issym() or member.islnk() or path in tree.symlinks):
                raise ValueError("it is a link that replaces another member, or is replaced by one")
            if member.isreg():
                tree.kinds[path] = "file"
                unpacked_bytes += member.size
            elif member.isdir():
                tree.kinds[path] = "dir"
            elif member.issym():
                if not member.linkname:
                    raise ValueError("it is a symbolic link without a target")
                tree.kinds[path] = "symlink"
                tree.symlinks[path] = member.linkname
            elif member.islnk():
                target = "/".join(_path_parts(member.linkname))
                if tree.kinds.get(target) != "file":
                    raise ValueError(f"it is a hard link to {member.linkname!r}, not to an earlier file")
                tree.kinds[path] = "file"
            else:
                raise ValueError("it is a device file, FIFO or other special file")
        except ValueError as problem:
            raise UnsafeArchive(member.name, str(problem)) from None
    # Links are resolved once every link is known: a later link can redirect an earlier one's target.
    for path, target in tree.symlinks.items():
        try:
            escapes = tree.resolve(path.split("/")[:-1], target) is None
        except ValueError as problem:
            raise UnsafeArchive(path, str(problem)) from None
        if escapes:
            raise UnsafeArchive(path, f"its symbolic link target {target!r} points outside the archive")
    return ArchiveSummary(members=len(members), unpacked_bytes=unpacked_bytes)
