"""The few Kubernetes API calls the runner makes, through the official client, answering plain JSON objects.

Every call blocks (the client is synchronous): the runner makes them in worker threads. Objects travel
as the API server's JSON (``_preload_content=False``), so what the runner reads is what the server sent.
An API server that cannot be reached, or will not let the agent in, is ``RunnerUnavailable``.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import urllib3
from kubernetes import client

from takeoff_agent.runners.base import RunnerUnavailable

JsonObject = dict[str, Any]

REQUEST_TIMEOUT = (10.0, 30.0)
"""Connect and read timeouts of one call that is not a stream."""
MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    """The API server answered a call with an error Status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def _api_error(error: client.ApiException) -> ApiError | RunnerUnavailable:
    try:
        body = json.loads(error.body or "{}")
    except ValueError:
        body = {}
    status = int(error.status or 0)
    message = str(body.get("message") or error.reason or "")
    if status in (0, 401, 403, 429) or status >= 500:
        return RunnerUnavailable(f"the Kubernetes API server answered {status}: {message}")
    return ApiError(status, str(body.get("reason") or error.reason or ""), message)


@contextlib.contextmanager
def _calling(what: str) -> Iterator[None]:
    try:
        yield
    except client.ApiException as error:
        raise _api_error(error) from None
    except (urllib3.exceptions.HTTPError, OSError) as error:
        raise RunnerUnavailable(f"the Kubernetes API server cannot be reached ({what}): {error}") from None


def lines(response: Any) -> Iterator[bytes]:
    """The lines of a streamed response as they arrive (a last line without a newline included)."""
    pending = b""
    for chunk in response.stream(amt=None, decode_content=False):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        yield from (line + b"\n" for line in complete)
    if pending:
        yield pending


def interrupt(response: Any) -> None:
    """Unblock a thread reading ``response`` from another thread (closing alone may wait on the read)."""
    sock = getattr(getattr(response, "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class KubeApi:
    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)

    @staticmethod
    def _json(response: Any) -> JsonObject:
        data: JsonObject = json.loads(response.data)
        return data

    def create_job(self, namespace: str, job: JsonObject) -> JsonObject:
        with _calling("create a Job"):
            return self._json(
                self.batch.create_namespaced_job(
                    namespace,
                    client.V1Job.model_validate(job),
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            )

    def read_job(self, namespace: str, name: str) -> JsonObject | None:
        try:
            with _calling("read a Job"):
                return self._json(
                    self.batch.read_namespaced_job(
                        name, namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
                    )
                )
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def patch_job(self, namespace: str, name: str, patch: JsonObject) -> JsonObject:
        with _calling("update a Job"):
            return self._json(
                self.batch.patch_namespaced_job(
                    name,
                    namespace,
                    patch,
                    _content_type=MERGE_PATCH,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            )

    def delete_job(self, namespace: str, name: str, grace_seconds: int | None) -> None:
        """Delete the Job and, first, its pods (foreground propagation); gone already is fine."""
        options = client.V1DeleteOptions(propagation_policy="Foreground", grace_period_seconds=grace_seconds)
        try:
            with _calling("delete a Job"):
                self.batch.delete_namespaced_job(
                    name, namespace, body=options, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
                )
        except ApiError as error:
            if error.status != 404:
                raise

    def list_jobs(self, namespace: str, selector: str) -> JsonObject:
        with _calling("list Jobs"):
            return self._json(
                self.batch.list_namespaced_job(
                    namespace,
                    label_selector=selector,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            )

    def create_secret(self, namespace: str, secret: JsonObject) -> JsonObject:
        with _calling("create a Secret"):
            return self._json(
                self.core.create_namespaced_secret(
                    namespace,
                    client.V1Secret.model_validate(secret),
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            )

    def patch_secret(self, namespace: str, name: str, patch: JsonObject) -> JsonObject:
        with _calling("update a Secret"):
            return self._json(
                self.core.patch_namespaced_secret(
                    name,
                    namespace,
                    patch,
                    _content_type=MERGE_PATCH,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            )

    def list_secrets(self, namespace: str, selector: str) -> JsonObject:
        with _calling("list Secrets"):
            return self._json(
                self.core.list_namespaced_secret(
                    namespace,
                    label_selector=selector,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            )

    def delete_secret(self, namespace: str, name: str) -> None:
        try:
            with _calling("delete a Secret"):
                self.core.delete_namespaced_secret(
                    name, namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
                )
        except ApiError as error:
            if error.status != 404:
                raise

    def create_service(self, namespace: str, service: JsonObject) -> JsonObject:
        with _calling("create a Service"):
            return self._json(
                self.core.create_namespaced_service(
                    namespace,
                    client.V1Service.model_validate(service),
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            )

    def patch_service(self, namespace: str, name: str, patch: JsonObject) -> JsonObject:
        with _calling("update a Service"):
            return self._json(
                self.core.patch_namespaced_service(
                    name,
                    namespace,
                    patch,
                    _content_type=MERGE_PATCH,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            )

    def list_services(self, namespace: str, selector: str) -> JsonObject:
        with _calling("list Services"):
            return self._json(
                self.core.list_namespaced_service(
                    namespace,
                    label_selector=selector,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            )

    def delete_service(self, namespace: str, name: str) -> None:
        try:
            with _calling("delete a Service"):
                self.core.delete_namespaced_service(
                    name, namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
                )
        except ApiError as error:
            if error.status != 404:
                raise

    def list_or_watch(self, kind: str, namespace: str, selector: str, **options: Any) -> Any:
        """``kind`` ``jobs`` or ``pods``: a list (its JSON) or, with ``watch=True``, the open stream."""
        call = self.batch.list_namespaced_job if kind == "jobs" else self.core.list_namespaced_pod
        with _calling(f"list {kind}"):
            response = call(namespace, label_selector=selector, _preload_content=False, **options)
        return response if options.get("watch") else self._json(response)

    def follow_log(self, namespace: str, pod: str, container: str) -> Any:
        """The container's log from its start, followed (a stream: read it with ``lines``)."""
        with _calling("read a pod's log"):
            return self.core.read_namespaced_pod_log(
                pod,
                namespace,
                container=container,
                follow=True,
                _preload_content=False,  # no read timeout: a job may print nothing for hours
            )
