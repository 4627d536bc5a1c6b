"""Failover timings: how long a stalled stream takes to be rescued, and what hedging does to a slow first token.

    python bench/failover.py [--runs N] [--results DIR]     (or bench/run.py --only failover)

The plane runs as `hatchway serve` with its default failover settings (stall floor 5 s, factor 4, ceiling 10 s,
idle timeout 60 s, TTFT timeout 60 s, hedge auto) in front of two fault-injecting upstreams
(tests/support/mock_upstream.py, on this process's loop), `primary` then `backup`, serving the same answer:

    stall      the primary sends two content chunks and falls silent for 120 s; the backup rescues the answer.
               Figures: time from the request to [DONE], and the longest silence the client saw
    hedge      the primary needs 20 s for its first token (after five fast answers, so `auto` has its p95);
               the backup answers at once. Time to first content token with hedging (route `--hedge auto`)
               and without (`--hedge off`)

Breakers are set out of reach so that every run meets the faulty primary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from harness import REPO_ROOT, RESULTS_DIR, log, machine_info, percentile, run_async, write_json
from hatchway import ORG, admin, start_plane, wait_ready
from suite import Suite

sys.path.insert(0, str(REPO_ROOT))
from tests.support.mock_upstream import Fault, MockUpstream

REPLY = "The quick brown fox jumps over the lazy dog"
STALL_MODEL, HEDGED_MODEL, UNHEDGED_MODEL = "bench-stall", "bench-hedged", "bench-unhedged"
SLOW_FIRST_TOKEN_S = 20.0
FULL_RUNS, QUICK_RUNS = 20, 5


@dataclass
class Timing:
    first_token_s: float
    done_s: float
    longest_silence_s: float
    text: str
    done: bool


async def stream_once(session: aiohttp.ClientSession, url: str, key: str, model: str) -> Timing:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    started = time.monotonic()
    first = last = None
    silence = 0.0
    text: list[str] = []
    done = False
    headers = {"Authorization": f"Bearer {key}"}
    async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as response:
        async for line in response.content:
            now = time.monotonic()
            payload = line.strip().removeprefix(b"data: ")
            if not payload:
                continue
            if payload == b"[DONE]":
                done = True
                break
            if b'"content":"' in payload and b'"content":""' not in payload:
                chunk = orjson.loads(payload)
                text.append(chunk["choices"][0]["delta"].get("content") or "")
                first = first or now
                if last is not None:
                    silence = max(silence, now - last)
                last = now
    end = time.monotonic()
    return Timing((first or end) - started, end - started, silence, "".join(text), done)


async def setup(session: aiohttp.ClientSession, plane: Any, primary: MockUpstream, backup: MockUpstream) -> str:
    await admin(session, plane, "POST", "/admin/v1/orgs", {"name": ORG})
    key = str((await admin(session, plane, "POST", "/admin/v1/keys", {"org": ORG}))["key"])
    models = [STALL_MODEL, HEDGED_MODEL, UNHEDGED_MODEL]
    for mock in (primary, backup):
        provider = {"org": ORG, "name": mock.name, "base_url": mock.url, "api_keys": ["sk-mock"], "models": models}
        await admin(session, plane, "POST", "/admin/v1/providers", provider)
    for model, hedge in ((STALL_MODEL, None), (HEDGED_MODEL, "auto"), (UNHEDGED_MODEL, "off")):
        rule = {"org": ORG, "model": model, "targets": ["primary", "backup"], "hedge": hedge}
        await admin(session, plane, "PUT", "/admin/v1/routes", rule)
    return key


def figures(timings: list[Timing], field: str) -> dict[str, float]:
    values = [getattr(t, field) for t in timings]
    return {"p50": round(percentile(values, 50), 3), "max": round(max(values), 3), "n": len(values)}


async def bench(runs: int, workdir: Path) -> dict[str, Any]:
    primary, backup = MockUpstream("primary", reply=REPLY), MockUpstream("backup", reply=REPLY)
    for mock in (primary, backup):
        mock.models = [STALL_MODEL, HEDGED_MODEL, UNHEDGED_MODEL]
        await mock.start()
    with contextlib.ExitStack() as stack:
        plane = start_plane(stack, workdir, None, breaker_failures="1000000")
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await wait_ready(session, plane)
            key = await setup(session, plane, primary, backup)

            log(f"stall: {runs} streams whose primary falls silent after two chunks")
            primary.always = Fault("stall", after_chunks=2, delay_s=120)
            stalled = await asyncio.gather(*(stream_once(session, plane.url, key, STALL_MODEL) for _ in range(runs)))
            primary.always = None
            assert all(t.text == REPLY and t.done for t in stalled), [t.text for t in stalled]

            log("hedge: five fast answers give the primary its TTFT record")
            for _ in range(5):
                await stream_once(session, plane.url, key, HEDGED_MODEL)
            primary.always = Fault("slow_first_token", delay_s=SLOW_FIRST_TOKEN_S)
            log(f"hedge: {runs} streams with a {SLOW_FIRST_TOKEN_S:g}s primary, hedged and not")
            hedged, unhedged = await asyncio.gather(
                asyncio.gather(*(stream_once(session, plane.url, key, HEDGED_MODEL) for _ in range(runs))),
                asyncio.gather(*(stream_once(session, plane.url, key, UNHEDGED_MODEL) for _ in range(runs))),
            )
            primary.always = None
            assert all(t.text == REPLY for t in hedged) and all(t.done for t in unhedged)
    for mock in (primary, backup):
        await mock.stop()
    return {
        "benchmark": "failover",
        "machine": machine_info(),
        "runs": runs,
        "settings": "defaults: stall floor 5 s, factor 4, ceiling 10 s; idle 60 s; ttft 60 s; hedge auto (floor 1 s)",
        "stall": {"done_s": figures(stalled, "done_s"), "longest_silence_s": figures(stalled, "longest_silence_s")},
        "hedge": {
            "primary_first_token_s": SLOW_FIRST_TOKEN_S,
            "hedged_ttft_s": figures(list(hedged), "first_token_s"),
            "unhedged_ttft_s": figures(list(unhedged), "first_token_s"),
        },
    }


async def run(suite: Suite) -> dict[str, Any]:
    """bench/run.py's entry: the same two scenarios, fewer runs with --quick."""
    return await bench(QUICK_RUNS if suite.quick else FULL_RUNS, suite.subdir("failover"))


def format_table(report: dict[str, Any]) -> str:
    stall, hedge = report["stall"], report["hedge"]
    lines = [f"{'failover (' + str(report['runs']) + ' runs each, concurrent)':<48} {'p50':>8} {'max':>8}"]
    rows = [
        ("stalled stream: request to [DONE] (s)", stall["done_s"]),
        ("stalled stream: longest silence seen (s)", stall["longest_silence_s"]),
        (f"TTFT, {SLOW_FIRST_TOKEN_S:g}s primary, hedge auto (s)", hedge["hedged_ttft_s"]),
        (f"TTFT, {SLOW_FIRST_TOKEN_S:g}s primary, hedge off (s)", hedge["unhedged_ttft_s"]),
    ]
    lines += [f"{name:<48} {figure['p50']:>8.2f} {figure['max']:>8.2f}" for name, figure in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=FULL_RUNS, help="streams per scenario (run concurrently)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="where failover.json goes")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hatchway-failover-") as workdir:
        report = run_async(bench(args.runs, Path(workdir)))
    print(format_table(report))
    write_json(args.results / "failover.json", report)


if __name__ == "__main__":
    main()
