"""What a queue lets its items and its own config set (docs/design.md §13): secure queues refuse item
overrides of the entrypoint and of dangerous options by name, host paths follow ``allow_host_paths``, no
config sets a reserved environment variable, and secret mounts are checked and merged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from takeoff.v1 import queue_pb2
from takeoff_queue.checks import (
    MAX_SECRET_MOUNTS,
    check_item_secrets,
    check_secret_mounts,
    check_secure_entrypoint,
    merge_secret_mounts,
    secret_name,
)
from takeoff_queue.resource_config import ResourceKind, check_for_resource, item_resource_config
from takeoff_server.errors import InvalidArgument
from takeoff_server.validation import Problems

QUEUE = "projects/p/queues/q"
PROJECT = "projects/p"
LIMIT = 1024 * 1024
POD = "resource_config.spec.template.spec"
CONTAINER = f"{POD}.containers[0]"


def refusal(problems: Problems) -> InvalidArgument | None:
    try:
        problems.raise_if_any()
    except InvalidArgument as error:
        return error
    return None


def enqueue(
    kind: ResourceKind,
    override: dict[str, Any],
    *,
    queue_config: dict[str, Any] | None = None,
    secure: bool = True,
    allow_host_paths: bool = False,
    declared: dict[str, dict[str, Any]] | None = None,
    values: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], InvalidArgument | None]:
    """The filled config and the refusal of an Enqueue with ``override`` on a queue of ``kind``."""
    problems = Problems()
    merged, _ = item_resource_config(
        kind,
        queue_config=queue_config or {},
        variable_schemas=declared or {},
        override=override,
        template_variables=values or {},
        secure=secure,
        allow_host_paths=allow_host_paths,
        queue=QUEUE,
        max_json_bytes=LIMIT,
        problems=problems,
    )
    return merged, refusal(problems)


def fields(error: InvalidArgument | None) -> list[str]:
    assert error is not None, "expected a refusal"
    return sorted(violation.field for violation in error.violations)


def pod(spec: dict[str, Any]) -> dict[str, Any]:
    return {"spec": {"template": {"spec": spec}}}


def container(**fields: Any) -> dict[str, Any]:
    return pod({"containers": [{"name": "main", **fields}]})


# Secure queues: what an item may not override.


@pytest.mark.parametrize(
    ("override", "refused"),
    [
        ({"privileged": True}, ["resource_config.privileged"]),
        ({"network_mode": "host"}, ["resource_config.network_mode"]),
        ({"network_mode": "bridge"}, ["resource_config.network_mode"]),  # any network: the queue's to say
        ({"pid_mode": "host"}, ["resource_config.pid_mode"]),
        ({"ipc_mode": "host"}, ["resource_config.ipc_mode"]),
        ({"cap_add": ["SYS_ADMIN"]}, ["resource_config.cap_add"]),
        ({"devices": ["/dev/sda:/dev/sda"]}, ["resource_config.devices"]),
        ({"security_opt": ["seccomp=unconfined"]}, ["resource_config.security_opt"]),
        ({"userns_mode": "host"}, ["resource_config.userns_mode"]),
        ({"user": "root"}, ["resource_config.user"]),
        ({"user": 0}, ["resource_config.user"]),
        ({"user": "1000"}, ["resource_config.user"]),  # a name or id may be root in the image
        ({"volumes": {"data": {"bind": "/data"}}}, ["resource_config.volumes.data"]),
        (
            {"volumes": ["data:/data", "cache:/cache:ro"]},
            ["resource_config.volumes[0]", "resource_config.volumes[1]"],
        ),
        ({"env": {"A": "1", "B": "2"}}, ["resource_config.env.A", "resource_config.env.B"]),
        (
            {"privileged": True, "cap_add": ["NET_ADMIN"], "cpus": 2},
            ["resource_config.cap_add", "resource_config.privileged"],
        ),
    ],
)
def test_a_secure_local_container_queue_refuses_each_dangerous_option_by_name(
    override: dict[str, Any], refused: list[str]
) -> None:
    _, error = enqueue(ResourceKind.LOCAL_CONTAINER, override)

    assert error is not None
    assert error.reason == "SECURE_QUEUE_OVERRIDE"
    assert fields(error) == refused  # one violation each, not named again as "not an option"
    assert all(QUEUE in v.description and "secure" in v.description for v in error.violations)


@pytest.mark.parametrize(
    "override",
    [
        {"cpus": 2, "mem_limit": "4g", "memswap_limit": -1, "shm_size": "1g"},
        {"gpus": 1},
        {"ulimits": [{"name": "nofile", "soft": 1024, "hard": 4096}]},
        {"ipc_mode": "private"},
        {"ipc_mode": "shareable"},
        {"nodes": 2},
        {},
    ],
)
def test_a_secure_local_container_queue_takes_harmless_options(override: dict[str, Any]) -> None:
    merged, error = enqueue(ResourceKind.LOCAL_CONTAINER, override, queue_config={"cpus": 1})

    assert error is None
    assert merged == {"cpus": 1, **override}


def test_the_queues_own_config_may_set_what_its_items_may_not() -> None:
    own = {"user": "0", "ipc_mode": "host", "env": {"A": "1"}, "volumes": {"data": {"bind": "/data"}}}
    assert check_for_resource(ResourceKind.LOCAL_CONTAINER, own, "queue.resource_config", unfilled=True) == []

    merged, error = enqueue(ResourceKind.LOCAL_CONTAINER, {"cpus": 2}, queue_config=own)

    assert error is None
    assert merged == {**own, "cpus": 2}


def test_options_no_runner_takes_stay_refused_on_every_queue() -> None:
    for secure in (False, True):
        _, error = enqueue(ResourceKind.LOCAL_CONTAINER, {}, queue_config={"privileged": True}, secure=secure)
        assert error is not None
        assert error.reason == "RESOURCE_CONFIG_INVALID"
        assert fields(error) == ["resource_config.privileged"]
    _, error = enqueue(ResourceKind.LOCAL_CONTAINER, {"privileged": True}, secure=False)
    assert error is not None
    assert error.reason == "RESOURCE_CONFIG_INVALID"


def test_a_value_the_queue_declared_fills_its_own_config_on_a_secure_queue() -> None:
    """Template variables are the knobs a secure queue's owner gives its items: their schemas bound them."""
    declared = {"user": {"type": "string", "enum": ["1000", "1001"]}}

    merged, error = enqueue(
        ResourceKind.LOCAL_CONTAINER,
        {},
        queue_config={"user": "{{user}}"},
        declared=declared,
        values={"user": "1001"},
    )
    assert error is None
    assert merged == {"user": "1001"}

    # ... but a variable in the item's own override is the item's setting.
    _, error = enqueue(
        ResourceKind.LOCAL_CONTAINER, {"user": "{{user}}"}, declared=declared, values={"user": "1001"}
    )
    assert fields(error) == ["resource_config.user"]


