"""A directory of cached build outputs, each published atomically under its key.

An entry is built in a directory of its own, ``{key}.{nonce}``, at the path it will be used from (a
virtualenv cannot be moved: its scripts name their interpreter by absolute path). Only a successful
build publishes it, by renaming a symbolic link ``{key} -> {key}.{nonce}`` into place, which is atomic:
a reader sees the old entry or the new one, never half of one. A failed build is deleted; a crash
leaves an unpublished directory that nothing reads. Rebuilding a key (``no_cache``) publishes a new
entry and leaves the old one for whoever still uses it.

Every method blocks on the filesystem: call them from a worker thread in async code.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


class Shelf:
    def __init__(self, root: Path) -> None:
        self.root = root

    def lookup(self, key: str) -> Path | None:
        """The published entry for ``key``, or None."""
        link = self.root / key
        if not link.is_symlink():
            return None
        target = link.resolve()
        return target if target.is_dir() else None

    def hand_out(self, key: str) -> Path | None:
        """The published entry for ``key``, its modification time set to now, or None.

        The modification time is the entry's lease: retention leaves an entry touched within its in-use
        window alone, on every replica sharing the directory, and looks at it once more right after
        unpublishing the entry (publishing it again when it was touched meanwhile). An entry is handed out
        only if it is still published after the touch, so that either retention sees the touch or this
        sees the entry unpublished."""
        entry = self.lookup(key)
        if entry is None:
            return None
        try:
            os.utime(entry)
        except FileNotFoundError:  # deleted since the look-up
            return None
        except PermissionError:  # made by another user (a replica): the hit's record is the lease
            pass
        return entry if self.lookup(key) == entry else None

    def new_entry(self, key: str) -> Path:
        """A fresh, empty directory to build ``key`` in."""
        self.root.mkdir(parents=True, exist_ok=True)
        entry = self.root / f"{key}.{uuid.uuid4().hex[:12]}"
        entry.mkdir()
        return entry

    def publish(self, key: str, entry: Path) -> Path:
        """Make ``entry`` the one ``lookup(key)`` returns; returns it."""
        staged = self.root / f".{entry.name}.link"
        staged.unlink(missing_ok=True)
        staged.symlink_to(entry.name)
        os.replace(staged, self.root / key)
        return entry

    @staticmethod
    def discard(entry: Path) -> None:
        shutil.rmtree(entry, ignore_errors=True)
