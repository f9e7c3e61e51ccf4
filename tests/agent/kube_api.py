"""A stand-in Kubernetes API server for the kubernetes runner's tests: no cluster can be had here.

It answers the calls the runner makes, over HTTP on loopback, with bodies shaped like a real API
server's (the Kubernetes API reference: batch/v1 Job, core/v1 Pod, Secret and Service, metav1 Status,
WatchEvent):
- Jobs, Secrets and Services: create (409 AlreadyExists), read (404 NotFound), list, merge patch, delete
  (foreground propagation deletes the Job's pods first, then the Job; Secrets and Services owned by a
  deleted Job go with it);
- Jobs and pods: list (with its resourceVersion), watch (``?watch=true&resourceVersion=N``: chunked JSON
  lines of ``{"type", "object"}`` after N; an N older than the server keeps: an ERROR event with a 410
  Expired Status);
- a pod's log (``follow=true``: chunked, until the container ends).

Nothing runs: the test plays job controller, scheduler and kubelet through the control methods (a Job's
pods are made Pending when the Job is created, one per index for an Indexed Job, named
``{job}-{index}-{suffix}`` with the completion-index annotation and label; ``run``, ``terminate``,
``evict``, ... move a pod on: the newest, or the one of ``rank``), and can drop open watches and log
streams, or expire old resourceVersions, to see the runner resume. Like the real job controller, it fails a
Job when one pod fails (``backoffLimit`` 0) and then stops the Job's other pods.

Like a cluster with RBAC on, it lets the agent do only what the Role in deploy/kubernetes/role.yaml grants
(anything else is 403 Forbidden), so every runner test also checks that the manifests an operator applies
allow the calls the runner makes.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

JsonObject = dict[str, Any]
TOKEN = "stand-in-token"
FIRST_RESOURCE_VERSION = 1000
MERGE_PATCHES = ("application/merge-patch+json", "application/strategic-merge-patch+json")
KINDS = {
    "jobs": ("batch/v1", "Job", "batch"),
    "pods": ("v1", "Pod", ""),
    "secrets": ("v1", "Secret", ""),
    "services": ("v1", "Service", ""),
}
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
AGENT_ROLE = Path(__file__).parents[2] / "deploy" / "kubernetes" / "role.yaml"


def granted(role: JsonObject) -> frozenset[tuple[str, str, str]]:
    """(API group, resource or resource/subresource, verb) triples a Role's rules allow."""
    return frozenset(
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    )


def verb_of(method: str, name: str, query: dict[str, str]) -> str:
    """The RBAC verb of a request, as the API server's authorizer names it."""
    if method == "GET":
        if name:
            return "get"
        return "watch" if query.get("watch") in ("true", "1") else "list"
    return {"POST": "create", "PATCH": "patch", "DELETE": "delete" if name else "deletecollection"}[method]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status(code: int, reason: str, message: str, **details: Any) -> JsonObject:
    """A metav1 Status, as the API server answers a failed call (and an ERROR watch event carries)."""
    body: JsonObject = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def _selected(obj: JsonObject, selector: str) -> bool:
    """Equality-based label selectors (``a=b,c=d``), all the runner uses."""
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class ApiFailure(Exception):
    def __init__(self, body: JsonObject) -> None:
        super().__init__(body["message"])
        self.body = body


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    content_type: str


@dataclass
class Watch:
    """One watch request: from which resourceVersion, the last it sent, and how it ended."""

    resource: str
    selector: str
    since: int
    last_sent: int
    ended: str = ""


@dataclass
class _Event:
    resource_version: int
    resource: str
    type: str
    object: JsonObject


