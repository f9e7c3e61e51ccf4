"""The client side of named artifacts without a registry: what a version is made of, the bytes an upload
sends, and the local blob cache downloads go through (takeoff._artifacts)."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from takeoff._artifacts import (
    CHUNK_BYTES,
    BlobCache,
    local_files,
    manifest_parts,
    place,
    upload_chunks,
    upload_sources,
)
from takeoff.errors import FailedPreconditionError, InvalidArgumentError, TakeoffError


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_directory_is_every_file_under_it_by_relative_path_with_its_digest(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "b.bin").write_bytes(b"bee")
    (tmp_path / "sub" / "a.txt").write_bytes(b"")
    (tmp_path / "sub" / "deeper" / "c").write_bytes(b"sea" * 1000)
    files = local_files(tmp_path)
    assert [(f.path, f.sha256, f.size_bytes) for f in files] == [
        ("b.bin", sha(b"bee"), 3),
        ("sub/a.txt", sha(b""), 0),
        ("sub/deeper/c", sha(b"sea" * 1000), 3000),
    ]
    [single] = local_files(tmp_path / "b.bin")
    assert single.path == "b.bin"


def test_nothing_to_log_is_said_clearly(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="no file or directory"):
        local_files(tmp_path / "missing")
    with pytest.raises(InvalidArgumentError, match="holds no files"):
        local_files(tmp_path)


def test_an_upload_sends_each_missing_content_once_in_order_in_full_chunks(tmp_path: Path) -> None:
    big = os.urandom(CHUNK_BYTES * 2 + 5)
    small = [os.urandom(1000) for _ in range(3)]
    (tmp_path / "big").write_bytes(big)
    for index, data in enumerate(small):
        (tmp_path / f"small{index}").write_bytes(data)
    (tmp_path / "copy").write_bytes(small[0])  # same content as small0: sent once
    files = local_files(tmp_path)
    missing = [sha(small[1]), sha(big), sha(small[0])]  # the registry has small2
    sources = upload_sources(files, missing)
    assert [source.sha256 for source in sources] == missing
    chunks = list(upload_chunks(sources))
    assert b"".join(chunks) == small[1] + big + small[0]
    assert all(len(chunk) == CHUNK_BYTES for chunk in chunks[:-1])
    assert 0 < len(chunks[-1]) <= CHUNK_BYTES


def serve(data: bytes, reads: list[int], fail_after: int | None = None) -> Callable[[int], Iterator[bytes]]:
    """A ``read_from(offset)`` giving ``data`` in small pieces, noting each offset it was asked for; with
    ``fail_after``, it breaks off (as a dropped stream) once that many bytes were given."""

    def read_from(offset: int) -> Iterator[bytes]:
        reads.append(offset)
        for start in range(offset, len(data), 4096):
            if fail_after is not None and start >= fail_after:
                raise ConnectionError("stream broken")
            yield data[start : start + 4096]

    return read_from


def test_a_fetch_is_checked_cached_and_not_fetched_again(tmp_path: Path) -> None:
    data = os.urandom(50_000)
    cache = BlobCache(tmp_path)
    reads: list[int] = []
    blob, fetched = cache.fetch(sha(data), len(data), serve(data, reads))
    assert (blob.read_bytes(), fetched) == (data, len(data))
    again, fetched_again = cache.fetch(sha(data), len(data), serve(data, reads))
    assert (again, fetched_again, reads) == (blob, 0, [0])
    assert not os.access(blob, os.W_OK) or os.geteuid() == 0  # read-only: links to it are too


def test_a_broken_fetch_is_continued_from_where_it_stopped(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    cache = BlobCache(tmp_path)
    reads: list[int] = []
    with pytest.raises(ConnectionError):
        cache.fetch(sha(data), len(data), serve(data, reads, fail_after=40_960))
    assert cache.cached(sha(data), len(data)) is None
    blob, fetched = cache.fetch(sha(data), len(data), serve(data, reads))
    assert reads == [0, 40_960]
    assert (blob.read_bytes(), fetched) == (data, len(data) - 40_960)


def test_bytes_that_do_not_match_the_manifest_are_not_kept(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    cache = BlobCache(tmp_path)
    with pytest.raises(TakeoffError) as raised:
        cache.fetch(sha(b"something else"), len(data), serve(data, []))
    assert raised.value.reason == "ARTIFACT_DIGEST_MISMATCH"
    assert not isinstance(raised.value, FailedPreconditionError)
    assert not list((cache.root / "partial").iterdir())
    assert not (cache.root / "blobs").exists()


def test_a_changed_blob_is_fetched_again(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    cache = BlobCache(tmp_path / "cache")
    blob, _ = cache.fetch(sha(data), len(data), serve(data, []))
    os.chmod(blob, 0o644)  # changed by hand (as root, permissions do not stop it)
    blob.write_bytes(b"x" * len(data))
    reads: list[int] = []
    fresh, fetched = cache.fetch(sha(data), len(data), serve(data, reads))
    assert (fresh.read_bytes(), fetched, reads) == (data, len(data), [0])


def test_a_downloaded_file_is_a_copy_that_a_job_may_write_without_changing_others(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    cache = BlobCache(tmp_path / "cache")
    blob, _ = cache.fetch(sha(data), len(data), serve(data, []))
    first, second = tmp_path / "d1", tmp_path / "d2"
    place(blob, first, ["sub", "w.bin"])
    place(blob, second, ["sub", "w.bin"])
    (first / "sub" / "w.bin").write_bytes(b"changed by job 1")  # writable, even when not root
    assert (second / "sub" / "w.bin").read_bytes() == data
    assert blob.read_bytes() == data
    assert cache.cached(sha(data), len(data)) == blob
    place(blob, first, ["sub", "w.bin"])  # a changed copy is placed again
    assert (first / "sub" / "w.bin").read_bytes() == data


def test_placing_replaces_what_is_there_and_keeps_a_copy_that_is_already_right(tmp_path: Path) -> None:
    data = b"weights"
    cache = BlobCache(tmp_path / "cache")
    blob, _ = cache.fetch(sha(data), len(data), serve(data, []))
    target = tmp_path / "out" / "sub" / "w.bin"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"old")
    place(blob, tmp_path / "out", ["sub", "w.bin"])
    assert target.read_bytes() == data
    inode = target.stat().st_ino
    place(blob, tmp_path / "out", ["sub", "w.bin"])
    assert target.stat().st_ino == inode  # unchanged since placed: left alone
    assert sorted(path.name for path in target.parent.iterdir()) == ["w.bin"]  # no temporary left


def test_files_are_never_written_through_a_symbolic_link(tmp_path: Path) -> None:
    data = b"weights"
    cache = BlobCache(tmp_path / "cache")
    blob, _ = cache.fetch(sha(data), len(data), serve(data, []))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    directory = tmp_path / "out"
    directory.mkdir()
    (directory / "sub").symlink_to(elsewhere)
    with pytest.raises(InvalidArgumentError, match="symbolic link"):
        place(blob, directory, ["sub", "w.bin"])
    (directory / "w.bin").symlink_to(elsewhere / "target")
    place(blob, directory, ["w.bin"])  # the link itself is replaced, not followed
    assert not (directory / "w.bin").is_symlink()
    assert list(elsewhere.iterdir()) == []
    (directory / "file").write_bytes(b"")
    for where, parts in [(directory, ["file", "w.bin"]), (directory / "file", ["w.bin"])]:
        with pytest.raises(InvalidArgumentError, match="a file is where a folder must be"):
            place(blob, where, parts)


def test_a_manifest_path_or_digest_that_would_leave_the_directory_is_refused(tmp_path: Path) -> None:
    assert manifest_parts("sub/w.bin") == ["sub", "w.bin"]
    for path in ["", "/etc/passwd", "../w", "a/../../w", "a//w", "./w", "a\\..\\w", "a/", "w\0"]:
        with pytest.raises(TakeoffError, match="outside its version") as raised:
            manifest_parts(path)
        assert raised.value.code == "DATA_LOSS"
    victim = tmp_path / "home" / "victim"
    victim.parent.mkdir()
    victim.write_bytes(b"keep")
    cache = BlobCache(tmp_path / "cache")
    for digest in ["../../../home/victim", "A" * 64, "0" * 63]:
        with pytest.raises(TakeoffError, match="not a sha256"):
            cache.fetch(digest, 3, serve(b"abc", []))
    assert victim.read_bytes() == b"keep"


@pytest.mark.parametrize(
    ("before", "after"),
    [(b"a" * 1000, b"a" * 1500), (b"", b"a"), (b"a" * 1000, b"a" * 999), (b"a" * 1000, b"A" * 1000)],
    ids=["grew", "written-after-empty", "shrank", "rewritten"],
)
def test_a_file_changed_after_hashing_is_named_and_not_sent_whole(
    tmp_path: Path, before: bytes, after: bytes
) -> None:
    (tmp_path / "a.bin").write_bytes(before)
    (tmp_path / "b.bin").write_bytes(b"b" * 1000)
    files = local_files(tmp_path)
    (tmp_path / "a.bin").write_bytes(after)
    chunks: list[bytes] = []
    with pytest.raises(FailedPreconditionError, match=r"a\.bin changed while it was being logged"):
        chunks.extend(upload_chunks(upload_sources(files, [file.sha256 for file in files])))
    assert chunks == []  # its last byte never went: the stream does not carry it whole


@pytest.mark.parametrize("kernel", ["without copy_file_range", "refusing it"])
def test_a_plain_copy_is_made_where_the_kernel_cannot_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: str
) -> None:
    data = os.urandom(3 * CHUNK_BYTES // 2)
    cache = BlobCache(tmp_path / "cache")
    blob, _ = cache.fetch(sha(data), len(data), serve(data, []))
    if kernel == "refusing it":

        def refuse(*_: object) -> int:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

        monkeypatch.setattr(os, "copy_file_range", refuse)
    else:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    place(blob, tmp_path / "out", ["w.bin"])
    assert (tmp_path / "out" / "w.bin").read_bytes() == data
