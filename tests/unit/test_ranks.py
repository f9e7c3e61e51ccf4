"""The ranks of a multi-node launch: the world a resource config asks for and each rank's environment."""

from __future__ import annotations

import socket

import pytest

from takeoff_agent.ranks import ONE_PROCESS, World, free_port, rank_environment, world_of


def test_a_config_without_nodes_is_one_process_with_no_rank_variables() -> None:
    assert world_of({"env": {"A": "1"}}) == ONE_PROCESS
    assert (ONE_PROCESS.size, ONE_PROCESS.multi) == (1, False)
    assert not World(nodes=1, procs_per_node=1).multi


def test_nodes_and_tasks_per_node_multiply() -> None:
    assert world_of({"nodes": 3}) == World(nodes=3)
    world = world_of({"nodes": 2, "ntasks_per_node": 4})
    assert (world.size, world.multi) == (8, True)
    assert world_of({"nodes": 1, "ntasks_per_node": 2}).multi


def test_each_rank_knows_its_node_and_local_rank() -> None:
    world = World(nodes=2, procs_per_node=4)
    environment = rank_environment(world, 5, master_addr="10.0.0.7", master_port=29500)

    assert environment == {
        "MASTER_ADDR": "10.0.0.7",
        "MASTER_PORT": "29500",
        "WORLD_SIZE": "8",
        "RANK": "5",
        "LOCAL_RANK": "1",
        "NODE_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "TAKEOFF_MODE": "disabled",
    }


def test_only_rank_zero_reports_the_run() -> None:
    world = World(nodes=2)
    ranks = [rank_environment(world, rank, master_addr="127.0.0.1", master_port=1) for rank in range(2)]

    assert "TAKEOFF_MODE" not in ranks[0]
    assert ranks[1]["TAKEOFF_MODE"] == "disabled"
    assert [(r["RANK"], r["NODE_RANK"], r["LOCAL_RANK"]) for r in ranks] == [("0", "0", "0"), ("1", "1", "0")]


@pytest.mark.parametrize("rank", [-1, 2])
def test_a_rank_outside_the_world_is_refused(rank: int) -> None:
    with pytest.raises(ValueError, match=f"rank {rank} is not in a world of 2"):
        rank_environment(World(nodes=2), rank, master_addr="127.0.0.1", master_port=1)


def test_a_free_port_can_be_listened_on() -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)) as server:
        assert server.getsockname()[1] == port
