"""``takeoff.init()`` and the :class:`Run` a job reports through.

Launched by an agent, a job finds its run in the environment (``TAKEOFF_PROJECT``, ``TAKEOFF_RUN_ID``,
``TAKEOFF_CONFIG``) and attaches to it; run outside a launch, ``init`` creates a run first. Either way the
registry is ``TAKEOFF_REGISTRY`` (an address or ``unix:/path``), else the local stack's.

A :class:`Run` checks what the code gives it and hands rows and changes to a
:class:`takeoff._delivery.Delivery`: the registry's (``mode="online"``), a local directory's
(``"offline"``, uploaded later by ``takeoff sync``) or none (``"disabled"``).
"""

from __future__ import annotations

import atexit
import json
import operator
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from takeoff import _trace
from takeoff._delivery import Delivery, DisabledDelivery, parse_summary, warn
from takeoff._home import default_project
from takeoff._values import RunState, dict_to_struct, jsonable, struct_to_dict
from takeoff.v1 import runs_pb2

if TYPE_CHECKING:
    import argparse

    from takeoff._system import SystemMetrics
    from takeoff.client import Client
    from takeoff.models import ArtifactVersion

# How long finish waits for the last data to be delivered.
FLUSH_TIMEOUT_ENV = "TAKEOFF_FLUSH_TIMEOUT"
MODE_ENV = "TAKEOFF_MODE"
DIR_ENV = "TAKEOFF_DIR"
RESUME_ENV = "TAKEOFF_RESUME"
MODES = ("online", "offline", "disabled")
RESUME_MODES = {
    "never": runs_pb2.RESUME_MODE_NEVER,
    "allow": runs_pb2.RESUME_MODE_ALLOW,
    "must": runs_pb2.RESUME_MODE_MUST,
}
DEFAULT_TIMEOUT = 60.0
MAX_FINISH_MESSAGE = 4096
_PLAIN_TYPES = frozenset({float, int, str, bool})
"""Values ``run.log`` stores as they are, checked by one set lookup (the fast path)."""


class _Active:
    """The run this process reports to, between ``init`` and ``finish``."""

    run: Run | None = None


class ReadOnlyConfigError(TypeError):
    """A launched job tried to change a config key its launch set."""


class RunConfig(MutableMapping[str, Any]):
    """The run's config: the code's defaults overridden by the launch's. Launch-set keys are read-only.

    Changes to other keys are recorded in the run (``UpdateRunConfig``, sent in the background). As in
    wandb, keys read and write as attributes too: ``run.config.lr``.
    """

    def __init__(
        self,
        values: Mapping[str, Any],
        launched_keys: frozenset[str],
        record: Callable[[Mapping[str, Any]], None],
    ) -> None:
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_launched_keys", launched_keys)
        object.__setattr__(self, "_record", record)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.update({key: value})

    def __delitem__(self, key: str) -> None:
        self._refuse_launched([key])
        del self._values[key]
        self._record({key: None})  # a JSON null removes the key

    def update(self, other: Any = (), /, **more: Any) -> None:
        """Set several keys at once (from a mapping or, as in wandb, an ``argparse.Namespace``); refused
        whole, before any change, if one of them is launch-set."""
        changes = {**_config_dict(other), **more}
        for key in changes:
            if not isinstance(key, str) or not key:
                raise TypeError(f"config keys must be non-empty strings, not {key!r}")
        self._refuse_launched(changes)
        self._values.update(changes)
        self._record({key: jsonable(value) for key, value in changes.items()})

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"the run's config has no key {key!r}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"RunConfig({self._values!r})"

    def _refuse_launched(self, keys: Iterable[str]) -> None:
        for key in keys:
            if key in self._launched_keys:
                raise ReadOnlyConfigError(
                    f"config key {key!r} was set by the launch (TAKEOFF_CONFIG) and is read-only in this "
                    f"run; its value is {self._values[key]!r}. Launch with another value to change it."
                )


