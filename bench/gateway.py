"""Benchmark 1, gateway overhead: one fast mock upstream called directly, through the bare aiohttp relay,
through Hatchway and through LiteLLM's proxy, side by side in one run. `hatchway-responses` is the same plane as
`hatchway`, asked the same question through /v1/responses, which it translates to chat completions for the same
upstream and back: its difference from `hatchway` is what the translation adds per request.

For every mode (non-stream, stream) and concurrency (1, 32, 128), each round runs every contender for the
same fixed time, one after the other, in an order that rotates from round to round so no contender always
inherits the previous one's warm caches or cold spells. Figures are medians over rounds; the added latency is
the median of the per-round differences from the direct call in the same round, which cancels drift that a
difference of medians would keep.

Per run: requests/s, latency p50/p99/p99.9 (first byte out to last byte in), CPU per request of the process
under test (and its children), its CPU use, the load side's (load generator + mock) CPU use, and the process's
peak RSS. The load side's CPU use is the check that the generator is not the bottleneck: when it is well
below 100% of its core while the process under test is near 100% of its own, the process under test is what
limits the rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from harness import (
    BENCH_DIR,
    HOST,
    MIB,
    BenchError,
    Child,
    MachineLoad,
    PeakSampler,
    child_env,
    child_process,
    log,
    median,
    sample_process,
    wait_for_port,
    wait_until_quiet,
)
from hatchway import ADMIN_HEADERS, MODELS, checkout, configure, start_plane, wait_ready
from litellm_proxy import MASTER_KEY, start_litellm
from loadgen import LoadResult, Request, chat_body, probe
from suite import Suite
from upstream import UPSTREAM_MODEL

MODES = {"non-stream": ("json", False), "stream": ("sse", True)}
CONCURRENCY = (1, 32, 128)


@dataclass(frozen=True)
class Settings:
    concurrency: tuple[int, ...]
    rounds: int
    duration_s: float
    warmup_s: float
    contenders: tuple[str, ...]

    @classmethod
    def for_run(cls, quick: bool, litellm: bool | None) -> Settings:
        with_litellm = (not quick) if litellm is None else litellm
        contenders = (
            "direct",
            "relay",
            "hatchway",
            "hatchway-responses",
            "hatchway-nopolicy",
            *(("litellm",) if with_litellm else ()),
        )
        if quick:
            return cls(CONCURRENCY, rounds=1, duration_s=1.0, warmup_s=1.0, contenders=contenders)
        return cls(CONCURRENCY, rounds=3, duration_s=2.0, warmup_s=1.0, contenders=contenders)


@dataclass
class Contender:
    name: str
    requests: dict[str, Request]  # by mode
    pid: int  # the process measured for CPU and RSS (the mock itself for the direct call)
    ready_s: float | None = None
    version: str | None = None
    note: str = ""
    # Hatchway's /metrics, which tells what a run's errors were.
    metrics_url: str | None = None


@dataclass
class Run:
    result: LoadResult
    sut_cpu_s: float
    load_cpu_s: float  # load generator + mock upstream
    peak_rss: int

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.sut_cpu_s / self.result.ok if self.result.ok else 0.0

    def cpu_percent(self, seconds: float) -> float:
        return 100 * seconds / self.result.duration_s if self.result.duration_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.result.as_dict(),
            "cpu_us_per_request": round(self.cpu_us_per_request, 1),
            "sut_cpu_percent": round(self.cpu_percent(self.sut_cpu_s), 1),
            "load_side_cpu_percent": round(self.cpu_percent(self.load_cpu_s), 1),
            "peak_rss_mib": round(self.peak_rss / MIB, 1),
        }


@dataclass
class Row:
    target: str
    mode: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    cpu_us_per_request: float
    sut_cpu_percent: float
    load_side_cpu_percent: float
    peak_rss_mib: float
    errors: int
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)


# -- the contenders ----------------------------------------------------------------------------------------------


def _requests(base: str, api_key: str, models: dict[str, str]) -> dict[str, Request]:
    return {
        mode: Request(f"{base}/chat/completions", api_key, chat_body(models[answer], stream), stream)
        for mode, (answer, stream) in MODES.items()
    }


def responses_body(model: str, stream: bool) -> bytes:
    """The question `chat_body` asks, as a /v1/responses request."""
    body: dict[str, Any] = {"model": model, "input": "Say hello.", "max_output_tokens": 16}
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def _responses_requests(base: str, api_key: str, models: dict[str, str]) -> dict[str, Request]:
    return {
        mode: Request(f"{base}/responses", api_key, responses_body(models[answer], stream), stream)
        for mode, (answer, stream) in MODES.items()
    }


def start_relay(suite: Suite, stack: contextlib.ExitStack) -> tuple[Child, str]:
    upstream = suite.upstream
    argv = [sys.executable, str(BENCH_DIR / "bare_relay.py"), "--upstream", f"http://{HOST}:{upstream.port}"]
    child = stack.enter_context(
        child_process("bare relay", suite.pinning.sut(argv), suite.workdir / "relay.log", child_env())
    )
    return child, f"http://{HOST}:{wait_for_port(child, 30.0)}"


async def start_contenders(
    suite: Suite, stack: contextlib.ExitStack, settings: Settings, session: aiohttp.ClientSession
) -> list[Contender]:
    upstream = suite.upstream
    direct_models = {"json": UPSTREAM_MODEL, "sse": UPSTREAM_MODEL}
    contenders = [
        Contender(
            "direct",
            {
                mode: Request(f"{upstream.url(answer)}/chat/completions", "sk-mock", chat_body(UPSTREAM_MODEL, s), s)
                for mode, (answer, s) in MODES.items()
            },
            upstream.child.pid,
            version=upstream.version,
            note=upstream.note,
        )
    ]
    if "relay" in settings.contenders:
        child, url = start_relay(suite, stack)
        ready = await _ready_after_start(session, child, f"{url}/json/v1/models")
        relay_requests = {
            mode: Request(f"{url}/{answer}/v1/chat/completions", "sk-mock", chat_body(direct_models[answer], s), s)
            for mode, (answer, s) in MODES.items()
        }
        contenders.append(Contender("relay", relay_requests, child.pid, ready, version="bench/bare_relay.py"))
    # The same plane twice: with limits, quotas and cache lookups on (the product as configured in earnest)
    # and with them off, to show what the policy layer costs.
    planes: list[tuple[str, bool, Path | None]] = [("hatchway", True, None), ("hatchway-nopolicy", False, None)]
    if suite.baseline:
        # The previous version, configured as `hatchway` is: what this version changed, measured in the same run.
        planes.append((f"hatchway@{suite.baseline}", True, checkout(stack, suite.workdir, suite.baseline)))
    for name, policy, source in planes:
        if name not in settings.contenders and source is None:
            continue
        plane = start_plane(stack, suite.subdir("gateway"), suite.pinning, name=name, source=source)
        await wait_ready(session, plane)
        key = await configure(session, plane, upstream, policy=policy)
        contenders.append(
            Contender(
                name,
                _requests(f"{plane.url}/v1", key, MODELS),
                plane.pid,
                plane.ready_s,
                note=str(plane.setup),
                metrics_url=f"{plane.url}/metrics",
            )
        )
        if name == "hatchway" and "hatchway-responses" in settings.contenders:
            contenders.append(
                Contender(
                    "hatchway-responses",
                    _responses_requests(f"{plane.url}/v1", key, MODELS),
                    plane.pid,
                    plane.ready_s,
                    note="the hatchway plane, through /v1/responses (translated to chat completions)",
                    metrics_url=f"{plane.url}/metrics",
                )
            )
    if "litellm" in settings.contenders:
        litellm = await asyncio.to_thread(start_litellm, stack, suite.subdir("gateway"), suite.pinning, upstream)
        if litellm.child is not None:
            contenders.append(
                Contender(
                    "litellm",
                    _requests(f"{litellm.url}/v1", MASTER_KEY, MODELS),
                    litellm.child.pid,
                    litellm.ready_s,
                    version=litellm.version,
                    note="master key auth, 1 worker",
                )
            )
        else:
            suite.results.setdefault("notes", {})["litellm"] = litellm.error or "unavailable"
    return contenders


async def _ready_after_start(session: aiohttp.ClientSession, child: Child, url: str) -> float:
    """Seconds from spawn to the first good answer at `url`."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        child.check_alive()
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url, headers={"Authorization": "Bearer sk-mock"}) as resp:
                if resp.status == 200:
                    return time.perf_counter() - child.started_at
        await asyncio.sleep(0.01)
    raise BenchError(f"{child.name} not answering {url}:\n{child.log_tail()}")


