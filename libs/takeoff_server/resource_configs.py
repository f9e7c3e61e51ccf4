"""What the queue service and the agent's runners agree on about resource configs (docs/design.md §7): the
options each local kind takes, and the merge rules (the queue merges an item's override over its queue's
config; the kubernetes runner merges the result over its Job defaults).

Dicts merge key by key; lists are replaced, except, with ``by_name``, the Kubernetes lists ``containers``,
``env``, ``volumes`` and ``volumeMounts``, whose entries merge by ``name``.
"""

from __future__ import annotations

import copy
from typing import Any

CONTAINER_OPTIONS = frozenset(
    {
        "gpus",
        "cpus",
        "mem_limit",
        "memswap_limit",
        "shm_size",
        "env",
        "volumes",
        "user",
        "ipc_mode",
        "ulimits",
        "nodes",
    }
)
"""The docker options a local-container queue may set; the container runner maps each onto the engine."""
PROCESS_OPTIONS = frozenset({"env", "nodes"})
"""What a local-process queue may set."""
MULTI_NODE_OPTION = "nodes"
"""A multi-node launch (docs/design.md §12): ``nodes: N`` starts N ranks (local-process: N processes on the
agent's host; local-container: N containers sharing rank 0's network; kubernetes: an Indexed Job of N pods,
a top-level key beside the Job manifest's; slurm: N nodes, ``ntasks_per_node`` ranks on each)."""
SLURM_OPTIONS = frozenset(
    {
        "partition",
        "nodes",
        "ntasks_per_node",
        "gpus_per_node",
        "cpus_per_task",
        "mem",
        "time",
        "account",
        "qos",
        "constraint",
        "sbatch",
        "env",
    }
)
"""What a slurm queue may set: the sbatch options of the same names (``ntasks_per_node`` is
``--ntasks-per-node``), ``sbatch`` for more options of :data:`SBATCH_EXTRA_OPTIONS`, and ``env``."""
SBATCH_EXTRA_OPTIONS = frozenset(
    {
        "begin",
        "comment",
        "cores_per_socket",
        "cpus_per_gpu",
        "deadline",
        "distribution",
        "exclude",
        "exclusive",
        "gpus",
        "gpus_per_task",
        "gres",
        "hint",
        "licenses",
        "mail_type",
        "mail_user",
        "mem_per_cpu",
        "mem_per_gpu",
        "nice",
        "nodelist",
        "reservation",
        "sockets_per_node",
        "switches",
        "threads_per_core",
        "tmp",
        "wckey",
    }
)
"""The options a slurm resource config's ``sbatch`` may pass on (``mail_type`` is ``--mail-type``): none
that moves the job's output, working directory, environment or identity (``output``, ``chdir``,
``export``, ``uid``), names it (``job_name``: the runner finds its jobs by name) or makes more than one job
(``array``)."""
RAY_OPTIONS = frozenset(
    {"entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory", "entrypoint_resources", "env"}
)
"""What a ray queue may set: the Jobs API's entrypoint resources (``entrypoint_memory`` in bytes) and
``env``."""
MERGED_BY_NAME = frozenset({"containers", "env", "volumes", "volumeMounts"})


def deep_merge(base: Any, override: Any, *, by_name: bool = False) -> Any:
    """``override`` over ``base`` by the rules above; neither argument is changed."""
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return copy.deepcopy(override)
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if (
            by_name
            and key in MERGED_BY_NAME
            and isinstance(merged.get(key), list)
            and isinstance(value, list)
        ):
            merged[key] = merge_named(merged[key], value)
        elif key in merged:
            merged[key] = deep_merge(merged[key], value, by_name=by_name)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def merge_named(base: list[Any], override: list[Any]) -> list[Any]:
    """The entries of ``override`` merged into those of ``base`` with the same ``name``, the others
    appended in order."""
    merged = copy.deepcopy(base)
    position = {entry.get("name"): i for i, entry in enumerate(merged) if isinstance(entry, dict)}
    for entry in override:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name is not None and name in position:
            merged[position[name]] = deep_merge(merged[position[name]], entry, by_name=True)
        else:
            if name is not None:
                position[name] = len(merged)
            merged.append(copy.deepcopy(entry))
    return merged
