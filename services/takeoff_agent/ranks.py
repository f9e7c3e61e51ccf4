"""Multi-node launches (docs/design.md §12): how many ranks a resource config asks for, and the environment
each rank gets, the variables torchrun and most launchers read.

Every runner starts the ranks its own way (processes under one shim, containers sharing rank 0's network,
an Indexed Job, ``srun`` in a batch script) and gives each rank :func:`rank_environment`. Rank 0 writes
the attempt's run; the others run the SDK disabled, so one attempt has one run.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass

from takeoff_server.resource_configs import MULTI_NODE_OPTION

PROCS_PER_NODE_OPTION = "ntasks_per_node"
"""Ranks on each node (Slurm's own name; the other kinds run one rank per node)."""


@dataclass(frozen=True, slots=True)
class World:
    """The ranks of one attempt: ``nodes`` nodes (pods, containers, processes) with ``procs_per_node``
    ranks each. Rank ``r`` runs on node ``r // procs_per_node`` as its local rank ``r % procs_per_node``."""

    nodes: int = 1
    procs_per_node: int = 1

    @property
    def size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def multi(self) -> bool:
        """Whether the job runs as more than one process (a job of one process gets no rank variables)."""
        return self.size > 1


ONE_PROCESS = World()
"""The world of a job that asks for no ranks."""


def world_of(resource_config: Mapping[str, object]) -> World:
    """The world a resource config asks for (``nodes``, and on Slurm ``ntasks_per_node``), as the queue has
    checked them (whole numbers from 1)."""
    counts = [resource_config.get(option, 1) for option in (MULTI_NODE_OPTION, PROCS_PER_NODE_OPTION)]
    nodes, procs_per_node = (count if isinstance(count, int) else 1 for count in counts)
    return World(nodes=nodes, procs_per_node=procs_per_node)


def rank_environment(world: World, rank: int, *, master_addr: str, master_port: int) -> dict[str, str]:
    """What rank ``rank`` of ``world`` is given: ``MASTER_ADDR`` (an address every rank can reach: rank 0's
    host or pod), ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``NODE_RANK``,
    ``LOCAL_WORLD_SIZE``; ranks other than 0 also ``TAKEOFF_MODE=disabled``."""
    if not 0 <= rank < world.size:
        raise ValueError(f"rank {rank} is not in a world of {world.size}")
    environment = {
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "WORLD_SIZE": str(world.size),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank % world.procs_per_node),
        "NODE_RANK": str(rank // world.procs_per_node),
        "LOCAL_WORLD_SIZE": str(world.procs_per_node),
    }
    if rank:
        environment["TAKEOFF_MODE"] = "disabled"
    return environment


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now at ``host``, for ``MASTER_PORT`` of ranks on one host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port
