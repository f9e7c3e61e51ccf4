"""What runs inside a Slurm job that the slurm runner submitted (docs/design.md §12), on a compute node.

The batch script runs this file by its path with the agent's interpreter and ``-P``
(``python -P slurm_batch.py batch LEASE_DIR``), not as ``-m takeoff_agent.runners.slurm_batch``: importing
the runners package would add a third of a second to every job's start, and ``-P`` keeps this directory
(whose ``secrets.py`` would shadow the standard library's) off ``sys.path``.

- ``batch LEASE_DIR``: the shim, in the batch step. The job's environment is the one the agent wrote into
  ``spec.json``, plus the ``SLURM_*`` variables of the allocation (so that ``srun`` and the job see the
  allocation they run in). A multi-node launch also gets ``MASTER_PORT``, a port free on this node, the
  first of the allocation, where rank 0 runs.
- ``rank NODES PROCS_PER_NODE -- ARGV...``: one rank of a multi-node launch, started by ``srun``: its
  variables (:func:`takeoff_agent.ranks.rank_environment`) from ``SLURM_PROCID``, with ``MASTER_ADDR`` the
  address of the node ``srun`` runs on (the first node: Slurm's own address for it, never a name to
  resolve), then ``exec`` of the job.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from takeoff_agent.shim import run_process

MULTI_NODE_KEY = "world"
"""In ``spec.json`` of a multi-node launch: ``[nodes, procs_per_node]``; the job's argv is then ``srun``."""
UNEXPORTED = frozenset({"SLURM_EXPORT_ENV"})
"""How the batch job was submitted to take its environment (an ``--export`` a user's sbatch defaults may
set), which ``srun`` would apply to the ranks: they get the job's environment, whole."""


def batch(lease_dir: Path) -> None:
    spec = json.loads((lease_dir / "spec.json").read_text())
    allocation = {
        name: value
        for name, value in os.environ.items()
        if name.startswith("SLURM_") and name not in UNEXPORTED
    }
    env = {**spec["env"], **allocation}
    if MULTI_NODE_KEY in spec:
        from takeoff_agent.ranks import free_port  # only multi-node launches pay for its imports

        env["MASTER_PORT"] = str(free_port("0.0.0.0"))
    run_process(lease_dir, {**spec, "env": env})


def rank(nodes: int, procs_per_node: int, argv: list[str]) -> None:
    from takeoff_agent.ranks import World, rank_environment

    variables = rank_environment(
        World(nodes=nodes, procs_per_node=procs_per_node),
        int(os.environ["SLURM_PROCID"]),
        master_addr=os.environ["SLURM_LAUNCH_NODE_IPADDR"],
        master_port=int(os.environ["MASTER_PORT"]),
    )
    os.execvpe(argv[0], argv, {**os.environ, **variables})


def main(arguments: list[str]) -> int:
    match arguments:
        case ["batch", lease_dir]:
            batch(Path(lease_dir))
        case ["rank", nodes, procs_per_node, "--", *argv] if argv:
            rank(int(nodes), int(procs_per_node), argv)
        case _:
            print(
                f"usage: {sys.argv[0]} batch LEASE_DIR | rank NODES PROCS_PER_NODE -- ARGV...",
                file=sys.stderr,
            )
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
