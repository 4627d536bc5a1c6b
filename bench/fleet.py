"""Benchmark 3, fleet: N simulated agents (bench/fake_agent.py, the real gRPC protocol over TLS, one TCP
connection each, all in this process on the load CPU) connected to one plane on the SUT CPU.

Stages grow the fleet (1, then 100, then 1,000 agents). At each stage, once every agent is connected and the
plane has settled:
- plane memory: RSS now minus RSS before any agent connected, per agent;
- heartbeat cost: the plane's CPU over an idle window (only heartbeats arrive, one per agent every
  `node_heartbeat_s`) minus its CPU over the same window with no agent, per heartbeat and as % of its core;
- dispatch latency: sequential `/v1/completions` requests for the fleet's model, each dispatched by the plane
  to one of the N agents, which answers with one token at once: the plane's pick + gRPC round trip + HTTP;
- enrollment: how long enrolling and connecting the new agents took (the plane rebuilds its snapshot per Enroll).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from fake_agent import FAKE_MODEL, FakeAgent, plane_certificate
from harness import MIB, BenchError, log, percentile, sample_process
from hatchway import Plane, admin, configure, node_token, start_plane, wait_ready
from suite import Suite

HEARTBEAT_S = 5.0
ENROLL_CONCURRENCY = 16
CONNECT_CONCURRENCY = 64


@dataclass(frozen=True)
class Settings:
    stages: tuple[int, ...]
    idle_window_s: float
    dispatches: int

    @classmethod
    def for_run(cls, quick: bool) -> Settings:
        if quick:
            return cls(stages=(1, 100, 1000), idle_window_s=5.0, dispatches=100)
        return cls(stages=(1, 100, 1000), idle_window_s=15.0, dispatches=300)


async def _bounded(jobs: list[Any], limit: int) -> None:
    gate = asyncio.Semaphore(limit)

    async def one(job: Any) -> None:
        async with gate:
            await job

    await asyncio.gather(*(one(job) for job in jobs))


async def idle_cpu(plane: Plane, window_s: float) -> float:
    """The plane's CPU seconds over `window_s` of doing nothing but what arrives by itself."""
    before = sample_process(plane.pid).cpu_s
    await asyncio.sleep(window_s)
    return sample_process(plane.pid).cpu_s - before


async def connected_nodes(session: aiohttp.ClientSession, plane: Plane) -> int:
    listing = await admin(session, plane, "GET", "/admin/v1/nodes")
    return sum(1 for node in listing.get("data", []) if node.get("state") not in ("offline", None))