class KubeApiServer:
    def __init__(self) -> None:
        self._state = threading.Condition()
        self._objects: dict[tuple[str, str, str], JsonObject] = {}
        self._events: list[_Event] = []
        self._resource_version = FIRST_RESOURCE_VERSION
        self._oldest_watchable = FIRST_RESOURCE_VERSION
        self._logs: dict[str, bytearray] = {}
        self._watch_drops = 0
        self._bookmarks = 0
        self._log_drops = 0
        self._closed = False
        self.requests: list[Request] = []
        self.watches: list[Watch] = []
        self.allowed = granted(yaml.safe_load(AGENT_ROLE.read_text()))
        """What the agent's Role lets it do; anything else is refused 403."""
        self.answer_creates = threading.Event()
        """Cleared: a Job is created, but the answer to its create waits until it is set again."""
        self.answer_creates.set()
        server = self

        class Handler(_Handler):
            api = server

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    def start(self) -> KubeApiServer:
        self._thread.start()
        return self

    def close(self) -> None:
        with self._state:
            self._closed = True
            self._state.notify_all()
        self._http.shutdown()
        self._http.server_close()

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig file (JSON is YAML) that points a client at this server."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "agent", "user": {"token": TOKEN}}],
            "contexts": [
                {
                    "name": "stand-in",
                    "context": {"cluster": "stand-in", "user": "agent", "namespace": namespace},
                }
            ],
            "current-context": "stand-in",
        }
        path.write_text(json.dumps(config))
        return path

    # -- what the test reads ---------------------------------------------------------------------------

    def get(self, resource: str, name: str, namespace: str = "default") -> JsonObject | None:
        with self._state:
            found = self._objects.get((resource, namespace, name))
            return copy.deepcopy(found)

    def names(self, resource: str) -> list[str]:
        with self._state:
            return sorted(name for kind, _, name in self._objects if kind == resource)

    def calls(self, method: str, path_part: str = "") -> list[Request]:
        with self._state:
            return [r for r in self.requests if r.method == method and path_part in r.path]

    def wait_until(self, condition: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
        """Wait for ``condition`` (re-checked whenever the server's state changes)."""
        deadline = time.monotonic() + timeout
        with self._state:
            while not (result := condition()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}")
                self._state.wait(min(left, 0.1))
            return result

    # -- the job controller, the scheduler and the kubelet, played by the test ---------------------------

    def pod_of(self, job: str, namespace: str = "default", *, rank: int | None = None) -> JsonObject:
        with self._state:
            return copy.deepcopy(self._pod(job, namespace, rank))

    def _pods(self, job: str, namespace: str) -> list[JsonObject]:
        return [
            o
            for (kind, ns, _), o in self._objects.items()
            if kind == "pods" and ns == namespace and o["metadata"]["labels"].get("job-name") == job
        ]

    def _pod(self, job: str, namespace: str, rank: int | None = None) -> JsonObject:
        """The Job's newest pod, or the newest of completion index ``rank``."""
        pods = [
            pod
            for pod in self._pods(job, namespace)
            if rank is None or (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX) == str(rank)
        ]
        if not pods:
            raise KeyError(f"no pod of Job {job}" + ("" if rank is None else f" with index {rank}"))
        return max(pods, key=lambda pod: pod["metadata"]["creationTimestamp"])

    def _change_pod(
        self,
        job: str,
        change: Callable[[JsonObject], None],
        rank: int | None = None,
        namespace: str = "default",
    ) -> None:
        with self._state:
            pod = copy.deepcopy(self._pod(job, namespace, rank))
            change(pod)
            self._put("pods", pod, "MODIFIED")

    def _container_status(self, pod: JsonObject, state: JsonObject, *, ready: bool = False) -> None:
        pod["status"]["containerStatuses"] = [
            {
                "name": container["name"],
                "image": container.get("image", ""),
                "imageID": "",
                "ready": ready,
                "restartCount": 0,
                "started": "running" in state,
                "state": state,
                "lastState": {},
            }
            for container in pod["spec"]["containers"]
        ]

    def unschedulable(self, job: str, message: str, *, rank: int | None = None) -> None:
        def change(pod: JsonObject) -> None:
            pod["status"]["conditions"] = [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "lastProbeTime": None,
                    "lastTransitionTime": _now(),
                    "reason": "Unschedulable",
                    "message": message,
                }
            ]

        self._change_pod(job, change, rank)

    def waiting(self, job: str, reason: str, message: str) -> None:
        """The pod is scheduled; its containers wait (ContainerCreating, ErrImagePull, ImagePullBackOff)."""

        def change(pod: JsonObject) -> None:
            pod["spec"]["nodeName"] = "node-1"
            pod["status"]["conditions"] = [
                {
                    "type": "PodScheduled",
                    "status": "True",
                    "lastProbeTime": None,
                    "lastTransitionTime": _now(),
                }
            ]
            self._container_status(pod, {"waiting": {"reason": reason, "message": message}})

        self._change_pod(job, change)

    def run(self, job: str, *, rank: int | None = None) -> None:
        def change(pod: JsonObject) -> None:
            pod["spec"]["nodeName"] = "node-1"
            pod["status"].update(
                phase="Running",
                hostIP="10.0.0.1",
                podIP="10.1.0.7",
                startTime=_now(),
                conditions=[
                    {"type": kind, "status": "True", "lastProbeTime": None, "lastTransitionTime": _now()}
                    for kind in (
                        "PodReadyToStartContainers",
                        "Initialized",
                        "Ready",
                        "ContainersReady",
                        "PodScheduled",
                    )
                ],
            )
            self._container_status(pod, {"running": {"startedAt": _now()}}, ready=True)

        self._change_pod(job, change, rank)
        with self._state:
            running = [p for p in self._pods(job, "default") if p["status"].get("phase") == "Running"]
            self._job_status(job, ready=len(running))

    def print(self, job: str, text: str, *, rank: int | None = None) -> None:
        """The job's container writes ``text`` (stdout and stderr share the pod's log)."""
        with self._state:
            self._logs.setdefault(self._pod(job, "default", rank)["metadata"]["name"], bytearray()).extend(
                text.encode()
            )
            self._state.notify_all()

    def terminate(self, job: str, exit_code: int, reason: str = "", *, rank: int | None = None) -> None:
        """The job's container ends with ``exit_code`` (``reason``: OOMKilled, else Completed or Error); the
        job controller marks the Job Complete once every pod has succeeded, or Failed at the first pod that
        fails (backoffLimit 0), and then stops the Job's other pods."""
        self._end_container(job, exit_code, reason or ("Completed" if exit_code == 0 else "Error"), rank)
        with self._state:
            stored = self._objects[("jobs", "default", job)]
            if exit_code != 0:
                self._finish_job(
                    job,
                    "Failed",
                    "BackoffLimitExceeded",
                    "Job has reached the specified backoff limit",
                    failed=1,
                )
                others = [
                    pod
                    for pod in self._pods(job, "default")
                    if pod["status"].get("phase") not in ("Succeeded", "Failed")
                ]
            else:
                succeeded = stored["status"].get("succeeded", 0) + 1
                if succeeded < stored["spec"]["completions"]:
                    self._job_status(job, succeeded=succeeded, active=stored["status"].get("active", 1) - 1)
                else:
                    self._finish_job(job, "Complete", "", "", succeeded=succeeded)
                others = []
        for pod in others:
            self._stop_pod(job, pod)

    def _stop_pod(self, job: str, pod: JsonObject) -> None:
        """The job controller deletes a pod: the kubelet stops its containers (SIGTERM), the pod goes."""
        index = (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX)
        rank = None if index is None else int(index)
        if "running" in str(pod["status"].get("containerStatuses")):
            self._end_container(job, 143, "Error", rank)
        with self._state:
            name = pod["metadata"]["name"]
            if ("pods", pod["metadata"]["namespace"], name) in self._objects:
                self._delete("pods", self._objects[("pods", pod["metadata"]["namespace"], name)])

    def _end_container(
        self, job: str, exit_code: int, why: str, rank: int | None = None, **pod_status: Any
    ) -> None:
        def change(pod: JsonObject) -> None:
            terminated = {
                "exitCode": exit_code,
                "reason": why,
                "startedAt": pod["status"].get("startTime", _now()),
                "finishedAt": _now(),
                "containerID": f"containerd://{uuid.uuid4().hex}",
            }
            self._container_status(pod, {"terminated": terminated})
            pod["status"]["phase"] = "Succeeded" if exit_code == 0 else "Failed"
            pod["status"].update(pod_status)

        self._change_pod(job, change, rank)

    def evict(self, job: str) -> None:
        """The kubelet evicts the pod (node pressure)."""
        message = "The node was low on resource: memory. Threshold quantity: 100Mi, available: 51200Ki."
        self._disrupt(job, "TerminationByKubelet", message)
        self._end_container(job, 137, "Error", reason="Evicted", message=message)
        with self._state:
            self._finish_job(
                job, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit", failed=1
            )

    def preempt(self, job: str) -> None:
        """The scheduler preempts the pod for a higher-priority one: marked, stopped, deleted."""
        self._disrupt(
            job,
            "PreemptionByScheduler",
            "Kubernetes Scheduler: preempting to accommodate a higher priority pod",
        )
        self._end_container(job, 143, "Error")
        with self._state:
            self._delete("pods", self._pod(job, "default"))
            self._finish_job(
                job, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit", failed=1
            )

    def _disrupt(self, job: str, reason: str, message: str) -> None:
        def change(pod: JsonObject) -> None:
            pod["status"].setdefault("conditions", []).append(
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "lastProbeTime": None,
                    "lastTransitionTime": _now(),
                    "reason": reason,
                    "message": message,
                }
            )
            pod["metadata"]["deletionTimestamp"] = _now()

        self._change_pod(job, change)

    def exceed_deadline(self, job: str) -> None:
        """The job controller ends a Job past its activeDeadlineSeconds: the Job fails, its pod is deleted."""
        with self._state:
            self._finish_job(
                job, "Failed", "DeadlineExceeded", "Job was active longer than specified deadline", failed=1
            )
        self._end_container(job, 143, "Error")
        with self._state:
            self._delete("pods", self._pod(job, "default"))

    def _job_status(self, job: str, **changes: Any) -> None:
        obj = copy.deepcopy(self._objects[("jobs", "default", job)])
        obj["status"].update(changes)
        self._put("jobs", obj, "MODIFIED")

    def _finish_job(self, job: str, kind: str, reason: str, message: str, **counts: int) -> None:
        target = "SuccessCriteriaMet" if kind == "Complete" else "FailureTarget"
        conditions = [
            {
                "type": condition,
                "status": "True",
                "lastProbeTime": _now(),
                "lastTransitionTime": _now(),
                **({"reason": reason, "message": message} if reason else {}),
            }
            for condition in (target, kind)
        ]
        finished = {"completionTime": _now()} if kind == "Complete" else {}
        self._job_status(job, active=0, ready=0, conditions=conditions, **counts, **finished)

    def drop_watches(self) -> None:
        """Cut every open watch off mid-stream (as a restarting API server or a load balancer would)."""
        with self._state:
            self._watch_drops += 1
            self._state.notify_all()

    def bookmark(self) -> None:
        """Send every open watch that asked for bookmarks a BOOKMARK at the current resourceVersion."""
        with self._state:
            self._bookmarks += 1
            self._state.notify_all()

    def drop_logs(self) -> None:
        with self._state:
            self._log_drops += 1
            self._state.notify_all()

    def expire_history(self) -> None:
        """Forget every change so far: a watch from any resourceVersion given out gets 410 Gone."""
        with self._state:
            self._oldest_watchable = self._resource_version + 1
            self._events.clear()

    # -- the API -----------------------------------------------------------------------------------------

    def _put(self, resource: str, obj: JsonObject, event: str) -> JsonObject:
        self._resource_version += 1
        obj["metadata"]["resourceVersion"] = str(self._resource_version)
        meta = obj["metadata"]
        self._objects[(resource, meta["namespace"], meta["name"])] = obj
        self._events.append(_Event(self._resource_version, resource, event, copy.deepcopy(obj)))
        self._state.notify_all()
        return copy.deepcopy(obj)

    def _delete(self, resource: str, obj: JsonObject) -> None:
        meta = obj["metadata"]
        gone = self._objects.pop((resource, meta["namespace"], meta["name"]))
        self._resource_version += 1
        gone["metadata"]["resourceVersion"] = str(self._resource_version)
        self._events.append(_Event(self._resource_version, resource, "DELETED", copy.deepcopy(gone)))
        self._state.notify_all()

    def _new_metadata(self, resource: str, namespace: str, obj: JsonObject) -> JsonObject:
        meta: JsonObject = obj.setdefault("metadata", {})
        if not meta.get("name"):
            raise ApiFailure(
                status(422, "Invalid", f'{resource} "" is invalid: metadata.name: Required value')
            )
        meta.update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=_now())
        api_version, kind, _ = KINDS[resource]
        obj.update(apiVersion=api_version, kind=kind)
        return meta

    def _not_found(self, resource: str, name: str) -> ApiFailure:
        group = KINDS[resource][2]
        plural = f"{resource}.{group}" if group else resource
        return ApiFailure(
            status(404, "NotFound", f'{plural} "{name}" not found', name=name, group=group, kind=resource)
        )

    def create(self, resource: str, namespace: str, obj: JsonObject) -> JsonObject:
        with self._state:
            meta = self._new_metadata(resource, namespace, obj)
            if (resource, namespace, meta["name"]) in self._objects:
                group = KINDS[resource][2]
                plural = f"{resource}.{group}" if group else resource
                raise ApiFailure(
                    status(
                        409,
                        "AlreadyExists",
                        f'{plural} "{meta["name"]}" already exists',
                        name=meta["name"],
                        group=group,
                        kind=resource,
                    )
                )
            if resource == "jobs":
                meta["generation"] = 1
                self._default_job(obj)
                created = self._put("jobs", obj, "ADDED")
                self._start_job(obj)
                return created
            if resource == "secrets":
                obj.setdefault("type", "Opaque")
            if resource == "services":
                self._default_service(obj)
            return self._put(resource, obj, "ADDED")

    def _default_service(self, service: JsonObject) -> None:
        """What the API server fills in a Service (a headless one keeps ``clusterIP: None``)."""
        spec = service.setdefault("spec", {})
        cluster_ip = spec.setdefault(
            "clusterIP", f"10.96.{len(self._objects) % 250}.{uuid.uuid4().int % 250}"
        )
        for field, value in (
            ("clusterIPs", [cluster_ip]),
            ("type", "ClusterIP"),
            ("sessionAffinity", "None"),
            ("ipFamilies", ["IPv4"]),
            ("ipFamilyPolicy", "SingleStack"),
            ("internalTrafficPolicy", "Cluster"),
        ):
            spec.setdefault(field, value)
        service["status"] = {"loadBalancer": {}}

    def _default_job(self, job: JsonObject) -> None:
        uid = job["metadata"]["uid"]
        spec = job["spec"]
        for field, value in (
            ("completions", 1),
            ("parallelism", 1),
            ("backoffLimit", 6),
            ("completionMode", "NonIndexed"),
            ("suspend", False),
            ("podReplacementPolicy", "TerminatingOrFailed"),
            ("manualSelector", False),
        ):
            spec.setdefault(field, value)
        selector = {"batch.kubernetes.io/controller-uid": uid}
        spec["selector"] = {"matchLabels": selector}
        template_meta = spec["template"].setdefault("metadata", {})
        template_meta.setdefault("labels", {}).update(
            {
                **selector,
                "batch.kubernetes.io/job-name": job["metadata"]["name"],
                "controller-uid": uid,
                "job-name": job["metadata"]["name"],
            }
        )
        job["status"] = {}

    def _start_job(self, job: JsonObject) -> None:
        """The job controller: the Job starts, and its pods are created, Pending: one, or one per completion
        index of an Indexed Job (named and labelled with its index, its hostname ``{job}-{index}``)."""
        name = job["metadata"]["name"]
        spec = job["spec"]
        indexed = spec["completionMode"] == "Indexed"
        for index in range(spec["parallelism"]) if indexed else [None]:
            self._put("pods", self._new_pod(job, index), "ADDED")
        self._job_status(
            name,
            startTime=_now(),
            active=spec["parallelism"],
            ready=0,
            terminating=0,
            uncountedTerminatedPods={},
        )

    def _new_pod(self, job: JsonObject, index: int | None) -> JsonObject:
        name = job["metadata"]["name"]
        template = copy.deepcopy(job["spec"]["template"])
        prefix = f"{name}-" if index is None else f"{name}-{index}-"
        meta = template["metadata"]
        if index is not None:
            meta.setdefault("labels", {})[COMPLETION_INDEX] = str(index)
            meta.setdefault("annotations", {})[COMPLETION_INDEX] = str(index)
            template["spec"]["hostname"] = f"{name}-{index}"
            from_index = {"fieldRef": {"fieldPath": f"metadata.labels['{COMPLETION_INDEX}']"}}
            for container in template["spec"]["containers"]:
                container.setdefault("env", []).append(
                    {"name": "JOB_COMPLETION_INDEX", "valueFrom": from_index}
                )
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                **meta,
                "name": prefix + uuid.uuid4().hex[:5],
                "generateName": prefix,
                "namespace": job["metadata"]["namespace"],
                "uid": str(uuid.uuid4()),
                "creationTimestamp": _now(),
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": name,
                        "uid": job["metadata"]["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
                "finalizers": ["batch.kubernetes.io/job-tracking"],
            },
            "spec": template["spec"],
            "status": {"phase": "Pending", "qosClass": "BestEffort"},
        }

    def read(self, resource: str, namespace: str, name: str) -> JsonObject:
        with self._state:
            found = self._objects.get((resource, namespace, name))
            if found is None:
                raise self._not_found(resource, name)
            return copy.deepcopy(found)

    def patch(self, resource: str, namespace: str, name: str, patch: JsonObject) -> JsonObject:
        with self._state:
            found = self._objects.get((resource, namespace, name))
            if found is None:
                raise self._not_found(resource, name)
            patched: JsonObject = merge_patch(found, patch)
            if resource == "jobs" and patched["spec"] != found["spec"]:
                patched["metadata"]["generation"] = found["metadata"].get("generation", 1) + 1
            return self._put(resource, patched, "MODIFIED")

    def delete(self, resource: str, namespace: str, name: str, options: JsonObject) -> JsonObject:
        with self._state:
            found = self._objects.get((resource, namespace, name))
            if found is None:
                raise self._not_found(resource, name)
            if resource != "jobs":
                self._delete(resource, found)
                return {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": {"name": name, "kind": resource, "uid": found["metadata"]["uid"]},
                }
            marked = copy.deepcopy(found)
            marked["metadata"]["deletionTimestamp"] = _now()
            marked["metadata"]["deletionGracePeriodSeconds"] = 0
            foreground = options.get("propagationPolicy") == "Foreground"
            if foreground:
                marked["metadata"]["finalizers"] = ["foregroundDeletion"]
            answer = self._put("jobs", marked, "MODIFIED")
            uid = found["metadata"]["uid"]
        # The garbage collector: the Job's pods (their containers stopped), its Secrets and Services, then
        # the Job.
        for pod in self._owned("pods", uid):
            self._stop_pod(name, pod)
        with self._state:
            for dependent in ("secrets", "services"):
                for owned in self._owned(dependent, uid):
                    self._delete(dependent, owned)
            self._delete("jobs", self._objects[("jobs", namespace, name)])
        return answer

    def _owned(self, resource: str, uid: str) -> list[JsonObject]:
        with self._state:
            return [
                copy.deepcopy(o)
                for (kind, _, _), o in self._objects.items()
                if kind == resource
                and any(ref["uid"] == uid for ref in o["metadata"].get("ownerReferences") or [])
            ]

    def listing(self, resource: str, namespace: str, selector: str) -> JsonObject:
        with self._state:
            api_version, kind, _ = KINDS[resource]
            items = [
                copy.deepcopy(o)
                for (k, ns, _), o in sorted(self._objects.items())
                if k == resource and ns == namespace and _selected(o, selector)
            ]
            return {
                "apiVersion": api_version,
                "kind": f"{kind}List",
                "metadata": {"resourceVersion": str(self._resource_version)},
                "items": items,
            }

    def watch(
        self, resource: str, namespace: str, selector: str, since: int, timeout: float, *, bookmarks: bool
    ) -> Iterator[JsonObject | None]:
        """Events after ``since``; None when the watch is cut off (drop_watches) or the server closes."""
        deadline = time.monotonic() + timeout
        record = Watch(resource, selector, since, since)
        with self._state:
            self.watches.append(record)
            drops = self._watch_drops
            bookmarked = self._bookmarks
            expired = since < self._oldest_watchable
            problem = f"too old resource version: {since} ({self._oldest_watchable})"
        if expired:
            record.ended = "expired"
            yield {"type": "ERROR", "object": status(410, "Expired", problem)}
            return
        while True:
            with self._state:
                while True:
                    cut_off = self._closed or self._watch_drops != drops
                    bookmark = bookmarks and self._bookmarks != bookmarked
                    bookmarked, current = self._bookmarks, self._resource_version
                    pending = [
                        e
                        for e in self._events
                        if e.resource_version > record.last_sent
                        and e.resource == resource
                        and e.object["metadata"]["namespace"] == namespace
                        and _selected(e.object, selector)
                    ]
                    if cut_off or bookmark or pending or time.monotonic() >= deadline:
                        break
                    self._state.wait(0.5)
            if cut_off:
                record.ended = "dropped"
                yield None
                return
            for event in pending:
                record.last_sent = event.resource_version
                yield {"type": event.type, "object": copy.deepcopy(event.object)}
            if bookmark:
                api_version, kind, _ = KINDS[resource]
                record.last_sent = current
                meta = {"resourceVersion": str(current)}
                yield {
                    "type": "BOOKMARK",
                    "object": {"kind": kind, "apiVersion": api_version, "metadata": meta},
                }
            elif not pending:
                record.ended = "timed out"
                return

    def log(self, namespace: str, pod_name: str, container: str, follow: bool) -> Iterator[bytes | None]:
        """The container's output; with ``follow``, more until the container ends. None: cut off."""
        with self._state:
            pod = self._objects.get(("pods", namespace, pod_name))
            if pod is None:
                raise self._not_found("pods", pod_name)
            state: JsonObject = next(
                (s["state"] for s in pod["status"].get("containerStatuses") or [] if s["name"] == container),
                {},
            )
            if not ({"running", "terminated"} & state.keys()):
                waiting = (state.get("waiting") or {}).get("reason", "ContainerCreating")
                raise ApiFailure(
                    status(
                        400,
                        "BadRequest",
                        f'container "{container}" in pod "{pod_name}" is waiting to start: {waiting}',
                    )
                )
            drops = self._log_drops
        sent = 0
        while True:
            with self._state:
                while True:
                    cut_off = self._closed or self._log_drops != drops
                    data = bytes(self._logs.get(pod_name, b""))[sent:]
                    pod = self._objects.get(("pods", namespace, pod_name))
                    ended = pod is None or "terminated" in str(pod["status"].get("containerStatuses"))
                    if cut_off or data or not follow or ended:
                        break
                    self._state.wait(0.5)
            if cut_off:
                yield None
                return
            if data:
                sent += len(data)
                yield data
            elif not follow or ended:
                return


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api: KubeApiServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _route(self) -> tuple[str, str, str, str, dict[str, str]]:
        """(resource, namespace, name, subresource, query) of the request's path."""
        parts = urlsplit(self.path)
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        segments = parts.path.strip("/").split("/")
        prefix = 3 if segments[0] == "apis" else 2  # /apis/batch/v1 or /api/v1
        rest = segments[prefix:]
        if len(rest) < 3 or rest[0] != "namespaces" or rest[2] not in KINDS:
            raise ApiFailure(status(404, "NotFound", "the server could not find the requested resource"))
        return rest[2], rest[1], rest[3] if len(rest) > 3 else "", rest[4] if len(rest) > 4 else "", query

    def _authorize(
        self, method: str, resource: str, name: str, subresource: str, query: dict[str, str]
    ) -> None:
        group = KINDS[resource][2]
        target = f"{resource}/{subresource}" if subresource else resource
        verb = verb_of(method, name, query)
        if (group, target, verb) not in self.api.allowed:
            raise ApiFailure(
                status(
                    403,
                    "Forbidden",
                    f'{target} is forbidden: User "system:serviceaccount:takeoff:takeoff-agent" cannot {verb}'
                    f' resource "{target}" in API group "{group}"',
                )
            )

    def _body(self) -> JsonObject:
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else b""
        body: JsonObject = json.loads(data) if data else {}
        return body

    def _answer(self, code: int, body: JsonObject) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, content_type: str, chunks: Iterator[bytes | None]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        for chunk in chunks:
            if chunk is None:  # cut off: no closing chunk, the client sees the stream break
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _handle(self, method: str) -> None:
        api = self.api
        body = self._body() if method in ("POST", "PATCH", "DELETE") else {}
        try:
            resource, namespace, name, subresource, query = self._route()
            with api._state:
                content_type = self.headers.get("Content-Type", "")
                api.requests.append(Request(method, urlsplit(self.path).path, query, body, content_type))
                api._state.notify_all()
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                raise ApiFailure(status(401, "Unauthorized", "Unauthorized"))
            self._authorize(method, resource, name, subresource, query)
            if method == "GET" and subresource == "log":
                log = api.log(namespace, name, query.get("container", ""), query.get("follow") == "true")
                self._stream("text/plain", log)
            elif method == "GET" and name:
                self._answer(200, api.read(resource, namespace, name))
            elif method == "GET" and query.get("watch") in ("true", "1"):
                events = api.watch(
                    resource,
                    namespace,
                    query.get("labelSelector", ""),
                    int(query.get("resourceVersion") or 0),
                    float(query.get("timeoutSeconds") or 300),
                    bookmarks=query.get("allowWatchBookmarks") == "true",
                )
                self._stream(
                    "application/json",
                    (None if event is None else json.dumps(event).encode() + b"\n" for event in events),
                )
            elif method == "GET":
                self._answer(200, api.listing(resource, namespace, query.get("labelSelector", "")))
            elif method == "POST":
                created = api.create(resource, namespace, body)
                api.answer_creates.wait()
                self._answer(201, created)
            elif method == "PATCH":
                if self.headers.get("Content-Type") not in MERGE_PATCHES:
                    raise ApiFailure(
                        status(
                            415,
                            "UnsupportedMediaType",
                            f"the body of the request was in an unknown format: {content_type}",
                        )
                    )
                self._answer(200, api.patch(resource, namespace, name, body))
            elif method == "DELETE":
                options = {**body, **query}
                self._answer(200, api.delete(resource, namespace, name, options))
        except ApiFailure as failure:
            self._answer(failure.body["code"], failure.body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")
