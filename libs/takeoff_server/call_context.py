"""The call being served, for code below the servicer: free of gRPC, so domain modules may read it.

The server's error guard sets both for every call (``takeoff_server.interceptors.error_guard``).
"""

from __future__ import annotations

import contextvars

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "takeoff_request_id", default=None
)
"""The caller's ``x-request-id``, or one made for the call; log lines and INTERNAL errors quote it."""

method_var: contextvars.ContextVar[str] = contextvars.ContextVar("takeoff_method", default="")
"""The full name of the method being served (``/takeoff.v1.JobService/ListJobs``), e.g. to bind a page
token to the method that issued it."""
