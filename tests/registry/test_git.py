"""Git job sources against real repositories made here: over file://, from `git daemon` and an https
server on loopback. Refs are pinned to commits; bad refs and remotes fail cleanly; secrets never leak."""

from __future__ import annotations

import base64
import http.server
import shutil
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from takeoff.v1 import common_pb2, jobs_pb2
from tests.conftest import require
from tests.gitrepos import free_port
from tests.gitrepos import git_daemon as serve_with_git_daemon
from tests.registry.conftest import Registry, failure, registry_settings, start_registry

GIT = shutil.which("git")
TOKEN = "s3cret-t0ken-value"


def git(*args: str, cwd: Path) -> str:
    require("git", GIT is not None, "apt-get install git")
    assert GIT is not None
    result = subprocess.run(
        [GIT, "-c", "user.name=T", "-c", "user.email=t@example.com", *args],
        cwd=cwd,
        capture_output=True,
        check=True,
        text=True,
    )
    return result.stdout.strip()


@dataclass
class Remote:
    """A bare repository: ``main`` with two commits (``v1`` an annotated tag on the first), ``feature``."""

    path: Path
    first: str
    main: str
    feature: str

    @property
    def url(self) -> str:
        return f"file://{self.path}"


@pytest.fixture
def remote(tmp_path: Path) -> Remote:
    work = tmp_path / "work"
    work.mkdir()
    git("init", "-q", "-b", "main", cwd=work)
    (work / "train.py").write_text("print('v1')\n")
    git("add", ".", cwd=work)
    git("commit", "-q", "-m", "first", cwd=work)
    first = git("rev-parse", "HEAD", cwd=work)
    git("tag", "-a", "v1", "-m", "release 1", cwd=work)
    (work / "train.py").write_text("print('v2')\n")
    git("commit", "-q", "-am", "second", cwd=work)
    main = git("rev-parse", "HEAD", cwd=work)
    git("checkout", "-q", "-b", "feature", first, cwd=work)
    (work / "feature.py").write_text("x = 1\n")
    git("add", ".", cwd=work)
    git("commit", "-q", "-m", "feature", cwd=work)
    feature = git("rev-parse", "HEAD", cwd=work)
    git("checkout", "-q", "main", cwd=work)
    bare = tmp_path / "remote.git"
    git("clone", "-q", "--bare", str(work), str(bare), cwd=tmp_path)
    return Remote(bare, first, main, feature)


def git_version(url: str, ref: str = "") -> common_pb2.JobVersion:
    return common_pb2.JobVersion(
        source=common_pb2.JobSource(git=common_pb2.GitSource(url=url, ref=ref)),
        entrypoint=["python", "train.py"],
    )


async def create(
    registry: Registry, url: str, ref: str = "", job: str = "train"
) -> jobs_pb2.CreateJobVersionResponse:
    return await registry.jobs.CreateJobVersion(
        jobs_pb2.CreateJobVersionRequest(
            parent=f"projects/demo/jobs/{job}", version=git_version(url, ref), allow_missing=True
        )
    )


async def test_refs_are_pinned_to_the_commit_they_name_now(registry: Registry, remote: Remote) -> None:
    expected = {
        "": remote.main,
        "main": remote.main,
        "refs/heads/main": remote.main,
        "feature": remote.feature,
        "v1": remote.first,  # an annotated tag resolves to its commit, not to the tag object
        remote.first: remote.first,  # a commit that is no branch tip: fetched to prove it exists
    }
    for ref, commit in expected.items():
        created = await create(registry, remote.url, ref, job=f"j{len(ref)}")
        source = created.version.source.git
        assert (source.url, source.ref, source.commit) == (remote.url, ref, commit), ref


async def test_the_same_commit_by_another_name_is_the_same_version(
    registry: Registry, remote: Remote
) -> None:
    by_branch = await create(registry, remote.url, "main")
    by_commit = await create(registry, remote.url, remote.main)

    assert by_commit.reused_existing
    assert by_commit.version.name == by_branch.version.name


@pytest.mark.parametrize("ref", ["no-such-branch", "0123456789abcdef0123456789abcdef01234567"])
async def test_unknown_refs_are_git_ref_not_found_and_store_nothing(
    registry: Registry, remote: Remote, ref: str
) -> None:
    problem = await failure(create(registry, remote.url, ref))

    assert (problem.code, problem.reason) == (grpc.StatusCode.NOT_FOUND, "GIT_REF_NOT_FOUND")
    assert ref in problem.message
    assert await registry.count_rows("registry_jobs") == 0


