"""What every benchmark shares: child processes and CPU pinning, process sampling, statistics, machine facts,
tools installed on demand, and the JSON files under bench/results/.

CPU layout on a machine with two cores or more (`Pinning`): the process under test (Hatchway, the bare relay,
LiteLLM) runs on CPU 0 alone; the mock upstream, the load generator and this runner share CPU 1. With fewer
cores, or without `taskset`, nothing is pinned and the results say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib.metadata
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
import psutil  # type: ignore[import-untyped, unused-ignore]

_T = TypeVar("_T")

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
HOST = "127.0.0.1"
LISTENING = re.compile(r"listening on http://[^:\s]+:(\d+)")
MIB = 2**20


class BenchError(RuntimeError):
    """A setup or load failure that makes the figures meaningless; reported without a traceback."""


# -- CPU pinning -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pinning:
    """Which CPU the process under test gets, and which the load side (mock, load generator, runner) shares."""

    sut_cpu: int | None
    load_cpu: int | None
    note: str

    @classmethod
    def detect(cls, enabled: bool = True) -> Pinning:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if not enabled:
            return cls(None, None, "pinning disabled (--no-pin): every process may run on any CPU")
        if len(cpus) < 2 or shutil.which("taskset") is None:
            return cls(
                None,
                None,
                f"not pinned: {len(cpus)} usable CPU(s), taskset {'found' if shutil.which('taskset') else 'missing'}",
            )
        return cls(
            cpus[0],
            cpus[1],
            f"process under test pinned to CPU {cpus[0]}; mock upstream, load generator and runner to CPU {cpus[1]}",
        )

    def sut(self, argv: Sequence[str]) -> list[str]:
        return _taskset(self.sut_cpu, argv)

    def load(self, argv: Sequence[str]) -> list[str]:
        return _taskset(self.load_cpu, argv)

    @contextlib.contextmanager
    def runner_on_load_cpu(self) -> Iterator[None]:
        """Pin this process (the Python load generator, fake agents) to the load CPU for a block."""
        if self.load_cpu is None or not hasattr(os, "sched_setaffinity"):
            yield
            return
        previous = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {self.load_cpu})
        try:
            yield
        finally:
            os.sched_setaffinity(0, previous)

    def as_dict(self) -> dict[str, Any]:
        return {"sut_cpu": self.sut_cpu, "load_cpu": self.load_cpu, "note": self.note}


def _taskset(cpu: int | None, argv: Sequence[str]) -> list[str]:
    return list(argv) if cpu is None else ["taskset", "-c", str(cpu), *argv]


# -- child processes ---------------------------------------------------------------------------------------


@dataclass
class Child:
    """A subprocess whose stdout and stderr both go to one log file, scanned for the lines it prints."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    started_at: float = field(default_factory=time.perf_counter)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")


