"""Secrets never appear in logs, errors, stored records, build logs or describe output.

One stack of real processes (``LocalStack``: registry, queue, builder, logging at DEBUG to
``TAKEOFF_HOME/logs``; agents started next to it with agent keys, logging there too) holds every kind of
secret Takeoff has: the stack's admin and service keys, keys made with ``takeoff keys create`` (project,
agent, service), the run tokens the queue mints per attempt, a user secret set with ``takeoff secrets set``
and mounted on the queue as an environment variable and as a file, a git https token (for a remote the test
serves over TLS, which answers only requests carrying it), and a container registry login given to the
builder (and, with Docker, to the agent's local-container runner, which pulls a private image with it).

Jobs launched with a project key check, without printing them, that they got the secret (env and file) and
a run token, log a metric, and hand their run token to the test through a file outside every home; one is
built from the git remote. A careless job prints its secret and token (masked), one is cancelled while it
runs. Then the error paths: a launch naming a secret that does not exist, keys without the permission,
revoked, unknown and malformed keys, a spent run token, git remotes that fail. Every command a user would
run to look is run, with and without ``--json``. Finally every file under the home (service and agent logs,
SQLite databases and their -wal files, build directories, agent lease directories after the items ended),
every command's output and the run's logs are searched for each value, and for any whole key or run token
other than the ones shown on purpose (by ``takeoff keys create``, and the stack's key files).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import json
import os
import secrets
import shlex
import signal
import ssl
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from takeoff.cli import app
from takeoff.stack import KEY_VARIABLES, LocalStack, agent_defaults, read_secret_file
from tests.conftest import DockerSetup
from tests.e2e.leaks import WHOLE_TOKEN, Secret, basic_auth, report, scan_bytes, scan_tree
from tests.e2e.test_container_demo import SDK_IMAGE, sdk_image  # noqa: F401 (a fixture)
from tests.e2e.test_up import takeoff, user_environment
from tests.keys import ADMIN_KEY
from tests.processes import wait_for
from tests.tls import make_certificates

PROJECT = "leaks"
SECRET_ID = "app-secret"
SECRET_ENV = "APP_SECRET"
SECRET_FILE = "app.txt"
GIT_USER = "x-access-token"
DEFAULT_AUTH_REGISTRY = "127.0.0.1:5001"

CHECKING_JOB = """\
import hashlib, os, pathlib, re, sys, takeoff

run = takeoff.init()
want = run.config["want"]
token = os.environ.get("TAKEOFF_TOKEN", "")
secret_file = pathlib.Path(os.environ.get("TAKEOFF_SECRETS_DIR", "/nonexistent")) / "app.txt"
checks = {
    "token": re.fullmatch(r"tko_[a-z0-9-]+_[A-Za-z0-9_-]+[.][A-Za-z0-9_-]{86}", token) is not None,
    "env": hashlib.sha256(os.environ.get("APP_SECRET", "").encode()).hexdigest() == want,
    "file": secret_file.is_file() and hashlib.sha256(secret_file.read_bytes()).hexdigest() == want,
}
print("checks", " ".join(f"{name}={ok}" for name, ok in checks.items()), flush=True)
if run.config.get("vault"):  # the run token goes to the test through a file outside every home
    pathlib.Path(run.config["vault"]).write_text(token)
run.log({"verified": int(all(checks.values()))})
run.finish()
sys.exit(0 if all(checks.values()) else 1)
"""
"""Checks the secret (as ``APP_SECRET`` and as the file ``app.txt``) against its SHA-256 and that it has a
run token, and logs a metric; prints only whether each check passed."""

CARELESS_JOB = """\
import os, pathlib, subprocess, sys

token = os.environ["TAKEOFF_TOKEN"]
if len(sys.argv) > 1:
    pathlib.Path(sys.argv[1]).write_text(token)