async def test_unreachable_remotes_are_a_failed_precondition(registry: Registry, tmp_path: Path) -> None:
    for url in (f"file://{tmp_path}/missing.git", f"git://127.0.0.1:{free_port()}/remote.git"):
        problem = await failure(create(registry, url, "main"))
        assert (problem.code, problem.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "GIT_REMOTE_UNREACHABLE",
        )
    assert await registry.count_rows("registry_jobs") == 0


@pytest.fixture
def git_daemon(remote: Remote) -> Iterator[str]:
    """`git daemon` serving the remote's directory on a loopback port; yields the repository's URL."""
    require("git", GIT is not None, "apt-get install git")
    assert GIT is not None
    with serve_with_git_daemon(GIT, remote.path) as url:
        yield url


async def test_refs_resolve_through_git_daemon(registry: Registry, remote: Remote, git_daemon: str) -> None:
    created = await create(registry, git_daemon, "main")
    assert created.version.source.git.commit == remote.main

    pinned = await create(registry, git_daemon, remote.first, job="pinned")
    assert pinned.version.source.git.commit == remote.first

    problem = await failure(create(registry, git_daemon, "nope", job="other"))
    assert (problem.code, problem.reason) == (grpc.StatusCode.NOT_FOUND, "GIT_REF_NOT_FOUND")


@pytest.mark.parametrize(
    ("url", "ref", "field"),
    [
        (f"https://user:{TOKEN}@example.com/repo.git", "", "version.source.git.url"),
        (f"https://{TOKEN}@example.com/repo.git", "", "version.source.git.url"),
        ("ext::sh -c touch% /tmp/pwned", "", "version.source.git.url"),
        ("--upload-pack=touch /tmp/pwned", "", "version.source.git.url"),
        ("/srv/repo.git", "", "version.source.git.url"),
        ("ftp://example.com/repo.git", "", "version.source.git.url"),
        ("", "", "version.source.git.url"),
        ("https://example.com/repo.git", "--upload-pack=evil", "version.source.git.ref"),
        ("https://example.com/repo.git", "main..other", "version.source.git.ref"),
    ],
)
async def test_malformed_or_credential_carrying_sources_are_source_invalid(
    registry: Registry, url: str, ref: str, field: str
) -> None:
    problem = await failure(create(registry, url, ref))

    assert (problem.code, problem.reason, problem.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "SOURCE_INVALID",
        [field],
    )
    assert TOKEN not in problem.message


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    """Answers every request 403, remembering the path and Authorization header it came with."""

    seen: list[tuple[str, str | None]]

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[tuple[str, list[tuple[str, str | None]]]]:
    """An https server on loopback with a throwaway certificate; yields its base URL and what it saw."""
    openssl = shutil.which("openssl")
    require("openssl", openssl is not None, "apt-get install openssl")
    assert openssl is not None
    key, certificate = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(certificate),
        ],
        check=True,
        capture_output=True,
    )
    seen: list[tuple[str, str | None]] = []
    handler = type("Handler", (_RecordingHandler,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
async def registry_with_token(
    database_url: str,
    tmp_path: Path,
    https_server: tuple[str, list[tuple[str, str | None]]],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Registry]:
    monkeypatch.setenv("GIT_SSL_NO_VERIFY", "1")  # the throwaway certificate is self-signed
    base_url, _ = https_server
    settings = registry_settings(
        tmp_path / "home",
        database_url,
        git_https_token=TOKEN,
        git_https_token_scope=f"{base_url}/team/",
    )
    async for running in start_registry(settings):
        yield running


async def test_the_https_token_goes_to_its_scope_only_and_is_never_echoed(
    registry_with_token: Registry,
    https_server: tuple[str, list[tuple[str, str | None]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    base_url, seen = https_server

    in_scope = await failure(create(registry_with_token, f"{base_url}/team/repo.git", "main"))
    out_of_scope = await failure(create(registry_with_token, f"{base_url}/other/repo.git", "main"))

    for problem in (in_scope, out_of_scope):
        assert (problem.code, problem.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "GIT_REMOTE_UNREACHABLE",
        )
        assert "403" in problem.message
        assert TOKEN not in problem.message
    expected = "Basic " + base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
    assert {path.split("/")[1]: authorization for path, authorization in seen} == {
        "team": expected,
        "other": None,
    }
    assert TOKEN not in caplog.text
    assert await registry_with_token.count_rows("registry_jobs") == 0
