"""Git job sources: check remote URLs and refs, and pin a ref to the commit it names right now.

Resolution runs ``git ls-remote`` through GitPython in a worker thread. A full 40-hex commit that is not
the tip of any ref cannot be seen by ls-remote, so it is fetched (depth 1, into a scratch bare repository
that is deleted afterwards): a commit is accepted only if the remote really has it.

Credentials come from the registry's settings and reach git through its environment only
(``GIT_CONFIG_*`` for an https token, ``GIT_SSH_COMMAND`` for an ssh key), never through arguments, so
they appear in no process listing, error, log line or stored record. Git never prompts.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import git

from takeoff_server.errors import FailedPrecondition, InvalidArgument, NotFound
from takeoff_server.git_access import GitCredentials
from takeoff_server.validation import field_error

FULL_COMMIT = re.compile(r"[0-9a-f]{40}")
_SCHEMES = ("https", "http", "ssh", "git", "file")
_SCP_LIKE = re.compile(r"(?:[A-Za-z0-9._-]+@)?[A-Za-z0-9.-]+:(?!:).+")
_UNSAFE_CHARACTERS = re.compile(r"[\s\x00-\x1f\x7f]")
_REF_FORBIDDEN = re.compile(r"[\s\x00-\x1f\x7f~^:?*\[\\]|\.\.|@\{|//")
_FETCH_NOT_FOUND = ("not our ref", "couldn't find remote ref", "no such remote ref", "unadvertised object")


def _source_invalid(field: str, problem: str) -> InvalidArgument:
    return field_error(field, problem, reason="SOURCE_INVALID")


def check_url(url: str, *, field: str) -> str:
    """A remote URL of a supported kind, carrying no credentials."""
    if not url:
        raise _source_invalid(field, "a git remote URL is required")
    if url.startswith("-") or _UNSAFE_CHARACTERS.search(url):
        raise _source_invalid(
            field, "the git URL must not start with '-' or contain spaces or control characters"
        )
    if "://" not in url:
        if not _SCP_LIKE.fullmatch(url):
            raise _source_invalid(
                field, f"{url!r} is not a git remote URL: use {', '.join(_SCHEMES)}:// or user@host:path"
            )
        return url
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise _source_invalid(
            field, f"git URL scheme {parts.scheme!r} is not supported (use one of {', '.join(_SCHEMES)})"
        )
    carries_credentials = parts.password is not None or (
        parts.username is not None and parts.scheme in ("https", "http", "git")
    )
    if carries_credentials:
        raise _source_invalid(
            field,
            "the git URL carries credentials; remove them and configure the registry's "
            "git_https_token or git_ssh_key_path instead",
        )
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise _source_invalid(field, "a file:// URL needs an absolute path, e.g. file:///srv/repo.git")
    elif not parts.hostname:
        raise _source_invalid(field, f"the git URL {url!r} names no host")
    return url


def check_ref(ref: str, *, field: str) -> str:
    """A branch, tag or commit name git itself would accept (empty: the remote's HEAD)."""
    if not ref:
        return ref
    if (
        len(ref) > 255
        or ref.startswith(("-", "/"))
        or ref.endswith(("/", ".", ".lock"))
        or _REF_FORBIDDEN.search(ref)
    ):
        raise _source_invalid(field, f"{ref!r} is not a valid git branch, tag or commit name")
    return ref


class GitResolver:
    """Resolves refs of remote repositories to commits, with the configured credentials."""

    def __init__(self, credentials: GitCredentials, *, timeout: float, scratch_dir: Path) -> None:
        self._credentials = credentials
        self._timeout = timeout
        self._scratch_dir = scratch_dir

    async def resolve(self, url: str, ref: str) -> str:
        """The full commit ``ref`` names in the remote now (empty ``ref``: HEAD).

        Raises FAILED_PRECONDITION ``GIT_REMOTE_UNREACHABLE`` when the remote cannot be listed, NOT_FOUND
        ``GIT_REF_NOT_FOUND`` when it has no such ref or commit.
        """
        return await asyncio.to_thread(self._resolve, url, ref)

    def _resolve(self, url: str, ref: str) -> str:
        refs = self._list_refs(url)
        if FULL_COMMIT.fullmatch(ref):
            if ref not in refs.values():
                self._fetch_commit(url, ref)
            return ref
        # The order git itself uses to expand a short name (gitrevisions(7)).
        candidates = [ref, f"refs/{ref}", f"refs/tags/{ref}", f"refs/heads/{ref}"] if ref else ["HEAD"]
        for candidate in candidates:
            if candidate in refs:
                return refs[candidate]
        what = f"ref {ref!r}" if ref else "HEAD (is the repository empty?)"
        raise NotFound(
            "GIT_REF_NOT_FOUND", f"the git remote {url} has no {what}", metadata={"url": url, "ref": ref}
        )

    def _list_refs(self, url: str) -> dict[str, str]:
        try:
            listing = git.cmd.Git().ls_remote(
                url, env=self._credentials.environment(url), kill_after_timeout=self._timeout
            )
        except git.GitCommandError as error:
            raise FailedPrecondition(
                "GIT_REMOTE_UNREACHABLE",
                f"the git remote {url} could not be listed: {self._credentials.explain(error)}",
                metadata={"url": url},
            ) from None
        refs: dict[str, str] = {}
        for line in str(listing).splitlines():
            commit, _, name = line.partition("\t")
            # An annotated tag is listed twice; the `^{}` line names the commit it points at.
            refs[name.removesuffix("^{}")] = commit
        return refs

    def _fetch_commit(self, url: str, commit: str) -> None:
        self._scratch_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self._scratch_dir, prefix="commit-") as scratch:
            repository = git.Repo.init(scratch, bare=True)
            try:
                repository.git.fetch(
                    "--depth=1",
                    "--filter=tree:0",
                    "--no-tags",
                    url,
                    commit,
                    env=self._credentials.environment(url),
                    kill_after_timeout=self._timeout,
                )
            except git.GitCommandError as error:
                explanation = self._credentials.explain(error)
                if any(marker in explanation for marker in _FETCH_NOT_FOUND):
                    raise NotFound(
                        "GIT_REF_NOT_FOUND",
                        f"the git remote {url} has no commit {commit}",
                        metadata={"url": url, "ref": commit},
                    ) from None
                raise FailedPrecondition(
                    "GIT_REMOTE_UNREACHABLE",
                    f"could not fetch commit {commit} from the git remote {url}: {explanation}",
                    metadata={"url": url},
                ) from None
            finally:
                repository.close()
