"""System metrics of a job, sampled by a background thread and recorded in its run as ``system/*`` metrics.

Every ``TAKEOFF_SYSTEM_METRICS_INTERVAL`` seconds (default 10; the first sample comes after at most
:data:`FIRST_SAMPLE_AFTER`) the thread measures the job's process tree, this process and all its
descendants, from Linux's ``/proc`` (no psutil: job environments get no extra dependency):

- ``system/cpu_percent``: CPU time the tree used over the interval, in percent of one core (400 is four
  cores busy), and ``system/cpu_count``, the cores this process may run on.
- ``system/memory_rss_mb``: the tree's resident memory; ``system/memory_percent``: that in percent of the
  machine's memory, or of the container's memory limit where one is set (cgroup v2 or v1).
- ``system/disk_read_mb``, ``system/disk_write_mb``: storage the tree read and wrote since the run started
  (``/proc/PID/io``, where the kernel shows it); ``system/disk_used_percent``: how full the file system
  holding the run's directory is.
- ``system/network_recv_mb``, ``system/network_sent_mb``: traffic since the run started on the network
  interfaces of the job's network namespace, loopback excluded (a container's are its own).

With NVIDIA's management library (the ``nvidia-ml-py`` package, ``takeoff[gpu]``) and a driver, for each
GPU the job can see (``CUDA_VISIBLE_DEVICES`` honoured; ``i`` is the index the job's code uses, as in
``cuda:i``): ``system/gpu.{i}.utilization_percent``, ``.memory_used_mb``, ``.memory_percent``,
``.temperature_c`` and ``.power_w``. On a machine with NVIDIA's driver whose GPUs cannot be read (no
``nvidia-ml-py``, an NVML error, ``CUDA_VISIBLE_DEVICES`` hiding them all) the job is told once on stderr why
GPU metrics are skipped; on a machine without the driver nothing is said. The other metrics go on. MB are
MiB (2**20 bytes), as in wandb.

``TAKEOFF_SYSTEM_METRICS=0`` (or ``false``) turns sampling off.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, NamedTuple

from takeoff._delivery import warn

ENABLED_ENV = "TAKEOFF_SYSTEM_METRICS"
INTERVAL_ENV = "TAKEOFF_SYSTEM_METRICS_INTERVAL"
DEFAULT_INTERVAL = 10.0
FIRST_SAMPLE_AFTER = 2.0
"""The first sample waits at most this long: soon enough to show the metrics work, long enough for the
CPU time between two readings to mean something."""
STOP_TIMEOUT = 5.0
MB = 1024 * 1024
_OFF = {"0", "false", "no", "off"}
_ON = {"", "1", "true", "yes", "on"}
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

Emit = Callable[[Mapping[str, float]], None]


def start_system_metrics(emit: Emit, directory: str | os.PathLike[str] | None = None) -> SystemMetrics | None:
    """Start sampling into ``emit`` unless ``TAKEOFF_SYSTEM_METRICS`` turns it off (then return None).

    ``directory`` is where the run writes (default: the working directory): its file system's fullness is
    ``system/disk_used_percent``. ``emit`` is called on the sampling thread with one mapping per sample.
    """
    if not _enabled():
        return None
    if not os.path.exists("/proc/self/stat"):
        warn("system metrics are off: they are read from /proc, which this platform does not have")
        return None
    return SystemMetrics(emit, _interval(), directory or os.getcwd())


class SystemMetrics:
    """The sampling thread; :meth:`stop` ends it."""

    def __init__(self, emit: Emit, interval: float, directory: str | os.PathLike[str]) -> None:
        self.interval = interval
        self._emit = emit
        self._directory = directory
        self._stopping = threading.Event()
        self._warned_about: set[str] = set()
        self._thread = threading.Thread(
            target=self._sample_until_stopped, name="takeoff-system-metrics", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """End sampling, waiting (a few seconds at most) for a sample under way to finish."""
        self._stopping.set()
        if threading.current_thread() is not self._thread:  # emit may end the run, and so call this
            self._thread.join(STOP_TIMEOUT)

    def _sample_until_stopped(self) -> None:
        tree = ProcessTreeSampler(os.getpid(), self._directory)  # counters count from the run's start
        if self._stopping.wait(min(self.interval, FIRST_SAMPLE_AFTER)):
            return  # a run over before its first sample loads no GPU library
        gpus = GpuSampler.open()
        try:
            while True:
                sample = self._guarded("sampling", tree.sample) or {}
                if gpus is not None:
                    sample.update(self._guarded("sampling GPUs", gpus.sample) or {})
                    if gpus.disabled:
                        gpus = None
                if sample:
                    self._guarded("recording", self._emit, sample)
                if self._stopping.wait(self.interval):
                    break
        finally:
            if gpus is not None:
                gpus.close()

    def _guarded(self, doing: str, action: Callable[..., Any], *arguments: Any) -> Any:
        """Call ``action``; whatever it raises, say so once and let the thread go on to the next sample."""
        try:
            return action(*arguments)
        except Exception as error:
            if doing not in self._warned_about:
                self._warned_about.add(doing)
                warn(f"{doing} system metrics failed ({error!r}); going on, this is said only once")
            return None


class _Process(NamedTuple):
    pid: int
    parent: int
    started: int  # clock ticks after boot: with the pid, it tells a process from a later one reusing the pid
    cpu_ticks: int
    rss_pages: int

    @classmethod
    def parse(cls, pid: int, fields: list[bytes]) -> _Process:
        """From the fields of ``/proc/PID/stat`` after the command name (see proc(5), 1-based there)."""
        return cls(
            pid=pid,
            parent=int(fields[1]),
            started=int(fields[19]),
            cpu_ticks=int(fields[11]) + int(fields[12]),  # user + system time
            rss_pages=int(fields[21]),
        )


class ProcessTreeSampler:
    """Measures a process and its descendants; the counters (CPU time, disk) count from its creation."""

    def __init__(self, root: int, directory: str | os.PathLike[str]) -> None:
        self._root = root
        self._directory = directory
        self._cpu_count = len(os.sched_getaffinity(0))
        self._memory_limit = _memory_limit()
        processes = self._tree()
        io = _disk_io(processes)
        self._cpu = _TreeCounter({key: process.cpu_ticks for key, process in processes.items()})
        self._disk_read = _TreeCounter({key: counts[0] for key, counts in io.items()})
        self._disk_write = _TreeCounter({key: counts[1] for key, counts in io.items()})
        self._network_start = _network_bytes()
        self._last_time = time.monotonic()

    def sample(self) -> dict[str, float]:
        now = time.monotonic()
        elapsed, self._last_time = now - self._last_time, now
        processes = self._tree()
        cpu_seconds = self._cpu.advance({key: p.cpu_ticks for key, p in processes.items()}) / _CLOCK_TICKS
        rss = sum(process.rss_pages for process in processes.values()) * _PAGE_SIZE
        metrics = {
            "system/cpu_percent": 100 * cpu_seconds / elapsed if elapsed > 0 else 0.0,
            "system/memory_rss_mb": rss / MB,
            "system/cpu_count": float(self._cpu_count),
        }
        if self._memory_limit:
            metrics["system/memory_percent"] = 100 * rss / self._memory_limit
        io = _disk_io(processes)
        if io:
            self._disk_read.advance({key: counts[0] for key, counts in io.items()})
            self._disk_write.advance({key: counts[1] for key, counts in io.items()})
            metrics["system/disk_read_mb"] = self._disk_read.total / MB
            metrics["system/disk_write_mb"] = self._disk_write.total / MB
        if (used_percent := _disk_used_percent(self._directory)) is not None:
            metrics["system/disk_used_percent"] = used_percent
        if self._network_start is not None and (network := _network_bytes()) is not None:
            metrics["system/network_recv_mb"] = (network[0] - self._network_start[0]) / MB
            metrics["system/network_sent_mb"] = (network[1] - self._network_start[1]) / MB
        return metrics

    def _tree(self) -> dict[tuple[int, int], _Process]:
        """The root process and its descendants now, by (pid, start time)."""
        children: dict[int, list[int]] = {}
        stats = _all_stats()
        for pid, fields in stats.items():
            children.setdefault(int(fields[1]), []).append(pid)
        tree: dict[tuple[int, int], _Process] = {}
        waiting = [self._root] if self._root in stats else []
        while waiting:
            pid = waiting.pop()
            process = _Process.parse(pid, stats[pid])
            tree[(pid, process.started)] = process
            waiting.extend(children.get(pid, ()))
        return tree


class _TreeCounter:
    """A total of per-process counters over processes that come and go: each sample adds what every live
    process counted since the last one (a process born meanwhile counted from zero), so the total never
    goes back when a process ends; only the work of its last moments is missed."""

    def __init__(self, start: Mapping[tuple[int, int], int]) -> None:
        self._previous = dict(start)
        self.total = 0

    def advance(self, now: Mapping[tuple[int, int], int]) -> int:
        """Add what the processes counted since the last call to :attr:`total`; return that amount."""
        previous = self._previous
        added = sum(value - previous.get(key, 0) for key, value in now.items())
        self._previous = dict(now)
        self.total += added
        return added


class GpuSampler:
    """NVML's readings of the GPUs the job can see. A reading a GPU does not support is left out; any other
    NVML error stops GPU metrics for good, with one warning (:attr:`disabled`)."""

    def __init__(self, nvml: ModuleType, devices: list[Any]) -> None:
        self._nvml = nvml
        self._devices = devices  # NVML handles, in the order the job's code numbers them
        self._unsupported: set[tuple[int, Callable[[ModuleType, Any], dict[str, float]]]] = set()
        self.disabled = False

    @classmethod
    def open(cls) -> GpuSampler | None:
        """Load NVML and find the job's GPUs; None, having said why on stderr, where there are none."""
        if not _gpu_driver_present():
            return None  # nothing to read, and nothing to say: importing pynvml alone costs a short job more
        try:
            # Imported here, on the sampling thread: loading NVML costs the job's start nothing.
            nvml = importlib.import_module("pynvml")
        except ImportError:
            _skip_gpus("nvidia-ml-py is not installed (pip install 'takeoff[gpu]')")
            return None
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as error:
            _skip_gpus(str(error))
            return None
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        try:
            devices = _visible_devices(nvml, visible)
        except nvml.NVMLError as error:
            devices = []
            _skip_gpus(f"listing GPUs failed: {error}")
        else:
            if not devices:
                _skip_gpus("no GPU" if visible is None else f"no GPU in CUDA_VISIBLE_DEVICES={visible!r}")
        if not devices:
            nvml.nvmlShutdown()
            return None
        return cls(nvml, devices)

    def sample(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for index, device in enumerate(self._devices):
            for read in _GPU_READINGS:
                if (index, read) in self._unsupported:
                    continue
                try:
                    readings = read(self._nvml, device)
                except self._nvml.NVMLError as error:
                    if error.value == self._nvml.NVML_ERROR_NOT_SUPPORTED:
                        self._unsupported.add((index, read))
                        continue
                    warn(f"GPU metrics stopped: NVML failed ({error})")
                    self.close()
                    return {}
                metrics.update((f"system/gpu.{index}.{name}", value) for name, value in readings.items())
        return metrics

    def close(self) -> None:
        if not self.disabled:
            self.disabled = True
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlShutdown()


NVIDIA_DRIVER_FILE = "/proc/driver/nvidia/version"
"""Present where NVIDIA's kernel driver is loaded (and in a container given GPUs)."""


GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/dxg")
"""Where NVIDIA's devices are given to a process without ``NVIDIA_DRIVER_FILE``: the control device of
the driver, and WSL2's GPU paravirtualisation, through which NVML reaches the Windows driver."""


def _gpu_driver_present() -> bool:
    """Whether NVML could find a GPU here: elsewhere it is not even loaded."""
    return os.path.exists(NVIDIA_DRIVER_FILE) or any(os.path.exists(device) for device in GPU_DEVICE_FILES)


def _skip_gpus(why: str) -> None:
    # Without the driver there is no GPU to miss: a CPU job's log stays clean.
    if os.path.exists(NVIDIA_DRIVER_FILE):
        warn(f"GPU metrics skipped: {why}")


def _visible_devices(nvml: ModuleType, visible: str | None) -> list[Any]:
    """NVML handles of the GPUs ``CUDA_VISIBLE_DEVICES`` lets CUDA use, in CUDA's order: by index, by
    (a unique prefix of) a ``GPU-`` UUID, or by a ``MIG-`` UUID. Like CUDA, it ignores the list from the
    first entry it cannot use (so ``-1`` or an empty value hides every GPU)."""
    count = nvml.nvmlDeviceGetCount()
    if visible is None:
        return [nvml.nvmlDeviceGetHandleByIndex(index) for index in range(count)]
    uuids = [_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(index))) for index in range(count)]
    devices = []
    for entry in (entry.strip() for entry in visible.split(",")):
        if entry.isdigit():
            matches = [int(entry)] if int(entry) < count else []
        else:
            matches = [
                index
                for index, uuid in enumerate(uuids)
                if entry.startswith("GPU-") and uuid.startswith(entry)
            ]
        if len(matches) == 1:
            devices.append(nvml.nvmlDeviceGetHandleByIndex(matches[0]))
        elif entry.startswith("MIG-"):
            try:
                devices.append(nvml.nvmlDeviceGetHandleByUUID(entry))
            except nvml.NVMLError:
                break
        else:
            break
    return devices


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _utilization(nvml: ModuleType, device: Any) -> dict[str, float]:
    return {"utilization_percent": float(nvml.nvmlDeviceGetUtilizationRates(device).gpu)}


