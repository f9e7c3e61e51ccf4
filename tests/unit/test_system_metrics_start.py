"""What system metrics cost a job that has no GPU or ends early: NVML is loaded only where a GPU driver
can be, and only once the first sample is due (docs/design.md §8, "System metrics")."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

import takeoff._system
from takeoff._system import GpuSampler, SystemMetrics


@pytest.fixture
def imported(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The modules ``takeoff._system`` imports by name from now on (NVML's, ``pynvml``, would be one)."""
    names: list[str] = []
    real = importlib.import_module

    def recording(name: str, package: str | None = None) -> ModuleType:
        names.append(name)
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", recording)  # the module takeoff._system calls
    return names


def test_without_a_gpu_driver_nvml_is_not_loaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, imported: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(takeoff._system, "NVIDIA_DRIVER_FILE", tmp_path / "no-driver")
    monkeypatch.setattr(takeoff._system, "GPU_DEVICE_FILES", (str(tmp_path / "no-device"),))

    assert GpuSampler.open() is None
    assert imported == []
    assert capsys.readouterr().err == ""  # no GPU to miss: nothing said


def test_a_run_over_before_its_first_sample_loads_no_gpu_library(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, imported: list[str]
) -> None:
    driver = tmp_path / "version"
    driver.write_text("NVRM version: fake\n")
    monkeypatch.setattr(takeoff._system, "NVIDIA_DRIVER_FILE", driver)  # a machine with the driver
    samples: list[object] = []

    SystemMetrics(samples.append, 3600, tmp_path).stop()  # joins the thread

    assert imported == []
    assert samples == []
