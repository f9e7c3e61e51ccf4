"""The supervisor of one job, forked for it by the shims' fork server (``serve_forks``: ``python -I -S
shim.py``, which the agent starts once and asks for each shim, runners/shims.py).

It outlives the agent (own session), so a job survives an agent restart, and leaves in LEASE_DIR all
an agent needs to take the job back or learn how it ended:

- ``spec.json`` (written by the agent): what to run. A local process: argv, env, cwd, and for a
  multi-node launch ``ranks``, each rank's variables over env (one process per rank, all on this host). A
  container (``"mode": "container"``): the container the agent created, the engine it is on;
- ``stdout.log``, ``stderr.log``: the job's output, appended as it comes (a container's, followed from
  the engine); ``stdout.rank{r}.log``, ``stderr.rank{r}.log`` for each rank of a multi-node launch;
- ``shim.json``: the shim's pid and the job's pid (= its process group; ``rank_pids``: one per rank), or
  the container's id once the shim has started it (``"started": true``) or found it could not;
- ``shim.lock``: held (``flock``) by a container's shim as long as it lives;
- ``exit.json``: how the job ended: exit code, or the signal that killed it, whether the shim stopped it
  because the agent's lease ran out, whether the kernel killed it for memory (a container's
  ``State.OOMKilled``), the rank that failed first in a multi-node launch (whose failure stops the other
  ranks), or a failure of the runner's own (written last, atomically).

Self-fencing: the agent writes the time its leases are good until to ``lease_until`` whenever it renews
them. If that time passes (the agent is dead or cut off from the queue), the shim stops the job: a lost
agent's job and the next attempt never run side by side for long. A container is stopped (SIGTERM,
grace, SIGKILL) and, like every container the shim owns once it has ended, removed.

Every local job pays for this process, so a local process's shim imports only what it cannot do without
(``os``, ``signal``, ``time``, ``json``): the fork server runs as ``python -I -S shim.py``, without site
packages, and a shim starts the job with ``fork`` and ``exec`` rather than ``subprocess`` and waits with
``sigtimedwait`` rather than a thread per process (docs/design.md §7, "The shim and the lease directory").
"""

from __future__ import annotations

# The C half of ``json`` (and, below, of ``signal``): the modules themselves import re and enum, which
# cost a shim more CPU than all the rest of its work (bench/job_cpu.py). CPython's, as the agent's.
import _json
import os
import sys
import time

TYPE_CHECKING = False  # typing itself is not imported: the shim's start is paid by every job
if not TYPE_CHECKING:
    import _signal as signal
else:
    import signal
    from collections.abc import Callable, Collection
    from types import TracebackType
    from typing import Any

FENCE_CHECK_SECONDS = 0.5
LAPSE_MARGIN_SECONDS = 0.01
"""Looked at this long past the lease's end, so that the look finds it lapsed."""
STOP_GRACE_SECONDS = 10.0
STOPPING = "stopping"
"""Written by the agent before it stops a local job (SIGTERM to each group, SIGKILL after the grace): the
shim, stopping what is left once a rank has ended of it, sends no second SIGTERM, which a job still
shutting down from the first (a checkpoint, the SDK's last delivery) may take as "die now"."""
SHIM_LOCK = "shim.lock"
"""Held (flock) by the shim of a container for as long as it lives: one shim per job, and a sign of life
that a reused pid cannot fake."""
EXEC_FAILED = 127
"""The exit code recorded for a job that could not be started (as a shell's for a missing command)."""
_RESET_IN_JOB = (signal.SIGPIPE, signal.SIGXFSZ)
"""Ignored by Python at start; a job gets them at their defaults, as ``subprocess`` gives them."""
WARM_IMPORTS = ("atexit", "runpy", "threading", "types", "takeoff._online", "takeoff._relay")
"""What a warm interpreter imports before its first fork: what running a job in it takes, and what a job's
``takeoff.init()`` loads to reach its run through the agent's relay. One that fails (a venv whose packages
break the SDK) is left for the job to import, as it would have."""
_warm_start: dict[str, str] | None = None
"""In a warm interpreter (``serve_warm_forks``): the variables its start read (``start_variables``)."""
_added_at_start: dict[str, str] = {}
"""What a warm interpreter's start added to its environment (PEP 538's ``LC_CTYPE``, in the C locale): an
interpreter of the job's own would have added it to the job's."""
_imported_at_start: frozenset[str] = frozenset()
"""The top-level names of what a warm interpreter imported before its first fork."""


