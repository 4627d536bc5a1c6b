"""Load generators.

- `closed_loop`: N connections, each sending its next request as soon as the last one's whole answer is in,
  for a fixed time. wrk (C, from Debian's packages; a Lua script sets the POST body and prints the results
  as JSON) when it is installed, because it costs a fraction of a Python client's CPU per request and so stays
  out of the measurement; else the aiohttp client below, with a note in the results.
- `open_loop`: requests sent on a fixed schedule whatever the answers do, for overload, over a minimal
  HTTP/1.1 client (asyncio protocol) cheap enough to offer thousands of requests a second from one core.
- `probe`: one request whose answer is checked for shape, before any target is measured.

Latency is from the request's first byte out to the answer's last byte in, for stream and non-stream alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
from harness import BenchError, Pinning, ensure_tool, log, percentile, tool_version

WRK_RESULT = "WRK_RESULT "
REQUEST_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Request:
    """One kind of request a load generator repeats."""

    url: str
    api_key: str
    body: bytes
    stream: bool

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"}


def chat_body(model: str, stream: bool, **extra: Any) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
        **extra,
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


@dataclass
class LoadResult:
    """One timed closed-loop run. Latencies are in ms and cover every answer, errors included."""

    generator: str
    concurrency: int
    duration_s: float
    ok: int
    errors: dict[str, int]
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    generator_cpu_s: float = 0.0
    samples_ms: list[float] = field(default_factory=list, repr=False)
    # The non-200 answers by status, where the server under test counts them (Hatchway's /metrics).
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator,
            "concurrency": self.concurrency,
            "duration_s": round(self.duration_s, 3),
            "ok": self.ok,
            "errors": self.errors,
            **({"statuses": self.statuses} if self.statuses else {}),
            "rps": round(self.rps, 1),
            "mean_ms": round(self.mean_ms, 3),
            "p50_ms": round(self.p50_ms, 3),
            "p90_ms": round(self.p90_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "p999_ms": round(self.p999_ms, 3),
            "max_ms": round(self.max_ms, 3),
            "generator_cpu_s": round(self.generator_cpu_s, 3),
        }


# -- wrk -------------------------------------------------------------------------------------------------------

_WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {api_key}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{marker}{{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"mean_us":%.1f,"max_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
"""


class Wrk:
    def __init__(self, path: str, workdir: Path, pinning: Pinning) -> None:
        self.path = path
        self.workdir = workdir
        self.pinning = pinning
        self.version = tool_version([path, "-v"])
        self._scripts: dict[tuple[bytes, str], Path] = {}

    def _script(self, request: Request) -> Path:
        key = (request.body, request.api_key)
        if key not in self._scripts:
            body = request.body.decode()
            if "]==]" in body:
                raise ValueError("the body would end wrk's Lua long string")
            path = self.workdir / f"wrk-{len(self._scripts)}.lua"
            path.write_text(_WRK_SCRIPT.format(body=body, api_key=request.api_key, marker=WRK_RESULT))
            self._scripts[key] = path
        return self._scripts[key]

    async def run(self, request: Request, concurrency: int, duration_s: float) -> LoadResult:
        argv = [self.path, "-t1", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s", "--timeout", "30s"]
        argv += ["-s", str(self._script(request)), request.url]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = await asyncio.create_subprocess_exec(
            *self.pinning.load(argv), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await proc.communicate()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        text = output.decode(errors="replace")
        line = next((line for line in text.splitlines() if line.startswith(WRK_RESULT)), None)
        if proc.returncode != 0 or line is None:
            raise BenchError(f"wrk exited with {proc.returncode}:\n{text[-2000:]}")
        data = orjson.loads(line[len(WRK_RESULT) :])
        errors = {k: int(data[k]) for k in ("connect", "read", "write", "status", "timeout") if data[k]}
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        ms = 1 / 1000
        return LoadResult(
            generator="wrk",
            concurrency=concurrency,
            duration_s=data["duration_us"] / 1e6,
            # Non-2xx answers count in `requests` and in errors.status; failed connections in neither.
            ok=max(0, int(data["requests"]) - int(data["status"])),
            errors=errors,
            mean_ms=data["mean_us"] * ms,
            p50_ms=data["p50_us"] * ms,
            p90_ms=data["p90_us"] * ms,
            p99_ms=data["p99_us"] * ms,
            p999_ms=data["p999_us"] * ms,
            max_ms=data["max_us"] * ms,
            generator_cpu_s=cpu,
        )


# -- the Python client -----------------------------------------------------------------------------------------


def client_session(connections: int, timeout_s: float = REQUEST_TIMEOUT_S) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=0, ttl_dns_cache=None, force_close=False)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s), skip_auto_headers=("User-Agent",)
    )


