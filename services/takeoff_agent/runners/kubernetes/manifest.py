"""The batch/v1 Job an attempt runs as: the resource config merged over the runner's defaults
(docs/design.md §7), the job's image, command and environment in its container, and the names and labels
that let a restarted agent find it again.

A multi-node launch (``nodes: N``, a top-level key beside the manifest's) is an Indexed Job of N pods, one
rank each (its completion index), with a headless Service that gives rank 0 a stable DNS name for
``MASTER_ADDR``.

Merge rules (the queue's, docs/design.md §7): dicts merge key by key; lists are replaced, except
``containers``, ``env``, ``volumes`` and ``volumeMounts``, whose entries merge by ``name``.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from takeoff_agent.domain import Assignment
from takeoff_agent.ranks import World, rank_environment, world_of
from takeoff_agent.runners.base import Launch
from takeoff_agent.runners.secrets import (
    CA_FILE_VARIABLE,
    CONTAINER_CA_FILE,
    CONTAINER_SECRETS_DIR,
    SECRETS_DIR_VARIABLE,
)
from takeoff_server.resource_configs import MULTI_NODE_OPTION, deep_merge, merge_named

JsonObject = dict[str, Any]

DEFAULT_CONTAINER = "job"
LABEL_PREFIX = "takeoff."
ANNOTATION_PREFIX = "takeoff.dev/"
ITEM_LABEL, AGENT_LABEL, EPOCH_LABEL, RUN_LABEL, LEASE_LABEL = (
    f"{LABEL_PREFIX}{part}" for part in ("item", "agent", "epoch", "run", "lease")
)
_LABEL_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
SECRETS_VOLUME = "takeoff-secrets"
"""The pod volume of the job's secret files (its Secret's ``file.*`` keys)."""
CA_VOLUME = "takeoff-ca"
"""The pod volume of the CA certificate (its Secret's CA_KEY)."""
FILE_KEY_PREFIX = "file."
"""A secret file's key in the Secret: the prefix and its name. A variable's key is its name, which has no
``.``: the two never meet."""
CA_KEY = "takeoff.ca.pem"
SECRET_FILE_MODE = 0o600
CA_FILE_MODE = 0o444
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
"""The annotation (and label) the job controller gives each pod of an Indexed Job: its index, the rank."""
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
"""The label the job controller gives each pod of a Job: the Job's name (the headless Service's selector)."""
MASTER_PORT = 29500
"""Rank 0's port for the ranks' rendezvous (torchrun's default): every pod has its own network, so any
port is free."""
RANK_FROM_INDEX = {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}
DISABLE_SDK_OFF_RANK_0 = 'if [ "$RANK" != 0 ]; then export TAKEOFF_MODE=disabled; fi; exec "$@"'
"""Run in ``/bin/sh`` before the job's command (its arguments): one pod template serves every rank of an
Indexed Job, and an environment variable cannot be set for some indexes only, so the ranks other than 0
switch the SDK off here. ``exec``: the job is the container's process, and gets its signals."""
RANK_WRAPPER = ["/bin/sh", "-c", DISABLE_SDK_OFF_RANK_0, "takeoff-rank"]


def _fixed_spec(world: World) -> dict[str, tuple[object, str]]:
    """Job spec fields whose meaning the runner cannot honour: it runs one pod per node, once, and owns
    the deadline. Each maps to the one value it may be given (None: none), and why."""
    pods = "an attempt is one pod" if not world.multi else f"an attempt is one pod per node ({world.nodes})"
    return {
        "activeDeadlineSeconds": (None, "the agent sets it to fence the Job to its lease; use max_run_time"),
        "backoffLimit": (0, f"{pods}; the queue retries"),
        "backoffLimitPerIndex": (None, f"{pods}; the queue retries"),
        "maxFailedIndexes": (None, pods),
        "completions": (world.nodes, f"{pods}; set nodes"),
        "parallelism": (world.nodes, f"{pods}; set nodes"),
        "completionMode": ("Indexed" if world.multi else "NonIndexed", f"{pods}; set nodes"),
        "podFailurePolicy": (None, f"{pods}; the queue retries"),
        "successPolicy": (None, pods),
        "suspend": (False, "the agent starts the Job"),
        "selector": (None, "the Job selects its own pod"),
        "manualSelector": (None, "the Job selects its own pod"),
    }


def _hashed(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def label_value(text: str) -> str:
    """``text`` when it is a valid label value, else a digest of it (ids may end in ``-`` or ``_``, agent
    ids may be longer than a label value's 63 characters)."""
    return text if _LABEL_VALUE.fullmatch(text) else f"h{_hashed(text, 40)}"


def job_name(lease_id: str) -> str:
    """The Job's name, the same for every call with this lease: a create retried after a lost reply finds
    the Job the first one made. Also the name of the Job's Secret."""
    name = f"takeoff-{lease_id}"
    return name if len(name) <= 52 and _DNS_LABEL.fullmatch(name) else f"takeoff-{_hashed(lease_id, 32)}"


def labels(assignment: Assignment, agent_id: str) -> dict[str, str]:
    return {
        ITEM_LABEL: label_value(assignment.item.rsplit("/", 1)[-1]),
        AGENT_LABEL: label_value(agent_id),
        EPOCH_LABEL: str(assignment.epoch),
        RUN_LABEL: label_value(assignment.run_id),
        LEASE_LABEL: label_value(assignment.lease_id),
    }


def is_dns_label(text: str) -> bool:
    return _DNS_LABEL.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class JobSettings:
    """What the runner's options put in every Job."""

    namespace: str
    agent_id: str
    ttl_seconds_after_finished: int
    image_pull_secrets: tuple[str, ...] = ()


def refusals(config: Mapping[str, Any], container_name: str, settings: JobSettings) -> list[str]:
    """Each part of a resource config the runner cannot honour, named by its path."""
    problems = []
    world = world_of(config)
    metadata = config.get("metadata") or {}
    for field in ("name", "generateName"):
        if field in metadata:
            problems.append(f"metadata.{field}: the agent names each attempt's Job")
    if metadata.get("namespace", settings.namespace) != settings.namespace:
        problems.append(f"metadata.namespace: this agent runs Jobs in namespace {settings.namespace!r}")
    spec = config.get("spec") or {}
    for field, (allowed, why) in _fixed_spec(world).items():
        if field in spec and spec[field] != allowed:
            given = "may not be set" if allowed is None else f"must be {allowed!r}"
            problems.append(f"spec.{field}: {given} ({why})")
    template = spec.get("template") or {}
    restart = (template.get("spec") or {}).get("restartPolicy", "Never")
    if restart != "Never":
        problems.append("spec.template.spec.restartPolicy: must be 'Never' (the queue retries, not the pod)")
    for where, meta in (("metadata", metadata), ("spec.template.metadata", template.get("metadata") or {})):
        for field in ("labels", "annotations"):
            for key in meta.get(field) or {}:
                if key.startswith((LABEL_PREFIX, ANNOTATION_PREFIX)):
                    problems.append(f"{where}.{field}.{key}: the agent sets the takeoff labels")
    pod_spec = template.get("spec") or {}
    if world.multi:
        problems += [
            f"spec.template.spec.{field}: the agent names the ranks' pods (MASTER_ADDR is rank 0's name)"
            for field in ("hostname", "subdomain")
            if field in pod_spec
        ]
    reserved = (SECRETS_VOLUME, CA_VOLUME)
    for volume in pod_spec.get("volumes") or []:
        if isinstance(volume, dict) and volume.get("name") in reserved:
            problems.append(f"spec.template.spec.volumes.{volume['name']}: the agent's volume")
    containers = pod_spec.get("containers") or []
    if container_name and containers and container_name not in [c.get("name") for c in containers]:
        problems.append(
            f"spec.template.spec.containers: no container named {container_name!r}, the queue's container"
        )
    return problems


def _defaults(settings: JobSettings, stop_grace_seconds: float) -> JsonObject:
    pod_spec: JsonObject = {
        "restartPolicy": "Never",
        # Deleting a Job deletes its pod with the pod's own grace period: the agent's stop grace.
        "terminationGracePeriodSeconds": math.ceil(stop_grace_seconds),
    }
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in settings.image_pull_secrets]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"namespace": settings.namespace},
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            "template": {"spec": pod_spec},
        },
    }


