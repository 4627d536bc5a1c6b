"""idle-only mode: take jobs only while the machine's owner is not using it.

A `LoadProbe` reports the owner's load (the machine's, minus the agent's own work); `IdleGate` turns a series of
readings into paused / not paused with hysteresis. Probes are pluggable: `psutil_probe` reads the machine,
`file_probe` reads a JSON file (`{"cpu_percent": 80, "gpu_percent": 0}`) so tests and scripts can drive it.
The owner's GPU use is the NVML utilisation of processes other than the agent (agent.hardware.OthersGpuUse),
counted against `gpu_percent` as the CPU's is against `cpu_percent`.

The agent reads the gate on its own cadence, not the plane's heartbeat: every `SAMPLE_INTERVAL_S`, and at the
moment a pending change's delay runs out (`due_in`). So a pause comes between `pause_after_s` and
`pause_after_s + SAMPLE_INTERVAL_S` after the owner's load went over a threshold, and a resume likewise; a spike
shorter than `pause_after_s` (or one that falls between two readings) changes nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.config import IdleThresholds
from agent.hardware import OthersGpuUse

# How often the owner's load is read (psutil's CPU figure is the average since the previous reading).
SAMPLE_INTERVAL_S = 1.0


@dataclass(frozen=True)
class OwnerLoad:
    cpu_percent: float
    gpu_percent: float = 0.0


LoadProbe = Callable[[], OwnerLoad]


def psutil_probe(gpu_percent: Callable[[], float] | None = None) -> LoadProbe:
    """The machine's CPU use minus this process's (llama.cpp threads included), so generating is not mistaken
    for the owner being busy; and the GPUs' use by other processes (`gpu_percent`, by default read from NVML)."""
    read_gpu: Callable[[], float] = gpu_percent if gpu_percent is not None else OthersGpuUse()
    me = psutil.Process()
    me.cpu_percent(None)
    psutil.cpu_percent(None)
    cpus = psutil.cpu_count() or 1

    def probe() -> OwnerLoad:
        machine = psutil.cpu_percent(None)
        own = me.cpu_percent(None) / cpus
        return OwnerLoad(cpu_percent=max(0.0, machine - own), gpu_percent=read_gpu())

    return probe


def file_probe(path: Path) -> LoadProbe:
    def probe() -> OwnerLoad:
        try:
            doc = json.loads(path.read_text())
            return OwnerLoad(float(doc.get("cpu_percent", 0.0)), float(doc.get("gpu_percent", 0.0)))
        except (OSError, ValueError, AttributeError):
            return OwnerLoad(0.0)

    return probe


class IdleGate:
    def __init__(self, thresholds: IdleThresholds, probe: LoadProbe, clock: Callable[[], float] = time.monotonic):
        self.thresholds = thresholds
        self.probe = probe
        self.clock = clock
        self.paused = False
        self._since: float | None = None

    def due_in(self) -> float:
        """Seconds until the next reading: the sampling interval, or sooner when a pending change's delay ends."""
        if self._since is None:
            return SAMPLE_INTERVAL_S
        needed = self.thresholds.resume_after_s if self.paused else self.thresholds.pause_after_s
        return max(0.0, min(SAMPLE_INTERVAL_S, self._since + needed - self.clock()))

    def update(self) -> bool:
        """Read the probe once; True when the paused state changed."""
        load = self.probe()
        busy = load.cpu_percent > self.thresholds.cpu_percent or load.gpu_percent > self.thresholds.gpu_percent
        # Only a reading that argues for a change starts (or keeps) the clock; one that agrees with the
        # current state resets it, so a short spike or a short lull changes nothing.
        if busy == self.paused:
            self._since = None
            return False
        now = self.clock()
        if self._since is None:
            self._since = now
        needed = self.thresholds.pause_after_s if busy else self.thresholds.resume_after_s
        if now - self._since < needed:
            return False
        self.paused, self._since = busy, None
        return True
