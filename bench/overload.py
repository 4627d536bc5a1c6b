"""Benchmark 5, overload: non-stream requests offered on a fixed schedule (open loop) at twice the capacity the
gateway benchmark measured for Hatchway at c=32, to a fresh plane on the SUT CPU.

What a good gateway does then: serve what it can with a bounded p99, and refuse the excess at once with
429/503 and `Retry-After` rather than queueing it into seconds of latency. Reported: the rate offered and the
rate actually sent (the Python generator on the load CPU says how late it ran against its schedule), the
served answers' rate and latency, the refusals' count, latency and whether they carried `Retry-After`, and
transport errors/timeouts. At most `MAX_OUTSTANDING` requests are in flight; a request due while that many
are outstanding is not sent and counted as such, so a plane that queues cannot exhaust file descriptors.
"""

from __future__ import annotations

import contextlib
from typing import Any

import aiohttp
from harness import log, percentile
from hatchway import MODELS, configure, start_plane, wait_ready
from loadgen import Request, chat_body, open_loop
from suite import Suite

MAX_OUTSTANDING = 2000
REQUEST_TIMEOUT_S = 10.0
CAPACITY_DURATION_S = 2.0


def _capacity_from_gateway(suite: Suite) -> float | None:
    for row in suite.results.get("gateway", {}).get("rows", []):
        if row["target"] == "hatchway" and row["mode"] == "non-stream" and row["concurrency"] == 32:
            return float(row["rps"])
    return None


def _latencies(outcomes: list[tuple[int, float, bool]], statuses: set[int]) -> dict[str, Any]:
    picked = [latency * 1000 for status, latency, _ in outcomes if status in statuses]
    return {
        "count": len(picked),
        "p50_ms": round(percentile(picked, 50), 2),
        "p99_ms": round(percentile(picked, 99), 2),
        "max_ms": round(max(picked, default=0.0), 2),
    }


async def run(suite: Suite) -> dict[str, Any]:
    duration_s = 4.0 if suite.quick else 10.0
    with contextlib.ExitStack() as stack:
        plane = start_plane(stack, suite.subdir("overload"), suite.pinning)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            await wait_ready(session, plane)
            await configure(session, plane, suite.upstream)
        request = Request(f"{plane.url}/v1/chat/completions", plane.api_key, chat_body(MODELS["json"], False), False)
        capacity = _capacity_from_gateway(suite)
        source = "gateway benchmark, hatchway non-stream c=32"
        if capacity is None:
            measured = await suite.closed_loop.run(request, 32, CAPACITY_DURATION_S)
            capacity, source = measured.rps, f"measured here: closed loop c=32 for {CAPACITY_DURATION_S:.0f}s"
        rate = 2 * capacity
        log(f"  overload: capacity {capacity:.0f} req/s ({source}); offering {rate:.0f} req/s for {duration_s:.0f}s")
        result = await open_loop(request, rate, duration_s, MAX_OUTSTANDING, REQUEST_TIMEOUT_S)
    outcomes = result.outcomes
    refused = [o for o in outcomes if o[0] in (429, 503)]
    served = _latencies(outcomes, {200})
    report = {
        "settings": {"duration_s": duration_s, "max_outstanding": MAX_OUTSTANDING, "timeout_s": REQUEST_TIMEOUT_S},
        "capacity_rps": round(capacity, 1),
        "capacity_source": source,
        "offered_rps": round(rate, 1),
        "sent": result.sent,
        "sent_rps": round(result.sent / result.duration_s, 1) if result.duration_s else 0.0,
        "not_sent_outstanding_cap": result.not_sent,
        "generator_lag_p99_ms": round(result.send_lag_ms_p99, 2),
        "generator_cpu_percent": round(100 * result.generator_cpu_s / result.duration_s, 1) if result.duration_s else 0,
        "served": {**served, "rps": round(served["count"] / result.duration_s, 1) if result.duration_s else 0.0},
        "refused": {
            **_latencies(outcomes, {429, 503}),
            "with_retry_after": sum(1 for o in refused if o[2]),
            "statuses": sorted({o[0] for o in refused}),
        },
        "other_errors": sum(1 for o in outcomes if o[0] not in (200, 429, 503)),
        "unanswered": result.sent - len(outcomes),
    }
    log(
        f"  overload: served {served['count']} (p99 {served['p99_ms']} ms), refused {len(refused)}, "
        f"other {report['other_errors']}, not sent {result.not_sent}"
    )
    return report


def format_table(report: dict[str, Any]) -> str:
    served, refused = report["served"], report["refused"]
    return "\n".join(
        [
            f"capacity {report['capacity_rps']:.0f} req/s ({report['capacity_source']}); offered "
            f"{report['offered_rps']:.0f} req/s for {report['settings']['duration_s']:.0f}s, "
            f"sent {report['sent_rps']:.0f}/s "
            f"(generator lag p99 {report['generator_lag_p99_ms']:.1f} ms)",
            f"{'':10} {'count':>7} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}",
            f"{'served':10} {served['count']:>7} {served['p50_ms']:>9.1f} {served['p99_ms']:>9.1f} "
            f"{served['max_ms']:>9.1f}",
            f"{'429/503':10} {refused['count']:>7} {refused['p50_ms']:>9.1f} {refused['p99_ms']:>9.1f} "
            f"{refused['max_ms']:>9.1f}  (with Retry-After: {refused['with_retry_after']})",
            f"other errors/timeouts {report['other_errors']}, unanswered {report['unanswered']}, not sent "
            f"({report['settings']['max_outstanding']} already outstanding) {report['not_sent_outstanding_cap']}",
        ]
    )
