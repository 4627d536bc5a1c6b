"""What the machine has (`collect`) and how busy it is (`load`), as the agent reports them to the plane.

GPUs are read through NVML (`pynvml`, from the optional `nvidia-ml-py` package). A machine without it, without an
NVIDIA driver or without an NVIDIA GPU is the normal case: `nvml_status` says which, and nothing raises. Every NVML
call is optional, because drivers differ in what they implement and allow; a field NVML would not give is None.

`OthersGpuUse` reads how busy the GPUs are with work other than the agent's, for idle-only mode (agent.idle).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar, cast

import psutil  # type: ignore[import-untyped, unused-ignore]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    vram_total_bytes: int | None
    vram_free_bytes: int | None
    utilization_percent: float | None
    driver: str | None


@dataclass(frozen=True)
class Hardware:
    hostname: str
    os: str
    cpu_model: str
    cpu_count: int
    ram_total_bytes: int
    ram_available_bytes: int
    gpus: list[Gpu]
    nvml_status: str  # "ok", or why there are no GPUs: "not installed", "no NVIDIA driver", ...


@dataclass(frozen=True)
class Load:
    """cpu_percent: the whole machine, since the previous call (the first call reads 0.0); gpu: the busiest GPU."""

    cpu_percent: float
    gpu_utilization_percent: float | None


def collect() -> Hardware:
    gpus, nvml_status = read_gpus()
    memory = psutil.virtual_memory()
    return Hardware(
        hostname=socket.gethostname(),
        os=platform.platform(),
        cpu_model=_cpu_model(),
        cpu_count=int(psutil.cpu_count(logical=True) or os.cpu_count() or 1),
        ram_total_bytes=int(memory.total),
        ram_available_bytes=int(memory.available),
        gpus=gpus,
        nvml_status=nvml_status,
    )


def load() -> Load:
    gpus, _ = read_gpus()
    readings = [gpu.utilization_percent for gpu in gpus if gpu.utilization_percent is not None]
    cpu_percent = float(psutil.cpu_percent(interval=None))
    return Load(cpu_percent=cpu_percent, gpu_utilization_percent=max(readings, default=None))


def read_gpus() -> tuple[list[Gpu], str]:
    """The NVIDIA GPUs NVML can see, and the NVML status."""
    nvml = _import_nvml()
    if nvml is None:
        return [], "not installed"
    try:
        nvml.nvmlInit()
    except Exception as exc:
        return [], _init_failure(nvml, exc)
    try:
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            return [], f"NVML error: {exc}"
        driver = _optional(lambda: _text(nvml.nvmlSystemGetDriverVersion()))
        gpus = [_read_gpu(nvml, index, driver) for index in range(count)]
        return gpus, "ok" if gpus else "no NVIDIA GPU"
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def _import_nvml() -> ModuleType | None:
    try:
        import pynvml  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError:
        return None
    return cast(ModuleType, pynvml)


def _init_failure(nvml: Any, exc: Exception) -> str:
    reasons = {
        getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", None): "no NVIDIA driver",
        getattr(nvml, "NVML_ERROR_DRIVER_NOT_LOADED", None): "NVIDIA driver not loaded",
        getattr(nvml, "NVML_ERROR_NO_PERMISSION", None): "no permission to use NVML",
    }
    return reasons.get(getattr(exc, "value", None)) or f"NVML error: {exc}"


def _read_gpu(nvml: Any, index: int, driver: str | None) -> Gpu:
    handle = _optional(lambda: nvml.nvmlDeviceGetHandleByIndex(index))
    if handle is None:
        return Gpu(index, "unknown", None, None, None, driver)
    memory = _optional(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
    utilization = _optional(lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
    return Gpu(
        index=index,
        name=_optional(lambda: _text(nvml.nvmlDeviceGetName(handle))) or "unknown",
        vram_total_bytes=int(memory.total) if memory is not None else None,
        vram_free_bytes=int(memory.free) if memory is not None else None,
        utilization_percent=utilization,
        driver=driver,
    )


class OthersGpuUse:
    """The GPU utilisation of processes other than `own_pids` (the agent's: llama.cpp runs in it), in percent of
    the busiest GPU: what the machine's owner uses, which idle-only mode pauses for as it does for CPU.

    Per process from `nvmlDeviceGetProcessUtilization` (each process's samples of the last `window_s` averaged,
    the others' summed). Where the driver gives no per-process figures (some consumer cards, WDDM on Windows):
    the device's utilisation, but only when a process other than the agent holds the GPU (the running compute and
    graphics processes), so the agent's own generating never pauses it; and where NVML lists no processes
    either, the device's utilisation as it is. 0.0 without NVML or without a GPU. NVML is initialised once.
    """

    def __init__(self, own_pids: frozenset[int] | None = None, window_s: float = 2.0) -> None:
        self.own_pids = own_pids if own_pids is not None else frozenset({os.getpid()})
        self.window_s = window_s
        self._nvml: Any = None
        self._failed = False

    def __call__(self) -> float:
        nvml = self._init()
        if nvml is None:
            return 0.0
        count = _optional(lambda: int(nvml.nvmlDeviceGetCount())) or 0
        readings = [self._device(nvml, index) for index in range(count)]
        return max((r for r in readings if r is not None), default=0.0)

    def _init(self) -> Any:
        if self._nvml is None and not self._failed:
            nvml = _import_nvml()
            try:
                if nvml is None:
                    raise RuntimeError("pynvml is not installed")
                nvml.nvmlInit()
                self._nvml = nvml
            except Exception as exc:
                logger.debug("no NVML for the owner's GPU use: %s", exc)
                self._failed = True
        return self._nvml

    def _device(self, nvml: Any, index: int) -> float | None:
        handle = _optional(lambda: nvml.nvmlDeviceGetHandleByIndex(index))
        if handle is None:
            return None
        per_process = self._per_process(nvml, handle)
        if per_process is not None:
            return per_process
        device = _optional(lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
        pids = _running_pids(nvml, handle)
        if pids is not None and not (pids - self.own_pids):
            return 0.0  # only the agent (or nobody) holds this GPU: its utilisation is the agent's own
        return device

    def _per_process(self, nvml: Any, handle: Any) -> float | None:
        since_us = int((time.time() - self.window_s) * 1_000_000)
        try:
            samples = nvml.nvmlDeviceGetProcessUtilization(handle, since_us)
        except Exception as exc:
            # No sample since `since_us`: nobody used the GPU. Anything else: no per-process figures here.
            no_samples = (getattr(nvml, "NVML_ERROR_NOT_FOUND", None), getattr(nvml, "NVML_SUCCESS", 0))
            if getattr(exc, "value", None) in no_samples:
                return 0.0
            logger.debug("NVML gives no per-process utilisation: %s", exc)
            return None
        per_pid: dict[int, list[float]] = {}
        for sample in samples:
            per_pid.setdefault(int(sample.pid), []).append(float(sample.smUtil))
        others = sum(sum(v) / len(v) for pid, v in per_pid.items() if pid not in self.own_pids)
        return min(others, 100.0)


def _running_pids(nvml: Any, handle: Any) -> set[int] | None:
    """The processes holding the GPU (compute and graphics); None when NVML lists neither."""
    lists = [
        _optional(lambda: nvml.nvmlDeviceGetComputeRunningProcesses(handle)),
        _optional(lambda: nvml.nvmlDeviceGetGraphicsRunningProcesses(handle)),
    ]
    if all(found is None for found in lists):
        return None
    return {int(process.pid) for found in lists if found is not None for process in found}


def _optional(read: Callable[[], T]) -> T | None:
    # Any exception, not only NVMLError: a pynvml built for another driver can fail in its own ways, and a
    # hardware report is never worth crashing the agent for.
    try:
        return read()
    except Exception as exc:
        logger.debug("NVML call failed: %s", exc)
        return None


def _text(value: str | bytes) -> str:
    # pynvml returns bytes or str depending on its version.
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _cpu_model() -> str:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    elif sys.platform == "darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            command = ["sysctl", "-n", "machdep.cpu.brand_string"]
            brand = subprocess.run(command, capture_output=True, text=True, timeout=5, check=True).stdout.strip()
            if brand:
                return brand
    return platform.processor() or platform.machine() or "unknown"