class RunSummary(MutableMapping[str, Any]):
    """Headline values of a run (``best_loss``...); each change is sent in the background.

    Without a value set here, the run's summary holds each metric's last value, or what
    ``run.define_metric`` asks for; those are computed while rows are delivered, so this mapping holds
    only the values the code set.
    """

    def __init__(self, delivery: Delivery, resumed: Mapping[str, Any] | None = None) -> None:
        # A resumed run starts from the summary of the run it continues; init stored it in the new run
        # (_online._attach: AttachRun returns it but does not copy it).
        self._values: dict[str, Any] = dict(resumed or {})
        self._delivery = delivery

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._values[key] = value
        self._delivery.update_summary({key: value})

    def __delitem__(self, key: str) -> None:
        del self._values[key]
        self._delivery.update_summary({key: None})  # a JSON null removes the key

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
        delivery: Delivery,
        *,
        mode: str,
        flush_timeout: float,
        resumed_from: runs_pb2.Run | None = None,
    ) -> None:
        self.path = run.name
        """The run's resource name, ``projects/{project}/runs/{id}``."""
        self.id = run.name.rsplit("/", 1)[-1]
        self.project = run.name.split("/")[1]
        self.name = run.display_name or self.id
        self.tags = tuple(run.tags)
        self.notes = run.notes
        self.group = run.group
        self.job_type = run.job_type
        self.mode = mode
        """``online``, ``offline`` or ``disabled``."""
        self.config = config
        self.resumed_from = resumed_from.name if resumed_from is not None else None
        """The run this one continues (``init(resume="allow"|"must")`` in a retried attempt), as
        ``projects/{p}/runs/{r}``; None when it starts afresh."""
        self.summary = RunSummary(delivery, struct_to_dict(resumed_from.summary) if resumed_from else None)
        self._delivery = delivery
        self._append = delivery.rows.append
        # The step of the row being built: rows written so far have smaller steps; a resumed run's go on
        # after the last step of the run it continues.
        if run.history_length:
            self._step = run.last_step + 1
        elif resumed_from is not None and resumed_from.history_length:
            self._step = resumed_from.last_step + 1
        else:
            self._step = 0
        self._pending: dict[str, Any] = {}
        """Values of the row at ``_step`` not yet written (``commit=False``, or an explicit step)."""
        self._pending_time = 0
        self._warned_backwards = False
        self._known_keys: set[str] = set()
        """Metric names checked once already. ``finish`` empties it for good, so that every later call
        takes ``_log``, which refuses it."""
        self._flush_timeout = flush_timeout
        self._finished = False
        self._finish_lock = threading.RLock()  # RLock: SIGTERM's handler may run while finish holds it
        self._pid = os.getpid()  # a forked child inherits this object, and exit handlers, but not the run
        self._previous_excepthook = sys.excepthook
        self._system_metrics: SystemMetrics | None = None
        self._client: Client | None = None
        self._client_lock = threading.Lock()

    @property
    def step(self) -> int:
        """The step the next ``run.log`` without ``step`` writes (in a resumed run, after the last step
        of the run it continues)."""
        return self._step

    def log(self, values: Mapping[str, Any], step: int | None = None, commit: bool | None = None) -> None:
        """Record metrics, e.g. ``{"loss": 0.4, "epoch": 2}``, as wandb does.

        Without ``step``, the values go into the current row, which is written (``commit``, the default)
        and the step advances by one; ``commit=False`` keeps adding to the row. With ``step``, rows go to
        that step: a later step writes the row before it, the current step adds to its row (written by
        ``commit=True``, the next step or ``finish``), an earlier step is warned about once and dropped.

        Values are numbers, strings, booleans, None, or lists and dicts of them (numpy and torch values
        via ``tolist()``); anything else is a TypeError naming the key, and nothing is recorded. The row is
        buffered and sent by a background thread: this call costs microseconds and never waits.
        """
        if step is None and commit is None and not self._pending and type(values) is dict and values:
            for value in values.values():
                if type(value) not in _PLAIN_TYPES:
                    break
            else:
                if self._known_keys.issuperset(values):
                    step = self._step
                    self._append((step, time.time_ns(), values.copy()))
                    self._step = step + 1
                    return
        self._log(values, step, commit)

    def define_metric(self, name: str, step_metric: str | None = None, *, summary: str | None = None) -> None:
        """How metric ``name`` is summarised (``"min"``, ``"max"``, ``"mean"``, ``"last"``, several joined
        by commas, or ``"none"``; the summary then holds ``{"min": ...}``), and which metric is its x axis:
        a row holding ``name`` but not ``step_metric`` gets ``step_metric``'s last value. A name ending in
        ``*`` covers every metric it prefixes (``"val/*"``)."""
        if not isinstance(name, str) or not name.rstrip("*"):
            raise ValueError(f"define_metric needs a metric name, not {name!r}")
        if summary:
            parse_summary(summary)
        self._delivery.define_metric(name, summary, step_metric)

    def finish(
        self, state: RunState | str | None = None, message: str = "", exit_code: int | None = None
    ) -> None:
        """Deliver everything buffered, then end the run: as ``state`` says, else FAILED for a nonzero
        ``exit_code`` (recorded in the run), else FINISHED.

        Waits at most ``TAKEOFF_FLUSH_TIMEOUT`` seconds (default 60) for an unreachable registry, then gives
        up with a warning; it never raises because of the registry.
        """
        final = _final_state(state, exit_code)
        with self._finish_lock:
            if self._finished or os.getpid() != self._pid:
                return
            self._commit()
            self._finished = True
            self._known_keys.clear()
        attributes: dict[str, Any] = {"takeoff.run_state": final.value}
        with _trace.span("takeoff.finish", **attributes):
            if _Active.run is self:
                _Active.run = None
            self._remove_hooks()
            if self._system_metrics is not None:
                self._system_metrics.stop()
            request = runs_pb2.FinishRunRequest(
                name=self.path,
                state=final._to_proto(),
                message=message[:MAX_FINISH_MESSAGE],
                exit_code=exit_code,
            )
            self._delivery.close(request, timeout=self._flush_timeout)
        _trace.flush()  # the job's spans go now: the process may exit right after
        if self._client is not None:
            self._client.close()

    def log_artifact(
        self,
        path: str | os.PathLike[str],
        name: str | None = None,
        type: str = "unspecified",
        aliases: Iterable[str] = (),
        metadata: Mapping[str, Any] | None = None,
    ) -> ArtifactVersion | None:
        """Store a file or a directory as the next version of the artifact ``name`` (default: the file's
        or directory's name) in the run's project, as this run's output, and point ``latest`` and
        ``aliases`` at it (as wandb's ``log_artifact``).

        It blocks until the version is stored, so a checkpoint logged is durable when it returns: a job
        killed right after can resume from it. Files are hashed as they are read and only contents the
        project lacks are sent; the same contents logged again return the existing version
        (``already_existed``). In a launched job this is allowed only for the job's own run (its run
        token). Offline runs cannot log artifacts (a RuntimeError says so); disabled runs return None.
        """
        if self.mode == "disabled":
            return None
        artifact = name or _artifact_name(path)
        return self._artifact_client("log_artifact").log_artifact(
            path,
            artifact,
            type=type,
            run=self.path,
            aliases=list(aliases),
            metadata=jsonable(dict(metadata)) if metadata else None,
        )

    def use_artifact(self, reference: str) -> ArtifactVersion | None:
        """The artifact version ``reference`` names (``ckpt:latest``, ``ckpt:v3``, ``ckpt:best``, ``ckpt``
        for latest, or a full name), recorded as used by this run (lineage); ``.download()`` on it puts its
        files in a directory, through the local cache, and returns the directory::

            if run.resumed_from:
                checkpoint = run.use_artifact("ckpt:latest").download() / "model.pt"

        Offline runs cannot use artifacts (a RuntimeError says so); disabled runs return None.
        """
        if self.mode == "disabled":
            return None
        return self._artifact_client("use_artifact").use_artifact(reference, run=self.path)

    def _artifact_client(self, method: str) -> Client:
        """A client of the registry with the run's credentials (in a launched job, its run token), made on
        first use: a run that never logs an artifact never loads the client."""
        if self._finished:
            raise RuntimeError(f"run {self.id} is finished; call run.{method}() before run.finish()")
        if self.mode != "online":
            raise RuntimeError(
                f"run.{method}() needs the registry, and this run is {self.mode}: artifacts are stored by "
                "the registry only (`takeoff sync` uploads metrics, not files); run online to use them"
            )
        with self._client_lock:
            if self._client is None:
                from takeoff.client import Client  # imported here: `init` stays light (design §8)

                self._client = Client(project=self.project)
            return self._client

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
        return f"Run(id={self.id!r}, project={self.project!r}, name={self.name!r}, mode={self.mode!r})"

    def _log(self, values: Mapping[str, Any], step: int | None, commit: bool | None) -> None:
        """``log`` for whatever the fast path does not take: checks come before any change, so a refused
        call changes nothing, and does not use up a step."""
        if self._finished:
            raise RuntimeError(f"run {self.id} is finished; call takeoff.init() for a new run")
        row = _checked_row(values)
        self._known_keys.update(row)
        if step is not None:
            step = operator.index(step)
            if step < 0:
                raise ValueError(f"step must be >= 0, got {step}")
            if step < self._step:
                self._warn_backwards(step)
                return
            if step > self._step:
                self._commit()
                self._step = step
        elif commit is None:
            commit = True
        if not self._pending:
            self._pending_time = time.time_ns()
        self._pending.update(row)
        if commit:
            self._commit()

    def _commit(self) -> None:
        """Write the row being built, if it holds anything, and move to the next step."""
        if self._pending:
            self._append((self._step, self._pending_time, self._pending))
            self._pending = {}
            self._step += 1

    def _warn_backwards(self, step: int) -> None:
        if not self._warned_backwards:
            self._warned_backwards = True
            warn(
                f"run.log(step={step}) is before the current step {self._step}; steps only go forward, so "
                "such rows are dropped (said once per run)"
            )

    def _emit_system_metrics(self, values: Mapping[str, float]) -> None:
        """A row of ``system/*`` values at the last step logged, so they line up with the run's metrics
        and the run's last step stays the code's."""
        self._append((max(self._step - 1, 0), time.time_ns(), dict(values)))

    def _install_hooks(self, directory: str | os.PathLike[str]) -> None:
        """What a run that records something needs: finish at exit, on an uncaught exception and on
        SIGTERM, and system metrics."""
        atexit.register(self.finish)
        if not _interactive():  # in a REPL an uncaught exception does not end the program
            sys.excepthook = self._excepthook
        # Only where nobody handles SIGTERM: a handler of the code's own (or a framework's) stays in charge.
        in_main_thread = threading.current_thread() is threading.main_thread()
        if in_main_thread and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        from takeoff._system import start_system_metrics  # imported here: `import takeoff` stays light

        self._system_metrics = start_system_metrics(self._emit_system_metrics, directory)

    def _remove_hooks(self) -> None:
        atexit.unregister(self.finish)
        if sys.excepthook == self._excepthook:
            sys.excepthook = self._previous_excepthook
        in_main_thread = threading.current_thread() is threading.main_thread()
        if in_main_thread and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def _on_sigterm(self, signum: int, _: FrameType | None) -> None:
        """Finish KILLED, everything logged delivered, then die of the signal as if it had not been caught."""
        self.finish(RunState.KILLED, "terminated by SIGTERM")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def _excepthook(
        self, kind: type[BaseException], error: BaseException, trace: TracebackType | None
    ) -> None:
        self._previous_excepthook(kind, error, trace)
        self.finish(_state_for(kind), _exception_summary(kind, error))


