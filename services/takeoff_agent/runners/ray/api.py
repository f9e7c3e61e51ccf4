"""The Ray Jobs REST API (the dashboard's ``/api/jobs/``), spoken over HTTP with httpx.

Not the ``ray`` package: its pins clash with ours and it weighs about 380 MB, for five HTTP calls. The
calls and bodies are those of ``ray.job_submission.JobSubmissionClient`` (Ray 2.x): submit, read, logs,
stop, list.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import httpx

from takeoff_agent.runners.base import RunnerRefused, RunnerUnavailable

JsonObject = dict[str, Any]

# httpx logs every request at INFO: several a second for each job this runner follows.
logging.getLogger("httpx").setLevel(logging.WARNING)

REQUEST_SECONDS = 30.0
"""How long one call may take: the head answers from its own tables, a submit from the job agent."""
_UNAVAILABLE_STATUSES = frozenset({401, 403, 408, 429})
_REFUSALS = ("ValueError", "TypeError")


class RayJobsApi:
    """One Ray cluster's Jobs API, at its dashboard address (``http://host:port``)."""

    def __init__(self, address: str, headers: Mapping[str, str]) -> None:
        self.address = address
        self._client = httpx.AsyncClient(base_url=address, headers=dict(headers), timeout=REQUEST_SECONDS)

    async def submit(self, body: JsonObject) -> None:
        """POST /api/jobs/. Ray answers every failed submission with 500 and a traceback whose last line
        is the error: a ValueError or TypeError (a submission id taken, a runtime env it cannot parse) is
        the job's, raised as RunnerRefused; any other (its job agent unreachable) RunnerUnavailable."""
        response = await self._call("POST", "/api/jobs/", json=body)
        reason = _last_line(response.text)
        if response.status_code == 500 and reason.startswith(_REFUSALS):
            raise RunnerRefused(f"the Ray cluster refused the job: {reason}")
        self._raise_for(response)

    async def job(self, submission_id: str) -> JsonObject | None:
        """GET /api/jobs/{id}: the job's details (``status``, ``message``, ``error_type``,
        ``driver_exit_code``, ``metadata``); None when the cluster has no such job."""
        response = await self._call("GET", f"/api/jobs/{submission_id}")
        if response.status_code == 404:
            return None
        self._raise_for(response)
        details: JsonObject = response.json()
        return details

    async def jobs(self) -> list[JsonObject]:
        """GET /api/jobs/: every job the cluster keeps."""
        response = await self._call("GET", "/api/jobs/")
        self._raise_for(response)
        listed: list[JsonObject] = response.json()
        return listed

    async def logs(self, submission_id: str) -> str | None:
        """GET /api/jobs/{id}/logs: the driver's whole output so far (stdout and stderr merged); None when
        the cluster has no such job."""
        response = await self._call("GET", f"/api/jobs/{submission_id}/logs")
        if response.status_code == 404:
            return None
        self._raise_for(response)
        return str(response.json()["logs"])

    async def stop(self, submission_id: str) -> None:
        """POST /api/jobs/{id}/stop: the job's driver gets SIGTERM, then SIGKILL after the cluster's
        ``RAY_JOB_STOP_WAIT_TIME_S``. A job already gone is fine."""
        response = await self._call("POST", f"/api/jobs/{submission_id}/stop")
        if response.status_code != 404:
            self._raise_for(response)

    async def close(self) -> None:
        await self._client.aclose()

    async def _call(self, method: str, path: str, json: JsonObject | None = None) -> httpx.Response:
        try:
            return await self._client.request(method, path, json=json)
        except httpx.HTTPError as error:
            raise RunnerUnavailable(
                f"the Ray dashboard at {self.address} cannot be reached: {error}"
            ) from None

    def _raise_for(self, response: httpx.Response) -> None:
        if response.is_success:
            return
        what = f"the Ray dashboard at {self.address} answered {response.status_code}"
        if response.status_code in _UNAVAILABLE_STATUSES or response.status_code >= 500:
            raise RunnerUnavailable(f"{what}: {_last_line(response.text)}")
        raise RunnerRefused(f"{what}: {_last_line(response.text)}")


def _last_line(text: str) -> str:
    """The last non-blank line of Ray's answer (a traceback ends with the error), at most 500 characters."""
    lines = [line.strip() for line in text.splitlines() if line.strip().strip(".")]
    return (lines[-1] if lines else "no message")[:500]
