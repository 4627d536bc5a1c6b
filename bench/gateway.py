"""Gateway overhead: the same chat load sent to the mock upstream directly and through Hatchway.

    python bench/gateway.py [--requests N] [--concurrency 1,32] [--rounds 3] [--json OUT] [--direct-only]

The mock upstream and the Hatchway plane each run in their own subprocess on loopback; one keep-alive
aiohttp session generates load. Direct and Hatchway runs alternate within every round so machine noise
lands on both, and the figures are medians over rounds. The added latency is the median of the per-round
paired differences, which cancels drift that a difference of medians would keep.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import psutil  # type: ignore[import-untyped, unused-ignore]

_T = TypeVar("_T")

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
HOST = "127.0.0.1"
ADMIN_KEY = "hwa-bench-admin-key"
MOCK_KEY = "sk-mock"
MODEL = "gpt-4o-mini"
LISTENING = re.compile(r"listening on http://[^:]+:(\d+)")
MODES = {"non-stream": False, "stream": True}
LOW_CONCURRENCY_REQUESTS = 500
HIGH_CONCURRENCY_REQUESTS = 2000
REQUEST_TIMEOUT_S = 30.0


class BenchError(RuntimeError):
    """A setup or load failure that makes the figures meaningless; reported without a traceback."""


@dataclass(frozen=True)
class Target:
    name: str
    base_url: str
    api_key: str


@dataclass
class RunStats:
    """One timed run of N requests at fixed concurrency; latencies are of successful requests only."""

    requests: int
    elapsed_s: float
    latencies_s: list[float]
    errors: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return len(self.latencies_s) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        return percentile(self.latencies_s, q) * 1000.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": len(self.errors),
            "elapsed_s": round(self.elapsed_s, 4),
            "rps": round(self.rps, 1),
            "p50_ms": round(self.percentile_ms(50), 3),
            "p99_ms": round(self.percentile_ms(99), 3),
        }


@dataclass
class Row:
    target: str
    mode: str
    concurrency: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Child:
    """A subprocess whose stdout and stderr both go to one log file, scanned for the listening line."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# -- statistics ----------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile; 0.0 for no samples so a failed run still prints."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


# -- subprocesses --------------------------------------------------------------------------------------


@contextlib.contextmanager
def child_process(name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> Iterator[Child]:
    with log_path.open("wb") as log:
        # A new session keeps a terminal Ctrl-C from reaching the children; the finally below stops them.
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
    try:
        yield Child(name, proc, log_path)
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace_s)