START_PREFIXES = ("PYTHON", "LC_", "LD_", "MALLOC_", "PROTOCOL_BUFFERS_")
"""The variables a process's start reads and keeps: the interpreter's (``PYTHON*``), the locale's, the
dynamic loader's (``LD_LIBRARY_PATH``, ``LD_PRELOAD``), glibc's malloc's, and protobuf's (read when the warm
interpreter imports it)."""


def start_variables(env: dict[str, str]) -> dict[str, str]:
    """What of an environment a process's start reads and keeps (START_PREFIXES, ``LANG``,
    ``GLIBC_TUNABLES``): a job runs in a warm interpreter only where these agree."""
    return {
        name: value
        for name, value in env.items()
        if name.startswith(START_PREFIXES) or name in ("LANG", "GLIBC_TUNABLES")
    }


def write_atomically(path: str | os.PathLike[str], data: object) -> None:
    import json  # the agent's writes: the shim's own are records of _record_text

    _write_text(path, json.dumps(data))


def _write_text(path: str | os.PathLike[str], text: str) -> None:
    partial = f"{os.fspath(path)}.partial"
    with open(partial, "w") as file:
        file.write(text)
    os.replace(partial, path)


def _record_text(record: dict[str, int | bool | list[int] | None]) -> str:
    """The JSON of one of the shim's records (``shim.json``, ``exit.json``): names to integers, booleans,
    nulls and lists of integers, all ``json.dumps`` would write alike."""

    def value(item: int | bool | list[int] | None) -> str:
        if item is None or isinstance(item, bool):
            return {None: "null", True: "true", False: "false"}[item]
        if isinstance(item, list):
            return "[" + ", ".join(str(int(number)) for number in item) + "]"
        return str(int(item))

    return "{" + ", ".join(f'"{name}": {value(item)}' for name, item in record.items()) + "}"


class _Decoding:
    """What json's C scanner reads off a ``json.JSONDecoder``, set as ``json.loads`` sets it."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # "NaN", "Infinity", "-Infinity"
    memo: dict[str, str] = {}


def read_spec(lease_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``spec.json``, as ``json.loads`` reads it (the agent wrote it with ``json.dumps``)."""
    with open(os.path.join(lease_dir, "spec.json")) as file:
        text = file.read()
    # typeshed wants a scanner for the context; the C scanner takes any object with _Decoding's attributes
    spec, end = _json.make_scanner(_Decoding())(text, 0)  # type: ignore[arg-type]
    if not isinstance(spec, dict) or text[end:].strip():
        raise ValueError(f"{os.path.join(lease_dir, 'spec.json')} holds no JSON object")
    return spec


def write_private(path: str | os.PathLike[str], data: object) -> None:
    """``write_atomically``, readable by the agent's user only: the job's secrets are in it."""
    import json

    partial = f"{os.fspath(path)}.partial"
    if os.path.lexists(partial):  # a partial file left by a crash keeps its mode otherwise
        os.unlink(partial)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(data, file)
    os.replace(partial, path)


def lease_until(lease_dir: str | os.PathLike[str]) -> float | None:
    try:
        with open(os.path.join(lease_dir, "lease_until")) as file:
            return float(file.read())
    except (OSError, ValueError):
        return None


