"""Takeoff: launch machine-learning jobs and track their runs.

    import takeoff
    run = takeoff.init(project="demo", config={"lr": 0.01, "epochs": 3})  # a launch overrides these
    for epoch in range(run.config["epochs"]):
        run.log({"loss": 1 / (epoch + 1), "epoch": epoch})
    run.summary["best_loss"] = 0.33
    run.finish()  # also at exit; an uncaught exception marks the run FAILED

As in wandb, ``takeoff.run`` is the active run (None before ``init``), and ``takeoff.config``,
``takeoff.summary``, ``takeoff.log``, ``takeoff.define_metric``, ``takeoff.log_artifact``,
``takeoff.use_artifact`` and ``takeoff.finish`` act on it: ``run.log_artifact(path, name=, type=)`` records
files as a named, versioned artifact, ``run.use_artifact("ckpt:latest").download()`` fetches one, and
``takeoff.init(resume="allow")`` carries a run's step and summary over.

``takeoff.Client`` manages jobs and queues, launches jobs and reads runs. The SDK talks to Takeoff's
services over gRPC only; it never imports server code.

The names below are imported on first use (PEP 562), so that importing the generated stubs
(``takeoff.v1``), as every service does, loads neither the client nor the run machinery. ``run``,
``config`` and ``summary`` are looked up at each use, since they change with the active run.
"""

from __future__ import annotations

import atexit
import gc
import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The last thing before the interpreter's own teardown (atexit runs handlers in reverse): its garbage
# collections would walk every object that gRPC, asyncio and protobuf made at import, about as much CPU as
# a launched job's whole run (bench/job_cpu.py). Frozen, they are skipped; what is in a reference cycle then
# goes unfinalized at exit, which Python never promised (its data model says so of __del__ at exit), and
# everything an atexit handler, a flush or a refcount releases is done as before.
atexit.register(gc.freeze)

__all__ = [
    "AbortedError",
    "Agent",
    "AgentLease",
    "AlreadyExistsError",
    "Artifact",
    "ArtifactCollection",
    "ArtifactFile",
    "ArtifactVersion",
    "Client",
    "CodeSource",
    "CreatedJobVersion",
    "CreatedKey",
    "DeadlineExceededError",
    "Environment",
    "FailedPreconditionError",
    "FailureReason",
    "FieldViolation",
    "GitSource",
    "ImageSource",
    "InvalidArgumentError",
    "Item",
    "ItemState",
    "ItemTransition",
    "Job",
    "JobInputs",
    "JobVersion",
    "Key",
    "KeyKind",
    "LogLine",
    "LogStream",
    "MetricRow",
    "NotFoundError",
    "PendingReason",
    "PermissionDeniedError",
    "Priority",
    "ProjectRole",
    "Queue",
    "QueueChange",
    "QueueView",
    "ReadOnlyConfigError",
    "ResourceExhaustedError",
    "ResourceKind",
    "Run",
    "RunConfig",
    "RunInfo",
    "RunState",
    "RunSummary",
    "Secret",
    "SecretMount",
    "ServiceRole",
    "TakeoffError",
    "TemplateVariable",
    "UnauthenticatedError",
    "UnavailableError",
    "config",
    "current_run",
    "define_metric",
    "finish",
    "init",
    "log",
    "log_artifact",
    "run",
    "summary",
    "use_artifact",
]

# The active run's, so never kept in this module's namespace (takeoff._run.active_attribute).
_DYNAMIC = frozenset({"config", "run", "summary"})

# The module that defines each public name; the rest are in takeoff.models.
_DEFINED_IN = {
    **dict.fromkeys(
        (
            "ReadOnlyConfigError",
            "Run",
            "RunConfig",
            "RunSummary",
            "current_run",
            "define_metric",
            "finish",
            "init",
            "log",
            "log_artifact",
            "use_artifact",
        ),
        "takeoff._run",
    ),
    "Client": "takeoff.client",
    **dict.fromkeys(
        (
            "FieldViolation",
            "TakeoffError",
            "AbortedError",
            "AlreadyExistsError",
            "DeadlineExceededError",
            "FailedPreconditionError",
            "InvalidArgumentError",
            "NotFoundError",
            "PermissionDeniedError",
            "ResourceExhaustedError",
            "UnauthenticatedError",
            "UnavailableError",
        ),
        "takeoff.errors",
    ),
}

if TYPE_CHECKING:
    run: Run | None
    config: RunConfig
    summary: RunSummary

if TYPE_CHECKING:
    from takeoff._run import (
        ReadOnlyConfigError,
        Run,
        RunConfig,
        RunSummary,
        current_run,
        define_metric,
        finish,
        init,
        log,
        log_artifact,
        use_artifact,
    )
    from takeoff.client import Client
    from takeoff.errors import (
        AbortedError,
        AlreadyExistsError,
        DeadlineExceededError,
        FailedPreconditionError,
        FieldViolation,
        InvalidArgumentError,
        NotFoundError,
        PermissionDeniedError,
        ResourceExhaustedError,
        TakeoffError,
        UnauthenticatedError,
        UnavailableError,
    )
    from takeoff.models import (
        Agent,
        AgentLease,
        Artifact,
        ArtifactCollection,
        ArtifactFile,
        ArtifactVersion,
        CodeSource,
        CreatedJobVersion,
        CreatedKey,
        Environment,
        FailureReason,
        GitSource,
        ImageSource,
        Item,
        ItemState,
        ItemTransition,
        Job,
        JobInputs,
        JobVersion,
        Key,
        KeyKind,
        LogLine,
        LogStream,
        MetricRow,
        PendingReason,
        Priority,
        ProjectRole,
        Queue,
        QueueChange,
        QueueView,
        ResourceKind,
        RunInfo,
        RunState,
        Secret,
        SecretMount,
        ServiceRole,
        TemplateVariable,
    )
else:

    def __getattr__(name: str) -> object:
        if name in _DYNAMIC:
            return importlib.import_module("takeoff._run").active_attribute(name)
        if name not in __all__:
            raise AttributeError(f"module 'takeoff' has no attribute {name!r}")
        value = getattr(importlib.import_module(_DEFINED_IN.get(name, "takeoff.models")), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})