def test_a_placeholder_key_filled_into_a_dangerous_option_is_refused() -> None:
    declared = {"k": {"type": "string"}}

    _, error = enqueue(
        ResourceKind.KUBERNETES, pod({"{{k}}": True}), declared=declared, values={"k": "hostPID"}
    )

    assert error is not None
    assert error.reason == "SECURE_QUEUE_OVERRIDE"
    assert fields(error) == [f"{POD}.hostPID"]


def test_a_secure_local_process_queue_refuses_item_env() -> None:
    _, error = enqueue(ResourceKind.LOCAL_PROCESS, {"env": {"BASH_ENV": "/tmp/x", "SEED": "1"}})
    assert error is not None
    assert error.reason == "SECURE_QUEUE_OVERRIDE"
    assert fields(error) == ["resource_config.env.BASH_ENV", "resource_config.env.SEED"]

    merged, error = enqueue(
        ResourceKind.LOCAL_PROCESS,
        {},
        queue_config={"env": {"SEED": "{{seed}}"}},
        declared={"seed": {"type": "integer"}},
        values={"seed": 7},
    )
    assert error is None
    assert merged == {"env": {"SEED": 7}}

    merged, error = enqueue(ResourceKind.LOCAL_PROCESS, {"env": {"SEED": "1"}}, secure=False)
    assert error is None
    assert merged == {"env": {"SEED": "1"}}