def init(
    project: str | None = None,
    config: Mapping[str, Any] | argparse.Namespace | None = None,
    name: str | None = None,
    *,
    tags: Iterable[str] | None = None,
    notes: str | None = None,
    group: str | None = None,
    job_type: str | None = None,
    dir: str | os.PathLike[str] | None = None,  # wandb's name for it
    mode: str | None = None,
    resume: str | None = None,
) -> Run:
    """Start reporting this process as a run and return it.

    ``config`` (a mapping or an ``argparse.Namespace``) holds the code's defaults. In a launched job
    (``TAKEOFF_RUN_ID`` set) this attaches to the run the agent created, in the launch's project, and the
    launch config (``TAKEOFF_CONFIG``) overrides the defaults; ``init`` says once on stderr what the launch
    overrode. Elsewhere it creates a run in
    ``project`` (else ``TAKEOFF_PROJECT``, else ``default``). ``tags``, ``notes``, ``group`` and
    ``job_type`` describe the run, as in wandb.

    ``mode`` (else ``TAKEOFF_MODE``): ``online`` (the default) reports to the registry; ``offline`` writes
    the run under ``dir`` (else ``TAKEOFF_DIR``, else the working directory) for ``takeoff sync`` to upload;
    ``disabled`` makes every call a no-op (``run.config`` still works).

    ``resume`` (else ``TAKEOFF_RESUME``, else ``never``): in a retried attempt of a launch, ``allow`` and
    ``must`` continue the run of the item's previous attempt: ``run.resumed_from`` names it, the next
    ``run.log`` goes after its last step and ``run.summary`` starts from its summary; the job finds its
    last checkpoint with ``run.use_artifact("ckpt:latest")``. ``must`` raises
    :class:`takeoff.FailedPreconditionError` (``NOTHING_TO_RESUME``) when there is nothing to continue
    (a first attempt, a run outside a launch, an offline run). Disabled runs resume nothing.

    While the registry is unreachable it retries for ``TAKEOFF_INIT_TIMEOUT`` seconds (default 60 in a
    launched job, 5 elsewhere), then raises :class:`takeoff.UnavailableError` naming the address.
    It presents the key ``takeoff.Client`` finds (in a launched job, the run token ``TAKEOFF_TOKEN``) and
    uses TLS as the client does (``TAKEOFF_TLS_CA_FILE``; never on a ``unix:`` address).
    Calling it again while a run is active returns that run.
    """
    if _Active.run is not None:
        return _Active.run
    with _trace.span("takeoff.init"):
        chosen_mode = _mode(mode)
        resume_mode = _resume_mode(resume)
        tag_list = list(tags or ())
        if isinstance(tags, str) or not all(isinstance(tag, str) for tag in tag_list):
            raise TypeError(f"tags is a list of strings, not {tags!r}")
        launched = bool(os.environ.get("TAKEOFF_RUN_ID"))
        launched_config = _launch_config()
        defaults = _config_dict(config or {})
        values = {**defaults, **launched_config}
        if launched:
            _say_what_the_launch_overrides(project, defaults, launched_config)
        wanted = runs_pb2.Run(
            display_name=name or "",
            tags=tag_list,
            notes=notes or "",
            group=group or "",
            job_type=job_type or "",
            config=dict_to_struct(values),
        )
        # A str, not a Path: a launched job is spared pathlib's import (docs/design.md §8).
        directory = dir or os.environ.get(DIR_ENV) or os.getcwd()
        if resume_mode == runs_pb2.RESUME_MODE_MUST and chosen_mode != "disabled":
            _refuse_nothing_to_resume(chosen_mode, launched)
        attached, delivery, resumed_from = _open_run(
            chosen_mode, _project(project, launched), wanted, launched, directory, resume=resume_mode
        )
        config_view = RunConfig(values, frozenset(launched_config), delivery.update_config)
        run = Run(
            attached,
            config_view,
            delivery,
            mode=chosen_mode,
            flush_timeout=_flush_timeout(),
            resumed_from=resumed_from,
        )
        if chosen_mode != "disabled":
            run._install_hooks(directory)
        _Active.run = run
    return run