def wait_for_port(child: Child, timeout_s: float) -> int:
    """The port from the child's 'listening on' line."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = LISTENING.search(child.log_path.read_text(errors="replace"))
        if match:
            return int(match.group(1))
        if child.proc.poll() is not None:
            raise BenchError(f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}")
        time.sleep(0.05)
    raise BenchError(f"{child.name} printed no 'listening on' line in {timeout_s:.0f}s:\n{child.log_tail()}")


def child_env(**extra: str) -> dict[str, str]:
    # Loopback traffic must never detour through a proxy configured in the caller's environment.
    return {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", **extra}


def start_upstream(stack: contextlib.ExitStack, workdir: Path, reply: str) -> str:
    argv = [sys.executable, str(BENCH_DIR / "_upstream.py"), "--host", HOST, "--port", "0", "--reply", reply]
    child = stack.enter_context(child_process("mock upstream", argv, workdir / "upstream.log", child_env()))
    return f"http://{HOST}:{wait_for_port(child, 20.0)}/v1"


def start_plane(stack: contextlib.ExitStack, workdir: Path, hatchway: Path) -> tuple[Child, str]:
    if not hatchway.exists():
        raise BenchError(f"{hatchway} not found (pip install -e . first, or pass --direct-only)")
    data_dir = workdir / "data"
    data_dir.mkdir()
    argv = [str(hatchway), "serve", "--host", HOST, "--port", "0", "--data-dir", str(data_dir)]
    env = child_env(HATCHWAY_ADMIN_KEY=ADMIN_KEY, HATCHWAY_LOG_LEVEL="warning")
    child = stack.enter_context(child_process("hatchway plane", argv, workdir / "plane.log", env))
    return child, f"http://{HOST}:{wait_for_port(child, 60.0)}"


def rss_bytes(pid: int) -> dict[str, int]:
    """RSS of the plane alone and with any worker processes it forked."""
    try:
        proc = psutil.Process(pid)
        own = int(proc.memory_info().rss)
        children = sum(int(kid.memory_info().rss) for kid in proc.children(recursive=True))
    except psutil.Error:
        return {}
    return {"rss_bytes": own, "rss_with_children_bytes": own + children}


# -- plane setup over the admin API --------------------------------------------------------------------


async def wait_ready(session: aiohttp.ClientSession, plane_url: str, child: Child, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise BenchError(f"hatchway plane exited with {child.proc.returncode}:\n{child.log_tail()}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(f"{plane_url}/readyz", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise BenchError(f"{plane_url}/readyz not 200 within {timeout_s:.0f}s:\n{child.log_tail()}")


async def admin_post(
    session: aiohttp.ClientSession, plane_url: str, path: str, payload: dict[str, Any]
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    timeout = aiohttp.ClientTimeout(total=10)
    async with session.post(plane_url + path, json=payload, headers=headers, timeout=timeout) as resp:
        text = await resp.text()
        if resp.status not in (200, 201):
            raise BenchError(f"POST {path} -> {resp.status}: {text[:500]}")
    data = orjson.loads(text)
    if not isinstance(data, dict):
        raise BenchError(f"POST {path} returned {text[:200]!r}, not an object")
    return data


async def configure_plane(session: aiohttp.ClientSession, plane_url: str, mock_url: str) -> str:
    """Create the bench org, an API key and the mock provider; return the key's secret."""
    await admin_post(session, plane_url, "/admin/v1/orgs", {"name": "bench"})
    key = await admin_post(session, plane_url, "/admin/v1/keys", {"org": "bench", "name": "bench"})
    provider = {
        "org": "bench",
        "name": "mock",
        "base_url": mock_url,
        "api_keys": [MOCK_KEY],
        "models": [{"alias": MODEL, "upstream": MODEL}],
    }
    await admin_post(session, plane_url, "/admin/v1/providers", provider)
    secret = key.get("key")
    if not isinstance(secret, str) or not secret:
        raise BenchError(f"POST /admin/v1/keys returned no 'key' secret: {key}")
    return secret


# -- load generation -----------------------------------------------------------------------------------