def lease_lapsed(lease_dir: str | os.PathLike[str]) -> bool:
    until = lease_until(lease_dir)
    return until is not None and time.time() > until


def until_fence_check(lease_dir: str | os.PathLike[str]) -> float:
    """Seconds until the fence is looked at again: ``FENCE_CHECK_SECONDS``, or just past the lease's end
    when that comes sooner, so that a job is stopped as its lease lapses, not up to a check later (the
    agent's lead before the queue's expiry, lease.FENCE_LEAD_SECONDS, is then all margin)."""
    until = lease_until(lease_dir)
    if until is None:
        return FENCE_CHECK_SECONDS
    return min(FENCE_CHECK_SECONDS, max(0.0, until - time.time()) + LAPSE_MARGIN_SECONDS)


def stop_groups(
    pgids: Collection[int],
    grace: float,
    *,
    terminated: bool = False,
    reap: Callable[[], object] | None = None,
) -> None:
    """SIGTERM the job's process groups (one per rank), then SIGKILL those still there after ``grace``;
    ``terminated``: they have had their SIGTERM (the agent's), only the SIGKILL is left to send. A group
    whose leader has exited is gone once the leader is reaped: the shim, whose children the leaders are,
    passes ``reap``, called before each look. With no ``grace`` only the SIGKILL is sent: a SIGTERM with no
    time to act on would only race it, and a handler that won (the SDK's) would report a graceful stop."""
    if reap is not None:
        reap()
    first = 0 if terminated or grace <= 0 else signal.SIGTERM
    alive = [pgid for pgid in pgids if _signal_group(pgid, first)]
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        if reap is not None:
            reap()
        alive = [pgid for pgid in alive if _signal_group(pgid, 0)]
    for pgid in alive:
        _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, signal_number: int) -> bool:
    """Send ``signal_number`` (0: none, a check) to a process group; whether the group was there."""
    try:
        os.killpg(pgid, signal_number)
    except ProcessLookupError:
        return False
    return True


def output_files(rank: int | None) -> tuple[str, str]:
    """Where in the lease directory the stdout and the stderr of a job go, or of one rank of a multi-node
    launch (a file per rank, so that each line keeps its rank and no rank's half line splits another's)."""
    label = "" if rank is None else f".rank{rank}"
    return f"stdout{label}.log", f"stderr{label}.log"


class Ranks:
    """The job's processes (one, or one per rank), children of the shim, each leading a process group of
    its own: reaped as they end, in the order they end."""

    def __init__(self, *, sigchld_ignored: bool = False) -> None:
        self.sigchld_ignored = sigchld_ignored
        """The shim was started with SIGCHLD ignored: its jobs are too, as ``subprocess`` passes it on."""
        self.pids: list[int] = []
        self.returncodes: dict[int, int] = {}
        """Index -> return code (``-n``: killed by signal n, as in ``subprocess``), in the order reaped."""

    def reap(self) -> None:
        for index, pid in enumerate(self.pids):
            if index not in self.returncodes:
                reaped, status = os.waitpid(pid, os.WNOHANG)
                if reaped:
                    self.returncodes[index] = os.waitstatus_to_exitcode(status)

    def wait_all(self) -> list[int]:
        for index, pid in enumerate(self.pids):
            if index not in self.returncodes:
                self.returncodes[index] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        return [self.returncodes[index] for index in range(len(self.pids))]