def _owned(assignment: Assignment, settings: JobSettings, active_deadline_seconds: int) -> JsonObject:
    """What the agent sets over the resource config (``refusals`` keeps the config from setting it)."""
    own_labels = labels(assignment, settings.agent_id)
    world = world_of(assignment.resource_config)
    template: JsonObject = {"metadata": {"labels": own_labels}}
    spec: JsonObject = {"activeDeadlineSeconds": active_deadline_seconds, "template": template}
    if world.multi:
        # One pod per rank, each named {job}-{index} by the job controller; the Service of the pods'
        # ``subdomain`` makes that name resolve: {job}-0.{service} is rank 0.
        spec |= {"completionMode": "Indexed", "completions": world.nodes, "parallelism": world.nodes}
        template["spec"] = {"subdomain": job_name(assignment.lease_id)}
    owned: JsonObject = {
        "metadata": {
            "name": job_name(assignment.lease_id),
            "namespace": settings.namespace,
            "labels": own_labels,
            "annotations": {
                f"{ANNOTATION_PREFIX}item": assignment.item,
                f"{ANNOTATION_PREFIX}run": assignment.run,
                f"{ANNOTATION_PREFIX}agent": settings.agent_id,
            },
        },
        "spec": spec,
    }
    return owned


def base_manifest(
    assignment: Assignment,
    settings: JobSettings,
    *,
    stop_grace_seconds: float,
    active_deadline_seconds: int,
) -> JsonObject:
    """Defaults, the resource config (but ``nodes``, not a Job field) over them, and the agent's own fields
    over both (no launch yet)."""
    config = {key: value for key, value in assignment.resource_config.items() if key != MULTI_NODE_OPTION}
    merged: JsonObject = deep_merge(_defaults(settings, stop_grace_seconds), config, by_name=True)
    merged = deep_merge(merged, _owned(assignment, settings, active_deadline_seconds), by_name=True)
    _quantities_as_text(merged)
    return merged


