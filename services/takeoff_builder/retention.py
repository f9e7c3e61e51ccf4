"""What the builder prunes, and what it never prunes because it is in use (docs/design.md §9, "Retention").

One pass removes build records (with their logs) that ended more than ``max_age_days`` ago, request ids
older than ``request_id_days``, and the venvs, code directories and images (those the builder made) that
were last handed out more than ``max_age_days`` ago; then, while the venvs and code together are over
``max_bytes`` (images over ``max_image_bytes``), the least recently handed out go first.

Never pruned, as "in use":

- what a build under way uses or makes (its environment key, source digest, image tag), on this builder
  or, read from the database at the start of the pass, on any replica sharing it;
- what a build handed out within ``in_use_hours``: the agent runs a local-process job straight from the
  venv on this disk (and Slurm and Ray jobs from the same path on a shared disk), for as long as the job
  runs, and the builder is not told when it ends;
- a venv or code directory that a process on this host runs from (its command line, working directory or
  ``VIRTUAL_ENV`` lies inside it), whatever its age: a long job started by a local agent;
- an image a container, running or stopped, was made from (the engine refuses to remove it).

Jobs on other hosts (Slurm, Ray) are seen only through ``in_use_hours``: set it above their longest run.
An entry's last use is the end of the newest successful build record naming it, or the modification time
of its directory, which every cache hit answered from the cache sets (its lease: ``Shelf.hand_out``), or
an image's creation time. A published entry is first unpublished (its link removed, with no await between
the check that no build holds it and the removal, so a build either sees it gone and makes it again or
already holds it); its lease is read once more after that, and an entry handed out meanwhile (by another
replica: this one's hits are held) is published again and kept. Then it is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from takeoff_builder.builds import Builder, Clock, utc_now
from takeoff_builder.images import Images
from takeoff_builder.metrics import BuilderMetrics
from takeoff_builder.model import BuildError
from takeoff_builder.settings import BuilderRetentionSettings
from takeoff_builder.store import BuildStore
from takeoff_server.retention import remove_tree, tree_bytes

logger = logging.getLogger(__name__)

SHELVES = ("venvs", "code")


@dataclass
class Entry:
    what: str
    """``venvs``, ``code`` or ``images``."""
    key: str
    """Environment key, source digest, or image tag."""
    last_use: datetime
    size_bytes: int
    path: Path | None = None
    link: Path | None = None
    """The published link to ``path``, when it is the current entry for ``key``."""


@dataclass(frozen=True, slots=True)
class _Limits:
    too_old: datetime | None
    in_use_since: datetime
    running_from: Sequence[str] = ()
    held_elsewhere: set[str] = field(default_factory=set)
    """What builds under way on other builder replicas hold, read at the start of the pass."""


@dataclass
class PruneReport:
    removed: dict[str, int] = field(default_factory=dict)
    """What was removed, by kind: builds, request_ids, venvs, code, images."""
    bytes_freed: int = 0
    kept_in_use: int = 0
    """Entries past a limit that stayed because they are in use."""

    def __str__(self) -> str:
        counts = ", ".join(f"{count} {what}" for what, count in self.removed.items() if count) or "nothing"
        return f"removed {counts} ({self.bytes_freed} bytes); {self.kept_in_use} kept as in use"


def paths_in_use_on_this_host() -> list[str]:
    """Paths processes on this host run from: each argument of their command lines, their working
    directories and ``VIRTUAL_ENV``. Other users' environments are unreadable, their command lines not."""
    paths: list[str] = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        base = f"/proc/{pid}"
        with contextlib.suppress(OSError):
            paths += Path(f"{base}/cmdline").read_bytes().decode(errors="replace").split("\0")
        with contextlib.suppress(OSError):
            paths.append(os.readlink(f"{base}/cwd"))
        with contextlib.suppress(OSError):
            for variable in Path(f"{base}/environ").read_bytes().split(b"\0"):
                if variable.startswith(b"VIRTUAL_ENV="):
                    paths.append(variable.removeprefix(b"VIRTUAL_ENV=").decode(errors="replace"))
    return [path for path in paths if path.startswith("/")]


def _scan_shelf(root: Path, what: str, uses: dict[str, datetime], *, measure: bool) -> list[Entry]:
    """The entries under a shelf: each ``{key}.{nonce}`` directory, with the link to it if published, and
    its size when ``measure`` (walking every venv costs a pass time, so only a size limit pays for it)."""
    if not root.is_dir():
        return []
    root = root.resolve()
    published = {
        link.resolve(): link for link in root.iterdir() if link.is_symlink() and not link.name.startswith(".")
    }
    entries = []
    for path in root.iterdir():
        if path.is_symlink() or not path.is_dir() or "." not in path.name:
            continue
        with contextlib.suppress(OSError):
            created = datetime.fromtimestamp(path.stat().st_mtime).astimezone()
            entries.append(
                Entry(
                    what,
                    path.name.rsplit(".", 1)[0],
                    max(uses.get(str(path), created), created),
                    tree_bytes(path) if measure else 0,
                    path,
                    published.get(path),
                )
            )
    return entries