def log(values: Mapping[str, Any], step: int | None = None, commit: bool | None = None) -> None:
    """``run.log`` on the run ``takeoff.init()`` started."""
    _active("log").log(values, step, commit)


def define_metric(name: str, step_metric: str | None = None, *, summary: str | None = None) -> None:
    """``run.define_metric`` on the run ``takeoff.init()`` started."""
    _active("define_metric").define_metric(name, step_metric, summary=summary)


def log_artifact(
    path: str | os.PathLike[str],
    name: str | None = None,
    type: str = "unspecified",
    aliases: Iterable[str] = (),
    metadata: Mapping[str, Any] | None = None,
) -> ArtifactVersion | None:
    """``run.log_artifact`` on the run ``takeoff.init()`` started."""
    return _active("log_artifact").log_artifact(path, name, type, aliases, metadata)


def use_artifact(reference: str) -> ArtifactVersion | None:
    """``run.use_artifact`` on the run ``takeoff.init()`` started."""
    return _active("use_artifact").use_artifact(reference)


def finish(state: RunState | str | None = None, message: str = "", exit_code: int | None = None) -> None:
    """``run.finish`` on the run ``takeoff.init()`` started, if there is one."""
    if _Active.run is not None:
        _Active.run.finish(state, message, exit_code)