def spawn(
    argv: list[str], cwd: str, env: dict[str, str], stdout: int, stderr: int, *, sigchld_ignored: bool = False
) -> int:
    """Start ``argv`` as ``subprocess.Popen`` would with ``start_new_session``, stdin from /dev/null and
    SIGPIPE and SIGXFSZ at their defaults; raise the OSError that kept it from starting (``chdir`` or
    ``exec``), passed back through a close-on-exec pipe. The job must not inherit the shim's blocked
    SIGCHLD: the mask the shim started with is restored first."""
    read_end, write_end = os.pipe()  # both close on exec (PEP 446)
    stdin = os.open(os.devnull, os.O_RDONLY)
    pid = os.fork()
    if pid == 0:  # the child: nothing here may return into the shim's code
        try:
            os.close(read_end)
            os.setsid()
            os.dup2(stdin, 0)
            os.dup2(stdout, 1)
            os.dup2(stderr, 2)
            os.chdir(cwd)
            main = _main_here(argv, env)
            if main is None:
                for reset in _RESET_IN_JOB:
                    signal.signal(reset, signal.SIG_DFL)
            if sigchld_ignored:
                signal.signal(signal.SIGCHLD, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGCHLD,))
            if main is not None:
                for fd in (write_end, stdin, stdout, stderr):  # the exec would have closed them
                    os.close(fd)
                _run_here(*main, env)
            os.execvpe(argv[0], argv, env)
        except OSError as error:
            os.write(write_end, f"{error.errno}:{error.strerror}".encode(errors="replace"))
        except BaseException as error:  # the job's start failed, said as such
            os.write(write_end, f"0:{error!r}".encode(errors="replace"))
        finally:
            os._exit(EXEC_FAILED)
    os.close(write_end)
    os.close(stdin)
    with os.fdopen(read_end, "rb") as pipe:
        failure = pipe.read()
    if failure:
        os.waitpid(pid, 0)
        number, _, text = failure.decode(errors="replace").partition(":")
        raise OSError(int(number), text)
    return pid


def warm_startable(env: dict[str, str]) -> bool:
    """Whether a warm interpreter's start could have read ``env`` as the job's own would: not with a
    relative ``PYTHONPATH`` entry, which ``site`` made absolute against the warm interpreter's working
    directory, not the job's."""
    entries = env.get("PYTHONPATH", "")
    return not entries or all(os.path.isabs(entry) for entry in entries.split(os.pathsep))


def _main_here(argv: list[str], env: dict[str, str]) -> tuple[str, str, list[str]] | None:
    """How a job runs in this warm interpreter instead of an interpreter of its own: ``("-m", module,
    args)``, ``("-c", command, args)`` or ``("", script, args)``. None (exec it) outside a warm interpreter,
    for a command that is not this interpreter with a script, ``-m`` or ``-c`` and no options, for a
    script that is not Python source (a zipapp, a ``.pyc``), for an environment its start would have read
    otherwise, and for a job whose first ``sys.path`` entry holds a module of the name of one imported
    already (its own ``random.py``), which it would have imported instead."""
    if _warm_start is None or len(argv) < 2 or argv[0] != sys.executable:
        return None
    if start_variables(env) != _warm_start or not warm_startable(env):
        return None
    if argv[1] in ("-m", "-c"):
        main = (argv[1], argv[2], argv[3:]) if len(argv) > 2 else None
        first_path = "."
    elif argv[1].startswith("-") or not os.path.isfile(argv[1]):
        return None  # an option, or a script the interpreter would refuse in words of its own
    else:
        with open(argv[1], "rb") as file:
            head = file.read(4)
        if head == b"PK\x03\x04" or head == _pyc_magic():
            return None
        main = ("", argv[1], argv[2:])
        first_path = os.path.dirname(os.path.realpath(argv[1]))
    shadowing = {entry.partition(".")[0] for entry in os.listdir(first_path)} & _imported_at_start
    return None if shadowing else main


def _pyc_magic() -> bytes:
    import importlib.util  # the warm interpreter's start imported it

    return importlib.util.MAGIC_NUMBER