@contextlib.contextmanager
def child_process(
    name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path = REPO_ROOT
) -> Iterator[Child]:
    with log_path.open("wb") as log:
        # A new session keeps a terminal Ctrl-C from reaching the children; the finally below stops them.
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env if env is not None else child_env(),
            cwd=cwd,
            start_new_session=True,
        )
    try:
        yield Child(name, proc, log_path)
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`; children the process forked are stopped with it."""
    if proc.poll() is not None:
        return
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        kids = []
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace_s)
    for kid in kids:
        with contextlib.suppress(psutil.Error):
            if kid.is_running():
                kid.kill()


def wait_for_match(child: Child, pattern: re.Pattern[str], timeout_s: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = pattern.search(child.log_text())
        if match:
            return match
        child.check_alive()
        time.sleep(0.02)
    raise BenchError(f"{child.name} printed no {pattern.pattern!r} line in {timeout_s:.0f}s:\n{child.log_tail()}")


def wait_for_port(child: Child, timeout_s: float) -> int:
    """The port from the child's 'listening on http://HOST:PORT' line."""
    return int(wait_for_match(child, LISTENING, timeout_s).group(1))


def wait_for_tcp(child: Child, port: int, timeout_s: float) -> None:
    """Until something accepts connections on HOST:port (for servers that print no listening line)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        child.check_alive()
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"{child.name} did not accept connections on port {port} in {timeout_s:.0f}s:\n{child.log_tail()}")


def free_port() -> int:
    """A port that was free a moment ago, for servers that cannot bind port 0 and report it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    # Loopback traffic must never detour through a proxy configured in the caller's environment.
    return {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", **extra}


# -- sampling a process tree -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessSample:
    at: float
    cpu_s: float
    rss_bytes: int
    fds: int
    threads: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "t_s": round(self.at, 3),
            "cpu_s": round(self.cpu_s, 4),
            "rss_mib": round(self.rss_bytes / MIB, 2),
            "fds": self.fds,
            "threads": self.threads,
        }


def sample_process(pid: int, started_at: float = 0.0) -> ProcessSample:
    """CPU time, RSS, open fds and threads of a process and everything it forked (LiteLLM's workers)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error as exc:
        raise BenchError(f"process {pid} is gone: {exc}") from exc
    cpu = 0.0
    rss = fds = threads = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error), proc.oneshot():
            times = proc.cpu_times()
            cpu += float(times.user + times.system)
            rss += int(proc.memory_info().rss)
            fds += int(proc.num_fds())
            threads += int(proc.num_threads())
    return ProcessSample(
        time.perf_counter() - started_at if started_at else time.perf_counter(), cpu, rss, fds, threads
    )


def cpu_seconds(pid: int) -> float:
    return sample_process(pid).cpu_s


async def wait_until_quiet(pids: list[int], limit_s: float = 10.0) -> None:
    """Until the processes use under 5% of a core together over 100 ms (at most `limit_s`): a process still
    finishing the last measurement (LiteLLM working off a c=128 backlog, llama.cpp's threads winding down)
    would take the next one's CPU."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        before = sum(sample_process(pid).cpu_s for pid in pids)
        await asyncio.sleep(0.1)
        if sum(sample_process(pid).cpu_s for pid in pids) - before < 0.005:
            return


class PeakSampler:
    """Samples a process tree's RSS every `interval_s` while a block runs; `peak_rss` is the highest seen."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_rss = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PeakSampler:
        self.peak_rss = sample_process(self.pid).rss_bytes
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(BenchError):
            self.peak_rss = max(self.peak_rss, sample_process(self.pid).rss_bytes)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            with contextlib.suppress(BenchError):
                self.peak_rss = max(self.peak_rss, sample_process(self.pid).rss_bytes)


class MachineLoad:
    """CPU time the whole machine spent busy during a block, and how much of it was not ours.

    Other people's builds and tests on a shared machine show up as `foreign_cpu_percent`: the share of one
    core that processes outside this runner's tree (its live children, and those it already reaped, like wrk)
    used, on average, while the block ran.
    """

    def __init__(self) -> None:
        self.wall_s = 0.0
        self.busy_cpu_s = 0.0
        self.own_cpu_s = 0.0

    @staticmethod
    def _own() -> float:
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        return sample_process(os.getpid()).cpu_s + reaped.ru_utime + reaped.ru_stime

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()
        return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))

    def __enter__(self) -> MachineLoad:
        self._start = (time.perf_counter(), self._busy(), self._own())
        return self

    def __exit__(self, *exc: object) -> None:
        started, busy, own = self._start
        self.wall_s = time.perf_counter() - started
        self.busy_cpu_s = self._busy() - busy
        self.own_cpu_s = self._own() - own

    @property
    def foreign_cpu_percent(self) -> float:
        if self.wall_s <= 0:
            return 0.0
        return max(0.0, 100.0 * (self.busy_cpu_s - self.own_cpu_s) / self.wall_s)

    def as_dict(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 1),
            "machine_busy_cpu_s": round(self.busy_cpu_s, 1),
            "own_cpu_s": round(self.own_cpu_s, 1),
            "foreign_cpu_percent_of_one_core": round(self.foreign_cpu_percent, 1),
        }


# -- statistics --------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile; 0.0 for no samples so a failed run still prints."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def summary(values: Sequence[float], digits: int = 3) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 50), digits),
        "p90": round(percentile(values, 90), digits),
        "p99": round(percentile(values, 99), digits),
        "n": len(values),
    }


# -- tools from Debian's packages --------------------------------------------------------------------------


def ensure_tool(binary: str, package: str) -> str | None:
    """The path of `binary`, installing Debian's `package` with apt-get when it is missing and we are root.

    Returns None (and says why) when it cannot be had; the caller falls back and records the fact.
    """
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        log(f"{binary} not found, and apt-get cannot install it here (not root, or no apt-get)")
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "-q", "--no-install-recommends", package]
    for attempt in ("install", "update, then install"):
        log(f"{binary} not found: running `apt-get install -y {package}` ({attempt})")
        if attempt != "install":
            subprocess.run([apt, "update", "-q"], env=env, capture_output=True, timeout=300, check=False)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600, check=False)
        found = shutil.which(binary, path="/usr/sbin:/usr/bin:/sbin:/bin")
        if result.returncode == 0 and found:
            return found
    log(f"could not install {package}: {result.stderr.strip()[-500:]}")
    return None


def log(message: str) -> None:
    """Progress and notes go to stderr, so stdout carries only the tables."""
    print(message, file=sys.stderr, flush=True)


# -- machine facts -----------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import grpc

    versions = {
        name: _version(name)
        for name in ("aiohttp", "orjson", "uvloop", "grpcio", "protobuf", "psutil", "llama_cpp_python", "hatchway")
    }
    versions["grpcio"] = versions["grpcio"] or grpc.__version__
    return {
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "versions": versions,
        "git": _git(),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git() -> dict[str, Any]:
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        return result.stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except OSError:
        return {"commit": None, "dirty": None}


def tool_version(argv: list[str]) -> str | None:
    """The first line a tool prints about its version (nginx prints it on stderr)."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else None


# -- results -----------------------------------------------------------------------------------------------


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS) + b"\n")


def run_async(main: Coroutine[Any, Any, _T]) -> _T:
    """Run on uvloop when installed, so the Python load generator is as cheap as it can be."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
