"""Git sources: a cache of bare mirrors, fetched when a pinned commit is missing, exported per commit.

Credentials come from the builder's settings and reach git through its environment only
(``GIT_CONFIG_*`` for an https token, ``GIT_SSH_COMMAND`` for an ssh key), never through arguments or
URLs, so they appear in no process listing, log line, error or stored record. Git never prompts.

Every method blocks: call them from a worker thread in async code.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import git

from takeoff_builder.model import BuildFailed, BuildInfraError
from takeoff_server.archive import extract_archive
from takeoff_server.errors import InvalidArgument
from takeoff_server.git_access import GitCredentials

_MIRROR_REFS = "+refs/*:refs/*"


class GitMirrors:
    """Bare mirrors under ``root``, one per remote URL."""

    def __init__(self, root: Path, credentials: GitCredentials, *, timeout: float) -> None:
        self._root = root
        self._credentials = credentials
        self._timeout = timeout
        self._guard = threading.Lock()
        self._mirror_locks: dict[Path, threading.Lock] = {}

    def export(self, url: str, commit: str, destination: Path, log: Callable[[str], None]) -> None:
        """Write the files of ``commit`` of ``url`` into ``destination``.

        Raises BuildFailed when the remote no longer has the commit, BuildInfraError when it cannot be
        reached.
        """
        mirror_path = self._root / f"{hashlib.sha256(url.encode()).hexdigest()[:32]}.git"
        with self._lock(mirror_path):
            repository = self._open(mirror_path)
            try:
                if not _has_commit(repository, commit):
                    log(f"git: fetching {url}")
                    self._fetch(repository, url, _MIRROR_REFS, "--prune", "--force")
                if not _has_commit(repository, commit):
                    # A commit no ref reaches any more may still be served by id (protocol v2).
                    self._fetch_quietly(repository, url, commit)
                if not _has_commit(repository, commit):
                    raise BuildFailed(f"the git remote {url} no longer has commit {commit}")
                log(f"git: exporting commit {commit}")
                with tempfile.TemporaryDirectory(dir=self._root) as scratch:
                    archive = Path(scratch) / "source.tar.gz"
                    repository.git.archive("--format=tar.gz", f"--output={archive}", commit)
                    try:
                        extract_archive(archive, destination)
                    except InvalidArgument as error:
                        raise BuildFailed(
                            f"commit {commit} of {url} cannot be unpacked: {error.message}"
                        ) from None
            finally:
                repository.close()

    def _lock(self, mirror_path: Path) -> threading.Lock:
        with self._guard:
            return self._mirror_locks.setdefault(mirror_path, threading.Lock())

    def _open(self, mirror_path: Path) -> git.Repo:
        if mirror_path.is_dir():
            return git.Repo(mirror_path)
        self._root.mkdir(parents=True, exist_ok=True)
        return git.Repo.init(mirror_path, bare=True)

    def _fetch(self, repository: git.Repo, url: str, *arguments: str) -> None:
        try:
            repository.git.fetch(
                "--no-write-fetch-head",
                url,
                *arguments,
                env=self._credentials.environment(url),
                kill_after_timeout=self._timeout,
            )
        except git.GitCommandError as error:
            raise BuildInfraError(
                f"could not fetch from the git remote {url}: {self._credentials.explain(error)}"
            ) from None

    def _fetch_quietly(self, repository: git.Repo, url: str, commit: str) -> None:
        with contextlib.suppress(BuildInfraError):  # the caller reports the missing commit
            self._fetch(repository, url, commit)


def _has_commit(repository: git.Repo, commit: str) -> bool:
    try:
        repository.git.cat_file("-e", f"{commit}^{{commit}}")
    except git.GitCommandError:
        return False
    return True
