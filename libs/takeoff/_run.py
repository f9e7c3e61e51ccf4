"""``takeoff.init()`` and the :class:`Run` a job reports through.

Launched by an agent, a job finds its run in the environment (``TAKEOFF_PROJECT``, ``TAKEOFF_RUN_ID``,
``TAKEOFF_CONFIG``) and attaches to it; run outside a launch, ``init`` creates a run first. Either way the
registry is ``TAKEOFF_REGISTRY`` (an address or ``unix:/path``), else the local stack's.
"""

from __future__ import annotations

import atexit
import json
import operator
import os
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator, Mapping, MutableMapping
from types import TracebackType
from typing import Any, TypeVar

import grpc

from takeoff._auth import channel_credentials, find_api_key
from takeoff._home import service_address
from takeoff._sender import CALL_TIMEOUT, RunSender, warn
from takeoff.client import default_project
from takeoff.errors import TakeoffError
from takeoff.models import RunState, dict_to_struct
from takeoff.v1 import runs_pb2, runs_pb2_grpc
from takeoff_rpc.channels import open_channel
from takeoff_rpc.retries import RetryPolicy, call_with_retries

# How long init waits for an unreachable registry, and finish for the last data to be delivered.
INIT_TIMEOUT_ENV = "TAKEOFF_INIT_TIMEOUT"
FLUSH_TIMEOUT_ENV = "TAKEOFF_FLUSH_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
MAX_FINISH_MESSAGE = 4096
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class _Active:
    """The run this process reports to, between ``init`` and ``finish``."""

    run: Run | None = None


class ReadOnlyConfigError(TypeError):
    """A launched job tried to change a config key its launch set."""


class RunConfig(MutableMapping[str, Any]):
    """The run's config: the code's defaults overridden by the launch's. Launch-set keys are read-only.

    Changes to other keys stay in this process: the registry records the config once, at ``init``.
    """

    def __init__(self, values: Mapping[str, Any], launched_keys: frozenset[str]) -> None:
        self._values = dict(values)
        self._launched_keys = launched_keys

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._refuse_launched(key)
        self._values[key] = value

    def __delitem__(self, key: str) -> None:
        self._refuse_launched(key)
        del self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"RunConfig({self._values!r})"

    def _refuse_launched(self, key: str) -> None:
        if key in self._launched_keys:
            raise ReadOnlyConfigError(
                f"config key {key!r} was set by the launch (TAKEOFF_CONFIG) and is read-only in this run"
            )


class RunSummary(MutableMapping[str, Any]):
    """Headline values of a run (``best_loss``...); each change is sent in the background."""

    def __init__(self, sender: RunSender) -> None:
        self._values: dict[str, Any] = {}
        self._sender = sender

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._values[key] = value
        self._sender.update_summary({key: value})

    def __delitem__(self, key: str) -> None:
        del self._values[key]
        self._sender.update_summary({key: None})  # a JSON null removes the key

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"RunSummary({self._values!r})"


