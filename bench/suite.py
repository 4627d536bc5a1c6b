"""What the benchmarks of one `bench/run.py` invocation share: a work folder, the processes it owns, the CPU
layout, one mock upstream and one closed-loop load generator (both started on first use), and the results of
the benchmarks already run (the overload benchmark reads the capacity the gateway benchmark measured)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import Pinning
from loadgen import ClosedLoop
from upstream import Upstream, start_upstream


@dataclass
class Suite:
    stack: contextlib.ExitStack
    workdir: Path
    pinning: Pinning
    quick: bool
    results_dir: Path
    prefer_nginx: bool = True
    prefer_wrk: bool = True
    # A git ref: the gateway benchmark runs that version of the plane too, side by side with this one.
    baseline: str | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    _upstream: Upstream | None = None
    _closed_loop: ClosedLoop | None = None

    @property
    def upstream(self) -> Upstream:
        if self._upstream is None:
            self._upstream = start_upstream(self.stack, self.workdir, self.pinning, self.prefer_nginx)
        return self._upstream

    @property
    def closed_loop(self) -> ClosedLoop:
        if self._closed_loop is None:
            self._closed_loop = ClosedLoop(self.workdir, self.pinning, self.prefer_wrk)
        return self._closed_loop

    def subdir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(exist_ok=True)
        return path