def job_manifest(
    assignment: Assignment,
    launch: Launch,
    settings: JobSettings,
    *,
    active_deadline_seconds: int,
) -> JsonObject:
    """The Job that runs ``launch``: its image, command and environment in the assignment's container
    (else the first; a config without containers gets one named ``job``)."""
    manifest = base_manifest(
        assignment,
        settings,
        stop_grace_seconds=launch.stop_grace_seconds,
        active_deadline_seconds=active_deadline_seconds,
    )
    pod_spec = manifest["spec"]["template"]["spec"]
    container = job_container(manifest, assignment.container_name)
    container["image"] = launch.built.image
    if assignment.entrypoint:
        container["command"] = list(assignment.entrypoint)
    secret = job_name(assignment.lease_id)
    environment: list[JsonObject] = [{"name": name, "value": value} for name, value in launch.env.items()]
    world = world_of(assignment.resource_config)
    if world.multi:
        # ``check`` made sure there is a command to wrap (an image's own cannot be).
        container["command"] = RANK_WRAPPER + container["command"]
        environment += _rank_environment(world, secret)
    environment.append({"name": "TAKEOFF_REGISTRY", "value": launch.registry_address})
    environment += [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": name}}}
        for name in launch.secrets
    ]
    volumes: list[JsonObject] = []
    mounts: list[JsonObject] = []
    if launch.secret_files:
        environment.append({"name": SECRETS_DIR_VARIABLE, "value": CONTAINER_SECRETS_DIR})
        items = [{"key": FILE_KEY_PREFIX + name, "path": name} for name in launch.secret_files]
        volumes.append(
            {
                "name": SECRETS_VOLUME,
                "secret": {"secretName": secret, "items": items, "defaultMode": SECRET_FILE_MODE},
            }
        )
        mounts.append({"name": SECRETS_VOLUME, "mountPath": CONTAINER_SECRETS_DIR, "readOnly": True})
    if launch.ca_file is not None:
        environment.append({"name": CA_FILE_VARIABLE, "value": CONTAINER_CA_FILE})
        items = [{"key": CA_KEY, "path": "ca.pem"}]
        volumes.append(
            {"name": CA_VOLUME, "secret": {"secretName": secret, "items": items, "defaultMode": CA_FILE_MODE}}
        )
        mounts.append(
            {"name": CA_VOLUME, "mountPath": CONTAINER_CA_FILE, "subPath": "ca.pem", "readOnly": True}
        )
    # Each of the agent's variables replaces the config's of its name whole, in its place: merged key by
    # key, a config's ``valueFrom`` beside the agent's ``value`` (or a secret's ``valueFrom`` beside a
    # plain ``value``) would make an entry the API server refuses.
    ours = {entry["name"]: entry for entry in environment}
    merged = merge_named(container.get("env") or [], list(ours.values()))
    container["env"] = [
        ours.get(entry.get("name"), entry) if isinstance(entry, dict) else entry for entry in merged
    ]
    if mounts:
        container["volumeMounts"] = merge_named(container.get("volumeMounts") or [], mounts)
        pod_spec["volumes"] = merge_named(pod_spec.get("volumes") or [], volumes)
    return manifest