def _run_here(how: str, target: str, args: list[str], env: dict[str, str]) -> None:
    """Run a job as ``python [-m|-c] target args`` would, in this fork of a warm interpreter, and exit as
    it would; never returns (docs/design.md §7 "Warm interpreters").

    What the interpreter's start sets: the environment, ``sys.argv``, ``sys.path[0]``, a fresh
    ``__main__`` with the globals it has, standard streams on the job's files; the code compiled with
    none of the shim's ``__future__`` flags. At the end, what ``Py_FinalizeEx`` does, in its order: wait
    for the threads that are not daemons, run the ``atexit`` handlers (an exception in either is reported
    and ignored), clear ``__main__`` and collect (unclosed files are flushed as they close), flush the
    standard streams; the exit status an uncaught ``SystemExit`` gives, and SIGINT for an uncaught
    KeyboardInterrupt."""
    status, interrupted = 1, False
    try:
        main = _enter_job(how, target, args, env)
        try:
            if how == "-m":
                import runpy

                runpy._run_module_as_main(target)  # type: ignore[attr-defined]  # what ``python -m`` calls
            else:
                _exec_main(how, getattr(main, "__file__", target), main)
            status = 0
        except SystemExit as exit:
            status = _exit_status(exit.code)
        except BaseException as error:
            error.with_traceback(_job_frames(error.__traceback__))  # the hook prints the error's own
            sys.excepthook(type(error), error, error.__traceback__)
            interrupted = isinstance(error, KeyboardInterrupt)
        status = _finalize(status)
    except BaseException as error:  # the shim's own failure, said where the job's errors go
        sys.excepthook(type(error), error, error.__traceback__)
    finally:
        if interrupted:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(status)


def _enter_job(how: str, target: str, args: list[str], env: dict[str, str]) -> Any:
    """The process made the job's, as the interpreter's start would make it; its ``__main__``."""
    import builtins
    import io
    import types
    from importlib.machinery import BuiltinImporter, SourceFileLoader

    os.environ.clear()
    os.environ.update({**env, **_added_at_start})
    time.tzset()
    # The streams as the start makes them (their modes from the warm interpreter's: the same start
    # variables), on the job's files: made for pipes, they would not seek.
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        old = getattr(sys, name)
        unbuffered = isinstance(old.buffer, io.FileIO)  # -u or PYTHONUNBUFFERED, for stdout and stderr
        mode = "rb" if fd == 0 else "wb"
        buffer = open(fd, mode, buffering=0 if unbuffered else -1, closefd=False)  # noqa: SIM115 - the job's
        stream = io.TextIOWrapper(
            buffer,
            encoding=old.encoding,
            errors=old.errors,
            newline="\n",
            line_buffering=old.line_buffering,
            write_through=old.write_through,
        )
        (buffer if unbuffered else buffer.raw).name = f"<{name}>"  # type: ignore[attr-defined,misc]
        stream.mode = "r" if fd == 0 else "w"  # type: ignore[misc]
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    main = types.ModuleType("__main__")
    main.__annotations__ = {}
    main.__builtins__ = builtins  # type: ignore[attr-defined]
    sys.modules["__main__"] = main
    if how == "-m":
        sys.argv = ["-m", *args]  # runpy puts the module's path in place of "-m"
        first_path = os.getcwd()
    elif how == "-c":
        sys.argv = ["-c", *args]
        first_path = ""
        main.__loader__ = BuiltinImporter
    else:
        sys.argv = [target, *args]
        first_path = os.path.dirname(os.path.realpath(target))
        main.__file__ = os.path.join(os.getcwd(), target)  # absolute, as since Python 3.9 (target if it is)
        main.__cached__ = None  # type: ignore[attr-defined]
        main.__loader__ = SourceFileLoader("__main__", main.__file__)
    if not sys.flags.safe_path:  # PYTHONSAFEPATH, a start variable: the warm interpreter's is the job's
        sys.path.insert(0, first_path)
    return main


def _job_frames(traceback: TracebackType | None) -> TracebackType | None:
    """A job's traceback without the shim's frames above its code, as the interpreter would show it."""
    while traceback is not None and traceback.tb_frame.f_code.co_filename == __file__:
        traceback = traceback.tb_next
    return traceback