# The SDK refusing a token nobody minted (the real one with its end changed) must not quote it.
forged = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
refused = subprocess.run(
    [sys.executable, "-c", "import takeoff; takeoff.init()"],
    env={**os.environ, "TAKEOFF_TOKEN": forged}, capture_output=True, text=True,
)
print("the SDK with a forged token:", refused.returncode, refused.stdout, refused.stderr, flush=True)
from_file = (pathlib.Path(os.environ["TAKEOFF_SECRETS_DIR"]) / "app.txt").read_text()
print(f"a careless job prints its secret {os.environ['APP_SECRET']} and its token {token}.", flush=True)
print(f"and the secret from its file: {from_file}", file=sys.stderr, flush=True)
sys.exit(3)
"""
"""Prints its secret (env and file) and its run token, then fails: the agent masks them in the run's log
and in the failure message, which quotes the last lines. Prints what the SDK says when refused a forged
token (which no mask covers). Hands its run token over (to the file named by its argument, when it has
one) first."""


class GitHttpsServer:
    """A git remote over https (smart HTTP, ``git upload-pack --stateless-rpc`` behind it) at
    ``https://127.0.0.1:PORT/acme/repo.git`` that serves only requests carrying the git token as basic
    auth, answering 401 to others; it counts both."""

    def __init__(self, directory: Path, token: str) -> None:
        self.repository = directory / "repo.git"
        self.certificates = make_certificates(directory / "tls")
        self.expected = "Basic " + base64.b64encode(f"{GIT_USER}:{token}".encode()).decode()
        self.authorized = 0
        self.refused = 0
        work = directory / "work"
        work.mkdir()
        (work / "main.py").write_text(CHECKING_JOB)
        identity = ["-c", "user.name=test", "-c", "user.email=test@example.com"]
        for command in (
            ["init", "-q", "-b", "main"],
            ["add", "main.py"],
            [*identity, "commit", "-q", "-m", "job"],
        ):
            subprocess.run(["git", "-C", str(work), *command], check=True)
        subprocess.run(["git", "clone", "-q", "--bare", str(work), str(self.repository)], check=True)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if not self._authorized():
                    return
                if self.path == "/acme/repo.git/info/refs?service=git-upload-pack":
                    refs = outer._upload_pack(b"", "--advertise-refs")
                    self._reply(b"001e# service=git-upload-pack\n0000" + refs, "advertisement")
                else:
                    self.send_error(404)

            def do_POST(self) -> None:
                if not self._authorized():
                    return
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                self._reply(outer._upload_pack(body), "result")

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") == outer.expected:
                    outer.authorized += 1
                    return True
                outer.refused += 1
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return False

            def _reply(self, body: bytes, kind: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", f"application/x-git-upload-pack-{kind}")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        pair = self.certificates.server
        context.load_cert_chain(pair.cert_file, pair.key_file)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def scope(self) -> str:
        return f"https://127.0.0.1:{self.server.server_address[1]}/acme"

    @property
    def remote(self) -> str:
        return f"{self.scope}/repo.git"

    def _upload_pack(self, request: bytes, *options: str) -> bytes:
        command = ["git", "upload-pack", "--stateless-rpc", *options, str(self.repository)]
        return subprocess.run(command, input=request, capture_output=True, check=True).stdout

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


WAITING_JOB = """\
import time, takeoff

