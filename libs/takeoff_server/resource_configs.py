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
    }
)
"""The docker options a local-container queue may set; the container runner maps each onto the engine."""
PROCESS_OPTIONS = frozenset({"env"})
"""What a local-process queue may set."""
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
