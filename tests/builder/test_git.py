"""Git sources: served by `git daemon` and by an https server that wants the configured credentials;
mirrors fetched when a pinned commit is missing; a vanished commit fails the build."""

from __future__ import annotations

import base64
import functools
import http.server
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import takeoff
from takeoff.models import GitSource
from takeoff.v1 import common_pb2
from tests.builder.conftest import Builder, create_job, running_builder
from tests.conftest import require
from tests.gitrepos import git_daemon as serve_with_git_daemon
from tests.processes import ServiceProcess, service_process

TOKEN = "s3cret-git-t0ken"
USERNAME = "x-access-token"


@dataclass
class Remote:
    """A bare repository with ``main`` (train.py printing v1) and ``feature`` one commit ahead of it."""

    path: Path
    work: Path
    main: str
    feature: str
    git: str

    def run(self, *args: str, cwd: Path | None = None) -> str:
        result = subprocess.run(
            [self.git, "-c", "user.name=T", "-c", "user.email=t@example.com", *args],
            cwd=cwd or self.work,
            capture_output=True,
            check=True,
            text=True,
        )
        return result.stdout.strip()

    def commit(self, files: dict[str, str], message: str) -> str:
        for name, text in files.items():
            (self.work / name).write_text(text)
        self.run("add", ".")
        self.run("commit", "-q", "-m", message)
        return self.run("rev-parse", "HEAD")

    def push(self, *refs: str) -> None:
        self.run("push", "-q", "--force", str(self.path), *refs)
        self.run("update-server-info", cwd=self.path)  # for the dumb http server

    def forget(self, branch: str) -> None:
        """Delete ``branch`` from the remote and drop the commits only it reached."""
        self.run("branch", "-D", branch, cwd=self.path)
        self.run("reflog", "expire", "--expire=now", "--all", cwd=self.path)
        self.run("gc", "-q", "--prune=now", cwd=self.path)
        self.run("update-server-info", cwd=self.path)


@pytest.fixture
def remote(tmp_path: Path, git_binary: str) -> Remote:
    work, bare = tmp_path / "work", tmp_path / "served" / "remote.git"
    work.mkdir()
    bare.parent.mkdir()
    remote = Remote(bare, work, "", "", git_binary)
    remote.run("init", "-q", "-b", "main")
    remote.main = remote.commit({"train.py": "print('v1')\n"}, "first")
    remote.run("checkout", "-q", "-b", "feature")
    remote.feature = remote.commit({"feature.py": "print('feature')\n"}, "feature")
    remote.run("checkout", "-q", "main")
    remote.run("init", "-q", "--bare", str(bare))
    remote.push("main", "feature")
    return remote


@pytest.fixture
def git_daemon(remote: Remote) -> Iterator[str]:
    """`git daemon` serving the remote on a loopback port; yields the repository's URL."""
    with serve_with_git_daemon(remote.git, remote.path) as url:
        yield url


async def test_a_git_job_from_git_daemon_builds_at_its_pinned_commit_and_fetches_new_commits(
    builder: Builder, client: takeoff.Client, tmp_path: Path, remote: Remote, git_daemon: str
) -> None:
    first = await builder.build(create_job(client, tmp_path, source=GitSource(git_daemon, "main")))

    code = Path(first.result.code_path)
    assert (code / "train.py").read_text() == "print('v1')\n"
    assert not (code / "feature.py").exists()
    assert not (code / ".git").exists()
    assert f"git: fetching {git_daemon}" in first.log
    assert first.result.build_key == first.cache.build_key

    newer = remote.commit({"train.py": "print('v2')\n"}, "second")
    remote.push("main")
    second = await builder.build(create_job(client, tmp_path, source=GitSource(git_daemon, "main")))

    assert second.cache.detail == "venv hit, code miss"
    assert any(newer in line for line in second.log)
    assert (Path(second.result.code_path) / "train.py").read_text() == "print('v2')\n"
    assert (code / "train.py").read_text() == "print('v1')\n"  # the first version's code is untouched

    pinned_to_feature = create_job(client, tmp_path, source=GitSource(git_daemon, remote.feature))
    third = await builder.build(pinned_to_feature)
    assert not any("git: fetching" in line for line in third.log)  # the mirror already had it
    assert (Path(third.result.code_path) / "feature.py").exists()


async def test_a_commit_that_vanished_from_the_remote_fails_the_build_and_caches_nothing(
    builder: Builder, client: takeoff.Client, tmp_path: Path, remote: Remote
) -> None:
    version = create_job(client, tmp_path, source=GitSource(f"file://{remote.path}", "feature"))
    remote.forget("feature")

    for _ in range(2):
        outcome = await builder.build(version)
        assert not outcome.cache.hit
        assert outcome.failure.reason == common_pb2.FAILURE_REASON_BUILD_FAILED
        assert f"no longer has commit {remote.feature}" in outcome.failure.message
    assert builder.published("code") == []
    assert builder.unpublished("code") == []


class _AuthenticatedGitFiles(http.server.SimpleHTTPRequestHandler):
    """Serves a directory (git's dumb http protocol) to requests carrying the expected basic auth."""

    expected = "Basic " + base64.b64encode(f"{USERNAME}:{TOKEN}".encode()).decode()

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != self.expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def https_git(remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The remote over https with basic auth and a throwaway certificate; yields its URL."""
    openssl = shutil.which("openssl")
    require("openssl", openssl is not None, "apt-get install openssl")
    assert openssl is not None
    key, certificate = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(certificate)),
        ],
        check=True,
        capture_output=True,
    )
    handler = functools.partial(_AuthenticatedGitFiles, directory=str(remote.path.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("GIT_SSL_NO_VERIFY", "1")  # the certificate is self-signed
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/{remote.path.name}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def registry_with_token(https_git: str, tmp_path: Path) -> Iterator[ServiceProcess]:
    """A registry that can resolve refs of the authenticated remote."""
    env = {"TAKEOFF_GIT_HTTPS_TOKEN": TOKEN, "GIT_SSL_NO_VERIFY": "1"}
    with service_process("registry", tmp_path / "registry", env=env) as server:
        yield server


async def test_an_https_remote_needs_the_configured_token_which_never_shows(
    registry_with_token: ServiceProcess, https_git: str, remote: Remote, tmp_path: Path, project: str
) -> None:
    with takeoff.Client(registry_with_token.address, project=project) as client:
        version = create_job(client, tmp_path, source=GitSource(https_git, "main"))

    async with running_builder(tmp_path / "anonymous", registry_with_token.address) as anonymous:
        refused = await anonymous.build(version)
    async with running_builder(
        tmp_path / "builder", registry_with_token.address, git_https_token=TOKEN
    ) as builder:
        built = await builder.build(version)

    assert refused.failure.reason == common_pb2.FAILURE_REASON_BUILD_INFRA
    assert "could not fetch from the git remote" in refused.failure.message
    assert anonymous.published("code") == []
    assert (Path(built.result.code_path) / "train.py").read_text() == "print('v1')\n"
    for outcome in (refused, built):
        assert not any(TOKEN in text for text in [*outcome.log, str(outcome.responses)])