takeoff.init()
print("waiting to be cancelled", flush=True)
time.sleep(120)
"""
"""Attaches its run, then waits to be cancelled."""


@dataclass
class Output:
    """What one command printed; ``shown``: secrets it prints on purpose (``takeoff keys create``)."""

    command: str
    text: str
    shown: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout + self.stderr


@dataclass
class World:
    """The stack, its secrets, and everything the test saw."""

    home: Path
    vault: Path
    """Outside every home: what the test keeps (key files it gives agents, the run token a job hands)."""
    stack: LocalStack
    git: GitHttpsServer
    auth_registry: str
    registry_user: str
    registry_password: str
    git_token: str
    secret_value: str
    keys: dict[str, str] = field(default_factory=dict)
    """Label -> secret of every key the test knows."""
    outputs: list[Output] = field(default_factory=list)
    agents: list[subprocess.Popen[bytes]] = field(default_factory=list)
    took: float = 0.0
    """How long the latest command took."""

    def cli(self, *args: str, key: str | None = None, env: dict[str, str] | None = None) -> Ran:
        """``takeoff ARGS`` as a user runs it in the project (in this process, to keep the test short):
        no key in the environment but ``key`` (else the CLI finds the stack's admin key in TAKEOFF_HOME)."""
        environment: dict[str, str | None] = {
            **dict.fromkeys(KEY_VARIABLES),
            "TAKEOFF_HOME": str(self.home),
            "TAKEOFF_PROJECT": PROJECT,
            "COLUMNS": "120",
            **(env or {}),
        }
        if key is not None:
            environment["TAKEOFF_API_KEY"] = key
        started = time.monotonic()
        result = CliRunner().invoke(app, list(args), env=environment)
        self.took = time.monotonic() - started
        ran = Ran(result.exit_code, result.stdout, result.stderr)
        crash = ""
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            crash = "".join(traceback.format_exception(result.exception))
        self.record(shlex.join(["takeoff", *args]), ran.text + crash)
        assert not crash, f"takeoff {shlex.join(args)} crashed:\n{crash}"
        return ran

    def shell(self, *args: str, key: str | None = None, timeout: float = 60) -> Ran:
        """``takeoff ARGS`` as a process of its own, in a user's environment."""
        env = {"TAKEOFF_PROJECT": PROJECT, "COLUMNS": "120", **({"TAKEOFF_API_KEY": key} if key else {})}
        started = time.monotonic()
        result = takeoff(self.home, *args, env=env, timeout=timeout)
        self.took = time.monotonic() - started
        ran = Ran(result.returncode, result.stdout, result.stderr)
        self.record(shlex.join(["takeoff", *args]), ran.text)
        return ran

    def ok(self, *args: str, key: str | None = None) -> str:
        ran = self.cli(*args, key=key)
        assert ran.returncode == 0, f"takeoff {shlex.join(args)}: {ran.text}"
        return ran.stdout

    def record(self, command: str, text: str, shown: set[str] | None = None) -> None:
        self.outputs.append(Output(command, text, shown or set()))
        with (self.vault / "outputs.txt").open("a") as file:  # for whoever reads a failure
            file.write(f"$ {command}  ({self.took:.2f} s)\n{text}\n")

    def create_key(self, label: str, *args: str) -> str:
        """``takeoff keys create``: the one output allowed to show its own secret."""
        ran = self.cli("keys", "create", *args)
        assert ran.returncode == 0, ran.text
        found = [match.group(0).decode() for match in WHOLE_TOKEN.finditer(ran.stdout.encode())]
        assert len(found) == 1, f"keys create printed {len(found)} secrets"
        secret = found[0]
        self.keys[label] = secret
        self.outputs[-1].shown.add(secret)
        return secret

    def secrets(self) -> list[Secret]:
        """Every value that must appear nowhere."""
        values = [Secret(label, value) for label, value in self.keys.items()]
        values += [
            Secret("the test session's admin key", ADMIN_KEY),
            Secret("the user secret", self.secret_value),
            Secret("the git https token", self.git_token),
            basic_auth("the git https token", GIT_USER, self.git_token),
            Secret("the container registry password", self.registry_password),
            basic_auth("the container registry login", self.registry_user, self.registry_password),
        ]
        for path in sorted(self.vault.glob("run-token*")):
            if (token := read_secret_file(path)) is not None:
                values.append(Secret(f"the run token of {path.name}", token))
        return values

    def key_files(self) -> dict[Path, set[str]]:
        """The stack's key files, each allowed to hold its own key."""
        return {
            path: {secret}
            for path in (self.home / "keys").glob("*.key")
            if (secret := read_secret_file(path)) is not None
        }

    def stop(self) -> None:
        for agent in self.agents:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
        for agent in self.agents:
            try:
                agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        self.stack.stop()


def random_key(key_id: str) -> str:
    """A well-formed key nobody made."""
    return f"tko_{key_id}_{secrets.token_urlsafe(32)}"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A running stack whose registry and builder hold a git token and whose builder holds a login to
    Docker's test registry with a password (.ci/docker-setup.sh's when it ran, else a made-up one:
    configured, never used); every service logs at DEBUG to TAKEOFF_HOME/logs."""
    home = tmp_path_factory.mktemp("home")
    vault = tmp_path_factory.mktemp("vault")
    git_token = f"ghp_{secrets.token_urlsafe(30)}"
    auth_registry = os.environ.get("TAKEOFF_TEST_AUTH_REGISTRY") or DEFAULT_AUTH_REGISTRY
    world = World(
        home=home,
        vault=vault,
        stack=LocalStack(home, base_port=0, base_image=os.environ.get("TAKEOFF_TEST_BASE_IMAGE")),
        git=GitHttpsServer(tmp_path_factory.mktemp("git"), git_token),
        auth_registry=auth_registry,
        registry_user=os.environ.get("TAKEOFF_TEST_AUTH_USER") or "takeoff-test",
        registry_password=os.environ.get("TAKEOFF_TEST_AUTH_PASSWORD") or f"pw-{secrets.token_urlsafe(24)}",
        git_token=git_token,
        secret_value=f"s3cr3t-{secrets.token_urlsafe(30)}",
    )
    settings = {
        "TAKEOFF_LOG_LEVEL": "DEBUG",
        "TAKEOFF_GIT_HTTPS_TOKEN": world.git_token,
        "TAKEOFF_GIT_HTTPS_USERNAME": GIT_USER,
        "TAKEOFF_GIT_HTTPS_TOKEN_SCOPE": world.git.scope,
        "GIT_SSL_CAINFO": str(world.git.certificates.ca_file),  # git trusts the remote's test CA
        "TAKEOFF_REGISTRY_AUTH": json.dumps(
            {auth_registry: {"username": world.registry_user, "password": world.registry_password}}
        ),
    }
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in settings.items():
                patch.setenv(name, value)
            world.stack.start()  # the services copy the environment now
        for path, (key,) in world.key_files().items():
            world.keys[f"the stack's {path.stem} key"] = key
        yield world
    finally:
        world.stop()
        world.git.close()


def start_agent(world: World, name: str, key: str, queue: str, runners: dict[str, Any]) -> None:
    """``python -m takeoff_agent`` serving ``queue`` with ``key``, logging at DEBUG: its config and key
    file outside the home, its state and log under it; returns once it is connected."""
    key_file = world.vault / f"{name}.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    config = world.vault / f"{name}.yaml"  # it holds the runner's registry login: outside the home
    settings = {
        "name": name,
        "queues": [queue],
        "api_key_file": str(key_file),
        "state_dir": str(world.home / "agents" / name),
        "runners": runners,
        "stop_grace_seconds": 2,
        "log_level": "DEBUG",
    }
    config.write_text(yaml.safe_dump(settings))
    services = world.stack.record.services
    env = {
        **user_environment(world.home),
        **{f"TAKEOFF_{service.upper()}_ADDRESS": running.address for service, running in services.items()},
        "TAKEOFF_LISTEN": '["127.0.0.1:0"]',
        "TAKEOFF_READY_FILE": str(world.home / "run" / f"{name}.ready"),
        "TAKEOFF_CONFIG_FILE": str(config),
        "PYTHONUNBUFFERED": "1",
        **agent_defaults(config, f"unix:{world.stack.registry_socket}"),
    }
    log = world.home / "logs" / f"{name}.log"
    with log.open("ab") as file:
        agent = subprocess.Popen(
            [sys.executable, "-m", "takeoff_agent"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=file,
            stderr=subprocess.STDOUT,
        )
    world.agents.append(agent)

    def connected() -> bool:
        assert agent.poll() is None, f"the agent {name} exited: {log.read_text()}"
        listed = world.cli("agents", "--json")
        found = json.loads(listed.stdout) if listed.returncode == 0 else []
        return any(a["display_name"] == name and a["connected"] for a in found)

    wait_for(connected, timeout=60, what=f"the agent {name} to connect")


def secure_queue(world: World, queue: str, resource: str) -> str:
    """The user secret, set from the environment (never an argument); a queue mounting it both as
    APP_SECRET and as the file app.txt; a connected agent for it presenting an agent key. Returns the
    project key that launches (write)."""
    value = {"VALUE": world.secret_value}
    set_secret = world.cli("secrets", "set", SECRET_ID, "--from-env", "VALUE", env=value)
    assert set_secret.returncode == 0, set_secret.text
    world.ok(
        "queue", "create", queue, "--resource", resource,
        "--secret", f"{SECRET_ID}={SECRET_ENV}", "--secret", f"{SECRET_ID}:file={SECRET_FILE}",
    )  # fmt: skip
    return world.create_key("the project key", "--kind", "project", "--project", PROJECT, "--role", "write")


def run_of(launched: str) -> str:
    """The run a ``takeoff launch --wait`` printed (``takeoff logs RUN``)."""
    assert "takeoff logs " in launched, launched
    return launched.split("takeoff logs ", 1)[1].split(maxsplit=1)[0]


def look_around(world: World, run: str, queue: str, job: str) -> None:
    """What a user runs to see how things stand, each with and without ``--json``."""
    items = json.loads(world.ok("items", "list", "--queue", queue, "--json"))
    assert items
    for args in (
        *(("items", "describe", item["name"]) for item in items),
        ("items", "list"),
        ("runs", "show", run),
        ("runs", "list"),
        ("logs", run),
        ("queue", "describe", queue),
        ("queue", "list"),
        ("job", "describe", job),
        ("job", "list"),
        ("keys", "list"),
        ("keys", "list", "--all"),
        ("secrets", "list"),
        ("agents",),
    ):
        for extra in ((), ("--json",)):
            world.ok(*args, *extra)


def assert_nothing_leaked(world: World) -> None:
    """No secret in any file under the home (the stack's key files hold their own key), in any output
    (``keys create`` shows its own key), nor any whole key or run token elsewhere: searched once while the
    services run (SQLite -wal files hold the latest writes), and again once everything has stopped (agent
    lease directories cleaned up, logs complete)."""
    values = world.secrets()
    running, files = scan_tree(world.home, values, allowed=world.key_files())
    world.stop()
    stopped, _ = scan_tree(world.home, values, allowed=world.key_files())
    leaks = list(dict.fromkeys([*running, *stopped]))
    names = {path.name for path in files}
    assert {"registry.db-wal", "queue.db-wal", "builder.db-wal"} <= names, sorted(names)
    assert {"registry.log", "queue.log", "builder.log"} <= names, sorted(names)
    for output in world.outputs:
        where = f"the output of `{output.command}`"
        leaks += scan_bytes(where, output.text.encode(), values, allowed=output.shown)
    assert not leaks, report(leaks)


def careless_launch(world: World, queue: str, project_key: str, *source: str) -> None:
    """A job (made from ``source``, job create's arguments) that prints what it was given: masked in its
    log and in the failure message quoting it."""
    world.ok("job", "create", "--name", "careless", *source, key=project_key)
    careless = world.cli("launch", "careless", "--queue", queue, "--wait", key=project_key)
    assert careless.returncode == 1, careless.text
    assert "JOB_FAILED" in careless.stdout
    printed = world.ok("logs", run_of(careless.stdout))
    assert "a careless job prints its secret *** and its token ***." in printed
    assert "and the secret from its file: ***" in printed
    assert "the SDK with a forged token: 1" in printed


def item_state(world: World, item: str) -> str:
    return str(json.loads(world.ok("items", "describe", item, "--json"))["state"])


def cancelled_launch(world: World, project_key: str, code: Path) -> None:
    """A job given the secrets and its token, cancelled while it runs: stopped, and its lease directory
    (secret files, token) cleaned up all the same."""
    world.ok(
        "job", "create", str(code), "--name", "waiting", "--entrypoint", "python wait.py", key=project_key
    )
    item = world.ok("launch", "waiting", "--queue", "proc", key=project_key).strip()
    wait_for(lambda: item_state(world, item) == "RUNNING", timeout=60, what="the waiting job to run")
    world.ok("items", "cancel", item, key=project_key)
    wait_for(lambda: item_state(world, item) == "CANCELLED", timeout=60, what="the waiting job to stop")


def refused_calls(world: World, project_key: str, run_token: str) -> None:
    """The error paths: a launch naming a secret that does not exist, a key without the permission, a
    revoked key, a key nobody made, a malformed one, a run token after its run, a git remote that refuses
    the connection; each refused, none quoting a key, a token or a secret."""
    missing = world.cli(
        "launch", "check", "--queue", "proc", "--secret", "no-such-secret=NOPE", key=project_key
    )  # fmt: skip
    if missing.returncode == 0:  # taken: then the attempt fails, saying which secret is missing
        ended = wait_for(
            lambda: (
                (item := json.loads(world.ok("items", "describe", missing.stdout.strip(), "--json")))
                and item["state"] in {"FAILED", "SUCCEEDED", "CANCELLED"}
                and item
            ),
            timeout=60,
            what="the launch with a missing secret to end",
        )
        assert ended["state"] == "FAILED"
    reader_key = world.create_key(
        "a read-only project key", "--kind", "project", "--project", PROJECT, "--role", "read"
    )  # fmt: skip
    assert world.cli("secrets", "set", "other", "--from-env", "HOME", key=reader_key).returncode == 1
    console_key = world.create_key("a console service key", "--kind", "service", "--service", "console")
    assert world.cli("runs", "list", key=console_key).returncode == 1
    revoked_key = world.create_key(
        "a revoked key", "--kind", "project", "--project", PROJECT, "--role", "read"
    )  # fmt: skip
    world.ok("runs", "list", key=revoked_key)
    world.ok("keys", "revoke", revoked_key.split("_")[1])
    wait_for(lambda: world.cli("runs", "list", key=revoked_key).returncode == 1, what="the key to be refused")
    assert world.shell("runs", "list", key=revoked_key).returncode == 1
    world.keys["a key nobody made"] = random_key("nosuchkey")
    assert world.cli("runs", "list", key=world.keys["a key nobody made"]).returncode == 1
    world.keys["a malformed key"] = f"not-a-key-{secrets.token_urlsafe(24)}"
    assert world.cli("runs", "list", key=world.keys["a malformed key"]).returncode == 1
    assert world.cli("runs", "list", key=run_token).returncode == 1
    for remote, name in (
        (f"{world.git.scope}/missing.git", "missing"),
        ("https://127.0.0.1:9/r.git", "closed"),
    ):
        git = world.cli("job", "create", "--name", name, "--git", remote, "--entrypoint", "python main.py")
        if git.returncode == 0:  # the remote is first reached by the build
            failed = world.cli("launch", name, "--queue", "proc", "--wait", key=project_key)
            assert failed.returncode == 1, failed.text


@pytest.mark.timeout(150)
def test_no_secret_in_logs_records_or_output_of_a_local_launch_and_its_errors(
    world: World, tmp_path: Path
) -> None:
    project_key = secure_queue(world, "proc", "local-process")
    agent_key = world.create_key("the agent key", "--kind", "agent", "--queue", "proc")
    start_agent(world, "proc-agent", agent_key, f"projects/{PROJECT}/queues/proc", {"local-process": {}})
    code = tmp_path / "code"
    code.mkdir()
    (code / "main.py").write_text(CHECKING_JOB)
    (code / "careless.py").write_text(CARELESS_JOB)
    world.ok("job", "create", str(code), "--name", "check", "--entrypoint", "python main.py", key=project_key)

    launched = world.shell(
        "launch", "check", "--queue", "proc", "--wait",
        "--config", f"want={sha256(world.secret_value)}", "--config", f"vault={world.vault / 'run-token'}",
        key=project_key, timeout=90,
    )  # fmt: skip

    assert launched.returncode == 0, launched.text
    assert "SUCCEEDED" in launched.stdout
    run = run_of(launched.stdout)
    assert "checks token=True env=True file=True" in world.ok("logs", run)
    assert json.loads(world.ok("runs", "show", run, "--json"))["metrics"]["verified"]["last"] == 1
    run_token = read_secret_file(world.vault / "run-token")
    assert run_token is not None, "the job handed no run token over"
    assert WHOLE_TOKEN.fullmatch(run_token.encode())

    # The same job from a git remote that wants the token: the registry lists it, the builder fetches it.
    git_token_file = world.vault / "run-token-git"
    world.ok(
        "job", "create", "--name", "from-git", "--git", world.git.remote, "--entrypoint", "python main.py"
    )
    from_git = world.cli(
        "launch", "from-git", "--queue", "proc", "--wait",
        "--config", f"want={sha256(world.secret_value)}", "--config", f"vault={git_token_file}",
        key=project_key,
    )  # fmt: skip
    assert from_git.returncode == 0, from_git.text
    assert world.git.authorized >= 2, "the registry and the builder did not both present the git token"
    assert world.git.refused == 0

    (code / "wait.py").write_text(WAITING_JOB)
    cancelled_launch(world, project_key, code)
    careless_token = world.vault / "run-token-careless"
    careless_launch(
        world, "proc", project_key, str(code), "--entrypoint", f"python careless.py {careless_token}"
    )
    assert read_secret_file(careless_token) is not None
    refused_calls(world, project_key, run_token)
    look_around(world, run, "proc", "check")
    assert_nothing_leaked(world)


def private_sdk_image(world: World, docker_setup: DockerSetup) -> str:
    """The SDK image pushed to the registry that wants a login, with that login given for the push only;
    its tag there removed from the engine, so the agent pulls it with the password it was configured
    with (the layers are already local: only the manifest is fetched)."""
    repository = f"{world.auth_registry}/takeoff-test/sdk-job-leaks"
    login = {"username": world.registry_user, "password": world.registry_password}
    docker_setup.engine.images.get(SDK_IMAGE).tag(repository, "1")
    pushed = docker_setup.engine.images.push(repository, "1", auth_config=login, stream=True, decode=True)
    errors = [line["error"] for line in pushed if "error" in line]
    assert not errors, errors
    docker_setup.engine.images.remove(f"{repository}:1")  # only the tag: SDK_IMAGE keeps the image
    return f"{repository}:1"


@pytest.mark.timeout(300)  # the first use builds the SDK image (test_container_demo's): pip downloads
@pytest.mark.usefixtures("sdk_image")
def test_no_secret_in_logs_records_or_output_of_a_container_launch_from_a_private_registry(
    world: World, docker_setup: DockerSetup
) -> None:
    assert world.auth_registry == docker_setup.auth_registry
    image = private_sdk_image(world, docker_setup)
    project_key = secure_queue(world, "box", "local-container")
    agent_key = world.create_key("the agent key", "--kind", "agent", "--queue", "box")
    login = {world.auth_registry: {"username": world.registry_user, "password": world.registry_password}}
    runners = {"local-container": {"registry_auth": login}}
    start_agent(world, "box-agent", agent_key, f"projects/{PROJECT}/queues/box", runners)
    world.ok(
        "job", "create", "--name", "private", "--image", image,
        "--entrypoint", shlex.join(["python", "-c", CHECKING_JOB]), key=project_key,
    )  # fmt: skip

    launched = world.shell(
        "launch", "private", "--queue", "box", "--wait", "--config", f"want={sha256(world.secret_value)}",
        key=project_key, timeout=90,
    )  # fmt: skip

    assert launched.returncode == 0, launched.text
    assert "SUCCEEDED" in launched.stdout
    run = run_of(launched.stdout)
    assert "checks token=True env=True file=True" in world.ok("logs", run)
    assert json.loads(world.ok("runs", "show", run, "--json"))["metrics"]["verified"]["last"] == 1
    careless_launch(
        world,
        "box",
        project_key,
        "--image",
        image,
        "--entrypoint",
        shlex.join(["python", "-c", CARELESS_JOB]),
    )
    look_around(world, run, "box", "private")
    for container in docker_setup.engine.containers.list(all=True, filters={"label": "takeoff.item"}):
        if f"projects/{PROJECT}/" in container.labels["takeoff.item"]:  # left behind: its env holds secrets
            world.record(f"docker inspect {container.name}", json.dumps(container.attrs))
    assert_nothing_leaked(world)


def test_the_search_finds_a_secret_in_every_form_and_place_it_looks(tmp_path: Path) -> None:
    password = f"pw-{secrets.token_urlsafe(24)}"
    key = random_key("known")
    stray = random_key("run-abc")
    signed = f"tko_signer-abc_{secrets.token_urlsafe(120)}.{secrets.token_urlsafe(64)}"  # 86 characters
    values = [Secret("the password", password), basic_auth("the login", "me", password), Secret("a key", key)]
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "queue.log").write_text(f"one\ntwo\nsent {password} to the registry\n")
    (tmp_path / "queue.db-wal").write_bytes(b"\x00\x01binary" + stray.encode() + b"\x00")
    (tmp_path / "agent.log").write_text(f"started\nTAKEOFF_TOKEN={signed}\n")
    (tmp_path / "config.json").write_text(json.dumps({"auths": {"r": {"auth": values[1].value}}}))
    (tmp_path / "chunk.gz").write_bytes(gzip.compress(f"line\n{key}\n".encode()))
    (tmp_path / "admin.key").write_text(key)  # allowed: its own key
    (tmp_path / "hint").write_text("tko_known and tko_known_short")  # hints are not keys

    leaks, files = scan_tree(tmp_path, values, allowed={tmp_path / "admin.key": {key}})

    found = {(leak.label, Path(leak.where.removesuffix(" (unpacked)")).name, leak.line) for leak in leaks}
    assert found == {
        ("the password", "queue.log", 3),
        ("a key or run token", "queue.db-wal", 1),
        ("a key or run token", "agent.log", 2),
        ("the login (base64 user:password)", "config.json", 1),
        ("a key", "chunk.gz", 2),
    }
    assert len(files) == 7
    assert not any(
        password in str(leak) or key in str(leak) or stray in str(leak) or signed in str(leak)
        for leak in leaks
    )
    assert "<the password>" in report(leaks)
    assert scan_bytes("output", f"created {key}".encode(), values, allowed={key}) == []