def _memory(nvml: ModuleType, device: Any) -> dict[str, float]:
    memory = nvml.nvmlDeviceGetMemoryInfo(device)
    return {"memory_used_mb": memory.used / MB, "memory_percent": 100 * memory.used / memory.total}


def _temperature(nvml: ModuleType, device: Any) -> dict[str, float]:
    return {"temperature_c": float(nvml.nvmlDeviceGetTemperature(device, nvml.NVML_TEMPERATURE_GPU))}


def _power(nvml: ModuleType, device: Any) -> dict[str, float]:
    return {"power_w": nvml.nvmlDeviceGetPowerUsage(device) / 1000}  # NVML says milliwatts


_GPU_READINGS = (_utilization, _memory, _temperature, _power)


def _all_stats() -> dict[int, list[bytes]]:
    """The fields of ``/proc/PID/stat`` after the command name (the state first), of every process."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (text := _read(f"/proc/{entry}/stat")):
            # The command name, in parentheses, can hold spaces and ")": the fields follow the last ")"
            stats[int(entry)] = text[text.rindex(b")") + 2 :].split()
    return stats


def _read(path: str) -> bytes | None:
    """A small /proc file's bytes, or None if it is gone or not ours to read. (Leaner than ``open``: a sample
    reads a few hundred of these.)"""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(descriptor, 4096)
    except OSError:
        return None
    finally:
        os.close(descriptor)


def _disk_io(processes: Mapping[tuple[int, int], _Process]) -> dict[tuple[int, int], tuple[int, int]]:
    """Bytes each process read from and wrote to storage, for those whose ``/proc/PID/io`` is readable."""
    counts = {}
    for key in processes:
        text = _read(f"/proc/{key[0]}/io")
        if not text:
            continue
        fields = dict(line.split(b": ", 1) for line in text.splitlines())
        counts[key] = (int(fields[b"read_bytes"]), int(fields[b"write_bytes"]))
    return counts


def _disk_used_percent(directory: str | os.PathLike[str]) -> float | None:
    """How full ``directory``'s file system is for this user, as ``df`` says: the blocks reserved for root
    count as neither used nor available."""
    try:
        disk = os.statvfs(directory)
    except OSError:  # the directory was removed
        return None
    used = disk.f_blocks - disk.f_bfree
    return 100 * used / (used + disk.f_bavail) if used + disk.f_bavail else None


def _network_bytes() -> tuple[int, int] | None:
    """Bytes received and sent on this network namespace's interfaces but loopback, or None unreadable."""
    try:
        with open("/proc/self/net/dev", "rb") as file:
            lines = file.read().splitlines()[2:]
    except OSError:
        return None
    received = sent = 0
    for line in lines:
        interface, counters = line.split(b":", 1)
        if interface.strip() != b"lo":
            fields = counters.split()
            received += int(fields[0])
            sent += int(fields[8])
    return received, sent


def _memory_limit() -> int | None:
    """The memory this job may use: the machine's, or less where the container's cgroup sets a limit."""
    try:
        with open("/proc/meminfo") as file:
            meminfo = file.read()
    except OSError:
        return None
    total = next(int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemTotal:"))
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as file:
                text = file.read().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" means none
            total = min(total, int(text))
    return total


def _enabled() -> bool:
    text = os.environ.get(ENABLED_ENV, "").strip().lower()
    if text not in _OFF | _ON:
        warn(f"{ENABLED_ENV} is {text!r}, not one of 1, true, 0, false; system metrics stay on")
    return text not in _OFF


def _interval() -> float:
    text = os.environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_INTERVAL
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        warn(f"{INTERVAL_ENV} must be a positive number of seconds, not {text!r}; using {DEFAULT_INTERVAL:g}")
        return DEFAULT_INTERVAL
    return seconds
