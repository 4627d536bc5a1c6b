"""Benchmark 9, every core: one plane process against `hatchway serve --workers 2`, side by side in one run.

Both with the policy on that the gateway benchmark gives Hatchway (hatchway.configure: limits and quotas on the
org and the key, never reached, and a cache lookup on every request), non-stream and stream, c=32 and c=128,
measured by the gateway benchmark's own loop (gateway.measure: the same load generator, rounds rotating between
the two, medians). Both on SQLite, both given the same NATS URL (several workers require one).

CPUs: elsewhere the suite pins the process under test to one CPU and the load side (mock upstream, load generator)
to the other (harness.Pinning). Two workers pinned to one CPU would show nothing, so here both contenders may run
on every CPU while the load side keeps its own: on a 2-core machine the second worker has only what the load side
leaves of its core, and the ratio is what this machine can show, not what two free cores give. The CPU each
spends per request (the workers' together) is the figure that carries over: at the same CPU per request, N
cores serve N times the requests once the load comes from elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from typing import Any

import aiohttp
from gateway import MODES, Contender, Settings, measure, summarise
from harness import MachineLoad, median
from hatchway import MODELS, configure, start_plane, wait_ready
from loadgen import Request, chat_body
from suite import Suite

CONTENDERS = {"1 worker": 1, "2 workers": 2}
CONCURRENCY = (32, 128)
NATS_URL = "nats://127.0.0.1:4222"
# Workers on SQLite see a change made through another worker at their next reload, each second (server.serving.workers).
RELOAD_WAIT_S = 2.0
# The CPUs this run may use, read before bench/run.py pins itself to the load CPU.
EVERY_CPU = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()


@contextlib.contextmanager
def on_every_cpu() -> Iterator[None]:
    """Start processes free to run on every CPU (a child inherits its parent's affinity)."""
    if not EVERY_CPU:
        yield
        return
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, EVERY_CPU)
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


async def start_contender(
    suite: Suite, stack: contextlib.ExitStack, session: aiohttp.ClientSession, name: str, workers: int
) -> Contender:
    upstream = suite.upstream  # started (pinned to the load CPU) before the plane, which must not inherit that
    with on_every_cpu():
        plane = start_plane(
            stack,
            suite.subdir("workers"),
            None,
            name=name,
            workers=str(workers),
            nats_url=NATS_URL,
            nats_prefix=f"bench-workers-{os.getpid()}-{workers}",
        )
    await wait_ready(session, plane)
    key = await configure(session, plane, upstream, policy=True)
    if workers > 1:
        await asyncio.sleep(RELOAD_WAIT_S)  # configured through one worker: the others load it from SQLite
    requests = {
        mode: Request(f"{plane.url}/v1/chat/completions", key, chat_body(MODELS[answer], stream), stream)
        for mode, (answer, stream) in MODES.items()
    }
    note = f"{workers} process{'es' if workers > 1 else ''} on every CPU; {plane.setup.get('policy', '')}"
    # No metrics_url: one worker's /metrics counts only what that worker answered.
    return Contender(name, requests, plane.pid, plane.ready_s, note=note)


async def run(suite: Suite) -> dict[str, Any]:
    settings = Settings(
        CONCURRENCY,
        rounds=1 if suite.quick else 3,
        duration_s=1.0 if suite.quick else 3.0,
        warmup_s=1.0,
        contenders=tuple(CONTENDERS),
    )
    with contextlib.ExitStack() as stack:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            contenders = [
                await start_contender(suite, stack, session, name, workers) for name, workers in CONTENDERS.items()
            ]
        with MachineLoad() as machine:
            runs = await measure(suite, contenders, settings)
    rows = [row.__dict__ for row in summarise(runs)]
    by_key = {(row["target"], row["mode"], row["concurrency"]): row for row in rows}
    ratios = []
    for mode in MODES:
        for concurrency in CONCURRENCY:
            one, two = by_key[("1 worker", mode, concurrency)], by_key[("2 workers", mode, concurrency)]
            pairs = zip(one["rounds"], two["rounds"], strict=True)
            ratios.append(
                {
                    "mode": mode,
                    "concurrency": concurrency,
                    # Per round (the two ran back to back), then the median: drift of the machine cancels out.
                    "rps_ratio": round(median([b["rps"] / a["rps"] for a, b in pairs if a["rps"]]), 2),
                }
            )
    return {
        "settings": {
            "concurrency": list(CONCURRENCY),
            "rounds": settings.rounds,
            "duration_s": settings.duration_s,
            "cpus": sorted(EVERY_CPU),
        },
        "load_generator": suite.closed_loop.description,
        "upstream": suite.upstream.as_dict(),
        "contenders": {c.name: {"ready_s": round(c.ready_s or 0.0, 3), "note": c.note} for c in contenders},
        "machine_load": machine.as_dict(),
        "rows": rows,
        "ratios": ratios,
    }


def format_table(report: dict[str, Any]) -> str:
    header = (
        f"{'mode':10} {'conc':>4} | {'1 worker req/s':>14} {'p50':>7} {'p99':>7} {'CPU us':>6} | "
        f"{'2 workers req/s':>15} {'p50':>7} {'p99':>7} {'CPU us':>6} | {'ratio':>5} {'load CPU%':>9} {'errors':>6}"
    )
    lines = [header, "-" * len(header)]
    rows = {(row["target"], row["mode"], row["concurrency"]): row for row in report["rows"]}
    for ratio in report["ratios"]:
        one = rows[("1 worker", ratio["mode"], ratio["concurrency"])]
        two = rows[("2 workers", ratio["mode"], ratio["concurrency"])]
        lines.append(
            f"{ratio['mode']:10} {ratio['concurrency']:>4} | {one['rps']:>14.0f} {one['p50_ms']:>7.2f} "
            f"{one['p99_ms']:>7.2f} {one['cpu_us_per_request']:>6.0f} | {two['rps']:>15.0f} {two['p50_ms']:>7.2f} "
            f"{two['p99_ms']:>7.2f} {two['cpu_us_per_request']:>6.0f} | {ratio['rps_ratio']:>4.2f}x "
            f"{one['load_side_cpu_percent']:>4.0f}/{two['load_side_cpu_percent']:<4.0f} "
            f"{one['errors'] + two['errors']:>6}"
        )
    lines.append(
        "latencies in ms; CPU us: CPU per request of the plane (all workers); load CPU%: mock upstream + load "
        f"generator (1 worker/2 workers), on CPUs {report['settings']['cpus']}; goal 2 workers >= 1.8x"
    )
    return "\n".join(lines)
