"""``takeoff up`` and ``takeoff status``: run and inspect a local stack."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from takeoff._auth import admin_key_path, keys_dir
from takeoff._home import DEFAULT_PORTS, takeoff_home
from takeoff._stack_file import StackRecord
from takeoff.cli import demo_command
from takeoff.cli._output import Column, Listing, console, error_console, fail, print_json, usage_error
from takeoff.cli._registry import cli_key
from takeoff.stack import LocalStack, StackError, service_health


def _stack_listing(record: StackRecord, health: dict[str, str] | None = None) -> Listing:
    # The addresses stay whole, to be copied into TAKEOFF_*_ADDRESS; a log's path may fold.
    last_column = Column("health") if health else Column("log", free_text=True)
    listing = Listing(
        [Column("service"), Column("address"), Column("pid", justify="right"), last_column],
        wide=False,
        title=f"Takeoff stack (supervisor pid {record.supervisor_pid})",
    )
    for name, service in record.services.items():
        last = health[name] if health else service.log
        style = "green" if last == "SERVING" else ("red" if health else "")
        metrics = [f"metrics {service.metrics_address}"] if service.metrics_address else []
        listing.add_row(
            name,
            "\n".join([*service.addresses, *metrics]),
            str(service.pid),
            f"[{style}]{last}[/]" if style else last,
        )
    return listing


def _start(stack: LocalStack) -> StackRecord:
    try:
        with console.status(f"starting {', '.join(stack.services)}..."):
            return stack.start()
    except StackError as error:
        fail(str(error))


def up(
    agent: Annotated[Path | None, typer.Option(help="Also start an agent with this agent.yaml.")] = None,
    host: Annotated[str, typer.Option(help="Interface the services listen on.")] = "127.0.0.1",
    base_port: Annotated[
        int,
        typer.Option(help="Registry port; queue, builder and agent take the next ones. 0 picks free ports."),
    ] = DEFAULT_PORTS["registry"],
    web_console: Annotated[
        bool, typer.Option("--console/--no-console", help="Also start the web console.")
    ] = True,
    console_port: Annotated[
        int | None,
        typer.Option(
            help="The web console's port on 127.0.0.1 (always loopback); 0 picks a free one."
            f" Default {DEFAULT_PORTS['console']}, or a free one with --base-port 0.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Start the registry, queue, builder and web console (and an agent) on the embedded default; Ctrl-C
    stops all.

    The first start makes an admin key in TAKEOFF_HOME/keys/admin.key (mode 0600),
    which the CLI and SDK then use, and a key for the queue and for the builder;
    later starts reuse them. The agent presents the CLI's key (--key, else
    TAKEOFF_API_KEY, else the admin key) unless its agent.yaml gives api_key or
    api_key_file. No key is printed: `takeoff keys create` makes others. The web
    console's one-time sign-in link is printed: it signs one browser in with the
    admin key, once; other browsers sign in with an API key.
    """
    if agent is not None and not agent.is_file():
        usage_error(f"agent config {agent} does not exist")
    home = takeoff_home()
    found = cli_key()
    agent_key = None if found is None or found.source == str(admin_key_path(home)) else found.secret
    stack = LocalStack(
        home,
        host=host,
        base_port=base_port,
        agent_config=agent,
        agent_key=agent_key,
        console_port=_console_port(console_port, base_port) if web_console else None,
    )
    stopping = False

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    record = _start(stack)
    _stack_listing(record).print()
    console.print(
        f"state and logs in {stack.home}; the admin key in {keys_dir(stack.home)}; Ctrl-C stops the stack"
    )
    if web_console:
        console.print(f"web console: {stack.console_signin_url} (the link signs in once)", soft_wrap=True)
    crashed = stack.wait(lambda: stopping)
    if crashed is not None:
        error_console.print(
            f"[bold red]{crashed.name} exited unexpectedly with code {crashed.process.returncode}[/];"
            f" stopping the stack. Last lines of {crashed.log}:\n{crashed.log_tail()}",
            highlight=False,
        )
    with console.status("stopping..."):
        stack.stop()
    console.print("stack stopped")
    if crashed is not None:
        raise typer.Exit(1)


def _console_port(given: int | None, base_port: int) -> int:
    if given is not None:
        return given
    return 0 if base_port == 0 else DEFAULT_PORTS["console"]


def status(json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show each service of the running stack and its health."""
    home = takeoff_home()
    record = StackRecord.read(home)
    if record is None:
        fail(f"no stack is running under {home}; start one with `takeoff up`")
    health = {name: service_health(name, service.address) for name, service in record.services.items()}
    if json_output:
        print_json(
            {
                name: {
                    "addresses": service.addresses,
                    "metrics_address": service.metrics_address,
                    "pid": service.pid,
                    "health": health[name],
                }
                for name, service in record.services.items()
            }
        )
    else:
        _stack_listing(record, health).print()
    if any(state != "SERVING" for state in health.values()):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(up)
    app.command()(status)
    app.command()(demo_command.demo)
