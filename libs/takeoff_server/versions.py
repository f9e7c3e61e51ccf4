"""What a numbered job version resolves to, kept by the services that ask the registry for it.

A job's versions are immutable (docs/design.md §4), so a reference naming one by its number (``job:vN``,
``projects/P/jobs/J/versions/N``) resolves to the same version for ever and its answer may be kept; a job's
name or alias is asked for every time, so that an alias moved, or a new ``latest``, is seen at once.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

NUMBERED_VERSION = re.compile(r"(:v|/versions/)[0-9]+$")
"""A reference that names a version by its number."""
VERSION_CACHE_SIZE = 4096

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def names_a_numbered_version(reference: str) -> bool:
    return NUMBERED_VERSION.search(reference) is not None


class VersionCache(Generic[K, V]):
    """Resolved versions by numbered reference; the least recently used goes first."""

    def __init__(self, size: int = VERSION_CACHE_SIZE) -> None:
        self._size = size
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: K, resolved: V) -> None:
        self._entries[key] = resolved
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