class Run:
    """A run this process reports to. ``log`` never blocks; ``finish`` (also called at exit) flushes."""

    def __init__(
        self,
        run: runs_pb2.Run,
        config: RunConfig,
        channel: grpc.Channel,
        stub: runs_pb2_grpc.RunServiceStub,
        *,
        flush_timeout: float,
    ) -> None:
        self.path = run.name
        """The run's resource name, ``projects/{project}/runs/{id}``."""
        self.id = run.name.rsplit("/", 1)[-1]
        self.project = run.name.split("/")[1]
        self.name = run.display_name or self.id
        self.config = config
        self._channel = channel
        self._sender = RunSender(stub, run.name, first_row_index=run.history_length)
        self._append_row = self._sender.rows.append
        self._next_step = run.last_step + 1 if run.history_length else 0
        self.summary = RunSummary(self._sender)
        self._flush_timeout = flush_timeout
        self._finished = False
        self._finish_lock = threading.Lock()
        self._pid = os.getpid()  # a forked child inherits this object, and exit handlers, but not the run
        self._previous_excepthook = sys.excepthook
        if not _interactive():  # in a REPL an uncaught exception does not end the program
            sys.excepthook = self._excepthook
        atexit.register(self.finish)

    def log(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """Record one row of metrics, e.g. ``{"loss": 0.4, "epoch": 2}``; ``step`` defaults to the last + 1.

        Numbers become metric values; strings, lists and dicts are kept as data. The row is buffered and
        sent by a background thread: this call costs microseconds and never waits for the network.
        """
        if self._finished:
            raise RuntimeError(f"run {self.id} is finished; call takeoff.init() for a new run")
        if step is None:
            step = self._next_step
        else:
            step = operator.index(step)
            if step < 0:
                raise ValueError(f"step must be >= 0, got {step}")
        self._next_step = step + 1
        # A copy, so the caller may reuse its dict; the protobuf is built in the sender thread.
        self._append_row((step, time.time_ns(), dict(values)))

    def finish(self, state: RunState | str | None = None, message: str = "") -> None:
        """Deliver everything buffered, then end the run (FINISHED unless ``state`` says otherwise).

        Waits at most ``TAKEOFF_FLUSH_TIMEOUT`` seconds (default 60) for an unreachable registry, then gives
        up with a warning; it never raises because of the registry.
        """
        final = RunState(str(state or RunState.FINISHED).upper())
        if not final.ended:
            raise ValueError(f"a run finishes as FINISHED, FAILED, CRASHED or KILLED, not {final}")
        with self._finish_lock:
            if self._finished or os.getpid() != self._pid:
                return
            self._finished = True
        if _Active.run is self:
            _Active.run = None
        atexit.unregister(self.finish)
        if sys.excepthook == self._excepthook:
            sys.excepthook = self._previous_excepthook
        request = runs_pb2.FinishRunRequest(
            name=self.path, state=final._to_proto(), message=message[:MAX_FINISH_MESSAGE]
        )
        self._sender.close(request, timeout=self._flush_timeout)
        self._channel.close()

    @property
    def finished(self) -> bool:
        return self._finished

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: TracebackType | None
    ) -> None:
        if kind is None:
            self.finish()
        else:
            self.finish(_state_for(kind), _exception_summary(kind, error))

    def __repr__(self) -> str:
        return f"Run(id={self.id!r}, project={self.project!r}, name={self.name!r})"

    def _excepthook(
        self, kind: type[BaseException], error: BaseException, trace: TracebackType | None
    ) -> None:
        self._previous_excepthook(kind, error, trace)
        self.finish(_state_for(kind), _exception_summary(kind, error))


def init(project: str | None = None, config: Mapping[str, Any] | None = None, name: str | None = None) -> Run:
    """Start reporting this process as a run and return it.

    In a launched job (``TAKEOFF_RUN_ID`` set) this attaches to the run the agent created, in the launch's
    project, and ``config`` holds the code's defaults: the launch config (``TAKEOFF_CONFIG``) overrides
    them. Elsewhere it creates a run in ``project`` (else ``TAKEOFF_PROJECT``, else ``default``). While
    the registry is unreachable it retries, for up to ``TAKEOFF_INIT_TIMEOUT`` seconds (default 60).
    It presents the key ``takeoff.Client`` finds (in a launched job, the run token ``TAKEOFF_TOKEN``) and
    uses TLS as the client does (``TAKEOFF_TLS_CA_FILE``; never on a ``unix:`` address).
    Calling it again while a run is active returns that run.
    """
    if _Active.run is not None:
        return _Active.run
    launched_config = _launch_config()
    values = {**(config or {}), **launched_config}
    flush_timeout = _seconds_from_env(FLUSH_TIMEOUT_ENV)
    address = service_address("registry")
    caller = _PatientCaller(address, deadline=time.monotonic() + _seconds_from_env(INIT_TIMEOUT_ENV))
    channel = open_channel(address, api_key=find_api_key(), credentials=channel_credentials(address))
    stub = runs_pb2_grpc.RunServiceStub(channel)
    try:
        attached = _attach(stub, caller, project, values, name)
    except BaseException:
        channel.close()
        raise
    config_view = RunConfig(values, frozenset(launched_config))
    _Active.run = Run(attached, config_view, channel, stub, flush_timeout=flush_timeout)
    return _Active.run


