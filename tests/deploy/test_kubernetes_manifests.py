"""deploy/kubernetes: the manifests an operator applies for an agent in a cluster (docs/design.md §15).

Each document loads as the kubernetes client's model of its kind (which refuses unknown fields), the
pieces name each other consistently, the agent's settings file loads as the agent would load it, and the
Role is what the stand-in API server of the runner tests enforces (tests/agent/kube_api.py), so the runner
tests fail when the runner needs a call the Role does not grant.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config

from takeoff_agent.runners.base import RunnerUnavailable
from takeoff_agent.runners.kubernetes import _options
from takeoff_agent.runners.kubernetes.api import KubeApi
from takeoff_agent.settings import AgentSettings
from tests.agent.kube_api import AGENT_ROLE, KubeApiServer, granted

MANIFESTS = Path(__file__).parents[2] / "deploy" / "kubernetes"
MODELS: dict[str, type[Any]] = {
    "Namespace": client.V1Namespace,
    "ServiceAccount": client.V1ServiceAccount,
    "Role": client.V1Role,
    "RoleBinding": client.V1RoleBinding,
    "ConfigMap": client.V1ConfigMap,
    "PersistentVolumeClaim": client.V1PersistentVolumeClaim,
    "Deployment": client.V1Deployment,
}


def load_kustomization() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    documents: dict[str, dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        for document in yaml.safe_load_all((MANIFESTS / resource).read_text()):
            assert document["kind"] not in documents, f"two {document['kind']} documents"
            documents[document["kind"]] = document
    return kustomization, documents


KUSTOMIZATION, DOCUMENTS = load_kustomization()
DEPLOYMENT = DOCUMENTS["Deployment"]
POD = DEPLOYMENT["spec"]["template"]["spec"]
AGENT = POD["containers"][0]
ENV = {variable["name"]: variable for variable in AGENT["env"]}


def test_every_resource_of_the_kustomization_is_listed_and_loads_as_its_kubernetes_model() -> None:
    assert sorted(DOCUMENTS) == sorted(MODELS)
    assert sorted(KUSTOMIZATION["resources"]) == sorted(
        path.name for path in MANIFESTS.glob("*.yaml") if path.name != "kustomization.yaml"
    )
    for kind, document in DOCUMENTS.items():
        MODELS[kind].model_validate(document)  # unknown or misspelt fields are refused
        if kind != "Namespace":
            assert document["metadata"]["namespace"] == KUSTOMIZATION["namespace"], kind


def test_the_agent_runs_as_its_service_account_bound_to_its_role() -> None:
    account = DOCUMENTS["ServiceAccount"]["metadata"]["name"]
    binding = DOCUMENTS["RoleBinding"]
    assert POD["serviceAccountName"] == account
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": DOCUMENTS["Role"]["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "takeoff"}]
    assert DOCUMENTS["Role"] == yaml.safe_load(AGENT_ROLE.read_text())  # the one the stand-in enforces


def test_the_health_probes_reach_the_port_the_agent_listens_on_at_the_pods_address() -> None:
    port = AGENT["ports"][0]["containerPort"]
    assert ENV["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert yaml.safe_load(ENV["TAKEOFF_LISTEN"]["value"]) == [f"$(POD_IP):{port}"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert AGENT[probe]["grpc"] == {"port": port}


def test_the_agent_settings_file_and_its_key_are_mounted_where_the_agent_reads_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mounts = {mount["name"]: mount for mount in AGENT["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in POD["volumes"]}
    config_file = Path(ENV["TAKEOFF_CONFIG_FILE"]["value"])
    config_map = DOCUMENTS["ConfigMap"]
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert Path(mounts["config"]["mountPath"]) == config_file.parent
    key_file = Path(ENV["TAKEOFF_API_KEY_FILE"]["value"])
    assert Path(mounts["agent-key"]["mountPath"]) == key_file.parent
    assert volumes["agent-key"]["secret"]["secretName"] == "takeoff-agent-key"
    assert (
        volumes["state"]["persistentVolumeClaim"]["claimName"]
        == DOCUMENTS["PersistentVolumeClaim"]["metadata"]["name"]
    )

    values = yaml.safe_load(config_map["data"][config_file.name])
    monkeypatch.delenv("TAKEOFF_API_KEY", raising=False)
    settings = AgentSettings.model_validate(values)
    assert Path(mounts["state"]["mountPath"]) in settings.state_path.parents
    options = _options(settings.runners["kubernetes"])
    assert options.kubeconfig == ""  # in-cluster config, with the service account's token
    assert options.namespace == KUSTOMIZATION["namespace"]  # where the Role holds


def test_the_agent_runs_unprivileged_and_one_at_a_time() -> None:
    assert DEPLOYMENT["spec"]["replicas"] == 1
    assert DEPLOYMENT["spec"]["strategy"] == {"type": "Recreate"}  # never two pods with one agent id
    assert POD["securityContext"]["runAsNonRoot"] is True
    assert AGENT["securityContext"]["allowPrivilegeEscalation"] is False
    assert AGENT["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_the_stand_in_api_server_refuses_what_the_role_does_not_grant(tmp_path: Path) -> None:
    assert ("", "pods", "get") not in granted(DOCUMENTS["Role"])  # the runner lists and watches pods
    server = KubeApiServer().start()
    try:
        kubeconfig = server.kubeconfig(tmp_path / "kubeconfig")
        api = KubeApi(config.new_client_from_config(str(kubeconfig)))  # type: ignore[no-untyped-call]
        assert api.list_secrets("takeoff", "app=x")["items"] == []  # granted
        with pytest.raises(client.ApiException) as refused:
            api.core.read_namespaced_pod("p", "takeoff")
        assert refused.value.status == 403
        assert json.loads(refused.value.body or "{}")["reason"] == "Forbidden"
    finally:
        server.close()


SERVICE_CALLS: dict[str, Callable[[KubeApi], object]] = {
    "create": lambda api: api.create_service("takeoff", {"metadata": {"name": "s", "labels": {"app": "x"}}}),
    "patch": lambda api: api.patch_service("takeoff", "s", {"metadata": {"labels": {"app": "y"}}}),
    "list": lambda api: api.list_services("takeoff", "app=y"),
    "delete": lambda api: api.delete_service("takeoff", "s"),
}
"""The runner's calls on the Services of multi-node Jobs, one per verb the Role grants for them."""


def test_the_role_grants_exactly_the_service_verbs_the_runner_uses() -> None:
    granted_verbs = {verb for group, resource, verb in granted(DOCUMENTS["Role"]) if resource == "services"}
    assert granted_verbs == set(SERVICE_CALLS)


@pytest.mark.parametrize("verb", sorted(SERVICE_CALLS))
def test_a_role_missing_a_service_verb_is_refused_that_call(tmp_path: Path, verb: str) -> None:
    server = KubeApiServer().start()
    try:
        api = KubeApi(config.new_client_from_config(str(server.kubeconfig(tmp_path / "kubeconfig"))))  # type: ignore[no-untyped-call]
        for call in SERVICE_CALLS.values():  # the Role as deployed: each call is let through
            call(api)
        server.allowed = server.allowed - {("", "services", verb)}
        with pytest.raises(RunnerUnavailable, match=f'403: .*cannot {verb} resource "services"'):
            SERVICE_CALLS[verb](api)
    finally:
        server.close()