async def dispatch_latencies(session: aiohttp.ClientSession, plane: Plane, count: int) -> tuple[list[float], int]:
    body = orjson.dumps({"model": FAKE_MODEL, "prompt": "x", "max_tokens": 1})
    headers = {"Authorization": f"Bearer {plane.api_key}", "Content-Type": "application/json"}
    latencies: list[float] = []
    errors = 0
    for _ in range(count):
        started = time.perf_counter()
        async with session.post(f"{plane.url}/v1/completions", data=body, headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                errors += 1
                continue
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies, errors


async def grow(plane: Plane, ca_pem: bytes, token: str, agents: list[FakeAgent], target: int) -> float:
    """Enroll and connect agents until there are `target`; returns the seconds it took."""
    started = time.perf_counter()
    new = [FakeAgent(plane.grpc_address, ca_pem, f"fleet-{i:05d}") for i in range(len(agents), target)]
    await _bounded([agent.enroll(token) for agent in new], ENROLL_CONCURRENCY)
    await _bounded([agent.connect() for agent in new], CONNECT_CONCURRENCY)
    agents.extend(new)
    return time.perf_counter() - started


async def run(suite: Suite) -> dict[str, Any]:
    settings = Settings.for_run(suite.quick)
    workdir = suite.subdir("fleet")
    plane = start_plane(suite.stack, workdir, suite.pinning, node_heartbeat_s=str(HEARTBEAT_S))
    agents: list[FakeAgent] = []
    stages: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await wait_ready(session, plane)
        await configure(session, plane, None)
        token = await node_token(session, plane, uses=max(settings.stages) + 10)
        ca_pem = await plane_certificate(plane.grpc_address, token)
        await asyncio.sleep(1.0)
        base = sample_process(plane.pid)
        base_idle_cpu = await idle_cpu(plane, settings.idle_window_s)
        log(
            f"  fleet: no agent: RSS {base.rss_bytes / MIB:.1f} MiB, "
            f"idle CPU {100 * base_idle_cpu / settings.idle_window_s:.2f}%"
        )
        try:
            for size in settings.stages:
                enroll_s = await grow(plane, ca_pem, token, agents, size)
                seen = await connected_nodes(session, plane)
                if seen < size:
                    raise BenchError(f"{size} agents connected but the plane lists {seen} online")
                await asyncio.sleep(2.0)  # settle: the last Hellos, the first heartbeats
                rss = sample_process(plane.pid)
                cpu = await idle_cpu(plane, settings.idle_window_s)
                heartbeats = size * settings.idle_window_s / HEARTBEAT_S
                latencies, errors = await dispatch_latencies(session, plane, settings.dispatches)
                after = sample_process(plane.pid)
                stage: dict[str, Any] = {
                    "agents": size,
                    "enroll_and_connect_s": round(enroll_s, 2),
                    "plane_rss_mib": round(rss.rss_bytes / MIB, 1),
                    "plane_rss_growth_mib": round((rss.rss_bytes - base.rss_bytes) / MIB, 1),
                    "plane_kib_per_agent": round((rss.rss_bytes - base.rss_bytes) / 1024 / size, 1),
                    "plane_rss_mib_after_dispatch": round(after.rss_bytes / MIB, 1),
                    "plane_fds": rss.fds,
                    "idle_cpu_percent": round(100 * cpu / settings.idle_window_s, 2),
                    "heartbeat_cpu_percent": round(100 * max(0.0, cpu - base_idle_cpu) / settings.idle_window_s, 2),
                    "heartbeat_cpu_us_each": round(1e6 * max(0.0, cpu - base_idle_cpu) / heartbeats, 1),
                    "dispatch_ms": {
                        "p50": round(percentile(latencies, 50), 3),
                        "p90": round(percentile(latencies, 90), 3),
                        "p99": round(percentile(latencies, 99), 3),
                        "n": len(latencies),
                        "errors": errors,
                    },
                }
                stages.append(stage)
                log(
                    f"  fleet: {size} agents in {enroll_s:.1f}s: RSS +{stage['plane_rss_growth_mib']} MiB "
                    f"({stage['plane_kib_per_agent']} KiB/agent), heartbeat CPU {stage['heartbeat_cpu_percent']}% "
                    f"({stage['heartbeat_cpu_us_each']} us each), dispatch p50 {stage['dispatch_ms']['p50']} ms "
                    f"p99 {stage['dispatch_ms']['p99']} ms"
                )
        finally:
            await asyncio.gather(*(agent.close() for agent in agents), return_exceptions=True)
    return {
        "settings": {**settings.__dict__, "heartbeat_s": HEARTBEAT_S},
        "baseline": {
            "plane_rss_mib": round(base.rss_bytes / MIB, 1),
            "idle_cpu_percent": round(100 * base_idle_cpu / settings.idle_window_s, 2),
        },
        "stages": stages,
    }


def format_table(report: dict[str, Any]) -> str:
    header = (
        f"{'agents':>6} {'enroll+connect s':>16} {'plane RSS MiB':>13} {'+MiB':>7} {'KiB/agent':>9} "
        f"{'heartbeat CPU%':>14} {'us/heartbeat':>12} {'dispatch p50 ms':>15} {'p99 ms':>8}"
    )
    base = report["baseline"]
    lines = [
        f"plane with no agent: RSS {base['plane_rss_mib']} MiB, idle CPU {base['idle_cpu_percent']}%; "
        f"heartbeat every {report['settings']['heartbeat_s']:.0f}s",
        header,
        "-" * len(header),
    ]
    for stage in report["stages"]:
        lines.append(
            f"{stage['agents']:>6} {stage['enroll_and_connect_s']:>16.1f} {stage['plane_rss_mib']:>13.1f} "
            f"{stage['plane_rss_growth_mib']:>+7.1f} {stage['plane_kib_per_agent']:>9.1f} "
            f"{stage['heartbeat_cpu_percent']:>14.2f} {stage['heartbeat_cpu_us_each']:>12.1f} "
            f"{stage['dispatch_ms']['p50']:>15.2f} {stage['dispatch_ms']['p99']:>8.2f}"
        )
    return "\n".join(lines)