def current_run() -> Run | None:
    """The run ``takeoff.init()`` started in this process and not yet finished."""
    return _Active.run


def active_attribute(name: str) -> Any:
    """``takeoff.run``, ``takeoff.config`` and ``takeoff.summary``: the active run's, read at each use.

    Before ``init`` (and after ``finish``) ``takeoff.run`` is None and the others are placeholders that
    raise on use, saying to call ``takeoff.init()`` first, as wandb's do.
    """
    run = _Active.run
    if name == "run":
        return run
    return _NotStarted(name) if run is None else getattr(run, name)


class _NotStarted:
    """``takeoff.config`` or ``takeoff.summary`` before ``init``: any use says what to do."""

    def __init__(self, name: str) -> None:
        self._name = name

    def _refuse(self, *_: Any) -> Any:
        raise RuntimeError(f"call takeoff.init() before using takeoff.{self._name}")

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):  # what copy, pickle and hasattr probe for
            raise AttributeError(key)
        return self._refuse()

    __getitem__ = __setitem__ = __delitem__ = __iter__ = __len__ = __contains__ = _refuse

    def __repr__(self) -> str:
        return f"<takeoff.{self._name}: no run yet, call takeoff.init()>"


def _active(function: str) -> Run:
    if _Active.run is None:
        raise RuntimeError(f"call takeoff.init() before takeoff.{function}()")
    return _Active.run