def chat_body(stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


async def one_request(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes, stream: bool
) -> str | None:
    """Send one chat completion and read the whole body; return why it failed, or None."""
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            payload = await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if resp.status != 200:
        return f"HTTP {resp.status}: {payload[:300]!r}"
    # Cheap shape checks: parsing every response would put the load generator's cost into the figures.
    if stream and not payload.rstrip().endswith(b"data: [DONE]"):
        return f"stream did not end with [DONE]: {payload[-200:]!r}"
    if not stream and not payload.startswith(b"{"):
        return f"not a JSON object: {payload[:200]!r}"
    return None


async def run_load(
    session: aiohttp.ClientSession, target: Target, stream: bool, concurrency: int, requests: int
) -> RunStats:
    url = f"{target.base_url}/chat/completions"
    headers = {"Authorization": f"Bearer {target.api_key}", "Content-Type": "application/json"}
    body = chat_body(stream)
    tickets = iter(range(requests))
    stats = RunStats(requests=requests, elapsed_s=0.0, latencies_s=[])

    async def worker() -> None:
        # Workers share one ticket iterator, so exactly `requests` requests go out whatever the concurrency.
        for _ in tickets:
            started = time.perf_counter()
            problem = await one_request(session, url, headers, body, stream)
            if problem is None:
                stats.latencies_s.append(time.perf_counter() - started)
            else:
                stats.errors.append(problem)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    stats.elapsed_s = time.perf_counter() - started
    return stats


async def warm_up(session: aiohttp.ClientSession, targets: list[Target], concurrency: int, requests: int) -> None:
    """Open the keep-alive pools and fail fast when a target does not answer at all."""
    for target in targets:
        for mode, stream in MODES.items():
            stats = await run_load(session, target, stream, concurrency, requests)
            if stats.errors:
                raise BenchError(
                    f"warm-up {target.name}/{mode}: {len(stats.errors)}/{requests} failed, first: {stats.errors[0]}"
                )


def requests_for(concurrency: int, override: int | None) -> int:
    if override is not None:
        return override
    return LOW_CONCURRENCY_REQUESTS if concurrency == 1 else HIGH_CONCURRENCY_REQUESTS


async def measure(
    session: aiohttp.ClientSession, targets: list[Target], args: argparse.Namespace
) -> dict[tuple[str, str, int], list[RunStats]]:
    runs: dict[tuple[str, str, int], list[RunStats]] = {}
    for mode, stream in MODES.items():
        for concurrency in args.concurrency:
            requests = requests_for(concurrency, args.requests)
            for round_index in range(args.rounds):
                for target in targets:
                    stats = await run_load(session, target, stream, concurrency, requests)
                    runs.setdefault((target.name, mode, concurrency), []).append(stats)
                    progress(target, mode, concurrency, round_index, stats)
                    if not stats.latencies_s:
                        raise BenchError(f"{target.name}/{mode}/c={concurrency}: every request failed")
    return runs


def progress(target: Target, mode: str, concurrency: int, round_index: int, stats: RunStats) -> None:
    print(
        f"  round {round_index + 1} {target.name:8} {mode:10} c={concurrency:<3} "
        f"{stats.rps:9.1f} req/s  p50 {stats.percentile_ms(50):7.2f} ms  p99 {stats.percentile_ms(99):7.2f} ms"
        + (f"  errors {len(stats.errors)}" if stats.errors else ""),
        file=sys.stderr,
        flush=True,
    )


# -- summarising ---------------------------------------------------------------------------------------


def summarise(runs: dict[tuple[str, str, int], list[RunStats]]) -> list[Row]:
    rows: list[Row] = []
    for (target, mode, concurrency), stats in runs.items():
        row = Row(
            target=target,
            mode=mode,
            concurrency=concurrency,
            requests=stats[0].requests,
            rps=round(median([run.rps for run in stats]), 1),
            p50_ms=round(median([run.percentile_ms(50) for run in stats]), 3),
            p99_ms=round(median([run.percentile_ms(99) for run in stats]), 3),
            errors=sum(len(run.errors) for run in stats),
            rounds=[run.as_dict() for run in stats],
        )
        direct = runs.get(("direct", mode, concurrency))
        if target != "direct" and direct is not None:
            row.added_p50_ms = paired_added_ms(stats, direct, 50)
            row.added_p99_ms = paired_added_ms(stats, direct, 99)
        rows.append(row)
    return rows


def paired_added_ms(runs: list[RunStats], direct: list[RunStats], q: float) -> float:
    """Median over rounds of (this run's percentile - the direct run's in the same round)."""
    deltas = [run.percentile_ms(q) - base.percentile_ms(q) for run, base in zip(runs, direct, strict=True)]
    return round(median(deltas), 3)


def format_table(rows: list[Row]) -> str:
    header = f"{'target':9} {'mode':10} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
    header += f"{'+p50 ms':>8} {'+p99 ms':>8} {'errors':>6}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.target:9} {row.mode:10} {row.concurrency:>4} {row.rps:>9.1f} {row.p50_ms:>8.2f} "
            f"{row.p99_ms:>8.2f} {_optional(row.added_p50_ms):>8} {_optional(row.added_p99_ms):>8} "
            f"{row.errors:>6}"
        )
    return "\n".join(lines)


