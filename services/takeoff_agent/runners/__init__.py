"""The agent's runners, one per resource kind, made from the agent config's ``runners:`` section.

Each kind's module is imported only when configured: an agent without a ``kubernetes`` runner never
needs the Kubernetes client installed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import cast

from takeoff_agent.domain import ResourceKind
from takeoff_agent.runners.base import Runner, RunnerContext

RUNNER_MODULES = {
    ResourceKind.LOCAL_PROCESS: "takeoff_agent.runners.local_process",
    ResourceKind.LOCAL_CONTAINER: "takeoff_agent.runners.container",
    ResourceKind.KUBERNETES: "takeoff_agent.runners.kubernetes",
    ResourceKind.SLURM: "takeoff_agent.runners.slurm",
    ResourceKind.RAY: "takeoff_agent.runners.ray",
}
KIND_NAMES = ", ".join(kind.config_name for kind in ResourceKind)

CreateRunner = Callable[[Mapping[str, object], RunnerContext], Runner]


def runner_kind(name: str) -> ResourceKind:
    """The kind a ``runners:`` key names; ValueError for any other key."""
    try:
        return ResourceKind.from_config_name(name)
    except KeyError:
        raise ValueError(f"no runner kind {name!r} (the kinds: {KIND_NAMES})") from None


def create_runners(
    config: Mapping[str, Mapping[str, object]], context: RunnerContext
) -> dict[ResourceKind, Runner]:
    """One runner per configured kind; ValueError naming the runner and its bad option, if any."""
    runners: dict[ResourceKind, Runner] = {}
    for name, options in config.items():
        kind = runner_kind(name)
        create = _load(kind)
        try:
            runners[kind] = create(options, context)
        except ValueError as error:
            raise ValueError(f"runners.{name}: {error}") from None
    return runners


def _load(kind: ResourceKind) -> CreateRunner:
    module_name = RUNNER_MODULES[kind]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            raise ValueError(f"this agent has no {kind.config_name} runner") from None
        raise ValueError(
            f"the {kind.config_name} runner needs the Python package {error.name!r}, which is not installed"
        ) from None
    return cast(CreateRunner, module.create)