def _links_to(link: Path, entry: Path) -> bool:
    """Whether ``link`` still publishes ``entry`` (a no_cache rebuild may have published a newer one)."""
    try:
        return os.readlink(link) == entry.name
    except OSError:
        return False


def _handed_out_since(entry: Path, moment: datetime) -> bool:
    """Whether a cache hit renewed ``entry``'s lease (its modification time) since ``moment``."""
    try:
        return datetime.fromtimestamp(entry.stat().st_mtime).astimezone() >= moment
    except OSError:
        return False


def _publish_again(link: Path, entry: Path) -> None:
    """Publish ``entry`` under ``link`` again, unless a build published another there meanwhile."""
    with contextlib.suppress(FileExistsError):
        link.symlink_to(entry.name)


class BuilderRetention:
    def __init__(
        self,
        settings: BuilderRetentionSettings,
        *,
        store: BuildStore,
        builder: Builder,
        builds_dir: Path,
        images: Images,
        metrics: BuilderMetrics,
        clock: Clock = utc_now,
        paths_in_use: Callable[[], Iterable[str]] = paths_in_use_on_this_host,
    ) -> None:
        self._settings = settings
        self._store = store
        self._builder = builder
        self._builds_dir = builds_dir
        self._images = images
        self._metrics = metrics
        self._clock = clock
        self._paths_in_use = paths_in_use

    async def prune(self) -> PruneReport:
        """One pass; see the module's docstring for what goes and what stays."""
        settings = self._settings
        now = self._clock()
        too_old = now - timedelta(days=settings.max_age_days) if settings.max_age_days is not None else None
        report = PruneReport()
        builds, request_ids = await self._store.prune(
            builds_before=too_old, request_ids_before=settings.request_ids_before(now)
        )
        report.removed.update(builds=builds, request_ids=request_ids)
        uses = await self._store.last_uses()
        on_disk = await asyncio.to_thread(self._scan, uses)
        running_from = await asyncio.to_thread(lambda: list(self._paths_in_use()))
        limits = _Limits(
            too_old, settings.in_use_since(now), running_from, await self._builder.held_elsewhere()
        )
        await self._prune_group(on_disk, settings.max_bytes, limits, report)
        try:
            images = [
                Entry(
                    "images",
                    image.tag,
                    max(uses.get(image.tag, image.create_time), image.create_time),
                    image.size_bytes,
                )
                for image in await self._images.built()
            ]
            await self._prune_group(images, settings.max_image_bytes, limits, report)
        except BuildError as error:  # a builder of venvs alone may have no engine at all
            logger.info("images not pruned: %s", error.message)
        for what, count in report.removed.items():
            self._metrics.pruned.labels(what).inc(count)
        return report

    def _scan(self, uses: dict[str, datetime]) -> list[Entry]:
        measure = self._settings.max_bytes is not None
        return [
            entry
            for what in SHELVES
            for entry in _scan_shelf(self._builds_dir / what, what, uses, measure=measure)
        ]

    def _in_use(self, entry: Entry, limits: _Limits) -> bool:
        held = entry.key in self._builder.held() or entry.key in limits.held_elsewhere
        if held or entry.last_use >= limits.in_use_since:
            return True
        if entry.path is None:
            return False
        inside = str(entry.path)
        return any(path == inside or path.startswith(inside + "/") for path in limits.running_from)

    async def _prune_group(
        self, entries: list[Entry], max_bytes: int | None, limits: _Limits, report: PruneReport
    ) -> None:
        total = sum(entry.size_bytes for entry in entries)
        for entry in sorted(entries, key=lambda entry: entry.last_use):
            superseded = entry.path is not None and entry.link is None
            aged = limits.too_old is not None and entry.last_use < limits.too_old
            over = max_bytes is not None and total > max_bytes
            if not (superseded or aged or over):
                continue
            if self._in_use(entry, limits) or not await self._remove(entry, limits):
                report.kept_in_use += int(aged or over)
                continue
            total -= entry.size_bytes
            report.removed[entry.what] = report.removed.get(entry.what, 0) + 1
            report.bytes_freed += entry.size_bytes
            self._metrics.pruned_bytes.labels(entry.what).inc(entry.size_bytes)

    async def _remove(self, entry: Entry, limits: _Limits) -> bool:
        if entry.key in self._builder.held():  # a build started while this pass was looking elsewhere
            return False
        if entry.path is None:
            # Under the image builds' lock: a build of the tag waits, then finds it gone and makes it.
            async with self._builder.image_lock(entry.key):
                if entry.key in self._builder.held():  # one looked it up while this waited for the lock
                    return False
                return await self._images.remove(entry.key)
        if entry.link is not None and _links_to(entry.link, entry.path):
            entry.link.unlink(missing_ok=True)  # right after the check (docstring); a replica may be first
            if _handed_out_since(entry.path, limits.in_use_since):
                _publish_again(entry.link, entry.path)
                return False
        entry.size_bytes = entry.size_bytes or await asyncio.to_thread(tree_bytes, entry.path)
        await asyncio.to_thread(remove_tree, entry.path)
        return True
