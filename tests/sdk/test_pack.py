"""Packing a directory for upload: deterministic bytes, git's ignore rules, and safe symlinks only."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from takeoff._pack import FIXED_MTIME, PackError, pack_directory, packed_paths


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def pack(root: Path) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    packed = pack_directory(root, buffer)
    assert packed.size_bytes == len(buffer.getvalue())
    return buffer.getvalue(), packed.sha256


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        return {member.name: member for member in archive.getmembers()}


def test_the_same_files_give_the_same_bytes_whatever_their_times_owners_and_creation_order(
    tmp_path: Path,
) -> None:
    files = {"train.py": "print('hi')\n", "pkg/model.py": "W = 1\n", "pkg/data/a.csv": "x\n1\n"}
    first, second = tmp_path / "first", tmp_path / "second"
    write(first, files)
    write(second, dict(reversed(files.items())))
    os.utime(second / "train.py", (1_000_000, 1_000_000))
    (second / "pkg/model.py").chmod(0o664)

    first_bytes, first_digest = pack(first)
    second_bytes, second_digest = pack(second)

    assert first_bytes == second_bytes
    assert first_digest == second_digest
    assert list(members(first_bytes)) == ["pkg/data/a.csv", "pkg/model.py", "train.py"]
    for member in members(first_bytes).values():
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (
            FIXED_MTIME,
            0,
            0,
            "",
            "",
        )


def test_a_changed_file_changes_the_digest(tmp_path: Path) -> None:
    write(tmp_path, {"train.py": "print(1)\n"})
    _, before = pack(tmp_path)
    write(tmp_path, {"train.py": "print(2)\n"})
    _, after = pack(tmp_path)
    assert before != after


def test_permissions_are_normalised_keeping_only_the_executable_bit(tmp_path: Path) -> None:
    write(tmp_path, {"run.sh": "#!/bin/sh\n", "notes.txt": "n\n"})
    (tmp_path / "run.sh").chmod(0o700)
    (tmp_path / "notes.txt").chmod(0o600)
    data, _ = pack(tmp_path)
    assert members(data)["run.sh"].mode == 0o755
    assert members(data)["notes.txt"].mode == 0o644


def test_gitignore_rules_apply_per_directory_and_takeoffignore_adds_and_overrides(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            ".gitignore": "*.pyc\nbuild/\n*.log\n!keep.pyc\n",
            ".takeoffignore": "data/\n!notes.log\n",
            "train.py": "",
            "cache.pyc": "",
            "keep.pyc": "",
            "run.log": "",
            "notes.log": "",
            "build/out.bin": "",
            "data/big.bin": "",
            "src/.gitignore": "local.txt\n/only-here.txt\n",
            "src/local.txt": "",
            "src/only-here.txt": "",
            "src/deep/local.txt": "",
            "src/deep/only-here.txt": "",
            "src/main.py": "",
            ".git/HEAD": "ref: refs/heads/main\n",
            "vendor/lib/.git": "gitdir: ../../.git/modules/lib\n",
            "vendor/lib/lib.py": "",
        },
    )
    assert packed_paths(tmp_path) == [
        ".gitignore",
        ".takeoffignore",
        "keep.pyc",
        "notes.log",
        "src/.gitignore",
        "src/deep/only-here.txt",
        "src/main.py",
        "train.py",
        "vendor/lib/lib.py",
    ]


def test_a_file_inside_an_ignored_directory_cannot_be_reincluded(tmp_path: Path) -> None:
    # Git does not look inside an excluded directory, so a negation for a file within it has no effect.
    write(tmp_path, {".gitignore": "out/\n!out/keep.txt\n", "out/keep.txt": "", "a.py": ""})
    assert packed_paths(tmp_path) == [".gitignore", "a.py"]


def test_packed_code_extracts_to_the_same_files(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    write(source, {"a.py": "alpha\n", "pkg/b.py": "beta\n", "pkg/empty.txt": ""})
    data, _ = pack(source)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        archive.extractall(target, filter="data")
    for name in ("a.py", "pkg/b.py", "pkg/empty.txt"):
        assert (target / name).read_bytes() == (source / name).read_bytes()


def test_symlinks_inside_the_directory_are_kept_as_links(tmp_path: Path) -> None:
    write(tmp_path, {"configs/base.yaml": "lr: 1\n", "pkg/mod.py": ""})
    (tmp_path / "config.yaml").symlink_to("configs/base.yaml")
    (tmp_path / "pkg_link").symlink_to("pkg", target_is_directory=True)
    (tmp_path / "absolute.yaml").symlink_to(tmp_path / "configs/base.yaml")
    (tmp_path / "configs/detour.yaml").symlink_to(f"../../{tmp_path.name}/configs/base.yaml")

    entries = members(pack(tmp_path)[0])

    assert entries["config.yaml"].issym()
    assert entries["config.yaml"].linkname == "configs/base.yaml"
    assert entries["pkg_link"].issym()  # kept as a link, not descended into
    assert "pkg_link/mod.py" not in entries
    assert entries["absolute.yaml"].linkname == "configs/base.yaml"
    assert entries["configs/detour.yaml"].linkname == "base.yaml"


def test_a_symlink_pointing_outside_is_refused_with_its_name(tmp_path: Path) -> None:
    root = tmp_path / "code"
    write(root, {"train.py": ""})
    write(tmp_path, {"secret.txt": "s"})
    (root / "leak.txt").symlink_to("../secret.txt")
    with pytest.raises(PackError, match=r"symlink leak\.txt points outside"):
        pack(root)


def test_an_ignored_symlink_pointing_outside_is_fine(tmp_path: Path) -> None:
    root = tmp_path / "code"
    write(root, {"train.py": "", ".takeoffignore": "datasets\n"})
    (root / "datasets").symlink_to("/usr", target_is_directory=True)
    assert packed_paths(root) == [".takeoffignore", "train.py"]


def test_packing_something_that_is_not_a_directory_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(PackError, match="is not a directory"):
        pack(tmp_path / "missing")