def job_container(manifest: JsonObject, container_name: str) -> JsonObject:
    """The container of ``manifest`` that runs the job: the one ``container_name`` names, else the first;
    a manifest without containers gets one named ``job``."""
    containers = manifest["spec"]["template"]["spec"].setdefault("containers", [])
    container = next((c for c in containers if c.get("name") == container_name), None)
    if container is None:
        if not containers:
            containers.append({"name": container_name or DEFAULT_CONTAINER})
        container = containers[0]
    found: JsonObject = container
    return found


def _rank_environment(world: World, name: str) -> list[JsonObject]:
    """Every rank's variables in one pod template: rank 0's, but ``RANK`` and ``NODE_RANK`` (one rank per
    pod) read from the pod's completion index."""
    variables = rank_environment(world, 0, master_addr=f"{name}-0.{name}", master_port=MASTER_PORT)
    return [
        {"name": variable, "valueFrom": RANK_FROM_INDEX}
        if variable in ("RANK", "NODE_RANK")
        else {"name": variable, "value": value}
        for variable, value in variables.items()
    ]


def service_manifest(assignment: Assignment, settings: JobSettings) -> JsonObject:
    """The headless Service of a multi-node launch's pods (named as the Job, their ``subdomain``): it gives
    each pod the DNS name {hostname}.{service}, ready or not (ranks resolve rank 0 while it starts)."""
    name = job_name(assignment.lease_id)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": labels(assignment, settings.agent_id),
        },
        "spec": {"clusterIP": "None", "selector": {JOB_NAME_LABEL: name}, "publishNotReadyAddresses": True},
    }


def needs_secret(launch: Launch) -> bool:
    """Whether the job gets a Secret: it has secret variables, secret files or a CA certificate."""
    return bool(launch.secrets or launch.secret_files or launch.ca_file is not None)


def secret_manifest(
    assignment: Assignment, launch: Launch, settings: JobSettings, ca: bytes | None = None
) -> JsonObject:
    """The Secret holding the job's secret variables (the Job's ``env`` refers to them by key), its secret
    files (keys ``file.{name}``, mounted as a volume) and ``ca``, the CA certificate (CA_KEY). Names are
    checked first (``secrets.check_names``)."""
    data = {name: value.encode() for name, value in launch.secrets.items()}
    data |= {FILE_KEY_PREFIX + name: value for name, value in launch.secret_files.items()}
    if ca is not None:
        data[CA_KEY] = ca
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": job_name(assignment.lease_id),
            "namespace": settings.namespace,
            "labels": labels(assignment, settings.agent_id),
        },
        "data": {key: base64.b64encode(value).decode() for key, value in data.items()},
    }


def owner_reference(job: Mapping[str, Any]) -> JsonObject:
    """Makes the Secret (or Service) the Job's: deleting the Job deletes it. (No ``blockOwnerDeletion``:
    nothing need wait for it, and setting it takes a permission on ``jobs/finalizers`` where the
    OwnerReferencesPermissionEnforcement admission plugin runs.)"""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": job["metadata"]["name"],
        "uid": job["metadata"]["uid"],
        "controller": False,
    }


def _quantities_as_text(manifest: JsonObject) -> None:
    """``cpu: 4`` (a filled ``{{cpu}}``) is a quantity the API takes; the client's models want text."""
    pod_spec = manifest["spec"]["template"].get("spec") or {}
    for kind in ("containers", "initContainers"):
        for container in pod_spec.get(kind) or []:
            for amounts in (container.get("resources") or {}).values():
                if isinstance(amounts, dict):
                    for resource, amount in amounts.items():
                        if isinstance(amount, int | float) and not isinstance(amount, bool):
                            amounts[resource] = str(amount)
