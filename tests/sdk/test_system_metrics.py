"""System metrics: the sampler measures a real process tree from /proc, the sampling thread delivers and
stops, GPU metrics appear where NVML finds a GPU and are said to be skipped where it does not."""

from __future__ import annotations

import importlib
import os
import queue
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

import takeoff._system
from takeoff import Client, RunState
from takeoff._system import (
    DEFAULT_INTERVAL,
    MB,
    GpuSampler,
    ProcessTreeSampler,
    SystemMetrics,
    start_system_metrics,
)
from tests.processes import ServiceProcess, wait_for
from tests.sdk.conftest import job_environment, job_stderr, start_job

TREE_ROOT = """
import subprocess, sys

BURNER = '''
import sys, time
while time.process_time() < 0.3:
    pass
print("burned", flush=True)
sys.stdin.read()  # until this script, its parent, ends
'''
kept = []
print("ready", flush=True)
for command in sys.stdin:
    if command.strip() == "burn":  # a grandchild of the test that uses CPU time, then waits
        burner = subprocess.Popen(
            [sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        burner.stdout.readline()
    else:
        kept.append(b"x" * (100 * 1024 * 1024))  # written, so resident
    print("done", flush=True)
"""
"""A process that, once ready, waits for commands: ``burn`` starts a child that uses 0.3 s of CPU,
``allocate`` makes 100 MiB resident. Between commands it only waits."""

CPU_KEYS = {
    "system/cpu_percent",
    "system/cpu_count",
    "system/memory_rss_mb",
    "system/memory_percent",
    "system/disk_read_mb",
    "system/disk_write_mb",
    "system/disk_used_percent",
    "system/network_recv_mb",
    "system/network_sent_mb",
}
GPU_NAMES = {"utilization_percent", "memory_used_mb", "memory_percent", "temperature_c", "power_w"}


class TreeRoot:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", TREE_ROOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == "ready\n"  # its start-up CPU time is spent

    def order(self, command: str) -> None:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline() == "done\n"


@pytest.fixture
def tree_root() -> Iterator[TreeRoot]:
    root = TreeRoot()
    yield root
    root.process.kill()
    root.process.communicate()


def test_a_grandchild_using_cpu_counts_in_the_trees_cpu_percent(tree_root: TreeRoot, tmp_path: Path) -> None:
    sampler = ProcessTreeSampler(tree_root.process.pid, tmp_path)
    first_reading_done = time.monotonic()

    tree_root.order("burn")  # the root only starts its child and waits: the CPU time is the child's
    sample_started = time.monotonic()
    sample = sampler.sample()

    # The sampler's interval is a little longer than the time between these two instants: CPU seconds counted
    # are at least cpu_percent over that time, which must cover the child's 0.3 s.
    counted_at_least = sample["system/cpu_percent"] / 100 * (sample_started - first_reading_done)
    assert counted_at_least >= 0.25


def test_the_trees_resident_memory_grows_when_a_process_in_it_allocates(
    tree_root: TreeRoot, tmp_path: Path
) -> None:
    sampler = ProcessTreeSampler(tree_root.process.pid, tmp_path)
    before = sampler.sample()["system/memory_rss_mb"]

    tree_root.order("allocate")

    # About 100 MiB: CI saw 99.9 (a page or two of the tree reclaimed meanwhile on a machine short of memory).
    assert sampler.sample()["system/memory_rss_mb"] - before >= 90


