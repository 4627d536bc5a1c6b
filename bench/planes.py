"""Benchmark: 1 plane vs 3 planes sharing PostgreSQL and Redis (issue 17), the in-process limiter and response
cache against the shared ones (server/shared/), side by side in one run.

Four contenders, each on a fresh PostgreSQL database of its own (this machine's, on its standard port), with one
secret and one admin key for its planes:

    1 plane, in-process     limits and cache in the plane's memory (no Redis)
    1 plane, Redis          limits and cache in Redis (HATCHWAY_REDIS_URL, a key prefix of this run's own)
    3 planes, in-process    the control: each plane holds the limits by itself (not exact across planes)
    3 planes, Redis         one gateway: the limits exact across the planes, one cache for all three

Two scenarios, non-stream chat against the fast mock upstream (bench/upstream.py):

    policy      an rpm limit and a tokens-per-day quota on the key (never reached: the bookkeeping is the cost),
                cache off: every request is admitted, relayed and settled
    cache-hit   the same limits, cache mode `all`: every request is the same, answered from the cache (each
                plane is warmed first, and checked to answer `x-hatchway-cache: hit`)

The closed-loop generator of bench/gateway.py (wrk when installed) runs one instance per plane at once, the
connections split evenly: requests/s is their sum, p50 their request-weighted mean, p99 the highest of them
(conservative: the planes are alike). Rounds rotate the contenders' order, as bench/gateway.py does; the added
p50/p99 of the shared contender is the median over rounds of its difference from the in-process one with as
many planes. Nothing is pinned: on one machine the planes, PostgreSQL, Redis, the mock and wrk all share its
cores, so the figure is what sharing costs, not what several machines would serve.

Run: `python bench/planes.py [--quick] [--results DIR]` (or from bench/run.py once registered as `planes`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis
from harness import (
    REPO_ROOT,
    RESULTS_DIR,
    BenchError,
    Pinning,
    log,
    median,
    run_async,
    sample_process,
    wait_until_quiet,
    write_json,
)
from hatchway import MOCK_KEY, PRICE_IN, PRICE_OUT, Plane, admin, start_plane, wait_ready
from loadgen import LoadResult, Request, chat_body, probe
from suite import Suite
from upstream import UPSTREAM_MODEL

sys.path.insert(0, str(REPO_ROOT))
from tests.server.storage.test_postgres import scratch_database

REDIS_URL = "redis://127.0.0.1:6379/0"
SECRET_KEY = "hwa-bench-one-secret-for-every-plane"
MODEL = "bench-json"
# (name, planes, shared through Redis)
CONTENDERS = (
    ("1 plane, in-process", 1, False),
    ("1 plane, Redis", 1, True),
    ("3 planes, in-process", 3, False),
    ("3 planes, Redis", 3, True),
)
SCENARIOS = ("policy", "cache-hit")
# On the key; within PostgreSQL's INTEGER columns of limit_policy, and far above what a run sends.
KEY_LIMITS = {"rpm": 10**9, "tokens_per_day": 2 * 10**9 - 1}
# Config changes reach every plane within 1 s (issue 17): the other planes hold what was set through the first.
CONFIG_SETTLE_S = 1.5


@dataclass(frozen=True)
class Settings:
    concurrency: tuple[int, ...]
    rounds: int
    duration_s: float
    warmup_s: float

    @classmethod
    def for_run(cls, quick: bool) -> Settings:
        if quick:
            return cls((32,), rounds=1, duration_s=2.0, warmup_s=1.0)
        return cls((32, 128), rounds=3, duration_s=3.0, warmup_s=1.0)


@dataclass
class Contender:
    name: str
    shared: bool
    planes: list[Plane]
    # By scenario: one request per plane, the load split over them.
    requests: dict[str, list[Request]] = field(default_factory=dict)

    @property
    def pids(self) -> list[int]:
        return [plane.pid for plane in self.planes]


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    planes_cpu_s: float
    redis_cpu_s: float
    ok: int

    def per_request_us(self, cpu_s: float) -> float:
        return 1e6 * cpu_s / self.ok if self.ok else 0.0


# -- the contenders ----------------------------------------------------------------------------------------------


async def start_contender(
    suite: Suite, session: aiohttp.ClientSession, name: str, count: int, shared: bool, prefix: str
) -> Contender:
    try:
        database = suite.stack.enter_context(scratch_database())
    except Exception as exc:  # psycopg's errors: PostgreSQL is down or refuses
        raise BenchError(f"cannot create a scratch PostgreSQL database at 127.0.0.1:5432: {exc}") from exc
    settings = {"database_url": database, "secret_key": SECRET_KEY}
    if shared:
        settings |= {"redis_url": REDIS_URL, "redis_prefix": prefix}
    workdir = suite.subdir("planes")
    planes = []
    # One after the other: the first migrates the empty database.
    for index in range(count):
        plane = start_plane(suite.stack, workdir, None, f"{name}-{index}", None, **settings)
        await wait_ready(session, plane)
        planes.append(plane)
    contender = Contender(name, shared, planes)
    for scenario in SCENARIOS:
        key = await configure(session, planes[0], suite, scenario)
        body = chat_body(MODEL, False)
        contender.requests[scenario] = [
            Request(f"{plane.url}/v1/chat/completions", key, body, False) for plane in planes
        ]
    if count > 1:
        await asyncio.sleep(CONFIG_SETTLE_S)
    return contender


async def configure(session: aiohttp.ClientSession, plane: Plane, suite: Suite, scenario: str) -> str:
    """An org for the scenario, its provider (the mock's JSON answer) and routing rule, the key's limits and the
    org's cache mode. Returns the key's secret."""
    await admin(session, plane, "POST", "/admin/v1/orgs", {"name": scenario})
    created = await admin(session, plane, "POST", "/admin/v1/keys", {"org": scenario, "name": "bench"})
    provider = {
        "org": scenario,
        "name": "mock-json",
        "base_url": suite.upstream.url("json"),
        "api_keys": [MOCK_KEY],
        "models": [{"alias": MODEL, "upstream": UPSTREAM_MODEL}],
        "price_in": PRICE_IN,
        "price_out": PRICE_OUT,
    }
    await admin(session, plane, "POST", "/admin/v1/providers", provider)
    rule = {"org": scenario, "model": MODEL, "strategy": "priority", "targets": ["mock-json"]}
    await admin(session, plane, "PUT", "/admin/v1/routes", rule)
    await admin(session, plane, "PUT", "/admin/v1/limits", {"key": created["id"], **KEY_LIMITS})
    cache = {"mode": "all", "ttl_s": 3600} if scenario == "cache-hit" else {"mode": "off"}
    await admin(session, plane, "PUT", "/admin/v1/cache", {"org": scenario, **cache})
    return str(created["key"])


async def check_hits(session: aiohttp.ClientSession, requests: list[Request]) -> None:
    """Every plane answers the cache-hit scenario's request from its cache."""
    for request in requests:
        async with session.post(request.url, data=request.body, headers=request.headers) as response:
            await response.read()
            said = response.headers.get("x-hatchway-cache")
        if response.status != 200 or said != "hit":
            raise BenchError(f"{request.url}: expected a cache hit, got {response.status} x-hatchway-cache={said}")


def redis_pid() -> int | None:
    """Redis's process, to count its CPU (None when it is not on this machine or will not say)."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        pid = int(client.info("server")["process_id"])
    except (redis.exceptions.RedisError, KeyError, ValueError) as exc:
        raise BenchError(f"Redis is not reachable at {REDIS_URL}: {exc}") from exc
    finally:
        client.close()
    with contextlib.suppress(BenchError):
        sample_process(pid)
        return pid
    return None


def forget_keys(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


# -- measuring ---------------------------------------------------------------------------------------------------


def split(concurrency: int, parts: int) -> list[int]:
    return [concurrency // parts + (1 if i < concurrency % parts else 0) for i in range(parts)]


async def load(suite: Suite, requests: list[Request], concurrency: int, duration_s: float) -> list[LoadResult]:
    """One closed loop per plane, at once, the connections split evenly."""
    shares = split(concurrency, len(requests))
    loops = (suite.closed_loop.run(request, share, duration_s) for request, share in zip(requests, shares, strict=True))
    return list(await asyncio.gather(*loops))


async def measure_once(
    suite: Suite, contender: Contender, scenario: str, concurrency: int, duration_s: float, redis_process: int | None
) -> Run:
    planes_before = sum(sample_process(pid).cpu_s for pid in contender.pids)
    redis_before = sample_process(redis_process).cpu_s if redis_process is not None else 0.0
    results = await load(suite, contender.requests[scenario], concurrency, duration_s)
    planes_cpu = sum(sample_process(pid).cpu_s for pid in contender.pids) - planes_before
    redis_cpu = sample_process(redis_process).cpu_s - redis_before if redis_process is not None else 0.0
    ok = sum(r.ok for r in results)
    return Run(
        rps=sum(r.rps for r in results),
        p50_ms=sum(r.p50_ms * r.ok for r in results) / ok if ok else 0.0,
        p99_ms=max(r.p99_ms for r in results),
        errors=sum(r.error_count for r in results),
        planes_cpu_s=planes_cpu,
        redis_cpu_s=redis_cpu,
        ok=ok,
    )


async def measure(
    suite: Suite,
    contenders: list[Contender],
    settings: Settings,
    session: aiohttp.ClientSession,
    redis_process: int | None,
) -> dict[tuple[str, str, int], list[Run]]:
    for contender in contenders:
        for scenario in SCENARIOS:
            for request in contender.requests[scenario]:
                await probe(request)  # and for cache-hit, the answer each plane will hit from now on
            await measure_once(suite, contender, scenario, 32, settings.warmup_s, None)
        await check_hits(session, contender.requests["cache-hit"])
    runs: dict[tuple[str, str, int], list[Run]] = {}
    for scenario in SCENARIOS:
        for concurrency in settings.concurrency:
            for index in range(settings.rounds):
                shift = index % len(contenders)
                for contender in contenders[shift:] + contenders[:shift]:
                    await wait_until_quiet([pid for c in contenders for pid in c.pids])
                    run = await measure_once(
                        suite, contender, scenario, concurrency, settings.duration_s, redis_process
                    )
                    runs.setdefault((contender.name, scenario, concurrency), []).append(run)
                    log(
                        f"  planes round {index + 1} {contender.name:21} {scenario:9} c={concurrency:<3} "
                        f"{run.rps:8.0f} req/s  p50 {run.p50_ms:7.2f}  p99 {run.p99_ms:8.2f} ms  "
                        f"{run.per_request_us(run.planes_cpu_s):6.0f} us plane CPU/req"
                        + (f"  errors {run.errors}" if run.errors else "")
                    )
    return runs


def summarise(runs: dict[tuple[str, str, int], list[Run]]) -> list[dict[str, Any]]:
    rows = []
    for (name, scenario, concurrency), stats in runs.items():
        row: dict[str, Any] = {
            "contender": name,
            "scenario": scenario,
            "concurrency": concurrency,
            "rps": round(median([r.rps for r in stats]), 1),
            "p50_ms": round(median([r.p50_ms for r in stats]), 3),
            "p99_ms": round(median([r.p99_ms for r in stats]), 3),
            "plane_cpu_us_per_request": round(median([r.per_request_us(r.planes_cpu_s) for r in stats]), 1),
            "redis_cpu_us_per_request": round(median([r.per_request_us(r.redis_cpu_s) for r in stats]), 1),
            "errors": sum(r.errors for r in stats),
            "added_p50_ms": None,
            "added_p99_ms": None,
            "rps_ratio": None,
        }
        if name.endswith("Redis"):
            baseline = runs.get((name.replace("Redis", "in-process"), scenario, concurrency))
            if baseline is not None:
                row["added_p50_ms"] = _paired(stats, baseline, "p50_ms")
                row["added_p99_ms"] = _paired(stats, baseline, "p99_ms")
                row["rps_ratio"] = round(median([a.rps / b.rps for a, b in zip(stats, baseline, strict=True)]), 3)
        rows.append(row)
    order = [name for name, _, _ in CONTENDERS]
    rows.sort(key=lambda r: (SCENARIOS.index(r["scenario"]), r["concurrency"], order.index(r["contender"])))
    return rows


def _paired(runs: list[Run], baseline: list[Run], attribute: str) -> float:
    deltas = [getattr(a, attribute) - getattr(b, attribute) for a, b in zip(runs, baseline, strict=True)]
    return round(median(deltas), 3)


async def run(suite: Suite) -> dict[str, Any]:
    settings = Settings.for_run(suite.quick)
    redis_process = redis_pid()
    run_prefix = f"hatchway-bench-{secrets.token_hex(6)}:"
    suite.stack.callback(forget_keys, run_prefix)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        contenders = [
            await start_contender(suite, session, name, count, shared, f"{run_prefix}{index}:")
            for index, (name, count, shared) in enumerate(CONTENDERS)
        ]
        runs = await measure(suite, contenders, settings, session, redis_process)
    return {
        "settings": {
            "concurrency": list(settings.concurrency),
            "rounds": settings.rounds,
            "duration_s": settings.duration_s,
            "warmup_s": settings.warmup_s,
            "key_limits": KEY_LIMITS,
        },
        "load_generator": {**suite.closed_loop.description, "instances": "one per plane, at once"},
        "upstream": suite.upstream.as_dict(),
        "redis_cpu_counted": redis_process is not None,
        "rows": summarise(runs),
    }


def format_table(report: dict[str, Any]) -> str:
    header = (
        f"{'contender':21} {'scenario':9} {'conc':>4} {'req/s':>8} {'x in-proc':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'+p50 ms':>8} {'+p99 ms':>8} {'plane us/req':>12} {'Redis us/req':>12} {'errors':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in report["rows"]:
        lines.append(
            f"{row['contender']:21} {row['scenario']:9} {row['concurrency']:>4} {row['rps']:>8.0f} "
            f"{_maybe(row['rps_ratio'], '.2f'):>9} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} "
            f"{_maybe(row['added_p50_ms'], '+.2f'):>8} {_maybe(row['added_p99_ms'], '+.2f'):>8} "
            f"{row['plane_cpu_us_per_request']:>12.0f} {row['redis_cpu_us_per_request']:>12.0f} {row['errors']:>6}"
        )
    lines.append(
        "x in-proc, +p50, +p99: the Redis contender against the in-process one with as many planes (paired rounds)"
    )
    return "\n".join(lines)


def _maybe(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="c=32 only, one round of 2 s")
    parser.add_argument("--python-mock", action="store_true", help="use the Python mock upstream, not nginx")
    parser.add_argument("--python-load", action="store_true", help="use the Python load generator, not wrk")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="where planes.json goes")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hatchway-planes-")))
        suite = Suite(
            stack=stack,
            workdir=workdir,
            pinning=Pinning.detect(False),
            quick=args.quick,
            results_dir=args.results,
            prefer_nginx=not args.python_mock,
            prefer_wrk=not args.python_load,
        )
        try:
            report = run_async(run(suite))
        except BenchError as exc:
            log(f"bench/planes.py: {exc}")
            return 1
    print(format_table(report))
    log(f"{time.perf_counter() - started:.0f}s")
    write_json(args.results / ("planes-quick.json" if args.quick else "planes.json"), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