# -- measuring ---------------------------------------------------------------------------------------------------


async def measure_once(suite: Suite, contender: Contender, mode: str, concurrency: int, duration_s: float) -> Run:
    mock_pid = suite.upstream.child.pid
    statuses_before = await _statuses(contender)
    sut_before = sample_process(contender.pid).cpu_s
    mock_before = sample_process(mock_pid).cpu_s
    async with PeakSampler(contender.pid) as peak:
        result = await suite.closed_loop.run(contender.requests[mode], concurrency, duration_s)
    sut_cpu = sample_process(contender.pid).cpu_s - sut_before
    mock_cpu = sample_process(mock_pid).cpu_s - mock_before
    if result.errors and contender.metrics_url:
        # wrk counts non-2xx answers without saying which: the plane's own counters do.
        for code, count in (await _statuses(contender)).items():
            if code != "200" and count > statuses_before.get(code, 0):
                result.statuses[code] = count - statuses_before.get(code, 0)
    # For the direct call the process under test is the mock itself, so it shows on both sides.
    return Run(result, sut_cpu, result.generator_cpu_s + mock_cpu, peak.peak_rss)


_REQUESTS_TOTAL = re.compile(
    r'^hatchway_requests_total\{route="/v1/(?:chat/completions|responses)",status="(\d+)"\} (\S+)$', re.M
)