def test_samples_arrive_under_system_names_until_stop_joins_the_thread(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TAKEOFF_SYSTEM_METRICS_INTERVAL", "0.2")
    samples: queue.Queue[Mapping[str, float]] = queue.Queue()
    metrics = start_system_metrics(samples.put)
    assert metrics is not None

    first, second = samples.get(timeout=30), samples.get(timeout=30)
    metrics.stop()

    assert not _sampling_threads()
    for sample in (first, second):
        assert all(key.startswith("system/") for key in sample)
        assert set(sample) >= CPU_KEYS
    assert_gpu_metrics_or_why_not(second, capsys.readouterr().err)


def test_stop_ends_the_thread_without_waiting_for_the_next_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAKEOFF_SYSTEM_METRICS_INTERVAL", "3600")
    monkeypatch.setattr(takeoff._system, "FIRST_SAMPLE_AFTER", 3600)  # no wait ends before stop's timeout
    samples: list[Mapping[str, float]] = []
    metrics = start_system_metrics(samples.append)
    assert metrics is not None

    metrics.stop()  # waits at most STOP_TIMEOUT for the thread, far less than an interval

    assert not _sampling_threads()
    assert samples == []


@pytest.mark.parametrize("setting", ["0", "false", "False"])
def test_system_metrics_turned_off_start_no_thread(monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    monkeypatch.setenv("TAKEOFF_SYSTEM_METRICS", setting)

    assert start_system_metrics(lambda sample: None) is None
    assert not _sampling_threads()


@pytest.mark.parametrize("interval", ["ten", "0", "-1", "nan"])
def test_an_invalid_interval_is_warned_about_and_the_default_used(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], interval: str
) -> None:
    monkeypatch.setenv("TAKEOFF_SYSTEM_METRICS_INTERVAL", interval)

    metrics = start_system_metrics(lambda sample: None)
    assert metrics is not None
    metrics.stop()

    assert metrics.interval == DEFAULT_INTERVAL
    assert (
        f"takeoff: TAKEOFF_SYSTEM_METRICS_INTERVAL must be a positive number of seconds, not {interval!r}; "
        f"using {DEFAULT_INTERVAL:g}\n" in capsys.readouterr().err
    )


def test_a_failing_emit_is_warned_about_once_and_sampling_goes_on(capsys: pytest.CaptureFixture[str]) -> None:
    calls = 0
    recorded = threading.Event()

    def emit(sample: Mapping[str, float]) -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise ConnectionError("the run is gone")
        recorded.set()

    metrics = SystemMetrics(emit, interval=0.01, directory=".")
    assert recorded.wait(30)
    metrics.stop()

    warnings = [line for line in capsys.readouterr().err.splitlines() if "recording" in line]
    assert warnings == [
        "takeoff: recording system metrics failed (ConnectionError('the run is gone')); going on, "
        "this is said only once"
    ]


def test_gpu_metrics_appear_where_nvml_finds_a_gpu_and_are_said_skipped_elsewhere(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On a machine with an NVIDIA GPU and driver this checks the readings; elsewhere (CI) the message."""
    gpus = GpuSampler.open()
    sample = gpus.sample() if gpus is not None else {}
    if gpus is not None:
        gpus.close()

    assert_gpu_metrics_or_why_not(sample, capsys.readouterr().err)


WAITING_JOB = """
    import pathlib, time
    import takeoff

    run = takeoff.init()
    print(run.id, flush=True)
    while not pathlib.Path("release").exists():  # until the test has seen system metrics arrive
        time.sleep(0.01)
    run.finish()
"""


def test_system_metrics_of_a_running_job_arrive_in_its_run(
    client: Client, registry: ServiceProcess, project: str, tmp_path: Path
) -> None:
    env = job_environment(
        registry.address, project, TAKEOFF_SYSTEM_METRICS="1", TAKEOFF_SYSTEM_METRICS_INTERVAL="0.2"
    )
    job = start_job(tmp_path, WAITING_JOB, env)
    assert job.stdout is not None
    run_id = job.stdout.readline().strip()

    def metric_keys_once_system_metrics_arrived() -> set[str] | None:
        keys = set(client.get_run(run_id).metric_keys)
        return keys if keys >= CPU_KEYS else None

    keys = wait_for(metric_keys_once_system_metrics_arrived, what="system metrics in the run")
    rows = list(client.read_metrics(run_id))
    assert job.poll() is None  # still waiting for the release: the metrics came while it ran

    (tmp_path / "release").touch()
    job.communicate(timeout=60)
    assert job.returncode == 0, job_stderr(tmp_path)
    assert client.get_run(run_id).state is RunState.FINISHED
    assert all(key.startswith("system/") for key in keys)
    sample = rows[-1].values
    assert set(sample) >= CPU_KEYS
    assert sample["system/memory_rss_mb"] > 10  # a Python interpreter with grpc loaded
    assert_gpu_metrics_or_why_not(sample, job_stderr(tmp_path))


def assert_gpu_metrics_or_why_not(sample: Mapping[str, float], stderr: str) -> None:
    gpu_keys = {key for key in sample if key.startswith("system/gpu.")}
    if _nvml_finds_a_gpu():
        assert {f"system/gpu.0.{name}" for name in GPU_NAMES} <= gpu_keys
        assert "GPU metrics skipped" not in stderr
    else:
        assert gpu_keys == set()
        said = stderr.count("takeoff: GPU metrics skipped: ")
        # said once where NVIDIA's driver is, never on a machine without GPUs
        assert said == (1 if os.path.exists(takeoff._system.NVIDIA_DRIVER_FILE) else 0)


def _nvml_finds_a_gpu() -> bool:
    """Asked of NVML directly, as the test's own view of this machine."""
    try:
        nvml = importlib.import_module("pynvml")
        nvml.nvmlInit()
    except Exception:
        return False
    try:
        return bool(nvml.nvmlDeviceGetCount())
    finally:
        nvml.nvmlShutdown()


def _sampling_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "takeoff-system-metrics"]


# NVML's behaviour on GPU machines, for the branches a machine without one never reaches.


class FakeNvmlError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class FakeNvml(types.ModuleType):
    """Three GPUs, ``GPU-aaaa``, ``GPU-bbbb``, ``GPU-cccc``; GPU ``i`` has ``i + 1`` MiB in use and does not
    report its power. Set ``failure`` to make every reading raise it."""

    NVMLError = FakeNvmlError
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_TEMPERATURE_GPU = 0

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.failure: FakeNvmlError | None = None
        self.initialised = False

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        return 3

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        raise FakeNvmlError(6)

    def nvmlDeviceGetUUID(self, device: int) -> bytes:
        return f"GPU-{'abc'[device] * 4}".encode()

    def nvmlDeviceGetUtilizationRates(self, device: int) -> Any:
        return types.SimpleNamespace(gpu=50)

    def nvmlDeviceGetMemoryInfo(self, device: int) -> Any:
        if self.failure is not None:
            raise self.failure
        return types.SimpleNamespace(used=(device + 1) * MB, total=100 * MB)

    def nvmlDeviceGetTemperature(self, device: int, sensor: int) -> int:
        return 60

    def nvmlDeviceGetPowerUsage(self, device: int) -> int:
        raise FakeNvmlError(self.NVML_ERROR_NOT_SUPPORTED)


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeNvml:
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    driver = tmp_path / "nvidia-driver-version"
    driver.write_text("NVRM version: fake\n")
    monkeypatch.setattr(takeoff._system, "NVIDIA_DRIVER_FILE", driver)  # a machine with the driver
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return nvml


def test_gpus_are_numbered_as_cuda_visible_devices_lists_them(
    fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "CUDA_VISIBLE_DEVICES", "2,GPU-bb,MIG-unknown,0"
    )  # CUDA stops at the entry it can't use

    gpus = GpuSampler.open()
    assert gpus is not None
    sample = gpus.sample()

    assert sample["system/gpu.0.memory_used_mb"] == 3  # NVML's GPU 2
    assert sample["system/gpu.1.memory_used_mb"] == 2  # GPU-bbbb
    assert {key.split(".")[1] for key in sample} == {"0", "1"}


def test_a_reading_a_gpu_does_not_support_is_left_out(fake_nvml: FakeNvml) -> None:
    gpus = GpuSampler.open()
    assert gpus is not None

    assert {key.rsplit(".", 1)[1] for key in gpus.sample()} == GPU_NAMES - {"power_w"}


@pytest.mark.parametrize("visible", ["", "-1"])
def test_cuda_visible_devices_hiding_every_gpu_skips_gpu_metrics(
    fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], visible: str
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)

    assert GpuSampler.open() is None
    assert (
        capsys.readouterr().err
        == f"takeoff: GPU metrics skipped: no GPU in CUDA_VISIBLE_DEVICES={visible!r}\n"
    )
    assert not fake_nvml.initialised


def test_an_nvml_error_stops_gpu_metrics_with_one_warning(
    fake_nvml: FakeNvml, capsys: pytest.CaptureFixture[str]
) -> None:
    gpus = GpuSampler.open()
    assert gpus is not None
    fake_nvml.failure = FakeNvmlError(15)  # GPU is lost

    assert gpus.sample() == {}
    assert gpus.disabled
    assert not fake_nvml.initialised
    assert capsys.readouterr().err == "takeoff: GPU metrics stopped: NVML failed (NVML error 15)\n"