def _open_run(
    mode: str,
    project: str,
    wanted: runs_pb2.Run,
    launched: bool,
    directory: str | os.PathLike[str],
    *,
    resume: runs_pb2.ResumeMode.ValueType,
) -> tuple[runs_pb2.Run, Delivery, runs_pb2.Run | None]:
    """The run as ``mode``'s delivery starts it, that delivery, and the run it resumes (online only)."""
    if mode == "disabled":
        wanted.name = f"projects/{project}/runs/{os.urandom(6).hex()}"
        return wanted, DisabledDelivery(), None
    if mode == "offline":
        from takeoff._offline import open_offline_run  # imported here: only offline runs need it

        return (*open_offline_run(directory, project, wanted), None)
    from takeoff._online import open_online_run  # imported here: offline and disabled runs need no gRPC

    return open_online_run(project, wanted, launched, resume)


def _resume_mode(resume: str | None) -> runs_pb2.ResumeMode.ValueType:
    chosen = resume or os.environ.get(RESUME_ENV) or "never"
    if chosen not in RESUME_MODES:
        source = "resume" if resume else RESUME_ENV
        raise ValueError(f"{source} must be one of {', '.join(RESUME_MODES)}, not {chosen!r}")
    return RESUME_MODES[chosen]


def _refuse_nothing_to_resume(mode: str, launched: bool) -> None:
    """``resume="must"`` where no earlier attempt can exist: said before any run is made."""
    if mode == "offline":
        why = "an offline run resumes nothing (the previous attempt's run is in the registry)"
    elif not launched:
        why = (
            "a run outside a launch resumes nothing (only a retried attempt of a queue item continues a run)"
        )
    else:
        return
    from takeoff.errors import FailedPreconditionError

    raise FailedPreconditionError("FAILED_PRECONDITION", "NOTHING_TO_RESUME", f'init(resume="must"): {why}')


