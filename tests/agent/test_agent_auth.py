"""The agent under access control: its own agent key leases its queues only, each attempt's run is written
with that attempt's run token (which the job gets as TAKEOFF_TOKEN), and secrets reach the job and nowhere
else (docs/design.md §13).

Every agent here presents an agent key, which may write no run: a run that ends at all was written with
its run token.
"""

from __future__ import annotations

import hashlib
import stat
import uuid
from pathlib import Path

import pytest

from takeoff.client import Client
from takeoff.v1 import (
    common_pb2,
    keys_pb2,
    keys_pb2_grpc,
    queue_pb2,
    runs_pb2,
    secrets_pb2,
    secrets_pb2_grpc,
)
from takeoff_rpc.channels import open_channel
from tests.agent.conftest import PROJECT, WAITER, Stack, StartAgent, code_job, job_pid, running_agent
from tests.keys import ADMIN_KEY
from tests.processes import pid_alive, wait_for
from tests.queue.harness import struct

RUNNING = common_pb2.ITEM_STATE_RUNNING
SUCCEEDED = common_pb2.ITEM_STATE_SUCCEEDED
FAILED = common_pb2.ITEM_STATE_FAILED

TOKEN_JOB = """\
import os, time, grpc, takeoff
from google.protobuf.struct_pb2 import Struct
from takeoff.v1 import runs_pb2, runs_pb2_grpc
from takeoff_rpc.channels import open_channel

run = takeoff.init()  # with TAKEOFF_TOKEN: the SDK finds it
token = os.environ["TAKEOFF_TOKEN"]
path = run.config["token_file"]
with open(path + ".partial", "w") as file:
    file.write(token)
os.replace(path + ".partial", path)
with open_channel(os.environ["TAKEOFF_REGISTRY"], api_key=token) as channel:
    runs = runs_pb2_grpc.RunServiceStub(channel)
    own = f"projects/{os.environ['TAKEOFF_PROJECT']}/runs/{os.environ['TAKEOFF_RUN_ID']}"
    for name in (run.config["other_run"], own):
        summary = Struct()
        summary.update({"written_by": own})
        try:
            runs.UpdateSummary(runs_pb2.UpdateSummaryRequest(name=name, summary=summary))
            print(name, "OK", flush=True)
        except grpc.RpcError as error:
            print(name, error.code().name, flush=True)
print("the token is", token, flush=True)
while not os.path.exists(run.config["go"]):
    time.sleep(0.05)
"""
"""Keeps its TAKEOFF_TOKEN in the file its ``token_file`` config names, tries to write a summary key into
the run its ``other_run`` config names and into its own, prints the token (which the agent masks), then
waits for the file its ``go`` config names."""

SECRET_JOB = """\
import hashlib, os, pathlib, sys
value = os.environ.get("MODEL_PASSWORD", "")
print("env sha256", hashlib.sha256(value.encode()).hexdigest(), flush=True)
key = pathlib.Path(os.environ["TAKEOFF_SECRETS_DIR"], "model.key").read_bytes()
print("file sha256", hashlib.sha256(key).hexdigest(), flush=True)
print("the password is", value, flush=True)
sys.exit(3)
"""
"""Proves it has its secrets (their hashes: one as an environment variable, one as a file), prints one
(the agent masks it), and fails, so that the item's message quotes its last lines."""

CA_JOB = """\
import hashlib, os, pathlib
path = os.environ.get("TAKEOFF_TLS_CA_FILE")
print("ca", path and hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest(), flush=True)
"""


@pytest.fixture(scope="module")
def lease_ttl_seconds() -> float:
    """Longer than an agent's restart takes, however loaded the machine."""
    return 300.0


def create_key(stack: Stack, key: keys_pb2.Key) -> str:
    """A new key's secret, made with the admin key."""
    with open_channel(stack.registry, api_key=ADMIN_KEY) as channel:
        reply = keys_pb2_grpc.KeyServiceStub(channel).CreateKey(keys_pb2.CreateKeyRequest(key=key))
    return reply.secret