def log(values: Mapping[str, Any], step: int | None = None) -> None:
    """``run.log`` on the run ``takeoff.init()`` started."""
    if _Active.run is None:
        raise RuntimeError("call takeoff.init() before takeoff.log()")
    _Active.run.log(values, step)


def finish(state: RunState | str | None = None, message: str = "") -> None:
    """``run.finish`` on the run ``takeoff.init()`` started, if there is one."""
    if _Active.run is not None:
        _Active.run.finish(state, message)


def current_run() -> Run | None:
    """The run ``takeoff.init()`` started in this process and not yet finished."""
    return _Active.run


def _attach(
    stub: runs_pb2_grpc.RunServiceStub,
    caller: _PatientCaller,
    project: str | None,
    config: dict[str, Any],
    display_name: str | None,
) -> runs_pb2.Run:
    if run_id := os.environ.get("TAKEOFF_RUN_ID"):
        run_name = f"projects/{default_project()}/runs/{run_id}"
    else:
        create = runs_pb2.CreateRunRequest(
            parent=f"projects/{project or default_project()}",
            run=runs_pb2.Run(display_name=display_name or ""),
            request_id=str(uuid.uuid4()),  # a retried CreateRun returns the run the first attempt made
        )
        run_name = caller.call(stub.CreateRun, create).run.name
    attach = runs_pb2.AttachRunRequest(
        name=run_name, config=dict_to_struct(config), display_name=display_name or ""
    )
    try:
        return caller.call(stub.AttachRun, attach).run
    except TakeoffError as error:
        # An attempt that failed on the way back may have attached the run: then it is ours already.
        if error.reason != "RUN_ALREADY_ATTACHED" or not caller.retried:
            raise
        return caller.call(stub.GetRun, runs_pb2.GetRunRequest(name=run_name)).run


class _PatientCaller:
    """Makes calls that wait out an unreachable registry, until a deadline."""

    def __init__(self, address: str, deadline: float) -> None:
        self.address = address
        self.deadline = deadline
        self.retried = False

    def call(self, method: grpc.UnaryUnaryMultiCallable[_Request, _Response], request: _Request) -> _Response:
        def attempt() -> _Response:
            remaining = self.deadline - time.monotonic()
            return method(request, timeout=max(0.1, min(CALL_TIMEOUT, remaining)), wait_for_ready=True)

        policy = RetryPolicy(deadline=self.deadline - time.monotonic())
        try:
            return call_with_retries(attempt, policy, on_retry=self._on_retry)
        except grpc.RpcError as rpc_error:
            raise TakeoffError.from_rpc_error(rpc_error, target=self.address) from None

    def _on_retry(self, rpc_error: grpc.RpcError, failed_attempts: int, delay: float) -> None:
        if not self.retried:
            error = TakeoffError.from_rpc_error(rpc_error, target=self.address)
            warn(f"waiting for the registry at {self.address} ({error})")
            self.retried = True


def _launch_config() -> dict[str, Any]:
    text = os.environ.get("TAKEOFF_CONFIG") if os.environ.get("TAKEOFF_RUN_ID") else None
    if not text:
        return {}
    try:
        config = json.loads(text)
    except ValueError as error:
        raise ValueError(f"TAKEOFF_CONFIG is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"TAKEOFF_CONFIG must be a JSON object, not {type(config).__name__}")
    return config


def _seconds_from_env(variable: str) -> float:
    text = os.environ.get(variable)
    if not text:
        return DEFAULT_TIMEOUT
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{variable} must be a number of seconds, not {text!r}") from None


def _state_for(kind: type[BaseException]) -> RunState:
    return RunState.KILLED if issubclass(kind, KeyboardInterrupt) else RunState.FAILED


def _exception_summary(kind: type[BaseException], error: BaseException | None) -> str:
    return "".join(traceback.format_exception_only(kind, error)).strip()


def _interactive() -> bool:
    return hasattr(sys, "ps1") or bool(sys.flags.interactive)