async def send(session: aiohttp.ClientSession, request: Request) -> tuple[int, bytes]:
    async with session.post(request.url, data=request.body, headers=request.headers) as resp:
        return resp.status, await resp.read()


def check_answer(status: int, payload: bytes, stream: bool) -> str | None:
    """Why an answer is not a good chat completion (or Response), or None. Cheap: the generator must stay cheap."""
    if status != 200:
        return f"http_{status}"
    if stream:
        # A chat stream ends with [DONE]; a Responses stream with its closing event, and no [DONE].
        done = payload.rstrip().endswith(b"data: [DONE]") or b"event: response.completed\n" in payload
        return None if done else "stream_without_done"
    return None if payload.startswith(b"{") else "not_json"


class PythonLoad:
    """A closed-loop aiohttp client: the fallback when wrk is missing."""

    generator = "python-aiohttp"

    async def run(self, request: Request, concurrency: int, duration_s: float) -> LoadResult:
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        cpu_before = time.process_time()
        async with client_session(concurrency) as session:
            deadline = time.perf_counter() + duration_s

            async def worker() -> None:
                while time.perf_counter() < deadline:
                    started = time.perf_counter()
                    try:
                        status, payload = await send(session, request)
                        problem = check_answer(status, payload, request.stream)
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        problem = type(exc).__name__
                    latencies.append(time.perf_counter() - started)
                    if problem:
                        errors[problem] += 1

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
        ms = [x * 1000 for x in latencies]
        return LoadResult(
            generator=self.generator,
            concurrency=concurrency,
            duration_s=elapsed,
            ok=len(latencies) - sum(errors.values()),
            errors=dict(errors),
            mean_ms=sum(ms) / len(ms) if ms else 0.0,
            p50_ms=percentile(ms, 50),
            p90_ms=percentile(ms, 90),
            p99_ms=percentile(ms, 99),
            p999_ms=percentile(ms, 99.9),
            max_ms=max(ms, default=0.0),
            generator_cpu_s=time.process_time() - cpu_before,
        )


class ClosedLoop:
    """The closed-loop generator this run uses: wrk when it can be had, else the Python client."""

    def __init__(self, workdir: Path, pinning: Pinning, prefer_wrk: bool = True) -> None:
        path = ensure_tool("wrk", "wrk") if prefer_wrk else None
        self.wrk = Wrk(path, workdir, pinning) if path else None
        self.python = PythonLoad()
        if self.wrk is None:
            log("FALLBACK: closed-loop load from the Python aiohttp client (wrk missing or --python-load)")

    @property
    def description(self) -> dict[str, Any]:
        if self.wrk is not None:
            return {"closed_loop": "wrk, 1 thread", "version": self.wrk.version}
        return {"closed_loop": "python aiohttp client (fallback)", "version": None}

    async def run(self, request: Request, concurrency: int, duration_s: float) -> LoadResult:
        if self.wrk is not None:
            return await self.wrk.run(request, concurrency, duration_s)
        return await self.python.run(request, concurrency, duration_s)


async def probe(request: Request) -> None:
    """One request; raises BenchError unless the answer is a well-formed chat completion (or stream)."""
    async with client_session(1) as session:
        try:
            status, payload = await send(session, request)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BenchError(f"{request.url}: {type(exc).__name__}: {exc}") from exc
    problem = check_answer(status, payload, request.stream)
    if problem is None and not request.stream:
        with contextlib.suppress(orjson.JSONDecodeError):
            answer = orjson.loads(payload)
            if "choices" in answer or answer.get("object") == "response":
                return
        problem = "no choices"
    if problem is not None:
        raise BenchError(f"{request.url} answered badly ({problem}): {payload[:300]!r}")


# -- open loop -------------------------------------------------------------------------------------------------


