"""``takeoff demo``: the main job, end to end, on the embedded default (SQLite, local-process, venv builds).

Starts the stack in ``TAKEOFF_HOME``, creates the example job from ``examples/train`` (a small training
loop with a config schema and one requirement) and a queue, starts an agent, launches the job twice with
different configs, shows the items' states live, then each run's config, metrics and final state, and
stops everything. No Docker needed by default; ``--resource local-container`` runs the same job in
containers (an image built from ``--base-image``), which needs a Docker engine.

The demo's stack is its own: it and its agent present the stack's admin key
(``TAKEOFF_HOME/keys/admin.key``, made on the first start), whatever key the environment names.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import grpc
import typer
import yaml
from rich.live import Live
from rich.table import Table

from takeoff._auth import channel_credentials
from takeoff._home import takeoff_home
from takeoff.cli._output import Column, Listing, console, fail, short_id, usage_error
from takeoff.cli._registry import use_key
from takeoff.cli.run_commands import show
from takeoff.client import Client
from takeoff.models import Environment, JobInputs, ResourceKind, dict_to_struct, struct_to_dict
from takeoff.stack import LocalStack, StackError, docker_answers, docker_location, ensure_image
from takeoff.v1 import common_pb2, queue_pb2, queue_pb2_grpc
from takeoff_rpc.channels import open_channel

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "train"
PROJECT = "demo"
CONFIGS = ({"lr": 0.1, "epochs": 3}, {"lr": 0.4, "epochs": 5})
ENDED = {common_pb2.ITEM_STATE_SUCCEEDED, common_pb2.ITEM_STATE_FAILED, common_pb2.ITEM_STATE_CANCELLED}
BUILDER_DEFAULT_BASE_IMAGE = "python:3.12-slim"
"""The builder's own ``default_base_image``; the demo names it to the builder it starts, having checked that
the Docker engine has it (or can pull it)."""
DEMO_QUEUES = {
    ResourceKind.LOCAL_PROCESS: ("local", common_pb2.RESOURCE_KIND_LOCAL_PROCESS),
    ResourceKind.LOCAL_CONTAINER: ("containers", common_pb2.RESOURCE_KIND_LOCAL_CONTAINER),
}
"""The queue the demo launches on, by where its job runs."""


def _state(item: queue_pb2.Item) -> str:
    name = common_pb2.ItemState.Name(item.state).removeprefix("ITEM_STATE_")
    colour = {"SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "yellow"}.get(name, "cyan")
    return f"[{colour}]{name}[/]"


ITEM_COLUMNS = (
    Column("item"),
    Column("config", free_text=True),
    Column("state"),
    Column("attempt", justify="right"),
    Column("history", free_text=True),
)


def _items_table(items: list[queue_pb2.Item], started: float) -> Table:
    listing = Listing(ITEM_COLUMNS, wide=False, title=f"launched items ({time.monotonic() - started:.1f}s)")
    for item in items:
        history = " > ".join(
            common_pb2.ItemState.Name(t.to_state).removeprefix("ITEM_STATE_") for t in item.transitions
        )
        config = json.dumps(struct_to_dict(item.run_config), sort_keys=True)
        listing.add_row(
            short_id(item.name.rsplit("/", 1)[1]), config, _state(item), str(item.attempt), history
        )
    return listing.table


def _create_queue(queues: queue_pb2_grpc.QueueServiceStub, resource: ResourceKind) -> str:
    queue_id, kind = DEMO_QUEUES[resource]
    name = f"projects/{PROJECT}/queues/{queue_id}"
    try:
        queues.CreateQueue(
            queue_pb2.CreateQueueRequest(
                parent=f"projects/{PROJECT}",
                queue_id=queue_id,
                queue=queue_pb2.Queue(resource=kind, description="takeoff demo"),
            )
        )
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
    return name


def _check_docker(base_image: str) -> None:
    """Fail with what to do when the containers cannot run here: no engine, or no base image to build on."""
    if not docker_answers():
        fail(f"Docker is not reachable at {docker_location()}; run without --resource or start Docker")
    try:
        with console.status(f"looking for the base image {base_image}..."):
            ensure_image(base_image)
    except StackError as error:
        fail(
            f"{error}; pass --base-image IMAGE (or set TAKEOFF_DEFAULT_BASE_IMAGE),"
            " an image with python3 and venv"
        )


def demo(
    example: Annotated[Path, typer.Option(help="The job's directory.")] = EXAMPLE,
    resource: Annotated[
        ResourceKind,
        typer.Option(
            help="Where the job runs: local-process, or local-container (needs Docker).", case_sensitive=False
        ),
    ] = ResourceKind.LOCAL_PROCESS,
    base_image: Annotated[
        str,
        typer.Option(
            envvar="TAKEOFF_DEFAULT_BASE_IMAGE",
            help="local-container: the image the job's image is built on; it needs python3 with venv.",
        ),
    ] = BUILDER_DEFAULT_BASE_IMAGE,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the runs.")] = 600,
) -> None:
    """Run the example job twice on a local stack, show the runs, and stop the stack.

    The demo and its agent use the stack's admin key (TAKEOFF_HOME/keys/admin.key).
    """
    if not (example / "train.py").is_file():
        usage_error(f"no example job at {example} (pass --example DIR)")
    if resource not in DEMO_QUEUES:
        usage_error(f"the demo runs on {' or '.join(DEMO_QUEUES)}, not {resource}")
    containers = resource is ResourceKind.LOCAL_CONTAINER
    if containers:
        _check_docker(base_image)
    home = takeoff_home()
    stack = LocalStack(home, base_port=0, base_image=base_image if containers else None)
    started = time.monotonic()
    try:
        with console.status("starting the registry, queue and builder..."):
            record = stack.start()
    except StackError as error:
        fail(str(error))
    try:
        registry, queue_address = record.services["registry"].address, record.services["queue"].address
        admin_key = stack.admin_key
        use_key(admin_key)  # for `show` below, which makes its own client
        with Client(registry, queue=queue_address, project=PROJECT, api_key=admin_key) as client:
            created = client.create_job_version(
                "train",
                example,
                entrypoint=["python", "train.py"],
                environment=Environment(requirements=(example / "requirements.txt").read_text()),
                inputs=JobInputs(
                    schema=json.loads((example / "config.schema.json").read_text()), defaults=None
                ),
                outputs=["loss"],
            )
        console.print(
            f"job [bold]{created.version.name}[/] ({'unchanged' if created.reused_existing else 'new'})"
        )
        credentials = channel_credentials(queue_address)
        with open_channel(queue_address, api_key=admin_key, credentials=credentials) as channel:
            queues = queue_pb2_grpc.QueueServiceStub(channel)
            queue = _create_queue(queues, resource)
            console.print(f"queue {queue} ({resource})")
            agent_config = home / "demo-agent.yaml"
            agent_config.write_text(yaml.safe_dump({"name": "demo-agent", "queues": [queue], "max_jobs": 2}))
            with console.status("starting an agent..."):
                stack.start_agent(agent_config)
            names = [
                queues.Enqueue(
                    queue_pb2.EnqueueRequest(queue=queue, job="train", run_config=dict_to_struct(config))
                ).item.name
                for config in CONFIGS
            ]
            items = [queues.GetItem(queue_pb2.GetItemRequest(name=name)).item for name in names]
            with Live(_items_table(items, started), console=console, refresh_per_second=8) as live:
                deadline = time.monotonic() + timeout
                while not all(item.state in ENDED for item in items) and time.monotonic() < deadline:
                    time.sleep(0.1)
                    items = [queues.GetItem(queue_pb2.GetItemRequest(name=name)).item for name in names]
                    live.update(_items_table(items, started))
        for item in items:
            console.rule(f"run {item.run.rsplit('/', 1)[1]}")
            show(item.run, project=PROJECT)
        console.print(
            f"demo done in {time.monotonic() - started:.1f}s; logs: takeoff logs RUN (while a stack runs)"
        )
    finally:
        with console.status("stopping the stack..."):
            stack.stop()
    console.print("stack stopped")
    if not all(item.state == common_pb2.ITEM_STATE_SUCCEEDED for item in items):
        raise typer.Exit(1)