def agent_key(stack: Stack, *queues: str) -> str:
    return create_key(stack, keys_pb2.Key(kind=keys_pb2.KEY_KIND_AGENT, queues=queues, display_name="agent"))


def verify(stack: Stack, secret: str) -> keys_pb2.VerifyKeyResponse:
    with open_channel(stack.registry, api_key=ADMIN_KEY) as channel:
        keys = keys_pb2_grpc.KeyServiceStub(channel)
        return keys.VerifyKey(keys_pb2.VerifyKeyRequest(secret=secret))


def set_secret(stack: Stack, value: bytes) -> str:
    """A new secret of the test project; returns its name."""
    with open_channel(stack.registry, api_key=ADMIN_KEY) as channel:
        secrets = secrets_pb2_grpc.SecretServiceStub(channel)
        reply = secrets.SetSecret(
            secrets_pb2.SetSecretRequest(
                parent=f"projects/{PROJECT}", secret_id=f"s{uuid.uuid4().hex[:10]}", value=value
            )
        )
    return reply.secret.name


def other_run(stack: Stack) -> str:
    """A run that no attempt of the tests' queues writes (made with the admin key)."""
    reply = stack.runs.CreateRun(
        runs_pb2.CreateRunRequest(parent=f"projects/{PROJECT}", run_id=f"other-{uuid.uuid4().hex[:10]}")
    )
    return reply.run.name


def test_the_job_gets_a_run_token_that_writes_its_own_run_and_no_other(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "token", TOKEN_JOB)
    queue = stack.new_queue(max_attempts=1)
    other, token_file, go = other_run(stack), tmp_path / "token", tmp_path / "go"
    with running_agent(start_agent, [queue], env={"TAKEOFF_API_KEY": agent_key(stack, queue)}) as agent:
        config = struct({"token_file": str(token_file), "other_run": other, "go": str(go)})
        name = stack.enqueue(queue, job, run_config=config)
        wait_for(token_file.exists, timeout=90, what="the job to keep its token")
        token = token_file.read_text()
        verified = verify(stack, token)
        go.touch()
        item = stack.wait_ended(name)

    assert verified.valid
    assert (verified.key.kind, verified.key.run) == (keys_pb2.KEY_KIND_RUN, item.run)
    assert item.state == SUCCEEDED, item.message  # the agent key writes no run: the token wrote this one
    logs = stack.logs(item.run)
    assert f"{other} PERMISSION_DENIED" in logs
    assert f"{item.run} OK" in logs
    assert "the token is ***" in logs  # masked: a job that prints its token does not publish it
    assert not [line for line in logs if token in line]
    assert token not in agent.log_file.read_text()
    assert dict(stack.run(item.run).summary) == {"written_by": item.run}
    assert not dict(stack.run(other).summary)


def test_an_agent_key_leases_only_its_queues_and_says_why_it_is_refused(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "refused", "print('never runs')\n")
    mine, other = stack.new_queue(), stack.new_queue()
    key = agent_key(stack, mine)
    name = stack.enqueue(other, job)
    agent = start_agent([other], env={"TAKEOFF_API_KEY": key})

    def refusals() -> int | None:
        lines = [
            line
            for line in agent.log_file.read_text().splitlines()
            if "refused this agent's API key (PERMISSION_DENIED" in line
        ]
        return len(lines) if len(lines) >= 2 else None

    wait_for(refusals, timeout=60, what="the agent to be refused twice, saying why")
    log = agent.log_file.read_text()
    assert f"queues.lease on {other}" in log
    assert key not in log
    assert agent.process.poll() is None  # it keeps trying: an operator may fix its key
    assert stack.item(name).state == common_pb2.ITEM_STATE_PENDING
    agent.terminate()


