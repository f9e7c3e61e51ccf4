"""A multi-node job that needs no GPU and no torch (docs/design.md §12): each rank checks the environment
its launcher gave it, then the ranks add up their ranks over TCP the way a collective would, rank 0 serving
at ``MASTER_ADDR:MASTER_PORT`` like torch's TCP store. Rank 0 reports the run; the other ranks run the SDK
disabled (``TAKEOFF_MODE=disabled``), so their ``takeoff.init`` is a no-op and one attempt has one run.

It exits nonzero on any inconsistency: a variable missing or out of range, a rank other than 0 that would
report, a sum that does not add up, a peer that does not turn up within ``EXCHANGE_TIMEOUT`` seconds.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import takeoff

RANK_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")
EXCHANGE_TIMEOUT = float(os.environ.get("EXCHANGE_TIMEOUT", "60"))


class Inconsistent(Exception):
    """The launch gave this rank an environment that does not describe one world."""


def read_world() -> tuple[str, dict[str, int]]:
    """``MASTER_ADDR`` and the rank variables as numbers, checked against each other."""
    missing = [name for name in ("MASTER_ADDR", *RANK_VARIABLES) if not os.environ.get(name)]
    if missing:
        raise Inconsistent(f"not set: {', '.join(missing)}")
    try:
        world = {name: int(os.environ[name]) for name in RANK_VARIABLES}
    except ValueError as error:
        raise Inconsistent(f"a rank variable is not a whole number: {error}") from None
    size, rank, local_size = world["WORLD_SIZE"], world["RANK"], world["LOCAL_WORLD_SIZE"]
    checks = {
        "WORLD_SIZE >= 1": size >= 1,
        "0 <= RANK < WORLD_SIZE": 0 <= rank < size,
        "LOCAL_WORLD_SIZE divides WORLD_SIZE": local_size >= 1 and size % local_size == 0,
        "0 <= LOCAL_RANK < LOCAL_WORLD_SIZE": 0 <= world["LOCAL_RANK"] < local_size,
        "RANK == NODE_RANK * LOCAL_WORLD_SIZE + LOCAL_RANK": rank
        == world["NODE_RANK"] * local_size + world["LOCAL_RANK"],
        "0 < MASTER_PORT < 65536": 0 < world["MASTER_PORT"] < 65536,
        "TAKEOFF_MODE=disabled on ranks other than 0": rank == 0
        or os.environ.get("TAKEOFF_MODE") == "disabled",
    }
    broken = [check for check, holds in checks.items() if not holds]
    if broken:
        raise Inconsistent(f"{'; '.join(broken)} does not hold for {world}")
    return os.environ["MASTER_ADDR"], world


def serve_sum(port: int, size: int) -> int:
    """Rank 0: take every other rank's number, answer each with the sum of all ranks."""
    with socket.create_server(("", port), backlog=size) as server:
        server.settimeout(EXCHANGE_TIMEOUT)
        peers = [server.accept()[0] for _ in range(size - 1)]
    try:
        for peer in peers:
            peer.settimeout(EXCHANGE_TIMEOUT)
        ranks = [int(peer.makefile().readline()) for peer in peers]
        if sorted(ranks) != list(range(1, size)):
            raise Inconsistent(f"rank 0 heard from ranks {sorted(ranks)}, not 1 to {size - 1}")
        total = sum(ranks)
        for peer in peers:
            peer.sendall(f"{total}\n".encode())
        return total
    finally:
        for peer in peers:
            peer.close()


def ask_sum(address: str, port: int, rank: int) -> int:
    """Another rank: send rank 0 this rank's number (retrying while rank 0 is not listening yet)."""
    deadline = time.monotonic() + EXCHANGE_TIMEOUT
    while True:
        try:
            connection = socket.create_connection((address, port), timeout=EXCHANGE_TIMEOUT)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with connection:
        connection.sendall(f"{rank}\n".encode())
        return int(connection.makefile().readline())


def main() -> int:
    try:
        address, world = read_world()
    except Inconsistent as error:
        print(f"inconsistent rank environment: {error}", file=sys.stderr)
        return 1
    size, rank = world["WORLD_SIZE"], world["RANK"]
    run = takeoff.init(config={"exchange": "sum of ranks"})
    node, local_rank, port = world["NODE_RANK"], world["LOCAL_RANK"], world["MASTER_PORT"]
    print(f"rank {rank} of {size} (node {node}, local rank {local_rank}), master {address}:{port}")
    try:
        total = (
            serve_sum(world["MASTER_PORT"], size)
            if rank == 0
            else ask_sum(address, world["MASTER_PORT"], rank)
        )
    except (Inconsistent, OSError, ValueError) as error:
        print(f"rank {rank}: the exchange failed: {error}", file=sys.stderr)
        return 1
    expected = size * (size - 1) // 2
    print(f"rank {rank}: sum of ranks {total}")
    if total != expected:
        print(f"rank {rank}: the sum is {total}, not {expected}", file=sys.stderr)
        return 1
    run.log({"world_size": size, "sum_of_ranks": total})
    run.summary["sum_of_ranks"] = total
    run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