async def _statuses(contender: Contender) -> dict[str, int]:
    """The plane's count of chat and Responses answers by status so far (none for contenders without Hatchway's
    metrics)."""
    if not contender.metrics_url:
        return {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(contender.metrics_url, headers=ADMIN_HEADERS) as response,
    ):
        text = await response.text()
    counts: dict[str, int] = {}
    for status, count in _REQUESTS_TOTAL.findall(text):
        counts[status] = counts.get(status, 0) + int(float(count))
    return counts


async def measure(
    suite: Suite, contenders: list[Contender], settings: Settings
) -> dict[tuple[str, str, int], list[Run]]:
    runs: dict[tuple[str, str, int], list[Run]] = {}
    for contender in contenders:
        for mode in MODES:
            await probe(contender.requests[mode])
            await measure_once(suite, contender, mode, 32, settings.warmup_s)  # warm-up: pools, code paths
    for mode in MODES:
        for concurrency in settings.concurrency:
            for index in range(settings.rounds):
                shift = index % len(contenders)
                for contender in contenders[shift:] + contenders[:shift]:
                    await wait_until_quiet([c.pid for c in contenders if c.name != "direct"])
                    run = await measure_once(suite, contender, mode, concurrency, settings.duration_s)
                    runs.setdefault((contender.name, mode, concurrency), []).append(run)
                    _progress(contender.name, mode, concurrency, index, run)
    return runs


def _progress(name: str, mode: str, concurrency: int, index: int, run: Run) -> None:
    r = run.result
    log(
        f"  gateway round {index + 1} {name:8} {mode:10} c={concurrency:<3} {r.rps:8.0f} req/s  "
        f"p50 {r.p50_ms:7.2f}  p99 {r.p99_ms:8.2f} ms  {run.cpu_us_per_request:6.0f} us CPU/req  "
        f"SUT {run.cpu_percent(run.sut_cpu_s):3.0f}%  load side {run.cpu_percent(run.load_cpu_s):3.0f}%"
        + (f"  errors {r.errors}" if r.errors else "")
        + (f" answered {r.statuses}" if r.statuses else "")
    )