def _optional(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def environment(loop_name: str) -> dict[str, Any]:
    return {
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "event_loop": loop_name,
        "versions": {name: _version(name) for name in ("aiohttp", "orjson", "uvloop", "hatchway")},
    }


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- orchestration -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help=f"requests per run (default {LOW_CONCURRENCY_REQUESTS} at c=1, {HIGH_CONCURRENCY_REQUESTS} otherwise)",
    )
    parser.add_argument("--concurrency", type=_int_list, default=[1, 32], help="comma-separated (default 1,32)")
    parser.add_argument("--rounds", type=int, default=3, help="direct/hatchway pairs per scenario (default 3)")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up requests per target and mode")
    parser.add_argument("--reply", default="Hello from mock", help="the mock upstream's answer")
    parser.add_argument("--json", type=Path, default=BENCH_DIR / "results" / "gateway.json")
    parser.add_argument("--direct-only", action="store_true", help="skip Hatchway; measure the mock alone")
    parser.add_argument("--hatchway", type=Path, default=Path(sys.executable).parent / "hatchway")
    parser.add_argument("--deadline-s", type=float, default=900.0, help="abort the whole run after this")
    args = parser.parse_args(argv)
    if (args.requests is not None and args.requests < 1) or args.rounds < 1 or args.warmup < 0:
        parser.error("--requests and --rounds must be positive, --warmup non-negative")
    return args


def _int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError("expected positive integers like 1,32")
    return values


async def bench(
    args: argparse.Namespace, mock_url: str, plane: tuple[Child, str] | None
) -> tuple[list[Row], dict[str, Any]]:
    connector = aiohttp.TCPConnector(limit=2 * max(args.concurrency), ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        targets = [Target("direct", mock_url, MOCK_KEY)]
        memory: dict[str, Any] = {}
        if plane is not None:
            child, plane_url = plane
            await wait_ready(session, plane_url, child, 60.0)
            secret = await configure_plane(session, plane_url, mock_url)
            targets.append(Target("hatchway", f"{plane_url}/v1", secret))
            memory["before"] = rss_bytes(child.proc.pid)
        if args.warmup:
            await warm_up(session, targets, max(args.concurrency), args.warmup)
        runs = await measure(session, targets, args)
        if plane is not None:
            memory["after"] = rss_bytes(plane[0].proc.pid)
    return summarise(runs), memory


def run_async(main: Coroutine[Any, Any, _T]) -> tuple[_T, str]:
    """Run on uvloop when installed, so the load generator is as cheap as the hops it measures."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main), "asyncio"
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main), "uvloop"


def footer(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"python {env['python']}, aiohttp {env['versions']['aiohttp']}, {env['event_loop']} load generator, "
        f"{env['cpu_count']} CPUs"
    ]
    after = report["plane_memory"].get("after")
    if after:
        mib = 2**20
        lines.append(
            f"plane RSS after run: {after['rss_bytes'] / mib:.1f} MiB "
            f"({after['rss_with_children_bytes'] / mib:.1f} MiB with children)"
        )
    return "\n".join(lines)


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hatchway-bench-")))
        mock_url = start_upstream(stack, workdir, args.reply)
        plane = None if args.direct_only else start_plane(stack, workdir, args.hatchway)

        async def timed() -> tuple[list[Row], dict[str, Any]]:
            async with asyncio.timeout(args.deadline_s):
                return await bench(args, mock_url, plane)

        try:
            (rows, memory), loop_name = run_async(timed())
        except TimeoutError:
            raise BenchError(f"gave up after --deadline-s {args.deadline_s:.0f}s") from None
    return rows, {
        "environment": environment(loop_name),
        "config": {
            "requests": {str(c): requests_for(c, args.requests) for c in args.concurrency},
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "reply": args.reply,
            "direct_only": args.direct_only,
        },
        "results": [asdict(row) for row in rows],
        "plane_memory": memory,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows, report = run(args)
    except BenchError as exc:
        print(f"bench/gateway.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # The subprocesses were already stopped on the way out; a traceback would add nothing.
        print("bench/gateway.py: interrupted", file=sys.stderr)
        return 130
    print(format_table(rows))
    print(footer(report))
    write_json(args.json, report)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