def _artifact_name(path: str | os.PathLike[str]) -> str:
    """An artifact id from a file's or directory's name: letters, digits, ``-``, ``_`` and ``.`` kept,
    anything else made ``-``."""
    from pathlib import Path  # here: a job that logs no artifact is spared its import

    named = Path(path).resolve().name
    name = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "-" for c in named)
    return name.lstrip("-_.")[:128] or "artifact"


def _mode(mode: str | None) -> str:
    chosen = mode or os.environ.get(MODE_ENV) or "online"
    if chosen not in MODES:
        source = "mode" if mode else MODE_ENV
        raise ValueError(f"{source} must be one of {', '.join(MODES)}, not {chosen!r}")
    return chosen


def _project(project: str | None, launched: bool) -> str:
    """The run's project: a launched job's is the launch's (TAKEOFF_PROJECT)."""
    return default_project() if launched else project or default_project()


def _say_what_the_launch_overrides(
    project: str | None, defaults: Mapping[str, Any], launched_config: Mapping[str, Any]
) -> None:
    overridden = []
    if project and project != default_project():
        overridden.append(f"project {project!r} (the run is in {default_project()!r})")
    overridden.extend(
        f"config {key}={defaults[key]!r} (launched with {value!r})"
        for key, value in launched_config.items()
        if key in defaults and defaults[key] != value
    )
    if overridden:
        warn(f"the launch overrides what init() was given: {'; '.join(overridden)}")


def _checked_row(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` as JSON values (numpy and torch values through ``tolist()``), or TypeError naming the
    key whose value is not a number, string, boolean, None, or list or dict of them."""
    if not isinstance(values, Mapping):
        raise TypeError(f"run.log takes a dict of metric names to values, not {_type_name(values)}")
    row = {}
    for key, value in values.items():
        if type(key) is not str or not key:
            raise TypeError(f"metric names are non-empty strings, not {key!r}")
        row[key] = _plain(value, key)
    return row


def _plain(value: Any, where: str) -> Any:
    kind = type(value)
    if kind in _PLAIN_TYPES or value is None:
        return value
    for plain_type in (bool, int, float, str):  # subclasses (numpy.float64, enums) become the plain type
        if isinstance(value, plain_type):
            return plain_type(value)
    if isinstance(value, list | tuple):
        return [_plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, Mapping):
        plain = {}
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"run.log value {where!r} has a key {key!r}: keys of dicts are strings")
            plain[key] = _plain(item, f"{where}.{key}")
        return plain
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars, torch tensors
    if callable(tolist):
        return _plain(tolist(), where)
    raise TypeError(
        f"run.log value {where!r} has type {_type_name(value)}: log numbers, strings, booleans, None, "
        "or lists and dicts of them"
    )


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _final_state(state: RunState | str | None, exit_code: int | None) -> RunState:
    if exit_code is not None:
        exit_code = operator.index(exit_code)
    if state is None:
        return RunState.FAILED if exit_code else RunState.FINISHED
    final = RunState(str(state).upper())
    if not final.ended:
        raise ValueError(f"a run finishes as FINISHED, FAILED, CRASHED or KILLED, not {final}")
    return final


def _config_dict(config: Any) -> dict[str, Any]:
    """A config given as a mapping, pairs, or an object of attributes such as ``argparse.Namespace``."""
    if not isinstance(config, Mapping) and hasattr(config, "__dict__"):
        return dict(vars(config))
    return dict(config)


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


def _flush_timeout() -> float:
    return seconds_from_env(FLUSH_TIMEOUT_ENV, DEFAULT_TIMEOUT)


def seconds_from_env(variable: str, default: float) -> float:
    text = os.environ.get(variable)
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{variable} must be a number of seconds, not {text!r}") from None


def _state_for(kind: type[BaseException]) -> RunState:
    return RunState.KILLED if issubclass(kind, KeyboardInterrupt) else RunState.FAILED


def _exception_summary(kind: type[BaseException], error: BaseException | None) -> str:
    import traceback  # here: every job pays for what init imports, and only a failing one needs this

    return "".join(traceback.format_exception_only(kind, error)).strip()


def _interactive() -> bool:
    return hasattr(sys, "ps1") or bool(sys.flags.interactive)