def test_secrets_reach_the_job_as_env_and_file_and_nowhere_else(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    value, key = f"pw-{uuid.uuid4().hex}", f"-----KEY-----\n{uuid.uuid4().hex}\n".encode()
    password, key_file = set_secret(stack, value.encode()), set_secret(stack, key)
    job = code_job(client, tmp_path, "secretive", SECRET_JOB)
    queue = stack.new_queue(
        max_attempts=1, secrets=[queue_pb2.SecretMount(secret=password, env="MODEL_PASSWORD")]
    )
    mount = queue_pb2.SecretMount(secret=key_file, file="model.key")  # the item's, besides the queue's
    with running_agent(start_agent, [queue], env={"TAKEOFF_API_KEY": agent_key(stack, queue)}) as agent:
        item = stack.wait_ended(stack.enqueue(queue, job, secrets=[mount]))

    assert (item.state, item.reason, item.exit_code) == (FAILED, common_pb2.FAILURE_REASON_JOB_FAILED, 3)
    logs = stack.logs(item.run)
    assert f"env sha256 {hashlib.sha256(value.encode()).hexdigest()}" in logs  # the job had them
    assert f"file sha256 {hashlib.sha256(key).hexdigest()}" in logs
    assert "the password is ***" in logs
    assert "the password is ***" in item.message
    assert not [line for line in logs if value in line]
    assert value not in item.message
    assert value not in stack.run(item.run).message
    agent_log = agent.log_file.read_text()
    assert value not in agent_log
    assert key.decode().split()[1] not in agent_log
    assert not list((agent.state_dir / "leases").glob("*"))  # the secrets directory went with its lease


def test_the_job_gets_the_ca_certificate_of_a_tls_registry(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot checked by the agent\n-----END CERTIFICATE-----\n")
    job = code_job(client, tmp_path, "tls", CA_JOB)
    queue = stack.new_queue(max_attempts=1)
    settings = {"job_registry_address": stack.registry, "job_registry_ca_file": str(ca)}
    with running_agent(start_agent, [queue], **settings):
        item = stack.wait_ended(stack.enqueue(queue, job))

    assert f"ca {hashlib.sha256(ca.read_bytes()).hexdigest()}" in stack.logs(item.run)


def test_a_secret_the_job_cannot_have_fails_the_attempt_naming_it(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    missing = f"projects/{PROJECT}/secrets/missing{uuid.uuid4().hex[:8]}"
    job = code_job(client, tmp_path, "unsecret", "print('never runs')\n")
    queue = stack.new_queue(max_attempts=1)
    mount = queue_pb2.SecretMount(secret=missing, env="NOPE")
    with running_agent(start_agent, [queue], env={"TAKEOFF_API_KEY": agent_key(stack, queue)}):
        item = stack.wait_ended(stack.enqueue(queue, job, secrets=[mount]))

    assert (item.state, item.reason) == (FAILED, common_pb2.FAILURE_REASON_CONFIG_INVALID)
    assert missing in item.message
    assert stack.run(item.run).state == common_pb2.RUN_STATE_FAILED


def test_a_restarted_agent_finishes_its_run_with_the_recorded_token(
    stack: Stack, client: Client, start_agent: StartAgent, tmp_path: Path
) -> None:
    job = code_job(client, tmp_path, "restarted", WAITER)
    queue = stack.new_queue()
    key, go = agent_key(stack, queue), tmp_path / "go"
    first = start_agent([queue], env={"TAKEOFF_API_KEY": key})
    name = stack.enqueue(queue, job, run_config=struct({"go": str(go)}))
    running = stack.wait_state(name, RUNNING)
    pid = job_pid(stack, running.run)
    [recorded] = (first.state_dir / "leases").glob("*/assignment.bin")
    assert stat.S_IMODE(recorded.stat().st_mode) == 0o600  # it holds the run token
    assert stat.S_IMODE(recorded.parent.stat().st_mode) == 0o700

    first.kill()
    with running_agent(
        start_agent, [queue], state_dir=first.state_dir, env={"TAKEOFF_API_KEY": key}
    ) as second:
        second.wait_working_on(name, RUNNING)
        assert pid_alive(pid)
        go.touch()
        item = stack.wait_ended(name, timeout=60)

    assert (item.state, item.attempt) == (SUCCEEDED, 1), item.message
    run = stack.run(item.run)
    assert run.state == common_pb2.RUN_STATE_FINISHED
    assert "done waiting" in stack.logs(item.run)