def summarise(runs: dict[tuple[str, str, int], list[Run]]) -> list[Row]:
    rows: list[Row] = []
    for (target, mode, concurrency), stats in runs.items():
        row = Row(
            target=target,
            mode=mode,
            concurrency=concurrency,
            rps=round(median([r.result.rps for r in stats]), 1),
            p50_ms=round(median([r.result.p50_ms for r in stats]), 3),
            p99_ms=round(median([r.result.p99_ms for r in stats]), 3),
            p999_ms=round(median([r.result.p999_ms for r in stats]), 3),
            cpu_us_per_request=round(median([r.cpu_us_per_request for r in stats]), 1),
            sut_cpu_percent=round(median([r.cpu_percent(r.sut_cpu_s) for r in stats]), 1),
            load_side_cpu_percent=round(median([r.cpu_percent(r.load_cpu_s) for r in stats]), 1),
            peak_rss_mib=round(max(r.peak_rss for r in stats) / MIB, 1),
            errors=sum(r.result.error_count for r in stats),
            rounds=[r.as_dict() for r in stats],
        )
        direct = runs.get(("direct", mode, concurrency))
        if target != "direct" and direct is not None:
            row.added_p50_ms = _paired(stats, direct, "p50_ms")
            row.added_p99_ms = _paired(stats, direct, "p99_ms")
        rows.append(row)
    order = {"direct": 0, "relay": 1, "hatchway": 2, "hatchway-responses": 3, "hatchway-nopolicy": 4, "litellm": 5}
    rows.sort(key=lambda r: (list(MODES).index(r.mode), r.concurrency, order.get(r.target, 9)))
    return rows


def _paired(runs: list[Run], direct: list[Run], attribute: str) -> float:
    deltas = [getattr(a.result, attribute) - getattr(b.result, attribute) for a, b in zip(runs, direct, strict=True)]
    return round(median(deltas), 3)


async def run(suite: Suite, litellm: bool | None = None) -> dict[str, Any]:
    settings = Settings.for_run(suite.quick, litellm)
    with contextlib.ExitStack() as stack:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            contenders = await start_contenders(suite, stack, settings, session)
        with MachineLoad() as machine:
            runs = await measure(suite, contenders, settings)
    rows = summarise(runs)
    return {
        "settings": {
            "concurrency": list(settings.concurrency),
            "rounds": settings.rounds,
            "duration_s": settings.duration_s,
            "warmup_s": settings.warmup_s,
        },
        "load_generator": suite.closed_loop.description,
        "upstream": suite.upstream.as_dict(),
        "contenders": {
            c.name: {
                "ready_s": None if c.ready_s is None else round(c.ready_s, 3),
                "version": c.version,
                "note": c.note,
            }
            for c in contenders
        },
        "missing": suite.results.get("notes", {}),
        "machine_load": machine.as_dict(),
        "rows": [row.__dict__ for row in rows],
    }


def format_table(report: dict[str, Any]) -> str:
    header = (
        f"{'target':9} {'mode':10} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} "
        f"{'+p99 ms':>8} {'CPU us/req':>10} {'SUT CPU%':>8} {'load CPU%':>9} {'RSS MiB':>7} {'errors':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in report["rows"]:
        lines.append(
            f"{row['target']:9} {row['mode']:10} {row['concurrency']:>4} {row['rps']:>8.0f} {row['p50_ms']:>8.2f} "
            f"{row['p99_ms']:>8.2f} {_signed(row['added_p50_ms']):>8} {_signed(row['added_p99_ms']):>8} "
            f"{row['cpu_us_per_request']:>10.0f} {row['sut_cpu_percent']:>8.0f} {row['load_side_cpu_percent']:>9.0f} "
            f"{row['peak_rss_mib']:>7.1f} {row['errors']:>6}"
        )
    ready = ", ".join(
        f"{name} {info['ready_s']:.2f}s" for name, info in report["contenders"].items() if info["ready_s"] is not None
    )
    lines.append(f"ready to serve after start: {ready}")
    for name, why in report["missing"].items():
        lines.append(f"{name}: left out ({why[:200]})")
    return "\n".join(lines)


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"
