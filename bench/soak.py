"""Benchmark 4, soak: a long mixed run against one plane, watching its RSS, open file descriptors, threads and
(when /metrics exposes them) event-loop tasks for growth after warm-up.

The mix repeats every 20 requests: 11 non-stream and 6 stream answers; one error (a bad key, an unknown model
or malformed JSON, in turn); one client that hangs up on a stream after its first bytes; one that gives up on a
non-stream answer after 20 ms. The two hang-ups go to the mock's slow answers, so the plane is still relaying
when the client leaves and must cancel the upstream request. Closed loop, 32 connections, Python client on the
load CPU (it checks every answer, which wrk cannot).

Growth is measured idle to idle: after warm-up (the first 10% of requests), once the clients have hung up and
the plane has nothing in flight, and likewise at the end. Targets: RSS under 5%, no growth in fds or tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

import aiohttp
from harness import MIB, ProcessSample, log, sample_process
from hatchway import MODELS, Plane, configure, metric_value, metrics_text, start_plane, wait_ready
from loadgen import chat_body, client_session
from suite import Suite

CONCURRENCY = 32
WARMUP_FRACTION = 0.1
SAMPLES = 40
# Looked for in /metrics; the plane does not expose such a gauge yet (see the results' `tasks` note).
TASKS_METRIC = "hatchway_event_loop_tasks"
PATTERN = ["json"] * 11 + ["sse"] * 6 + ["error", "hangup-stream", "hangup-json"]
ERRORS = ("bad-key", "unknown-model", "malformed")


class Mix:
    def __init__(self, plane: Plane) -> None:
        self.url = f"{plane.url}/v1/chat/completions"
        self.headers = {"Authorization": f"Bearer {plane.api_key}", "Content-Type": "application/json"}
        self.bad_headers = {"Authorization": "Bearer hw-not-a-key", "Content-Type": "application/json"}
        self.bodies = {
            "json": chat_body(MODELS["json"], False),
            "sse": chat_body(MODELS["sse"], True),
            "hangup-json": chat_body(MODELS["slow-json"], False),
            "hangup-stream": chat_body(MODELS["slow-sse"], True),
            "unknown-model": chat_body("no-such-model", False),
            "malformed": b'{"model": "bench-json", "messages": [',
        }
        self.outcomes: Counter[str] = Counter()

    async def one(self, session: aiohttp.ClientSession, index: int) -> None:
        kind = PATTERN[index % len(PATTERN)]
        if kind == "error":
            kind = ERRORS[(index // len(PATTERN)) % len(ERRORS)]
        try:
            outcome = await self._send(session, kind)
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome = f"{kind}: {type(exc).__name__}"
        self.outcomes[outcome] += 1

    async def _send(self, session: aiohttp.ClientSession, kind: str) -> str:
        headers = self.bad_headers if kind == "bad-key" else self.headers
        body = self.bodies["json" if kind == "bad-key" else kind]
        if kind == "hangup-json":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.02), session.post(self.url, data=body, headers=headers) as resp:
                    await resp.read()
                    return f"{kind}: answered {resp.status} before the hang-up"
            return f"{kind}: hung up"
        async with session.post(self.url, data=body, headers=headers) as resp:
            if kind == "hangup-stream":
                await resp.content.readany()
                resp.close()  # drops the connection mid-stream
                return f"{kind}: hung up after {resp.status}"
            payload = await resp.read()
        if kind in ERRORS:
            return f"{kind}: {resp.status}"
        good = resp.status == 200 and (payload.rstrip().endswith(b"[DONE]") if kind == "sse" else payload[:1] == b"{")
        return f"{kind}: {'ok' if good else f'BAD {resp.status}'}"


async def sample(session: aiohttp.ClientSession, plane: Plane, done: int, started: float) -> dict[str, Any]:
    process: ProcessSample = sample_process(plane.pid)
    text = await metrics_text(session, plane)
    return {
        "requests": done,
        "t_s": round(time.perf_counter() - started, 2),
        "rss_mib": round(process.rss_bytes / MIB, 2),
        "fds": process.fds,
        "threads": process.threads,
        "tasks": metric_value(text, TASKS_METRIC),
        "in_flight": metric_value(text, "hatchway_requests_in_flight"),
    }


async def wait_idle(session: aiohttp.ClientSession, plane: Plane, timeout_s: float = 15.0) -> None:
    """Until the plane has no request in flight (hang-ups' cancellations done), then a usage flush more."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (metric_value(await metrics_text(session, plane), "hatchway_requests_in_flight") or 0) <= 0:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)


async def phase(
    mix: Mix, admin_session: aiohttp.ClientSession, plane: Plane, indices: range, samples: list[dict[str, Any]]
) -> None:
    """Send the requests numbered `indices` on fresh connections, sampling the plane every `every` requests;
    then close the connections and wait until the plane is idle again."""
    tickets = iter(indices)
    every = max(1, len(indices) // SAMPLES)
    started = time.perf_counter()
    done = indices.start
    async with client_session(CONCURRENCY) as session:

        async def worker() -> None:
            nonlocal done
            for index in tickets:
                await mix.one(session, index)
                done += 1

        workers = [asyncio.create_task(worker()) for _ in range(CONCURRENCY)]
        next_sample = indices.start + every
        while not all(w.done() for w in workers):
            await asyncio.sleep(0.2)
            if done >= next_sample:
                samples.append(await sample(admin_session, plane, done, started))
                next_sample += every
                if len(samples) % 5 == 0:
                    s = samples[-1]
                    log(f"  soak {done}/{indices.stop}: RSS {s['rss_mib']} MiB, fds {s['fds']}, threads {s['threads']}")
        await asyncio.gather(*workers)
    await wait_idle(admin_session, plane)


async def run(suite: Suite) -> dict[str, Any]:
    total = 20_000 if suite.quick else 200_000
    warmup = int(total * WARMUP_FRACTION)
    with contextlib.ExitStack() as stack:
        plane = start_plane(stack, suite.subdir("soak"), suite.pinning)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as admin_session:
            await wait_ready(admin_session, plane)
            await configure(admin_session, plane, suite.upstream)
            mix = Mix(plane)
            samples: list[dict[str, Any]] = []
            started = time.perf_counter()
            await phase(mix, admin_session, plane, range(0, warmup), samples)
            # Growth is measured idle to idle: after warm-up with no client connected, and at the end likewise.
            warm = await sample(admin_session, plane, warmup, started)
            samples.append(warm)
            await phase(mix, admin_session, plane, range(warmup, total), samples)
            elapsed = time.perf_counter() - started
            end = await sample(admin_session, plane, total, started)
            samples.append(end)
            done = total
    growth = (end["rss_mib"] - warm["rss_mib"]) / warm["rss_mib"] * 100 if warm["rss_mib"] else 0.0
    bad = {k: v for k, v in mix.outcomes.items() if "BAD" in k or "Error" in k}
    return {
        "settings": {"requests": total, "concurrency": CONCURRENCY, "warmup_requests": warmup, "mix": PATTERN},
        "elapsed_s": round(elapsed, 1),
        "rps": round(done / elapsed, 1),
        "outcomes": dict(sorted(mix.outcomes.items())),
        "unexpected": bad,
        "after_warmup": warm,
        "end": end,
        "peak_rss_mib": max(s["rss_mib"] for s in samples),
        "rss_growth_percent": round(growth, 2),
        "fds_growth": end["fds"] - warm["fds"],
        "threads_growth": end["threads"] - warm["threads"],
        "tasks_growth": None if end["tasks"] is None or warm["tasks"] is None else end["tasks"] - warm["tasks"],
        "tasks_note": None
        if end["tasks"] is not None
        else f"the plane's /metrics has no {TASKS_METRIC} gauge: task growth not measured",
        "samples": samples,
    }


def format_table(report: dict[str, Any]) -> str:
    warm, end = report["after_warmup"], report["end"]
    tasks = "n/a" if report["tasks_growth"] is None else f"{report['tasks_growth']:+.0f}"
    lines = [
        f"{report['settings']['requests']} requests in {report['elapsed_s']:.0f}s ({report['rps']:.0f}/s), "
        f"c={report['settings']['concurrency']}, mixed stream / non-stream / errors / hang-ups",
        f"{'':20} {'RSS MiB':>8} {'fds':>5} {'threads':>7} {'tasks':>6}",
        *(
            f"{label:20} {s['rss_mib']:>8.1f} {s['fds']:>5} {s['threads']:>7} {_n(s['tasks']):>6}"
            for label, s in (("after warm-up, idle", warm), ("end, idle again", end))
        ),
        f"RSS growth after warm-up {report['rss_growth_percent']:+.2f}% (peak {report['peak_rss_mib']:.1f} MiB); "
        f"fds {report['fds_growth']:+d}; threads {report['threads_growth']:+d}; "
        f"tasks {tasks}",
        "outcomes: " + ", ".join(f"{k} {v}" for k, v in report["outcomes"].items()),
    ]
    if report["tasks_note"]:
        lines.append(report["tasks_note"])
    if report["unexpected"]:
        lines.append("UNEXPECTED: " + ", ".join(f"{k} {v}" for k, v in report["unexpected"].items()))
    return "\n".join(lines)


def _n(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"