def _exec_main(how: str, target: str, main: Any) -> None:
    if how == "-c":
        source: str | bytes = target
        filename = "<string>"
    else:
        with open(target, "rb") as file:
            source = file.read()
        filename = target
    exec(compile(source, filename, "exec", dont_inherit=True), vars(main))


def _finalize(status: int) -> int:
    import atexit
    import gc
    import io
    import threading

    for module, step in ((threading, threading._shutdown), (atexit, atexit._run_exitfuncs)):  # type: ignore[attr-defined]
        try:
            step()
        except BaseException as error:  # the interpreter reports it so and goes on with its exit
            import traceback

            print(f"Exception ignored in: {module!r}", file=sys.stderr)
            traceback.print_exception(type(error), error, _job_frames(error.__traceback__))
    gc.collect()  # what is in cycles is finalized, a file in one closed
    for stream in (sys.stdout, sys.stderr):
        if stream is None or getattr(stream, "closed", False):
            continue
        try:
            stream.flush()
        except Exception as error:  # as the interpreter reports a failed flush at exit, and its status
            print(f"Exception ignored in: {stream!r}\n{type(error).__name__}: {error}", file=sys.__stderr__)
            status = 120
    # The interpreter then releases every module's globals, which closes (so flushes) the files they hold:
    # a tee on sys.stdout, a helper module's log. Not released here (daemon threads still run on them):
    # their files are flushed, the text ones first, into their buffers.
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    files = [found for found in gc.get_objects() if isinstance(found, io.IOBase)]
    for kind in (io.TextIOBase, io.BufferedIOBase):
        for file in files:
            try:
                if isinstance(file, kind) and not file.closed and file.writable():
                    file.flush()
            except Exception:  # as a file closed at exit: silently
                pass
    return status


