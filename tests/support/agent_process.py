"""`hatchway-agent` as real subprocesses: enroll with a token, run with the bundled demo model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

DEMO_MODEL = "smollm2-135m-instruct"


def agent_cli(*args: str, config: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


class AgentProcess:
    """One agent: its own config file (so its own machine id), enrolled once, then run and stopped at will."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.name = name
        self.config = workdir / f"{name}.json"
        self.proc: subprocess.Popen[str] | None = None
        self.reader: threading.Thread | None = None
        self.lines: list[str] = []

    def enroll(self, plane: str, token: str) -> subprocess.CompletedProcess[str]:
        return agent_cli("enroll", "--plane", plane, "--token", token, "--name", self.name, config=self.config)

    def set_idle(self, **thresholds: float) -> None:
        doc = json.loads(self.config.read_text())
        doc["idle"] = thresholds
        self.config.write_text(json.dumps(doc))

    def start(self, *extra: str, slots: int = 1) -> None:
        args = ["run", "--demo", "--slots", str(slots), "--context", "1024", "--threads", "1", *extra]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", *args, "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        # The reader ends at EOF once the process is gone; closing the pipe under it would raise in its thread.
        if self.reader is not None:
            self.reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.wait()
        self.proc = None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.wait()
        self.proc = None


def describe(result: subprocess.CompletedProcess[Any]) -> str:
    return f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
