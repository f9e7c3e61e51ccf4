"""Safe unpacking of code tarballs: what is refused, what is allowed, and that nothing escapes."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from takeoff_server.archive import InvalidArchive, UnsafeArchive, check_archive, extract_archive

Member = tuple[str, bytes] | tarfile.TarInfo


def file_member(name: str, content: bytes = b"x") -> Member:
    return (name, content)


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = target
    return member


def special(name: str, kind: bytes) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    return member


def write_tarball(path: Path, members: list[Member]) -> Path:
    with tarfile.open(path, mode="w:gz") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, content = member
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


def test_a_safe_archive_with_inner_links_is_checked_and_extracted(tmp_path: Path) -> None:
    tarball = write_tarball(
        tmp_path / "code.tar.gz",
        [
            special("./", tarfile.DIRTYPE),
            file_member("./train.py", b"print(1)\n"),
            special("pkg", tarfile.DIRTYPE),
            file_member("pkg/model.py", b"W = 1\n"),
            link("pkg/train.py", "../train.py"),
            link("current", "pkg"),
            link("copy.py", "pkg/model.py", tarfile.LNKTYPE),
        ],
    )

    summary = check_archive(tarball)
    assert (summary.members, summary.unpacked_bytes) == (7, len(b"print(1)\n") + len(b"W = 1\n"))

    destination = tmp_path / "out"
    extract_archive(tarball, destination)
    assert (destination / "pkg" / "train.py").read_text() == "print(1)\n"
    assert (destination / "current" / "model.py").read_text() == "W = 1\n"
    assert (destination / "copy.py").read_text() == "W = 1\n"


@pytest.mark.parametrize(
    ("members", "unsafe_member", "problem"),
    [
        ([file_member("../evil.py")], "../evil.py", "'..'"),
        ([file_member("pkg/../../evil.py")], "pkg/../../evil.py", "'..'"),
        ([file_member("/etc/cron.d/evil")], "/etc/cron.d/evil", "absolute"),
        ([link("etc", "/etc")], "etc", "points outside"),
        ([link("up", "../..")], "up", "points outside"),
        ([link("pkg/up", "../../outside")], "pkg/up", "points outside"),
        # Each link alone stays inside; together `b` leads above the root.
        ([link("a", "."), link("b", "a/..")], "b", "points outside"),
        ([link("hard", "/etc/passwd", tarfile.LNKTYPE)], "hard", "absolute"),
        ([link("hard", "missing.py", tarfile.LNKTYPE)], "hard", "not to an earlier file"),
        ([link("dir", "sub"), file_member("dir/file.py")], "dir/file.py", "under the symbolic link"),
        ([file_member("x.py"), link("x.py", "/etc/passwd")], "x.py", "replaces another member"),
        ([special("tty", tarfile.CHRTYPE)], "tty", "device file"),
        ([special("disk", tarfile.BLKTYPE)], "disk", "device file"),
        ([special("pipe", tarfile.FIFOTYPE)], "pipe", "FIFO"),
        ([link("loop", "loop/x")], "loop", "loops"),
    ],
)
def test_unsafe_members_are_refused_naming_the_member(
    tmp_path: Path, members: list[Member], unsafe_member: str, problem: str
) -> None:
    tarball = write_tarball(tmp_path / "evil.tar.gz", members)

    with pytest.raises(UnsafeArchive) as raised:
        check_archive(tarball)
    assert raised.value.reason == "ARCHIVE_UNSAFE"
    assert raised.value.metadata == {"member": unsafe_member}
    assert problem in raised.value.message

    destination = tmp_path / "out"
    with pytest.raises(UnsafeArchive):
        extract_archive(tarball, destination)
    assert not destination.exists()  # refused before anything was written


def test_bytes_that_are_not_a_gzipped_tar_are_invalid(tmp_path: Path) -> None:
    plain_tar = tmp_path / "plain.tar"
    with tarfile.open(plain_tar, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("empty.txt"))
    good = write_tarball(tmp_path / "good.tar.gz", [file_member("a.py", b"a" * 50_000)])
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[:-200])
    text = tmp_path / "text.tar.gz"
    text.write_text("hello")

    for path in (plain_tar, truncated, text):
        with pytest.raises(InvalidArchive) as raised:
            check_archive(path)
        assert raised.value.reason == "ARCHIVE_INVALID", path.name