@dataclass
class OpenLoopResult:
    offered_rps: float
    duration_s: float
    sent: int
    not_sent: int  # the generator held back: `max_outstanding` requests were already in flight
    outcomes: list[tuple[int, float, bool]]  # (status or 0 for a transport error, latency s, Retry-After present)
    send_lag_ms_p99: float  # how late the generator was against its schedule
    generator_cpu_s: float


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection of the open-loop client: a fixed request out, one answer in.

    Far cheaper per request than aiohttp's client (no headers object, no body parsing beyond framing), which is
    what lets one Python core offer several thousand requests a second.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bool]] | None = None
        self.closed = False
        # Set when an answer said `Connection: close`: like any HTTP client, do not send on it again.
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same methods.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed before the answer"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        answer = self._answer()
        if answer is not None and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(answer)

    def _answer(self) -> tuple[int, bool] | None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buffer[:end]).lower()
        body_start = end + 4
        marker = head.find(b"\r\ncontent-length:")
        if marker >= 0:
            line_end = head.find(b"\r\n", marker + 2)
            length = int(head[marker + 17 : line_end if line_end > 0 else None])
            if len(self.buffer) < body_start + length:
                return None
            del self.buffer[: body_start + length]
        else:  # chunked: the answer ends with the last, empty chunk
            last = self.buffer.find(b"\r\n0\r\n\r\n", body_start - 2)
            if last < 0:
                return None
            del self.buffer[: last + 7]
        self.closing = b"\r\nconnection: close" in head
        return int(head[9:12]), b"\r\nretry-after:" in head

    async def exchange(self, request: bytes) -> tuple[int, bool]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        try:
            return await self.waiter
        finally:
            self.waiter = None


def _raw_request(request: Request) -> tuple[str, int, bytes]:
    url = request.url.removeprefix("http://")
    authority, _, path = url.partition("/")
    host, _, port = authority.partition(":")
    head = (
        f"POST /{path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {request.api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(request.body)}\r\n\r\n"
    )
    return host, int(port or 80), head.encode() + request.body


async def open_loop(
    request: Request, rate: float, duration_s: float, max_outstanding: int, timeout_s: float = 10.0
) -> OpenLoopResult:
    """Send at `rate` requests/s on a fixed schedule for `duration_s`, whatever the answers do.

    Each request takes an idle keep-alive connection or opens a new one; at most `max_outstanding` are in
    flight, and a request due while that many are is counted in `not_sent` instead of being queued.
    """
    loop = asyncio.get_running_loop()
    host, port, payload = _raw_request(request)
    idle: list[_Connection] = []
    outcomes: list[tuple[int, float, bool]] = []
    lags: list[float] = []
    tasks: set[asyncio.Task[None]] = set()
    not_sent = 0
    cpu_before = time.process_time()

    async def one() -> None:
        started = time.perf_counter()
        connection = idle.pop() if idle else None
        try:
            async with asyncio.timeout(timeout_s):
                if connection is None or connection.closed:
                    _, connection = await loop.create_connection(_Connection, host, port)
                status, retry_after = await connection.exchange(payload)
            outcomes.append((status, time.perf_counter() - started, retry_after))
            if not connection.closing:
                idle.append(connection)
            elif connection.transport is not None:
                connection.transport.close()
        except (OSError, TimeoutError, ValueError, IndexError):
            # Refused, reset, timed out, or an answer this client could not frame: a transport error either way.
            outcomes.append((0, time.perf_counter() - started, False))
            if connection is not None and connection.transport is not None:
                connection.transport.close()

    interval = 1.0 / rate
    total = int(rate * duration_s)
    start = time.perf_counter()
    for index in range(total):
        due = start + index * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(time.perf_counter() - due)
        if len(tasks) >= max_outstanding:
            not_sent += 1
            continue
        task = asyncio.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    elapsed = time.perf_counter() - start
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s + 5)
    for connection in idle:
        if connection.transport is not None:
            connection.transport.close()
    return OpenLoopResult(
        offered_rps=rate,
        duration_s=elapsed,
        sent=total - not_sent,
        not_sent=not_sent,
        outcomes=outcomes,
        send_lag_ms_p99=percentile(lags, 99) * 1000,
        generator_cpu_s=time.process_time() - cpu_before,
    )