def _exit_status(code: object) -> int:
    """The exit status of an uncaught ``SystemExit(code)``, as the interpreter gives it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF if -(2**63) <= code < 2**63 else 255  # one a C long cannot hold: -1
    print(code, file=sys.stderr)
    return 1


def start_ranks(lease_dir: str | os.PathLike[str], spec: dict[str, Any], ranks: Ranks) -> bool:
    """Start the job: one process, or one per rank of a multi-node launch (``spec["ranks"]``: each rank's
    variables over ``spec["env"]``), each in a process group of its own, so that stopping one stops all it
    started. All ranks start or none: if one cannot, those started are stopped and the exit recorded."""
    rank_envs: list[dict[str, str]] | None = spec.get("ranks")
    each: list[tuple[int | None, dict[str, str]]] = (
        [(None, {})] if rank_envs is None else list(enumerate(rank_envs))
    )
    for rank, rank_env in each:
        stdout_name, stderr_name = output_files(rank)
        appended = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        stdout = os.open(os.path.join(lease_dir, stdout_name), appended, 0o666)
        stderr = os.open(os.path.join(lease_dir, stderr_name), appended, 0o666)
        try:
            env = {**spec["env"], **rank_env}
            ranks.pids.append(
                spawn(spec["argv"], spec["cwd"], env, stdout, stderr, sigchld_ignored=ranks.sigchld_ignored)
            )
        except OSError as error:
            os.write(stderr, f"takeoff: cannot start {spec['argv'][0]!r}: {error.strerror}\n".encode())
            stop_groups(ranks.pids, 0, reap=ranks.reap)
            ranks.wait_all()
            record = exit_record(EXEC_FAILED, rank=rank, fenced=False)
            _write_text(os.path.join(lease_dir, "exit.json"), _record_text(record))
            return False
        finally:
            os.close(stdout)
            os.close(stderr)
    return True


def exit_record(returncode: int, *, rank: int | None, fenced: bool) -> dict[str, Any]:
    """What ``exit.json`` says of an end: the exit code (128 + n for signal n), the signal, whether the
    fence stopped the job, and for a multi-node launch the rank whose end ended the job."""
    exit_code, killed_by = (returncode, None) if returncode >= 0 else (128 - returncode, -returncode)
    record: dict[str, Any] = {"exit_code": exit_code, "signal": killed_by, "fenced": fenced}
    if rank is not None:
        record["rank"] = rank
    return record


def run_process(lease_dir: str | os.PathLike[str], spec: dict[str, Any]) -> None:
    """Start the job's processes, wait for them and record how the job ended. A multi-node launch ends
    when all its ranks have exited 0, or as soon as one fails: the shim then stops the others and records
    the exit of the rank that failed first."""
    # SIGCHLD blocked, so that sigtimedwait learns of each end at once (a blocked signal stays pending).
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGCHLD,))
    # Inherited as ignored (a batch system's step may start the shim so), SIGCHLD would have the kernel
    # reap the job itself, leaving the shim no exit status to record: the default while the shim waits.
    previous_handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        _run_process(lease_dir, spec, Ranks(sigchld_ignored=previous_handler == signal.SIG_IGN))
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGCHLD, previous_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)


def _run_process(lease_dir: str | os.PathLike[str], spec: dict[str, Any], ranks: Ranks) -> None:
    if not start_ranks(lease_dir, spec, ranks):
        return
    jobs = ranks.pids
    groups = {"job_pid": jobs[0]} | ({"rank_pids": list(jobs)} if len(jobs) > 1 else {})
    _write_text(os.path.join(lease_dir, "shim.json"), _record_text({"shim_pid": os.getpid(), **groups}))
    failed, fenced = wait_for_end(lease_dir, ranks)
    # A job's end is the end of every process it started, as a container's is: nothing of it may run on
    # unsupervised once its exit is recorded. That stops the ranks still running after one failed, and
    # what any rank left behind in its group (a reaped leader's group is only what is left of it).
    grace = float(spec.get("stop_grace_seconds", STOP_GRACE_SECONDS))
    terminated = os.path.exists(os.path.join(lease_dir, STOPPING))
    stop_groups(jobs, grace, terminated=terminated, reap=ranks.reap)
    returncodes = ranks.wait_all()
    if failed is not None and len(jobs) > 1:
        record = exit_record(returncodes[failed], rank=failed, fenced=fenced)
    else:
        record = exit_record(next((code for code in returncodes if code), 0), rank=None, fenced=fenced)
    _write_text(os.path.join(lease_dir, "exit.json"), _record_text(record))


def wait_for_end(lease_dir: str | os.PathLike[str], ranks: Ranks) -> tuple[int | None, bool]:
    """Until every process has exited 0, one has failed (which: its index), or the fence has lapsed.

    Each SIGCHLD wakes the shim (it is blocked, and taken by ``sigtimedwait``), which reaps at once: the
    ends are learnt in the order they happen, so the first rank to fail is the one named, not a peer
    that failed because of it. Without one for ``FENCE_CHECK_SECONDS`` (or until the lease's end), the fence
    is looked at."""
    seen = 0
    while True:
        ranks.reap()
        ended = list(ranks.returncodes.items())
        for index, returncode in ended[seen:]:
            if returncode:
                return index, False
        seen = len(ended)
        if seen == len(ranks.pids):
            return None, False
        if signal.sigtimedwait((signal.SIGCHLD,), until_fence_check(lease_dir)) is None and lease_lapsed(
            lease_dir
        ):
            return None, True


class shim_lock:  # a class used as a function: ``with shim_lock(lease_dir) as only_shim``
    """Whether this process is the job's one shim (holding SHIM_LOCK until the block ends)."""

    def __init__(self, lease_dir: str | os.PathLike[str]) -> None:
        self._path = os.path.join(lease_dir, SHIM_LOCK)

    def __enter__(self) -> bool:
        import fcntl  # a container's shim's only

        self._lock = open(self._path, "a")  # held until __exit__
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def __exit__(self, *_: object) -> None:
        self._lock.close()


def shim_alive(lease_dir: str | os.PathLike[str]) -> bool:
    """Whether a shim holds the lock of ``lease_dir`` (a container's shim)."""
    import fcntl

    try:
        with open(os.path.join(lease_dir, SHIM_LOCK)) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False


def main(lease_dir: str | os.PathLike[str]) -> int:
    spec = read_spec(lease_dir)
    if spec.get("mode") == "container":
        from pathlib import Path

        from takeoff_agent.container_shim import run_container  # its HTTP client would slow every local start

        run_container(Path(lease_dir), spec)
    else:
        run_process(lease_dir, spec)
    return 0


def serve_forks() -> int:
    """The shims' fork server (``python -I -S shim.py``, started by the agent): fork a shim for each lease
    directory read from stdin (each ended by a NUL), answering ``started PID`` on stdout, then ``ended
    PID`` once that shim has ended (this server, its parent, reaps it). Until the end of stdin (the agent
    closed it, or died); the shims live on. A shim is then a fork of a process that has imported it already,
    not an interpreter's start (docs/design.md §7 "The shim's fork server")."""
    import select  # the server's only: each shim is a fork of it

    inherited = signal.getsignal(signal.SIGCHLD)  # each shim gets it back, as from its agent before
    woken, wake = os.pipe()
    os.set_blocking(wake, False)
    signal.set_wakeup_fd(wake)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # for the wake-up byte: select then reaps
    asked = b""
    while True:
        ready, _, _ = select.select([0, woken], [], [])
        if woken in ready:
            os.read(woken, 4096)
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            os.write(1, b"ended %d\n" % pid)
        if 0 in ready:
            read = os.read(0, 65536)
            if not read:
                return 0
            *lease_dirs, asked = (asked + read).split(b"\0")
            for lease_dir in lease_dirs:
                pid = _fork_shim(os.fsdecode(lease_dir), (woken, wake), inherited)
                os.write(1, b"started %d\n" % pid)


def serve_warm_forks(given: dict[str, str]) -> int:
    """A warm interpreter: the fork server run by a venv's own interpreter (``runners/shims.py``) with
    ``given`` as its whole environment, the start variables of the jobs it is for. It imports WARM_IMPORTS,
    answers ``ready 0`` and then serves as ``serve_forks``; its shims run each job that can (``_main_here``)
    in a fork of their own, not an interpreter's start (docs/design.md §7 "Warm interpreters")."""
    global _warm_start, _added_at_start, _imported_at_start  # noqa: PLW0603 - what this process is
    import gc
    import importlib

    for name in WARM_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception:  # the job imports it itself, and meets the error there
            continue
    import atexit

    atexit.unregister(gc.freeze)  # the SDK's, for the imports it would have made at each exit: frozen now
    _warm_start = given
    _added_at_start = {name: value for name, value in os.environ.items() if name not in given}
    _imported_at_start = frozenset(name.partition(".")[0] for name in sys.modules)
    gc.freeze()  # what is imported by now lives as long as any job: no job's collections walk it
    os.write(1, b"ready 0\n")
    return serve_forks()


def _fork_shim(lease_dir: str, server_fds: tuple[int, int], sigchld: Any) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setsid()  # outlives the agent and its server: a restarted agent takes the job back
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, sigchld)
        for fd in server_fds:
            os.close(fd)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # off the server's pipes: the agent reads the server's answers alone
            os.dup2(null, fd)
        os.close(null)
        code = main(lease_dir)
    finally:
        os._exit(code)


if __name__ == "__main__":
    if __package__ is None or __package__ == "":  # started by path (``python -I -S shim.py``): no site
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # One shim for LEASE_DIR (``python -m takeoff_agent.shim LEASE_DIR``: the tests of the shim alone), or
    # with no argument the fork server, as the agent starts it.
    sys.exit(main(sys.argv[1]) if len(sys.argv) > 1 else serve_forks())