@pytest.mark.parametrize(
    ("override", "refused"),
    [
        (pod({"hostNetwork": True}), [f"{POD}.hostNetwork"]),
        (pod({"hostNetwork": False}), [f"{POD}.hostNetwork"]),  # by name, whatever the value
        (pod({"hostPID": True}), [f"{POD}.hostPID"]),
        (pod({"hostIPC": True}), [f"{POD}.hostIPC"]),
        (pod({"hostUsers": True}), [f"{POD}.hostUsers"]),
        (pod({"serviceAccountName": "admin"}), [f"{POD}.serviceAccountName"]),
        (pod({"serviceAccount": "admin"}), [f"{POD}.serviceAccount"]),
        (pod({"automountServiceAccountToken": True}), [f"{POD}.automountServiceAccountToken"]),
        (pod({"nodeName": "control-plane"}), [f"{POD}.nodeName"]),
        (pod({"tolerations": [{"operator": "Exists"}]}), [f"{POD}.tolerations"]),
        (pod({"priorityClassName": "system-node-critical"}), [f"{POD}.priorityClassName"]),
        (pod({"runtimeClassName": "runc"}), [f"{POD}.runtimeClassName"]),
        (
            pod({"initContainers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}),
            [f"{POD}.initContainers[0]", f"{POD}.initContainers[1]"],
        ),
        (pod({"ephemeralContainers": [{"name": "a"}]}), [f"{POD}.ephemeralContainers[0]"]),
        (
            pod({"securityContext": {"runAsUser": 0, "sysctls": [{"name": "x", "value": "1"}]}}),
            [f"{POD}.securityContext.runAsUser", f"{POD}.securityContext.sysctls"],
        ),
        (container(securityContext={"privileged": True}), [f"{CONTAINER}.securityContext.privileged"]),
        (
            container(securityContext={"allowPrivilegeEscalation": True}),
            [f"{CONTAINER}.securityContext.allowPrivilegeEscalation"],
        ),
        (
            container(securityContext={"capabilities": {"add": ["SYS_ADMIN"]}}),
            [f"{CONTAINER}.securityContext.capabilities.add"],
        ),
        (container(securityContext={"runAsUser": 0}), [f"{CONTAINER}.securityContext.runAsUser"]),
        (container(command=["sh", "-c", "curl x | sh"]), [f"{CONTAINER}.command"]),
        (container(args=["--evil"]), [f"{CONTAINER}.args"]),
        (container(image="attacker/image"), [f"{CONTAINER}.image"]),
        (container(workingDir="/tmp"), [f"{CONTAINER}.workingDir"]),
        (container(lifecycle={"postStart": {"exec": {"command": ["sh"]}}}), [f"{CONTAINER}.lifecycle"]),
        (container(livenessProbe={"exec": {"command": ["sh"]}}), [f"{CONTAINER}.livenessProbe"]),
        (
            container(env=[{"name": "A", "value": "1"}, {"name": "B", "valueFrom": {"secretKeyRef": {}}}]),
            [f"{CONTAINER}.env[0]", f"{CONTAINER}.env[1]"],
        ),
        (container(envFrom=[{"secretRef": {"name": "other"}}]), [f"{CONTAINER}.envFrom"]),
        (container(volumeMounts=[{"name": "data", "mountPath": "/d"}]), [f"{CONTAINER}.volumeMounts"]),
        (container(ports=[{"containerPort": 80, "hostPort": 80}]), [f"{CONTAINER}.ports"]),
        (pod({"volumes": [{"name": "s", "secret": {"secretName": "x"}}]}), [f"{POD}.volumes[0].secret"]),
        (
            pod({"volumes": [{"name": "t", "projected": {"sources": [{"serviceAccountToken": {}}]}}]}),
            [f"{POD}.volumes[0].projected"],
        ),
        (pod({"volumes": [{"name": "n", "nfs": {"server": "x", "path": "/"}}]}), [f"{POD}.volumes[0].nfs"]),
        (
            {"spec": {"template": {"metadata": {"labels": {"app": "db"}}}}},
            ["resource_config.spec.template.metadata.labels.app"],
        ),
        ({"spec": {"backoffLimit": 3}}, ["resource_config.spec.backoffLimit"]),
        ({"metadata": {"namespace": "kube-system"}}, ["resource_config.metadata.namespace"]),
    ],
)
def test_a_secure_kubernetes_queue_refuses_each_dangerous_field_by_its_path(
    override: dict[str, Any], refused: list[str]
) -> None:
    _, error = enqueue(ResourceKind.KUBERNETES, override)

    assert error is not None
    assert error.reason == "SECURE_QUEUE_OVERRIDE"
    assert fields(error) == refused
    assert all(QUEUE in v.description for v in error.violations)


KUBERNETES_QUEUE: dict[str, Any] = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "spec": {
        "template": {
            "spec": {
                "serviceAccountName": "jobs",
                "securityContext": {"runAsNonRoot": True, "runAsUser": 1000},
                "containers": [{"name": "main", "securityContext": {"allowPrivilegeEscalation": False}}],
                "volumes": [{"name": "data", "hostPath": {"path": "/data"}}],
                "tolerations": [{"key": "gpu"}],
            }
        }
    },
}


@pytest.mark.parametrize(
    "override",
    [
        container(resources={"limits": {"cpu": "4", "nvidia.com/gpu": 1}}, imagePullPolicy="Always"),
        pod({"nodeSelector": {"gpu": "a100"}, "affinity": {"nodeAffinity": {}}}),
        pod({"topologySpreadConstraints": [{"maxSkew": 1}]}),
        pod(
            {
                "volumes": [
                    {"name": "scratch", "emptyDir": {}},
                    {"name": "ds", "persistentVolumeClaim": {"claimName": "d"}},
                ]
            }
        ),
        {
            "metadata": {"labels": {"team": "ml"}, "annotations": {"note": "x"}},
            "spec": {"ttlSecondsAfterFinished": 60},
        },
        {"apiVersion": "batch/v1", "kind": "Job"},
    ],
)
def test_a_secure_kubernetes_queue_takes_harmless_fields_over_its_own(override: dict[str, Any]) -> None:
    merged, error = enqueue(
        ResourceKind.KUBERNETES, override, queue_config=KUBERNETES_QUEUE, allow_host_paths=True
    )

    assert error is None
    spec = merged["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "jobs"  # the queue's own settings stay
    assert spec["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000}
    assert spec["containers"][0]["securityContext"] == {"allowPrivilegeEscalation": False}


def test_a_queue_that_is_not_secure_takes_the_same_overrides() -> None:
    override = pod({"hostNetwork": True, "containers": [{"name": "main", "command": ["sh"], "image": "x"}]})

    merged, error = enqueue(ResourceKind.KUBERNETES, override, secure=False)

    assert error is None
    assert merged == override


def test_a_secure_queue_refuses_an_entrypoint_override() -> None:
    for secure, entrypoint, refused in (
        (True, ["python", "evil.py"], ["entrypoint"]),
        (True, [], []),
        (False, ["python", "other.py"], []),
    ):
        problems = Problems()
        check_secure_entrypoint(entrypoint, secure=secure, queue=QUEUE, problems=problems)
        error = refusal(problems)
        assert (fields(error) if refused else error) == (refused or None)
        if error is not None:
            assert error.reason == "SECURE_QUEUE_OVERRIDE"
            assert QUEUE in error.message
            assert "secure" in error.message


# Host paths.


@pytest.mark.parametrize(
    ("kind", "config", "field"),
    [
        (ResourceKind.LOCAL_CONTAINER, {"volumes": ["/srv:/data"]}, "volumes[0]"),
        (
            ResourceKind.LOCAL_CONTAINER,
            {"volumes": {"/var/run/docker.sock": {"bind": "/s"}}},
            "volumes./var/run/docker.sock",
        ),
        (
            ResourceKind.KUBERNETES,
            pod({"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}),
            "spec.template.spec.volumes[0].hostPath",
        ),
    ],
)
def test_host_paths_need_the_queue_to_allow_them(
    kind: ResourceKind, config: dict[str, Any], field: str
) -> None:
    refused = check_for_resource(kind, config, "queue.resource_config", unfilled=True)
    assert [v.field for v in refused] == [f"queue.resource_config.{field}"]
    assert "allow_host_paths" in refused[0].description
    assert (
        check_for_resource(kind, config, "queue.resource_config", unfilled=True, allow_host_paths=True) == []
    )

    # An item's override: refused unless allowed; allowed on a queue that is not secure; never on a
    # secure one.
    _, error = enqueue(kind, config, secure=False)
    assert error is not None
    assert error.reason == "RESOURCE_CONFIG_INVALID"
    assert fields(error) == [f"resource_config.{field}"]
    merged, error = enqueue(kind, config, secure=False, allow_host_paths=True)
    assert error is None
    assert merged == config
    _, error = enqueue(kind, config, secure=True, allow_host_paths=True)
    assert error is not None
    assert error.reason == "SECURE_QUEUE_OVERRIDE"
    assert fields(error) == [f"resource_config.{field}"]
    _, error = enqueue(kind, config, secure=True)  # refused once, as on any queue that does not allow them
    assert error is not None
    assert error.reason == "RESOURCE_CONFIG_INVALID"
    assert fields(error) == [f"resource_config.{field}"]


@pytest.mark.parametrize("source", ["./data", "~/x", "../up", "data/sub"])
def test_an_allowed_host_path_must_be_absolute(source: str) -> None:
    refused = check_for_resource(
        ResourceKind.LOCAL_CONTAINER,
        {"volumes": [f"{source}:/d"]},
        "queue.resource_config",
        allow_host_paths=True,
    )

    assert [v.field for v in refused] == ["queue.resource_config.volumes[0]"]
    assert "absolute" in refused[0].description


def test_an_allowed_host_path_from_a_variable_is_checked_once_filled() -> None:
    default = {"volumes": ["{{source}}:/data"]}
    declared = {"source": {"type": "string"}}
    for source, refused in (("/srv", False), ("relative", False), ("./x", True)):
        _, error = enqueue(
            ResourceKind.LOCAL_CONTAINER,
            {},
            queue_config=default,
            declared=declared,
            values={"source": source},
            allow_host_paths=True,
        )
        assert (fields(error) if refused else error) == (["resource_config.volumes[0]"] if refused else None)


# Reserved environment variables.

RESERVED = ["TAKEOFF_TOKEN", "TAKEOFF_RUN_ID", "TAKEOFF_ANYTHING", "LD_PRELOAD", "PYTHONPATH"]


@pytest.mark.parametrize("name", RESERVED)
@pytest.mark.parametrize("kind", [ResourceKind.LOCAL_PROCESS, ResourceKind.LOCAL_CONTAINER])
def test_no_config_sets_a_reserved_variable(kind: ResourceKind, name: str) -> None:
    config = {"env": {"OK": "1", name: "x"}}

    refused = check_for_resource(kind, config, "queue.resource_config", unfilled=True)
    assert [v.field for v in refused] == [f"queue.resource_config.env.{name}"]
    assert name in refused[0].description

    _, error = enqueue(kind, config, secure=False)
    assert error is not None
    assert error.reason == "RESOURCE_CONFIG_INVALID"
    assert fields(error) == [f"resource_config.env.{name}"]


@pytest.mark.parametrize("name", RESERVED)
def test_no_kubernetes_container_sets_a_reserved_variable(name: str) -> None:
    config = pod(
        {
            "containers": [
                {"name": "main", "env": [{"name": "OK", "value": "1"}, {"name": name, "value": "x"}]}
            ],
            "initContainers": [{"name": "init", "image": "i", "env": [{"name": name, "value": "x"}]}],
        }
    )

    refused = check_for_resource(ResourceKind.KUBERNETES, config, "queue.resource_config", unfilled=True)

    assert sorted(v.field for v in refused) == [
        "queue.resource_config.spec.template.spec.containers[0].env[1].name",
        "queue.resource_config.spec.template.spec.initContainers[0].env[0].name",
    ]


def test_an_item_env_entry_is_named_where_it_lands_in_the_merged_container() -> None:
    queue_config = pod({"containers": [{"name": "main", "env": [{"name": "A", "value": "1"}]}]})
    override = pod({"containers": [{"name": "main", "env": [{"name": "LD_PRELOAD", "value": "/x.so"}]}]})

    _, error = enqueue(ResourceKind.KUBERNETES, override, queue_config=queue_config, secure=False)

    assert error is not None
    assert error.reason == "RESOURCE_CONFIG_INVALID"
    assert fields(error) == [f"{CONTAINER}.env[1].name"]


@pytest.mark.parametrize(
    "name", ["TAKEOFF", "MY_TAKEOFF_X", "LD_LIBRARY_PATH", "PYTHONUNBUFFERED", "takeoff_x"]
)
def test_names_near_the_reserved_ones_are_allowed(name: str) -> None:
    for kind in (ResourceKind.LOCAL_PROCESS, ResourceKind.LOCAL_CONTAINER):
        assert check_for_resource(kind, {"env": {name: "1"}}, "queue.resource_config") == []


# Secret mounts.


@dataclass(frozen=True)
class Mount:
    secret: str
    env: str = ""
    file: str = ""


def mount_problems(mounts: list[Any], field: str = "secrets") -> tuple[list[str], InvalidArgument | None]:
    problems = Problems()
    names = check_secret_mounts(mounts, project=PROJECT, field=field, problems=problems)
    return names, refusal(problems)


def test_secret_mounts_resolve_short_ids_in_the_queues_project() -> None:
    mounts = [
        queue_pb2.SecretMount(secret="HF_TOKEN", env="HF_TOKEN"),  # the proto message is taken as it is
        Mount("projects/p/secrets/db-password", file="db.txt"),
        Mount("wandb_key", env="_W"),
        Mount("k", file="a" * 255),
        Mount("k", file=".hidden-file_1.json"),
    ]

    names, error = mount_problems(mounts, field="queue.secrets")

    assert error is None
    assert names == [
        "projects/p/secrets/HF_TOKEN",
        "projects/p/secrets/db-password",
        "projects/p/secrets/wandb_key",
        "projects/p/secrets/k",
        "projects/p/secrets/k",
    ]


@pytest.mark.parametrize(
    ("mount", "reason", "field"),
    [
        (Mount("", env="A"), "NAME_INVALID", "secrets[0].secret"),
        (Mount("9lives", env="A"), "NAME_INVALID", "secrets[0].secret"),
        (Mount("projects/p/secrets/", env="A"), "NAME_INVALID", "secrets[0].secret"),
        (Mount("projects/p/jobs/x", env="A"), "NAME_INVALID", "secrets[0].secret"),
        (Mount("a" * 64, env="A"), "NAME_INVALID", "secrets[0].secret"),
        (Mount("projects/other/secrets/s", env="A"), "ARGUMENT_INVALID", "secrets[0].secret"),
        (Mount("s"), "ARGUMENT_INVALID", "secrets[0]"),
        (Mount("s", env="A", file="a"), "ARGUMENT_INVALID", "secrets[0]"),
        (Mount("s", env="1A"), "ARGUMENT_INVALID", "secrets[0].env"),
        (Mount("s", env="A-B"), "ARGUMENT_INVALID", "secrets[0].env"),
        (Mount("s", env="A" * 129), "ARGUMENT_INVALID", "secrets[0].env"),
        (Mount("s", env="TAKEOFF_TOKEN"), "ARGUMENT_INVALID", "secrets[0].env"),
        (Mount("s", env="LD_PRELOAD"), "ARGUMENT_INVALID", "secrets[0].env"),
        (Mount("s", env="PYTHONPATH"), "ARGUMENT_INVALID", "secrets[0].env"),
        (Mount("s", file="."), "ARGUMENT_INVALID", "secrets[0].file"),
        (Mount("s", file=".."), "ARGUMENT_INVALID", "secrets[0].file"),
        (Mount("s", file="a..b"), "ARGUMENT_INVALID", "secrets[0].file"),
        (Mount("s", file="a/b"), "ARGUMENT_INVALID", "secrets[0].file"),
        (Mount("s", file="/etc/passwd"), "ARGUMENT_INVALID", "secrets[0].file"),
        (Mount("s", file="a b"), "ARGUMENT_INVALID", "secrets[0].file"),
        (Mount("s", file="a" * 256), "ARGUMENT_INVALID", "secrets[0].file"),
    ],
)
def test_a_bad_secret_mount_is_named(mount: Mount, reason: str, field: str) -> None:
    names, error = mount_problems([mount])

    assert error is not None
    assert error.reason == reason
    assert fields(error) == [field]
    if field.endswith(".secret"):
        assert names == [""]


def test_two_mounts_may_not_give_the_same_variable_or_file() -> None:
    _, error = mount_problems(
        [Mount("a", env="X"), Mount("b", file="f"), Mount("c", env="X"), Mount("d", file="f")]
    )

    assert fields(error) == ["secrets[2].env", "secrets[3].file"]
    assert error is not None
    assert "secrets[0]" in error.violations[0].description


def test_at_most_32_mounts() -> None:
    mounts = [Mount("s", env=f"V{i}") for i in range(MAX_SECRET_MOUNTS)]
    assert mount_problems(mounts)[1] is None

    names, error = mount_problems([*mounts, Mount("s", env="MORE")])
    assert fields(error) == ["secrets"]
    assert names == [""] * (MAX_SECRET_MOUNTS + 1)


def test_a_secure_queues_items_may_not_replace_its_mounts_nor_load_code_through_one() -> None:
    queue_mounts = [
        Mount("projects/p/secrets/db", env="DB_PASSWORD"),
        Mount("projects/p/secrets/c", file="ca.pem"),
    ]
    item_mounts = [
        Mount("mine", env="DB_PASSWORD"),
        Mount("mine", file="ca.pem"),
        Mount("mine", env="BASH_ENV"),
        Mount("mine", env="LD_AUDIT"),
        Mount("mine", env="NODE_OPTIONS"),
        Mount("mine", env="HF_TOKEN"),
    ]

    for secure in (True, False):
        problems = Problems()
        names = check_item_secrets(
            item_mounts,
            project=PROJECT,
            queue_mounts=queue_mounts,
            secure=secure,
            queue=QUEUE,
            problems=problems,
        )
        error = refusal(problems)
        assert names == ["projects/p/secrets/mine"] * len(item_mounts)
        if not secure:
            assert error is None
            continue
        assert error is not None
        assert error.reason == "SECURE_QUEUE_OVERRIDE"
        assert fields(error) == [
            "secrets[0].env",
            "secrets[1].file",
            "secrets[2].env",
            "secrets[3].env",
            "secrets[4].env",
        ]
        assert all(QUEUE in v.description for v in error.violations)


def test_an_items_mount_replaces_the_queues_mount_of_the_same_variable_or_file() -> None:
    queue_mounts = [
        Mount("projects/p/secrets/a", env="A"),
        Mount("projects/p/secrets/b", file="b.txt"),
        Mount("projects/p/secrets/c", env="C"),
    ]
    item_mounts = [
        Mount("projects/p/secrets/x", env="C"),
        Mount("projects/p/secrets/y", file="b.txt"),
        Mount("projects/p/secrets/z", env="Z"),
    ]

    merged = merge_secret_mounts(queue_mounts, item_mounts)

    assert merged == [queue_mounts[0], *item_mounts]
    assert merge_secret_mounts(queue_mounts, []) == queue_mounts
    assert merge_secret_mounts([], item_mounts) == item_mounts


def test_secret_names() -> None:
    assert secret_name("tok", "projects/p") == "projects/p/secrets/tok"
    assert secret_name("projects/q/secrets/tok", "projects/p") == "projects/q/secrets/tok"
    with pytest.raises(ValueError, match="not a secret name"):
        secret_name("not a name", "projects/p")


def test_a_secure_slurm_queue_keeps_whose_allocation_and_where_but_takes_the_job_s_size() -> None:
    override = {
        "account": "other-lab",
        "qos": "high",
        "partition": "gpu",
        "sbatch": {"exclusive": True},
        "env": {"A": "1"},
        "nodes": 2,
        "ntasks_per_node": 4,
        "time": "01:00:00",
    }
    _, error = enqueue(ResourceKind.SLURM, override)

    assert fields(error) == [
        "resource_config.account",
        "resource_config.env.A",
        "resource_config.partition",
        "resource_config.qos",
        "resource_config.sbatch",
    ]
    sized, fine = enqueue(ResourceKind.SLURM, {"nodes": 2, "ntasks_per_node": 4, "time": 60})
    assert fine is None
    assert sized == {"nodes": 2, "ntasks_per_node": 4, "time": 60}


def test_a_secure_ray_queue_refuses_an_items_environment_only() -> None:
    _, error = enqueue(ResourceKind.RAY, {"env": {"A": "1"}, "entrypoint_num_cpus": 2})

    assert fields(error) == ["resource_config.env.A"]
