"""idle-only mode counts the owner's GPU use: the NVML utilisation of processes other than the agent, read from a
scripted NVML (pynvml's functions replaced; no GPU needed), pauses the node; the agent's own use does not."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pynvml  # type: ignore[import-untyped, import-not-found, unused-ignore]
import pytest

from agent.config import IdleThresholds
from agent.hardware import OthersGpuUse
from agent.idle import IdleGate, OwnerLoad, psutil_probe

ME = os.getpid()
OWNER = ME + 1  # another process: the owner's game, say
THRESHOLDS = IdleThresholds(cpu_percent=50, gpu_percent=30, pause_after_s=1.0, resume_after_s=2.0)


def nvml_error(code: int) -> Callable[..., Any]:
    def fail(*_: Any) -> Any:
        raise pynvml.NVMLError(code)

    return fail


def scripted_nvml(
    monkeypatch: pytest.MonkeyPatch,
    *,
    samples: list[tuple[int, int]] | Callable[..., Any],
    device_percent: int = 0,
    running: list[int] | None = None,
) -> None:
    """One GPU: per-process samples (pid, SM %) or what answers for them, the device's utilisation, and the
    processes holding it (None: NVML will not list them)."""
    processes = (lambda _: [SimpleNamespace(pid=pid) for pid in running]) if running is not None else None
    answers: dict[str, Any] = {
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlDeviceGetCount": lambda: 1,
        "nvmlDeviceGetHandleByIndex": lambda index: f"gpu{index}",
        "nvmlDeviceGetUtilizationRates": lambda _: SimpleNamespace(gpu=device_percent, memory=0),
        "nvmlDeviceGetProcessUtilization": samples
        if callable(samples)
        else lambda _, since: [SimpleNamespace(pid=pid, smUtil=sm, timeStamp=since + 1) for pid, sm in samples],
        "nvmlDeviceGetComputeRunningProcesses": processes or nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED),
        "nvmlDeviceGetGraphicsRunningProcesses": processes or nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED),
    }
    for name, answer in answers.items():
        monkeypatch.setattr(pynvml, name, answer)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def paused_after(seconds: float, gpu: OthersGpuUse) -> bool:
    """An idle-only gate reading only the GPU (the CPU idle), read every second for `seconds`."""
    clock = Clock()
    gate = IdleGate(THRESHOLDS, lambda: OwnerLoad(cpu_percent=0.0, gpu_percent=gpu()), clock)
    for _ in range(int(seconds)):
        clock.now += 1.0
        gate.update()
    return gate.paused


def test_other_processes_gpu_use_pauses_an_idle_only_node(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_nvml(monkeypatch, samples=[(OWNER, 60), (OWNER, 80), (ME, 10)])
    gpu = OthersGpuUse()
    assert gpu() == pytest.approx(70.0)  # the owner's samples averaged, the agent's left out
    assert paused_after(3, gpu)


def test_the_agent_s_own_gpu_use_does_not_pause_it(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_nvml(monkeypatch, samples=[(ME, 95), (ME, 99)], device_percent=99)
    gpu = OthersGpuUse()
    assert gpu() == 0.0
    assert not paused_after(3, gpu)


def test_no_samples_in_the_window_reads_as_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_nvml(monkeypatch, samples=nvml_error(pynvml.NVML_ERROR_NOT_FOUND), device_percent=90)
    assert OthersGpuUse()() == 0.0


def test_without_per_process_figures_the_device_counts_when_another_process_holds_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scripted_nvml(
        monkeypatch, samples=nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED), device_percent=75, running=[ME, OWNER]
    )
    assert OthersGpuUse()() == 75.0


def test_without_per_process_figures_the_device_is_the_agent_s_when_only_it_holds_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scripted_nvml(monkeypatch, samples=nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED), device_percent=75, running=[ME])
    assert OthersGpuUse()() == 0.0


def test_without_any_process_figures_the_device_s_utilisation_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_nvml(monkeypatch, samples=nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED), device_percent=40)
    assert OthersGpuUse()() == 40.0


def test_no_nvml_reads_as_no_gpu_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynvml, "nvmlInit", nvml_error(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    assert OthersGpuUse()() == 0.0
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert OthersGpuUse()() == 0.0


def test_the_machine_probe_reads_the_owner_s_gpu_use_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_nvml(monkeypatch, samples=[(OWNER, 55), (ME, 40)])
    assert psutil_probe()().gpu_percent == pytest.approx(55.0)
