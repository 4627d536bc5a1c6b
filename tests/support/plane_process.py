"""`hatchway serve` as a real subprocess, for tests of start-up, signals and shutdown."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

LISTENING = re.compile(r"listening on (http://\S+)")


class PlaneProcess:
    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--port", "0", "--data-dir", str(data_dir), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # No shedding on loop lag: these machines are shared, and a test's verdict must not depend on it.
            env={**os.environ, "HATCHWAY_GRPC_PORT": "0", "HATCHWAY_OVERLOAD_LAG_MS": "0", **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = self.wait_for(LISTENING).group(1)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: re.Pattern[str], timeout_s: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := pattern.search(line):
                    return match
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"plane never printed {pattern.pattern!r}; output:\n{self.output}")

    def terminate(self, timeout_s: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"plane still running {timeout_s}s after SIGTERM; output:\n{self.output}\n{self.stacks()}"
            ) from exc
        self._close()
        return code

    def stacks(self) -> str:
        """Where the plane's threads are, for a failure message (py-spy is in the dev extra)."""
        spy = Path(sys.executable).parent / "py-spy"
        if not spy.exists():
            return "(no py-spy to show the plane's stacks)"
        dump = subprocess.run([str(spy), "dump", "--pid", str(self.proc.pid)], capture_output=True, text=True)
        return dump.stdout + dump.stderr

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
