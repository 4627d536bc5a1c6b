"""Hardware facts: sane without NVIDIA, and partial rather than absent when single NVML calls fail."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import pytest

from agent import hardware

pynvml = pytest.importorskip("pynvml")

GIB = 1024**3


def raising(*_: Any) -> Any:
    raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)


def no_driver() -> None:
    raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML as a driver with two GPUs answers it, whatever this machine has."""
    answers: dict[str, Any] = {
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlDeviceGetCount": lambda: 2,
        "nvmlSystemGetDriverVersion": lambda: "550.54",
        "nvmlDeviceGetHandleByIndex": lambda index: f"handle-{index}",
        "nvmlDeviceGetName": lambda handle: b"NVIDIA H100" if handle == "handle-0" else "NVIDIA L4",
        "nvmlDeviceGetMemoryInfo": lambda handle: SimpleNamespace(total=80 * GIB, free=60 * GIB, used=20 * GIB),
        "nvmlDeviceGetUtilizationRates": lambda handle: SimpleNamespace(gpu=30 if handle == "handle-0" else 70),
    }
    for name, answer in answers.items():
        monkeypatch.setattr(pynvml, name, answer)


def test_collect_describes_this_machine() -> None:
    facts = hardware.collect()
    assert facts.hostname and facts.os and facts.cpu_model
    assert facts.cpu_count >= 1
    assert 0 < facts.ram_available_bytes <= facts.ram_total_bytes
    if facts.gpus:
        assert facts.nvml_status == "ok"
    else:
        assert facts.nvml_status != "ok"  # and says why, e.g. "no NVIDIA driver" on this CI machine


def test_no_nvidia_driver_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    facts = hardware.collect()
    assert (facts.gpus, facts.nvml_status) == ([], "no NVIDIA driver")


def test_nvml_not_installed_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert hardware.collect().nvml_status == "not installed"


def test_gpus_are_read_through_nvml(two_gpus: None) -> None:
    facts = hardware.collect()
    assert facts.nvml_status == "ok"
    assert [gpu.name for gpu in facts.gpus] == ["NVIDIA H100", "NVIDIA L4"]
    first = facts.gpus[0]
    assert (first.index, first.vram_total_bytes, first.vram_free_bytes) == (0, 80 * GIB, 60 * GIB)
    assert (first.utilization_percent, first.driver) == (30.0, "550.54")


def test_load_reports_the_busiest_gpu(two_gpus: None) -> None:
    load = hardware.load()
    assert load.gpu_utilization_percent == 70.0
    assert 0.0 <= load.cpu_percent <= 100.0


def test_load_without_gpus_has_no_gpu_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert hardware.load().gpu_utilization_percent is None


@pytest.mark.parametrize(
    ("function", "missing"),
    [
        ("nvmlSystemGetDriverVersion", {"driver"}),
        ("nvmlDeviceGetName", set()),  # the name falls back to "unknown"
        ("nvmlDeviceGetMemoryInfo", {"vram_total_bytes", "vram_free_bytes"}),
        ("nvmlDeviceGetUtilizationRates", {"utilization_percent"}),
        ("nvmlDeviceGetHandleByIndex", {"vram_total_bytes", "vram_free_bytes", "utilization_percent"}),
        ("nvmlShutdown", set()),
    ],
)
def test_a_failing_nvml_call_leaves_only_its_fields_empty(
    two_gpus: None, monkeypatch: pytest.MonkeyPatch, function: str, missing: set[str]
) -> None:
    monkeypatch.setattr(pynvml, function, raising)
    facts = hardware.collect()
    assert facts.nvml_status == "ok"
    assert len(facts.gpus) == 2
    for gpu in facts.gpus:
        empty = {field for field, value in vars(gpu).items() if value is None}
        assert empty == missing


def test_failing_to_count_gpus_is_reported(two_gpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", raising)
    facts = hardware.collect()
    assert facts.gpus == []
    assert facts.nvml_status == "NVML error: Unknown Error"


def test_no_gpu_behind_a_working_driver_is_reported(two_gpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 0)
    facts = hardware.collect()
    assert (facts.gpus, facts.nvml_status) == ([], "no NVIDIA GPU")
